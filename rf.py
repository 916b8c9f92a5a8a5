"""
rf.py -- Resampling Forcing: the method in one file.

Paper: Y. Guo et al., "End-to-End Training for Autoregressive Video Diffusion via Self-Resampling",
arXiv 2512.15702 (2025). Base model: Wan2.1-T2V-1.3B (arXiv 2503.20314).

An autoregressive (AR) video diffusion model generates a video chunk by chunk, each chunk denoised while attending
to the chunks already made. Trained with teacher forcing (history = ground truth), it never sees its own mistakes,
so at test time small errors pile up and long rollouts fall apart. Resampling Forcing trains on history the model
degraded itself: each history chunk is noised to a level t_s and denoised back by the model, conditioned on the
already degraded chunks before it (autoregressive self-resampling, no gradient). The loss is the usual per-chunk
flow-matching loss on clean targets, computed for all chunks in one forward with a sparse causal mask. No teacher,
no distillation, no new parameters.

Reading order
    1. Config and presets
    2. Flow matching: noise, shift, timesteps (Eqs. 3, 4, 7)
    3. Who sees whom: the one mask rule, its ASCII picture, attention; history routing and the two-branch merge
    4. The Wan2.1 DiT with per-frame noise conditioning, two forwards and a cached chunk forward; the KV cache
    5. Sampling: generate (chunk by chunk, Euler, CFG, KV cache)
    6. Training: self-resampling and the loss (Algorithm 1)

Around it, each in a file of its own: kernels.py (the tuned attention paths, proved equal to the readable ones
here), wan.py (Wan2.1's weights, text encoder and VAE), checkpoints.py (saving and loading), and the toy's
data, tokenizer and caption encoder in tiny_data/.

Conventions (fixed everywhere below)
    B batch, F frames, C channels, H x W frame size (Wan: latent frames, 8x smaller than pixels; toy: pixels)
    N chunks, L tokens, S tokens per frame, D model width, nh heads, hd head width
    video tensors are (B, F, C, H, W); noise levels are per frame, t: (B, F), equal within a chunk
    t in [0, 1], t = 0 clean, t = 1 pure noise; x_t = (1 - t) x0 + t eps; the model predicts v = eps - x0
    a "chunk" is frames_per_chunk consecutive frames generated together (the paper calls it a "frame")
    lines tagged [RF] are where this model departs from Wan2.1; `grep -n "\\[RF\\]" rf.py` lists the diff
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from torch.nn.attention.flex_attention import BlockMask
from torch.utils.checkpoint import checkpoint

import kernels

ROPE_LEN = 1024  # Wan's RoPE table holds 1024 positions per axis: the longest video is 1024 (latent) frames


# ----------------------------------------------------------------------------------------------------------------
# 1. Config and presets
# ----------------------------------------------------------------------------------------------------------------

@dataclass
class Config:
    # Wan2.1 DiT, with the field names of Wan's config.json
    dim: int = 1536                    # model width D
    ffn_dim: int = 8960                # hidden width of each block's feed-forward layer
    freq_dim: int = 256                # width of the timestep sinusoid
    num_heads: int = 12                # attention heads (head width = dim / num_heads)
    num_layers: int = 30               # DiT blocks
    text_len: int = 512                # text tokens the cross-attention reads (padded with zeros)
    text_dim: int = 4096               # width of the text features (umT5: 4096)
    in_dim: int = 16                   # channels of the model's input frames (Wan: latent channels; toy: RGB)
    out_dim: int = 16                  # channels of the predicted velocity
    patch_size: tuple = (1, 2, 2)      # (frames, height, width) per token
    eps: float = 1e-6                  # epsilon of the norms
    # autoregressive video
    frames_per_chunk: int = 3          # [RF] frames denoised together; attention is causal across chunks
    frame_size: tuple = (60, 104)      # (H, W) the sampler draws by default: 480x832 pixels / 8 (VAE stride)
    # Resampling Forcing (Algorithm 1)
    degrade: str = "autoregressive"    # history degradation: none | noise | parallel | autoregressive
    resample_shift: float = 0.6        # s of Eq. 7 for the simulation timestep t_s (paper: 0.6)
    resample_steps: int = 1            # Euler steps from t_s down to 0 (paper: 1)
    noise_aug_max: float = 0.1         # "noise" mode: history = x_tau with tau ~ U(0, noise_aug_max)
    train_t: str = "uniform"           # per-chunk training t: uniform | logit_normal, then shifted by train_shift
    train_shift: float = 1.0           # shift s of Eq. 7 applied to the training t (s > 1: more weight near noise)
    # sampling defaults (paper: 32 Euler steps, shift 5, CFG 5)
    sample_steps: int = 32             # Euler steps per chunk
    sample_shift: float = 5.0          # shift of the sampler's timestep grid
    sample_cfg: float = 5.0            # classifier-free guidance scale (1 = off)
    # history routing (section 3; the paper turns it on for its last fine-tuning stage with top_k=5)
    top_k: int | None = None           # [RF] each query reads its own chunk + the k best history chunks; None = dense
    window: int | None = None          # ablation: the last `window` history chunks instead of the top k
    sink: bool = False                 # ablation: always read history chunk 0 too (the "attention sink")

    def __post_init__(self):
        self.patch_size, self.frame_size = tuple(self.patch_size), tuple(self.frame_size)  # JSON gives lists
        for name in ("dim", "ffn_dim", "freq_dim", "num_heads", "num_layers", "text_len", "text_dim", "in_dim",
                     "out_dim", "patch_size", "frames_per_chunk", "frame_size", "resample_steps", "sample_steps"):
            value = getattr(self, name)
            if min(value if isinstance(value, tuple) else (value,)) < 1:
                raise ValueError(f"{name}={value} must be >= 1")
        for name in ("resample_shift", "train_shift", "sample_shift"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be > 0")
        if self.dim % self.num_heads or (self.dim // self.num_heads) % 2:
            raise ValueError(f"dim={self.dim} must split into num_heads={self.num_heads} heads of even width")
        if self.patch_size[0] != 1:
            raise ValueError("patch_size[0] must be 1: every frame carries its own noise level t")
        if self.degrade not in DEGRADE_MODES:
            raise ValueError(f"degrade={self.degrade!r}: choose one of {DEGRADE_MODES}")
        if self.train_t not in TRAIN_T:
            raise ValueError(f"train_t={self.train_t!r}: choose one of {TRAIN_T}")
        for name in ("top_k", "window"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1 (None = dense attention)")
        if self.top_k is not None and self.window is not None:
            raise ValueError(f"top_k={self.top_k} and window={self.window} are two routing rules: set only one")
        if self.sink and not self.routed:
            raise ValueError("sink=True adds chunk 0 to a routing rule: set top_k or window as well")

    @property
    def routed(self) -> bool:
        """History routing is on: a query reads its own chunk and a chosen few history chunks, not all of them."""
        return self.top_k is not None or self.window is not None


DEGRADE_MODES = ("none", "noise", "parallel", "autoregressive")
TRAIN_T = ("uniform", "logit_normal")

PRESETS = {
    # Sized for a 2-core CPU: 16x16 RGB frames (pixels are the "latents"), 4x4 patches -> 16 tokens per frame.
    # (32x32 frames cost 5x more per step and, in the same 10 minutes, learned less; 2x2 patches: 5.8x per step.)
    # NOTE(choice): training t shifted by 3 toward noise. Next-chunk prediction is learned at high t, where the
    # history is all the model has; shift 3 lifted the one-step prediction from history and every rollout metric
    # (README, "how the toy was tuned").
    "toy": dict(dim=128, ffn_dim=512, freq_dim=64, num_heads=4, num_layers=4, text_len=8, text_dim=64,
                in_dim=3, out_dim=3, patch_size=(1, 4, 4), frames_per_chunk=2, frame_size=(16, 16),
                train_shift=3.0, sample_steps=16, sample_shift=1.0, sample_cfg=3.0),
    # The real model: 1,418,996,800 parameters, 825 checkpoint keys.
    # NOTE(choice): the paper does not give the distribution of the training t. For Wan we follow Self-Forcing's
    # teacher forcing (uniform, shifted by 5 like the sampler), which keeps fine-tuning close to how Wan samples.
    "wan2.1-t2v-1.3b": dict(train_t="uniform", train_shift=5.0),
}


def preset(name: str, **overrides) -> Config:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}: choose one of {sorted(PRESETS)}")
    return Config(**{**PRESETS[name], **overrides})


# ----------------------------------------------------------------------------------------------------------------
# 2. Flow matching (rectified flow): x_t = (1 - t) x0 + t eps, v = eps - x0
# ----------------------------------------------------------------------------------------------------------------

def add_noise(x0, eps, t):
    """Eq. 3. x0, eps: (B, F, C, H, W); t: (B, F), one noise level per frame."""
    t = t[:, :, None, None, None]
    return (1 - t) * x0 + t * eps


def shift_t(t, s):
    """Eq. 7: t' = s t / (1 + (s - 1) t). s > 1 moves mass toward noise, s < 1 toward clean."""
    return s * t / (1 + (s - 1) * t)


