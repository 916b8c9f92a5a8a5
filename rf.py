"""
rf.py -- Resampling Forcing: the method in one file.

Paper: Y. Guo et al., "End-to-End Training for Autoregressive Video Diffusion via Self-Resampling",
arXiv 2512.15702 (2025). Base model: Wan2.1-T2V-1.3B (arXiv 2503.20314).

An autoregressive video diffusion model makes a video chunk by chunk, each chunk denoised while it
attends to the chunks already made. Trained with teacher forcing (the history is the ground truth),
it never sees its own mistakes. Resampling Forcing trains on a history the model degraded itself:
each history chunk is noised to a level t_s and denoised back by the model, given the already
degraded chunks before it (no gradient). The loss is the usual flow-matching loss on clean targets,
for all chunks in one forward with a sparse causal mask. No teacher, no new parameters.

Reading order (a reader who stops before 7 has read the whole dense method)
    1. Config and presets
    2. Flow matching: noise, shift, time grid, Euler (Eqs. 2, 3, 7)
    3. Who sees whom: one mask rule for every layout
    4. The Wan2.1 DiT with a noise level per frame; its three entry points
    5. Sampling: the KV cache and generate
    6. Resampling Forcing: self-resampling and the loss (Algorithm 1)
    7. History routing: top-k history chunks per query (Eqs. 8, 9), the paper's optional last stage.
       Section 4 calls it when a model routes; it is the one forward reference in the file.

Conventions (each letter keeps one meaning in the whole file)
    B batch, F frames, C channels, H x W frame size (Wan: latents, 8x smaller than pixels; toy: pixels)
    N chunks, J history chunks (index j), L tokens, S tokens a frame, D width, nh heads, hd head width
    fpc frames per chunk; Fp frames in one forward's sequence (the history's and the noisy ones)
    videos are (B, F, C, H, W); noise levels are per frame, t: (B, F), equal within a chunk
    t = 0 clean, t = 1 pure noise; x_t = (1 - t) x0 + t eps; the model predicts v = eps - x0
    a chunk is frames_per_chunk consecutive frames made together (the paper calls it a "frame")
    lines tagged [RF] are where this model departs from Wan2.1: `grep -n "\\[RF\\]" rf.py`
    lines between `# [part: NAME]` and `# [end: NAME]` are what a student writes in the course kit (kit/)
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from torch.nn.attention.flex_attention import BlockMask
from torch.utils.checkpoint import checkpoint

import checks
import kernels

ROPE_LEN = 1024  # positions in Wan's RoPE table: the longest video is 1024 (latent) frames


# -- 1. Config and presets -------------------------------------------------------------------------

@dataclass
class Config:
    # Wan2.1 DiT, with the field names of Wan's config.json
    dim: int = 1536                    # model width D
    ffn_dim: int = 8960                # hidden width of the feed-forward layers
    freq_dim: int = 256                # width of the timestep sinusoid
    num_heads: int = 12                # attention heads
    num_layers: int = 30               # DiT blocks
    text_len: int = 512                # text tokens the cross-attention reads (zero-padded)
    text_dim: int = 4096               # width of the text features (umT5: 4096)
    in_dim: int = 16                   # input channels (Wan: latent channels; toy: RGB)
    out_dim: int = 16                  # channels of the predicted velocity
    patch_size: tuple = (1, 2, 2)      # (frames, height, width) per token
    eps: float = 1e-6                  # epsilon of the norms
    # autoregressive video
    frames_per_chunk: int = 3          # [RF] frames denoised together
    frame_size: tuple = (60, 104)      # (H, W) sampled by default: 480x832 pixels / 8
    # Resampling Forcing (Algorithm 1)
    degrade: str = "autoregressive"    # history: none | noise | parallel | autoregressive
    resample_shift: float = 0.6        # s of Eq. 7 for the simulation timestep t_s
    resample_steps: int = 1            # Euler steps from t_s down to 0
    noise_aug_max: float = 0.1         # "noise" mode: tau ~ U(0, noise_aug_max)
    train_t: str = "uniform"           # per-chunk training t: uniform | logit_normal
    train_shift: float = 1.0           # Eq. 7 shift of the training t
    # sampling (paper: 32 Euler steps, shift 5, CFG 5)
    sample_steps: int = 32             # Euler steps per chunk
    sample_shift: float = 5.0          # shift of the sampler's time grid
    sample_cfg: float = 5.0            # classifier-free guidance scale (1 = off)
    # history routing (section 7; the paper's last fine-tuning stage uses top_k=5)
    top_k: int | None = None           # [RF] read the k best history chunks; None = all
    window: int | None = None          # ablation: the last `window` history chunks instead
    sink: bool = False                 # ablation: always read history chunk 0 too

    def __post_init__(self):
        self.patch_size, self.frame_size = tuple(self.patch_size), tuple(self.frame_size)  # JSON
        checks.config(self, DEGRADE_MODES, TRAIN_T)

    @property
    def routed(self) -> bool:
        """History routing is on: a query reads its own chunk and a chosen few history chunks."""
        return self.top_k is not None or self.window is not None


DEGRADE_MODES = ("none", "noise", "parallel", "autoregressive")
TRAIN_T = ("uniform", "logit_normal")

PRESETS = {
    # Sized for a 2-core CPU: 16x16 RGB frames (pixels are the latents), 4x4 patches.
    # NOTE(choice): training t shifted by 3 toward noise (docs/method.md, "The toy's training t").
    "toy": dict(dim=128, ffn_dim=512, freq_dim=64, num_heads=4, num_layers=4, text_len=8,
                text_dim=64, in_dim=3, out_dim=3, patch_size=(1, 4, 4), frames_per_chunk=2,
                frame_size=(16, 16), train_shift=3.0, sample_steps=16, sample_shift=1.0,
                sample_cfg=3.0),
    # The real model: 1,418,996,800 parameters, 825 checkpoint keys.
    # NOTE(choice): Wan's training t is uniform shifted by 5 (docs/method.md, "Wan's training t").
    "wan2.1-t2v-1.3b": dict(train_t="uniform", train_shift=5.0),
}


def preset(name: str, **overrides) -> Config:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}: choose one of {sorted(PRESETS)}")
    return Config(**{**PRESETS[name], **overrides})


# -- 2. Flow matching (rectified flow): x_t = (1 - t) x0 + t eps, v = eps - x0 ---------------------

def add_noise(x0, eps, t):
    """Eq. 3, one noise level per frame.

    x0, eps: (B, F, C, H, W)
    t:       (B, F)
    """
    t = t[:, :, None, None, None]
    return (1 - t) * x0 + t * eps


def shift_t(t, s):
    """Eq. 7: t' = s t / (1 + (s - 1) t). s > 1 moves mass toward noise, s < 1 toward clean."""
    return s * t / (1 + (s - 1) * t)


