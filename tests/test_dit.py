"""The DiT of rf.py and its KV cache: causality of both forwards, the two-stream forward against the block-causal
one, RoPE positions, chunk-by-chunk inference against a KV cache, input and config errors, checkpoints, the flex
backend, autocast dtypes and the Wan2.1-T2V-1.3B parameter layout.

Everything runs on the CPU in fp32 with conftest's tiny random model (make_model); each equality test is paired with a
check that a deliberately wrong variant DOES change the result."""

import json

import pytest
import torch

import checkpoints
import rf
from conftest import C, FPC, HW, S, TINY, chunk, differs, make_model, max_diff, one_line, rand_inputs, rel_err


# ----------------------------------------------------------------------------------------------------------------
# Causality of the two forwards
# ----------------------------------------------------------------------------------------------------------------

@torch.no_grad()
def test_block_causal_forward_is_causal(model):
    N = 4
    x, t, ctx, _ = rand_inputs(N=N)
    v = model.forward_causal(x, t, ctx)
    assert v.shape == x.shape and torch.isfinite(v).all()
    x2, t2, _, _ = rand_inputs(N=N, seed=2)
    for i in range(1, N):
        xa, ta = x.clone(), t.clone()
        xa[:, i * FPC:], ta[:, i * FPC:] = x2[:, i * FPC:], t2[:, i * FPC:]
        va = model.forward_causal(xa, ta, ctx)
        assert max_diff(va[:, :i * FPC], v[:, :i * FPC]) <= 1e-6, f"chunks < {i} saw chunk >= {i}"
        assert differs(chunk(va, i), chunk(v, i))
        # only t of chunk i changed: chunk i changes too (its own modulation), earlier ones not
        tb = t.clone()
        tb[:, i * FPC:] = t2[:, i * FPC:]
        vb = model.forward_causal(x, tb, ctx)
        assert max_diff(vb[:, :i * FPC], v[:, :i * FPC]) <= 1e-6
        assert differs(chunk(vb, i), chunk(v, i))
    # the earliest chunk does influence the later ones (attention across chunks is not cut entirely)
    xa = x.clone()
    xa[:, :FPC] = x2[:, :FPC]
    assert all(differs(chunk(model.forward_causal(xa, t, ctx), j), chunk(v, j)) for j in range(N))


@torch.no_grad()
def test_two_stream_forward_is_causal(model):
    N = 4
    x, t, ctx, hist = rand_inputs(N=N)
    v = model(x, t, ctx, history=hist)
    assert v.shape == x.shape and torch.isfinite(v).all()
    x2, t2, _, hist2 = rand_inputs(N=N, seed=2)
    for i in range(N):
        # noisy frames / t of chunks >= i, and history chunks >= i, all at once
        xa, ta, ha = x.clone(), t.clone(), hist.clone()
        xa[:, i * FPC:], ta[:, i * FPC:], ha[:, i * FPC:] = x2[:, i * FPC:], t2[:, i * FPC:], hist2[:, i * FPC:]
        va = model(xa, ta, ctx, history=ha)
        assert max_diff(va[:, :i * FPC], v[:, :i * FPC]) <= 1e-6, f"chunks < {i} saw chunk >= {i}"
        assert differs(chunk(va, i), chunk(v, i))
        # history chunk i alone: never seen by noisy chunk i (the answer), seen by chunk i + 1
        hb = hist.clone()
        hb[:, i * FPC:(i + 1) * FPC] = hist2[:, i * FPC:(i + 1) * FPC]
        vb = model(x, t, ctx, history=hb)
        assert max_diff(vb[:, :(i + 1) * FPC], v[:, :(i + 1) * FPC]) <= 1e-6, f"noisy chunk {i} saw history {i}"
        if i + 1 < N:
            assert differs(chunk(vb, i + 1), chunk(v, i + 1))
        else:
            assert max_diff(vb, v) <= 1e-6          # the last history chunk is nobody's history


