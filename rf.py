"""
rf.py -- Resampling Forcing: the method in one file.

Y. Guo et al., "End-to-End Training for Autoregressive Video Diffusion via Self-Resampling",
arXiv 2512.15702 (2025), on Wan2.1-T2V-1.3B (arXiv 2503.20314).

A video is made chunk by chunk, each chunk attending to the finished ones. Teacher forcing trains
on a ground-truth history; Resampling Forcing on a history the model degraded itself: each history
chunk noised to t_s and denoised back (no gradient), given the chunks degraded before it.

Sections: 1 config, 2 flow matching, 3 the mask rule, 4 the DiT (Wan's norms and RoPE: layers.py),
5 sampling with a KV cache, 6 Resampling Forcing (Algorithm 1), 7 history routing (optional).

Conventions (one meaning per name)
    B batch, F frames, C channels, H x W frame size; N chunks, J history chunks
    L tokens, S tokens a frame, D width, nh heads, hd head width
    fpc frames per chunk; Fp frames in one forward (history and noisy)
    videos (B, F, C, H, W); noise levels t (B, F), one per frame, equal within a chunk
    t = 0 clean, t = 1 noise; x_t = (1 - t) x0 + t eps; the model predicts v = eps - x0
    a chunk: frames_per_chunk frames made together (the paper's "frame")
    [RF] marks a departure from Wan2.1; `# [part: NAME]`: a course-kit part (kit/)
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
import fast_attn
from layers import LayerNorm, RMSNorm, apply_rope, fp32, rope_cos_sin, sinusoid

ROPE_LEN = 1024  # Wan's RoPE table: at most 1024 (latent) frames


# -- 1. Config and presets --

@dataclass
class Config:
    # Wan2.1's DiT, named as in its config.json
    dim: int = 1536
    ffn_dim: int = 8960
    freq_dim: int = 256
    num_heads: int = 12
    num_layers: int = 30
    text_len: int = 512
    text_dim: int = 4096
    in_dim: int = 16                   # Wan: latent channels; toy: RGB
    out_dim: int = 16
    patch_size: tuple = (1, 2, 2)      # (frames, height, width) per token
    eps: float = 1e-6
    # autoregressive video
    frames_per_chunk: int = 3          # [RF] frames denoised together
    frame_size: tuple = (60, 104)      # (H, W) sampled: 480x832 pixels / 8
    # Resampling Forcing (Algorithm 1)
    degrade: str = "autoregressive"    # the history: see degrade_history
    resample_shift: float = 0.6        # s of Eq. 7 for t_s
    resample_steps: int = 1
    noise_aug_max: float = 0.1
    train_t: str = "uniform"           # or logit_normal
    train_shift: float = 1.0
    # sampling (paper: 32 Euler steps, shift 5, CFG 5)
    sample_steps: int = 32
    sample_shift: float = 5.0
    sample_cfg: float = 5.0
    # history routing (section 7; the paper's last stage uses top_k=5)
    top_k: int | None = None           # [RF] read the k best history chunks; None = all
    window: int | None = None          # ablation: the last `window` chunks instead
    sink: bool = False                 # ablation: history chunk 0 too

    def __post_init__(self):
        self.patch_size, self.frame_size = tuple(self.patch_size), tuple(self.frame_size)  # JSON
        checks.config(self, DEGRADE_MODES, TRAIN_T)

    @property
    def routed(self) -> bool:
        return self.top_k is not None or self.window is not None


DEGRADE_MODES = ("none", "noise", "parallel", "autoregressive")
TRAIN_T = ("uniform", "logit_normal")

PRESETS = {
    # For a 2-core CPU: 16x16 RGB frames (the pixels are the latents), 4x4 patches.
    # NOTE(choice): t shifted by 3 toward noise (docs/method.md, "The toy's training t").
    "toy": dict(dim=128, ffn_dim=512, freq_dim=64, num_heads=4, num_layers=4, text_len=8,
                text_dim=64, in_dim=3, out_dim=3, patch_size=(1, 4, 4), frames_per_chunk=2,
                frame_size=(16, 16), train_shift=3.0, sample_steps=16, sample_shift=1.0,
                sample_cfg=3.0),
    # The real model: 1,418,996,800 parameters, 825 checkpoint keys.
    # NOTE(choice): t uniform, shifted by 5 (docs/method.md, "Wan's training t").
    "wan2.1-t2v-1.3b": dict(train_t="uniform", train_shift=5.0),
}


def preset(name: str, **overrides) -> Config:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}: choose one of {sorted(PRESETS)}")
    return Config(**{**PRESETS[name], **overrides})


# -- 2. Flow matching (rectified flow) --

def add_noise(x0, eps, t):
    """Eq. 3, one noise level per frame.
    x0, eps: (B, F, C, H, W)
    t:       (B, F)"""
    t = t[:, :, None, None, None]
    return (1 - t) * x0 + t * eps


def shift_t(t, s):
    """Eq. 7. s > 1 moves mass toward noise, s < 1 toward clean."""
    return s * t / (1 + (s - 1) * t)


def draw(fn, shape, generator=None):
    """fn(shape), fn = torch.rand | randn; the generator may be a train.BatchSlice."""
    if generator is None or isinstance(generator, torch.Generator):
        return fn(shape, generator=generator)
    return generator.draw(fn, shape)


def randn_like(x, generator):
    """Noise like x, drawn on the CPU: the same numbers on every device."""
    return draw(torch.randn, x.shape, generator).to(x.device, x.dtype)


def logit_normal(shape, generator=None):
    return torch.sigmoid(draw(torch.randn, shape, generator))


def sample_train_t(cfg: Config, batch, num_chunks, generator=None):
    """Algorithm 1, line 6: one training t per chunk, each drawn apart -> (B, N)."""
    # NOTE(choice): t^i uniform (docs/method.md, "The training t^i").
    shape, uniform = (batch, num_chunks), cfg.train_t == "uniform"
    u = draw(torch.rand, shape, generator) if uniform else logit_normal(shape, generator)
    return shift_t(u, cfg.train_shift)


def time_grid(steps, shift):
    """The sampler's Euler grid, shifted, from 1 (noise) to 0."""
    return shift_t(torch.linspace(1, 0, steps + 1, dtype=torch.float64), shift).float()


