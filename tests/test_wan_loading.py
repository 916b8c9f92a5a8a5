"""Loading Wan2.1 DiT weights with wan.load_wan, from every layout a user may bring, against diffusers' own model.

Tiny random checkpoints are written here: diffusers' WanTransformer3DModel saves its own layout with save_pretrained
(one file, and sharded with an index JSON); the original layout, a prefixed single file and a .pth hold the same
tensors under Wan's names. Each loads into rf.DiT and must give diffusers' velocity in fp32 (rel err <= 1e-4),
compared as in test_wan_parity.py: context zero-padded to text_len for diffusers, timestep 1000 t, one chunk
covering all frames. No downloads: the hub test runs with HF_HUB_OFFLINE=1 and sockets that refuse to connect.
"""

import json
import math
import shutil
import socket

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import layers
import rf
import wan
from conftest import TINY_WAN, one_line, rel_err

B, NF, H, W, LT = 2, 3, 8, 8, 5


# --- the rename, by itself --------------------------------------------------------------------------------------

def test_key_rename_examples_and_inverse():
    pairs = [                                  # diffusers' key names map one to one onto Wan's
        ("blocks.3.attn2.to_out.0.weight", "blocks.3.cross_attn.o.weight"),
        ("blocks.0.attn1.to_q.bias", "blocks.0.self_attn.q.bias"),
        ("blocks.0.attn1.norm_k.weight", "blocks.0.self_attn.norm_k.weight"),
        ("blocks.1.norm2.weight", "blocks.1.norm3.weight"),        # the swap
        ("blocks.1.norm3.weight", "blocks.1.norm2.weight"),
        ("blocks.0.scale_shift_table", "blocks.0.modulation"),
        ("scale_shift_table", "head.modulation"),
        ("proj_out.weight", "head.head.weight"),
        ("blocks.2.ffn.net.0.proj.weight", "blocks.2.ffn.0.weight"),
        ("blocks.2.ffn.net.2.bias", "blocks.2.ffn.2.bias"),
        ("condition_embedder.time_embedder.linear_2.weight", "time_embedding.2.weight"),
        ("condition_embedder.time_proj.bias", "time_projection.1.bias"),
        ("condition_embedder.text_embedder.linear_1.weight", "text_embedding.0.weight"),
        ("patch_embedding.weight", "patch_embedding.weight"),
    ]
    for d, w in pairs:
        assert wan.diffusers_to_wan_key(d) == w and wan.wan_to_diffusers_key(w) == d, (d, w)
    assert wan.diffusers_to_wan_key("blocks.0.not_a_module.weight") == "blocks.0.not_a_module.weight"  # passes through
    names, layout = wan.wan_key_names([wan.SINGLE_FILE_PREFIX + "head.modulation",
                                      wan.SINGLE_FILE_PREFIX + "blocks.0.norm3.bias"])
    assert layout == "original" and sorted(names.values()) == ["blocks.0.norm3.bias", "head.modulation"]
    with pytest.raises(ValueError, match="mixes"):
        wan.wan_key_names(["head.head.weight", "proj_out.weight"])


# --- checkpoints in every layout, from one diffusers model -----------------------------------------------------

@pytest.fixture(scope="module")
def ref():
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    model = diffusers.WanTransformer3DModel(**wan.diffusers_wan_config(rf.preset("wan2.1-t2v-1.3b", **TINY_WAN)))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():       # every parameter random, none at its init value
            noise = torch.randn(p.shape, generator=g)
            p.copy_(0.5 * noise if "scale_shift_table" in name else 0.1 * noise if name.endswith("bias")
                    else 1 + 0.3 * noise if p.ndim == 1 else noise / math.sqrt(p[0].numel()))
    return model.float().eval()


@pytest.fixture(scope="module")
def inputs_and_target(ref):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(B, NF, TINY_WAN["in_dim"], H, W, generator=g)
    ctx = torch.randn(B, LT, TINY_WAN["text_dim"], generator=g)
    t = torch.tensor([[0.3] * NF, [0.85] * NF])
    with torch.no_grad():
        v = ref(hidden_states=x.permute(0, 2, 1, 3, 4), timestep=1000 * t[:, 0],
                encoder_hidden_states=F.pad(ctx, (0, 0, 0, TINY_WAN["text_len"] - LT)), return_dict=False)[0]
    return (x, t, ctx), v.permute(0, 2, 1, 3, 4)


def wan_config_json(**changes):
    """config.json as Wan-AI/Wan2.1-T2V-1.3B writes it (its field names are ours), at the tiny size."""
    c = rf.preset("wan2.1-t2v-1.3b", **TINY_WAN)
    raw = {"_class_name": "WanModel", "model_type": "t2v", **{f: getattr(c, f) for f in wan.WAN_CONFIG_FIELDS}}
    return json.dumps({**raw, "patch_size": list(c.patch_size), **changes})