@torch.no_grad()
def test_two_stream_t_of_one_chunk_changes_only_that_chunk(model):
    N = 3
    x, t, ctx, hist = rand_inputs(N=N)
    v = model(x, t, ctx, history=hist)
    for j in range(N):
        tj = t.clone()
        tj[:, j * FPC:(j + 1) * FPC] = 1.0 - tj[:, j * FPC:(j + 1) * FPC]
        vj = model(x, tj, ctx, history=hist)
        for i in range(N):
            if i == j:
                assert differs(chunk(vj, i), chunk(v, i))
            else:
                assert max_diff(chunk(vj, i), chunk(v, i)) <= 1e-6, f"t of chunk {j} leaked into chunk {i}"
    # the noisy frames of one chunk also reach no other chunk (Z_i never attends to Z_j)
    xj = x.clone()
    xj[:, :FPC] += 1.0
    vj = model(xj, t, ctx, history=hist)
    assert differs(chunk(vj, 0), chunk(v, 0)) and max_diff(vj[:, FPC:], v[:, FPC:]) <= 1e-6


# ----------------------------------------------------------------------------------------------------------------
# Two-stream forward == block-causal forward on [history_<i at t = 0 ; x_i]
# ----------------------------------------------------------------------------------------------------------------

@torch.no_grad()
def test_two_stream_equals_block_causal_per_chunk(model):
    N = 4
    x, t, ctx, hist = rand_inputs(N=N)
    v = model(x, t, ctx, history=hist)
    for i in range(N):
        seq = torch.cat([hist[:, :i * FPC], chunk(x, i)], dim=1)
        ts = torch.cat([torch.zeros(x.shape[0], i * FPC), chunk(t, i)], dim=1)
        ref = model.forward_causal(seq, ts, ctx)[:, -FPC:]
        err = rel_err(chunk(v, i), ref)
        assert err <= 1e-5, f"chunk {i}: relative error {err:.2e}"
        if i >= 1:   # wrong variants do differ: history at t != 0, a different history
            assert differs(model.forward_causal(seq, ts.clamp(min=0.5), ctx)[:, -FPC:], ref)
            seq2 = seq.clone()
            seq2[:, 0] += 1.0
            assert differs(model.forward_causal(seq2, ts, ctx)[:, -FPC:], ref)


@torch.no_grad()
def test_rope_positions(model):
    """RoPE is relative: shifting every frame position by the same offset leaves the output unchanged (so the cache
    may store keys at absolute positions), while shifting one chunk relative to the others changes it (so the
    position bookkeeping of both forwards and the cache is really under test)."""
    x, t, ctx, _ = rand_inputs(N=2)
    F_ = x.shape[1]
    text_kv = model.encode_text(ctx)
    mask = model._attention_rule(*rf.block_causal_layout(F_, FPC, "cpu"), S)[0]
    pos = torch.arange(F_)
    ref = model._forward(x, t, pos, text_kv, mask, None, n_out=F_)
    assert max_diff(ref, model.forward_causal(x, t, ctx)) <= 1e-6
    assert rel_err(model._forward(x, t, pos + 5, text_kv, mask, None, n_out=F_), ref) <= 1e-5
    shifted = pos.clone()
    shifted[FPC:] += 1                              # chunk 1 one frame further from chunk 0
    assert differs(model._forward(x, t, shifted, text_kv, mask, None, n_out=F_)[:, FPC:], ref[:, FPC:])


# ----------------------------------------------------------------------------------------------------------------
# forward_chunk against a KV cache == block-causal forward
# ----------------------------------------------------------------------------------------------------------------

@torch.no_grad()
def test_forward_chunk_with_cache_equals_block_causal(model):
    N = 4
    x, t, ctx, _ = rand_inputs(N=N)
    ref = model.forward_causal(x, t, ctx)
    text_kv = model.encode_text(ctx)
    cache = rf.KVCache(model, N * FPC, HW)
    for i in range(N):
        # an uncommitted call with other frames first: the next call overwrites its K/V slots
        model.forward_chunk(chunk(x, i) + 1.0, chunk(t, i), text_kv, cache)
        assert cache.frames == i * FPC and all(layer.length == i * FPC * S for layer in cache.layers)
        vi = model.forward_chunk(chunk(x, i), chunk(t, i), text_kv, cache, commit=i < N - 1)
        err = rel_err(vi, chunk(ref, i))
        assert err <= 1e-5, f"chunk {i}: relative error {err:.2e}"
        if i >= 1:      # the cached chunks matter: an empty cache gives another answer
            alone = model.forward_chunk(chunk(x, i), chunk(t, i), text_kv, rf.KVCache(model, FPC, HW))
            assert differs(alone, chunk(ref, i))
    assert cache.frames == (N - 1) * FPC


