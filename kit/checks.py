"""
kit/checks.py -- the checks that grade each part, without any stored answer.

Each check compares the student's code with the project's own equivalences (a cached forward against a
recomputed one, two streams against block-causal, routed against a dense mask), with named cases of a rule, or
with a property the method must have (t_s = 1 forgets the clip; a model whose error is known has that loss).
None of them depends on the order of the random draws. A check passes by returning; it fails by raising, with a
one-line reason that says what is wrong and where to look.
"""

import math

import torch
import torch.nn.functional as F

import fast_attn
import rf

CHECKS = {}                     # part -> [(name, function)]
TOL = 1e-5                      # relative error allowed where two paths compute the same numbers
HELPERS = ("draw every random number with rf's helpers (randn_like, draw, logit_normal, sample_train_t) and the "
           "generator you were given: in train.py it is a train.BatchSlice, which torch's own functions do not take")


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


def config(**overrides):
    return rf.Config(**{**dict(dim=32, ffn_dim=64, freq_dim=16, num_heads=2, num_layers=2, text_len=4, text_dim=16,
                               in_dim=3, out_dim=3, patch_size=(1, 4, 4), frames_per_chunk=2, frame_size=(8, 8),
                               sample_steps=2, sample_shift=1.0, sample_cfg=1.0), **overrides})


def tiny_model(**overrides):
    """A small random DiT (the head is not left at zero, so every output depends on its inputs)."""
    torch.manual_seed(0)
    model = rf.DiT(config(**overrides))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def inputs(B=2, chunks=3, seed=1, size=8):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 2 * chunks, 3, size, size, generator=g)
    return x, torch.rand(B, 2 * chunks, generator=g), torch.randn(B, 4, 16, generator=g)


class Draws:
    """Stands in for train.py's BatchSlice, the generator training passes: rf's draw() and randn_like() take it;
    torch's own random functions (torch.randn(..., generator=...), torch.randn_like) do not."""

    def __init__(self, seed):
        self.generator = torch.Generator().manual_seed(seed)

    def draw(self, fn, shape):
        return fn(shape, generator=self.generator)


def calling(fn, *args, **kwargs):
    """fn(*args, **kwargs), a generator that torch's own functions cannot take said in words."""
    try:
        return fn(*args, **kwargs)
    except TypeError as e:
        if "generator" in str(e) or "Draws" in str(e):
            raise AssertionError(HELPERS) from None
        raise


def independent(noise, what):
    """noise (n, ...) -> fails unless its n rows look like independent standard normal draws."""
    rows = noise.flatten(1).double()
    expect(abs(rows.mean().item()) < 0.08 and abs(rows.std().item() - 1) < 0.08,
           f"the {what} is not standard normal (mean {rows.mean().item():.2f}, std {rows.std().item():.2f}): "
           f"draw it with randn_like")
    corr = torch.corrcoef(rows)
    corr.fill_diagonal_(0)
    i, j = divmod(int(corr.abs().argmax()), len(rows))
    expect(corr.abs().max() < 0.35, f"the {what} repeats: two of its frames share their noise (correlation "
                                     f"{corr[i, j].item():.2f}): draw fresh noise for every frame of every video")


def same_draws(fn, what):
    """fn(generator) -> a tensor; fails unless it comes from the generator alone, fresh at each call."""
    def run(generator, global_seed):
        torch.manual_seed(global_seed)                 # torch's global random state: must not matter
        return fn(generator)
    a, b = run(Draws(0), 1), run(Draws(0), 2)
    same = lambda x, y: rel_err(x.double(), y.double()) <= 1e-3                   # noqa: E731 (rounding aside)
    expect(same(a, b), f"the {what} changed with torch's global random state: {HELPERS}")
    expect(not same(a, run(Draws(1), 1)), f"the {what} is the same for another generator: draw it from the "
                                           f"generator you were given")
    g = Draws(0)
    expect(not same(run(g, 1), run(g, 1)), f"the {what} is drawn once and reused: a second call with the same "
                                            f"generator gave the same numbers; draw it afresh at every call")


# -- 1. the mask rule ---------------------------------------------------------------------------------

def name(stream, chunk):
    return ("H" if stream == rf.HISTORY else "Z") + str(chunk)