@dataclass
class BatchSlice:
    """Rows `rows` of a batch of `batch` videos, computed apart from the others (a gradient-accumulation micro-batch,
    or one process's share under torchrun). It goes where a generator goes: every random draw (t, t_s, noise) is
    then made for the whole batch from `generator`, and only these rows are kept."""
    # NOTE(choice): the two usual ways to make a split batch draw what the whole batch would: seed a generator per
    # video from (seed, step, index), or draw the whole batch's randomness in every piece and slice it. We slice:
    # the numbers are then exactly those of the unsplit batch (one process, no accumulation is unchanged), at the
    # cost of drawing the batch's noise once per piece (cheap next to a forward).
    generator: torch.Generator
    batch: int
    rows: slice


def draw(fn, shape, generator=None):
    """fn(shape, generator=...) for fn = torch.rand or torch.randn, shape[0] the batch. With a BatchSlice: drawn for
    the whole batch, this slice's rows returned."""
    if isinstance(generator, BatchSlice):
        return fn((generator.batch, *shape[1:]), generator=generator.generator)[generator.rows]
    return fn(shape, generator=generator)


def logit_normal(shape, generator=None):
    """t = sigmoid(z), z ~ N(0, 1): mass in the middle of [0, 1], none at the ends."""
    return torch.sigmoid(draw(torch.randn, shape, generator))


def sample_train_t(cfg: Config, batch, num_chunks, generator=None):
    """Algorithm 1, line 6: one training t per chunk, independent across chunks. Returns (B, N)."""
    # NOTE(choice): the paper does not say how t^i is drawn. Toy: uniform. With logit-normal (SD3's choice) the
    # toy never learned t near 1 (0.2% of draws above 0.95), where every rollout starts, and sampled noise.
    # Wan preset: uniform shifted by 5 (Self-Forcing's teacher forcing; matches how Wan samples).
    if cfg.train_t == "logit_normal":
        u = logit_normal((batch, num_chunks), generator)
    else:
        u = draw(torch.rand, (batch, num_chunks), generator)
    return shift_t(u, cfg.train_shift)


def sampling_sigmas(steps, shift):
    """The Euler grid of the sampler: shift(1 - k / steps), k = 0..steps, from 1.0 (noise) to 0.0 (clean)."""
    return shift_t(torch.linspace(1, 0, steps + 1, dtype=torch.float64), shift).float()


def euler(velocity, x, sigmas):
    """Integrate dx/dt = v from sigmas[0] down to sigmas[-1] (Eq. 2). sigmas: (steps + 1, B), one grid per video.

    velocity(x, t) takes t of shape (B, F) and returns v of the shape of x."""
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        t = s[:, None].expand(x.shape[:2])                                          # (B, F)
        x = x + (s_next - s).view(-1, 1, 1, 1, 1) * velocity(x, t)
    return x


# ----------------------------------------------------------------------------------------------------------------
# 3. Who sees whom: one rule, one picture, several attention backends
# ----------------------------------------------------------------------------------------------------------------
# Every token belongs to a chunk and to a stream. The block-causal forward has one stream. The two-stream training
# forward [RF] lays out [history ; noisy]: the HISTORY stream holds the clean (or self-degraded) chunks at t = 0,
# the NOISY stream the chunks being denoised. One rule says which key a query may see; every backend (dense
# boolean mask for SDPA, flex_attention BlockMask, the KV cache) is an implementation of this rule.

HISTORY, NOISY = 0, 1


def may_attend(q_chunk, q_stream, k_chunk, k_stream):
    """Its own chunk in its own stream (bidirectional), plus every earlier chunk of the history stream.

    Block-causal (all tokens HISTORY): chunk i sees chunks <= i.
    Two-stream: H_j sees H_<=j; Z_i sees Z_i and H_<i -- never H_i (the answer) nor other noisy chunks.
    Works elementwise on tensors of ids, so the same function builds a dense mask and a flex_attention mask_mod.
    """
    own_chunk = (q_chunk == k_chunk) & (q_stream == k_stream)
    return own_chunk | clean_past(q_chunk, k_chunk, k_stream)


def clean_past(q_chunk, k_chunk, k_stream):
    """The second half of the rule: earlier chunks of the history stream. History routing [RF] narrows only this
    term (a query reads a chosen few of these chunks); its own chunk it always reads."""
    return (k_stream == HISTORY) & (k_chunk < q_chunk)


def _block_causal_layout(num_frames, fpc, device):
    """Chunk and stream id of every frame of the block-causal forward: one stream, chunk i = frames // fpc."""
    chunk = torch.arange(num_frames, device=device) // fpc
    return chunk, torch.full_like(chunk, HISTORY)


def dense_mask(chunk, stream):
    """(L,) chunk and stream id per token -> (L, L) boolean mask, True = may attend (SDPA's convention)."""
    return may_attend(chunk[:, None], stream[:, None], chunk[None, :], stream[None, :])


def mask_ascii(num_chunks: int, two_stream: bool = True) -> str:
    """The mask at chunk level, as printed in the README. `#` = attends, `.` = masked."""
    chunk = torch.arange(num_chunks)
    if two_stream:
        chunk, stream = torch.cat([chunk, chunk]), torch.tensor([HISTORY] * num_chunks + [NOISY] * num_chunks)
    else:
        stream = torch.zeros(num_chunks, dtype=torch.long)
    names = [("H" if s == HISTORY and two_stream else "Z" if two_stream else "C") + str(c + 1)
             for c, s in zip(chunk.tolist(), stream.tolist())]
    grid = dense_mask(chunk, stream)
    rows = ["q\\k " + " ".join(f"{n:>3}" for n in names)]
    rows += [f"{n:>3} " + " ".join(f"{'#' if a else '.':>3}" for a in row) for n, row in zip(names, grid.tolist())]
    return "\n".join(rows)


