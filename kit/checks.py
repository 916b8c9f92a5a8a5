"""
kit/checks.py -- the checks that grade each part, without any stored answer.

Each check compares the student's code with the project's own equivalences (a cached forward against a
recomputed one, two streams against block-causal, routed against a dense mask) or with a property the method
must have (t_s = 1 forgets the clip; the loss's target is eps - clip). None of them depends on the order of the
random draws. A check passes by returning; it fails by raising, with a one-line reason.
"""

import math

import torch
import torch.nn.functional as F

import fast_attn
import rf

CHECKS = {}                     # part -> [(name, function)]
TOL = 1e-5                      # relative error allowed where two paths compute the same numbers


def check(part, name):
    def register(fn):
        CHECKS.setdefault(part, []).append((name, fn))
        return fn
    return register


def expect(ok, message):
    if not ok:
        raise AssertionError(message)


def rel_err(a, b):
    return ((a - b).norm() / b.norm().clamp(min=1e-12)).item()


def tiny_model(**overrides):
    """A small random DiT (the head is not left at zero, so every output depends on its inputs)."""
    torch.manual_seed(0)
    cfg = rf.Config(dim=32, ffn_dim=64, freq_dim=16, num_heads=2, num_layers=2, text_len=4, text_dim=16,
                    in_dim=3, out_dim=3, patch_size=(1, 4, 4), frames_per_chunk=2, frame_size=(8, 8),
                    sample_steps=2, sample_shift=1.0, sample_cfg=1.0, **overrides)
    model = rf.DiT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def inputs(B=2, chunks=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 2 * chunks, 3, 8, 8, generator=g)
    return x, torch.rand(B, 2 * chunks, generator=g), torch.randn(B, 4, 16, generator=g)


def two_stream_ids(N):
    """Per-frame (chunk, stream) of [H_0 .. H_{N-2} ; Z_0 .. Z_{N-1}]."""
    chunk = torch.cat([torch.arange(N - 1), torch.arange(N)])
    return chunk, torch.tensor([rf.HISTORY] * (N - 1) + [rf.NOISY] * N)


# -- 1. the mask rule ---------------------------------------------------------------------------------

@check("mask", "block-causal: a token sees its own chunk and every earlier one, no later one")
def _():
    chunk = torch.arange(5).repeat_interleave(3)
    got = rf.dense_mask(chunk, torch.full_like(chunk, rf.HISTORY))
    want = chunk[None, :] <= chunk[:, None]
    expect(got.dtype == torch.bool and got.shape == want.shape, f"want a bool mask of shape {tuple(want.shape)}")
    bad = (got != want).nonzero()
    expect(not len(bad), f"query chunk {chunk[bad[0][0]]} and key chunk {chunk[bad[0][1]]}: wrong" if len(bad)
           else "")


@check("mask", "two-stream: H_j sees H_<=j; Z_i sees Z_i and H_<i, never H_i or another Z")
def _():
    chunk, stream = two_stream_ids(4)
    got = rf.dense_mask(chunk, stream)
    for q in range(len(chunk)):
        for k in range(len(chunk)):
            qc, kc, qs, ks = chunk[q].item(), chunk[k].item(), stream[q].item(), stream[k].item()
            if qs == rf.HISTORY:
                want = ks == rf.HISTORY and kc <= qc
            else:
                want = (ks == rf.NOISY and kc == qc) or (ks == rf.HISTORY and kc < qc)
            name = lambda s, c: ("H" if s == rf.HISTORY else "Z") + str(c)                     # noqa: E731
            expect(bool(got[q, k]) == want, f"{name(qs, qc)} {'should' if want else 'must not'} see "
                                              f"{name(ks, kc)}")


# -- 2. per-frame noise conditioning ----------------------------------------------------------------------

def per_token(m, S):
    """(B, Fp, 1, D) per frame -> (B, Fp S, D) per token, the slow way."""
    return m[:, :, 0].repeat_interleave(S, dim=1)