# (query, key, may it attend?) for the two-stream layout [H_0 .. ; Z_0 ..]: the docstring's rule, as cases
CASES = [("Z2", "Z2", True), ("Z2", "H1", True), ("Z2", "H0", True), ("Z2", "H2", False), ("Z2", "H3", False),
         ("Z2", "Z1", False), ("Z2", "Z3", False), ("Z0", "H0", False), ("Z0", "Z0", True),
         ("H2", "H2", True), ("H2", "H1", True), ("H2", "H3", False), ("H2", "Z2", False), ("H2", "Z1", False),
         ("H0", "Z0", False)]


def ids(text):
    return torch.tensor(int(text[1:])), torch.tensor(rf.HISTORY if text[0] == "H" else rf.NOISY)


@check("mask", "the two-stream cases: Z_i sees Z_i and H_<i, never H_i or another Z; H_j sees H_<=j only")
def _():
    for q, k, want in CASES:
        got = rf.may_attend(*ids(q), *ids(k))
        expect(bool(got) == want, f"{q} {'should' if want else 'must not'} see {k}")


@check("mask", "the rule works elementwise on tensors of ids (dense_mask's layout)")
def _():
    chunk = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3, 4])
    stream = torch.tensor([rf.HISTORY] * 4 + [rf.NOISY] * 5)
    got = rf.dense_mask(chunk, stream)
    expect(got.dtype == torch.bool and got.shape == (9, 9), "may_attend must give a bool tensor of the ids' "
                                                              "broadcast shape: use ==, <, & and |")
    for q in range(9):
        for k in range(9):
            one = rf.may_attend(chunk[q], stream[q], chunk[k], stream[k])
            expect(bool(got[q, k]) == bool(one), f"{name(stream[q], chunk[q])} and {name(stream[k], chunk[k])}: "
                                                 f"the elementwise mask differs from the single case")


@check("mask", "block-causal (every token in the history stream): a chunk sees itself and the chunks before it")
def _():
    chunk = torch.arange(5).repeat_interleave(3)
    got = rf.dense_mask(chunk, torch.full_like(chunk, rf.HISTORY))
    for q, k in [(2, 2), (2, 1), (2, 0), (2, 3), (0, 4)]:
        want = k <= q
        expect(bool(got[3 * q, 3 * k + 1]) == want, f"block-causal: chunk {q} {'should' if want else 'must not'} "
                                                     f"see chunk {k}")


@check("mask", "earlier_history: only history chunks before the query's chunk (routing narrows exactly these)")
def _():
    H, Z = rf.HISTORY, rf.NOISY
    for q, k, s, want in [(2, 1, H, True), (2, 0, H, True), (2, 2, H, False), (2, 3, H, False), (2, 1, Z, False),
                          (0, 0, H, False)]:
        got = rf.earlier_history(torch.tensor(q), torch.tensor(k), torch.tensor(s))
        expect(bool(got) == want, f"earlier_history: for a query in chunk {q}, {name(s, k)} is "
                                  f"{'' if want else 'not '}an earlier history chunk")
    got = rf.earlier_history(torch.arange(3)[:, None], torch.arange(3)[None], H)   # routing passes a plain int
    expect(got.shape == (3, 3) and int(got.sum()) == 3, "earlier_history must also take k_stream as a plain int "
                                                        "(routing calls it with HISTORY)")


# -- 2. per-frame noise conditioning ----------------------------------------------------------------------

def frames_of(x, f, S):
    return x[:, f * S:(f + 1) * S]


@check("frame_t", "modulate: the tokens of frame f get x * (1 + scale_f) + shift_f")
def _():
    g = torch.Generator().manual_seed(2)
    B, Fp, S, D = 2, 3, 4, 8
    x, shift, scale = (torch.randn(*s, generator=g) for s in ((B, Fp * S, D), (B, Fp, 1, D), (B, Fp, 1, D)))
    got = rf.modulate(x, shift, scale)
    expect(got.shape == x.shape, f"modulate must keep x's shape {tuple(x.shape)}, got {tuple(got.shape)}")
    for f in range(Fp):
        want = frames_of(x, f, S) * (1 + scale[:, f]) + shift[:, f]
        expect(rel_err(frames_of(got, f, S), want) <= TOL,
               f"the tokens of frame {f} are not modulated by frame {f}'s own shift and scale")


