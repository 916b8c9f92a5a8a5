"""Tests of the model and the method in rf.py: the mask rule, causality of both forwards, their equivalence with
chunk-by-chunk (KV-cached) inference, sampling, errors, training, checkpoints, the flex backend and the 1.3B layout.

Everything runs on the CPU in fp32 with a tiny random model. The Wan init zeros the head weight (every output would
be the same constant), so the model gets random head weights and perturbed modulation/norm parameters; each
equality test is paired with a check that a deliberately wrong variant DOES change the result."""

import json
import math
import shutil

import pytest
import torch

import checkpoints
import kernels
import rf

TINY = dict(num_layers=2, dim=64, ffn_dim=128, num_heads=2, text_len=6, text_dim=32)
HW = (16, 16)                 # 16x16 frames, patch (1, 4, 4) -> 16 tokens per frame
S = 16
FPC = 2                        # the toy preset's frames_per_chunk
C = 3                          # the toy preset's in_dim


def make_model(seed=0, **overrides):
    """The toy preset shrunk to TINY, with every output-relevant parameter non-trivial."""
    torch.manual_seed(seed)
    model = rf.DiT(rf.preset("toy", **{**TINY, **overrides}))
    g = torch.Generator().manual_seed(seed + 1000)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if name == "head.head.weight":
                p.copy_(noise / math.sqrt(p.shape[1]))               # Wan inits it to zero
            elif name.endswith("modulation"):
                p.add_(0.3 * noise)
            elif name.endswith("bias"):
                p.add_(0.05 * noise)
            elif p.ndim == 1:                                          # norm3 / RMSNorm weights
                p.add_(0.2 * noise)
    return model.eval()


def seeded(seed):
    return torch.Generator().manual_seed(seed)


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def max_diff(a, b):
    return (a - b).abs().max().item() if a.numel() else 0.0


def differs(a, b, tol=1e-4):
    """Clearly different, not merely rounding: relative difference above tol."""
    return rel_err(a, b) > tol


def rand_inputs(B=2, N=3, seed=1, Lt=4):
    g = torch.Generator().manual_seed(seed)
    F_ = N * FPC
    x = torch.randn(B, F_, C, *HW, generator=g)
    t = torch.rand(B, N, generator=g).repeat_interleave(FPC, dim=1)  # one t per chunk
    ctx = torch.randn(B, Lt, TINY["text_dim"], generator=g)
    hist = torch.randn(B, F_, C, *HW, generator=g)
    return x, t, ctx, hist


def chunk(v, i):
    return v[:, i * FPC:(i + 1) * FPC]


@pytest.fixture(scope="module")
def model():
    return make_model()


# ----------------------------------------------------------------------------------------------------------------
# 1. The mask rule
# ----------------------------------------------------------------------------------------------------------------

def brute_mask(chunk_ids, stream_ids):
    """The plain-language rules, one (query, key) pair at a time.

    One stream (all HISTORY): block-causal, chunk i sees chunks <= i.
    Two streams [H ; Z]: H_j sees H_<=j; Z_i sees Z_i and H_<i only (never H_i, never another Z)."""
    L = len(chunk_ids)
    m = torch.zeros(L, L, dtype=torch.bool)
    for q in range(L):
        for k in range(L):
            cq, ck = chunk_ids[q], chunk_ids[k]
            sq, sk = stream_ids[q], stream_ids[k]
            if sq == rf.HISTORY:
                m[q, k] = sk == rf.HISTORY and ck <= cq
            else:
                m[q, k] = (sk == rf.NOISY and ck == cq) or (sk == rf.HISTORY and ck < cq)
    return m


def per_token(ids, tokens):
    return [c for c in ids for _ in range(tokens)]