def euler(velocity, x, grid):
    """Integrate dx/dt = v (Eq. 2) from grid[0] down to grid[-1].
    velocity: (x, t) -> v, t of shape (B, F)
    x:        (B, F, C, H, W) at time grid[0]
    grid:     (steps + 1, B), one grid per video"""
    # [part: sampler]
    for s, s_next in zip(grid[:-1], grid[1:]):
        t = s[:, None].expand(x.shape[:2])                                          # (B, F)
        x = x + (s_next - s).view(-1, 1, 1, 1, 1) * velocity(x, t)
    return x
    # [end: sampler]


# -- 3. Who sees whom: one rule for every layout --
# Every token has a chunk and a stream. The two-stream forward [RF] lays out [history ; noisy];
# the block-causal forward is all HISTORY.

HISTORY, NOISY = 0, 1


def may_attend(q_chunk, q_stream, k_chunk, k_stream):
    """Own chunk in own stream, or an earlier history chunk: Z_i sees Z_i, H_<i, never H_i."""
    # [part: mask]
    own_chunk = (q_chunk == k_chunk) & (q_stream == k_stream)
    return own_chunk | earlier_history(q_chunk, k_chunk, k_stream)
    # [end: mask]


def earlier_history(q_chunk, k_chunk, k_stream):
    """The rule's second term, which routing narrows (section 7)."""
    # [part: mask]
    return (k_stream == HISTORY) & (k_chunk < q_chunk)
    # [end: mask]


def block_causal_layout(num_frames, fpc, device):
    """(chunk, stream) id of every frame of the block-causal forward."""
    chunk = torch.arange(num_frames, device=device) // fpc
    return chunk, torch.full_like(chunk, HISTORY)