# ----------------------------------------------------------------------------------------------------------------
# Errors: one-line ValueErrors that say what to do
# ----------------------------------------------------------------------------------------------------------------

def test_input_errors(model):
    ctx = torch.randn(1, 4, TINY["text_dim"])
    x = torch.randn(1, 2 * FPC, C, *HW)
    t = torch.rand(1, 2 * FPC)
    with pytest.raises(ValueError) as e:
        model.forward_causal(torch.randn(1, FPC, C, 15, 16), torch.rand(1, FPC), ctx)
    assert "divisible" in one_line(e) and "15x16" in one_line(e)
    with pytest.raises(ValueError) as e:
        model.forward_causal(torch.randn(1, FPC + 1, C, *HW), torch.rand(1, FPC + 1), ctx)
    assert "frames_per_chunk" in one_line(e)
    for bad_t in (torch.rand(1), torch.rand(1, 2 * FPC + 1), torch.rand(2, 2 * FPC), torch.rand(1, 2)):
        with pytest.raises(ValueError) as e:
            model.forward_causal(x, bad_t, ctx)
        assert "t must be" in one_line(e)
    with pytest.raises(ValueError) as e:
        model(x, t, ctx, history=x[:, :FPC])
    assert "history" in one_line(e)
    with pytest.raises(ValueError) as e:
        model.forward_causal(x, t, torch.randn(1, TINY["text_len"] + 1, TINY["text_dim"]))
    assert "context" in one_line(e)
    with pytest.raises(ValueError) as e:
        model.forward_causal(torch.randn(1, 2 * FPC, C + 1, *HW), t, ctx)
    assert "x must be" in one_line(e)
    cache = rf.KVCache(model, 2 * FPC, HW)
    cache.frames = rf.ROPE_LEN - 1                 # the next chunk would run past the RoPE table
    with pytest.raises(ValueError) as e:
        model.forward_chunk(x[:, :FPC], t[:, :FPC], model.encode_text(ctx), cache)
    assert str(rf.ROPE_LEN) in one_line(e)


def test_forward_rejects_more_frames_than_rope_table():
    m = make_model(frames_per_chunk=1)
    n = rf.ROPE_LEN + 1
    with pytest.raises(ValueError) as e:
        m.forward_causal(torch.zeros(1, n, C, 4, 4), torch.zeros(1, n), torch.zeros(1, 1, TINY["text_dim"]))
    assert str(rf.ROPE_LEN) in one_line(e)


def test_config_errors():
    for bad in (dict(dim=65), dict(patch_size=(2, 4, 4)), dict(degrade="bogus"), dict(train_t="bogus")):
        with pytest.raises(ValueError) as e:
            rf.preset("toy", **{**TINY, **bad})
        one_line(e)
    for bad in (dict(num_layers=0), dict(num_heads=0), dict(frames_per_chunk=0), dict(frame_size=(0, 16)),
                dict(patch_size=(1, 0, 4)), dict(sample_steps=0), dict(resample_shift=0.0), dict(sample_shift=-1.0)):
        with pytest.raises(ValueError) as e:                     # sizes, counts and shifts that cannot work
            rf.preset("toy", **{**TINY, **bad})
        name = next(iter(bad))
        assert one_line(e).startswith(f"{name}=") and "must be" in one_line(e)
    with pytest.raises(ValueError) as e:
        rf.preset("no-such-preset")
    assert "toy" in one_line(e)
    with pytest.raises(ValueError) as e:
        checkpoints.config_from_dict({**checkpoints.config_to_dict(rf.preset("toy")), "bogus_key": 1})
    assert "bogus_key" in one_line(e)