@check("frame_t", "gate: the tokens of frame f get y * g_f")
def _():
    g = torch.Generator().manual_seed(3)
    y, gates = torch.randn(2, 12, 8, generator=g), torch.randn(2, 3, 1, 8, generator=g)
    got = rf.gate(y, gates)
    expect(got.shape == y.shape, f"gate must keep y's shape {tuple(y.shape)}, got {tuple(got.shape)}")
    for f in range(3):
        expect(rel_err(frames_of(got, f, 4), frames_of(y, f, 4) * gates[:, f]) <= TOL,
               f"the tokens of frame {f} are not gated by frame {f}'s own gate")


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


@check("two_stream", "the last history chunk is nobody's history: left out of the sequence")
def _():
    model, (x, t, ctx) = tiny_model(), inputs(chunks=3)
    history = torch.randn_like(x)
    lengths = []
    hook = model.blocks[0].register_forward_pre_hook(lambda m, args: lengths.append(args[0].shape[1]))
    try:
        with torch.no_grad():
            a = model(x, t, ctx, history=history)
            history[:, -2:] += 1.0
            b = model(x, t, ctx, history=history)
    finally:
        hook.remove()
    expect(rel_err(b, a) <= TOL, "the last history chunk changed the output")
    want = (2 * 6 - 2) * model.tokens_per_frame(8, 8)
    expect(lengths[0] == want, f"the blocks see {lengths[0]} tokens, want {want}: [history without its last chunk ; "
                               f"the noisy frames]")


# -- 4. the KV cache and the sampler ------------------------------------------------------------------

@check("sampler", "euler: each step x <- x + (t_next - t) v(x, t), v taken at the current x and t")
def _():
    g = torch.Generator().manual_seed(6)
    x0, c = torch.randn(2, 2, 3, 4, 4, generator=g), torch.randn(2, 2, 3, 4, 4, generator=g)
    grid = torch.stack([torch.tensor([1.0, 0.7, 0.3, 0.0]), torch.tensor([0.9, 0.5, 0.2, 0.0])], dim=1)  # (4, B)
    seen = []

    def velocity(x, t):
        seen.append((x.clone(), t.clone()))
        return c - 0.5 * x
    out = rf.euler(velocity, x0, grid)
    expect(len(seen) == 3, f"3 steps on a 4-point grid call the velocity 3 times, not {len(seen)}")
    expect(all(t.shape == (2, 2) for _, t in seen), "velocity takes t of shape (B, F)")
    expect(torch.equal(seen[0][0], x0), "the first step must start from x")
    x = x0
    for k, (xk, tk) in enumerate(seen):
        expect(torch.allclose(tk, grid[k][:, None].expand(2, 2)), f"step {k} must take v at t = grid[{k}] (each "
                                                                   f"video its own grid), not {tk[:, 0].tolist()}")
        expect(rel_err(xk, x) <= TOL, f"step {k} takes v at a stale x: pass the current x")
        x = xk + (grid[k + 1] - grid[k]).view(-1, 1, 1, 1, 1) * (c - 0.5 * xk)
    expect(rel_err(out, x) <= TOL, "x does not end where the steps lead: check each step's sign and size (time "
                                   "runs from 1 down to 0)")


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


@check("sampler", "each finished chunk but the last enters the cache once")
def _():
    model, (_, _, ctx) = tiny_model(), inputs()
    commits, original = [], model.forward_chunk

    def spy(x, t, text_kv, cache, commit=False):
        commits.append(commit)
        return original(x, t, text_kv, cache, commit=commit)
    model.forward_chunk = spy
    rf.generate(model, ctx, 8, steps=2, size=(8, 8), seed=0)
    expect(sum(commits) == 3, f"4 chunks made {sum(commits)} commits to the cache, want 3: each finished chunk "
                              f"once, the last chunk never (nothing comes after it)")


