"""
rf.py -- Resampling Forcing, the whole method in one file.

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
    3. Who sees whom: the one mask rule, its ASCII picture, its attention backends, history routing
    4. The Wan2.1 DiT with per-frame noise conditioning, two forwards and a cached chunk forward
    5. Sampling: generate (chunk by chunk, Euler, CFG, KV cache)
    6. Training: self-resampling and the loss (Algorithm 1)
    7. The toy caption encoder; saving and loading
    8. Wan2.1 weights: the diffusers key rename, load_wan (file, folder or hub id), the text encoder and the
       VAE (umT5 and Wan's VAE, from transformers and diffusers), a memory estimate

Conventions (fixed everywhere below)
    B batch, F frames, C channels, H x W frame size (Wan: latent frames, 8x smaller than pixels; toy: pixels)
    N chunks, L tokens, S tokens per frame, D model width, nh heads, hd head width
    video tensors are (B, F, C, H, W); noise levels are per frame, t: (B, F), equal within a chunk
    t in [0, 1], t = 0 clean, t = 1 pure noise; x_t = (1 - t) x0 + t eps; the model predicts v = eps - x0
    a "chunk" is frames_per_chunk consecutive frames generated together (the paper calls it a "frame")
    lines tagged [RF] are where this model departs from Wan2.1; `grep -n "\\[RF\\]" rf.py` lists the diff
"""

import html
import importlib
import json
import math
import os
import shutil
from dataclasses import asdict, dataclass, fields
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention
from torch.utils.checkpoint import checkpoint

ROPE_LEN = 1024  # Wan's RoPE table holds 1024 positions per axis: the longest video is 1024 (latent) frames


# ----------------------------------------------------------------------------------------------------------------
# 1. Config and presets
# ----------------------------------------------------------------------------------------------------------------

@dataclass
class Config:
    # Wan2.1 DiT, with the field names of Wan's config.json
    dim: int = 1536
    ffn_dim: int = 8960
    freq_dim: int = 256
    num_heads: int = 12
    num_layers: int = 30
    text_len: int = 512
    text_dim: int = 4096
    in_dim: int = 16
    out_dim: int = 16
    patch_size: tuple = (1, 2, 2)
    eps: float = 1e-6
    # autoregressive video
    frames_per_chunk: int = 3          # [RF] frames denoised together; attention is causal across chunks
    frame_size: tuple = (60, 104)      # (H, W) the sampler draws by default: 480x832 pixels / 8 (VAE stride)
    # Resampling Forcing (Algorithm 1)
    degrade: str = "autoregressive"    # history degradation: none | noise | parallel | autoregressive
    resample_shift: float = 0.6        # s of Eq. 7 for the simulation timestep t_s (paper: 0.6)
    resample_steps: int = 1            # Euler steps from t_s down to 0 (paper: 1)
    noise_aug_max: float = 0.1         # "noise" mode: history = x_tau with tau ~ U(0, noise_aug_max)
    train_t: str = "uniform"           # per-chunk training t: uniform | logit_normal, then shifted by train_shift
    train_shift: float = 1.0
    # sampling defaults (paper: 32 Euler steps, shift 5, CFG 5)
    sample_steps: int = 32
    sample_shift: float = 5.0
    sample_cfg: float = 5.0
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
        if self.train_t not in ("logit_normal", "uniform"):
            raise ValueError(f"train_t={self.train_t!r}: choose logit_normal or uniform")
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