def draw(fn, shape, generator=None):
    """fn(shape) for fn = torch.rand | torch.randn. generator may also be an object with a draw(fn, shape)
    method (train.py's BatchSlice: a micro-batch keeps its rows of the whole batch's draws)."""
    if generator is None or isinstance(generator, torch.Generator):
        return fn(shape, generator=generator)
    return generator.draw(fn, shape)


def randn_like(x, generator):
    """Noise shaped like x, drawn on the CPU: one seed gives the same numbers on every device."""
    return draw(torch.randn, x.shape, generator).to(x.device, x.dtype)


def logit_normal(shape, generator=None):
    """t = sigmoid(z), z ~ N(0, 1): mass in the middle of [0, 1], none at the ends."""
    return torch.sigmoid(draw(torch.randn, shape, generator))


def sample_train_t(cfg: Config, batch, num_chunks, generator=None):
    """Algorithm 1, line 6: one training t per chunk, independent across chunks. Returns (B, N)."""
    # NOTE(choice): the paper does not say how t^i is drawn; uniform (docs/method.md, "The training t^i").
    if cfg.train_t == "logit_normal":
        u = logit_normal((batch, num_chunks), generator)
    else:
        u = draw(torch.rand, (batch, num_chunks), generator)
    return shift_t(u, cfg.train_shift)


def time_grid(steps, shift):
    """The sampler's Euler grid: shift_t(1 - k / steps), k = 0..steps, from 1 (noise) to 0."""
    return shift_t(torch.linspace(1, 0, steps + 1, dtype=torch.float64), shift).float()


def euler(velocity, x, grid):
    """Integrate dx/dt = v (Eq. 2) from grid[0] down to grid[-1].

    velocity: callable (x, t) -> v, with t of shape (B, F)
    x:        (B, F, C, H, W) at time grid[0]
    grid:     (steps + 1, B), one grid per video
    """
    # [part: sampler]
    for s, s_next in zip(grid[:-1], grid[1:]):
        t = s[:, None].expand(x.shape[:2])                                          # (B, F)
        x = x + (s_next - s).view(-1, 1, 1, 1, 1) * velocity(x, t)
    return x
    # [end: sampler]


# -- 3. Who sees whom: one rule for every layout ---------------------------------------------------
# Every token belongs to a chunk and a stream. The block-causal forward has one stream. The
# two-stream training forward [RF] lays out [history ; noisy]: the HISTORY stream holds the history
# chunks at t = 0, the NOISY stream the chunks being denoised. One rule says which key a query may
# see; the dense mask, the flex BlockMask and the KV cache all implement it.

HISTORY, NOISY = 0, 1


def may_attend(q_chunk, q_stream, k_chunk, k_stream):
    """Its own chunk in its own stream (both ways), plus every earlier chunk of the history stream.

    Block-causal (all tokens HISTORY): chunk i sees chunks <= i.
    Two-stream: H_j sees H_<=j; Z_i sees Z_i and H_<i, never H_i (its answer) nor another Z.
    Elementwise on tensors of ids, so it builds a dense mask and a flex mask_mod alike.
    """
    # [part: mask]
    own_chunk = (q_chunk == k_chunk) & (q_stream == k_stream)
    return own_chunk | earlier_history(q_chunk, k_chunk, k_stream)
    # [end: mask]


def earlier_history(q_chunk, k_chunk, k_stream):
    """The rule's second term: earlier chunks of the history stream (section 7 narrows it)."""
    # [part: mask]
    return (k_stream == HISTORY) & (k_chunk < q_chunk)
    # [end: mask]


def block_causal_layout(num_frames, fpc, device):
    """(chunk, stream) id of every frame of the block-causal forward: one stream."""
    chunk = torch.arange(num_frames, device=device) // fpc
    return chunk, torch.full_like(chunk, HISTORY)


def dense_mask(chunk, stream):
    """(L,) chunk and stream id per token -> (L, L) bool, True = may attend (SDPA's convention)."""
    return may_attend(chunk[:, None], stream[:, None], chunk[None, :], stream[None, :])


def attention(q, k, v, mask=None):
    """Softmax attention, scale 1/sqrt(hd).

    q:    (B, Lq, nh, hd)
    k, v: (B, Lk, nh, hd)
    mask: None (all keys), a bool (Lq, Lk) tensor (SDPA), or a flex BlockMask of the same rule
    Returns (B, Lq, nh, hd).
    """
    q, k, v = (x.transpose(1, 2) for x in (q, k, v))                                # (B, nh, L, hd)
    if isinstance(mask, BlockMask):
        out = kernels.flex_attention(q, k, v, mask)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return out.transpose(1, 2)


# -- 4. The Wan2.1 DiT -----------------------------------------------------------------------------
# Module names are the checkpoint's key names: loading Wan weights is a key-for-key copy. Some math
# stays fp32 under bf16 autocast, as in Wan: time embedding, modulation, norms, residuals, the head.

def fp32(device_type):
    """Autocast off: the enclosed math runs in the dtype of its (fp32) inputs."""
    return torch.autocast(device_type, enabled=False)


class LayerNorm(nn.LayerNorm):
    """Wan's LayerNorm: fp32 math, result in the input dtype."""
    def forward(self, x):
        return super().forward(x.float()).type_as(x)