@check("sampler", "a prefix continues exactly as if those frames had been generated")
def _():
    model, (_, _, ctx) = tiny_model(), inputs()
    prefix = torch.randn(2, 4, 3, 8, 8)
    kw = dict(steps=2, seed=0, prefix=prefix)
    cached, plain = rf.generate(model, ctx, 8, **kw), rf.generate(model, ctx, 8, use_cache=False, **kw)
    expect(torch.equal(cached[:, :4], prefix), "the prefix must open the video unchanged")
    expect(rel_err(cached, plain) <= TOL, "the frames after a prefix differ from the recomputation")


# -- 5. self-resampling -------------------------------------------------------------------------------

def resample(model, clip, ctx, t_s, seed=0, steps=1, generator=None):
    t_s = torch.full((clip.shape[0],), t_s) if isinstance(t_s, float) else t_s
    return calling(rf.resample_autoregressive, model, clip, ctx, t_s, steps,
                   generator=generator or Draws(seed))


def spy_forwards(model):
    """Record (x, t) of the last fpc frames of every forward_chunk / forward_causal call -> the list."""
    seen = []
    for fn in ("forward_chunk", "forward_causal"):
        original = getattr(model, fn)
        setattr(model, fn, lambda x, t, *a, _f=original, **k: seen.append((x[:, -2:], t[:, -2:])) or _f(x, t, *a, **k))
    return seen


@check("resample", "t_s = 0 returns the clip; t_s = 1 forgets it (same noise, any clip); the clip is not changed")
def _():
    model, (clip, _, ctx) = tiny_model(), inputs(chunks=3)
    kept = clip.clone()
    with torch.no_grad():
        out = resample(model, clip, ctx, 0.0)
        expect(torch.equal(clip, kept), "resample_autoregressive wrote into the clip it was given: write into a copy")
        expect(rel_err(out, clip) <= TOL, "t_s = 0 must give the clip back")
        a, again = resample(model, clip, ctx, 1.0), resample(model, clip, ctx, 1.0)
        expect(rel_err(a, again) <= TOL, f"the same clip and the same generator gave another history: {HELPERS}")
        b = resample(model, clip + torch.randn_like(clip), ctx, 1.0)
    expect(torch.equal(clip, kept), "resample_autoregressive wrote into the clip it was given: write into a copy")
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
    t_s, causal = 0.7, model.forward_causal
    seen = spy_forwards(model)
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


@check("resample", "the noise: fresh for every chunk, standard normal, from the generator given")
def _():
    model, (clip, _, ctx) = tiny_model(), inputs(B=2, chunks=4, size=16)
    t_s = torch.tensor([0.8, 0.5])                                    # each video its own
    seen = spy_forwards(model)
    with torch.no_grad():
        resample(model, clip, ctx, t_s)
    noisy = [x for x, t in seen if torch.allclose(t, t_s[:, None].expand_as(t))][:3]
    expect(len(noisy) == 3, "the forward must see each of the 3 history chunks at t = t_s, each video at its own")
    ts = t_s.view(-1, 1, 1, 1, 1)
    eps = torch.stack([(x - (1 - ts) * clip[:, 2 * i:2 * i + 2]) / ts for i, x in enumerate(noisy)], dim=1)
    independent(eps.flatten(0, 2), "noise of x_t_s (recovered from the chunk the forward saw)")

    with torch.no_grad():
        same_draws(lambda g: resample(model, clip, ctx, 0.5, generator=g), "resampled history")


@check("resample", "resample_steps Euler steps, on resample_grid from t_s down to 0")
def _():
    model, (clip, _, ctx) = tiny_model(), inputs(chunks=3)
    t_s = torch.tensor([0.8, 0.6])
    seen = spy_forwards(model)
    with torch.no_grad():
        two = resample(model, clip, ctx, t_s, steps=2)
        one = resample(model, clip, ctx, t_s, steps=1)
    grid = rf.resample_grid(t_s, 2, clip.device)                          # (3, B)
    levels = {tuple(round(v, 5) for v in t[:, 0].tolist()) for _, t in seen}
    for k in range(2):
        want = tuple(round(v, 5) for v in grid[k].tolist())
        expect(want in levels, f"with steps = 2 no forward saw a chunk at t = {list(want)}: take `steps` Euler steps "
                               f"on resample_grid(t_s, steps), each video from its own t_s")
    expect(rel_err(two[:, :4], one[:, :4]) > 1e-4, "steps = 2 gives what steps = 1 gives: use `steps`")