PRESETS = {
    # Sized for a 2-core CPU: 16x16 RGB frames (pixels are the "latents"), 4x4 patches -> 16 tokens per frame.
    # (32x32 frames cost 5x more per step and, in the same 10 minutes, learned less.)
    "toy": dict(dim=128, ffn_dim=512, freq_dim=64, num_heads=4, num_layers=4, text_len=8, text_dim=64,
                in_dim=3, out_dim=3, patch_size=(1, 4, 4), frames_per_chunk=2, frame_size=(16, 16),
                sample_steps=16, sample_shift=1.0, sample_cfg=3.0),
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


@lru_cache(maxsize=16)
def flex_block_mask(chunk: tuple, stream: tuple, device: str) -> BlockMask:
    """The same rule as a flex_attention BlockMask (CUDA fast path). Cached: building it is not free, and the key
    holds the whole layout, so a new length or resolution can never reuse a stale mask."""
    c = torch.tensor(chunk, device=device)
    s = torch.tensor(stream, device=device)

    def mask_mod(b, h, q, k):
        return may_attend(c[q], s[q], c[k], s[k])

    return block_mask(mask_mod, None, None, len(chunk), len(chunk), device)


@lru_cache(maxsize=None)
def compiled(fn, **options):
    """torch.compile(fn, **options), made once. Only the CUDA fast paths use it."""
    return torch.compile(fn, **options)


def block_mask(mask_mod, B, H, Lq, Lk, device: str) -> BlockMask:
    """create_block_mask, compiled on CUDA. Eager, it evaluates mask_mod on the whole (Lq, Lk) grid at once: 6.2 GB
    at 25k tokens (measured on a CPU), so some 35 GB at the 61k tokens of Wan's two-stream training forward.
    Compiled, mask_mod is fused into the per-block reduction (0.4 GB there), and the blocks come out the same."""
    return (compiled(create_block_mask) if device.startswith("cuda") else create_block_mask)(
        mask_mod, B, H, Lq, Lk, device=device)


def attention(q, k, v, mask=None, phi=None):
    """Softmax attention with scale 1/sqrt(hd). q: (B, Lq, nh, hd), k, v: (B, Lk, nh, hd) -> (B, Lq, nh, hd).

    mask: None (all keys), a boolean (Lq, Lk) tensor (SDPA, any device; the CPU training path), a
    flex_attention BlockMask (CUDA; built from the same rule), or a Routing (history routing, below; phi holds the
    history chunks' mean keys)."""
    if isinstance(mask, Routing):                                                     # [RF]
        return routed_attention(q, k, v, phi, mask)
    q, k, v = (x.transpose(1, 2) for x in (q, k, v))                                 # (B, nh, L, hd)
    if isinstance(mask, BlockMask):
        out = (compiled(flex_attention, dynamic=False) if q.is_cuda else flex_attention)(q, k, v, block_mask=mask)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return out.transpose(1, 2)


# --- History routing [RF] (Eqs. 8-9) ----------------------------------------------------------------------------
# A long video has many history chunks, and most of them matter little to a given query. With routing on, every
# query token, in every layer and head, scores each earlier history chunk j by q . phi_j (phi_j = mean of chunk j's
# keys) and reads its own chunk plus only the k best-scoring chunks. No parameters; no gradient through the choice.
# The sliding window and the attention sink are other answers to the same question ("which history chunks?"), so
# they share the path. Routing only narrows the rule's clean_past term; the own chunk is always read.
# Letters: Nh history chunks of T tokens each; P selected (query, chunk) pairs.

# SDPA's fused CPU kernel, which also returns the LSE (see attention_lse); a private op, so None if a torch lacks it
_FUSED_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
MAX_TILE = 1024     # most queries per tile in the two-branch history matmul (see history_branch)
TILE_OVERHEAD = 32  # the fixed cost of a tile, in query rows (measured on a CPU; see tile_size)
SLAB_SCORES = 2**26  # most attention scores a two-branch call holds at once (256 MB in fp32; see in_slabs)


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
    backend: str = "two_branch"        # sdpa (the reference: a dense mask) | two_branch | flex
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
        return two_branch_attention(q, k, v, selected, routing.chunk_tokens)
    if routing.backend == "flex":
        return attention(q, k, v, flex_routed_mask(selected, routing.chunk, routing.stream))
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


def flex_routed_mask(selected, chunk, stream) -> BlockMask:
    """The same mask as a flex_attention BlockMask (per batch and head). Key blocks no query of a query block chose
    are skipped; with per-token routing most blocks have some taker, so the saving is coarser than two_branch's."""
    table, col = _chosen_per_key(selected, chunk)
    B, nh, Lq, _ = selected.shape
    q_chunk, q_stream = chunk[-Lq:], stream[-Lq:]

    def mask_mod(b, h, q, k):
        return may_attend_routed(q_chunk[q], q_stream[q], chunk[k], stream[k], table[b, h, q, col[k]])

    return block_mask(mask_mod, B, nh, Lq, len(chunk), str(chunk.device))


def attention_lse(q, k, v):
    """Plain softmax attention that also returns the log-sum-exp of its scaled scores (what a merge needs; the public
    SDPA does not return it). q: (..., Lq, hd); k, v: (..., Lk, hd) -> o (..., Lq, hd), lse (..., Lq) in fp32."""
    fits_fused = _FUSED_CPU is not None and q.dtype == k.dtype == v.dtype and q.shape[-1] == v.shape[-1]
    if q.device.type == "cpu" and not torch.is_grad_enabled() and fits_fused:
        # sampling on a CPU: SDPA's own fused CPU kernel, which returns the LSE too (its LSE has no gradient,
        # so only without autograd). The same numbers as below (tests compare), without the (Lq, Lk) scores.
        o, lse = _FUSED_CPU(*(x.reshape(-1, 1, *x.shape[-2:]) for x in (q, k, v)))
        return o.view(*q.shape[:-1], -1), lse.view(q.shape[:-1])
    s = ((q * q.shape[-1] ** -0.5) @ k.transpose(-1, -2)).float()                     # (..., Lq, Lk)
    top = s.amax(-1, keepdim=True).detach()                    # for stability only: the result does not depend on it
    p = s.sub_(top).exp_()                                     # in place: the score matrix is the big tensor here
    total = p.sum(-1, keepdim=True)                                                   # (..., Lq, 1)
    return (p.to(v.dtype) @ v) / total, (top + total.log()).squeeze(-1)


def merge_lse(o_a, l_a, o_b, l_b):
    """Attentions over two disjoint key sets -> the attention over their union (the paper's two-branch merge).

    o: (..., hd), l: (...) log-sum-exp. One softmax over the union weighs branch a by e^l_a / (e^l_a + e^l_b).
    Subtracting the larger l first keeps every exponential <= 1. A branch with no keys (l = -inf) weighs 0."""
    top = torch.maximum(l_a, l_b).detach()                     # for stability only: the result does not depend on it
    w_a, w_b = torch.exp(l_a - top), torch.exp(l_b - top)                             # (...) one of them is 1
    total = w_a + w_b
    return (w_a[..., None] * o_a.float() + w_b[..., None] * o_b.float()) / total[..., None], top + total.log()


def merge_lse_many(o, lse, index, n):
    """merge_lse over many branches at once: row p of o (P, hd), lse (P,) is one branch of output index[p].
    -> o (n, hd), lse (n,); an output with no branch gets o = 0, lse = -inf (so it weighs 0 in merge_lse)."""
    top = lse.new_full((n,), -torch.inf).scatter_reduce(0, index, lse.detach(), "amax")  # (n,) max per output
    w = torch.exp(lse - top[index])                                                   # (P,) in (0, 1]
    total = w.new_zeros(n).index_add(0, index, w).clamp(min=1e-30)                    # (n,) clamp: no 0/0
    out = o.new_zeros(n, o.shape[-1], dtype=w.dtype).index_add(0, index, w[:, None] * o.float())
    return out / total[:, None], top + total.log()


def tile_pairs(group, num_groups, tile):
    """Cut pairs sorted by group (P,) into tiles of at most `tile` pairs, never mixing groups.
    -> tile of each pair (P,), its slot in the tile (P,), group of each tile (n_tiles,)."""
    count = torch.bincount(group, minlength=num_groups)                              # (G,) pairs per group
    rank = torch.arange(len(group), device=group.device) - (count.cumsum(0) - count)[group]  # (P,) place in group
    tiles = (count + tile - 1) // tile                                                # (G,) tiles per group
    pair_tile = (tiles.cumsum(0) - tiles)[group] + rank // tile
    return pair_tile, rank % tile, torch.repeat_interleave(torch.arange(num_groups, device=group.device), tiles)


def history_branch(q, k, v, selected):
    """Each query against the history chunks it selected and nothing else. q: (B, Lq, nh, hd); k, v: (B, Nh T, nh,
    hd); selected: (B, nh, Lq, Nh) -> o (B, nh, Lq, hd), lse (B, nh, Lq); lse = -inf where nothing was selected.

    The P selected (query, chunk) pairs are grouped by the key block they read, (b, h, j), and cut into tiles of at
    most `tile` queries (tile_size): each tile is one small dense attention, its queries against the T keys of its
    block, all tiles in one batched call. Scores and compute scale with P, not with Nh; what does grow with Nh is
    the copy of every block some query chose (per-token routing leaves few unchosen)."""
    B, Lq, nh, hd = q.shape
    b, h, j, i = selected.transpose(2, 3).nonzero(as_tuple=True)                      # (P,) each, sorted by (b, h, j)
    if len(i) == 0:
        return q.new_zeros(B, nh, Lq, v.shape[-1], dtype=torch.float), q.new_full((B, nh, Lq), -torch.inf,
                                                                                  dtype=torch.float)
    Nh = selected.shape[-1]
    T = k.shape[1] // Nh
    group = (b * nh + h) * Nh + j                                                     # (P,) the key block it reads
    tile = tile_size(torch.bincount(group))
    pair_tile, slot, tile_group = tile_pairs(group, B * nh * Nh, tile)
    n = len(tile_group)
    row = pair_tile * tile + slot                                                     # (P,) row among the tiles' rows
    # gathers are index_select on tables of hd-wide rows (several times faster on a CPU than advanced indexing)
    qt = q.new_zeros(n * tile, hd).index_copy_(0, row, q.reshape(-1, hd).index_select(0, (b * Lq + i) * nh + h))
    tb, th, tj = tile_group // (nh * Nh), tile_group // Nh % nh, tile_group % Nh      # (n,) each tile's key block
    key_row = (tj[:, None] * T + torch.arange(T, device=q.device)) * nh + th[:, None]  # (n, T) rows of k[tb]

    def tiles(qt, tb, key_row):                 # some tiles' queries against their blocks' keys, gathered here
        return attention_lse(qt, gather_rows(k, tb, key_row), gather_rows(v, tb, key_row))

    o_t, l_t = in_slabs(tiles, SLAB_SCORES // (tile * T), qt.view(n, tile, hd), tb, key_row)  # (n, tile, hd / -)
    o, lse = merge_lse_many(o_t.flatten(0, 1).index_select(0, row), l_t.flatten().index_select(0, row),
                            (b * nh + h) * Lq + i, B * nh * Lq)
    return o.view(B, nh, Lq, -1), lse.view(B, nh, Lq)


def in_slabs(fn, per_slab, *xs):
    """fn(*xs), run on slabs of per_slab rows of every x (dim 0) and concatenated, so that its temporaries (the
    attention scores) stay bounded: at Wan's size all of them at once would take tens of GB per layer. With
    autograd each slab is checkpointed: backward recomputes its scores one slab at a time instead of keeping all."""
    n, per_slab = len(xs[0]), max(1, per_slab)
    if n <= per_slab:
        return fn(*xs)
    parts = []
    for lo in range(0, n, per_slab):
        slab = [x[lo:lo + per_slab] for x in xs]
        parts.append(checkpoint(fn, *slab, use_reentrant=False) if torch.is_grad_enabled() else fn(*slab))
    return tuple(torch.cat(outputs) for outputs in zip(*parts))


def gather_rows(x, tb, rows):
    """x: (B, L, nh, hd); tb: (n,) batch index; rows: (n, R) rows of x[tb] seen as an (L nh, hd) table -> (n, R, hd).

    One index_select on a view of x's rows, without copying x. Where x is a slice of the KV cache's buffer, batch
    b's rows start x.stride(0) / hd rows after batch b - 1's (not L nh): the view spans the unused rows between
    batches too, and the index never points at them."""
    B, L, nh, hd = x.shape
    if x.stride()[1:] != (nh * hd, hd, 1) or x.stride(0) % hd:
        x = x.contiguous()                                     # rows not on that grid (e.g. an expanded tensor)
    sB = x.stride(0) // hd
    table = x.as_strided(((B - 1) * sB + L * nh, hd), (hd, 1))
    return table.index_select(0, (tb[:, None] * sB + rows).flatten()).view(*rows.shape, hd)


def tile_size(count):
    """Queries per tile for groups of count (G,) queries. Every tile costs its padded rows plus a fixed overhead (the
    copy of its key block, the call): of the multiples of 16 up to MAX_TILE, take the size with the least total."""
    size = torch.arange(16, MAX_TILE + 1, 16, device=count.device)                   # (S,) candidates
    tiles = ((count[:, None] + size - 1) // size).sum(0)                             # (S,) tiles needed at each size
    return size[(tiles * (size + TILE_OVERHEAD)).argmin()].item()


def two_branch_attention(q, k, v, selected, chunk_tokens):
    """The paper's fast path: an intra-chunk branch (each query against its own chunk) and a history branch (each
    query against its selected chunks only), merged through their log-sum-exp. Pure PyTorch, any device.

    q: (B, Lq, nh, hd); k, v: (B, Lk, nh, hd), opening with Nh history chunks; selected: (B, nh, Lq, Nh)."""
    T, (B, Lq, nh, _), Nh = chunk_tokens, q.shape, selected.shape[-1]

    def own_chunks(x):      # the queries are whole chunks at the end of the keys, their own keys at the same places
        return x.transpose(1, 2)[:, :, x.shape[1] - Lq:].reshape(-1, T, x.shape[-1])    # (B nh Lq / T, T, hd)

    o_own, l_own = in_slabs(attention_lse, SLAB_SCORES // T**2, *(own_chunks(x) for x in (q, k, v)))
    o_hist, l_hist = history_branch(q, k[:, :Nh * T], v[:, :Nh * T], selected)        # (B, nh, Lq, hd / -)
    o, _ = merge_lse(o_own.view(B, nh, Lq, -1), l_own.view(B, nh, Lq), o_hist, l_hist)  # (B, nh, Lq, hd)
    return o.to(v.dtype).transpose(1, 2)                                              # (B, Lq, nh, hd)


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
                                             # models two_branch, which auto picks for them on every device
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
            # and per-token routing leaves few blocks that no query chose (see flex_routed_mask).
            T = self.cfg.frames_per_chunk * tokens_per_frame
            return Routing(chunk, stream, chunk_tokens=T, num_history=int((stream == HISTORY).sum()) // T,
                           top_k=self.cfg.top_k, window=self.cfg.window, sink=self.cfg.sink,
                           backend="two_branch" if backend == "auto" else backend, log=self.routing_log)
        if backend == "flex" or (backend == "auto" and chunk.is_cuda):
            return flex_block_mask(tuple(chunk.tolist()), tuple(stream.tolist()), str(chunk.device))
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


def _block_causal_layout(num_frames, fpc, device):
    """Chunk and stream id of every frame of the block-causal forward: one stream, chunk i = frames // fpc."""
    chunk = torch.arange(num_frames, device=device) // fpc
    return chunk, torch.full_like(chunk, HISTORY)


def _tokens(model, H, W):
    """Tokens per frame of size H x W."""
    return (H // model.cfg.patch_size[1]) * (W // model.cfg.patch_size[2])


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


# ----------------------------------------------------------------------------------------------------------------
# 7. The toy caption encoder; saving and loading
# ----------------------------------------------------------------------------------------------------------------

class CaptionEncoder(nn.Module):
    """Stands in for umT5 in the toy: token ids (B, Lt) -> features (B, Lt, text_dim), zero at padding (id 0).

    One small transformer layer, so a colour can bind to the shape after it. Zeroing the padded rows mirrors
    Wan's zero-padded text; the empty caption (all padding) is the unconditional prompt of CFG."""

    def __init__(self, vocab_size, text_dim, text_len):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, text_dim)
        self.pos = nn.Parameter(torch.randn(text_len, text_dim) * 0.02)
        self.layer = nn.TransformerEncoderLayer(text_dim, nhead=2, dim_feedforward=2 * text_dim,
                                                dropout=0.0, batch_first=True, norm_first=True)

    def forward(self, ids):
        x = self.layer(self.embed(ids) + self.pos[: ids.shape[1]])
        return x * (ids != 0).unsqueeze(-1)


def save_checkpoint(path, tensors: dict, meta: dict):
    """Write a self-describing checkpoint folder: `{name}.safetensors` for each group of tensors and meta.json
    (config, training state). Written under a temporary name and renamed into place, so a crash mid-save never
    leaves a half-written checkpoint under the real name."""
    from safetensors.torch import save_file
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name, group in tensors.items():
        save_file({k: v.detach().contiguous().cpu() for k, v in group.items()}, str(tmp / f"{name}.safetensors"))
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    for f in tmp.iterdir():                                   # on disk before the rename makes it visible
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)


def load_checkpoint(path):
    """Read a checkpoint folder -> (meta dict, {group name: {key: tensor}}). Never unpickles anything."""
    from safetensors.torch import load_file
    path = Path(path)
    if not (path / "meta.json").is_file():
        raise FileNotFoundError(f"no checkpoint at {path} (expected {path}/meta.json): pass a folder written by "
                                f"train.py (e.g. runs/toy/latest after python train.py) or a shipped one "
                                f"(checkpoints/toy_tf, checkpoints/toy_ar_s0.6)")
    try:
        meta = json.loads((path / "meta.json").read_text())
        tensors = {f.stem: load_file(str(f)) for f in sorted(path.glob("*.safetensors"))}
    except Exception as e:
        raise ValueError(f"checkpoint {path} is corrupt ({type(e).__name__}: {e}); use an earlier one") from None
    return meta, tensors


def check_state_keys(own: dict, state: dict, what="weights",
                     hint="Build the model with the config saved next to these weights."):
    """own, state: {key: shape} of the model and of the weights. A ValueError names every missing, unexpected or
    mis-shaped key. Shapes only, so a model on the meta device and unread file headers can be checked."""
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: checkpoint {tuple(state[k])} vs model {tuple(own[k])}"
              for k in own if k in state and tuple(state[k]) != tuple(own[k])]
    if missing or unexpected or shapes:
        def few(xs):
            return ", ".join(xs[:5]) + (f" (+{len(xs) - 5} more)" if len(xs) > 5 else "")
        problems = [f"missing {few(missing)}" if missing else "", f"unexpected {few(unexpected)}" if unexpected else "",
                    f"wrong shape {few(shapes)}" if shapes else ""]
        raise ValueError(f"{what} do not match the model: " + "; ".join(p for p in problems if p) + ". " + hint)


def load_state_strict(module: nn.Module, state: dict, what="weights"):
    """load_state_dict(strict=True) with an error that names every missing, unexpected or mis-shaped key."""
    check_state_keys({k: v.shape for k, v in module.state_dict().items()}, {k: v.shape for k, v in state.items()},
                     what)
    module.load_state_dict(state, strict=True)


def config_from_dict(d: dict) -> Config:
    names = {f.name for f in fields(Config)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"unknown config keys {unknown}: this checkpoint was written by a different version of rf.py")
    return Config(**d)


def config_to_dict(cfg: Config) -> dict:
    return asdict(cfg)


# ----------------------------------------------------------------------------------------------------------------
# 8. Wan2.1 weights: key names, loading, a memory estimate
# ----------------------------------------------------------------------------------------------------------------
# Our module names are those of Wan's own checkpoint (Wan-AI/Wan2.1-T2V-1.3B), so loading it is a key-for-key copy.
# diffusers' WanTransformer3DModel (Wan-AI/Wan2.1-T2V-1.3B-Diffusers) holds the same tensors under other names: a
# pure rename, no transpose, split or reshape (shared/notes/wan.md, section 5). Both hubs store fp32 (5.7 GB).

# Module names, Wan -> diffusers. A key is a module name + ".weight" / ".bias", or the name of a bare parameter.
WAN_TO_DIFFUSERS = {
    "time_embedding.0": "condition_embedder.time_embedder.linear_1",
    "time_embedding.2": "condition_embedder.time_embedder.linear_2",
    "time_projection.1": "condition_embedder.time_proj",
    "text_embedding.0": "condition_embedder.text_embedder.linear_1",
    "text_embedding.2": "condition_embedder.text_embedder.linear_2",
    "head.modulation": "scale_shift_table",                    # (1, 2, D): the head's shift, scale
    "head.head": "proj_out",
}                                                              # patch_embedding: the same name in both
WAN_TO_DIFFUSERS_BLOCK = {                                     # inside blocks.{i}.
    "modulation": "scale_shift_table",                         # (1, 6, D), same order in both
    "self_attn.q": "attn1.to_q", "self_attn.k": "attn1.to_k", "self_attn.v": "attn1.to_v",
    "self_attn.o": "attn1.to_out.0", "self_attn.norm_q": "attn1.norm_q", "self_attn.norm_k": "attn1.norm_k",
    "cross_attn.q": "attn2.to_q", "cross_attn.k": "attn2.to_k", "cross_attn.v": "attn2.to_v",
    "cross_attn.o": "attn2.to_out.0", "cross_attn.norm_q": "attn2.norm_q", "cross_attn.norm_k": "attn2.norm_k",
    "norm3": "norm2",       # the affine cross-attention LayerNorm is Wan's norm3 and diffusers' norm2 ...
    "norm2": "norm3",       # ... a swap (the FFN's norm has no parameters in either, but the rename must invert)
    "ffn.0": "ffn.net.0.proj", "ffn.2": "ffn.net.2",
}
DIFFUSERS_TO_WAN = {v: k for k, v in WAN_TO_DIFFUSERS.items()}
DIFFUSERS_TO_WAN_BLOCK = {v: k for k, v in WAN_TO_DIFFUSERS_BLOCK.items()}
SINGLE_FILE_PREFIX = "model.diffusion_model."   # some single-file exports (ComfyUI) put Wan's keys under it
DIT_WEIGHTS = "diffusion_pytorch_model.safetensors"   # the DiT's file name in both hub layouts
DIT_HUB_FILES = ["config.json", "diffusion_pytorch_model*.safetensors*",                  # original layout
                 "transformer/config.json", "transformer/diffusion_pytorch_model*.safetensors*"]  # diffusers


def _rename(key, top, block):
    """Rename one key by its module: [blocks.{i}.]{module}[.weight|.bias]. A module not in the table keeps its name,
    so a stray key reaches the strict check below and is named there as unexpected."""
    prefix, rest, table = "", key, top
    if key.startswith("blocks.") and key.count(".") >= 2:
        i, rest = key[len("blocks."):].split(".", 1)
        prefix, table = f"blocks.{i}.", block
    module, dot, leaf = rest.rpartition(".")
    if leaf not in ("weight", "bias"):                        # a bare parameter: modulation, scale_shift_table
        module, dot, leaf = rest, "", ""
    return prefix + table.get(module, module) + dot + leaf


def diffusers_to_wan_key(name: str) -> str:
    """diffusers' key -> Wan's, e.g. blocks.0.attn2.to_out.0.weight -> blocks.0.cross_attn.o.weight."""
    return _rename(name, DIFFUSERS_TO_WAN, DIFFUSERS_TO_WAN_BLOCK)


def wan_to_diffusers_key(name: str) -> str:
    """Wan's key -> diffusers', e.g. blocks.0.norm3.weight -> blocks.0.norm2.weight."""
    return _rename(name, WAN_TO_DIFFUSERS, WAN_TO_DIFFUSERS_BLOCK)


def _is_diffusers_key(name):
    return (name.startswith(("condition_embedder.", "proj_out.", "scale_shift_table"))
            or ".attn1." in name or ".attn2." in name or name.endswith(".scale_shift_table"))


def wan_key_names(keys):
    """A checkpoint's keys -> ({file key: our key}, layout "original" | "diffusers").

    Strips a leading `model.diffusion_model.` (as diffusers' single-file loader does) and renames diffusers keys.
    The layout is decided once per checkpoint, never per key: norm2 and norm3 name different modules in the two."""
    stripped = {k: k.removeprefix(SINGLE_FILE_PREFIX) for k in keys}
    diffusers = any(_is_diffusers_key(k) for k in stripped.values())
    names = {k: diffusers_to_wan_key(s) if diffusers else s for k, s in stripped.items()}
    seen, twice = set(), set()
    for n in names.values():
        (twice if n in seen else seen).add(n)
    if twice:                                          # e.g. a file holding both layouts: one would be dropped
        raise ValueError(f"several keys of the checkpoint map to the same name ({', '.join(sorted(twice)[:5])}): "
                         f"it mixes the original and the diffusers layouts")
    return names, "diffusers" if diffusers else "original"


def keeps_fp32(name: str) -> bool:
    """Parameters of Wan's fp32 islands: time embedding and projection, modulation tables, the affine cross-attention
    norm and the head. The DiT's forward runs these with autocast off on fp32 inputs, so they must be fp32."""
    return (name.startswith(("time_embedding.", "time_projection.", "head."))
            or name.endswith("modulation") or ".norm3." in name)


def _param_dtype(name, dtype):
    # NOTE(choice): "everything in dtype" would be simplest, but the DiT's fp32 islands (section 4) feed fp32 inputs to
    # these layers with autocast off, and would fail on bf16 weights. So with a 16-bit dtype they stay fp32, like
    # diffusers' _keep_in_fp32_modules; they are ~17M of the 1.3B parameters. The rest runs under bf16 autocast.
    return torch.float32 if dtype.is_floating_point and dtype.itemsize < 4 and keeps_fp32(name) else dtype


# --- where the weights are --------------------------------------------------------------------------------------

def _dit_files(folder: Path):
    """The DiT weight files of a folder: one file, or the shards its diffusers index lists."""
    index = folder / (DIT_WEIGHTS + ".index.json")
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise FileNotFoundError(f"{index} lists shards that are not there: {', '.join(missing)}: the download is "
                                    f"incomplete; fetch the folder again")
        return [folder / s for s in shards]
    if (folder / DIT_WEIGHTS).is_file():
        return [folder / DIT_WEIGHTS]
    raise FileNotFoundError(f"no DiT weights in {folder}: expected {DIT_WEIGHTS} (original layout, or diffusers' "
                            f"transformer/ folder), its shards with {index.name}, or a transformer/ subfolder")


def _is_repo_id(source: str) -> bool:
    """owner/name, as on the hub (a path that does not exist may look like one: the error then says both)."""
    parts = source.split("/")
    ok = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")
    return len(parts) == 2 and all(p and set(p) <= ok and not p.startswith(".") for p in parts)


def _download(repo_id: str, patterns=DIT_HUB_FILES, then="load_wan('{name}')") -> Path:
    """Fetch only the files of a hub repo that match `patterns` (default: the DiT's weights and config), with
    huggingface_hub's progress bars and cache. `then`: how to use a local copy, for the offline message."""
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import RepositoryNotFoundError
    except ImportError:
        raise ImportError(f"{repo_id!r} is not a local path, and fetching it from the hub needs huggingface_hub: "
                          f"pip install huggingface_hub") from None
    # huggingface_hub reads HF_HUB_OFFLINE once, at import; reading it here too honours it when it is set later
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=offline))
    except RepositoryNotFoundError:
        raise ValueError(f"{repo_id!r} is neither a local path nor a model on the Hugging Face Hub (if it is private, "
                         f"log in with `hf auth login`)") from None
    except Exception as e:                 # offline, no connection, a hub error: huggingface_hub has many types
        why = ("HF_HUB_OFFLINE is set and it is not in the local cache" if offline
               else f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}")
        name, include = repo_id.split("/")[1], " ".join(f"--include '{p}'" for p in patterns)
        raise ConnectionError(
            f"could not reach the Hugging Face Hub for {repo_id!r} ({why}), and there is no local path of that name. "
            f"Download it where there is internet (hf download {repo_id} {include} --local-dir {name}) and pass "
            f"that folder: {then.format(name=name)}") from None