@check("frame_t", "modulate: x * (1 + scale) + shift with each frame's own shift and scale")
def _():
    g = torch.Generator().manual_seed(2)
    B, Fp, S, D = 2, 3, 4, 8
    x, shift, scale = (torch.randn(*s, generator=g) for s in ((B, Fp * S, D), (B, Fp, 1, D), (B, Fp, 1, D)))
    got = rf.modulate(x, shift, scale)
    expect(got.shape == x.shape, f"modulate must keep x's shape {tuple(x.shape)}, got {tuple(got.shape)}")
    expect(rel_err(got, x * (1 + per_token(scale, S)) + per_token(shift, S)) <= TOL,
           "a token is not modulated by its own frame's shift and scale")


@check("frame_t", "gate: y * g with each frame's own gate")
def _():
    g = torch.Generator().manual_seed(3)
    y, gates = torch.randn(2, 12, 8, generator=g), torch.randn(2, 3, 1, 8, generator=g)
    got = rf.gate(y, gates)
    expect(got.shape == y.shape and rel_err(got, y * per_token(gates, 4)) <= TOL,
           "a token is not gated by its own frame's gate")


# -- 3. the two-stream training forward -------------------------------------------------------------------

@check("two_stream", "each noisy chunk's velocity equals the block-causal forward over [history < i ; x_i]")
def _():
    model, (x, t, ctx) = tiny_model(), inputs(chunks=3)
    history = torch.randn_like(x)
    with torch.no_grad():
        v = model(x, t, ctx, history=history)
        expect(v.shape == x.shape, f"v must have x's shape {tuple(x.shape)}, got {tuple(v.shape)}")
        for i in range(3):
            seq = torch.cat([history[:, :2 * i], x[:, 2 * i:2 * i + 2]], dim=1)
            ts = torch.cat([torch.zeros(2, 2 * i), t[:, 2 * i:2 * i + 2]], dim=1)
            want = model.forward_causal(seq, ts, ctx)[:, -2:]
            expect(rel_err(v[:, 2 * i:2 * i + 2], want) <= TOL,
                   f"noisy chunk {i} does not see exactly the history chunks before it at t = 0, at the "
                   f"same positions")


@check("two_stream", "the last history chunk is nobody's history: changing it changes nothing")
def _():
    model, (x, t, ctx) = tiny_model(), inputs(chunks=3)
    history = torch.randn_like(x)
    with torch.no_grad():
        a = model(x, t, ctx, history=history)
        history[:, -2:] += 1.0
        expect(rel_err(model(x, t, ctx, history=history), a) <= TOL, "the last history chunk changed the output")


# -- 4. the KV cache and the sampler ------------------------------------------------------------------

@check("sampler", "euler: from t = 1 to t = 0 under a constant velocity c, x ends at x - c")
def _():
    x, c = torch.randn(2, 2, 3, 8, 8), torch.randn(2, 2, 3, 8, 8)
    grid = rf.time_grid(4, 3.0)[:, None].expand(-1, 2)
    seen = []
    out = rf.euler(lambda x, t: seen.append(t) or c, x, grid)
    expect(len(seen) == 4, f"4 steps on a 5-point grid call the velocity 4 times, not {len(seen)}")
    expect(all(s.shape == (2, 2) for s in seen), "velocity takes t of shape (B, F)")
    expect(rel_err(out, x - c) <= TOL, "x does not end at x - c: check the step's sign and size")


@check("sampler", "cached sampling gives the frames of the uncached block-causal recomputation")
def _():
    model, (_, _, ctx) = tiny_model(), inputs()
    neg = torch.zeros(1, 4, 16)
    for cfg_scale in (1.0, 2.0):
        kw = dict(steps=2, size=(8, 8), seed=0, cfg_scale=cfg_scale, neg_context=neg)
        cached = rf.generate(model, ctx, 8, **kw)
        plain = rf.generate(model, ctx, 8, use_cache=False, **kw)
        expect(cached.shape == plain.shape == (2, 8, 3, 8, 8), f"want 8 frames, got {tuple(cached.shape)}")
        err = [rel_err(cached[:, i:i + 2], plain[:, i:i + 2]) for i in range(0, 8, 2)]
        bad = [i for i, e in enumerate(err) if e > TOL]
        expect(not bad, f"chunk {bad[0] if bad else 0} differs from the recomputation (cfg {cfg_scale}): "
                        f"does each finished chunk enter the cache, once, at t = 0?")