@pytest.mark.parametrize("num_chunks", [1, 2, 3, 5])
@pytest.mark.parametrize("tokens", [1, 3])
def test_dense_mask_matches_brute_force(num_chunks, tokens):
    # block-causal
    c = per_token(list(range(num_chunks)), tokens)
    s = [rf.HISTORY] * len(c)
    got = rf.dense_mask(torch.tensor(c), torch.tensor(s))
    assert torch.equal(got, brute_mask(c, s))
    # two-stream, full [H_1..H_N ; Z_1..Z_N] and as the forward builds it, without H_N
    for n_hist in (num_chunks, num_chunks - 1):
        c = per_token(list(range(n_hist)) + list(range(num_chunks)), tokens)
        s = per_token([rf.HISTORY] * n_hist + [rf.NOISY] * num_chunks, tokens)
        got = rf.dense_mask(torch.tensor(c), torch.tensor(s))
        want = brute_mask(c, s)
        assert torch.equal(got, want)
        if num_chunks >= 2:     # the rule is not trivially "all" or "causal over the whole sequence"
            assert not want.all() and not torch.equal(want, torch.ones_like(want).tril())


def test_model_mask_expands_frames_to_tokens(model):
    """DiT._mask takes ids per frame and expands them per token before applying the rule."""
    fpc, N, S_ = 2, 3, 4
    chunk_f = torch.arange(N * fpc) // fpc
    hist_f = chunk_f[: (N - 1) * fpc]
    c_f = torch.cat([hist_f, chunk_f])
    s_f = torch.cat([torch.full_like(hist_f, rf.HISTORY), torch.full_like(chunk_f, rf.NOISY)])
    got = model._mask(c_f, s_f, S_)
    assert got.dtype == torch.bool and got.shape == (len(c_f) * S_,) * 2
    assert torch.equal(got, brute_mask(per_token(c_f.tolist(), S_), per_token(s_f.tolist(), S_)))


def test_mask_ascii():
    want = "\n".join([
        "q\\k  H1  H2  H3  Z1  Z2  Z3",
        " H1   #   .   .   .   .   .",
        " H2   #   #   .   .   .   .",
        " H3   #   #   #   .   .   .",
        " Z1   .   .   .   #   .   .",
        " Z2   #   .   .   .   #   .",
        " Z3   #   #   .   .   .   #",
    ])
    assert rf.mask_ascii(3) == want
    assert rf.mask_ascii(3, two_stream=False) == "\n".join([
        "q\\k  C1  C2  C3",
        " C1   #   .   .",
        " C2   #   #   .",
        " C3   #   #   #",
    ])


# ----------------------------------------------------------------------------------------------------------------
# 2-4. Causality of the two forwards
# ----------------------------------------------------------------------------------------------------------------

@torch.no_grad()
def test_block_causal_forward_is_causal(model):
    N = 4
    x, t, ctx, _ = rand_inputs(N=N)
    v = model(x, t, ctx)
    assert v.shape == x.shape and torch.isfinite(v).all()
    x2, t2, _, _ = rand_inputs(N=N, seed=2)
    for i in range(1, N):
        xa, ta = x.clone(), t.clone()
        xa[:, i * FPC:], ta[:, i * FPC:] = x2[:, i * FPC:], t2[:, i * FPC:]
        va = model(xa, ta, ctx)
        assert max_diff(va[:, :i * FPC], v[:, :i * FPC]) <= 1e-6, f"chunks < {i} saw chunk >= {i}"
        assert differs(chunk(va, i), chunk(v, i))
        # only t of chunk i changed: chunk i changes too (its own modulation), earlier ones not
        tb = t.clone()
        tb[:, i * FPC:] = t2[:, i * FPC:]
        vb = model(x, tb, ctx)
        assert max_diff(vb[:, :i * FPC], v[:, :i * FPC]) <= 1e-6
        assert differs(chunk(vb, i), chunk(v, i))
    # the earliest chunk does influence the later ones (attention across chunks is not cut entirely)
    xa = x.clone()
    xa[:, :FPC] = x2[:, :FPC]
    assert all(differs(chunk(model(xa, t, ctx), j), chunk(v, j)) for j in range(N))


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
# 5. Two-stream forward == block-causal forward on [history_<i at t = 0 ; x_i]
# ----------------------------------------------------------------------------------------------------------------