@check("resample", "no gradient reaches the resampled history")
def _():
    model, (clip, _, ctx) = tiny_model(), inputs(chunks=3)
    with torch.enable_grad():
        out = resample(model, clip, ctx, 0.5)
    expect(not out.requires_grad, "the resampled history carries a gradient: resample under torch.no_grad")


def drawn_t_s(model, B, generator):
    """The t_s degrade_history passes to resample_autoregressive for a batch of B videos."""
    clip, _, ctx = inputs(B=1, chunks=2)
    drawn, original = [], rf.resample_autoregressive
    rf.resample_autoregressive = lambda m, c, x, t_s, *a, **k: drawn.append(t_s) or c
    try:
        calling(rf.degrade_history, model, clip.expand(B, -1, -1, -1, -1), ctx.expand(B, -1, -1), "autoregressive",
                generator)
    finally:
        rf.resample_autoregressive = original
    expect(len(drawn) == 1 and drawn[0].shape == (B,), "draw one t_s per video, shape (B,), and pass it to "
                                                       "resample_autoregressive")
    return drawn[0]


@check("resample", "t_s is logit-normal, shifted by resample_shift (Eq. 7), one per video, from the generator")
def _():
    model = tiny_model(resample_shift=0.6, train_shift=3.0)
    got = drawn_t_s(model, 4000, Draws(0)).float().quantile(torch.tensor([0.1, 0.5, 0.9]))
    z = torch.tensor([-1.2816, 0.0, 1.2816])                   # N(0, 1) quantiles
    want = rf.shift_t(torch.sigmoid(z), 0.6)
    expect((got - want).abs().max() <= 0.03, f"t_s quantiles (10/50/90%) {[round(v, 3) for v in got.tolist()]}, "
                                             f"want {[round(v, 3) for v in want.tolist()]}: logit-normal, then "
                                             f"shift_t with cfg.resample_shift")
    same_draws(lambda g: drawn_t_s(model, 8, g), "t_s")


# -- 6. the loss --------------------------------------------------------------------------------------

class KnownModel(torch.nn.Module):
    """Stands in for the DiT: its error is known. Given x_t and t it recovers eps as if x_t = (1 - t) clip + t eps
    (Eq. 3) and answers v = (eps - clip) + w * offset, offset a known number per frame (w = 1, a parameter). Eq. 4's
    loss of chunk i is then the mean of offset^2 over the chunk's frames."""

    def __init__(self, cfg, clip, offset):
        super().__init__()
        self.cfg, self.clip, self.offset = cfg, clip.double(), offset
        self.w = torch.nn.Parameter(torch.ones(()))
        self.calls = []

    def forward(self, x, t, context, history=None):
        self.calls.append(dict(x=x.detach().double(), t=t.detach().clone(), history=history))
        tt = t.detach().double()[:, :, None, None, None]
        eps = (x.detach().double() - (1 - tt) * self.clip) / tt
        return ((eps - self.clip) + self.w.double() * self.offset[:, :, None, None, None]).to(x.dtype)


def known_history(clip):
    """What the stand-in degrade_history returns: the clip plus a known pattern (so it is not the clip)."""
    return clip + 2 * torch.cos(torch.arange(clip.numel()).float().view(clip.shape))


def run_loss(mode="autoregressive", B=2, chunks=3, size=8, generator=None, cfg_mode="autoregressive", **cfg):
    """training_loss with the known model and a stand-in degrade_history -> dict of what happened."""
    cfg = config(degrade=cfg_mode, train_shift=3.0, **cfg)
    clip, _, ctx = inputs(B=B, chunks=chunks, size=size, seed=5)
    offset = 0.2 + 0.1 * torch.arange(B * 2 * chunks, dtype=torch.float64).view(B, 2 * chunks).remainder(7)
    model = KnownModel(cfg, clip, offset)
    degraded, original = [], rf.degrade_history

    def stand_in(m, c, context, mode, generator=None):
        degraded.append(dict(mode=mode, generator=generator, clip=c))
        return known_history(c)
    rf.degrade_history = stand_in
    generator = generator or Draws(0)
    try:
        loss, chunk_loss, chunk_t = calling(rf.training_loss, model, clip, ctx, mode, generator)
    finally:
        rf.degrade_history = original
    expect(len(model.calls) == 1, f"training_loss must call the model's two-stream forward model(x, t, context, "
                                  f"history=...) once, not {len(model.calls)} times")
    return dict(model=model, clip=clip, offset=offset, loss=loss, chunk_loss=chunk_loss, chunk_t=chunk_t,
                call=model.calls[0], degraded=degraded, generator=generator)