@check("sampler", "a prefix continues exactly as if those frames had been generated")
def _():
    model, (_, _, ctx) = tiny_model(), inputs()
    prefix = torch.randn(2, 4, 3, 8, 8)
    kw = dict(steps=2, seed=0, prefix=prefix)
    cached, plain = rf.generate(model, ctx, 8, **kw), rf.generate(model, ctx, 8, use_cache=False, **kw)
    expect(torch.equal(cached[:, :4], prefix), "the prefix must open the video unchanged")
    expect(rel_err(cached, plain) <= TOL, "the frames after a prefix differ from the recomputation")


# -- 5. self-resampling -------------------------------------------------------------------------------

def resample(model, clip, ctx, t_s, seed=0):
    return rf.resample_autoregressive(model, clip, ctx, torch.full((clip.shape[0],), t_s),
                                      generator=torch.Generator().manual_seed(seed))


@check("resample", "t_s = 0 returns the clip; t_s = 1 forgets it (same noise, any clip)")
def _():
    model, (clip, _, ctx) = tiny_model(), inputs(chunks=3)
    with torch.no_grad():
        expect(rel_err(resample(model, clip, ctx, 0.0), clip) <= TOL, "t_s = 0 must give the clip back")
        a, b = resample(model, clip, ctx, 1.0), resample(model, clip + torch.randn_like(clip), ctx, 1.0)
    expect(rel_err(a[:, :4], b[:, :4]) <= TOL, "at t_s = 1 the resampled history still depends on the clip")


@check("resample", "chunk i depends on clip chunks <= i only; the last chunk is returned unchanged")
def _():
    model, (clip, _, ctx) = tiny_model(), inputs(chunks=4)
    with torch.no_grad():
        base = resample(model, clip, ctx, 0.5)
        expect(rel_err(base[:, -2:], clip[:, -2:]) <= TOL, "the last chunk is nobody's history: return it")
        for j in range(3):
            moved = clip.clone()
            moved[:, 2 * j:2 * j + 2] += 1.0
            out = resample(model, moved, ctx, 0.5)
            for i in range(3):
                changed = rel_err(out[:, 2 * i:2 * i + 2], base[:, 2 * i:2 * i + 2]) > 1e-4
                expect(changed == (j <= i), f"resampled chunk {i} {'ignores' if j <= i else 'sees'} clip "
                                            f"chunk {j}")


@check("resample", "each chunk is one Euler step from x_t_s given the chunks resampled before it")
def _():
    model, (clip, _, ctx) = tiny_model(), inputs(chunks=3)
    seen, t_s = [], 0.7
    causal = model.forward_causal
    for name in ("forward_chunk", "forward_causal"):          # whatever forward the student calls, spy on it
        original = getattr(model, name)
        setattr(model, name, lambda x, t, *a, _f=original, **k: seen.append((x[:, -2:], t[:, -2:])) or _f(x, t, *a, **k))
    with torch.no_grad():
        out = resample(model, clip, ctx, t_s)
        noisy = [x for x, t in seen if torch.allclose(t, torch.full_like(t, t_s))]
        expect(len(noisy) >= 2, "no forward saw a chunk at t = t_s")
        for i in range(2):
            x = noisy[i]
            seq = torch.cat([out[:, :2 * i], x], dim=1)
            ts = torch.cat([torch.zeros(2, 2 * i), torch.full((2, 2), t_s)], dim=1)
            want = x - t_s * causal(seq, ts, ctx)[:, -2:]
            expect(rel_err(out[:, 2 * i:2 * i + 2], want) <= TOL,
                   f"resampled chunk {i} is not x_t_s - t_s v(x_t_s | the resampled chunks before it)")


@check("resample", "no gradient reaches the resampled history")
def _():
    model, (clip, _, ctx) = tiny_model(), inputs(chunks=3)
    with torch.enable_grad():
        out = resample(model, clip, ctx, 0.5)
    expect(not out.requires_grad, "the resampled history carries a gradient: resample under torch.no_grad")