@torch.no_grad()
def test_two_stream_equals_block_causal_per_chunk(model):
    N = 4
    x, t, ctx, hist = rand_inputs(N=N)
    v = model(x, t, ctx, history=hist)
    for i in range(N):
        seq = torch.cat([hist[:, :i * FPC], chunk(x, i)], dim=1)
        ts = torch.cat([torch.zeros(x.shape[0], i * FPC), chunk(t, i)], dim=1)
        ref = model(seq, ts, ctx)[:, -FPC:]
        err = rel_err(chunk(v, i), ref)
        assert err <= 1e-5, f"chunk {i}: relative error {err:.2e}"
        if i >= 1:   # wrong variants do differ: history at t != 0, a different history
            assert differs(model(seq, ts.clamp(min=0.5), ctx)[:, -FPC:], ref)
            seq2 = seq.clone()
            seq2[:, 0] += 1.0
            assert differs(model(seq2, ts, ctx)[:, -FPC:], ref)


@torch.no_grad()
def test_rope_positions(model):
    """RoPE is relative: shifting every frame position by the same offset leaves the output unchanged (so the cache
    may store keys at absolute positions), while shifting one chunk relative to the others changes it (so the
    position bookkeeping of both forwards and the cache is really under test)."""
    x, t, ctx, _ = rand_inputs(N=2)
    F_ = x.shape[1]
    text_kv = model.encode_text(ctx)
    mask = model._mask(*rf._block_causal_layout(F_, FPC, "cpu"), S)
    pos = torch.arange(F_)
    ref = model._forward(x, t, pos, text_kv, mask, n_out=F_)
    assert max_diff(ref, model(x, t, ctx)) <= 1e-6
    assert rel_err(model._forward(x, t, pos + 5, text_kv, mask, n_out=F_), ref) <= 1e-5
    shifted = pos.clone()
    shifted[FPC:] += 1                              # chunk 1 one frame further from chunk 0
    assert differs(model._forward(x, t, shifted, text_kv, mask, n_out=F_)[:, FPC:], ref[:, FPC:])


# ----------------------------------------------------------------------------------------------------------------
# 7. forward_chunk against a KV cache == block-causal forward
# ----------------------------------------------------------------------------------------------------------------

@torch.no_grad()
def test_forward_chunk_with_cache_equals_block_causal(model):
    N = 4
    x, t, ctx, _ = rand_inputs(N=N)
    ref = model(x, t, ctx)
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
# 6. Cached sampling
# ----------------------------------------------------------------------------------------------------------------

def _gen(model, ctx, num_frames, **kw):
    kw = {"steps": 3, "size": HW, "seed": 0, **kw}
    return rf.generate(model, ctx, num_frames, **kw)


@pytest.mark.parametrize("guided", [True, False])
@pytest.mark.parametrize("with_prefix", [False, True])
def test_generate_cache_equals_no_cache(model, guided, with_prefix):
    g = torch.Generator().manual_seed(5)
    B = 2
    ctx = torch.randn(B, 4, TINY["text_dim"], generator=g)
    kw = dict(cfg_scale=3.0, neg_context=torch.zeros(1, 4, TINY["text_dim"])) if guided else dict(cfg_scale=1.0)
    prefix = torch.randn(B, 2 * FPC, C, *HW, generator=g) if with_prefix else None
    num_frames = 3 * FPC
    a = _gen(model, ctx, num_frames, prefix=prefix, use_cache=True, **kw)
    b = _gen(model, ctx, num_frames, prefix=prefix, use_cache=False, **kw)
    assert a.shape == (B, num_frames, C, *HW) and torch.isfinite(a).all()
    err = rel_err(a, b)
    assert err <= 1e-5, f"cache vs no cache: relative error {err:.2e}"
    if with_prefix:
        assert torch.equal(a[:, :2 * FPC], prefix)
    assert torch.equal(_gen(model, ctx, num_frames, prefix=prefix, **kw), a)              # same seed
    assert differs(_gen(model, ctx, num_frames, prefix=prefix, seed=1, **kw), a)          # other seed
    if guided:   # guidance is really applied, as v_u + s (v_c - v_u): with v_u == v_c it is a no-op
        assert differs(_gen(model, ctx, num_frames, prefix=prefix, cfg_scale=1.0), a)
        same = _gen(model, ctx, num_frames, prefix=prefix, cfg_scale=3.0, neg_context=ctx)
        assert rel_err(same, _gen(model, ctx, num_frames, prefix=prefix, cfg_scale=1.0)) <= 1e-5