def find_wan_files(source):
    """-> (weight files, their config.json or None). source: a weights file, a folder in either layout (for
    diffusers: the repo root or its transformer/ folder), or a hub repo id (owner/name)."""
    path = Path(source).expanduser()
    if path.is_file():
        if path.suffix not in (".safetensors", ".pth", ".pt", ".bin"):
            raise ValueError(f"{path}: expected a .safetensors, .pth, .pt or .bin weights file, or a folder")
        return [path], None           # a lone file: a config.json beside it need not be its own, so none is read
    if not path.is_dir() and _is_repo_id(str(source)):
        path = _download(str(source))
    if not path.is_dir():
        raise FileNotFoundError(f"no file or folder {path}, and {str(source)!r} is not a hub repo id (owner/name)")
    if (path / "transformer").is_dir():                       # the diffusers repo root
        path = path / "transformer"
    config = path / "config.json"
    return _dit_files(path), config if config.is_file() else None


# --- the config beside the weights -----------------------------------------------------------------------------

WAN_CONFIG_FIELDS = ("dim", "ffn_dim", "freq_dim", "num_heads", "num_layers", "text_len", "text_dim", "in_dim",
                     "out_dim", "patch_size", "eps")                  # Wan's config.json uses our field names
DIFFUSERS_CONFIG_FIELDS = {"num_attention_heads": "num_heads", "ffn_dim": "ffn_dim", "num_layers": "num_layers",
                           "in_channels": "in_dim", "out_channels": "out_dim", "text_dim": "text_dim",
                           "freq_dim": "freq_dim", "patch_size": "patch_size", "eps": "eps"}
