"""
checkpoints.py -- self-describing checkpoints: safetensors for the weights, meta.json for everything else.

A checkpoint is a folder: one `{group}.safetensors` per group of tensors (dit, text_encoder, their EMAs, the
optimizer) and `meta.json` (config, vocabulary, training state). Nothing is pickled, so loading never runs code.
load_models rebuilds the toy's models from such a folder alone.
"""

import json
import os
import shutil
from dataclasses import asdict, fields, replace
from pathlib import Path

import torch.nn as nn

from rf import Config, DiT
from tiny_data.caption_encoder import CaptionEncoder


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
    meta = read_meta(path)
    try:
        tensors = {f.stem: load_file(str(f)) for f in sorted(path.glob("*.safetensors"))}
    except Exception as e:
        raise ValueError(f"checkpoint {path} is corrupt ({type(e).__name__}: {e}); {instead(path)}") from None
    return meta, tensors


def read_meta(path) -> dict:
    """A checkpoint folder's meta.json -> dict. A FileNotFoundError (one line) if there is none; a ValueError (one
    line, "...; use ...") if it is damaged."""
    path = Path(path)
    if not (path / "meta.json").is_file():
        if (path / "latest" / "meta.json").is_file():
            raise FileNotFoundError(f"{path} is a run folder, not a checkpoint: pass its last checkpoint, "
                                    f"{path / 'latest'}")
        raise FileNotFoundError(f"no checkpoint at {path} (expected {path}/meta.json): pass a folder written by "
                                f"train.py (e.g. runs/toy/latest after python train.py) or a shipped one "
                                f"(checkpoints/toy_tf, checkpoints/toy_ar_s0.6)")
    try:
        meta = json.loads((path / "meta.json").read_text())
    except (OSError, ValueError) as e:                     # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ValueError(f"checkpoint {path} is corrupt (meta.json: {type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}); {instead(path)}") from None
    if not isinstance(meta, dict):
        raise ValueError(f"checkpoint {path} is corrupt (meta.json holds a {type(meta).__name__}, not the "
                         f"checkpoint's description); {instead(path)}")
    return meta


def instead(path) -> str:
    """What to use instead of the damaged checkpoint `path`: "use an earlier one, e.g. OUT/step_N" when its run
    holds one."""
    path = Path(path)
    try:
        here = path.resolve()
        earlier = [p for p in saved_steps(here.parent) if p.resolve() != here and p.name < here.name]
    except OSError:
        earlier = []
    if earlier:
        return f"use an earlier one, e.g. {path.parent / earlier[-1].name}"
    return "use an earlier one (or another: the shipped ones are in checkpoints/)"


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
# paths in meta.json: relative to the repository when inside it, so a checkpoint reads the same on any machine
# ----------------------------------------------------------------------------------------------------------------

ROOT = Path(__file__).parent                        # the repository
PATH_FIELDS = ("data", "out", "cache", "resume", "wan", "text_encoder", "vae")    # train.py options that name files


def portable_paths(train: dict) -> dict:
    """train.py's settings for meta.json: each path option that names an existing file or folder, relative to the
    repository when inside it ("tiny_data/train.npz", "runs/toy"), absolute otherwise. Other values (a hub id,
    "latest", "") stay as they are."""
    train = dict(train)
    for name in PATH_FIELDS:
        value = train.get(name)
        if not value or value == "latest" or not Path(value).exists():
            continue
        path = Path(os.path.abspath(value))
        for p, root in ((path, Path(os.path.abspath(ROOT))), (path.resolve(), ROOT.resolve())):
            if p.is_relative_to(root):
                train[name] = str(p.relative_to(root))
                break
        else:
            train[name] = str(path)
    return train


def local_paths(train: dict) -> dict:
    """The inverse, when a run's settings are read back: a relative path that exists inside the repository becomes
    that absolute path, whatever the current folder."""
    train = dict(train)
    for name in PATH_FIELDS:
        value = train.get(name)
        if value and value != "latest" and isinstance(value, str) and not Path(value).is_absolute() \
                and (ROOT / value).exists():
            train[name] = str(ROOT.resolve() / value)
    return train


# ----------------------------------------------------------------------------------------------------------------
# checkpoint -> models
# ----------------------------------------------------------------------------------------------------------------

# The only model options a checkpoint's config lets a caller change: how the history is degraded and routed. They
# hold no weights, so a run may branch into a new stage (the evidence experiment trains every method from one shared
# teacher-forcing warm-up), and sampling may route differently from training.
ROUTING_FIELDS = ("top_k", "window", "sink")
STAGE_FIELDS = ("degrade", "resample_shift", "resample_steps", "noise_aug_max") + ROUTING_FIELDS