def attention(q, k, v, mask=None, phi=None):
    """Softmax attention with scale 1/sqrt(hd). q: (B, Lq, nh, hd), k, v: (B, Lk, nh, hd) -> (B, Lq, nh, hd).

    mask: None (all keys), a boolean (Lq, Lk) tensor (SDPA, any device; the CPU training path), a
    flex_attention BlockMask (CUDA; built from the same rule), or a Routing (history routing, below; phi holds the
    history chunks' mean keys)."""
    if isinstance(mask, Routing):                                                     # [RF]
        return routed_attention(q, k, v, phi, mask)
    q, k, v = (x.transpose(1, 2) for x in (q, k, v))                                 # (B, nh, L, hd)
    if isinstance(mask, BlockMask):
        out = kernels.flex_attention(q, k, v, mask)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return out.transpose(1, 2)


# --- History routing [RF] (Eqs. 8-9) ----------------------------------------------------------------------------
# A long video has many history chunks, and most of them matter little to a given query. With routing on, every
# query token, in every layer and head, scores each earlier history chunk j by q . phi_j (phi_j = mean of chunk j's
# keys) and reads its own chunk plus only the k best-scoring chunks. No parameters; no gradient through the choice.
# The sliding window and the attention sink are other answers to the same question ("which history chunks?"), so
# they share the path. Routing only narrows the rule's clean_past term; the own chunk is always read.
# Letters: Nh history chunks of T tokens each.

def chunk_means(k, chunk_tokens):
    """phi of Eq. 8, the mean key of each chunk. k: (B, Nh * T, nh, hd) -> (B, Nh, nh, hd) in fp32."""
    # NOTE(choice): the paper does not say whether phi pools the keys before or after q/k-RMSNorm and RoPE. We pool
    # them as they enter attention (after both, as MoBA does): then q . phi_j is exactly the mean attention logit of
    # q over chunk j's keys, so the router ranks chunks by the very scores attention would give them.
    return k.unflatten(1, (-1, chunk_tokens)).float().mean(2)


@torch.no_grad()                      # hard top-k has no gradient: only the attention over the chosen keys learns
def top_k_chunks(q, phi, eligible, k):
    """Eq. 9: per query token and head, the k eligible chunks with the highest q . phi_j (all of them if fewer).

    q: (B, Lq, nh, hd); phi: (B, Nh, nh, hd); eligible: (Lq, Nh) bool -> selected: (B, nh, Lq, Nh) bool."""
    # scores in fp32 (under bf16, near-equal chunks would be ranked by rounding); no 1/sqrt(hd): it changes no rank
    score = torch.einsum("bqhd,bjhd->bhqj", q.float(), phi.float())                   # (B, nh, Lq, Nh)
    score = score.masked_fill(~eligible, -torch.inf)
    best = score.sort(dim=-1, descending=True, stable=True).indices[..., :k]          # stable: ties -> earlier chunk
    return torch.zeros_like(score, dtype=torch.bool).scatter_(-1, best, True) & eligible


def window_chunks(eligible, w):
    """Sliding window: the last w eligible chunks of each query. (Lq, Nh) bool -> (Lq, Nh) bool."""
    later = eligible.flip(-1).cumsum(-1).flip(-1)                # (Lq, Nh) eligible chunks at index >= j
    return eligible & (later <= w)


def eligible_chunks(q_chunk, num_history):
    """(Lq, Nh) bool: the history chunks the rule's clean_past term lets each query read, those strictly before its
    chunk. Never a future chunk; never H_i for Z_i (its answer) -- the only chunks routing may choose from."""
    return clean_past(q_chunk[:, None], torch.arange(num_history, device=q_chunk.device)[None], HISTORY)


def route(q, phi, eligible, top_k=None, window=None, sink=False):
    """The history chunks each query token reads besides its own: (B, nh, Lq, Nh) bool. A pure function.

    eligible (Lq, Nh): the rule's clean_past term per query and history chunk (chunks strictly before the query's
    chunk). top_k: the paper's router; window: the last w chunks; sink: chunk 0 as well (never counted in k or w);
    none of them: every eligible chunk (dense)."""
    B, Nh, nh, _ = phi.shape
    if top_k is not None:
        selected = top_k_chunks(q, phi, eligible, top_k)
    else:
        selected = (window_chunks(eligible, window) if window is not None else eligible).expand(B, nh, -1, -1)
    if sink:
        selected = selected | (eligible & (torch.arange(Nh, device=eligible.device) == 0))
    return selected


@dataclass(eq=False)
class Routing:
    """The mask argument of a routed attention call: the layout the rule needs and the routing rule to apply.

    chunk, stream: (Lk,) ids of every key token, as for dense_mask; the queries are the last Lq of them (all of them
    in the two forwards, the current chunk against the KV cache). The keys open with num_history history chunks of
    chunk_tokens tokens each, in order (true of both forwards and of the cache), so chunk j's keys are one slice."""
    chunk: torch.Tensor
    stream: torch.Tensor
    chunk_tokens: int
    num_history: int
    top_k: int | None = None
    window: int | None = None
    sink: bool = False
    backend: str = "two_branch"        # sdpa (the reference: a dense mask) | two_branch | flex | varlen (torch's
                                       # varlen_attn, CUDA) | flash (flash-attn's varlen kernel, CUDA)
    log: "RoutingLog | None" = None


def routed_attention(q, k, v, phi, routing: Routing):
    """Attention over each query's own chunk plus the history chunks routed to it. q: (B, Lq, nh, hd); k, v:
    (B, Lk, nh, hd); phi: (B, Nh, nh, hd) the mean keys of the first Nh history chunks -> (B, Lq, nh, hd).

    Every backend computes the same thing, one softmax over the union of the keys the rule and the router allow."""
    # NOTE(choice): the paper does not say which layers route, nor whether the history-stream (H) queries of the
    # two-stream training forward route. Every layer and head routes, each on its own keys. H queries route too:
    # at sampling a finished chunk is re-encoded at t = 0 with its queries routed over its own history, and only
    # then are the H features in training the K/V the cache will hold (as in the dense model).
    Lq, Nh = q.shape[1], phi.shape[1]
    eligible = eligible_chunks(routing.chunk[-Lq:], Nh)                                          # (Lq, Nh)
    selected = route(q, phi, eligible, routing.top_k, routing.window, routing.sink)              # (B, nh, Lq, Nh)
    if routing.log is not None:
        routing.log.add(selected, eligible)
    if routing.backend == "two_branch":
        return two_branch_attention(q, k, v, selected, routing.chunk_tokens, kernels.two_branches)
    if routing.backend == "flex":
        return attention(q, k, v, kernels.flex_routed_mask(may_attend_routed, selected, routing.chunk,
                                                           routing.stream))
    if routing.backend in ("varlen", "flash"):
        return two_branch_attention(q, k, v, selected, routing.chunk_tokens, kernels.varlen_backend(routing.backend))
    return attention(q, k, v, routed_mask(selected, routing.chunk, routing.stream))