# settings our DiT has no switch for: Wan2.1 text-to-video, as Wan's and diffusers' configs spell them
WAN_FIXED = {"model_type": "t2v", "qk_norm": True, "cross_attn_norm": True, "window_size": (-1, -1)}
DIFFUSERS_FIXED = {"qk_norm": "rms_norm_across_heads", "cross_attn_norm": True, "image_dim": None,
                   "added_kv_proj_dim": None, "rope_max_seq_len": ROPE_LEN, "pos_embed_seq_len": None}


def diffusers_wan_config(cfg: Config) -> dict:
    """cfg as the keyword arguments of diffusers' WanTransformer3DModel (the same model, its field names)."""
    return dict(patch_size=cfg.patch_size, num_attention_heads=cfg.num_heads,
                attention_head_dim=cfg.dim // cfg.num_heads, in_channels=cfg.in_dim, out_channels=cfg.out_dim,
                text_dim=cfg.text_dim, freq_dim=cfg.freq_dim, ffn_dim=cfg.ffn_dim, num_layers=cfg.num_layers,
                eps=cfg.eps)


def check_wan_config(raw: dict, cfg: Config, where="config.json"):
    """A checkpoint's config.json (Wan's or diffusers' field names) against cfg; a ValueError names every field
    that disagrees. Fields the file does not have are not checked (the key and shape check still is)."""
    def same(a, b):
        return (tuple(a) if isinstance(a, list) else a) == (tuple(b) if isinstance(b, list) else b)

    if "num_attention_heads" in raw:                                  # diffusers
        ours = {f: (o, getattr(cfg, o)) for f, o in DIFFUSERS_CONFIG_FIELDS.items()}
        ours["attention_head_dim"] = ("dim/num_heads", cfg.dim // cfg.num_heads)
        fixed = DIFFUSERS_FIXED
    else:
        ours, fixed = {f: (f, getattr(cfg, f)) for f in WAN_CONFIG_FIELDS}, WAN_FIXED
    wrong = [f"{f}={raw[f]!r} (model: {o}={v!r})" for f, (o, v) in ours.items() if f in raw and not same(raw[f], v)]
    unsupported = [f"{f}={raw[f]!r} (rf has only {v!r})" for f, v in fixed.items() if f in raw and not same(raw[f], v)]
    if wrong or unsupported:
        raise ValueError(f"{where} disagrees with the model being built: {'; '.join(wrong + unsupported)}. "
                         + ("Pass the checkpoint's sizes as overrides, e.g. load_wan(source, num_layers=...), or use "
                            "the checkpoint of the preset's model." if wrong else
                            "rf implements the Wan2.1 text-to-video DiT only."))


# --- reading tensors --------------------------------------------------------------------------------------------

SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def _torch_load(path):
    """A .pth / .pt / .bin state dict, read safely."""
    # safe loading: weights_only=True rebuilds tensors and plain containers only, never arbitrary pickled objects,
    # so a file from the internet cannot run code; mmap=True maps the file instead of reading it all into memory
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        raise ValueError(f"{path} is not a plain state dict that loads with weights_only=True ({type(e).__name__}: "
                         f"{(str(e).splitlines() or [''])[0]}); rf never unpickles arbitrary objects: re-save it "
                         f"with torch.save(model.state_dict(), path) or as safetensors") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} does not hold a flat {{name: tensor}} state dict")
    return state