def checkpoint_config(saved: dict, overrides: dict, allowed, what) -> Config:
    """The config a checkpoint saved, with the options in `allowed` as given now. Any other option given that
    differs from the saved value is a ValueError (one line); `what` names the caller."""
    cfg = config_from_dict(saved)                          # JSON lists back to tuples, so they compare as given
    clash = {k: v for k, v in overrides.items() if k not in allowed and getattr(cfg, k) != v}
    if clash:
        raise ValueError(f"{what} uses the checkpoint's config; only {', '.join(allowed)} may change: {clash}")
    return replace(cfg, **{k: v for k, v in overrides.items() if k in allowed})


def load_models(path, ema=True, device="cpu", overrides=None):
    """A toy checkpoint folder -> (dit, text_encoder, meta), in eval mode, rebuilt from the folder alone.
    ema: the EMA weights (what sampling uses) or the online ones. overrides: routing options to change."""
    meta, tensors = load_checkpoint(path)
    if "config" not in meta:
        raise ValueError(f"checkpoint {path} is corrupt (its meta.json has no config); {instead(path)}")
    cfg = checkpoint_config(meta["config"], overrides or {}, ROUTING_FIELDS, f"sampling {path}")
    suffix = "_ema" if ema else ""
    dit, text_encoder = DiT(cfg), CaptionEncoder(len(meta["vocab"]), cfg.text_dim, cfg.text_len)
    for name, module in (("dit", dit), ("text_encoder", text_encoder)):
        if name + suffix not in tensors:
            raise ValueError(f"{path} has no {name + suffix}.safetensors" + (" (try --no-ema)" if ema else ""))
        load_state_strict(module, tensors[name + suffix], f"{path}/{name + suffix}.safetensors")
    return dit.to(device).eval(), text_encoder.to(device).eval(), meta


# ----------------------------------------------------------------------------------------------------------------
# a training run's checkpoints: OUT/step_NNNNNNN folders, written atomically; OUT/latest -> the newest
# ----------------------------------------------------------------------------------------------------------------

def saved_steps(out) -> list:
    """The run's complete checkpoint folders, oldest first."""
    return sorted(p for p in Path(out).glob("step_*") if (p / "meta.json").is_file())


def save_step(out, step, tensors: dict, meta: dict, keep_last) -> Path:
    """Save OUT/step_NNNNNNN, point OUT/latest at it, keep only the newest keep_last. Returns its path."""
    path = Path(out) / f"step_{step:07d}"
    save_checkpoint(path, tensors, meta)
    link = Path(out) / "latest.tmp"                  # `latest` -> this one, swapped atomically like the folder
    link.unlink(missing_ok=True)
    link.symlink_to(path.name)
    os.replace(link, Path(out) / "latest")
    for old in saved_steps(out)[:-keep_last]:
        shutil.rmtree(old)
    return path


def load_newest(out, say=print):
    """-> (path, meta, tensors) of the newest checkpoint of a run that loads; a corrupt newer one is skipped, with
    a line saying so. A ValueError (one line) if none is left."""
    found = saved_steps(out)
    if not found:
        raise ValueError(f"--resume but no checkpoint in {out}: drop --resume to start a new run")
    for path in reversed(found):
        try:
            return (path, *load_checkpoint(path))
        except ValueError as e:
            say(f"warning: {str(e).split('; use')[0]}; trying the one before")
    raise ValueError(f"every checkpoint in {out} is corrupt: start a new run with another --out")


def optimizer_tensors(opt):
    """An optimizer's state as flat tensors ({param id}.{name}) + its param_groups (plain JSON-able data)."""
    sd = opt.state_dict()
    tensors = {f"{pid}.{k}": v for pid, st in sd["state"].items() for k, v in st.items()}
    return tensors, sd["param_groups"]


def load_optimizer(opt, tensors, param_groups):
    """The inverse of optimizer_tensors."""
    state = {}
    for key, v in tensors.items():
        pid, name = key.split(".", 1)
        # clone: a tensor read from a safetensors file starts wherever the file put it (any multiple of 4 bytes),
        # and the optimizer keeps that storage. Vectorised CPU kernels round an unaligned head differently, so the
        # resumed run could drift from the uninterrupted one in the last bit. A clone is 64-byte aligned.
        state.setdefault(int(pid), {})[name] = v.clone()
    opt.load_state_dict({"state": state, "param_groups": param_groups})
