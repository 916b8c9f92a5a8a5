"""
kit/wrong_answers.py -- the usual wrong answers, per part. `python -m kit.plant` plants each one in a copy of
the project and shows that the part's checks reject it (and, with --suite, that the test suite does too).

Instructors only: the student copy leaves this file out (each wrong answer sits beside the right one).
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class Wrong:
    part: str
    what: str
    old: str | int           # text of the right answer, found exactly once in `file`; or the index of one of
    new: str                 # the part's marked regions, whose lines `new` replaces
    file: str = "rf.py"
    also: tuple = ()         # more (old, new) text edits of the same file


RESAMPLE_WITH_GRADIENT = """\
    grid = resample_grid(t_s, steps, clip.device)
    out = clip.clone()
    for i in range(clip.shape[1] // fpc - 1):
        x0, past = clip[:, i * fpc:(i + 1) * fpc], out[:, :i * fpc]
        x = add_noise(x0, randn_like(x0, generator), grid[0][:, None].expand(-1, fpc))

        def v(x, t):
            t_all = torch.cat([t.new_zeros(t.shape[0], past.shape[1]), t], dim=1)
            return model.forward_causal(torch.cat([past, x], dim=1), t_all, context)[:, -fpc:]
        out = torch.cat([past, euler(v, x, grid), out[:, (i + 1) * fpc:]], dim=1)
    return out
"""

WRONG = [
    Wrong("mask", "a leaking mask: Z_i sees H_i, its own answer",
          "return (k_stream == HISTORY) & (k_chunk < q_chunk)",
          "return (k_stream == HISTORY) & (k_chunk <= q_chunk)"),
    Wrong("mask", "the own-chunk term ignores the stream: Z_i sees H_i",
          "own_chunk = (q_chunk == k_chunk) & (q_stream == k_stream)",
          "own_chunk = q_chunk == k_chunk"),
    Wrong("mask", "history without causality: every history chunk is visible",
          "return (k_stream == HISTORY) & (k_chunk < q_chunk)",
          "return k_stream == HISTORY"),
    Wrong("frame_t", "one modulation for the whole video: every frame gets frame 0's",
          "return (x.unflatten(1, (shift.shape[1], -1)) * (1 + scale) + shift).flatten(1, 2)",
          "return (x.unflatten(1, (shift.shape[1], -1)) * (1 + scale[:, :1]) + shift[:, :1]).flatten(1, 2)"),
    Wrong("frame_t", "the gate as a scale: y * (1 + g)",
          "return (y.unflatten(1, (g.shape[1], -1)) * g).flatten(1, 2)",
          "return (y.unflatten(1, (g.shape[1], -1)) * (1 + g)).flatten(1, 2)"),
    Wrong("two_stream", "the history at the noisy chunks' t instead of t = 0",
          "t_all = torch.cat([t.new_zeros(B, n_hist), t], dim=1)",
          "t_all = torch.cat([t[:, :n_hist], t], dim=1)"),
    Wrong("two_stream", "positions run on after the history instead of H_j and Z_j sharing them",
          "pos = torch.cat([torch.arange(n_hist, device=dev), torch.arange(num_frames, device=dev)])",
          "pos = torch.arange(n_hist + num_frames, device=dev)"),
    Wrong("sampler", "an Euler sign flip",
          "x = x + (s_next - s).view(-1, 1, 1, 1, 1) * velocity(x, t)",
          "x = x - (s_next - s).view(-1, 1, 1, 1, 1) * velocity(x, t)"),
    Wrong("sampler", "a cache that never advances: finished chunks are never committed",
          "self.model.forward_chunk(self.pair(chunk), self.pair(zeros), self.text_kv, self.cache,\n"
          "                                     commit=True)",
          "self.model.forward_chunk(self.pair(chunk), self.pair(zeros), self.text_kv, self.cache,\n"
          "                                     commit=False)"),
    Wrong("sampler", "a finished chunk cached at t = 1 instead of t = 0",
          "zeros = chunk.new_zeros(chunk.shape[:2])", "zeros = chunk.new_ones(chunk.shape[:2])"),
    Wrong("sampler", "the cache writes every chunk over the first",
          "self.k[:, self.length:end], self.v[:, self.length:end] = k, v",
          "self.k[:, :k.shape[1]], self.v[:, :k.shape[1]] = k, v"),
    Wrong("resample", "a resampler with the plain forward and no torch.no_grad: gradients reach the history",
          1, RESAMPLE_WITH_GRADIENT, also=(("@torch.no_grad()\ndef resample_autoregressive(",
                                              "def resample_autoregressive("),)),
    Wrong("resample", "t_s drawn without its shift",
          "t_s = shift_t(logit_normal((B,), generator), cfg.resample_shift)",
          "t_s = logit_normal((B,), generator)"),
    Wrong("resample", "parallel, not autoregressive: each chunk conditioned on the ground truth",
          "model.forward_chunk(x, torch.zeros_like(ts), text_kv, cache, commit=True)",
          "model.forward_chunk(x0, torch.zeros_like(ts), text_kv, cache, commit=True)"),
    Wrong("resample", "the resampled chunk is not written back: the history stays the ground truth",
          "out[:, i * fpc:(i + 1) * fpc] = x", "pass"),
    Wrong("loss", "the target built from the history: eps - history",
          "err = (v.float() - (eps - clip).float())", "err = (v.float() - (eps - history).float())"),
    Wrong("loss", "the noisy input built from the history",
          "v = model(add_noise(clip, eps, t_frames)", "v = model(add_noise(history, eps, t_frames)"),
    Wrong("loss", "one t for the whole video instead of one per chunk",
          "t = sample_train_t(cfg, B, N, generator).to(clip.device)",
          "t = sample_train_t(cfg, B, 1, generator).to(clip.device).expand(B, N)"),
    Wrong("loss", "t spread over frames in the wrong order: repeat instead of repeat_interleave",
          "t_frames = t.repeat_interleave(fpc, dim=1)", "t_frames = t.repeat(1, fpc)"),
    Wrong("routing", "the lowest k chunks chosen",
          "best = score.sort(dim=-1, descending=True, stable=True)",
          "best = score.sort(dim=-1, descending=False, stable=True)"),
    Wrong("routing", "ineligible chunks left in the ranking",
          "score = score.masked_fill(~eligible, -torch.inf)", "score = score"),
    Wrong("routing", "a plain average instead of the log-sum-exp merge",
          "o = (w_a[..., None] * o_a.float() + w_b[..., None] * o_b.float()) / total[..., None]",
          "o = (o_a.float() + o_b.float()) / 2"),
    Wrong("routing", "the batched merge in fast_attn.py as a plain average",
          "w = torch.exp(lse - top[index])", "w = torch.ones_like(lse)", file="fast_attn.py"),
]