@torch.no_grad()
def test_generate_is_causal_and_depends_on_prefix(model):
    g = torch.Generator().manual_seed(6)
    ctx = torch.randn(1, 4, TINY["text_dim"], generator=g)
    neg = torch.zeros(1, 4, TINY["text_dim"])
    # a longer video starts with the shorter one (noise is drawn chunk by chunk from one seeded generator)
    short = _gen(model, ctx, FPC, neg_context=neg)
    long = _gen(model, ctx, 3 * FPC, neg_context=neg)
    assert max_diff(long[:, :FPC], short) <= 1e-5
    # with a 2-chunk prefix, the generated chunk depends on each prefix chunk
    prefix = torch.randn(1, 2 * FPC, C, *HW, generator=g)
    out = _gen(model, ctx, 3 * FPC, prefix=prefix, neg_context=neg)
    for k in range(2):
        p2 = prefix.clone()
        p2[:, k * FPC:(k + 1) * FPC] = torch.randn(1, FPC, C, *HW, generator=g)
        out2 = _gen(model, ctx, 3 * FPC, prefix=p2, neg_context=neg)
        assert torch.equal(out2[:, :2 * FPC], p2)
        assert differs(out2[:, 2 * FPC:], out[:, 2 * FPC:]), f"generation ignored prefix chunk {k}"
    # and on the prompt
    assert differs(_gen(model, ctx + 1.0, 3 * FPC, prefix=prefix, neg_context=neg)[:, 2 * FPC:], out[:, 2 * FPC:])


# ----------------------------------------------------------------------------------------------------------------
# 8. Errors: one-line ValueErrors that say what to do
# ----------------------------------------------------------------------------------------------------------------

def one_line(excinfo):
    msg = str(excinfo.value)
    assert msg and "\n" not in msg, f"not a one-line message: {msg!r}"
    return msg


def test_input_errors(model):
    ctx = torch.randn(1, 4, TINY["text_dim"])
    x = torch.randn(1, 2 * FPC, C, *HW)
    t = torch.rand(1, 2 * FPC)
    with pytest.raises(ValueError) as e:
        model(torch.randn(1, FPC, C, 15, 16), torch.rand(1, FPC), ctx)
    assert "divisible" in one_line(e) and "15x16" in one_line(e)
    with pytest.raises(ValueError) as e:
        model(torch.randn(1, FPC + 1, C, *HW), torch.rand(1, FPC + 1), ctx)
    assert "frames_per_chunk" in one_line(e)
    for bad_t in (torch.rand(1), torch.rand(1, 2 * FPC + 1), torch.rand(2, 2 * FPC), torch.rand(1, 2)):
        with pytest.raises(ValueError) as e:
            model(x, bad_t, ctx)
        assert "t must be" in one_line(e)
    with pytest.raises(ValueError) as e:
        model(x, t, ctx, history=x[:, :FPC])
    assert "history" in one_line(e)
    with pytest.raises(ValueError) as e:
        model(x, t, torch.randn(1, TINY["text_len"] + 1, TINY["text_dim"]))
    assert "context" in one_line(e)
    with pytest.raises(ValueError) as e:
        model(torch.randn(1, 2 * FPC, C + 1, *HW), t, ctx)
    assert "x must be" in one_line(e)
    cache = rf.KVCache(model, 2 * FPC, HW)
    cache.frames = rf.ROPE_LEN - 1                 # the next chunk would run past the RoPE table
    with pytest.raises(ValueError) as e:
        model.forward_chunk(x[:, :FPC], t[:, :FPC], model.encode_text(ctx), cache)
    assert str(rf.ROPE_LEN) in one_line(e)