def tensor_index(files, device, stack):
    """{key: (shape, file dtype, load)} from the file headers: nothing is read yet; load() reads one tensor onto
    device. stack: a contextlib.ExitStack that keeps the safetensors files open until the caller is done."""
    from safetensors import safe_open
    index = {}
    for path in files:
        if path.suffix == ".safetensors":
            f = stack.enter_context(safe_open(str(path), framework="pt", device=str(device)))
            part = {}
            for k in f.keys():
                s = f.get_slice(k)
                part[k] = (tuple(s.get_shape()), SAFETENSORS_DTYPES.get(s.get_dtype(), s.get_dtype()),
                           lambda f=f, k=k: f.get_tensor(k))
        else:
            part = {k: (tuple(v.shape), v.dtype, lambda v=v: v.to(device)) for k, v in _torch_load(path).items()}
        twice = sorted(index.keys() & part.keys())
        if twice:
            raise ValueError(f"{path} repeats keys of another shard ({', '.join(twice[:5])})")
        index.update(part)
    return index


def load_wan(source, dtype=torch.bfloat16, device="cpu", preset_name="wan2.1-t2v-1.3b", **config_overrides) -> DiT:
    """Wan2.1's DiT weights -> our DiT on `device`, parameters in `dtype` (the fp32 islands' in fp32, below).

    source: a weights file (.safetensors in either layout, or a .pth / .pt / .bin state dict); a folder in the
    original layout (diffusion_pytorch_model.safetensors + config.json) or the diffusers layout (the repo root or
    its transformer/ folder, one file or shards + index); or a hub repo id (Wan-AI/Wan2.1-T2V-1.3B,
    Wan-AI/Wan2.1-T2V-1.3B-Diffusers), of which only the DiT's files are downloaded.
    The model is preset(preset_name, **config_overrides). A config.json beside the weights must agree with it, and
    the checkpoint must hold exactly its keys and shapes: both are checked before a single tensor is read.
    With a 16-bit dtype, run the model under torch.autocast(device_type, dtype=dtype)."""
    from contextlib import ExitStack
    cfg = preset(preset_name, **config_overrides)
    device = torch.device(device)
    files, config_json = find_wan_files(source)
    if config_json is not None:
        check_wan_config(json.loads(config_json.read_text()), cfg, where=str(config_json))
    with torch.device("meta"):
        model = DiT(cfg)                                      # shapes only: no memory, no init
    with ExitStack() as stack:
        index = tensor_index(files, device, stack)
        # Wan's checkpoints are fp32; bf16 / fp16 files load as well. fp8 / int files are quantised: their scales
        # live in other keys, and a plain cast would give wrong weights.
        odd = sorted({(str(dt), k) for k, (_, dt, _) in index.items() if dt not in SAFETENSORS_DTYPES.values()})
        if odd:
            raise ValueError(f"{source} holds {odd[0][0]} tensors (e.g. {odd[0][1]}): quantised checkpoints are not "
                             f"supported; use Wan's fp32 (or a bf16 / fp16) checkpoint")
        names, layout = wan_key_names(index)
        renamed = ", keys renamed to Wan's" if layout == "diffusers" else ""
        check_state_keys({k: v.shape for k, v in model.state_dict().items()},
                         {names[k]: shape for k, (shape, _, _) in index.items()},
                         what=f"the weights in {source} ({layout} layout{renamed})",
                         hint=f"Pass the preset ({preset_name}) and overrides of the model these weights are for.")
        # tensor by tensor, cast on the way: peak memory ~ one copy of the weights in the target dtype. (On the CPU
        # in the file's own dtype there is no copy at all: safetensors maps the file, copy-on-write.)
        state = {names[k]: load().to(device=device, dtype=_param_dtype(names[k], dtype))
                 for k, (_, _, load) in index.items()}
    model.load_state_dict(state, strict=True, assign=True)    # the meta parameters are replaced by these tensors
    left_on_meta = [n for n, p in [*model.named_parameters(), *model.named_buffers()] if p.is_meta]
    if left_on_meta:
        raise RuntimeError(f"load_wan left {left_on_meta[:3]} on the meta device: a bug in rf.py")
    in_file = "/".join(sorted({str(dt).removeprefix("torch.") for _, dt, _ in index.values()}))
    print(f"load_wan: {sum(p.numel() for p in model.parameters()):,} parameters from {source} ({layout} layout, "
          f"{in_file} in the file) -> {str(dtype).removeprefix('torch.')} on {device}"
          + (" (fp32 islands in float32)" if dtype.itemsize < 4 else ""))
    return model