def dense_mask(chunk, stream):
    """(L,) chunk and stream ids -> (L, L) bool, True = may attend (as SDPA reads it)."""
    return may_attend(chunk[:, None], stream[:, None], chunk[None, :], stream[None, :])


def attention(q, k, v, mask=None):
    """Softmax attention. Returns (B, Lq, nh, hd).
    q:    (B, Lq, nh, hd)
    k, v: (B, Lk, nh, hd)
    mask: None (all keys), a bool (Lq, Lk) tensor or a flex BlockMask"""
    fn = fast_attn.flex_attention if isinstance(mask, BlockMask) else F.scaled_dot_product_attention
    return fn(*(x.transpose(1, 2) for x in (q, k, v)), mask).transpose(1, 2)       # via (B, nh, L, hd)


# -- 4. The Wan2.1 DiT --
# Module names are the checkpoint's keys; as in Wan, some math stays fp32 under autocast.

def modulate(x, shift, scale):
    """x * (1 + scale) + shift, one (shift, scale) per frame [RF].
    x:            (B, L, D)
    shift, scale: (B, Fp, 1, D)"""
    # [part: frame_t]
    return (x.unflatten(1, (shift.shape[1], -1)) * (1 + scale) + shift).flatten(1, 2)
    # [end: frame_t]


def gate(y, g):
    """y * g, one g per frame [RF]. y: (B, L, D); g: (B, Fp, 1, D)."""
    # [part: frame_t]
    return (y.unflatten(1, (g.shape[1], -1)) * g).flatten(1, 2)
    # [end: frame_t]


class SelfAttention(nn.Module):
    def __init__(self, dim, num_heads, eps):
        super().__init__()
        self.num_heads = num_heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q, self.norm_k = RMSNorm(dim, eps), RMSNorm(dim, eps)

    def heads(self, x):
        return x.unflatten(-1, (self.num_heads, -1))                             # (B, L, nh, hd)

    def forward(self, x, rope, mask, cache=None, routing=None):
        q, k = self.heads(self.norm_q(self.q(x))), self.heads(self.norm_k(self.k(x)))
        q, k, v = apply_rope(q, *rope), apply_rope(k, *rope), self.heads(self.v(x))
        if cache is not None:            # [RF] prepend the finished chunks (cached after RoPE)
            k, v = cache.extend(k, v)                                          # (B, Lc + L, nh, hd)
        if routing is not None:                                    # [RF] history routing, section 7
            phi = cache.mean_keys() if cache is not None else None
            return self.o(routed_attention(q, k, v, phi, routing).flatten(2))
        return self.o(attention(q, k, v, mask).flatten(2))                              # (B, L, D)


class CrossAttention(SelfAttention):
    def kv(self, context):
        """Text K/V: they depend only on the prompt."""
        return self.heads(self.norm_k(self.k(context))), self.heads(self.v(context))

    def forward(self, x, text_kv):
        q = self.heads(self.norm_q(self.q(x)))                              # no RoPE, no mask
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
        # x: (B, L, D) residual stream (fp32); t_mod: (B, Fp, 6, D), one per frame [RF]
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
        # t_emb: (B, Fp, D), before the SiLU and projection
        with fp32(x.device.type):
            m = self.modulation.unsqueeze(0) + t_emb.float().unsqueeze(2)            # (B, Fp, 2, D)
            shift, scale = m.unsqueeze(3).unbind(2)
            return self.head(modulate(self.norm(x.float()), shift, scale))