def noise_of(r):
    """The noise in the forward's x_t, recovered as if x_t = (1 - t) clip + t eps (Eq. 3)."""
    t = r["call"]["t"].double()[:, :, None, None, None]
    return (r["call"]["x"] - (1 - t) * r["clip"].double()) / t


@check("loss", "the history: degrade_history(mode, or cfg.degrade when mode is None), passed to the forward")
def _():
    for mode, cfg_mode in (("autoregressive", "none"), (None, "autoregressive"), ("noise", "autoregressive")):
        r = run_loss(mode, cfg_mode=cfg_mode)
        expect(len(r["degraded"]) == 1, "get the history from degrade_history(model, clip, context, mode, "
                                        "generator), once")
        d = r["degraded"][0]
        want = mode or cfg_mode
        expect(d["mode"] == want, f"degrade_history got mode {d['mode']!r}, want {want!r}: mode, or cfg.degrade "
                                  f"when mode is None")
        expect(d["generator"] is r["generator"], "pass the generator on to degrade_history")
        h = r["call"]["history"]
        expect(h is not None and h.shape == r["clip"].shape and torch.equal(h, known_history(r["clip"])),
               "the forward must be conditioned on the history degrade_history returned, not on the clip: the "
               "history is what the model sees of the past")


@check("loss", "one t per chunk, shared by its frames, returned as chunk_t")
def _():
    r = run_loss()
    t, chunk_t = r["call"]["t"], r["chunk_t"]
    expect(t.shape == (2, 6), f"the forward's t must be (B, F) = (2, 6), got {tuple(t.shape)}")
    expect(chunk_t.shape == (2, 3), f"chunk_t must be (B, N) = (2, 3), got {tuple(chunk_t.shape)}")
    expect(torch.equal(t, t[:, ::2].repeat_interleave(2, dim=1)), "the frames of a chunk must share its t: "
                                                                   "frames 0, 1 are chunk 0, frames 2, 3 chunk 1, ...")
    expect(torch.equal(t, chunk_t.repeat_interleave(2, dim=1)), "every frame of chunk i has t of chunk i, returned "
                                                                "as chunk_t[:, i]")


@check("loss", "the noise: fresh for every frame and every call, standard normal, from the generator given")
def _():
    r = run_loss(B=4, size=16)
    tt, eps = r["call"]["t"].double()[:, :, None, None, None], noise_of(r)
    pattern = (1 - tt) / tt * (known_history(r["clip"]) - r["clip"]).double()    # in eps if x_t came from the history
    if torch.corrcoef(torch.stack([eps.flatten(), pattern.flatten()]))[0, 1] > 0.1:
        raise AssertionError("the noisy input x_t is built from the history: build it from the clip, "
                             "x_t = (1 - t) clip + t eps (Eq. 3); the history only conditions the model")
    independent(eps.flatten(0, 1), "noise in x_t (recovered from x_t, t and the clip)")
    same_draws(lambda g: noise_of(run_loss(generator=g)), "noise in x_t")


def per_chunk(x, fpc=2):
    """(B, F, ...) -> (B, N): the mean of each chunk of fpc frames, everything in it."""
    return torch.stack([x[:, i:i + fpc].reshape(x.shape[0], -1).mean(1) for i in range(0, x.shape[1], fpc)], dim=1)