class RMSNorm(nn.Module):
    """Wan's q/k norm: RMS over the full width D (all heads), fp32 math, the input's dtype out."""
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        # the last type_as keeps q, k in v's dtype under autocast (Wan runs attention in bf16)
        rms = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return ((xf * rms).type_as(x) * self.weight).type_as(x)


def sinusoid(dim, t):
    """Wan's timestep sinusoid, [cos, sin] in float64. t: any shape -> (*t.shape, dim)."""
    half = dim // 2
    freqs = torch.pow(10000, -torch.arange(half, dtype=torch.float64, device=t.device) / half)
    angles = t.double()[..., None] * freqs
    return torch.cat([angles.cos(), angles.sin()], dim=-1)


def rope_cos_sin(pos, h, w, head_dim):
    """3-D RoPE tables. Wan splits each head into frame / row / column parts (44 / 42 / 42 of 128).

    pos: (Fp,) frame positions of the tokens' frames; rows 0..h-1, columns 0..w-1
    Returns cos, sin: (L, 1, hd / 2), L = Fp h w.
    """
    d_hw = 2 * (head_dim // 6)
    d_t = head_dim - 2 * d_hw

    def angles(p, d):                                                                # (len(p), d/2)
        freqs = 10000.0 ** (-torch.arange(0, d, 2, dtype=torch.float64, device=p.device) / d)
        return p.double()[:, None] * freqs

    dev, n = pos.device, len(pos)
    a_t = angles(pos, d_t)[:, None, None, :].expand(n, h, w, -1)
    a_h = angles(torch.arange(h, device=dev), d_hw)[None, :, None, :].expand(n, h, w, -1)
    a_w = angles(torch.arange(w, device=dev), d_hw)[None, None, :, :].expand(n, h, w, -1)
    a = torch.cat([a_t, a_h, a_w], dim=-1).flatten(0, 2)[:, None, :]                  # (L, 1, hd/2)
    return a.cos().float(), a.sin().float()


def apply_rope(x, cos, sin):
    """Rotate interleaved pairs (x[2i], x[2i+1]) (Wan's complex layout, not NeoX halves)."""
    x1, x2 = x.float().unflatten(-1, (-1, 2)).unbind(-1)                          # (B, L, nh, hd/2)
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2).type_as(x)


def modulate(x, shift, scale):
    """x * (1 + scale) + shift with one (shift, scale) per frame [RF], broadcast over its S tokens.

    x:            (B, L, D)
    shift, scale: (B, Fp, 1, D)
    """
    # [part: frame_t]
    return (x.unflatten(1, (shift.shape[1], -1)) * (1 + scale) + shift).flatten(1, 2)
    # [end: frame_t]


def gate(y, g):
    """y * g per frame [RF]. y: (B, L, D); g: (B, Fp, 1, D)."""
    # [part: frame_t]
    return (y.unflatten(1, (g.shape[1], -1)) * g).flatten(1, 2)
    # [end: frame_t]


class SelfAttention(nn.Module):
    def __init__(self, dim, num_heads, eps):
        super().__init__()
        self.num_heads = num_heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q, self.norm_k = RMSNorm(dim, eps), RMSNorm(dim, eps)

    def forward(self, x, rope, mask, cache=None, routing=None):
        q = self.norm_q(self.q(x)).unflatten(-1, (self.num_heads, -1))              # (B, L, nh, hd)
        k = self.norm_k(self.k(x)).unflatten(-1, (self.num_heads, -1))
        v = self.v(x).unflatten(-1, (self.num_heads, -1))
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        phi = None
        if cache is not None:                 # [RF] prepend the finished chunks (cached after RoPE)
            phi = cache.mean_keys(k) if routing is not None else None
            k, v = cache.extend(k, v)                                          # (B, Lc + L, nh, hd)
        if routing is not None:                      # [RF] history routing, section 7
            out = routed_attention(q, k, v, phi, routing)
        else:
            out = attention(q, k, v, mask)
        return self.o(out.flatten(2))                                                 # (B, L, D)


class CrossAttention(nn.Module):
    def __init__(self, dim, num_heads, eps):
        super().__init__()
        self.num_heads = num_heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q, self.norm_k = RMSNorm(dim, eps), RMSNorm(dim, eps)

    def kv(self, context):
        """Text keys and values: they depend only on the prompt (computed once per video)."""
        k = self.norm_k(self.k(context)).unflatten(-1, (self.num_heads, -1))       # (B, Lt, nh, hd)
        return k, self.v(context).unflatten(-1, (self.num_heads, -1))

    def forward(self, x, text_kv):
        q = self.norm_q(self.q(x)).unflatten(-1, (self.num_heads, -1))            # no RoPE, no mask
        return self.o(attention(q, *text_kv).flatten(2))