# --- the text encoder and the VAE --------------------------------------------------------------------------------
# Not re-implemented here: transformers' UMT5EncoderModel with its tokenizer, and diffusers' AutoencoderKLWan, read
# from the diffusers layout of the Wan repo (tokenizer/, text_encoder/, vae/). Imported only when used.

WAN_PARTS_REPO = "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"      # the repo that has all of them in the diffusers layout
WAN_FPS = 16                                             # Wan's sample_fps: the frame rate it was trained on
WAN_NEGATIVE_PROMPT = (                                  # Wan's sample_neg_prompt: CFG's unconditional prompt
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，JPEG压缩残留，丑陋的，"
    "残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，静止不动的画面，杂乱的背景，"
    "三条腿，背景人很多，倒着走")
WAN_PART_FILES = {"tokenizer": "tokenizer_config.json", "text_encoder": "config.json", "vae": "config.json"}


def _need(module):
    """Import a package only the Wan path needs, or stop with the one line that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(f"the Wan text encoder and VAE need {module}: pip install transformers 'diffusers>=0.35'"
                          ) from None


def wan_part(source, part) -> Path:
    """The folder of one part (tokenizer, text_encoder or vae) of a Wan model in the diffusers layout. source: the
    repo root (a local folder, or a hub id of which only that part is downloaded), or the part's own folder."""
    path = Path(source).expanduser()
    if not path.exists() and _is_repo_id(str(source)):
        path = _download(str(source), [f"{part}/*"], then=f"pass that folder (it holds {part}/)")
    for folder in (path / part, path):
        if (folder / WAN_PART_FILES[part]).is_file():
            return folder
    raise FileNotFoundError(f"no {part}/ folder (with {WAN_PART_FILES[part]}) in {source}: the text encoder and the "
                            f"VAE load from the diffusers layout of Wan, e.g. {WAN_PARTS_REPO} or a local copy of it")