def test_generate_errors_raise_before_any_compute(model, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("computed before validating the arguments")
    for name in ("encode_text", "_forward", "forward_chunk", "forward"):
        monkeypatch.setattr(model, name, boom)
    ctx = torch.randn(1, 4, TINY["text_dim"])
    neg = torch.zeros(1, 4, TINY["text_dim"])
    past = rf.ROPE_LEN + FPC                      # a multiple of the chunk, one chunk past the RoPE table
    with pytest.raises(ValueError) as e:
        rf.generate(model, ctx, past, size=HW, neg_context=neg)
    assert str(rf.ROPE_LEN) in one_line(e)
    with pytest.raises(ValueError) as e:
        rf.generate(model, ctx, FPC + 1, size=HW, neg_context=neg)
    assert "frames_per_chunk" in one_line(e)
    with pytest.raises(ValueError) as e:
        rf.generate(model, ctx, 2 * FPC, size=HW, prefix=torch.randn(1, FPC + 1, C, *HW), neg_context=neg)
    assert "frames_per_chunk" in one_line(e)
    with pytest.raises(ValueError) as e:
        rf.generate(model, ctx, 2 * FPC, size=HW, prefix=torch.randn(1, 2 * FPC, C, *HW), neg_context=neg)
    assert "prefix" in one_line(e)
    with pytest.raises(ValueError) as e:
        rf.generate(model, ctx, 2 * FPC, size=HW, cfg_scale=5.0)
    assert "neg_context" in one_line(e)


@pytest.mark.parametrize("use_cache", [True, False])
def test_generate_rejects_frame_size_not_divisible_by_patch(model, use_cache):
    ctx = torch.randn(1, 4, TINY["text_dim"])
    with pytest.raises(ValueError) as e:
        rf.generate(model, ctx, FPC, size=(15, 16), steps=1, cfg_scale=1.0, use_cache=use_cache)
    assert "divisible" in one_line(e)


@pytest.mark.parametrize("use_cache", [True, False])
def test_generate_rejects_prefix_of_another_frame_size(model, use_cache):
    """A 16x16 prefix with size=(32, 32): today the cached path attends across frames of two sizes and fails only
    at the final torch.cat, after all the compute; it should be a ValueError up front."""
    ctx = torch.randn(1, 4, TINY["text_dim"])
    with pytest.raises(ValueError) as e:
        rf.generate(model, ctx, 3 * FPC, size=(32, 32), prefix=torch.randn(1, 2 * FPC, C, *HW), steps=1,
                    cfg_scale=1.0, use_cache=use_cache)
    assert "prefix" in one_line(e)


def test_forward_rejects_more_frames_than_rope_table():
    m = make_model(frames_per_chunk=1)
    n = rf.ROPE_LEN + 1
    with pytest.raises(ValueError) as e:
        m(torch.zeros(1, n, C, 4, 4), torch.zeros(1, n), torch.zeros(1, 1, TINY["text_dim"]))
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
# 9. Training
# ----------------------------------------------------------------------------------------------------------------

def _clip(B=2, N=3, seed=7):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, N * FPC, C, *HW, generator=g).clamp(-1, 1), torch.randn(B, 4, TINY["text_dim"], generator=g)


@pytest.mark.parametrize("mode", rf.DEGRADE_MODES)
def test_training_loss_runs_and_backprops(mode):
    model = make_model().train()
    clip, ctx = _clip()
    loss, chunk_loss, chunk_t = rf.training_loss(model, clip, ctx, mode=mode, generator=seeded(0))
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert chunk_loss.shape == chunk_t.shape == (2, 3) and not chunk_loss.requires_grad
    assert torch.allclose(loss.detach(), chunk_loss.mean())
    assert ((chunk_t > 0) & (chunk_t < 1)).all()
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    for n in ("head.head.weight", "blocks.0.self_attn.q.weight", "blocks.0.modulation", "time_embedding.0.weight",
              "text_embedding.0.weight", "patch_embedding.weight"):
        assert grads[n].abs().sum() > 0, f"no gradient reached {n}"


