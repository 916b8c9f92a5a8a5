"""
checks.py -- rf.py's input checks: each mistake a one-line ValueError that says what to pass instead.

Kept apart so that rf.py reads as the method; rf.py calls these at its public entry points.
"""


def config(cfg, degrade_modes, train_t):
    """rf.Config's fields, each mistake a one-line ValueError."""
    for name in ("dim", "ffn_dim", "freq_dim", "num_heads", "num_layers", "text_len",
                 "text_dim", "in_dim", "out_dim", "patch_size", "frames_per_chunk",
                 "frame_size", "resample_steps", "sample_steps"):
        value = getattr(cfg, name)
        if min(value if isinstance(value, tuple) else (value,)) < 1:
            raise ValueError(f"{name}={value} must be >= 1")
    for name in ("resample_shift", "train_shift", "sample_shift"):
        if getattr(cfg, name) <= 0:
            raise ValueError(f"{name}={getattr(cfg, name)} must be > 0")
    if cfg.dim % cfg.num_heads or (cfg.dim // cfg.num_heads) % 2:
        raise ValueError(f"dim={cfg.dim} must split into num_heads={cfg.num_heads} "
                         f"heads of even width")
    if cfg.patch_size[0] != 1:
        raise ValueError("patch_size[0] must be 1: every frame carries its own noise level t")
    if cfg.degrade not in degrade_modes:
        raise ValueError(f"degrade={cfg.degrade!r}: choose one of {degrade_modes}")
    if cfg.train_t not in train_t:
        raise ValueError(f"train_t={cfg.train_t!r}: choose one of {train_t}")
    for name in ("top_k", "window"):
        value = getattr(cfg, name)
        if value is not None and value < 1:
            raise ValueError(f"{name}={value} must be >= 1 (None = dense attention)")
    if cfg.top_k is not None and cfg.window is not None:
        raise ValueError(f"top_k={cfg.top_k} and window={cfg.window} are two routing rules: "
                         f"set only one")
    if cfg.sink and not cfg.routed:
        raise ValueError("sink=True adds chunk 0 to a routing rule: "
                         "set top_k or window as well")


def video(cfg, x, t, rope_len, history=None, first=0):
    """A DiT input x (B, F, C, H, W) at t (B, F) (and its history), its first frame at RoPE position
    `first`, each mistake a one-line ValueError."""
    if x.ndim != 5 or x.shape[2] != cfg.in_dim:
        raise ValueError(f"x must be (B, F, {cfg.in_dim}, H, W), got {tuple(x.shape)}")
    B, num_frames, _, H, W = x.shape
    patches_fit(cfg, H, W, "crop or resize frames to a multiple of it")
    if num_frames % cfg.frames_per_chunk:
        raise ValueError(f"{num_frames} frames is not a multiple of "
                         f"frames_per_chunk={cfg.frames_per_chunk}")
    if first + num_frames > rope_len:
        raise ValueError(f"frame {first + num_frames} is past the RoPE table ({rope_len} positions): "
                         f"generate at most {rope_len} frames")
    if history is not None and history.shape != x.shape:
        raise ValueError(f"history must have the shape of x {tuple(x.shape)}, got {tuple(history.shape)}")
    if tuple(t.shape) != (B, num_frames):
        raise ValueError(f"t must be (B, F) = ({B}, {num_frames}), one noise level per frame; "
                         f"got {tuple(t.shape)}")


def generate_args(cfg, B, num_frames, prefix, H, W, rope_len, cfg_scale=1.0, neg_context=None):
    """generate's arguments, each mistake a one-line ValueError that says what to pass instead."""
    fpc, n_prefix = cfg.frames_per_chunk, 0 if prefix is None else prefix.shape[1]
    if cfg_scale != 1.0 and neg_context is None:
        raise ValueError("cfg_scale != 1 needs neg_context (the unconditional prompt's features)")
    patches_fit(cfg, H, W, "pass a size that is a multiple of it")
    want = (B, cfg.in_dim, H, W)
    if prefix is not None and (prefix.ndim != 5 or (prefix.shape[0], *prefix.shape[2:]) != want):
        raise ValueError(f"prefix must be (B, P, C, H, W) = ({B}, P, {cfg.in_dim}, {H}, {W}), "
                         f"got {tuple(prefix.shape)}")
    if num_frames % fpc or n_prefix % fpc:
        raise ValueError(f"num_frames={num_frames} and prefix frames={n_prefix} must be "
                         f"multiples of frames_per_chunk={fpc}")
    if not n_prefix < num_frames <= rope_len:
        raise ValueError(f"num_frames={num_frames} must exceed the prefix ({n_prefix}) and be "
                         f"at most the RoPE table length {rope_len}")


def context(cfg, context):
    """Text features (B, Lt, text_dim) with Lt <= text_len."""
    if context.ndim != 3 or context.shape[-1] != cfg.text_dim or context.shape[1] > cfg.text_len:
        raise ValueError(f"context must be (B, <= {cfg.text_len}, {cfg.text_dim}), got {tuple(context.shape)}")


def patches_fit(cfg, H, W, fix):
    """An H x W frame cuts into whole patches; `fix` says what to do when it does not."""
    if H % cfg.patch_size[1] or W % cfg.patch_size[2]:
        raise ValueError(f"frame size {H}x{W} is not divisible by the patch size {cfg.patch_size[1:]}: {fix}")