def load_wan_text_encoder(source, dtype=torch.float32, device="cpu"):
    """-> (tokenizer, umT5 encoder), frozen, from tokenizer/ and text_encoder/ of a Wan repo in the diffusers layout.
    Wan runs umT5 in bf16 on the GPU; on the CPU keep fp32."""
    transformers = _need("transformers")
    tokenizer = transformers.AutoTokenizer.from_pretrained(wan_part(source, "tokenizer"))
    encoder = transformers.UMT5EncoderModel.from_pretrained(wan_part(source, "text_encoder"), dtype=dtype)
    return tokenizer, encoder.to(device).eval().requires_grad_(False)


@torch.no_grad()
def encode_prompts(tokenizer, encoder, prompts, text_len):
    """Prompts -> Wan's text features (B, text_len, text_dim) in fp32, and each prompt's real token count (B,).

    Wan's recipe: tidy the text, tokenize with EOS and truncation at text_len, run umT5 with the padding masked, keep
    the real tokens' features (EOS included) and zero-pad them to text_len. Tokens are padded on the right, so
    zeroing the padded rows is the trim and the pad in one."""
    # NOTE(choice): Wan also runs ftfy.fix_text (it repairs mis-decoded unicode); we skip it, to need one package less.
    prompts = [" ".join(html.unescape(html.unescape(p)).split()) for p in prompts]   # Wan's whitespace_clean
    tokenizer.padding_side = "right"
    tokens = tokenizer(prompts, padding="max_length", max_length=text_len, truncation=True, add_special_tokens=True,
                       return_attention_mask=True, return_tensors="pt")
    device = next(encoder.parameters()).device
    mask = tokens.attention_mask.to(device)                                            # (B, text_len) 1 = real
    features = encoder(tokens.input_ids.to(device), attention_mask=mask).last_hidden_state
    return (features * mask[..., None]).float(), mask.sum(1).cpu()                     # (B, text_len, text_dim)


def load_wan_vae(source, device="cpu"):
    """diffusers' AutoencoderKLWan from vae/ of a Wan repo in the diffusers layout, frozen, in fp32 (as diffusers
    recommends for this VAE)."""
    diffusers = _need("diffusers")
    vae = diffusers.AutoencoderKLWan.from_pretrained(wan_part(source, "vae"), torch_dtype=torch.float32,
                                                     low_cpu_mem_usage=False)    # 0.5 GB: no need for accelerate
    if getattr(vae.config, "patch_size", None):
        raise ValueError(f"the VAE in {source} patchifies its input (Wan2.2's): rf supports Wan2.1's VAE")
    return vae.to(device).eval().requires_grad_(False)


def vae_strides(vae):
    """(temporal, spatial) compression of the VAE: (4, 8) for Wan2.1."""
    config = vae.config
    return getattr(config, "scale_factor_temporal", None) or 4, getattr(config, "scale_factor_spatial", None) or 8


def latent_frames(frames, frames_per_chunk, temporal=4):
    """Video frames -> latent frames. The VAE makes 1 + k latent frames of 1 + 4k video frames (81 -> 21), and the
    DiT wants whole chunks of latent frames. A ValueError that names the nearest valid count otherwise."""
    ok = [1 + temporal * (n - 1) for n in range(frames_per_chunk, ROPE_LEN + 1, frames_per_chunk)]
    if frames not in ok:
        near = min(ok, key=lambda f: abs(f - frames))
        raise ValueError(f"{frames} frames: Wan's VAE takes 1 + {temporal}k frames (giving 1 + k latent frames) and "
                         f"the model whole chunks of {frames_per_chunk} latent frames, i.e. {ok[0]}, {ok[1]}, "
                         f"{ok[2]}, ... frames: use {near}")
    return 1 + (frames - 1) // temporal


def _latent_stats(vae, like):
    """Wan's per-channel latent mean and std, shaped to broadcast over (B, F, C, H, W)."""
    mean, std = (torch.tensor(getattr(vae.config, n), dtype=like.dtype, device=like.device).view(1, 1, -1, 1, 1)
                 for n in ("latents_mean", "latents_std"))
    return mean, std


@torch.no_grad()
def vae_encode(vae, video):
    """video (B, T, 3, H, W) in [-1, 1], T = 1 + 4k -> Wan latents (B, 1 + k, C, H/8, W/8), normalised per channel
    with Wan's mean and std. (diffusers' VAE does not normalise; WanPipeline does it outside, as here.)"""
    x = rearrange(video, "b t c h w -> b c t h w").to(vae.device, vae.dtype)
    mu = vae.encode(x).latent_dist.mean                    # only the mean, as Wan does
    z = rearrange(mu, "b c f h w -> b f c h w").float()
    mean, std = _latent_stats(vae, z)
    return (z - mean) / std


@torch.no_grad()
def vae_decode_chunks(vae, latents):
    """Normalised latents (B, F, C, h, w) -> video frames in [-1, 1], yielded one latent frame at a time: (B, 1, 3,
    H, W) for the first, (B, 4, 3, H, W) for each later one.

    This is diffusers' own decode loop (AutoencoderKLWan._decode) with the loop turned inside out: its causal
    decoder takes one latent frame per call and keeps the last frames each causal convolution needs in a feature
    cache, so memory stays that of one latent frame however long the video, and the frames equal vae.decode's."""
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d
    mean, std = _latent_stats(vae, latents)
    z = rearrange(latents.float() * std + mean, "b f c h w -> b c f h w").to(vae.device, vae.dtype)
    cache = [None] * sum(isinstance(m, WanCausalConv3d) for m in vae.decoder.modules())   # one slot per conv
    for i in range(z.shape[2]):
        x = vae.post_quant_conv(z[:, :, i:i + 1])                       # a 1x1x1 conv: frame by frame is exact
        out = vae.decoder(x, feat_cache=cache, feat_idx=[0], first_chunk=i == 0)       # (B, 3, 1 or 4, H, W)
        yield rearrange(out.clamp(-1, 1), "b c t h w -> b t c h w")


# --- memory, without memory ------------------------------------------------------------------------------------

def saved_bytes_per_token(cfg: Config) -> int:
    """Bytes one Block keeps for backward per token under bf16 autocast (fp32 weights, train.py's regime), with
    fused attention (flex / flash: q, k, v, output and a log-sum-exp, never the L x L scores). From the tensors the
    block's autograd graph saves (tests/test_wan_loading.py counts them and checks this):
      8 fp32 of width D:  the residual stream into norm1, norm3, norm2 (3); norm1 and norm2 outputs, kept by the
                          modulation (2); the fp32 inputs of the q/k RMSNorms (self q, self k, cross q) (3)
      16 bf16 of width D: the bf16 inputs of the self q, k, v, cross q and ffn.0 Linears (5: autocast casts per
                          call); attention q, k, v (self) and q (cross) (4); attention outputs = o's inputs (2);
                          the RMSNorm outputs (3); the self-attention and FFN outputs kept by the gates (2)
      2 bf16 of width ffn_dim: the FFN's hidden layer before and after GELU.
    Per-token scalars (norm statistics, log-sum-exp) and the text's K/V are left out: under 1%."""
    return 8 * 4 * cfg.dim + 16 * 2 * cfg.dim + 2 * 2 * cfg.ffn_dim