@pytest.fixture(scope="module")
def ckpts(ref, tmp_path_factory):
    root = tmp_path_factory.mktemp("wan_ckpts")
    wan_state = {wan.diffusers_to_wan_key(k): v.contiguous() for k, v in ref.state_dict().items()}
    (root / "original").mkdir()
    save_file(wan_state, str(root / "original" / wan.DIT_WEIGHTS))
    (root / "original" / "config.json").write_text(wan_config_json())
    save_file({wan.SINGLE_FILE_PREFIX + k: v for k, v in wan_state.items()}, str(root / "prefixed.safetensors"))
    torch.save(wan_state, root / "weights.pth")
    ref.save_pretrained(root / "diffusers" / "transformer")                       # the repo-root form
    ref.save_pretrained(root / "sharded" / "transformer", max_shard_size="100KB")  # writes an index JSON
    assert (root / "sharded" / "transformer" / (wan.DIT_WEIGHTS + ".index.json")).is_file()
    assert len(list((root / "sharded" / "transformer").glob("*-of-*.safetensors"))) > 1
    return {"original": root / "original", "prefixed file": root / "prefixed.safetensors",
            "pth": root / "weights.pth", "diffusers root": root / "diffusers",
            "diffusers sharded, transformer/": root / "sharded" / "transformer"}


@pytest.mark.parametrize("layout", ["original", "prefixed file", "pth", "diffusers root",
                                    "diffusers sharded, transformer/"])
def test_every_layout_gives_diffusers_output(ckpts, inputs_and_target, layout):
    (x, t, ctx), v_ref = inputs_and_target
    model = wan.load_wan(ckpts[layout], dtype=torch.float32, **TINY_WAN)
    with torch.no_grad():
        err = rel_err(model.forward_causal(x, t, ctx), v_ref)
    print(f"\n{layout}: relative error {err:.2e}")
    assert err <= 1e-4, err


def test_loaded_on_requested_dtype_and_device(ckpts, inputs_and_target):
    model = wan.load_wan(ckpts["diffusers root"], dtype=torch.bfloat16, device="cpu", **TINY_WAN)
    for name, p in [*model.named_parameters(), *model.named_buffers()]:
        assert not p.is_meta and p.device.type == "cpu", name
        assert p.dtype == (torch.float32 if wan.keeps_fp32(name) else torch.bfloat16), name
    assert all(p.requires_grad and isinstance(p, torch.nn.Parameter) for p in model.parameters())
    assert wan.keeps_fp32("blocks.0.norm3.weight") and wan.keeps_fp32("time_projection.1.weight")
    assert not wan.keeps_fp32("blocks.0.self_attn.q.weight")
    # the bf16 model runs under autocast (its fp32 islands stay fp32) and is close to diffusers' fp32 output
    (x, t, ctx), v_ref = inputs_and_target
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        err = rel_err(model.forward_causal(x, t, ctx), v_ref)
    assert err < 5e-2, err


# --- errors -----------------------------------------------------------------------------------------------------

def test_wrong_keys_and_shapes_are_named(tmp_path):
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in rf.DiT(rf.preset("wan2.1-t2v-1.3b", **TINY_WAN)).state_dict().items()}
    state = {k: torch.zeros(s) for k, s in shapes.items()}
    state["blocks.0.self_attn.query.weight"] = state.pop("blocks.0.self_attn.q.weight")      # renamed
    del state["head.head.bias"]                                                              # removed
    state["blocks.1.extra.weight"] = torch.zeros(3)                                          # extra
    state["blocks.1.ffn.0.weight"] = torch.zeros(100, TINY_WAN["dim"])                           # wrong shape
    save_file(state, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError) as e:
        wan.load_wan(tmp_path / "bad.safetensors", **TINY_WAN)
    msg = one_line(e)
    assert "missing blocks.0.self_attn.q.weight, head.head.bias" in msg
    assert "unexpected blocks.0.self_attn.query.weight, blocks.1.extra.weight" in msg
    assert "wrong shape blocks.1.ffn.0.weight: checkpoint (100, 64) vs model (128, 64)" in msg
    # the full-size preset against tiny weights: every block past 1 missing, counted, not listed
    with pytest.raises(ValueError, match=r"more\)"):
        wan.load_wan(tmp_path / "bad.safetensors")