class Block(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        d = cfg.dim
        self.norm1 = LayerNorm(d, cfg.eps, elementwise_affine=False)
        self.self_attn = SelfAttention(d, cfg.num_heads, cfg.eps)
        self.norm3 = LayerNorm(d, cfg.eps, elementwise_affine=True)  # Wan's cross-attn norm
        self.cross_attn = CrossAttention(d, cfg.num_heads, cfg.eps)
        self.norm2 = LayerNorm(d, cfg.eps, elementwise_affine=False)
        self.ffn = nn.Sequential(nn.Linear(d, cfg.ffn_dim), nn.GELU(approximate="tanh"),
                                 nn.Linear(cfg.ffn_dim, d))
        self.modulation = nn.Parameter(torch.randn(1, 6, d) / d**0.5)

    def forward(self, x, t_mod, rope, mask, text_kv, cache=None, routing=None):
        # x: (B, L, D) residual stream (fp32); t_mod: (B, Fp, 6, D), one modulation per frame [RF]
        with fp32(x.device.type):
            m = (self.modulation.unsqueeze(0) + t_mod).unsqueeze(3)               # (B, Fp, 6, 1, D)
            shift_msa, scale_msa, gate_msa, shift_ffn, scale_ffn, gate_ffn = m.unbind(2)
        y = modulate(self.norm1(x), shift_msa, scale_msa)
        y = self.self_attn(y, rope, mask, cache, routing)
        x = x + gate(y, gate_msa)
        x = x + self.cross_attn(self.norm3(x), text_kv)                     # no gate, no modulation
        y = self.ffn(modulate(self.norm2(x), shift_ffn, scale_ffn))
        return x + gate(y, gate_ffn)


class Head(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.norm = LayerNorm(cfg.dim, cfg.eps, elementwise_affine=False)
        self.head = nn.Linear(cfg.dim, cfg.out_dim * math.prod(cfg.patch_size))
        self.modulation = nn.Parameter(torch.randn(1, 2, cfg.dim) / cfg.dim**0.5)

    def forward(self, x, t_emb):
        # t_emb: (B, Fp, D), the time embedding before SiLU and projection; all in fp32, as Wan does
        with fp32(x.device.type):
            m = self.modulation.unsqueeze(0) + t_emb.float().unsqueeze(2)            # (B, Fp, 2, D)
            shift, scale = m.unsqueeze(3).unbind(2)
            return self.head(modulate(self.norm(x.float()), shift, scale))


class DiT(nn.Module):
    """Wan2.1's text-to-video DiT, made causal over chunks, with a noise level per frame [RF].

    forward(x, t, context, history)   the two-stream training forward, [history ; noisy] [RF]
    forward_causal(x, t, context)     block-causal: chunk i sees chunks <= i, each at its own t
    forward_chunk(x, t, text_kv, cache, commit)   one chunk against the KV cache (section 5)
    """

    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        d = cfg.dim
        self.patch_embedding = nn.Conv3d(cfg.in_dim, d, cfg.patch_size, stride=cfg.patch_size)
        self.text_embedding = nn.Sequential(nn.Linear(cfg.text_dim, d), nn.GELU(approximate="tanh"),
                                            nn.Linear(d, d))
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, d), nn.SiLU(), nn.Linear(d, d))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.head = Head(cfg)
        self.grad_checkpointing = False  # recompute each block in backward: less memory
        self.attn_backend = "auto"       # see kernels.ATTN_BACKENDS
        self.routing_log = None   # an object with add(selected, eligible) sees every routing choice
        self.init_weights()

    def init_weights(self):
        """Wan's initialisation (the toy trains from it; real runs load weights instead)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.xavier_uniform_(self.patch_embedding.weight.flatten(1))
        for m in [*self.text_embedding, *self.time_embedding]:
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
        nn.init.zeros_(self.head.head.weight)

    # --- the three entry points ---

    def forward(self, x, t, context, history):
        """The two-stream training forward [RF]: [history ; x], one pass for every chunk.

        x:       (B, F, C, H, W) noisy frames
        t:       (B, F) their noise levels
        context: (B, Lt, text_dim) text features
        history: (B, F, C, H, W) the frames each chunk is conditioned on (ground truth or degraded)
        Returns v: (B, F, C, H, W).
        """
        checks.video(self.cfg, x, t, ROPE_LEN, history)
        B, num_frames = x.shape[:2]
        dev, fpc = x.device, self.cfg.frames_per_chunk
        # [part: two_stream]
        n_hist = num_frames - fpc     # [RF] the last history chunk is seen by itself only: dropped
        frames = torch.cat([history[:, :n_hist].to(x.dtype), x], dim=1)       # (B, n_hist + F, ...)
        t_all = torch.cat([t.new_zeros(B, n_hist), t], dim=1)                # [RF] history at t = 0
        pos = torch.cat([torch.arange(n_hist, device=dev), torch.arange(num_frames, device=dev)])
        chunk = pos // fpc                                                # [RF] H_j, Z_j share RoPE
        stream = torch.cat([torch.full_like(chunk[:n_hist], HISTORY),
                            torch.full_like(chunk[n_hist:], NOISY)])
        # [end: two_stream]
        return self._forward(frames, t_all, pos, self.encode_text(context),
                             *self._attention_rule(chunk, stream, x), n_out=num_frames)

    def forward_causal(self, x, t, context):
        """Block-causal: chunk i sees chunks <= i, each frame at its own t. Shapes as in forward."""
        checks.video(self.cfg, x, t, ROPE_LEN)
        chunk, stream = block_causal_layout(x.shape[1], self.cfg.frames_per_chunk, x.device)
        pos = torch.arange(x.shape[1], device=x.device)
        return self._forward(x, t, pos, self.encode_text(context),
                             *self._attention_rule(chunk, stream, x), n_out=x.shape[1])

    def forward_chunk(self, x, t, text_kv, cache, commit=False):
        """One chunk against the KV cache: it sees itself and every finished chunk.

        x:       (B, fpc, C, H, W) at t: (B, fpc)
        text_kv: encode_text(context)
        cache:   a KVCache; this chunk's K/V go into its next slot and stay there with commit=True
                 (once a chunk is finished, at t = 0); otherwise the next call overwrites them
        Returns v: (B, fpc, C, H, W).
        """
        fpc = x.shape[1]
        checks.video(self.cfg, x, t, ROPE_LEN, first=cache.frames)
        pos = torch.arange(cache.frames, cache.frames + fpc, device=x.device)
        # every cached key is an earlier history chunk, so the rule allows them all: no mask, unless
        # routing [RF] narrows them (layout: the block-causal one of [cache ; this chunk])
        routing = None
        if self.cfg.routed:
            layout = block_causal_layout(cache.frames + fpc, fpc, x.device)
            routing = self._routing(*layout, self.tokens_per_frame(*x.shape[-2:]))
        v = self._forward(x, t, pos, text_kv, None, routing, n_out=fpc, cache=cache)
        if commit:
            cache.commit(fpc, tokens=fpc * self.tokens_per_frame(*x.shape[-2:]))
        return v

    # --- what they share ---

    def encode_text(self, context):
        """Text features (B, Lt, text_dim), Lt <= text_len -> per-layer cross-attention (K, V)."""
        checks.context(self.cfg, context)
        # Wan zero-pads the text to text_len and attends to all of it, padding included (no mask)
        context = F.pad(context, (0, 0, 0, self.cfg.text_len - context.shape[1]))
        ctx = self.text_embedding(context)                                        # (B, text_len, D)
        return [block.cross_attn.kv(ctx) for block in self.blocks]

    def tokens_per_frame(self, H, W):
        """S, the tokens of an H x W frame."""
        return (H // self.cfg.patch_size[1]) * (W // self.cfg.patch_size[2])

    def _forward(self, frames, t, pos, text_kv, mask, routing, n_out, cache=None):
        """The layers, for any layout.

        frames:  (B, Fp, C, H, W) at noise levels t: (B, Fp), RoPE frame positions pos: (Fp,)
        mask, routing: from _attention_rule (one of them None)
        Returns the velocity of the last n_out frames, (B, n_out, C, H, W).
        """
        H, W = frames.shape[-2:]
        h, w = H // self.cfg.patch_size[1], W // self.cfg.patch_size[2]
        x = self.patch_embedding(rearrange(frames, "b f c h w -> b c f h w"))     # (B, D, Fp, h, w)
        x = rearrange(x, "b d f h w -> b (f h w) d")                                  # (B, L, D)
        with fp32(x.device.type):
            t_emb = sinusoid(self.cfg.freq_dim, 1000 * t).float()
            t_emb = self.time_embedding(t_emb)                                          # [RF] (B, Fp, D)
            t_mod = self.time_projection(t_emb).unflatten(-1, (6, self.cfg.dim))     # (B, Fp, 6, D)
        rope = rope_cos_sin(pos, h, w, self.cfg.dim // self.cfg.num_heads)
        for i, block in enumerate(self.blocks):
            args = (x, t_mod, rope, mask, text_kv[i], cache and cache.layers[i], routing)
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, *args, use_reentrant=False)
            else:
                x = block(*args)
        x = self.head(x[:, -n_out * h * w:], t_emb[:, -n_out:])                # (B, n_out h w, ...)
        return rearrange(x, "b (f h w) (ph pw c) -> b f c (h ph) (w pw)", f=n_out, h=h,
                         ph=self.cfg.patch_size[1], pw=self.cfg.patch_size[2])

    def _attention_rule(self, chunk, stream, x):
        """(mask, routing) for a per-frame layout, expanded to x's tokens; one of them is None."""
        S = self.tokens_per_frame(*x.shape[-2:])
        if self.cfg.routed:
            return None, self._routing(chunk, stream, S)
        return self._mask(chunk, stream, S), None

    def _mask(self, chunk, stream, S):
        """The rule of section 3 for a per-frame layout, as the backend's mask (None: every key)."""
        if bool((chunk == chunk[0]).all() & (stream == stream[0]).all()):
            return None      # one chunk, one stream: all tokens see all (Wan's own forward)
        chunk, stream = chunk.repeat_interleave(S), stream.repeat_interleave(S)
        if self.attn_backend == "flex" or (self.attn_backend == "auto" and chunk.is_cuda):
            layout = tuple(chunk.tolist()), tuple(stream.tolist())
            return kernels.flex_block_mask(may_attend, *layout, str(chunk.device))
        return dense_mask(chunk, stream)

    def _routing(self, chunk, stream, S):
        """The routing state of section 7 for a per-frame layout [RF]."""
        chunk, stream = chunk.repeat_interleave(S), stream.repeat_interleave(S)
        T = self.cfg.frames_per_chunk * S
        num_history = int((stream == HISTORY).sum()) // T
        return Routing(chunk, stream, T, num_history, self.cfg.top_k, self.cfg.window, self.cfg.sink,
                       backend=kernels.routed_backend(self.attn_backend), log=self.routing_log)