@check("resample", "t_s is logit-normal, shifted by resample_shift (Eq. 7)")
def _():
    model, (clip, _, ctx) = tiny_model(resample_shift=0.6), inputs(B=1, chunks=2)
    drawn, original = [], rf.resample_autoregressive
    rf.resample_autoregressive = lambda m, c, x, t_s, *a, **k: drawn.append(t_s) or c
    try:
        g = torch.Generator().manual_seed(0)
        big = clip.expand(4000, -1, -1, -1, -1)
        rf.degrade_history(model, big, ctx.expand(4000, -1, -1), "autoregressive", g)
    finally:
        rf.resample_autoregressive = original
    expect(len(drawn) == 1 and drawn[0].shape == (4000,), "draw one t_s per video, shape (B,)")
    got = drawn[0].float().quantile(torch.tensor([0.1, 0.5, 0.9]))
    z = torch.tensor([-1.2816, 0.0, 1.2816])                   # N(0, 1) quantiles
    want = rf.shift_t(torch.sigmoid(z), 0.6)
    expect((got - want).abs().max() <= 0.03, f"t_s quantiles (10/50/90%) {got.tolist()}, want {want.tolist()}")


# -- 6. the loss --------------------------------------------------------------------------------------

def spy_loss(model, clip, ctx, mode):
    """Run training_loss with a spy on the forward -> (loss, chunk_loss, chunk_t, what the forward saw)."""
    seen = {}
    original = model.forward

    def forward(x, t, context, history):
        seen.update(x=x.detach(), t=t.detach(), history=history.detach())
        return original(x, t, context, history)

    model.forward = forward
    try:
        loss, chunk_loss, chunk_t = rf.training_loss(model, clip, ctx, mode, torch.Generator().manual_seed(0))
    finally:
        del model.forward
    return loss, chunk_loss, chunk_t, seen


@check("loss", "Eq. 4 on the ground truth: the target is eps - clip, the input x_t is made from the clip")
def _():
    model, (clip, _, ctx) = tiny_model(train_shift=3.0, noise_aug_max=0.5), inputs(chunks=3)
    for mode in ("none", "noise"):                 # in teacher forcing the history IS the clip; not with noise
        loss, chunk_loss, chunk_t, seen = spy_loss(model, clip, ctx, mode)
        expect(seen, "training_loss must call the model's two-stream forward once")
        t = seen["t"][:, :, None, None, None]
        expect(bool((t > 0.02).all()), "unexpected t near 0")
        eps = (seen["x"] - (1 - t) * clip) / t       # x_t = (1 - t) clip + t eps, solved for eps
        with torch.no_grad():
            v = model(seen["x"], seen["t"], ctx, history=seen["history"])
        want = (v - (eps - clip)).pow(2).mean(dim=(2, 3, 4)).unflatten(1, (3, 2)).mean(2)
        expect(chunk_loss.shape == (2, 3), f"chunk_loss must be (B, N) = (2, 3), got {tuple(chunk_loss.shape)}")
        expect(rel_err(chunk_loss, want) <= 1e-4, f"{mode}: the loss is not |v - (eps - clip)|^2 with x_t "
                                                   f"made from the clip")
        expect(abs(loss.item() - want.mean().item()) <= 1e-4 * want.mean().item(), "loss = chunk_loss.mean()")


@check("loss", "one t per chunk, shared by its frames, returned as chunk_t; the history as degraded")
def _():
    model, (clip, _, ctx) = tiny_model(train_shift=3.0), inputs(chunks=3)
    loss, chunk_loss, chunk_t, seen = spy_loss(model, clip, ctx, "none")
    expect(chunk_t.shape == (2, 3), f"chunk_t must be (B, N) = (2, 3), got {tuple(chunk_t.shape)}")
    expect(torch.equal(seen["t"], chunk_t.repeat_interleave(2, dim=1)), "every frame of chunk i has t of chunk i")
    expect(torch.equal(seen["history"], clip), "in teacher forcing the history is the clip")
    expect(loss.requires_grad and not chunk_loss.requires_grad, "loss carries the gradient; chunk_loss is detached")


