"""Training in rf.py: self-resampling (degrade_history, resample_autoregressive) and the loss (training_loss).

Everything runs on the CPU in fp32 with conftest's tiny random model. No answer is stored: each test recomputes what
the method says from the model's own forward, or checks a property the method must have."""

import math

import pytest
import torch

import rf
from conftest import C, FPC, HW, TINY, chunk, differs, make_model, max_diff, rel_err, seeded


def _clip(B=2, N=3, seed=7):
    """A clip (B, N*FPC, C, *HW) in [-1, 1] and its text context (B, 4, text_dim)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, N * FPC, C, *HW, generator=g).clamp(-1, 1), torch.randn(B, 4, TINY["text_dim"], generator=g)


# ----------------------------------------------------------------------------------------------------------------
# The loss (Algorithm 1, line 7; Eq. 4)
# ----------------------------------------------------------------------------------------------------------------

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


def record_two_stream_calls(model, monkeypatch, detach_history=False):
    """Spy on model(x, t, ctx, history=h): each call with a history is recorded as dict(x, t, history, v).

    The loss's forward is the last such call (Algorithm 1, line 7). With detach_history, the history is detached
    before the forward sees it: what a correct self-resampler (under no_grad) gives anyway."""
    calls, real = [], model.forward

    def spy(x, t, context, *args, history=None, **kwargs):
        if history is not None and detach_history:
            history = history.detach()
        v = real(x, t, context, *args, history=history, **kwargs)
        if history is not None:
            calls.append(dict(x=x, t=t, history=history, v=v))
        return v

    monkeypatch.setattr(model, "forward", spy)
    return calls


def recompute_eq4(call, clip):
    """From what the loss's forward saw, x_t = (1 - t) x0 + t eps with x0 the CLIP (Eq. 3): recover eps, and
    recompute Eq. 4's per-chunk loss mean ||v - (eps - x0)||^2, in fp64. Returns (eps, chunk_loss (B, N), chunk_t)."""
    x_t, t, v = (call[k].double() for k in ("x", "t", "v"))
    x0 = clip.double()
    tt = t[:, :, None, None, None]
    eps = (x_t - (1 - tt) * x0) / tt
    err = (v - (eps - x0)).pow(2).mean(dim=(2, 3, 4))                                     # (B, F)
    return eps, err.unflatten(1, (-1, FPC)).mean(2), t[:, ::FPC]


def check_eq4(model, clip, ctx, mode, seed, monkeypatch):
    """training_loss(mode) is Eq. 4 on the clip, whatever the order of its random draws. Returns the forward's call."""
    calls = record_two_stream_calls(model, monkeypatch)
    loss, chunk_loss, chunk_t = rf.training_loss(model, clip, ctx, mode=mode, generator=seeded(seed))
    assert calls, "the loss never called the two-stream forward model(x, t, ctx, history=...)"
    call = calls[-1]
    B, F_ = clip.shape[:2]
    assert call["x"].shape == clip.shape and call["t"].shape == (B, F_) and call["history"].shape == clip.shape
    t = call["t"]
    assert torch.equal(t, t[:, ::FPC].repeat_interleave(FPC, dim=1)), "one t per chunk"
    assert ((t > 0) & (t < 1)).all()
    eps, want, want_t = recompute_eq4(call, clip)
    assert torch.equal(chunk_t, want_t.float())
    assert rel_err(chunk_loss.double(), want) <= 1e-5, (chunk_loss, want)
    assert abs(loss.item() - want.mean().item()) <= 1e-5 * want.mean().item()
    # the recovered eps is standard Gaussian noise (with x_t built from the history, it would not be)
    assert abs(eps.std().item() - 1) < 0.05 and abs(eps.mean().item()) < 0.05, (eps.mean(), eps.std())
    return call


@torch.no_grad()
def test_training_loss_is_flow_matching_on_ground_truth(monkeypatch):
    """Teacher forcing ("none"): the loss is mean ||v(x_t, t) - (eps - x0)||^2 with one t per chunk, history = GT.
    Recomputed from what the forward saw (eps recovered from x_t and t), so the order of the random draws is free."""
    model = make_model()
    clip, ctx = _clip()
    call = check_eq4(model, clip, ctx, "none", 4, monkeypatch)
    assert torch.equal(call["history"], clip)
    # wrong variant: the same t with other noise gives another per-chunk loss
    _, chunk_loss, _ = recompute_eq4(call, clip)
    tf = call["t"]
    eps2 = torch.randn(clip.shape, generator=seeded(99))
    v2 = model(rf.add_noise(clip, eps2, tf), tf, ctx, history=clip)
    assert differs((v2 - (eps2 - clip)).pow(2).mean(dim=(2, 3, 4)).unflatten(1, (-1, FPC)).mean(2), chunk_loss.float(),
                   1e-3)