def test_config_that_disagrees_is_named(ckpts, tmp_path):
    def copy(src, dst, config):
        shutil.copytree(src, dst)
        (dst / "config.json").write_text(config)
        return dst

    bad = copy(ckpts["original"], tmp_path / "wan", wan_config_json(num_layers=3))
    with pytest.raises(ValueError) as e:
        wan.load_wan(bad, **TINY_WAN)
    assert "num_layers=3" in one_line(e) and "num_layers=2" in one_line(e)
    i2v = copy(ckpts["original"], tmp_path / "i2v", wan_config_json(model_type="i2v"))
    with pytest.raises(ValueError, match="model_type='i2v'"):
        wan.load_wan(i2v, **TINY_WAN)
    dif = ckpts["diffusers root"] / "transformer"
    raw = json.loads((dif / "config.json").read_text())
    bad = copy(dif, tmp_path / "dif", json.dumps({**raw, "num_attention_heads": 4, "attention_head_dim": 16}))
    with pytest.raises(ValueError) as e:
        wan.load_wan(bad, **TINY_WAN)
    assert "num_attention_heads=4" in one_line(e) and "attention_head_dim=16" in one_line(e)
    # the preset itself (no overrides) against the tiny config: named before any tensor is read
    with pytest.raises(ValueError, match="num_layers=2 .model: num_layers=30"):
        wan.load_wan(ckpts["original"])


def test_missing_shard_and_bad_paths(ckpts, tmp_path):
    sharded = shutil.copytree(ckpts["diffusers sharded, transformer/"], tmp_path / "sharded")
    gone = sorted(sharded.glob("*-of-*.safetensors"))[1]
    gone.unlink()
    with pytest.raises(FileNotFoundError, match=gone.name):
        wan.load_wan(sharded, **TINY_WAN)
    with pytest.raises(FileNotFoundError, match="no DiT weights"):
        wan.load_wan(tmp_path, **TINY_WAN)
    with pytest.raises(FileNotFoundError, match="not a hub repo id"):
        wan.load_wan(tmp_path / "no" / "such" / "folder", **TINY_WAN)


def test_quantised_file_is_refused(tmp_path):
    save_file({"head.head.weight": torch.zeros(2, 2, dtype=torch.float8_e4m3fn)}, str(tmp_path / "fp8.safetensors"))
    with pytest.raises(ValueError) as e:
        wan.load_wan(tmp_path / "fp8.safetensors", **TINY_WAN)
    assert "F8_E4M3" in one_line(e) and "quantised" in one_line(e)       # safetensors' name of the dtype


class NotATensor:
    pass


def test_pth_is_never_unpickled(tmp_path):
    torch.save({"head.head.weight": torch.zeros(1), "evil": NotATensor()}, tmp_path / "evil.pth")
    with pytest.raises(ValueError) as e:
        wan.load_wan(tmp_path / "evil.pth", **TINY_WAN)
    assert "weights_only=True" in one_line(e)


def test_hub_id_offline_is_one_clear_line(monkeypatch):
    pytest.importorskip("huggingface_hub")
    attempts = []

    def no_network(*args, **kwargs):
        attempts.append(args)
        raise OSError("the test forbids network access")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConnectionError) as e:
        wan.load_wan("rf-tests/no-such-wan", **TINY_WAN)        # a made-up id: never in anyone's cache
    msg = one_line(e)
    assert "could not reach the Hugging Face Hub" in msg and "HF_HUB_OFFLINE" in msg
    assert "hf download rf-tests/no-such-wan" in msg and "load_wan('no-such-wan')" in msg
    assert not attempts


# --- the memory report ------------------------------------------------------------------------------------------

def test_memory_report_on_the_real_size():
    report = wan.wan_memory_report()
    print("\n" + report)
    assert "1,418,996,800 parameters in 825 tensors" in report
    for section in ("key layouts", "weights", "sampling", "KV cache", "training", "AdamW",
                    "activations, no checkpointing", "activations, checkpointing", "60,840"):
        assert section in report, section
    if "diffusers: not checked" not in report:
        assert "diffusers: 825 keys" in report


def test_saved_bytes_formula_matches_autograd():
    """wan.saved_bytes_per_token against the bytes one Block's autograd graph really keeps, per token, under bf16
    autocast (fused attention: no L x L scores). Two lengths, so constant tensors (bf16 weight casts) cancel."""
    cfg = rf.preset("wan2.1-t2v-1.3b", **{**TINY_WAN, "dim": 128, "ffn_dim": 320})
    block = rf.Block(cfg)

    def saved_bytes(frames, side=4):
        x = torch.randn(1, frames * side * side, cfg.dim, requires_grad=True)
        e0 = torch.randn(1, frames, 6, cfg.dim, requires_grad=True)      # modulation inputs need grad in training
        rope = layers.rope_cos_sin(torch.arange(frames), side, side, cfg.dim // cfg.num_heads)
        storages = {}

        def pack(t):
            if not isinstance(t, torch.nn.Parameter):
                storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autocast("cpu", dtype=torch.bfloat16):
            text_kv = tuple(a.detach() for a in block.cross_attn.kv(torch.randn(1, cfg.text_len, cfg.dim)))
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                block(x, e0, rope, None, text_kv)
        return sum(storages.values())

    per_token = (saved_bytes(6) - saved_bytes(3)) / (3 * 16)
    ratio = per_token / wan.saved_bytes_per_token(cfg)
    assert 0.9 < ratio < 1.1, (per_token, wan.saved_bytes_per_token(cfg))