@torch.no_grad()
def test_training_loss_is_flow_matching_on_ground_truth():
    """Teacher forcing ("none"): the loss is mean ||v(x_t, t) - (eps - x0)||^2 with one t per chunk, history = GT.
    Recomputed by hand from the same generator draws (training t first, then eps)."""
    model = make_model()
    clip, ctx = _clip()
    B, F_ = clip.shape[:2]
    N = F_ // FPC
    loss, chunk_loss, chunk_t = rf.training_loss(model, clip, ctx, mode="none", generator=seeded(4))
    g = torch.Generator().manual_seed(4)
    t = rf.sample_train_t(model.cfg, B, N, g)
    eps = torch.randn(clip.shape, generator=g)
    tf = t.repeat_interleave(FPC, dim=1)
    v = model(rf.add_noise(clip, eps, tf), tf, ctx, history=clip)
    err = (v - (eps - clip)).pow(2).mean(dim=(2, 3, 4)).unflatten(1, (N, FPC)).mean(2)
    assert torch.equal(chunk_t, t)
    assert rel_err(chunk_loss, err) <= 1e-5 and abs(loss.item() - err.mean().item()) <= 1e-5 * err.mean().item()
    # wrong variant: the same t with other noise gives another per-chunk loss
    eps2 = torch.randn(clip.shape, generator=g)
    v2 = model(rf.add_noise(clip, eps2, tf), tf, ctx, history=clip)
    assert differs((v2 - (eps2 - clip)).pow(2).mean(dim=(2, 3, 4)).unflatten(1, (N, FPC)).mean(2), chunk_loss, 1e-3)


def test_grad_checkpointing_gives_the_same_gradients():
    clip, ctx = _clip()
    grads = []
    for ckpt in (False, True):
        model = make_model().train()
        model.grad_checkpointing = ckpt
        loss, _, _ = rf.training_loss(model, clip, ctx, mode="autoregressive", generator=seeded(1))
        loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert rel_err(grads[1], grads[0]) <= 1e-5