@torch.no_grad()
def test_the_loss_draws_fresh_noise_from_its_generator(monkeypatch):
    """The noise of x_t is drawn afresh: every frame of every video its own, every call its own (noise drawn once
    and reused fails here), and all of it from the generator: the same seed gives the same noise, whatever torch's
    global random state."""
    model = make_model()
    clip, ctx = _clip(B=4, N=3)
    calls = record_two_stream_calls(model, monkeypatch)

    def noise(generator, global_seed=0):
        torch.manual_seed(global_seed)
        rf.training_loss(model, clip, ctx, mode="none", generator=generator)
        return recompute_eq4(calls[-1], clip)[0]

    g = seeded(0)
    first, second = noise(g), noise(g)
    assert differs(first, second, 0.5), "a second call with the same generator drew the same noise: drawn once, reused"
    corr = torch.corrcoef(first.flatten(0, 1).flatten(1))              # one row per frame of every video
    corr.fill_diagonal_(0)
    assert corr.abs().max() < 0.4, f"two frames share their noise (correlation {corr.abs().max():.2f})"
    assert torch.equal(noise(seeded(3), 1), noise(seeded(3), 2)), "the noise does not come from the generator alone"


@torch.no_grad()
def test_resampling_forcing_loss_is_flow_matching_on_the_clip_not_the_history(monkeypatch):
    """Resampling Forcing ("autoregressive"): the history is the resampled one, yet both the noisy input and the
    target are built from the ground-truth clip: x_t = (1 - t) clip + t eps, target eps - clip (Eq. 4). In teacher
    forcing the history IS the clip, so only this mode tells the two apart."""
    model = make_model()
    clip, ctx = _clip()
    call = check_eq4(model, clip, ctx, "autoregressive", 4, monkeypatch)
    hist = call["history"]
    assert torch.equal(chunk(hist, 2), chunk(clip, 2))                   # the last chunk is nobody's history
    for i in range(2):
        assert differs(chunk(hist, i), chunk(clip, i), 1e-3), f"history chunk {i} not resampled"


@torch.no_grad()
def test_training_t_is_shifted_uniform_and_drawn_apart_for_each_chunk(monkeypatch):
    """Algorithm 1, line 6: t^i for every chunk i, independently; the toy's is uniform shifted by train_shift."""
    model = make_model(train_shift=3.0)
    calls = record_two_stream_calls(model, monkeypatch)
    B = 1000
    clip, ctx = (x[:1].expand(B, *x.shape[1:]) for x in _clip(B=1, N=2))
    rf.training_loss(model, clip, ctx, mode="none", generator=seeded(0))
    t = calls[-1]["t"][:, ::FPC].double()                                             # (B, N = 2)
    q = torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9], dtype=torch.float64)
    assert max_diff(t.flatten().quantile(q), rf.shift_t(q, 3.0)) < 0.04
    assert abs(torch.corrcoef(t.T)[0, 1].item()) < 0.1, "the chunks of a video must not share their t"


@pytest.mark.parametrize("mode", ["autoregressive", "parallel"])
def test_no_gradient_flows_into_the_degraded_history(mode, monkeypatch):
    """Self-resampling runs without gradient (Algorithm 1: the history is a detached rollout): the parameter
    gradients of the loss are those of the same loss with its history detached."""
    clip, ctx = _clip()
    grads = []
    for detach in (False, True):
        model = make_model().train()
        calls = record_two_stream_calls(model, monkeypatch, detach_history=detach)
        loss, _, _ = rf.training_loss(model, clip, ctx, mode=mode, generator=seeded(2))
        loss.backward()
        assert calls
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name, g in grads[1].items():
        assert rel_err(grads[0][name], g) <= 1e-6, f"{name}: the loss backpropagates through the history"


def test_self_resampling_builds_no_graph_even_when_called_with_gradients_on():
    """resample_autoregressive is a rollout without gradient on its own, not only inside degrade_history: a
    resampler written without torch.no_grad would keep every step's graph in memory (and leak gradients into the
    history wherever it is called from a training graph)."""
    clip, ctx = _clip()
    model = make_model().train()
    with torch.enable_grad():
        out = rf.resample_autoregressive(model, clip, ctx, torch.full((clip.shape[0],), 0.5), generator=seeded(0))
    assert not out.requires_grad and out.grad_fn is None


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
# Self-resampling: the degraded history (Algorithm 1, lines 2-5; Eq. 5)
# ----------------------------------------------------------------------------------------------------------------

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