# -- 5. Sampling: the KV cache and generate --------------------------------------------------------

class LayerKV:
    """One layer's keys and values of the finished chunks, in a buffer made once per video, and [RF]
    the mean key of each finished chunk (phi of Eq. 8, section 7), computed once at commit."""

    def __init__(self, max_tokens):
        self.max_tokens, self.length, self.k, self.v = max_tokens, 0, None, None
        self.chunks, self.phi = 0, None

    # Eager under torch.compile: a compiled graph can keep a stale copy of the Python ints below.
    @torch.compiler.disable
    def extend(self, k, v):
        """Write this chunk's (B, L, nh, hd) K/V after the committed ones; return all of them."""
        if self.k is None:
            self.k = k.new_zeros(k.shape[0], self.max_tokens, *k.shape[2:])
            self.v = torch.zeros_like(self.k)
        # [part: sampler]
        end = self.length + k.shape[1]
        self.k[:, self.length:end], self.v[:, self.length:end] = k, v
        return self.k[:, :end], self.v[:, :end]
        # [end: sampler]

    def commit(self, tokens):
        """Keep the chunk written last (its `tokens` K/V) and store its mean key."""
        if self.phi is None:
            B, _, nh, hd = self.k.shape
            self.phi = self.k.new_zeros(B, self.max_tokens // tokens, nh, hd, dtype=torch.float)
        new = self.k[:, self.length:self.length + tokens]
        self.phi[:, self.chunks] = chunk_means(new, tokens)[:, 0]
        self.length += tokens
        self.chunks += 1

    @torch.compiler.disable
    def mean_keys(self, k):
        """(B, J, nh, hd) mean keys of the committed chunks (k: this chunk's keys, for the shape)."""
        if self.phi is None:
            return k.new_zeros(k.shape[0], 0, *k.shape[2:], dtype=torch.float)
        return self.phi[:, :self.chunks]


class KVCache:
    """Per layer, the keys (after RoPE) and values of the finished chunks."""

    def __init__(self, model: DiT, max_frames, frame_size):
        tokens = max_frames * model.tokens_per_frame(*frame_size)
        self.layers = [LayerKV(tokens) for _ in range(model.cfg.num_layers)]
        self.frames = 0           # committed frames: the next chunk's first position

    def commit(self, frames, tokens):
        for layer in self.layers:
            layer.commit(tokens)
        self.frames += frames


@torch.no_grad()
def generate(model: DiT, context, num_frames, *, steps=None, shift=None, cfg_scale=None,
             neg_context=None, prefix=None, size=None, seed=0, use_cache=True, progress=None):
    """Generate a video chunk by chunk. Returns (B, num_frames, C, H, W), the prefix included.

    context:     (B, Lt, text_dim) prompt features
    neg_context: the unconditional prompt's features (needed when cfg_scale != 1)
    steps, shift, cfg_scale: the sampler; default cfg.sample_*
    prefix:      (B, P, C, H, W) clean frames to continue from (P a multiple of the chunk)
    size:        (H, W), default the prefix's or cfg.frame_size
    progress:    optional callable(chunk_index), called per finished chunk
    use_cache:   True keeps each finished chunk's K/V (re-encoded once at t = 0); False runs the
                 block-causal forward over [finished chunks ; this chunk] every step (same frames)
    """
    cfg, fpc = model.cfg, model.cfg.frames_per_chunk
    steps, shift, cfg_scale = (cfg.sample_steps if steps is None else steps,
                               cfg.sample_shift if shift is None else shift,
                               cfg.sample_cfg if cfg_scale is None else cfg_scale)
    device = next(model.parameters()).device
    B, n_prefix = context.shape[0], 0 if prefix is None else prefix.shape[1]
    H, W = size or (prefix.shape[-2:] if prefix is not None else cfg.frame_size)
    checks.generate_args(cfg, B, num_frames, prefix, H, W, ROPE_LEN)
    velocity = Velocity(model, context, neg_context, cfg_scale, num_frames, (H, W), use_cache)
    noise = torch.Generator().manual_seed(seed)
    grid = time_grid(steps, shift).to(device)[:, None].expand(-1, B)                # (steps + 1, B)
    for chunk in [] if prefix is None else prefix.to(device).split(fpc, dim=1):
        velocity.finish(chunk)                                           # the clean prefix
    for i in range(n_prefix // fpc, num_frames // fpc):
        x = draw(torch.randn, (B, fpc, cfg.in_dim, H, W), noise).to(device)
        velocity.finish(euler(velocity, x, grid), last=i == num_frames // fpc - 1)
        if progress:
            progress(i)
    return torch.cat(velocity.video, dim=1)


class Velocity:
    """generate's v(x, t) for the current chunk given the finished ones: CFG, the KV cache."""

    def __init__(self, model, context, neg_context, cfg_scale, num_frames, size, use_cache):
        self.model, self.cfg_scale, self.video = model, cfg_scale, []
        self.guided = cfg_scale != 1.0
        if self.guided:
            if neg_context is None:
                raise ValueError("cfg_scale != 1 needs neg_context (the unconditional "
                                 "prompt's features)")
            neg_context = neg_context.expand(context.shape[0], -1, -1)
            context = torch.cat([context, neg_context])                       # [cond ; uncond]
        self.context, self.text_kv = context, model.encode_text(context)           # once per prompt
        self.cache = KVCache(model, num_frames, size) if use_cache else None

    def pair(self, x):
        """The two CFG branches see the same frames."""
        return torch.cat([x, x]) if self.guided else x

    def __call__(self, x, t):
        if self.cache is not None:
            v = self.model.forward_chunk(self.pair(x), self.pair(t), self.text_kv, self.cache)
        else:
            past = torch.cat(self.video + [x], dim=1)
            t_all = torch.cat([t.new_zeros(t.shape[0], past.shape[1] - t.shape[1]), t], dim=1)
            v = self.model.forward_causal(self.pair(past), self.pair(t_all), self.context)
            v = v[:, -x.shape[1]:]
        if not self.guided:
            return v
        v_cond, v_uncond = v.chunk(2)
        return v_uncond + self.cfg_scale * (v_cond - v_uncond)

    def finish(self, chunk, last=False):
        """A finished chunk joins the video; the cache re-encodes it once at t = 0 (not the last)."""
        # [part: sampler]
        self.video.append(chunk)
        if self.cache is not None and not last:
            zeros = chunk.new_zeros(chunk.shape[:2])
            self.model.forward_chunk(self.pair(chunk), self.pair(zeros), self.text_kv, self.cache,
                                     commit=True)
        # [end: sampler]


# -- 6. Resampling Forcing (Algorithm 1) -----------------------------------------------------------

def training_loss(model: DiT, clip, context, mode=None, generator=None):
    """One Resampling Forcing (or teacher forcing) loss, Eq. 4.

    clip:      (B, F, C, H, W) clean frames
    context:   (B, Lt, text_dim)
    mode:      the history degradation (default cfg.degrade), see degrade_history
    generator: every random draw comes from it (see draw)
    Returns (loss, chunk_loss (B, N), chunk_t (B, N)); the last two detached, for the log.
    """
    cfg, fpc = model.cfg, model.cfg.frames_per_chunk
    B, N = clip.shape[0], clip.shape[1] // fpc
    # [part: loss]
    history = degrade_history(model, clip, context, mode or cfg.degrade, generator)  # lines 2-5
    t = sample_train_t(cfg, B, N, generator).to(clip.device)                        # line 6: (B, N)
    t_frames = t.repeat_interleave(fpc, dim=1)                                        # (B, F)
    eps = randn_like(clip, generator)
    v = model(add_noise(clip, eps, t_frames), t_frames, context, history=history)      # line 7
    err = (v.float() - (eps - clip).float()).pow(2).mean(dim=(2, 3, 4))         # (B, F); target: GT
    chunk_loss = err.unflatten(1, (N, fpc)).mean(2)                                   # (B, N)
    return chunk_loss.mean(), chunk_loss.detach(), t
    # [end: loss]


@torch.no_grad()
def degrade_history(model: DiT, clip, context, mode, generator=None):
    """The history the noisy chunks are conditioned on. Returns (B, F, C, H, W).

    none            teacher forcing: the ground truth
    noise           Gaussian noise augmentation: x_tau, tau ~ U(0, noise_aug_max) per video
    parallel        every chunk resampled from x_{t_s} at once, given the ground-truth history
    autoregressive  the method: chunk i resampled given the already resampled chunks < i
    """
    cfg = model.cfg
    B, num_frames = clip.shape[:2]
    if mode == "none":
        return clip
    if mode == "noise":
        tau = draw(torch.rand, (B, 1), generator).expand(B, num_frames).to(clip.device)
        tau = tau * cfg.noise_aug_max
        return add_noise(clip, randn_like(clip, generator), tau)
    # Algorithm 1, lines 2-3: one simulation timestep per video, logit-normal, shifted by s
    # [part: resample]
    t_s = shift_t(logit_normal((B,), generator), cfg.resample_shift)                 # (B,)
    # [end: resample]
    if mode == "autoregressive":
        return resample_autoregressive(model, clip, context, t_s, cfg.resample_steps, generator)
    if mode == "parallel":
        grid = resample_grid(t_s, cfg.resample_steps, clip.device)                  # (steps + 1, B)
        x = add_noise(clip, randn_like(clip, generator), grid[0][:, None].expand(B, num_frames))
        return euler(lambda x, t: model(x, t, context, history=clip), x, grid)
    raise ValueError(f"unknown degrade mode {mode!r}: choose one of {DEGRADE_MODES}")


@torch.no_grad()
def resample_autoregressive(model: DiT, clip, context, t_s, steps=1, generator=None):
    """Eq. 5, autoregressive self-resampling: x~^i = x^i_{t_s} denoised to 0, given x~^{<i}.

    clip: (B, F, C, H, W) ground truth
    t_s:  (B,) one simulation timestep per video
    The sampler's chunk step with the KV cache, started from x_{t_s} instead of noise: `steps`
    Euler steps, online weights, no CFG, no gradient. The last chunk is nobody's history: unchanged.
    """
    B, num_frames = clip.shape[:2]
    fpc = model.cfg.frames_per_chunk
    # [part: resample]
    text_kv = model.encode_text(context)
    cache = KVCache(model, num_frames - fpc, clip.shape[-2:])
    grid = resample_grid(t_s, steps, clip.device)                                   # (steps + 1, B)
    ts = grid[0][:, None].expand(B, fpc)
    out = clip.clone()
    for i in range(num_frames // fpc - 1):
        x0 = clip[:, i * fpc:(i + 1) * fpc]
        x = add_noise(x0, randn_like(x0, generator), ts)            # fresh noise, not the loss's
        x = euler(lambda x, t: model.forward_chunk(x, t, text_kv, cache), x, grid)
        model.forward_chunk(x, torch.zeros_like(ts), text_kv, cache, commit=True)    # x~^i at t = 0
        out[:, i * fpc:(i + 1) * fpc] = x
    return out
    # [end: resample]


def resample_grid(t_s, steps, device):
    """Self-resampling's Euler grid, from each video's t_s (B,) down to 0 -> (steps + 1, B)."""
    # NOTE(choice): with more steps, uniform from t_s to 0 (docs/method.md, "More than one resampling step").
    return t_s.to(device)[None] * torch.linspace(1, 0, steps + 1, device=device)[:, None]


# -- 7. History routing [RF] (Eqs. 8-9) ------------------------------------------------------------
# A long video has many history chunks, and most matter little to a given query. With routing on,
# every query token, in every layer and head, scores each earlier history chunk j by q . phi_j
# (phi_j: the mean of chunk j's keys) and reads its own chunk plus only the k best. No parameters,
# no gradient through the choice. A sliding window and an attention sink answer the same question.
# Routing narrows only the rule's earlier_history term (section 3): the own chunk is always read.

@dataclass(eq=False)
class Routing:
    """What a routed attention call needs besides q, k, v.

    chunk, stream: (Lk,) ids of every key token; the queries are the last Lq of them. The keys
                   open with num_history history chunks of chunk_tokens tokens each, in order
    backend: sdpa (the reference below) or a tuned path of kernels.py (two_branch, flex, varlen, flash)
    log: an object with add(selected, eligible), or None.
    """
    chunk: torch.Tensor
    stream: torch.Tensor
    chunk_tokens: int
    num_history: int
    top_k: int | None = None
    window: int | None = None
    sink: bool = False
    backend: str = "two_branch"
    log: object = None


def routed_attention(q, k, v, phi, routing: Routing):
    """Attention over each query's own chunk plus its routed history chunks: one softmax.

    q:    (B, Lq, nh, hd)
    k, v: (B, Lk, nh, hd)
    phi:  (B, J, nh, hd) the history chunks' mean keys, or None to take them from k
    Returns (B, Lq, nh, hd).
    """
    # NOTE(choice): every layer and head routes, history queries too (docs/method.md, "Every layer routes").
    T = routing.chunk_tokens
    if phi is None:
        phi = chunk_means(k[:, :routing.num_history * T], T)
    J = phi.shape[1]
    eligible = eligible_chunks(routing.chunk[-q.shape[1]:], J)                        # (Lq, J)
    selected = route(q, phi, eligible, routing.top_k, routing.window, routing.sink)
    if routing.log is not None:
        routing.log.add(selected, eligible)
    if routing.backend == "sdpa":
        return attention(q, k, v, routed_mask(selected, routing.chunk, routing.stream))
    return kernels.routed_attention(routing.backend, q, k, v, selected, routing.chunk,
                                    routing.stream, T, may_attend_routed, two_branch_attention)


def chunk_means(k, chunk_tokens):
    """phi of Eq. 8, the mean key of each chunk. k: (B, J T, nh, hd) -> (B, J, nh, hd) in fp32."""
    # NOTE(choice): phi pools the keys after q/k-norm and RoPE (docs/method.md, "φ pools the keys").
    return k.unflatten(1, (-1, chunk_tokens)).float().mean(2)


def eligible_chunks(q_chunk, num_history):
    """(Lq, J) bool: the history chunks the rule's earlier_history term lets each query read
    (never a later chunk, never H_i for Z_i). Routing chooses among these only."""
    j = torch.arange(num_history, device=q_chunk.device)
    return earlier_history(q_chunk[:, None], j[None], HISTORY)


def route(q, phi, eligible, top_k=None, window=None, sink=False):
    """The history chunks each query token reads besides its own: (B, nh, Lq, J) bool.

    eligible: (Lq, J) from eligible_chunks
    top_k:    the paper's router; window: the last w chunks; neither: all eligible chunks
    sink:     chunk 0 as well (not counted in k or w)
    """
    B, J, nh, _ = phi.shape
    if top_k is not None:
        selected = top_k_chunks(q, phi, eligible, top_k)
    else:
        selected = (window_chunks(eligible, window) if window is not None else eligible)
        selected = selected.expand(B, nh, -1, -1)
    if sink:
        selected = selected | (eligible & (torch.arange(J, device=eligible.device) == 0))
    return selected


@torch.no_grad()            # hard top-k has no gradient: only attention over the chosen keys learns
def top_k_chunks(q, phi, eligible, k):
    """Eq. 9: per query token and head, the k eligible chunks with the highest q . phi_j.

    q:        (B, Lq, nh, hd)
    phi:      (B, J, nh, hd)
    eligible: (Lq, J) bool
    Returns selected: (B, nh, Lq, J) bool.
    """
    # fp32 (in bf16, rounding would rank near-equal chunks); no 1/sqrt(hd): it changes no rank
    # [part: routing]
    score = torch.einsum("bqhd,bjhd->bhqj", q.float(), phi.float())                 # (B, nh, Lq, J)
    score = score.masked_fill(~eligible, -torch.inf)
    best = score.sort(dim=-1, descending=True, stable=True).indices[..., :k]   # ties: earlier chunk
    return torch.zeros_like(score, dtype=torch.bool).scatter_(-1, best, True) & eligible
    # [end: routing]


def window_chunks(eligible, w):
    """Sliding window: the last w eligible chunks of each query. (Lq, J) bool -> (Lq, J) bool."""
    later = eligible.flip(-1).cumsum(-1).flip(-1)                # eligible chunks at index >= j
    return eligible & (later <= w)


def may_attend_routed(q_chunk, q_stream, k_chunk, k_stream, chosen):
    """may_attend, except that an earlier_history key needs its chunk to be chosen."""
    past = earlier_history(q_chunk, k_chunk, k_stream)
    return may_attend(q_chunk, q_stream, k_chunk, k_stream) & (chosen | ~past)


def routed_mask(selected, chunk, stream):
    """The reference: routing as a dense bool mask (B, nh, Lq, Lk) for SDPA."""
    Lq = selected.shape[2]
    table = F.pad(selected, (0, 1))                 # False for keys of chunks >= J
    chosen = table[..., chunk.clamp(max=selected.shape[-1])]                       # (B, nh, Lq, Lk)
    q_chunk, q_stream = chunk[-Lq:, None], stream[-Lq:, None]
    return may_attend_routed(q_chunk, q_stream, chunk[None], stream[None], chosen)


# The paper's fast path computes routed attention as two branches: each query against its own
# chunk, and against its chosen history chunks. Each branch returns its log-sum-exp (LSE) too;
# the LSEs weigh the two outputs so that together they are one softmax over the union.

def two_branch_attention(q, k, v, selected, chunk_tokens, branches=None):
    """Routed attention as two branches merged through their LSEs.

    q:        (B, Lq, nh, hd), whole chunks of chunk_tokens tokens at the end of the keys
    k, v:     (B, Lk, nh, hd), opening with J history chunks
    selected: (B, nh, Lq, J)
    branches: plain_branches (default), or a tuned path of kernels.py: the same numbers
    Returns (B, Lq, nh, hd).
    """
    (o_own, l_own), (o_hist, l_hist) = (branches or plain_branches)(q, k, v, selected, chunk_tokens)
    o, _ = merge_lse(o_own, l_own, o_hist, l_hist)
    return o.to(v.dtype).transpose(1, 2)


def plain_branches(q, k, v, selected, chunk_tokens):
    """The two branches, written plainly -> (o, lse) of each: o (B, nh, Lq, hd), lse (B, nh, Lq)."""
    T, Lq, J = chunk_tokens, q.shape[1], selected.shape[-1]
    q, k, v = (x.transpose(1, 2) for x in (q, k, v))                                 # (B, nh, L, hd)
    own = [x[:, :, x.shape[2] - Lq:].unflatten(2, (-1, T)) for x in (q, k, v)]   # per chunk
    o_own, l_own = attention_lse(*own)
    history = attention_lse(q, k[:, :, :J * T], v[:, :, :J * T], mask=selected.repeat_interleave(T, dim=-1))
    return (o_own.flatten(2, 3), l_own.flatten(2, 3)), history


def attention_lse(q, k, v, mask=None):
    """Softmax attention that also returns the log-sum-exp of its scaled scores.

    q: (..., Lq, hd); k, v: (..., Lk, hd); mask: (..., Lq, Lk) bool or None
    Returns o (..., Lq, hd) and lse (..., Lq), fp32. A query with no key gets o = 0, lse = -inf.
    """
    s = ((q * q.shape[-1] ** -0.5) @ k.transpose(-1, -2)).float()                    # (..., Lq, Lk)
    if mask is not None:
        s = s.masked_fill(~mask, -torch.inf)
    lse = s.logsumexp(-1)                                                             # (..., Lq)
    p = torch.exp(s - lse[..., None]).nan_to_num(0.0)                           # no key: 0, not nan
    return (p.to(v.dtype) @ v).float(), lse


def merge_lse(o_a, l_a, o_b, l_b):
    """Attentions over two disjoint key sets -> the attention over their union.

    o: (..., hd), l: (...) log-sum-exp. One softmax over the union weighs branch a by
    e^l_a / (e^l_a + e^l_b). Subtracting the larger l keeps every exponential <= 1; a branch with
    no keys (l = -inf) weighs 0.
    """
    # [part: routing]
    top = torch.maximum(l_a, l_b).detach()    # for stability only: the result does not depend on it
    w_a, w_b = torch.exp(l_a - top), torch.exp(l_b - top)                         # one of them is 1
    total = w_a + w_b
    o = (w_a[..., None] * o_a.float() + w_b[..., None] * o_b.float()) / total[..., None]
    return o, top + total.log()
    # [end: routing]