def test_load_state_strict_names_bad_keys(model):
    good = {k: v.clone() for k, v in model.state_dict().items()}
    fresh = make_model(seed=3)
    checkpoints.load_state_strict(fresh, good)                           # the happy path loads exactly
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), good.values()))

    bad = dict(good)
    del bad["blocks.1.norm3.bias"]
    bad["blocks.0.norm1.weight"] = torch.ones(TINY["dim"])
    bad["head.head.weight"] = torch.zeros(5, TINY["dim"])
    with pytest.raises(ValueError) as e:
        checkpoints.load_state_strict(fresh, bad, what="test weights")
    msg = one_line(e)
    assert "test weights" in msg
    assert "missing blocks.1.norm3.bias" in msg
    assert "unexpected blocks.0.norm1.weight" in msg
    assert "wrong shape head.head.weight" in msg and "(5, 64)" in msg and str((48, 64)) in msg
    # many missing keys: the first few are named, then a count
    with pytest.raises(ValueError) as e:
        checkpoints.load_state_strict(fresh, {k: v for k, v in good.items() if not k.startswith("blocks.")})
    assert "more)" in one_line(e)
    # a failed load must not have half-loaded anything
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), good.values()))


def test_load_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError) as e:      # NOTE: FileNotFoundError (an OSError), not ValueError
        checkpoints.load_checkpoint(tmp_path / "nope")
    assert "nope" in one_line(e)
    ck = tmp_path / "ck"
    checkpoints.save_checkpoint(ck, {"model": {"w": torch.arange(6.0)}}, {"step": 1})
    (ck / "model.safetensors").write_bytes(b"\x00\x01 not a safetensors file at all")
    with pytest.raises(ValueError) as e:
        checkpoints.load_checkpoint(ck)
    assert "corrupt" in one_line(e)
    checkpoints.save_checkpoint(ck, {"model": {"w": torch.arange(6.0)}}, {"step": 1})
    data = (ck / "model.safetensors").read_bytes()
    (ck / "model.safetensors").write_bytes(data[:-8])          # truncated
    with pytest.raises(ValueError) as e:
        checkpoints.load_checkpoint(ck)
    assert "corrupt" in one_line(e)
    checkpoints.save_checkpoint(ck, {"model": {"w": torch.arange(6.0)}}, {"step": 1})
    (ck / "meta.json").write_text("{not json")
    with pytest.raises(ValueError) as e:
        checkpoints.load_checkpoint(ck)
    assert "corrupt" in one_line(e)


# ----------------------------------------------------------------------------------------------------------------
# Checkpoint round trip
# ----------------------------------------------------------------------------------------------------------------

@torch.no_grad()
def test_checkpoint_round_trip(tmp_path, model):
    cfg = model.cfg
    state = model.state_dict()
    opt_state = {"step": torch.tensor(3), "m": torch.randn(4, 5, dtype=torch.float64)}
    meta = {"config": checkpoints.config_to_dict(cfg), "step": 17, "note": "ünïcode", "losses": [1.5, 0.25]}
    path = tmp_path / "runs" / "latest"
    checkpoints.save_checkpoint(path, {"model": {"x": torch.zeros(1)}}, {"old": True})  # then overwritten in place
    checkpoints.save_checkpoint(path, {"model": state, "opt": opt_state}, meta)
    assert not path.with_name("latest.tmp").exists()
    assert sorted(p.name for p in path.iterdir()) == ["meta.json", "model.safetensors", "opt.safetensors"]

    meta2, tensors = checkpoints.load_checkpoint(path)
    assert meta2 == json.loads(json.dumps(meta))
    assert set(tensors) == {"model", "opt"}
    for group, want in (("model", state), ("opt", opt_state)):
        assert set(tensors[group]) == set(want)
        for k, v in want.items():
            assert tensors[group][k].dtype == v.dtype and torch.equal(tensors[group][k], v), k

    cfg2 = checkpoints.config_from_dict(meta2["config"])
    assert cfg2 == cfg and isinstance(cfg2.patch_size, tuple) and isinstance(cfg2.frame_size, tuple)
    m2 = rf.DiT(cfg2).eval()
    checkpoints.load_state_strict(m2, tensors["model"])
    x, t, ctx, hist = rand_inputs(N=2)
    assert torch.equal(m2.forward_causal(x, t, ctx), model.forward_causal(x, t, ctx))
    assert torch.equal(m2(x, t, ctx, history=hist), model(x, t, ctx, history=hist))
    assert differs(rf.DiT(cfg2).eval().forward_causal(x, t, ctx), model.forward_causal(x, t, ctx))     # an unloaded model is different