@pytest.mark.parametrize("shift", [0.6, 3.0])
def test_degrade_history_draws_t_s_from_the_shifted_logit_normal(shift, monkeypatch):
    """Algorithm 1, lines 2-3: t_s = shift(sigmoid(z), s) with z ~ N(0, 1) and s = cfg.resample_shift (Eq. 7), one
    per video. Checked on the quantiles of 20000 draws, against the closed form of that distribution."""
    model = make_model(resample_shift=shift)
    drawn = []

    def spy(model, clip, context, t_s, *args, **kwargs):
        drawn.append(t_s)
        return clip

    monkeypatch.setattr(rf, "resample_autoregressive", spy)
    B = 20000
    clip = torch.zeros(1, 2 * FPC, C, 4, 4).expand(B, -1, -1, -1, -1)      # never looked at: the spy returns it
    ctx = torch.zeros(1, 4, TINY["text_dim"]).expand(B, -1, -1)
    rf.degrade_history(model, clip, ctx, "autoregressive", seeded(0))
    assert len(drawn) == 1 and drawn[0].shape == (B,)
    t_s = drawn[0].double()
    q = torch.tensor([0.02, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.98], dtype=torch.float64)
    u = torch.sigmoid(torch.special.ndtri(q))                           # logit-normal quantiles
    want = shift * u / (1 + (shift - 1) * u)                             # Eq. 7 is monotonic: quantiles map through
    got = torch.quantile(t_s, q)
    assert (got - want).abs().max() <= 0.01, (got, want)


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
        xi = xi - t_s.view(-1, 1, 1, 1, 1) * model.forward_causal(seq, ts, ctx)[:, -FPC:]
        done.append(xi)
        assert rel_err(chunk(out, i), xi) <= 1e-5
    # wrong variant: chunk 1 conditioned on the ground-truth chunk 0 instead gives another result
    g = torch.Generator().manual_seed(3)
    torch.randn(chunk(clip, 0).shape, generator=g)
    x1 = rf.add_noise(chunk(clip, 1), torch.randn(chunk(clip, 1).shape, generator=g), t_s[:, None].expand(1, FPC))
    seq = torch.cat([chunk(clip, 0), x1], dim=1)
    ts = torch.cat([torch.zeros(1, FPC), t_s[:, None].expand(1, FPC)], dim=1)
    teacher = x1 - t_s.view(-1, 1, 1, 1, 1) * model.forward_causal(seq, ts, ctx)[:, -FPC:]
    assert differs(teacher, chunk(out, 1))


@pytest.mark.parametrize("steps", [1, 2])
@torch.no_grad()
def test_resampling_from_t_s_one_forgets_the_clip_and_from_zero_returns_it(steps):
    """x_{t_s} = (1 - t_s) x0 + t_s eps: at t_s = 1 the resampled history is pure generation (the clip is not seen),
    at t_s = 0 it is the clip itself. Per video: a batch with t_s = (1, 0) does both at once."""
    model = make_model()
    clip, ctx = _clip(B=2, N=3)
    other, _ = _clip(B=2, N=3, seed=8)
    last = slice(2 * FPC, None)                                          # the last chunk: returned unchanged

    def resample(x, t_s):
        return rf.resample_autoregressive(model, x, ctx, torch.tensor(t_s), steps=steps, generator=seeded(3))

    a, b = resample(clip, [1.0, 1.0]), resample(other, [1.0, 1.0])
    assert rel_err(a[:, :2 * FPC], b[:, :2 * FPC]) <= 1e-6, "at t_s = 1 the resampled history depends on the clip"
    assert differs(a[:, :2 * FPC], clip[:, :2 * FPC], 1e-2)
    assert torch.equal(a[:, last], clip[:, last]) and torch.equal(b[:, last], other[:, last])
    assert max_diff(resample(clip, [0.0, 0.0]), clip) <= 1e-6, "at t_s = 0 the resampled history is not the clip"
    mixed = resample(clip, [1.0, 0.0])
    assert rel_err(mixed[:1], a[:1]) <= 1e-6 and max_diff(mixed[1:], clip[1:]) <= 1e-6


@torch.no_grad()
def test_resampled_chunk_depends_on_the_chunk_before_never_a_later_one():
    """Autoregressive resampling is causal: resampled chunk i is made from clip chunk i and conditioned on the
    resampled chunks < i, so it changes with clip chunks <= i (i - 1 included) and never with a later one."""
    model = make_model()
    N = 4
    clip, ctx = _clip(B=1, N=N)
    t_s = torch.tensor([0.5])
    out = rf.resample_autoregressive(model, clip, ctx, t_s, generator=seeded(3))
    g = seeded(11)
    for j in range(N):
        c2 = clip.clone()
        c2[:, j * FPC:(j + 1) * FPC] = torch.randn(1, FPC, C, *HW, generator=g).clamp(-1, 1)
        out2 = rf.resample_autoregressive(model, c2, ctx, t_s, generator=seeded(3))
        assert max_diff(out2[:, :j * FPC], out[:, :j * FPC]) <= 1e-6, f"a chunk < {j} saw chunk {j}"
        assert differs(chunk(out2, j), chunk(out, j))
        if j + 1 < N - 1:                                                # the last chunk is the clip's, not resampled
            assert differs(chunk(out2, j + 1), chunk(out, j + 1)), f"resampled chunk {j + 1} ignored chunk {j}"
