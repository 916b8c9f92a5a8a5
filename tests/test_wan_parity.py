"""Wan2.1 parity against an independent implementation: diffusers' WanTransformer3DModel.

A tiny diffusers model gets random values in EVERY parameter (modulation tables, norms, proj_out included), its
state dict is renamed to Wan's key names with wan.diffusers_to_wan_key (diffusers' key names map one to one onto
Wan's) and loaded into rf.DiT with load_state_strict. With one chunk covering all frames, rf's forward is
bidirectional like Wan's, so both must give the same velocity in fp32:
    rf:        x (B, F, C, H, W), t (B, F) in [0, 1] (x1000 inside), context (B, Lt, text_dim) (zero-padded inside)
    diffusers: hidden_states (B, C, F, H, W), timestep 1000 t, encoder_hidden_states zero-padded to text_len by us
"""

import math

import pytest
import torch
import torch.nn.functional as F

import checkpoints
import rf
import wan
from conftest import rel_err

diffusers = pytest.importorskip("diffusers")
from diffusers import WanTransformer3DModel  # noqa: E402

HEADS, HEAD_DIM, FFN, LAYERS, TEXT_DIM, FREQ_DIM, CH, PATCH = 2, 32, 128, 2, 32, 32, 4, (1, 2, 2)
TEXT_LEN = 8
B, NF, H, W, LT = 2, 3, 8, 8, 5          # 3 frames of 4x4 tokens; 5 real text tokens, padded to 8
S = (H // PATCH[1]) * (W // PATCH[2])

def diffusers_to_wan(state):
    """rf's rename (wan.diffusers_to_wan_key); test_key_mapping_covers_every_key checks it independently: the renamed
    keys must be exactly our DiT's, with the same shapes, and the forward must then agree with diffusers'."""
    out = {wan.diffusers_to_wan_key(k): v for k, v in state.items()}
    assert len(out) == len(state), "two diffusers keys mapped to one Wan key"
    return out


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    ref = WanTransformer3DModel(patch_size=PATCH, num_attention_heads=HEADS, attention_head_dim=HEAD_DIM,
                                in_channels=CH, out_channels=CH, text_dim=TEXT_DIM, freq_dim=FREQ_DIM, ffn_dim=FFN,
                                num_layers=LAYERS).float().eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in ref.named_parameters():       # every parameter random, none at its init value
            noise = torch.randn(p.shape, generator=g)
            if "scale_shift_table" in name:
                p.copy_(0.5 * noise)
            elif name.endswith("bias"):
                p.copy_(0.1 * noise)
            elif p.ndim == 1:                          # norm weights (RMSNorm q/k, affine cross-attn LayerNorm)
                p.copy_(1 + 0.3 * noise)
            else:                                      # Linear / Conv weights, scaled by fan-in
                p.copy_(noise / math.sqrt(p[0].numel()))
    cfg = rf.Config(dim=HEADS * HEAD_DIM, ffn_dim=FFN, freq_dim=FREQ_DIM, num_heads=HEADS, num_layers=LAYERS,
                    text_len=TEXT_LEN, text_dim=TEXT_DIM, in_dim=CH, out_dim=CH, patch_size=PATCH,
                    frames_per_chunk=NF, frame_size=(H, W))
    ours = rf.DiT(cfg).eval()
    checkpoints.load_state_strict(ours, diffusers_to_wan(ref.state_dict()), what="converted diffusers weights")
    return ref, ours


def inputs(seed=2):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, NF, CH, H, W, generator=g)
    ctx = torch.randn(B, LT, TEXT_DIM, generator=g)
    return x, ctx


def run_diffusers(ref, x, timestep, ctx, pad=True):
    if pad:
        ctx = F.pad(ctx, (0, 0, 0, TEXT_LEN - ctx.shape[1]))
    out = ref(hidden_states=x.permute(0, 2, 1, 3, 4), timestep=timestep, encoder_hidden_states=ctx,
              return_dict=False)[0]
    return out.permute(0, 2, 1, 3, 4)                # (B, C, F, H, W) -> (B, F, C, H, W)


def test_key_mapping_covers_every_key(models):
    ref, ours = models
    conv = diffusers_to_wan(ref.state_dict())
    own = ours.state_dict()
    assert set(conv) == set(own)
    assert all(conv[k].shape == own[k].shape and torch.equal(conv[k], own[k]) for k in own)
    # the swap matters: the affine diffusers norm2 is Wan's norm3 (Wan's norm1/norm2 have no parameters)
    assert "blocks.0.norm3.weight" in own and not any(".norm2." in k or ".norm1." in k for k in own)


@torch.no_grad()
def test_parity_same_t(models):
    ref, ours = models
    x, ctx = inputs()
    errs = []
    for tb in (torch.tensor([0.3, 0.85]), torch.tensor([0.0, 1.0])):
        v_ours = ours.forward_causal(x, tb[:, None].expand(B, NF), ctx)
        v_ref = run_diffusers(ref, x, 1000 * tb, ctx)
        assert v_ref.shape == v_ours.shape == x.shape
        errs.append(rel_err(v_ours, v_ref))
    print(f"\nparity, same t for all frames: relative errors {[f'{e:.2e}' for e in errs]}")
    assert max(errs) <= 1e-4, errs
    # wrong variants do differ: unpadded text, t not scaled by 1000, a causal (chunked) rf forward
    tb = torch.tensor([0.3, 0.85])
    v_ref = run_diffusers(ref, x, 1000 * tb, ctx)
    assert rel_err(run_diffusers(ref, x, 1000 * tb, ctx, pad=False), v_ref) > 1e-3
    assert rel_err(run_diffusers(ref, x, tb, ctx), v_ref) > 1e-3
    causal = rf.DiT(rf.Config(**{**checkpoints.config_to_dict(ours.cfg), "frames_per_chunk": 1})).eval()
    causal.load_state_dict(ours.state_dict())
    assert rel_err(causal.forward_causal(x, tb[:, None].expand(B, NF), ctx), v_ref) > 1e-3


@torch.no_grad()
def test_parity_per_frame_t(models):
    """rf's per-frame t (B, F) against diffusers' per-token timestep (B, L): per-frame modulation of every block
    and of the head, checked against an independent implementation."""
    ref, ours = models
    x, ctx = inputs(seed=3)
    t = torch.tensor([[0.1, 0.5, 0.95], [0.7, 0.0, 0.3]])          # (B, F), all different
    v_ours = ours.forward_causal(x, t, ctx)
    v_ref = run_diffusers(ref, x, (1000 * t).repeat_interleave(S, dim=1), ctx)   # tokens are (f, h, w)-major
    err = rel_err(v_ours, v_ref)
    print(f"\nparity, per-frame t: relative error {err:.2e}")
    assert err <= 1e-4, err
    # wrong variants: frames' t permuted, or one t for the whole video
    perm = t[:, [2, 0, 1]]
    assert rel_err(run_diffusers(ref, x, (1000 * perm).repeat_interleave(S, dim=1), ctx), v_ref) > 1e-3
    assert rel_err(ours.forward_causal(x, t.mean(1, keepdim=True).expand(B, NF), ctx), v_ref) > 1e-3