# ----------------------------------------------------------------------------------------------------------------
# flex_attention backend == SDPA backend; one dtype under autocast
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.filterwarnings("ignore:.*without torch.compile.*:UserWarning")
@torch.no_grad()
def test_flex_backend_equals_sdpa():
    model = make_model()
    x, t, ctx, hist = rand_inputs(N=3)
    model.attn_backend = "sdpa"
    ref_bc, ref_ts = model.forward_causal(x, t, ctx), model(x, t, ctx, history=hist)
    model.attn_backend = "flex"
    layout = rf.block_causal_layout(x.shape[1], FPC, "cpu")
    assert isinstance(model._attention_rule(*layout, S)[0], rf.BlockMask)
    bc, ts = model.forward_causal(x, t, ctx), model(x, t, ctx, history=hist)
    e_bc, e_ts = rel_err(bc, ref_bc), rel_err(ts, ref_ts)
    assert e_bc <= 1e-5 and e_ts <= 1e-5, (e_bc, e_ts)
    # the BlockMask really masks: a different history changes the two-stream output
    assert differs(model(x, t, ctx, history=hist + 1.0)[:, FPC:], ts[:, FPC:])


def test_attention_inputs_share_one_dtype_under_autocast(monkeypatch):
    """train.py's regime on a GPU, fp32 weights under bf16 autocast: q, k and v reach attention all in bf16. (The
    q/k RMSNorm's fp32 weight once made q and k fp32 while v was bf16, so attention, flex included, ran in fp32.)"""
    model = make_model()
    seen, real = [], rf.attention

    def spy(q, k, v, *rest):
        seen.append((q.dtype, k.dtype, v.dtype))
        return real(q, k, v, *rest)

    monkeypatch.setattr(rf, "attention", spy)
    x, t, ctx, hist = rand_inputs(N=2)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(x, t, ctx, history=hist)
    assert len(seen) >= 2 and all(dtypes == (torch.bfloat16,) * 3 for dtypes in seen), seen


# ----------------------------------------------------------------------------------------------------------------
# The 1.3B layout, on the meta device
# ----------------------------------------------------------------------------------------------------------------

def test_wan_1_3b_layout():
    with torch.device("meta"):
        m = rf.DiT(rf.preset("wan2.1-t2v-1.3b"))
    assert sum(p.numel() for p in m.parameters()) == 1_418_996_800
    sd = m.state_dict()
    assert len(sd) == 825
    D, FF = 1536, 8960
    top = {
        "patch_embedding.weight": (D, 16, 1, 2, 2), "patch_embedding.bias": (D,),
        "text_embedding.0.weight": (D, 4096), "text_embedding.0.bias": (D,),
        "text_embedding.2.weight": (D, D), "text_embedding.2.bias": (D,),
        "time_embedding.0.weight": (D, 256), "time_embedding.0.bias": (D,),
        "time_embedding.2.weight": (D, D), "time_embedding.2.bias": (D,),
        "time_projection.1.weight": (6 * D, D), "time_projection.1.bias": (6 * D,),
        "head.modulation": (1, 2, D), "head.head.weight": (64, D), "head.head.bias": (64,),
    }
    block = {"modulation": (1, 6, D), "norm3.weight": (D,), "norm3.bias": (D,),
             "ffn.0.weight": (FF, D), "ffn.0.bias": (FF,), "ffn.2.weight": (D, FF), "ffn.2.bias": (D,)}
    for attn in ("self_attn", "cross_attn"):
        for p in "qkvo":
            block[f"{attn}.{p}.weight"], block[f"{attn}.{p}.bias"] = (D, D), (D,)
        block[f"{attn}.norm_q.weight"] = block[f"{attn}.norm_k.weight"] = (D,)
    assert len(top) == 15 and len(block) == 27
    for k, shape in top.items():
        assert tuple(sd[k].shape) == shape, k
    for k, shape in block.items():
        assert tuple(sd[f"blocks.0.{k}"].shape) == shape, k
    want = set(top) | {f"blocks.{i}.{k}" for i in range(30) for k in block}
    assert set(sd) == want
    assert all(tuple(sd[f"blocks.{i}.{k}"].shape) == s for i in range(30) for k, s in block.items())
    assert not any(".norm1." in k or ".norm2." in k or "rope" in k or "freqs" in k for k in sd)
    assert len(list(m.buffers())) == 0