def may_attend_routed(q_chunk, q_stream, k_chunk, k_stream, chosen):
    """The rule with routing: what may_attend allows, except that a clean_past key needs its chunk to be chosen."""
    return may_attend(q_chunk, q_stream, k_chunk, k_stream) & (chosen | ~clean_past(q_chunk, k_chunk, k_stream))


def _chosen_per_key(selected, chunk):
    """selected (B, nh, Lq, Nh) indexed per key token: (padded table (B, nh, Lq, Nh + 1), column of each key (Lk,)).
    Keys of chunks >= Nh (never anyone's routed past) read the padding column, False."""
    return F.pad(selected, (0, 1)), chunk.clamp(max=selected.shape[-1])


def routed_mask(selected, chunk, stream):
    """The reference: routing as a dense boolean mask (B, nh, Lq, Lk) for SDPA. Small, obvious, O(Lq Lk) memory."""
    table, col = _chosen_per_key(selected, chunk)
    Lq = selected.shape[2]
    return may_attend_routed(chunk[-Lq:, None], stream[-Lq:, None], chunk[None], stream[None], table[..., col])


# The paper's fast path computes routed attention as two branches: each query against its own chunk, and each query
# against only its chosen history chunks. Each branch is an ordinary softmax that also returns its log-sum-exp
# (LSE), and the LSEs say how to weigh the two outputs so that together they are one softmax over the union.

def attention_lse(q, k, v, mask=None):
    """Softmax attention that also returns the log-sum-exp of its scaled scores (the public SDPA does not).
    q: (..., Lq, hd); k, v: (..., Lk, hd); mask: (..., Lq, Lk) bool or None -> o (..., Lq, hd), lse (..., Lq) fp32.
    A query with no key gets o = 0 and lse = -inf: it weighs nothing in a merge."""
    s = ((q * q.shape[-1] ** -0.5) @ k.transpose(-1, -2)).float()                     # (..., Lq, Lk)
    if mask is not None:
        s = s.masked_fill(~mask, -torch.inf)
    lse = s.logsumexp(-1)                                                             # (..., Lq)
    p = torch.exp(s - lse[..., None]).nan_to_num(0.0)                                 # rows with no key: 0, not nan
    return (p.to(v.dtype) @ v).float(), lse


def merge_lse(o_a, l_a, o_b, l_b):
    """Attentions over two disjoint key sets -> the attention over their union (the paper's two-branch merge).

    o: (..., hd), l: (...) log-sum-exp. One softmax over the union weighs branch a by e^l_a / (e^l_a + e^l_b).
    Subtracting the larger l first keeps every exponential <= 1. A branch with no keys (l = -inf) weighs 0."""
    top = torch.maximum(l_a, l_b).detach()                     # for stability only: the result does not depend on it
    w_a, w_b = torch.exp(l_a - top), torch.exp(l_b - top)                             # (...) one of them is 1
    total = w_a + w_b
    return (w_a[..., None] * o_a.float() + w_b[..., None] * o_b.float()) / total[..., None], top + total.log()


def plain_branches(q, k, v, selected, chunk_tokens):
    """The two branches, written plainly. q: (B, Lq, nh, hd); k, v: (B, Lk, nh, hd), opening with Nh history
    chunks of T tokens; selected: (B, nh, Lq, Nh) -> ((o, lse) own chunk, (o, lse) history), o (B, nh, Lq, hd)."""
    T, Lq, Nh = chunk_tokens, q.shape[1], selected.shape[-1]
    q, k, v = (x.transpose(1, 2) for x in (q, k, v))                                 # (B, nh, L, hd)
    own = [x[:, :, x.shape[2] - Lq:].unflatten(2, (-1, T)) for x in (q, k, v)]        # (B, nh, Lq / T, T, hd)
    o_own, l_own = attention_lse(*own)
    history = attention_lse(q, k[:, :, :Nh * T], v[:, :, :Nh * T], mask=selected.repeat_interleave(T, dim=-1))
    return (o_own.flatten(2, 3), l_own.flatten(2, 3)), history


def two_branch_attention(q, k, v, selected, chunk_tokens, branches=plain_branches):
    """Routed attention as the paper computes it: two branches merged through their LSEs -> (B, Lq, nh, hd).

    branches: plain_branches, or kernels.two_branches (the two_branch backend): the same numbers, computed tile by
    tile in bounded memory (tests/test_routing.py compares them, and both with the dense-mask reference)."""
    (o_own, l_own), (o_hist, l_hist) = branches(q, k, v, selected, chunk_tokens)      # (B, nh, Lq, hd / -)
    o, _ = merge_lse(o_own, l_own, o_hist, l_hist)
    return o.to(v.dtype).transpose(1, 2)


class RoutingLog:
    """Counts routing decisions while attached to a model (model.routing_log = RoutingLog()): per history chunk,
    how often it was eligible and how often selected, summed over every routed call, layer, head and query token."""

    def __init__(self):
        self.eligible = torch.zeros(0, dtype=torch.long)
        self.selected = torch.zeros(0, dtype=torch.long)

    def add(self, selected, eligible):
        B, nh = selected.shape[:2]
        new = selected.sum((0, 1, 2)).cpu(), eligible.sum(0).cpu() * B * nh          # (Nh,) each
        n = max(len(self.selected), len(new[0]))
        self.selected, self.eligible = (F.pad(old, (0, n - len(old))) + F.pad(x, (0, n - len(x)))
                                        for old, x in zip((self.selected, self.eligible), new))

    def frequency(self):
        """(Nh,) how often each history chunk was selected when it could have been (the paper's Fig. 8)."""
        return self.selected / self.eligible.clamp(min=1)

    def sparsity(self) -> float:
        """The fraction of eligible (query, history chunk) pairs not attended: 1 - k / Nh for top-k over Nh."""
        eligible = self.eligible.sum().item()
        return 1.0 - self.selected.sum().item() / eligible if eligible else 0.0


# ----------------------------------------------------------------------------------------------------------------
# 4. The Wan2.1 DiT
# ----------------------------------------------------------------------------------------------------------------
# Module names are the checkpoint's key names, so loading Wan weights is a key-for-key copy. Wan keeps some math in
# fp32 even under bf16 autocast ("fp32 islands"): time embedding, modulation, norms, gated residual adds, the head.