@check("loss", "Eq. 4: a model off by a known amount per frame gets that loss; loss = chunk_loss.mean()")
def _():
    r = run_loss()
    got, chunk_t, offset = r["chunk_loss"], r["chunk_t"], r["offset"]
    expect(got.shape == (2, 3), f"chunk_loss must be (B, N) = (2, 3), got {tuple(got.shape)}")
    want = per_chunk(offset.pow(2))                                 # the known error, squared, per chunk
    if rel_err(got.double(), want) > 1e-3:
        clip, hist = r["clip"].double(), known_history(r["clip"]).double()
        t = r["call"]["t"].double()[:, :, None, None, None]
        eps = (r["call"]["x"] - (1 - t) * clip) / t
        v = eps - clip + offset[:, :, None, None, None]
        guesses = [((v - (eps - hist)), "the target is eps - history: the target is always the clip's velocity, "
                                        "eps - clip; the history only conditions the model"),
                   ((v - clip), "the target is the clean clip: the model predicts the velocity eps - clip (Eq. 4)"),
                   ((v - hist), "the target is the history: the model predicts the clip's velocity eps - clip"),
                   ((v - eps), "the target is the noise eps: the model predicts the velocity eps - clip (Eq. 4)"),
                   ((v - (clip - eps)), "the target's sign: the velocity is eps - clip (from the clip to the noise)")]
        for err, hint in guesses:
            if rel_err(got.double(), per_chunk(err.pow(2))) <= 1e-3:
                raise AssertionError(hint)
        raise AssertionError("the per-chunk loss is not the mean of |v - (eps - clip)|^2 over each chunk's frames "
                             "and pixels (Eq. 4)")
    loss = r["loss"]
    expect(loss.ndim == 0 and abs(loss.item() - want.mean().item()) <= 1e-3 * want.mean().item(),
           "loss must be chunk_loss.mean(), one number")
    expect(not got.requires_grad, "chunk_loss is for the log: return it detached")
    expect(loss.requires_grad, "the loss carries no gradient: compute it from the forward's output")
    loss.backward()
    expect(r["model"].w.grad is not None and abs(r["model"].w.grad.item() - 2 * want.mean().item())
           <= 1e-3 * want.mean().item(), "the gradient of the loss is not that of chunk_loss.mean()")


@check("loss", "the training t: sample_train_t's law (uniform or logit-normal, shifted by train_shift), per chunk")
def _():
    for train_t in ("uniform", "logit_normal"):
        r = run_loss(B=1000, chunks=2, size=4, train_t=train_t)
        per_chunk = r["call"]["t"][:, ::2]                                          # (1000, N = 2)
        got = per_chunk.flatten().float().quantile(torch.tensor([0.1, 0.5, 0.9]))
        u = torch.tensor([0.1, 0.5, 0.9]) if train_t == "uniform" else torch.sigmoid(torch.tensor([-1.2816, 0., 1.2816]))
        want = rf.shift_t(u, 3.0)
        expect((got - want).abs().max() <= 0.04, f"train_t {train_t}: t quantiles (10/50/90%) "
                                                 f"{[round(v, 3) for v in got.tolist()]}, want "
                                                 f"{[round(v, 3) for v in want.tolist()]}: draw t with "
                                                 f"sample_train_t(cfg, B, N, generator)")
        corr = torch.corrcoef(per_chunk.T.float())[0, 1].item()
        expect(abs(corr) < 0.15, f"the chunks of a video share their t (correlation {corr:.2f}): draw one per chunk")
    same_draws(lambda g: run_loss(generator=g)["chunk_t"], "training t")


@check("loss", "with the real DiT and self-resampling: runs, and the gradient reaches the model")
def _():
    model, (clip, _, ctx) = tiny_model(), inputs(chunks=3)
    model.train()
    loss, chunk_loss, chunk_t = calling(rf.training_loss, model, clip, ctx, "noise", Draws(0))
    expect(torch.isfinite(loss), "the loss is not finite")
    loss.backward()
    expect(model.patch_embedding.weight.grad is not None and model.patch_embedding.weight.grad.abs().sum() > 0,
           "no gradient reached the model")


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