def test_degrade_history():
    model = make_model()
    clip, ctx = _clip()
    assert torch.equal(rf.degrade_history(model, clip, ctx, "none", seeded(0)), clip)
    ar = rf.degrade_history(model, clip, ctx, "autoregressive", seeded(0))
    assert ar.shape == clip.shape and torch.isfinite(ar).all()
    assert torch.equal(ar[:, -FPC:], clip[:, -FPC:])                 # last chunk: nobody's history, untouched
    for i in range(clip.shape[1] // FPC - 1):
        assert differs(chunk(ar, i), chunk(clip, i), 1e-3), f"chunk {i} not resampled"
    assert torch.equal(rf.degrade_history(model, clip, ctx, "autoregressive", seeded(0)), ar)   # seeded
    noise = rf.degrade_history(model, clip, ctx, "noise", seeded(0))
    assert differs(noise, clip) and rel_err(noise, clip) < 0.5        # small: tau <= noise_aug_max
    par = rf.degrade_history(model, clip, ctx, "parallel", seeded(0))
    assert differs(chunk(par, 0), chunk(clip, 0), 1e-3)
    with pytest.raises(ValueError):
        rf.degrade_history(model, clip, ctx, "bogus", seeded(0))


@torch.no_grad()
def test_autoregressive_resampling_matches_manual_rollout():
    """Chunk 0 is resampled from x_{t_s} with an empty history; chunk 1 conditioned on the resampled chunk 0
    (not the ground truth): one Euler step from t_s to 0 with the block-causal forward."""
    model = make_model()
    clip, ctx = _clip(B=1, N=3)
    t_s = torch.tensor([0.4])
    out = rf.resample_autoregressive(model, clip, ctx, t_s, steps=1, generator=torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    done = []
    for i in range(2):
        eps = torch.randn(chunk(clip, i).shape, generator=g)
        xi = rf.add_noise(chunk(clip, i), eps, t_s[:, None].expand(1, FPC))
        seq = torch.cat(done + [xi], dim=1)
        ts = torch.cat([torch.zeros(1, i * FPC), t_s[:, None].expand(1, FPC)], dim=1)
        xi = xi - t_s.view(-1, 1, 1, 1, 1) * model(seq, ts, ctx)[:, -FPC:]
        done.append(xi)
        assert rel_err(chunk(out, i), xi) <= 1e-5
    # wrong variant: chunk 1 conditioned on the ground-truth chunk 0 instead gives another result
    g = torch.Generator().manual_seed(3)
    torch.randn(chunk(clip, 0).shape, generator=g)
    x1 = rf.add_noise(chunk(clip, 1), torch.randn(chunk(clip, 1).shape, generator=g), t_s[:, None].expand(1, FPC))
    seq = torch.cat([chunk(clip, 0), x1], dim=1)
    ts = torch.cat([torch.zeros(1, FPC), t_s[:, None].expand(1, FPC)], dim=1)
    teacher = x1 - t_s.view(-1, 1, 1, 1, 1) * model(seq, ts, ctx)[:, -FPC:]
    assert differs(teacher, chunk(out, 1))


def test_resampling_forcing_overfits_one_batch():
    torch.manual_seed(0)
    model = make_model().train()
    clip, ctx = _clip(B=2, N=3)
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    losses = []
    for _ in range(40):
        loss, _, _ = rf.training_loss(model, clip, ctx, mode="autoregressive", generator=seeded(0))
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert losses[-1] < 0.35 * losses[0], f"loss {losses[0]:.3f} -> {losses[-1]:.3f}"


# ----------------------------------------------------------------------------------------------------------------
# 10. Checkpoint round trip
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
    assert torch.equal(m2(x, t, ctx), model(x, t, ctx))
    assert torch.equal(m2(x, t, ctx, history=hist), model(x, t, ctx, history=hist))
    assert differs(rf.DiT(cfg2).eval()(x, t, ctx), model(x, t, ctx))     # an unloaded model is different


# ----------------------------------------------------------------------------------------------------------------
# 11. flex_attention backend == SDPA backend
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.filterwarnings("ignore:.*without torch.compile.*:UserWarning")
@torch.no_grad()
def test_flex_backend_equals_sdpa():
    model = make_model()
    x, t, ctx, hist = rand_inputs(N=3)
    model.attn_backend = "sdpa"
    ref_bc, ref_ts = model(x, t, ctx), model(x, t, ctx, history=hist)
    model.attn_backend = "flex"
    layout = rf._block_causal_layout(x.shape[1], FPC, "cpu")
    assert isinstance(model._mask(*layout, S), rf.BlockMask)
    bc, ts = model(x, t, ctx), model(x, t, ctx, history=hist)
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


@pytest.mark.skipif(not (shutil.which("g++") or shutil.which("c++")), reason="torch.compile needs a C++ compiler")
def test_compiled_block_masks_equal_eager(monkeypatch):
    """On CUDA the flex masks are built by torch.compile(create_block_mask): eager, it materialises the whole
    (L, L) grid (some 35 GB at Wan's training length). Compiled here on the CPU, both of our mask_mods (the rule's
    two-stream layout, and routing) must give the same blocks as eager. Inputs span several 128-token blocks."""
    def blocks(m):
        return [getattr(m, k) for k in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices")]

    frames, tokens = 12, 40                                        # 2 streams x 12 frames x 40 = 960 tokens
    chunk = torch.arange(frames) // FPC
    chunk, stream = torch.cat([chunk, chunk]), torch.tensor([rf.HISTORY] * frames + [rf.NOISY] * frames)
    chunk, stream = chunk.repeat_interleave(tokens), stream.repeat_interleave(tokens)
    selected = torch.rand(1, 2, len(chunk), frames // FPC, generator=torch.Generator().manual_seed(0)) < 0.3
    selected[:, 0] = False                                         # head 0 routes to no history chunk at all

    def build():                                                   # __wrapped__: past flex_block_mask's cache
        return (kernels.flex_block_mask.__wrapped__(rf.may_attend, tuple(chunk.tolist()), tuple(stream.tolist()),
                                                     "cpu"),
                kernels.flex_routed_mask(rf.may_attend_routed, selected, chunk, stream))

    eager = build()
    monkeypatch.setattr(kernels, "create_block_mask", torch.compile(kernels.create_block_mask))
    for want, got in zip(eager, build()):
        assert all(torch.equal(a, b) for a, b in zip(blocks(want), blocks(got)))
    routed = eager[1].kv_num_blocks + eager[1].full_kv_num_blocks                          # (1, 2, query blocks)
    assert (routed[0, 0] <= routed[0, 1]).all() and (routed[0, 0] < routed[0, 1]).any()  # per head, as selected


# ----------------------------------------------------------------------------------------------------------------
# 12. The 1.3B layout, on the meta device
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