class DiT(nn.Module):
    """Wan2.1's text-to-video DiT, causal over chunks, with a noise level per frame [RF]."""

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
        self.attn_backend = "auto"       # see fast_attn.ATTN_BACKENDS
        self.routing_log = None          # media.RoutingLog sees every choice
        self.init_weights()

    def init_weights(self):
        """Wan's initialisation, which the toy trains from."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.xavier_uniform_(self.patch_embedding.weight.flatten(1))
        for m in [*self.text_embedding, *self.time_embedding]:
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
        nn.init.zeros_(self.head.head.weight)

    def forward(self, x, t, context, history):
        """The two-stream training forward [RF]: [history ; x] in one pass. Returns v like x.
        x:       (B, F, C, H, W) noisy frames
        t:       (B, F) their noise levels
        context: (B, Lt, text_dim) text features
        history: (B, F, C, H, W) the ground truth or a degraded copy"""
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
        mask, routing = self._attention_rule(chunk, stream, self.tokens_per_frame(*x.shape[-2:]))
        return self._forward(frames, t_all, pos, self.encode_text(context), mask, routing,
                             n_out=num_frames)

    def forward_causal(self, x, t, context):
        """Block-causal: chunk i sees chunks <= i. Shapes as in forward."""
        checks.video(self.cfg, x, t, ROPE_LEN)
        layout = block_causal_layout(x.shape[1], self.cfg.frames_per_chunk, x.device)
        mask, routing = self._attention_rule(*layout, self.tokens_per_frame(*x.shape[-2:]))
        pos = torch.arange(x.shape[1], device=x.device)
        return self._forward(x, t, pos, self.encode_text(context), mask, routing, n_out=x.shape[1])

    def forward_chunk(self, x, t, text_kv, cache, commit=False):
        """One chunk against the KV cache (section 5). Returns v like x.
        x:       (B, fpc, C, H, W) at t: (B, fpc)
        text_kv: encode_text(context)
        cache:   a KVCache; commit=True keeps this chunk's K/V (finished, at t = 0)"""
        fpc, S = x.shape[1], self.tokens_per_frame(*x.shape[-2:])
        checks.video(self.cfg, x, t, ROPE_LEN, first=cache.frames)
        pos = torch.arange(cache.frames, cache.frames + fpc, device=x.device)
        layout = block_causal_layout(cache.frames + fpc, fpc, x.device)
        # every cached key is allowed, unless routing narrows them
        mask, routing = self._attention_rule(*layout, S) if self.cfg.routed else (None, None)
        v = self._forward(x, t, pos, text_kv, mask, routing, n_out=fpc, cache=cache)
        if commit:
            cache.commit(fpc, tokens=fpc * S)
        return v

    def encode_text(self, context):
        """(B, Lt, text_dim) -> per-layer (K, V), the text zero-padded to text_len as in Wan."""
        checks.context(self.cfg, context)
        padded = F.pad(context, (0, 0, 0, self.cfg.text_len - context.shape[1]))
        ctx = self.text_embedding(padded)                                         # (B, text_len, D)
        return [block.cross_attn.kv(ctx) for block in self.blocks]

    def tokens_per_frame(self, H, W):
        return (H // self.cfg.patch_size[1]) * (W // self.cfg.patch_size[2])

    def _forward(self, frames, t, pos, text_kv, mask, routing, n_out, cache=None):
        """The layers, for any layout -> v of the last n_out frames.
        frames: (B, Fp, C, H, W)
        t:      (B, Fp) their noise levels
        pos:    (Fp,) their RoPE frame positions"""
        H, W = frames.shape[-2:]
        h, w = H // self.cfg.patch_size[1], W // self.cfg.patch_size[2]
        x = self.patch_embedding(rearrange(frames, "b f c h w -> b c f h w"))     # (B, D, Fp, h, w)
        x = rearrange(x, "b d f h w -> b (f h w) d")                                  # (B, L, D)
        with fp32(x.device.type):
            t_emb = sinusoid(self.cfg.freq_dim, 1000 * t).float()
            t_emb = self.time_embedding(t_emb)                                        # [RF] (B, Fp, D)
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

    def _attention_rule(self, chunk, stream, S):
        """Section 3's rule for per-frame ids, on S tokens a frame: (mask, routing), one None."""
        chunk, stream = chunk.repeat_interleave(S), stream.repeat_interleave(S)
        if self.cfg.routed:                                                    # [RF] section 7
            T = self.cfg.frames_per_chunk * S
            return None, Routing(chunk, stream, T, int((stream == HISTORY).sum()) // T,
                                 self.cfg.top_k, self.cfg.window, self.cfg.sink,
                                 fast_attn.routed_backend(self.attn_backend), self.routing_log)
        if bool((chunk == chunk[0]).all() & (stream == stream[0]).all()):
            return None, None        # one chunk, one stream: no mask (Wan's forward)
        if self.attn_backend == "flex" or (self.attn_backend == "auto" and chunk.is_cuda):
            layout = tuple(chunk.tolist()), tuple(stream.tolist())
            return fast_attn.flex_block_mask(may_attend, *layout, str(chunk.device)), None
        return dense_mask(chunk, stream), None


# -- 5. Sampling: the KV cache and generate --

class LayerKV:
    """One layer's K/V of the finished chunks and [RF] their mean keys."""

    def __init__(self, max_tokens):
        self.max_tokens, self.length, self.chunks = max_tokens, 0, 0
        self.k = self.v = self.phi = None

    @torch.compiler.disable    # eager: a compiled graph could keep a stale copy of the ints
    def extend(self, k, v):
        """Write this chunk's (B, L, nh, hd) K/V after the committed ones; return all of them."""
        if self.k is None:
            self.k = k.new_zeros(k.shape[0], self.max_tokens, *k.shape[2:])
            self.v = torch.zeros_like(self.k)
            num_chunks = self.max_tokens // k.shape[1]
            self.phi = self.k.new_zeros(k.shape[0], num_chunks, *k.shape[2:], dtype=torch.float)
        # [part: sampler]
        end = self.length + k.shape[1]
        self.k[:, self.length:end], self.v[:, self.length:end] = k, v
        return self.k[:, :end], self.v[:, :end]
        # [end: sampler]

    def commit(self, tokens):
        """Keep the chunk written last (`tokens` K/V) and its mean key."""
        new = self.k[:, self.length:self.length + tokens]
        self.phi[:, self.chunks] = chunk_means(new, tokens)[:, 0]
        self.length += tokens
        self.chunks += 1

    @torch.compiler.disable
    def mean_keys(self):
        """(B, J, nh, hd) mean keys of the committed chunks."""
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
    """A video made chunk by chunk, the prefix included: (B, num_frames, C, H, W).
    context:     (B, Lt, text_dim) prompt features
    neg_context: the empty prompt's features, for cfg_scale != 1
    steps, shift, cfg_scale: default cfg.sample_*
    prefix:      (B, P, C, H, W) clean frames to continue
    size:        (H, W), default the prefix's or cfg.frame_size
    use_cache:   False recomputes all frames every step (slower, same video)
    progress:    callable(chunk_index) after each chunk"""
    cfg, fpc = model.cfg, model.cfg.frames_per_chunk
    steps, shift, cfg_scale = (cfg.sample_steps if steps is None else steps,
                               cfg.sample_shift if shift is None else shift,
                               cfg.sample_cfg if cfg_scale is None else cfg_scale)
    device = next(model.parameters()).device
    B, n_prefix = context.shape[0], 0 if prefix is None else prefix.shape[1]
    H, W = size or (prefix.shape[-2:] if prefix is not None else cfg.frame_size)
    checks.generate_args(cfg, B, num_frames, prefix, H, W, ROPE_LEN, cfg_scale, neg_context)
    velocity = Velocity(model, context, neg_context, cfg_scale, num_frames, (H, W), use_cache)
    noise = torch.Generator().manual_seed(seed)
    grid = time_grid(steps, shift).to(device)[:, None].expand(-1, B)                # (steps + 1, B)
    for chunk in [] if prefix is None else prefix.to(device).split(fpc, dim=1):
        velocity.finish(chunk)
    for i in range(n_prefix // fpc, num_frames // fpc):
        x = draw(torch.randn, (B, fpc, cfg.in_dim, H, W), noise).to(device)
        velocity.finish(euler(velocity, x, grid), last=i == num_frames // fpc - 1)
        if progress:
            progress(i)
    return torch.cat(velocity.video, dim=1)


class Velocity:
    """generate's v(x, t) of the current chunk: guidance and the KV cache."""

    def __init__(self, model, context, neg_context, cfg_scale, num_frames, size, use_cache):
        self.model, self.cfg_scale, self.video = model, cfg_scale, []
        self.guided = cfg_scale != 1.0
        if self.guided:
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


# -- 6. Resampling Forcing (Algorithm 1) --

def training_loss(model: DiT, clip, context, mode=None, generator=None):
    """Eq. 4, the Resampling Forcing (or teacher forcing) loss.
    clip:      (B, F, C, H, W) clean frames
    context:   (B, Lt, text_dim)
    mode:      the history's degradation (default cfg.degrade)
    generator: the source of every random draw
    Returns the loss, and per chunk (B, N) its loss and t, for the log."""
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
    """The history the noisy chunks see, (B, F, C, H, W), by mode:
    none            teacher forcing: the ground truth
    noise           x_tau, tau ~ U(0, noise_aug_max) per video
    parallel        all chunks resampled at once from the ground truth
    autoregressive  chunk i resampled given the resampled chunks < i"""
    cfg, (B, num_frames) = model.cfg, clip.shape[:2]
    if mode == "none":
        return clip
    if mode == "noise":
        tau = draw(torch.rand, (B, 1), generator).expand(B, num_frames).to(clip.device)
        return add_noise(clip, randn_like(clip, generator), tau * cfg.noise_aug_max)
    # Algorithm 1, lines 2-3: one simulation timestep per video
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
    """Eq. 5: x~^i = x^i_{t_s} denoised to 0 given x~^{<i}: the sampler's chunk step, `steps`
    Euler steps from x_{t_s}, online weights, no CFG. The last chunk is nobody's history: it is
    returned as it came.
    clip: (B, F, C, H, W) ground truth
    t_s:  (B,) one simulation timestep per video"""
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
    """Self-resampling's Euler grid from each t_s (B,) down to 0 -> (steps + 1, B)."""
    # NOTE(choice): uniform from t_s to 0 (docs/method.md, "More than one resampling step").
    return t_s.to(device)[None] * torch.linspace(1, 0, steps + 1, device=device)[:, None]


# -- 7. History routing [RF] (Eqs. 8-9) --
# Each query reads its own chunk plus the k earlier chunks of highest q . phi_j (mean keys).

@dataclass(eq=False)
class Routing:
    """chunk, stream: (Lk,) key ids, the queries the last Lq; history chunks first."""
    chunk: torch.Tensor
    stream: torch.Tensor
    chunk_tokens: int
    num_history: int
    top_k: int | None = None
    window: int | None = None
    sink: bool = False
    backend: str = "two_branch"        # sdpa (the reference) or a fast_attn.py path
    log: object = None                 # add(selected, eligible) sees every choice


def routed_attention(q, k, v, phi, routing: Routing):
    """One softmax over each query's own chunk and its routed history chunks -> (B, Lq, nh, hd).
    q:    (B, Lq, nh, hd)
    k, v: (B, Lk, nh, hd)
    phi:  (B, J, nh, hd) the history chunks' mean keys, or None: from k"""
    # NOTE(choice): every layer and head routes (docs/method.md, "Every layer routes").
    T, chunk, stream = routing.chunk_tokens, routing.chunk, routing.stream
    if phi is None:
        phi = chunk_means(k[:, :routing.num_history * T], T)
    eligible = eligible_chunks(chunk[-q.shape[1]:], phi.shape[1])                    # (Lq, J)
    selected = route(q, phi, eligible, routing.top_k, routing.window, routing.sink)
    if routing.log is not None:
        routing.log.add(selected, eligible)
    if routing.backend == "sdpa":
        return attention(q, k, v, routed_mask(selected, chunk, stream))
    if routing.backend == "flex":
        return attention(q, k, v, fast_attn.flex_routed_mask(may_attend_routed, selected, chunk, stream))
    return two_branch_attention(q, k, v, selected, T, fast_attn.routed_branches(routing.backend))


def chunk_means(k, chunk_tokens):
    """phi of Eq. 8, each chunk's mean key: (B, J T, nh, hd) -> (B, J, nh, hd), fp32."""
    # NOTE(choice): after q/k-norm and RoPE (docs/method.md, "φ pools the keys").
    return k.unflatten(1, (-1, chunk_tokens)).float().mean(2)


def eligible_chunks(q_chunk, num_history):
    """(Lq, J) bool: the history chunks earlier_history lets each query read."""
    j = torch.arange(num_history, device=q_chunk.device)
    return earlier_history(q_chunk[:, None], j[None], HISTORY)


def route(q, phi, eligible, top_k=None, window=None, sink=False):
    """The history chunks each query token reads besides its own: (B, nh, Lq, J) bool.
    eligible: (Lq, J) from eligible_chunks
    top_k:    the paper's router; window: the last w chunks; neither: all
    sink:     chunk 0 too (not counted in k or w)"""
    B, J, nh, _ = phi.shape
    if top_k is not None:
        selected = top_k_chunks(q, phi, eligible, top_k)
    else:                                         # the last `window` eligible chunks, or all
        later = eligible.flip(-1).cumsum(-1).flip(-1)          # eligible chunks at index >= j
        selected = eligible & (later <= window) if window is not None else eligible
        selected = selected.expand(B, nh, -1, -1)
    if sink:
        selected = selected | (eligible & (torch.arange(J, device=eligible.device) == 0))
    return selected


@torch.no_grad()                       # hard top-k: only attention over the chosen keys learns
def top_k_chunks(q, phi, eligible, k):
    """Eq. 9: per query token and head, the k eligible chunks of highest q . phi_j.
    q:        (B, Lq, nh, hd)
    phi:      (B, J, nh, hd)
    eligible: (Lq, J) bool
    Returns selected: (B, nh, Lq, J) bool."""
    # fp32 (bf16 would round near-equal scores); no 1/sqrt(hd): it changes no rank
    # [part: routing]
    score = torch.einsum("bqhd,bjhd->bhqj", q.float(), phi.float())                 # (B, nh, Lq, J)
    score = score.masked_fill(~eligible, -torch.inf)
    best = score.sort(dim=-1, descending=True, stable=True).indices[..., :k]   # ties: earlier chunk
    return torch.zeros_like(score, dtype=torch.bool).scatter_(-1, best, True) & eligible
    # [end: routing]


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


def two_branch_attention(q, k, v, selected, chunk_tokens, branches=None):
    """The paper's fast path: the own chunk and the chosen history chunks as two attentions,
    merged by their log-sum-exps (LSE) into one softmax. Returns (B, Lq, nh, hd).
    q:        (B, Lq, nh, hd), whole chunks at the end of the keys
    k, v:     (B, Lk, nh, hd), opening with J history chunks
    selected: (B, nh, Lq, J)
    branches: fast_attn.plain_branches (default) or a tuned path"""
    branches = branches or fast_attn.plain_branches
    (o_own, l_own), (o_hist, l_hist) = branches(q, k, v, selected, chunk_tokens)
    o, _ = merge_lse(o_own, l_own, o_hist, l_hist)
    return o.to(v.dtype).transpose(1, 2)


def merge_lse(o_a, l_a, o_b, l_b):
    """Attentions over two disjoint key sets -> over their union. o: (..., hd), l: (...) LSE.
    Branch a weighs e^l_a / (e^l_a + e^l_b); a branch with no keys (l = -inf) weighs 0."""
    # [part: routing]
    top = torch.maximum(l_a, l_b).detach()    # for stability only: the result does not depend on it
    w_a, w_b = torch.exp(l_a - top), torch.exp(l_b - top)                         # one of them is 1
    total = w_a + w_b
    o = (w_a[..., None] * o_a.float() + w_b[..., None] * o_b.float()) / total[..., None]
    return o, top + total.log()
    # [end: routing]
