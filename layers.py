"""
layers.py -- Wan2.1's building blocks that Resampling Forcing leaves as they are.

rf.py builds its DiT from these: the norms, the timestep sinusoid and the 3-D rotary position
embedding (RoPE), each computed as Wan2.1 computes it, so that Wan's weights give Wan's numbers.
"""

import torch
import torch.nn as nn


class LayerNorm(nn.LayerNorm):
    """fp32 math, the result in the input's dtype."""
    def forward(self, x):
        return super().forward(x.float()).type_as(x)


class RMSNorm(nn.Module):
    """Wan's q/k norm: RMS over the full width D (all heads), fp32 math."""
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        rms = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return ((xf * rms).type_as(x) * self.weight).type_as(x)


def sinusoid(dim, t):
    """Wan's timestep sinusoid, [cos, sin] in float64. t: any shape -> (*t.shape, dim)."""
    half = dim // 2
    freqs = torch.pow(10000, -torch.arange(half, dtype=torch.float64, device=t.device) / half)
    angles = t.double()[..., None] * freqs
    return torch.cat([angles.cos(), angles.sin()], dim=-1)


def rope_cos_sin(pos, h, w, head_dim):
    """3-D RoPE: each head split into frame / row / column parts (Wan: 44 / 42 / 42).
    pos: (Fp,) frame positions; rows 0..h-1, columns 0..w-1
    Returns cos, sin: (L, 1, hd / 2), L = Fp h w."""
    d_hw = 2 * (head_dim // 6)

    def angles(p, d):                                                        # (Fp, h, w, d / 2)
        freqs = 10000.0 ** (-torch.arange(0, d, 2, dtype=torch.float64, device=p.device) / d)
        return p.double()[..., None] * freqs

    rows, cols = torch.arange(h, device=pos.device), torch.arange(w, device=pos.device)
    axes = torch.meshgrid(pos, rows, cols, indexing="ij")                          # (Fp, h, w) each
    a = torch.cat([angles(p, d) for p, d in zip(axes, (head_dim - 2 * d_hw, d_hw, d_hw))], dim=-1)
    a = a.flatten(0, 2)[:, None, :]                                                   # (L, 1, hd/2)
    return a.cos().float(), a.sin().float()


def apply_rope(x, cos, sin):
    """Rotate interleaved pairs (x[2i], x[2i+1]): Wan's complex layout, not NeoX halves."""
    x1, x2 = x.float().unflatten(-1, (-1, 2)).unbind(-1)                          # (B, L, nh, hd/2)
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2).type_as(x)


def fp32(device_type):
    """Autocast off: the enclosed math runs in the dtype of its (fp32) inputs."""
    return torch.autocast(device_type, enabled=False)