def check_key_layouts(model: DiT) -> list:
    """Both key layouts against the model's state dict, without weights. Returns lines for a report; raises on a
    mismatch. diffusers' WanTransformer3DModel is built on the meta device when diffusers is installed."""
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if {diffusers_to_wan_key(wan_to_diffusers_key(k)) for k in own} != set(own):
        raise ValueError("the Wan <-> diffusers key rename is not a bijection on the model's keys: a bug in rf.py")
    lines = [f"original: {len(own)} keys = the DiT's own module names; the rename to diffusers' names inverts"]
    try:
        from diffusers import WanTransformer3DModel
    except Exception as e:                                    # not installed, or broken: the check is optional
        return lines + [f"diffusers: not checked ({type(e).__name__}: diffusers is not importable)"]
    with torch.device("meta"):
        ref = WanTransformer3DModel(**diffusers_wan_config(model.cfg))
    theirs = {diffusers_to_wan_key(k): tuple(v.shape) for k, v in ref.state_dict().items()}
    if len(theirs) != len(ref.state_dict()):
        raise ValueError("two diffusers keys rename to one Wan key: a bug in rf.py")
    check_state_keys(own, theirs, what="diffusers' WanTransformer3DModel keys (renamed)", hint="A bug in rf.py.")
    return lines + [f"diffusers: {len(theirs)} keys of WanTransformer3DModel (built on meta) rename 1:1 onto ours, "
                    f"all shapes equal"]


def wan_memory_report(cfg: Config | None = None, height=480, width=832, frames=81, batch=1) -> str:
    """Memory estimate for sampling and for training the DiT at one video size, from the model built on the meta
    device (nothing is allocated). cfg: default preset("wan2.1-t2v-1.3b"); height, width, frames: pixels, as the VAE
    sees them (frames = 1 + 4k). Also checks both checkpoint key layouts. Returns a table to print."""
    cfg = cfg or preset("wan2.1-t2v-1.3b")
    if (frames - 1) % 4 or height % (8 * cfg.patch_size[1]) or width % (8 * cfg.patch_size[2]):
        raise ValueError(f"{height}x{width}, {frames} frames: need frames = 1 + 4k and sides divisible by "
                         f"{8 * cfg.patch_size[1]} (VAE stride 8 x patch)")
    with torch.device("meta"):
        model = DiT(cfg)
    params = {k: p.numel() for k, p in model.named_parameters()}
    P, D, layers, fpc = sum(params.values()), cfg.dim, cfg.num_layers, cfg.frames_per_chunk
    # tokens: the VAE makes 1 + (frames - 1) / 4 latent frames of (height / 8) x (width / 8); patches of 2 x 2
    F_ = 1 + (frames - 1) // 4
    S = (height // 8 // cfg.patch_size[1]) * (width // 8 // cfg.patch_size[2])                # tokens per frame
    if F_ % fpc:
        raise ValueError(f"{F_} latent frames is not a multiple of frames_per_chunk={fpc}")
    L_train = (2 * F_ - fpc) * S                   # [history ; noisy]: the last history chunk is dropped
    GiB = 2 ** 30
    w16 = sum(n * (4 if keeps_fp32(k) else 2) for k, n in params.items())        # as load_wan(dtype=bf16) gives
    out = [f"Wan2.1 DiT memory estimate, {height}x{width}, {frames} frames, batch {batch} (GiB; the DiT only: the "
           f"text encoder and the VAE are not counted)",
           f"model      {P:,} parameters in {len(params)} tensors: D={D}, {layers} layers, {cfg.num_heads} heads, "
           f"ffn {cfg.ffn_dim} (built on the meta device, nothing allocated)",
           f"tokens     {F_} latent frames of {height // 8}x{width // 8} -> {S:,} tokens per frame; {F_ * S:,} per "
           f"video; training sequence [history ; noisy] = (2 x {F_} - {fpc}) x {S:,} = {L_train:,}",
           "key layouts"] + ["           " + line for line in check_key_layouts(model)]

    def row(label, nbytes, note=""):
        out.append(f"  {label:<58} {nbytes / GiB:>8.2f}  {note}".rstrip())
        return nbytes

    out.append("weights")
    row("fp32 (as in Wan's checkpoints)", 4 * P)
    row("bf16, the fp32 islands in fp32 (load_wan's default)", w16)

    out.append(f"sampling (no grad, bf16 weights, CFG: 2 branches per video, {fpc} latent frames per chunk)")
    branches = 2 * batch
    kv = row("KV cache", layers * 2 * F_ * S * D * 2 * branches,
             f"{layers} layers x K,V x {F_ * S:,} tokens x {D} x 2 B x {branches} branches")
    text_kv = row("text K/V (cross-attention, computed once per prompt)", layers * 2 * cfg.text_len * D * 2 * branches)
    T = fpc * S * branches
    # no grad: a block's tensors die as it goes; the live set is ~ the fp32 residual stream, a few D-wide
    # temporaries and the FFN's hidden layer (a guess, small next to the cache)
    act = row("activations of one chunk forward (transient)", T * (4 * 4 * D + 2 * 2 * cfg.ffn_dim),
              f"{T:,} tokens x (4 fp32 x D + 2 bf16 x ffn_dim)")
    row("total", w16 + kv + text_kv + act)

    out.append("training (AdamW; fp32 weights under bf16 autocast, as train.py; activation checkpointing optional)")
    # NOTE(choice): train.py keeps fp32 weights (the master copy) and runs bf16 autocast. bf16 weights + an fp32
    # master copy would cost the same 16 bytes per parameter (2 + 4 master + 8 moments + 2 grad).
    state = row("weights fp32", 4 * P)
    state += row("gradients fp32", 4 * P)
    state += row("AdamW exp_avg + exp_avg_sq fp32", 8 * P)
    state += row("EMA copy fp32 (train.py's --ema)", 4 * P)
    per_layer = batch * L_train * saved_bytes_per_token(cfg)
    head = row("embeddings and head", batch * F_ * S * 3 * 4 * D, "3 fp32 x D per output token")
    full = row("activations, no checkpointing", layers * per_layer,
               f"{layers} layers x {batch * L_train:,} tokens x {saved_bytes_per_token(cfg) / 1024:.0f} KiB")
    ckpt = row("activations, checkpointing every block", layers * batch * L_train * 4 * D + per_layer,
               "each block's fp32 input + one block recomputed")
    resample = row("self-resampling KV cache (no grad, freed before the loss)",
                   layers * 2 * (F_ - fpc) * S * D * 2 * batch, f"{F_ - fpc} history frames")
    row("total, no checkpointing", state + max(head + full, resample))
    row("total, checkpointing", state + max(head + ckpt, resample), "+ backward transients: keep a few GiB free")
    return "\n".join(out)
