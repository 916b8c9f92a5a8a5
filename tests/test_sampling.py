"""Sampling with rf.generate: chunk by chunk with the KV cache equals the uncached sampler, with and without CFG and a
prefix; a video is causal and depends on every prefix chunk; bad arguments are one-line errors raised before any
compute."""

import pytest
import torch

import rf
from conftest import C, FPC, HW, TINY, differs, max_diff, one_line, rel_err

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
# Errors: one-line ValueErrors, raised before any compute
# ----------------------------------------------------------------------------------------------------------------

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