def branches(seed=5, scale=1.0):
    """q and 8 keys split 3 | 5 -> (q, k, v, (o_a, l_a), (o_b, l_b))."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(3, 4, 8, generator=g) for _ in range(3))
    q = q * scale
    k, v = torch.cat([k, 2 * k], dim=1), torch.cat([v, v.flip(1)], dim=1)             # 8 keys
    return q, k, v, fast_attn.plain_attention_lse(q, k[:, :3], v[:, :3]), fast_attn.plain_attention_lse(q, k[:, 3:],
                                                                                                         v[:, 3:])


@check("routing", "merge_lse: two branches merge into one softmax over the union of their keys")
def _():
    q, k, v, (o_a, l_a), (o_b, l_b) = branches()
    o, lse = rf.merge_lse(o_a, l_a, o_b, l_b)
    want = F.scaled_dot_product_attention(q, k, v)
    expect(rel_err(o, want) <= TOL, "the merged output is not softmax attention over both key sets")
    expect(rel_err(lse, fast_attn.plain_attention_lse(q, k, v)[1]) <= TOL, "the merged log-sum-exp is not the union's")
    none = torch.full_like(l_b, -math.inf)
    expect(rel_err(rf.merge_lse(o_a, l_a, torch.zeros_like(o_b), none)[0], o_a) <= TOL,
           "a branch with no keys (lse = -inf) must weigh nothing")


@check("routing", "merge_lse and merge_lse_many stay finite and exact for large and small log-sum-exps")
def _():
    q, k, v, (o_a, l_a), (o_b, l_b) = branches()
    o, lse = rf.merge_lse(o_a, l_a, o_b, l_b)
    index = torch.arange(l_a.numel()).repeat(2)
    for shift in (1000.0, -1000.0):
        o2, lse2 = rf.merge_lse(o_a, l_a + shift, o_b, l_b + shift)
        expect(bool(torch.isfinite(o2).all()) and rel_err(o2, o) <= TOL and rel_err(lse2 - shift, lse) <= 1e-4,
               f"merge_lse with both log-sum-exps {shift:+.0f} (large logits) overflows or changes the result: "
               f"subtract the larger log-sum-exp before exp")
        o3, lse3 = fast_attn.merge_lse_many(torch.cat([o_a.flatten(0, 1), o_b.flatten(0, 1)]),
                                            torch.cat([l_a.flatten(), l_b.flatten()]) + shift, index, l_a.numel())
        expect(bool(torch.isfinite(o3).all()) and rel_err(o3, o.flatten(0, 1)) <= TOL,
               f"fast_attn.merge_lse_many with log-sum-exps {shift:+.0f} (large logits) overflows or changes the "
               f"result: subtract each output's largest log-sum-exp before exp")


@check("routing", "fast_attn.merge_lse_many: many branches per output, and an output with none")
def _():
    q, k, v, (o_a, l_a), (o_b, l_b) = branches(seed=7)
    o_c, l_c = fast_attn.plain_attention_lse(q, 3 * k[:, :2], v[:, :2])       # a third branch, two more keys
    n = l_a.numel()
    rows = [o_b.flatten(0, 1), o_c.flatten(0, 1), o_a.flatten(0, 1)]           # any order of branches
    lses = torch.cat([l_b.flatten(), l_c.flatten(), l_a.flatten()])
    index = torch.arange(n).repeat(3)
    o, lse = fast_attn.merge_lse_many(torch.cat(rows), lses, index, n + 2)     # outputs n, n + 1: no branch
    want = F.scaled_dot_product_attention(q, torch.cat([k, 3 * k[:, :2]], 1), torch.cat([v, v[:, :2]], 1))
    expect(o.shape == (n + 2, 8) and lse.shape == (n + 2,), f"want o ({n + 2}, 8) and lse ({n + 2},)")
    expect(rel_err(o[:n], want.flatten(0, 1)) <= TOL, "three branches do not merge into softmax attention over "
                                                      "all their keys")
    expect(bool((o[n:] == 0).all()) and bool((lse[n:] == -math.inf).all()),
           "an output with no branch must get o = 0 and lse = -inf (no 0 / 0)")


@check("routing", "routed sampling: the KV cache gives the routed recomputation, from the first chunk (fewer history "
                  "chunks than k) on")
def _():
    model, (_, _, ctx) = tiny_model(top_k=2), inputs()
    kw = dict(steps=2, size=(8, 8), seed=0)
    cached, plain = rf.generate(model, ctx, 10, **kw), rf.generate(model, ctx, 10, use_cache=False, **kw)
    expect(rel_err(cached, plain) <= TOL, "routed sampling with the cache differs from the routed recomputation")
    expect(rel_err(cached, rf.generate(tiny_model(), ctx, 10, **kw)) > 1e-3, "top-2 routing samples what dense "
                                                                            "attention samples: is routing used?")


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