def _tokens(model, H, W):
    """Tokens per frame of size H x W."""
    return (H // model.cfg.patch_size[1]) * (W // model.cfg.patch_size[2])


def fp32(device_type):
    """Context that turns autocast off, so the enclosed math runs in the dtype of its (fp32) inputs."""
    return torch.autocast(device_type, enabled=False)


class LayerNorm(nn.LayerNorm):
    """Wan's LayerNorm: fp32 math, result in the input dtype."""
    def forward(self, x):
        return super().forward(x.float()).type_as(x)


class RMSNorm(nn.Module):
    """Wan's q/k norm: RMS over the full width D (all heads together), fp32 math, output in the input's dtype."""
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        # the last type_as matters in training: bf16 x (a Linear under autocast) times an fp32 weight would make q and
        # k fp32 while v is bf16, so attention would run in fp32 (Wan casts q, k, v to bf16 before its attention)
        return ((xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight).type_as(x)


def sinusoid(dim, t):
    """Wan's timestep sinusoid: [cos, sin] (cos first) in float64. t: any shape -> (*t.shape, dim)."""
    half = dim // 2
    freqs = torch.pow(10000, -torch.arange(half, dtype=torch.float64, device=t.device) / half)
    angles = t.double()[..., None] * freqs
    return torch.cat([angles.cos(), angles.sin()], dim=-1)


def rope_cos_sin(pos, h, w, head_dim):
    """3-D RoPE tables for tokens at frame positions `pos` (Ft,), rows 0..h-1, columns 0..w-1.

    Wan splits each head into temporal / height / width parts (44 / 42 / 42 of 128), each with its own
    frequencies base^(-2j/d), integer positions, angles in float64. Returns cos, sin of shape (L, 1, hd/2)."""
    d_hw = 2 * (head_dim // 6)
    d_t = head_dim - 2 * d_hw

    def angles(p, d):                                                                 # (len(p), d/2)
        return p.double()[:, None] * 10000.0 ** (-torch.arange(0, d, 2, dtype=torch.float64, device=p.device) / d)

    dev = pos.device
    a_t = angles(pos, d_t)[:, None, None, :].expand(len(pos), h, w, -1)
    a_h = angles(torch.arange(h, device=dev), d_hw)[None, :, None, :].expand(len(pos), h, w, -1)
    a_w = angles(torch.arange(w, device=dev), d_hw)[None, None, :, :].expand(len(pos), h, w, -1)
    a = torch.cat([a_t, a_h, a_w], dim=-1).flatten(0, 2)[:, None, :]                  # (L, 1, hd/2)
    return a.cos().float(), a.sin().float()


def apply_rope(x, cos, sin):
    """Rotate interleaved pairs (x[2i], x[2i+1]) by the angle table (Wan's complex layout, not NeoX halves)."""
    x1, x2 = x.float().unflatten(-1, (-1, 2)).unbind(-1)                              # (B, L, nh, hd/2) each
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2).type_as(x)


def modulate(x, shift, scale):
    """x * (1 + scale) + shift with one (shift, scale) per frame [RF]: x (B, L, D); shift, scale (B, Ft, 1, D).

    The frame axis is unflattened, so the modulation broadcasts over the frame's S tokens and is never copied
    per token."""
    return (x.unflatten(1, (shift.shape[1], -1)) * (1 + scale) + shift).flatten(1, 2)


def gate(y, g):
    """y * g per frame [RF]: y (B, L, D), g (B, Ft, 1, D)."""
    return (y.unflatten(1, (g.shape[1], -1)) * g).flatten(1, 2)


class SelfAttention(nn.Module):
    def __init__(self, dim, num_heads, eps):
        super().__init__()
        self.num_heads = num_heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q, self.norm_k = RMSNorm(dim, eps), RMSNorm(dim, eps)

    def forward(self, x, rope, mask, cache=None):
        q = self.norm_q(self.q(x)).unflatten(-1, (self.num_heads, -1))               # (B, L, nh, hd)
        k = self.norm_k(self.k(x)).unflatten(-1, (self.num_heads, -1))
        v = self.v(x).unflatten(-1, (self.num_heads, -1))
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        phi = None
        if isinstance(mask, Routing):                # [RF] history routing scores chunks by their mean keys
            phi = cache.mean_keys(k) if cache is not None else chunk_means(
                k[:, :mask.num_history * mask.chunk_tokens], mask.chunk_tokens)       # (B, Nh, nh, hd)
        if cache is not None:                        # [RF] prepend the finished chunks' keys (cached after RoPE)
            k, v = cache.extend(k, v)                                                  # (B, Lc + L, nh, hd)
        return self.o(attention(q, k, v, mask, phi).flatten(2))                       # (B, L, D)


class CrossAttention(nn.Module):
    def __init__(self, dim, num_heads, eps):
        super().__init__()
        self.num_heads = num_heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q, self.norm_k = RMSNorm(dim, eps), RMSNorm(dim, eps)

    def kv(self, context):
        """Text keys and values: they depend only on the prompt, so the sampler computes them once."""
        k = self.norm_k(self.k(context)).unflatten(-1, (self.num_heads, -1))          # (B, text_len, nh, hd)
        return k, self.v(context).unflatten(-1, (self.num_heads, -1))

    def forward(self, x, text_kv):
        q = self.norm_q(self.q(x)).unflatten(-1, (self.num_heads, -1))               # no RoPE, no mask
        return self.o(attention(q, *text_kv).flatten(2))


class Block(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        d = cfg.dim
        self.norm1 = LayerNorm(d, cfg.eps, elementwise_affine=False)
        self.self_attn = SelfAttention(d, cfg.num_heads, cfg.eps)
        self.norm3 = LayerNorm(d, cfg.eps, elementwise_affine=True)   # Wan's affine cross-attn norm is "norm3"
        self.cross_attn = CrossAttention(d, cfg.num_heads, cfg.eps)
        self.norm2 = LayerNorm(d, cfg.eps, elementwise_affine=False)
        self.ffn = nn.Sequential(nn.Linear(d, cfg.ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(cfg.ffn_dim, d))
        self.modulation = nn.Parameter(torch.randn(1, 6, d) / d**0.5)

    def forward(self, x, e0, rope, mask, text_kv, cache=None):
        # x: (B, L, D) residual stream (fp32); e0: (B, Ft, 6, D), one modulation input per frame [RF]
        with fp32(x.device.type):
            m = (self.modulation.unsqueeze(0) + e0).unsqueeze(3)                      # (B, Ft, 6, 1, D)
            shift_msa, scale_msa, gate_msa, shift_ffn, scale_ffn, gate_ffn = m.unbind(2)
        y = self.self_attn(modulate(self.norm1(x), shift_msa, scale_msa), rope, mask, cache)
        x = x + gate(y, gate_msa)
        x = x + self.cross_attn(self.norm3(x), text_kv)                              # no gate, no modulation
        y = self.ffn(modulate(self.norm2(x), shift_ffn, scale_ffn))
        return x + gate(y, gate_ffn)


class Head(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.norm = LayerNorm(cfg.dim, cfg.eps, elementwise_affine=False)
        self.head = nn.Linear(cfg.dim, cfg.out_dim * math.prod(cfg.patch_size))
        self.modulation = nn.Parameter(torch.randn(1, 2, cfg.dim) / cfg.dim**0.5)

    def forward(self, x, e):
        # e: (B, Ft, D), the time embedding *before* SiLU and projection; all in fp32, as Wan does
        with fp32(x.device.type):
            shift, scale = (self.modulation.unsqueeze(0) + e.float().unsqueeze(2)).unsqueeze(3).unbind(2)
            return self.head(modulate(self.norm(x.float()), shift, scale))


class DiT(nn.Module):
    """Wan2.1's text-to-video DiT, made causal over chunks with per-frame noise levels.

    forward(x, t, context)            block-causal: chunk i sees chunks <= i, each at its own t
    forward(x, t, context, history)   two-stream training forward of the paper [RF]
    forward_chunk(x, t, text_kv, cache, commit)   one chunk against a KV cache (sampling, self-resampling)
    """

    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        d = cfg.dim
        self.patch_embedding = nn.Conv3d(cfg.in_dim, d, cfg.patch_size, stride=cfg.patch_size)
        self.text_embedding = nn.Sequential(nn.Linear(cfg.text_dim, d), nn.GELU(approximate="tanh"), nn.Linear(d, d))
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, d), nn.SiLU(), nn.Linear(d, d))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.head = Head(cfg)
        self.grad_checkpointing = False      # recompute each block in backward: far less activation memory
        self.attn_backend = "auto"           # auto (flex on CUDA, SDPA elsewhere) | sdpa | flex, and for routed
                                             # models two_branch, which auto picks for them on every device,
                                             # or varlen | flash (the paper's varlen kernels, CUDA only)
        self.routing_log = None              # a RoutingLog here counts every routing decision (sparsity, Fig. 8)
        self.init_weights()

    def init_weights(self):
        """Wan's initialisation (what the toy trains from; real runs load the checkpoint instead)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.xavier_uniform_(self.patch_embedding.weight.flatten(1))
        for m in [*self.text_embedding, *self.time_embedding]:
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
        nn.init.zeros_(self.head.head.weight)

    # --- the shared body --------------------------------------------------------------------------------------

    def encode_text(self, context):
        """Text features (B, Lt, text_dim), Lt <= text_len -> per-layer cross-attention (K, V)."""
        if context.ndim != 3 or context.shape[-1] != self.cfg.text_dim or context.shape[1] > self.cfg.text_len:
            raise ValueError(f"context must be (B, <= {self.cfg.text_len}, {self.cfg.text_dim}), "
                             f"got {tuple(context.shape)}")
        # Wan zero-pads the text to text_len and attends to all of it, padding included (no mask)
        context = F.pad(context, (0, 0, 0, self.cfg.text_len - context.shape[1]))
        ctx = self.text_embedding(context)                                            # (B, text_len, D)
        return [block.cross_attn.kv(ctx) for block in self.blocks]

    def _forward(self, frames, t, pos, text_kv, mask, n_out, cache=None):
        """frames (B, Ft, C, H, W) at noise levels t (B, Ft), RoPE frame positions pos (Ft,).
        Returns the velocity of the last n_out frames, (B, n_out, C, H, W)."""
        B, Ft, C, H, W = frames.shape
        _, ph, pw = self.cfg.patch_size
        h, w = H // ph, W // pw
        x = self.patch_embedding(rearrange(frames, "b f c h w -> b c f h w"))          # (B, D, Ft, h, w)
        x = rearrange(x, "b d f h w -> b (f h w) d")                                  # (B, L, D)
        with fp32(x.device.type):
            e = self.time_embedding(sinusoid(self.cfg.freq_dim, 1000 * t).float())    # (B, Ft, D)  [RF] per frame
            e0 = self.time_projection(e).unflatten(-1, (6, self.cfg.dim))             # (B, Ft, 6, D)
        rope = rope_cos_sin(pos, h, w, self.cfg.dim // self.cfg.num_heads)
        for i, block in enumerate(self.blocks):
            layer_cache = cache.layers[i] if cache is not None else None
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, e0, rope, mask, text_kv[i], layer_cache, use_reentrant=False)
            else:
                x = block(x, e0, rope, mask, text_kv[i], layer_cache)
        x = self.head(x[:, -n_out * h * w:], e[:, -n_out:])                           # (B, n_out*h*w, ph*pw*C)
        return rearrange(x, "b (f h w) (ph pw c) -> b f c (h ph) (w pw)", f=n_out, h=h, ph=ph, pw=pw)

    def _mask(self, chunk, stream, tokens_per_frame):
        """The rule of section 3 for a layout given per frame, as the chosen backend's mask (None: no mask needed)."""
        if not self.cfg.routed and bool((chunk == chunk[0]).all() & (stream == stream[0]).all()):
            return None      # one chunk, one stream: every token sees every token (Wan's own bidirectional forward)
        chunk, stream = chunk.repeat_interleave(tokens_per_frame), stream.repeat_interleave(tokens_per_frame)
        backend = self.attn_backend
        if self.cfg.routed:                                                           # [RF] history routing
            # NOTE(choice): auto means two_branch on every device: flex works at the granularity of 128x128 blocks,
            # and per-token routing leaves few blocks that no query chose (see kernels.flex_routed_mask).
            T = self.cfg.frames_per_chunk * tokens_per_frame
            return Routing(chunk, stream, chunk_tokens=T, num_history=int((stream == HISTORY).sum()) // T,
                           top_k=self.cfg.top_k, window=self.cfg.window, sink=self.cfg.sink,
                           backend="two_branch" if backend == "auto" else backend, log=self.routing_log)
        if backend == "flex" or (backend == "auto" and chunk.is_cuda):
            return kernels.flex_block_mask(may_attend, tuple(chunk.tolist()), tuple(stream.tolist()), str(chunk.device))
        return dense_mask(chunk, stream)

    def _check(self, x, t):
        cfg = self.cfg
        if x.ndim != 5 or x.shape[2] != cfg.in_dim:
            raise ValueError(f"x must be (B, F, {cfg.in_dim}, H, W), got {tuple(x.shape)}")
        B, F_, _, H, W = x.shape
        if H % cfg.patch_size[1] or W % cfg.patch_size[2]:
            raise ValueError(f"frame size {H}x{W} is not divisible by the patch size {cfg.patch_size[1:]}: "
                             f"crop or resize frames to a multiple of it")
        if F_ % cfg.frames_per_chunk:
            raise ValueError(f"{F_} frames is not a multiple of frames_per_chunk={cfg.frames_per_chunk}")
        if tuple(t.shape) != (B, F_):
            raise ValueError(f"t must be (B, F) = ({B}, {F_}), one noise level per frame; got {tuple(t.shape)}")

    # --- the three entry points ------------------------------------------------------------------------------

    def forward(self, x, t, context, history=None):
        """x: (B, F, C, H, W) noisy frames at t: (B, F); context: (B, Lt, text_dim). Returns v: (B, F, C, H, W).

        history=None: block-causal. history (B, F, C, H, W): two-stream, the sequence [history ; x] [RF]."""
        self._check(x, t)
        B, F_, _, H, W = x.shape
        fpc, dev = self.cfg.frames_per_chunk, x.device
        if F_ > ROPE_LEN:
            raise ValueError(f"{F_} frames exceed the RoPE table ({ROPE_LEN} positions)")
        S = _tokens(self, H, W)
        text_kv = self.encode_text(context)
        chunk, stream = _block_causal_layout(F_, fpc, dev)     # one stream: the sequence is its own history
        if history is None:
            return self._forward(x, t, torch.arange(F_, device=dev), text_kv, self._mask(chunk, stream, S), n_out=F_)
        if history.shape != x.shape:
            raise ValueError(f"history must have the shape of x {tuple(x.shape)}, got {tuple(history.shape)}")
        Fh = F_ - fpc                  # [RF] the last history chunk would be seen by itself only: drop it
        frames = torch.cat([history[:, :Fh].to(x.dtype), x], dim=1)                   # (B, Fh + F, C, H, W)
        t_all = torch.cat([t.new_zeros(B, Fh), t], dim=1)                             # [RF] history at t = 0
        pos = torch.cat([torch.arange(Fh, device=dev), torch.arange(F_, device=dev)])  # [RF] H_j, Z_j share RoPE
        chunk_all = torch.cat([chunk[:Fh], chunk])
        stream = torch.cat([torch.full_like(chunk[:Fh], HISTORY), torch.full_like(chunk, NOISY)])
        return self._forward(frames, t_all, pos, text_kv, self._mask(chunk_all, stream, S), n_out=F_)

    def forward_chunk(self, x, t, text_kv, cache, commit=False):
        """One chunk x: (B, fpc, C, H, W) at t: (B, fpc), attending to itself and every chunk in the cache.

        Its keys and values are written into the cache's next slot; commit=True keeps them there (call it once a
        chunk is finished, at t = 0), otherwise the next call overwrites them. Returns v: (B, fpc, C, H, W)."""
        self._check(x, t)
        fpc = x.shape[1]
        if cache.frames + fpc > ROPE_LEN:
            raise ValueError(f"frame {cache.frames + fpc} is past the RoPE table ({ROPE_LEN} positions): "
                             f"generate at most {ROPE_LEN} frames")
        pos = torch.arange(cache.frames, cache.frames + fpc, device=x.device)
        # every cached key is an earlier chunk of the history stream, so the rule allows all keys: no mask,
        # unless routing [RF] narrows them (the layout is then the block-causal one of [cache ; this chunk])
        mask = None
        if self.cfg.routed:
            mask = self._mask(*_block_causal_layout(cache.frames + fpc, fpc, x.device), _tokens(self, *x.shape[-2:]))
        v = self._forward(x, t, pos, text_kv, mask=mask, n_out=fpc, cache=cache)
        if commit:
            cache.commit(fpc, tokens=fpc * _tokens(self, *x.shape[-2:]))
        return v


class LayerKV:
    """One layer's keys and values of finished chunks, in a buffer allocated once for the whole video, and [RF] the
    mean key of each finished chunk (phi of Eq. 8): computed once at commit, so routing a query costs Nh dot
    products per head instead of a pass over the whole history."""

    def __init__(self, max_tokens):
        self.max_tokens, self.length, self.k, self.v = max_tokens, 0, None, None
        self.chunks, self.phi = 0, None

    # Eager under torch.compile (kernels.compile_blocks): a traced graph can keep a stale value of the Python ints
    # below instead of re-reading them (a known failure of KV caches under compile).
    @torch.compiler.disable
    def extend(self, k, v):
        """Write this chunk's (B, L, nh, hd) K/V after the committed ones; return committed + this chunk."""
        if self.k is None:
            self.k = k.new_zeros(k.shape[0], self.max_tokens, *k.shape[2:])
            self.v = torch.zeros_like(self.k)
        end = self.length + k.shape[1]
        self.k[:, self.length:end], self.v[:, self.length:end] = k, v
        return self.k[:, :end], self.v[:, :end]

    def commit(self, tokens):
        """Keep the chunk written last (its `tokens` K/V) and store its mean key."""
        if self.phi is None:
            B, _, nh, hd = self.k.shape
            self.phi = self.k.new_zeros(B, self.max_tokens // tokens, nh, hd, dtype=torch.float)
        self.phi[:, self.chunks] = chunk_means(self.k[:, self.length:self.length + tokens], tokens)[:, 0]
        self.length += tokens
        self.chunks += 1

    @torch.compiler.disable
    def mean_keys(self, k):
        """(B, chunks, nh, hd) mean keys of the committed chunks; k: this chunk's keys, for the empty-cache shape."""
        if self.phi is None:
            return k.new_zeros(k.shape[0], 0, *k.shape[2:], dtype=torch.float)
        return self.phi[:, :self.chunks]


class KVCache:
    """The KV cache of chunk-by-chunk sampling: per layer, keys (after RoPE) and values of finished chunks."""

    def __init__(self, model: DiT, max_frames, frame_size):
        self.layers = [LayerKV(max_frames * _tokens(model, *frame_size)) for _ in range(model.cfg.num_layers)]
        self.frames = 0                                   # committed frames = next chunk's first RoPE position

    def commit(self, frames, tokens):
        for layer in self.layers:
            layer.commit(tokens)
        self.frames += frames


# ----------------------------------------------------------------------------------------------------------------
# 5. Sampling
# ----------------------------------------------------------------------------------------------------------------

def _randn(shape, generator, device):
    # noise is drawn on the CPU from a seeded generator: the same seed gives the same video on every device
    return draw(torch.randn, shape, generator).to(device)


def _randn_like(x, generator):
    """Gaussian noise of x's shape, device and dtype, drawn as _randn does."""
    return _randn(x.shape, generator, x.device).to(x.dtype)


def _check_generate(cfg, B, num_frames, prefix, H, W):
    """generate's arguments, each mistake a one-line ValueError that says what to pass instead."""
    fpc, P = cfg.frames_per_chunk, 0 if prefix is None else prefix.shape[1]
    if H % cfg.patch_size[1] or W % cfg.patch_size[2]:
        raise ValueError(f"frame size {H}x{W} is not divisible by the patch size {cfg.patch_size[1:]}: "
                         f"pass a size that is a multiple of it")
    if prefix is not None and (prefix.ndim != 5 or prefix.shape[0] != B or prefix.shape[2] != cfg.in_dim
                               or tuple(prefix.shape[-2:]) != (H, W)):
        raise ValueError(f"prefix must be (B, P, C, H, W) = ({B}, P, {cfg.in_dim}, {H}, {W}), "
                         f"got {tuple(prefix.shape)}")
    if num_frames % fpc or P % fpc:
        raise ValueError(f"num_frames={num_frames} and prefix frames={P} must be multiples of "
                         f"frames_per_chunk={fpc}")
    if not P < num_frames <= ROPE_LEN:
        raise ValueError(f"num_frames={num_frames} must exceed the prefix ({P}) and be at most the RoPE table "
                         f"length {ROPE_LEN}")


@torch.no_grad()
def generate(model: DiT, context, num_frames, *, steps=None, shift=None, cfg_scale=None, neg_context=None,
             prefix=None, size=None, seed=0, use_cache=True, progress=None):
    """Generate a video chunk by chunk. Returns (B, num_frames, C, H, W); num_frames includes the prefix.

    context: (B, Lt, text_dim) prompt features; neg_context: the unconditional prompt's features (needed when
    cfg_scale != 1); steps, shift, cfg_scale: default cfg.sample_*; prefix: (B, P, C, H, W) clean frames to continue
    from (P a multiple of the chunk); size: (H, W), default the prefix's or cfg.frame_size; progress: optional
    callable(chunk_index) called per finished chunk.
    use_cache=True keeps each finished chunk's K/V (re-encoded once at t = 0); use_cache=False recomputes the
    block-causal forward over [finished chunks at t = 0 ; current chunk] at every step. Both give the same frames.
    """
    cfg, fpc = model.cfg, model.cfg.frames_per_chunk
    steps = cfg.sample_steps if steps is None else steps
    shift = cfg.sample_shift if shift is None else shift
    cfg_scale = cfg.sample_cfg if cfg_scale is None else cfg_scale
    device = next(model.parameters()).device
    B = context.shape[0]
    P = 0 if prefix is None else prefix.shape[1]
    H, W = size or (prefix.shape[-2:] if prefix is not None else cfg.frame_size)
    _check_generate(cfg, B, num_frames, prefix, H, W)
    guided = cfg_scale != 1.0
    if guided:
        if neg_context is None:
            raise ValueError("cfg_scale != 1 needs neg_context (the unconditional prompt's features)")
        context = torch.cat([context, neg_context.expand(B, -1, -1)])   # [cond ; uncond] in one batch
    text_kv = model.encode_text(context)                                 # once per prompt
    gen = torch.Generator().manual_seed(seed)
    sigmas = sampling_sigmas(steps, shift).to(device)[:, None].expand(-1, B)         # (steps + 1, B)
    video = [] if prefix is None else list(prefix.to(device).split(fpc, dim=1))       # chunks of (B, fpc, C, H, W)
    cache = KVCache(model, num_frames, (H, W)) if use_cache else None
    both = (lambda x: torch.cat([x, x])) if guided else (lambda x: x)  # the two CFG branches see the same frames

    def velocity(x, t):
        if use_cache:
            v = model.forward_chunk(both(x), both(t), text_kv, cache)
        else:
            past = torch.cat(video + [x], dim=1)
            t_all = torch.cat([t.new_zeros(B, past.shape[1] - fpc), t], dim=1)   # finished chunks at t = 0
            v = model._forward(both(past), both(t_all), torch.arange(past.shape[1], device=device), text_kv,
                               model._mask(*_block_causal_layout(past.shape[1], fpc, device), _tokens(model, H, W)),
                               n_out=fpc)
        if not guided:
            return v
        v_cond, v_uncond = v.chunk(2)
        return v_uncond + cfg_scale * (v_cond - v_uncond)

    zeros = torch.zeros(B, fpc, device=device)
    if use_cache:
        for chunk in video:                                              # clean prefix: straight into the cache
            model.forward_chunk(both(chunk), both(zeros), text_kv, cache, commit=True)
    for i in range(P // fpc, num_frames // fpc):
        x = _randn((B, fpc, cfg.in_dim, H, W), gen, device)
        x = euler(velocity, x, sigmas)
        video.append(x)
        if use_cache and i < num_frames // fpc - 1:                      # re-encode the finished chunk at t = 0
            model.forward_chunk(both(x), both(zeros), text_kv, cache, commit=True)
        if progress:
            progress(i)
    return torch.cat(video, dim=1)


# ----------------------------------------------------------------------------------------------------------------
# 6. Training: Resampling Forcing (Algorithm 1)
# ----------------------------------------------------------------------------------------------------------------

def resample_sigmas(t_s, steps, device):
    """The Euler grid of self-resampling, from each video's t_s (B,) down to 0 -> (steps + 1, B)."""
    # NOTE(choice): with more than one step, the grid is uniform from t_s to 0 (the paper uses 1 step).
    return t_s.to(device)[None] * torch.linspace(1, 0, steps + 1, device=device)[:, None]


@torch.no_grad()
def resample_autoregressive(model: DiT, clip, context, t_s, steps=1, generator=None):
    """Eq. 5, autoregressive self-resampling: x~^i = x^i_{t_s} denoised to t = 0 conditioned on x~^{<i}.

    clip: (B, F, C, H, W) ground truth; t_s: (B,) one simulation timestep per video. Chunk by chunk with the KV
    cache, online weights, no gradient: the same chunk step the sampler uses, started from x_{t_s} instead of noise,
    with `steps` Euler steps and no CFG. The last chunk is never anyone's history, so it is returned unchanged."""
    B, F_, C, H, W = clip.shape
    fpc = model.cfg.frames_per_chunk
    text_kv = model.encode_text(context)
    cache = KVCache(model, F_ - fpc, (H, W))
    sigmas = resample_sigmas(t_s, steps, clip.device)                                # (steps + 1, B)
    ts = sigmas[0][:, None].expand(B, fpc)
    out = clip.clone()
    for i in range(F_ // fpc - 1):
        x0 = clip[:, i * fpc:(i + 1) * fpc]
        x = add_noise(x0, _randn_like(x0, generator), ts)  # fresh noise, not the loss's
        x = euler(lambda x, t: model.forward_chunk(x, t, text_kv, cache), x, sigmas)
        model.forward_chunk(x, torch.zeros_like(ts), text_kv, cache, commit=True)    # write x~^i at t = 0
        out[:, i * fpc:(i + 1) * fpc] = x
    return out


@torch.no_grad()
def degrade_history(model: DiT, clip, context, mode, generator=None):
    """The history the noisy chunks are conditioned on. Returns (B, F, C, H, W).

    none            teacher forcing: the ground truth
    noise           Gaussian noise augmentation: x_tau, tau ~ U(0, noise_aug_max) per video
    parallel        every chunk resampled from x_{t_s} at once, conditioned on ground-truth history
    autoregressive  the method: chunk i resampled conditioned on the already resampled chunks < i
    """
    cfg = model.cfg
    B, F_ = clip.shape[:2]
    if mode == "none":
        return clip
    if mode == "noise":
        tau = draw(torch.rand, (B, 1), generator).expand(B, F_).to(clip.device) * cfg.noise_aug_max
        return add_noise(clip, _randn_like(clip, generator), tau)
    # Algorithm 1, lines 2-3: one simulation timestep per video, logit-normal, shifted with s < 1 toward clean
    t_s = shift_t(logit_normal((B,), generator), cfg.resample_shift)                 # (B,)
    if mode == "autoregressive":
        return resample_autoregressive(model, clip, context, t_s, cfg.resample_steps, generator)
    if mode == "parallel":
        sigmas = resample_sigmas(t_s, cfg.resample_steps, clip.device)                # (steps + 1, B)
        x = add_noise(clip, _randn_like(clip, generator), sigmas[0][:, None].expand(B, F_))
        return euler(lambda x, t: model(x, t, context, history=clip), x, sigmas)
    raise ValueError(f"unknown degrade mode {mode!r}: choose one of {DEGRADE_MODES}")


def training_loss(model: DiT, clip, context, mode=None, generator=None):
    """One Resampling Forcing (or teacher forcing) loss. clip: (B, F, C, H, W) clean; context: (B, Lt, text_dim).

    generator: every random draw comes from it; a BatchSlice when clip is a slice of a larger batch (gradient
    accumulation, several processes), so the slice gets the draws it would get in the whole batch.
    Returns (loss, chunk_loss (B, N), chunk_t (B, N)); the last two are detached, for logging by noise level."""
    cfg, fpc = model.cfg, model.cfg.frames_per_chunk
    B, F_ = clip.shape[:2]
    N = F_ // fpc
    history = degrade_history(model, clip, context, mode or cfg.degrade, generator)   # lines 2-5 (no grad)
    t = sample_train_t(cfg, B, N, generator).to(clip.device)                          # line 6: (B, N)
    t_frames = t.repeat_interleave(fpc, dim=1)                                        # (B, F)
    eps = _randn_like(clip, generator)
    v = model(add_noise(clip, eps, t_frames), t_frames, context, history=history)     # line 7: one forward
    err = (v.float() - (eps - clip).float()).pow(2).mean(dim=(2, 3, 4))               # (B, F); target: GT always
    chunk_loss = err.unflatten(1, (N, fpc)).mean(2)                                   # (B, N)
    return chunk_loss.mean(), chunk_loss.detach(), t