@check("loss", "the training t: uniform, shifted by train_shift (Eq. 7), drawn apart for each chunk")
def _():
    model, (clip, _, ctx) = tiny_model(train_shift=3.0), inputs(B=1, chunks=2)
    with torch.no_grad():
        seen = spy_loss(model, clip.expand(2000, -1, -1, -1, -1), ctx.expand(2000, -1, -1), "none")[3]
    per_chunk = seen["t"][:, ::2]                                                   # (2000, N = 2)
    got = per_chunk.flatten().quantile(torch.tensor([0.1, 0.5, 0.9]))
    want = rf.shift_t(torch.tensor([0.1, 0.5, 0.9]), 3.0)
    expect((got - want).abs().max() <= 0.03, f"t quantiles {got.tolist()}, want {want.tolist()}")
    corr = torch.corrcoef(per_chunk.T)[0, 1].item()
    expect(abs(corr) < 0.1, f"the chunks of a video share their t (correlation {corr:.2f}): draw one per chunk")


# -- 7. routing ---------------------------------------------------------------------------------------

@check("routing", "top_k_chunks picks the k eligible chunks with the highest q . phi")
def _():
    g = torch.Generator().manual_seed(4)
    B, Lq, nh, hd, J, k = 2, 5, 2, 8, 6, 2
    q, phi = torch.randn(B, Lq, nh, hd, generator=g), torch.randn(B, J, nh, hd, generator=g)
    eligible = torch.rand(Lq, J, generator=g) < 0.7
    eligible[0] = False
    eligible[1, :] = torch.arange(J) == 3                     # fewer eligible chunks than k: all of them
    got = rf.top_k_chunks(q, phi, eligible, k)
    expect(got.shape == (B, nh, Lq, J) and got.dtype == torch.bool, "want a bool (B, nh, Lq, J)")
    for b in range(B):
        for h in range(nh):
            for i in range(Lq):
                ok = eligible[i].nonzero().flatten().tolist()
                score = {j: float(q[b, i, h] @ phi[b, j, h]) for j in ok}
                want = set(sorted(ok, key=score.get, reverse=True)[:k])
                expect(set(got[b, h, i].nonzero().flatten().tolist()) == want,
                       f"query {i}, head {h}: chose {got[b, h, i].nonzero().flatten().tolist()}, want "
                       f"{sorted(want)} (the highest scores among the eligible chunks)")


@check("routing", "merge_lse: two branches merge into one softmax over the union of their keys")
def _():
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(3, 4, 8, generator=g) for _ in range(3))
    k, v = torch.cat([k, 2 * k], dim=1), torch.cat([v, v.flip(1)], dim=1)             # 8 keys
    o_a, l_a = fast_attn.plain_attention_lse(q, k[:, :3], v[:, :3])
    o_b, l_b = fast_attn.plain_attention_lse(q, k[:, 3:], v[:, 3:])
    o, lse = rf.merge_lse(o_a, l_a, o_b, l_b)
    want = F.scaled_dot_product_attention(q, k, v)
    expect(rel_err(o, want) <= TOL, "the merged output is not softmax attention over both key sets")
    expect(rel_err(lse, fast_attn.plain_attention_lse(q, k, v)[1]) <= TOL, "the merged log-sum-exp is not the union's")
    none = torch.full_like(l_b, -math.inf)
    expect(rel_err(rf.merge_lse(o_a, l_a, torch.zeros_like(o_b), none)[0], o_a) <= TOL,
           "a branch with no keys (lse = -inf) must weigh nothing")


@check("routing", "a routed forward gives the dense-mask reference on every CPU backend")
def _():
    x, t, ctx = inputs(chunks=4)
    history = torch.randn_like(x)
    with torch.no_grad():
        outs = {}
        for backend in ("sdpa", "two_branch"):
            model = tiny_model(top_k=2)
            model.attn_backend = backend
            outs[backend] = model(x, t, ctx, history=history)
        dense = tiny_model()(x, t, ctx, history=history)
        everything = tiny_model(top_k=3)(x, t, ctx, history=history)
    expect(rel_err(outs["two_branch"], outs["sdpa"]) <= TOL,
           "the two-branch path (fast_attn.merge_lse_many) differs from the dense-mask reference")
    expect(rel_err(everything, dense) <= TOL, "routing to every eligible chunk must equal dense attention")
    expect(rel_err(outs["sdpa"], dense) > 1e-3, "top-2 of 3 must differ from dense attention")
