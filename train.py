"""
train.py -- train a causal Wan-style DiT with Resampling Forcing.

    python train.py                      # toy preset on tiny_data/, CPU or one GPU, a few minutes
    python train.py --steps 3000 --out runs/long
    python train.py --resume             # continue the run in --out from its latest checkpoint (after Ctrl-C too)
    python train.py -h                   # every option; model options override the preset
    python train.py --preset wan2.1-t2v-1.3b --data DIR          # fine-tune Wan2.1 on DIR's videos (+ .txt captions)
    torchrun --nproc_per_node=8 train.py --preset wan2.1-t2v-1.3b --data DIR --batch_size 64 --grad_accum 8

The loop: teacher-forcing warm-up for --warmup_steps (history = ground truth), then Resampling Forcing (history
self-degraded by the model, `--degrade`). Everything that is the method lives in rf.training_loss.
--batch_size is the whole batch of one optimizer step: torchrun's processes and --grad_accum micro-batches share it,
and the run computes the same thing however it is split (up to float rounding).
Ctrl-C (or SIGTERM, e.g. a cluster's time limit) finishes the step, saves a checkpoint and exits; --resume goes on
from there exactly. A second Ctrl-C stops at once.
"""

import argparse
import contextlib
import copy
import dataclasses
import json
import os
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import checkpoints
import rf
import wan
from tiny_data import shapes


@dataclass
class Train:
    preset: str = "toy"
    data: str = str(shapes.TRAIN_PATH)   # an .npz from tiny_data/shapes.py, or a folder of clips + .txt captions
    out: str = "runs/toy"
    steps: int = 2000
    warmup_steps: int = 700           # teacher forcing first: early on the model's errors are noise, not drift
    batch_size: int = 8               # clips per optimizer step, over all processes and micro-batches
    grad_accum: int = 1               # micro-batches per optimizer step (gradients summed before the step)
    clip_frames: int = 8              # frames per training clip (4 chunks of 2 in the toy; Wan: video frames, 1 + 4k)
    lr: float = 2e-3
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema: float = 0.995
    caption_dropout: float = 0.1      # empty caption this often, so classifier-free guidance has something to use
    log_every: int = 250
    ckpt_every: int = 500
    keep_last: int = 3
    seed: int = 0
    device: str = "auto"
    resume: bool = False
    sample: bool = True               # write sample GIFs with sample.py at the end
    on_nan: str = "stop"              # non-finite loss or gradient: stop (keeping the last checkpoint) | skip
    on_bad_clip: str = "skip"         # a corrupt, short or wrong-size clip in a --data folder: skip (warn) | stop
    dry_run: bool = False             # Wan presets: check both checkpoint key layouts, print memory needs, exit
    grad_checkpointing: bool = False  # recompute each block in backward: far less activation memory
    # Wan presets only: where the weights come from (a local folder or a hub id), and the latent cache
    wan: str = wan.WAN_PARTS_REPO      # the DiT to start from (any wan.load_wan source)
    text_encoder: str = ""            # umT5 + tokenizer in the diffusers layout (default: --wan)
    vae: str = ""                     # Wan's VAE in the diffusers layout (default: --wan)
    cache: str = ""                   # where encoded clips go (default: DATA/.rf_cache)


# Train defaults of the Wan presets, where the command line does not set them. The paper fine-tunes with AdamW at
# lr 5e-5, batch 64, 10K teacher-forcing then 15K Resampling Forcing steps on 81-frame (5 s) videos.
# NOTE(choice): batch 1 by default, the size that fits one 80 GB GPU with activation checkpointing; the paper's 64 is
# --batch_size 64 with --grad_accum and/or torchrun. No caption dropout: the paper does not mention one, and Wan's
# CFG contrasts with its negative prompt (a real prompt), not with an empty one. No samples at the end by default:
# sampling a Wan video needs the text encoder again (python sample.py --ckpt OUT/latest --prompt "...").
WAN_DEFAULTS = dict(data="", out="runs/wan", steps=25_000, warmup_steps=10_000, batch_size=1, clip_frames=81, lr=5e-5,
                    caption_dropout=0.0, log_every=10, ckpt_every=500, keep_last=2, grad_checkpointing=True,
                    sample=False)


def is_wan(preset):
    return preset.startswith("wan")


# The only model options --resume may change: how the history is degraded and routed in a new stage. They hold no
# weights, so a run may branch: the evidence experiment trains every method from one shared teacher-forcing warm-up.
ROUTING_FIELDS = ("top_k", "window", "sink")      # the routing rule: also what sample.py may change
STAGE_FIELDS = ("degrade", "resample_shift", "resample_steps", "noise_aug_max") + ROUTING_FIELDS
T_BUCKETS = (0.0, 0.25, 0.5, 0.75, 1.0)   # log the loss per noise level: a flat average hides progress

# What each numeric option must be, checked before anything is built: a bad value is one line, not a traceback
# from deep inside (or, worse, a run that silently does nothing).
AT_LEAST_0, AT_LEAST_1, ABOVE_0 = (lambda x: x >= 0, ">= 0"), (lambda x: x >= 1, ">= 1"), (lambda x: x > 0, "> 0")
STOP_OR_SKIP = (lambda x: x in ("stop", "skip"), "stop or skip")
TRAIN_RANGES = dict(steps=AT_LEAST_0, warmup_steps=AT_LEAST_0, batch_size=AT_LEAST_1, grad_accum=AT_LEAST_1,
                    clip_frames=AT_LEAST_1, lr=ABOVE_0, weight_decay=AT_LEAST_0, grad_clip=ABOVE_0,
                    ema=(lambda x: 0 <= x < 1, "in [0, 1)"), caption_dropout=(lambda x: 0 <= x <= 1, "in [0, 1]"),
                    log_every=AT_LEAST_1, ckpt_every=AT_LEAST_1, keep_last=AT_LEAST_1, on_nan=STOP_OR_SKIP,
                    on_bad_clip=STOP_OR_SKIP)


def check_ranges(options, ranges):
    """Exit with a one-line error at the first option outside its range. options: an object holding the values
    (None: not given); ranges: {name: (test, what the value must be)}."""
    for name, (ok, want) in ranges.items():
        value = getattr(options, name)
        if value is not None and not ok(value):
            sys.exit(f"error: --{name} {value!r} must be {want}")


# ----------------------------------------------------------------------------------------------------------------
# command line: argparse generated from the dataclasses, so every field is an option and -h lists them all
# ----------------------------------------------------------------------------------------------------------------

def parse_args(argv=None):
    """-> (the Train fields given on the command line, the Config fields given). Unset options are absent, so a
    resumed run can tell "keep the checkpoint's value" from "change it"."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                argument_default=argparse.SUPPRESS)
    for f in dataclasses.fields(Train):
        if isinstance(f.default, bool):
            p.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, help=f"default: {f.default}")
        else:
            p.add_argument(f"--{f.name}", type=type(f.default), help=f"default: {f.default}")
    add_config_options(p)
    return split_config_options(vars(p.parse_args(argv)))


def add_config_options(p):
    """An option per rf.Config field, absent unless given (argparse.SUPPRESS). sample.py uses them too."""
    model = p.add_argument_group("model and method (override the preset)")
    for f in dataclasses.fields(rf.Config):
        default = getattr(rf.Config, f.name)
        if isinstance(default, tuple):
            model.add_argument(f"--{f.name}", type=int, nargs=len(default), default=argparse.SUPPRESS)
        elif isinstance(default, bool):
            model.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS)
        elif default is None:                                                   # top_k, window: off by default
            model.add_argument(f"--{f.name}", type=int, default=argparse.SUPPRESS)
        else:
            model.add_argument(f"--{f.name}", type=type(default), default=argparse.SUPPRESS)


def split_config_options(given):
    """Parsed options -> (the others, the rf.Config fields given)."""
    config_names = {f.name for f in dataclasses.fields(rf.Config)}
    overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in given.items() if k in config_names}
    return {k: v for k, v in given.items() if k not in config_names}, overrides


def checkpoint_config(saved, overrides, allowed, what):
    """The config a checkpoint saved (a dict), with the options in `allowed` as given now (they hold no weights).
    Any other option given that differs from the saved value is a one-line error; `what` names the caller."""
    try:
        cfg = checkpoints.config_from_dict(saved)                   # JSON lists back to tuples, so they compare as given
        clash = {k: v for k, v in overrides.items() if k not in allowed and getattr(cfg, k) != v}
        if clash:
            sys.exit(f"error: {what} uses the checkpoint's config; only {', '.join(allowed)} may change: {clash}")
        return dataclasses.replace(cfg, **{k: v for k, v in overrides.items() if k in allowed})
    except ValueError as e:
        sys.exit(f"error: {e}")


# ----------------------------------------------------------------------------------------------------------------
# data: an .npz written by tiny_data/shapes.py, or a folder of clips; either way all in memory as uint8
# ----------------------------------------------------------------------------------------------------------------

VIDEO_SUFFIXES = (".gif", ".mp4", ".webm", ".avi", ".mov", ".mkv")


def video_files(folder):
    """The video files of a --data folder, sorted; a ValueError if there are none."""
    files = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in VIDEO_SUFFIXES)
    if not files:
        raise ValueError(f"no video files ({' '.join(VIDEO_SUFFIXES)}) in {folder}: put clips there, each with "
                         f"a NAME.txt caption")
    return files


def skip_bad_clips(bad, on_bad_clip, say=print):
    """Name each bad clip ("NAME: why") and leave it out; with --on_bad_clip stop, a ValueError at the first."""
    for b in bad:
        if on_bad_clip == "stop":
            raise ValueError(f"bad clip {b} (pass --on_bad_clip skip to leave such clips out)")
        say(f"warning: skipping bad clip {b}")


def read_clip_folder(folder, clip_frames, frame_size, text_len, on_bad_clip):
    """NAME.gif / NAME.mp4 / ... with its caption in NAME.txt -> (videos, captions).

    Every clip is read and checked up front, so a bad one is reported by name before training starts, never in
    the middle of an epoch. on_bad_clip: "skip" (warn and go on) or "stop"."""
    import imageio.v2 as imageio
    videos, captions, bad = [], [], []
    for f in video_files(folder):
        try:
            frames = np.stack([np.asarray(im)[..., :3] for im in imageio.mimread(f, memtest=False)])
        except Exception as e:                                  # corrupt or truncated: whatever the decoder says
            bad.append(f"{f.name}: unreadable ({type(e).__name__})")
            continue
        caption_file = f.with_suffix(".txt")
        problem = (f"{frames.shape[2]}x{frames.shape[1]} frames, expected {frame_size[1]}x{frame_size[0]}"
                   if frames.shape[1:3] != tuple(frame_size) else
                   f"{len(frames)} frames, fewer than --clip_frames {clip_frames}" if len(frames) < clip_frames else
                   f"no caption file {caption_file.name}" if not caption_file.is_file() else None)
        if problem is None:
            caption = caption_file.read_text().strip()
            try:
                shapes.tokenize(caption, text_len)
            except ValueError as e:
                problem = str(e)
        if problem:
            bad.append(f"{f.name}: {problem}")
            continue
        videos.append(frames)
        captions.append(caption)
    skip_bad_clips(bad, on_bad_clip)
    if not videos:
        raise ValueError(f"no usable clip in {folder} ({len(bad)} bad)")
    return videos, captions


class Clips:
    """Videos (each (F, H, W, 3) uint8) + captions. Batches come in a stateless order (a permutation per epoch
    from the seed), so a resumed run draws exactly the batches the uninterrupted run would have drawn."""

    def __init__(self, path, clip_frames, frame_size, text_len, seed, on_bad_clip="skip"):
        if Path(path).is_dir():
            self.videos, captions = read_clip_folder(path, clip_frames, frame_size, text_len, on_bad_clip)
        else:
            data = shapes.load_dataset(path)
            if data["frames"].shape[1] < clip_frames:
                raise ValueError(f"{path} has clips of {data['frames'].shape[1]} frames, fewer than --clip_frames "
                                 f"{clip_frames}")
            self.videos, captions = list(data["frames"]), data["captions"]
        self.ids = torch.stack([torch.from_numpy(shapes.tokenize(c, text_len)) for c in captions])
        self.empty = torch.from_numpy(shapes.tokenize("", text_len))
        self.clip_frames, self.seed = clip_frames, seed

    def batch(self, step, batch_size, generator, caption_dropout, rows=slice(None)):
        """-> clip (B, F, 3, H, W) in [-1, 1], caption ids (B, Lt); only the batch's `rows`, drawn as for all B."""
        idx = batch_order(len(self.videos), self.seed, step, batch_size)
        crops = []
        for i in idx:                                           # a random window of clip_frames from each video
            start = torch.randint(0, len(self.videos[i]) - self.clip_frames + 1, (1,), generator=generator).item()
            crops.append(torch.from_numpy(self.videos[i][start:start + self.clip_frames]))
        clip = torch.stack(crops).permute(0, 1, 4, 2, 3).float() / 127.5 - 1
        ids = self.ids[idx].clone()
        ids[torch.rand(batch_size, generator=generator) < caption_dropout] = self.empty
        return clip[rows], ids[rows]


def batch_order(n, seed, step, batch_size):
    """The clip indices of batch `step`: a stateless order (a permutation per epoch from the seed), so a resumed run
    draws exactly the batches the uninterrupted run would have drawn."""
    k = step * batch_size                                       # position in the endless stream of clips
    orders = [torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
              for epoch in range(k // n, (k + batch_size - 1) // n + 1)]
    return torch.cat(orders)[k % n:k % n + batch_size].tolist()


# ----------------------------------------------------------------------------------------------------------------
# Wan data: videos + captions, encoded once (VAE latents, umT5 features) into a cache of safetensors files
# ----------------------------------------------------------------------------------------------------------------

def read_video(path, height, width):
    """Frames of a video file (H, W, 3) uint8, one at a time: about WAN_FPS frames per second, each resized to cover
    height x width and centre-cropped to it."""
    import imageio.v2 as imageio
    from PIL import Image
    reader = imageio.get_reader(path)
    try:
        fps = reader.get_meta_data().get("fps")
        # NOTE(choice): Wan was trained at 16 fps; a faster video keeps every round(fps / 16)-th frame, a slower one
        # all of them. Resize to cover, then centre-crop: no letterbox, no stretching.
        stride = max(1, round(fps / wan.WAN_FPS)) if fps else 1
        for i, frame in enumerate(reader):
            if i % stride:
                continue
            img = Image.fromarray(np.asarray(frame)[..., :3])
            scale = max(height / img.height, width / img.width)
            w, h = max(width, round(img.width * scale)), max(height, round(img.height * scale))
            img = img.resize((w, h), Image.BICUBIC)
            left, top = (w - width) // 2, (h - height) // 2
            yield np.asarray(img.crop((left, top, left + width, top + height)))
    finally:
        reader.close()


def encode_video(path, caption, frames, size, vae, tokenizer, encoder, text_len):
    """One video -> its cache entry: latents (n, F, C, h, w) of its n consecutive windows of `frames` frames, and its
    caption's features (real length, text_dim)."""
    # NOTE(choice): a video gives every whole window of --clip_frames frames it holds, from its start, without
    # overlap (a causal VAE's latents depend on where a window starts, so windows are encoded, not cut from latents).
    latents, window = [], []
    for frame in read_video(path, *size):
        window.append(frame)
        if len(window) == frames:
            video = torch.from_numpy(np.stack(window)).permute(0, 3, 1, 2)[None].float() / 127.5 - 1
            latents.append(wan.vae_encode(vae, video)[0].cpu())                        # (F, C, h, w)
            window = []
    if not latents:
        raise ValueError(f"{len(window)} frames at {wan.WAN_FPS} fps, fewer than --clip_frames {frames}")
    context, length = wan.encode_prompts(tokenizer, encoder, [caption], text_len)
    return {"latents": torch.stack(latents), "context": context[0, :length[0]].cpu()}


class LatentClips:
    """The Wan path's training clips: latents (F, C, h, w) and caption features from the cache, read per batch."""

    def __init__(self, entries, captions, empty, text_len, seed):
        self.entries, self.captions, self.empty = entries, captions, empty    # entries: (cache file, window)
        self.text_len, self.seed = text_len, seed

    def batch(self, step, batch_size, generator, caption_dropout, rows=slice(None)):
        """-> latents (B, F, C, h, w), text features (B, text_len, text_dim); only `rows`, drawn as for all B."""
        from safetensors import safe_open
        idx = batch_order(len(self.entries), self.seed, step, batch_size)
        drop = (torch.rand(batch_size, generator=generator) < caption_dropout).tolist()
        latents, contexts = [], []
        for i, dropped in zip(idx[rows], drop[rows]):
            path, window = self.entries[i]
            with safe_open(str(path), framework="pt") as f:
                latents.append(f.get_slice("latents")[window])                       # reads this window only
                context = self.empty if dropped else f.get_tensor("context")
            contexts.append(torch.nn.functional.pad(context, (0, 0, 0, self.text_len - len(context))))
        return torch.stack(latents), torch.stack(contexts)


def wan_clips(train, cfg, device, rank, world):
    """Encode every video of --data that the cache does not hold yet; -> LatentClips over the whole cache.

    An entry is {cache}/{video name}.safetensors, keyed (in its metadata) by the video's size and mtime, its caption,
    the clip length, frame size and the encoders used: an entry whose key differs is encoded again. Under torchrun
    the processes share the encoding. Bad videos are cached as such (an entry with no tensors and the reason)."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file
    try:
        F_ = wan.latent_frames(train.clip_frames, cfg.frames_per_chunk)
    except ValueError as e:
        sys.exit(f"error: --clip_frames {e}")
    if not train.data or not Path(train.data).is_dir():
        sys.exit(f"error: --data {train.data!r} is not a folder: the Wan presets train on a folder of videos, each "
                 f"with its caption in a .txt of the same name")
    size = (8 * cfg.frame_size[0], 8 * cfg.frame_size[1])                  # pixels: Wan2.1's VAE is 8x spatially
    parts = {"text_encoder": train.text_encoder or train.wan, "vae": train.vae or train.wan}
    folder = Path(train.cache or Path(train.data) / ".rf_cache") / f"{size[0]}x{size[1]}_{train.clip_frames}f"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        sys.exit(f"error: cannot write the cache {folder} ({e.strerror}): pass --cache with a writable folder")
    try:
        videos = video_files(train.data)
    except ValueError as e:
        sys.exit(f"error: {e}")

    def key(video, caption):
        stat = video.stat()
        return json.dumps(dict(bytes=stat.st_size, mtime_ns=stat.st_mtime_ns, caption=caption, frames=train.clip_frames,
                               size=size, fps=wan.WAN_FPS, text_len=cfg.text_len, **parts))

    def cached(path, k):
        try:
            with safe_open(str(path), framework="pt") as f:
                return (f.metadata() or {}).get("key") == k
        except Exception:                                   # missing or half-written: encode again
            return False

    jobs, bad = [], []                                      # jobs: (video, caption, cache file, key)
    for v in videos:
        caption_file = v.with_suffix(".txt")
        if not caption_file.is_file():
            bad.append(f"{v.name}: no caption file {caption_file.name}")
            continue
        caption = caption_file.read_text().strip()
        jobs.append((v, caption, folder / f"{v.name}.safetensors", key(v, caption)))
    empty_file, empty_key = folder / "_empty_prompt.safetensors", json.dumps(dict(text_len=cfg.text_len, **parts))
    todo = [job for job in jobs if not cached(job[2], job[3])]
    need_empty = not cached(empty_file, empty_key)
    mine = todo[rank::world]                                # under torchrun each process encodes its share
    if mine or (need_empty and rank == 0):
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32     # Wan runs umT5 in bf16
        tokenizer, encoder = wan.load_wan_text_encoder(parts["text_encoder"], dtype, device)
        vae = wan.load_wan_vae(parts["vae"], device)
        if wan.vae_strides(vae) != (4, 8) or vae.config.z_dim != cfg.in_dim:
            sys.exit(f"error: the VAE in {parts['vae']} has strides {wan.vae_strides(vae)} and {vae.config.z_dim} "
                     f"channels; the model expects Wan2.1's (4, 8) and in_dim={cfg.in_dim}")
        if rank == 0 and need_empty:
            context, length = wan.encode_prompts(tokenizer, encoder, [""], cfg.text_len)
            save_file({"context": context[0, :length[0]].cpu()}, str(empty_file), metadata={"key": empty_key})
        for video, caption, path, k in tqdm(mine, desc="encode videos", disable=rank != 0, dynamic_ncols=True):
            try:
                entry, meta = encode_video(video, caption, train.clip_frames, size, vae, tokenizer, encoder,
                                           cfg.text_len), {"key": k, "caption": caption}
            except torch.OutOfMemoryError:
                raise
            except Exception as e:                          # unreadable or too short: remembered, reported below
                entry, meta = {}, {"key": k, "bad": str(e).splitlines()[0] if str(e) else type(e).__name__}
            save_file(entry, str(path), metadata=meta)
        del tokenizer, encoder, vae
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if world > 1:
        torch.distributed.barrier()                         # every share encoded before anyone reads the cache
    entries, captions = [], []
    for video, caption, path, k in jobs:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
            if "bad" in meta:
                bad.append(f"{video.name}: {meta['bad']}")
                continue
            entries += [(path, w) for w in range(f.get_slice("latents").get_shape()[0])]
            captions.append(caption)
    try:
        skip_bad_clips(bad, train.on_bad_clip, print if rank == 0 else lambda _: None)
    except ValueError as e:
        sys.exit(f"error: {e}")
    if not entries:
        sys.exit(f"error: no usable clip in {train.data} ({len(bad)} bad)")
    if rank == 0:
        print(f"cache {folder}: {len(jobs) - len(todo)} videos reused, {len(todo)} encoded now -> {len(entries)} "
              f"clips of {train.clip_frames} frames ({F_} latent frames of {cfg.frame_size[0]}x{cfg.frame_size[1]}). "
              f"Later runs reuse it; delete the folder to encode again")
    empty = load_file(str(empty_file))["context"]
    return LatentClips(entries, captions, empty, cfg.text_len, train.seed)


# ----------------------------------------------------------------------------------------------------------------
# checkpoints: a folder per save, written atomically; `latest` is the newest complete one
# ----------------------------------------------------------------------------------------------------------------

def saved_steps(out):
    return sorted(p for p in Path(out).glob("step_*") if (p / "meta.json").is_file())


def optimizer_tensors(opt):
    sd = opt.state_dict()
    tensors = {f"{pid}.{k}": v for pid, st in sd["state"].items() for k, v in st.items()}
    return tensors, sd["param_groups"]


def load_optimizer(opt, tensors, param_groups):
    state = {}
    for key, v in tensors.items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = v
    opt.load_state_dict({"state": state, "param_groups": param_groups})


def save(out, step, models, emas, opt, gen, cfg, train, keep_last):
    groups = {name: m.state_dict() for name, m in models.items()}
    groups |= {f"{name}_ema": m.state_dict() for name, m in emas.items()}
    opt_tensors, param_groups = optimizer_tensors(opt)
    groups["train_state"] = opt_tensors | {"rng": gen.get_state()}
    meta = dict(config=checkpoints.config_to_dict(cfg), train=dataclasses.asdict(train), step=step,
                stage=("teacher_forcing" if step < train.warmup_steps or cfg.degrade == "none" else
                       "resampling_forcing"),
                vocab=shapes.VOCAB, param_groups=param_groups)
    path = Path(out) / f"step_{step:07d}"
    checkpoints.save_checkpoint(path, groups, meta)
    link = Path(out) / "latest.tmp"                  # `latest` -> this one, swapped atomically like the folder
    link.unlink(missing_ok=True)
    link.symlink_to(path.name)
    os.replace(link, Path(out) / "latest")
    for old in saved_steps(out)[:-keep_last]:
        shutil.rmtree(old)
    return path


class Stopped(SystemExit):
    """The run stopped on Ctrl-C or SIGTERM after saving a checkpoint. Uncaught, it exits with its message."""


@contextlib.contextmanager
def stop_requests():
    """While inside: the first Ctrl-C or SIGTERM only sets flag["stop"], so the loop can finish its step and save;
    a second one acts as usual (the handler puts the previous one back). Outside the main thread: no handlers."""
    flag = {"stop": False}
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return
    previous = {}

    def request(signum, frame):
        flag["stop"] = True
        signal.signal(signum, previous[signum])

    for signum in (signal.SIGINT, signal.SIGTERM):
        previous[signum] = signal.signal(signum, request)
    try:
        yield flag
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def any_process(flag, world, device):
    """True on every process if it is True on any (so all of them stop at the same step)."""
    if world == 1:
        return flag
    t = torch.tensor([float(flag)], device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item())


def write_log(out, rows):
    """Append the logged rows to out/log.jsonl. Called at every checkpoint, so the log and the checkpoints agree: a
    run killed between two checkpoints resumes from the last one and logs the lost steps once, not twice."""
    with open(Path(out) / "log.jsonl", "a") as f:
        for step, mode, means in rows:
            f.write(json.dumps(dict(step=step, mode=mode, bucket_loss=means)) + "\n")
    rows.clear()


def check_writable(out):
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write_test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        sys.exit(f"error: cannot write to --out {out} ({e.strerror}): choose a writable folder")
    if shutil.disk_usage(out).free < 200 * 2**20:
        sys.exit(f"error: less than 200 MB free under {out}: free some space or choose another --out")


# ----------------------------------------------------------------------------------------------------------------
# several processes: torchrun starts them and sets RANK / WORLD_SIZE / LOCAL_RANK; torch's DistributedDataParallel
# averages the gradients. One plain process needs none of it.
# ----------------------------------------------------------------------------------------------------------------

class DDP(torch.nn.parallel.DistributedDataParallel):
    """torch's DistributedDataParallel, answering for the wrapped model's own attributes too (cfg, encode_text,
    forward_chunk), so rf.training_loss takes it as it takes the bare DiT. The loss's one forward with gradient,
    model(...), goes through DDP, which averages the gradients across processes; the no-grad self-resampling calls
    reach the bare model."""

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.module, name)


def start_processes(train):
    """-> (rank, world size, device). Under torchrun: joins the process group (NCCL on GPUs, gloo on the CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda" if train.device == "auto" and torch.cuda.is_available() else
                          "cpu" if train.device == "auto" else train.device)
    if world > 1:
        if device.type == "cuda":                          # one GPU per process
            device = torch.device("cuda", local)
            torch.cuda.set_device(device)
        # NOTE(choice): a 2-hour timeout, since the processes wait for each other while the first run encodes the
        # video cache (torch's default, 10 to 30 min, could run out); a hung process is also noticed that late.
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(hours=2))
    return rank, world, device


def gather(x, world):
    """Each process's (b, ...) -> every process's, concatenated in rank order (B, ...), on every process."""
    if world == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world)]
    torch.distributed.all_gather(parts, x.contiguous())
    return torch.cat(parts)


# ----------------------------------------------------------------------------------------------------------------
# the loop
# ----------------------------------------------------------------------------------------------------------------

def main(argv=None):
    given, overrides = parse_args(argv)
    train = Train(**{**(WAN_DEFAULTS if is_wan(given.get("preset", Train.preset)) else {}), **given})
    if train.dry_run:              # builds the model on the meta device only: nothing is allocated or trained
        print(wan.wan_memory_report(rf.preset(train.preset, **overrides)))
        return
    check_ranges(train, TRAIN_RANGES)
    out = Path(train.out)
    check_writable(out)
    rank, world, device = start_processes(train)
    say = print if rank == 0 else (lambda *a, **k: None)           # one process speaks and writes

    if train.resume:
        if not saved_steps(out):
            sys.exit(f"error: --resume but no checkpoint in {out}: drop --resume to start a new run")
        try:
            meta, tensors = checkpoints.load_checkpoint(saved_steps(out)[-1])
        except (FileNotFoundError, ValueError) as e:
            sys.exit(f"error: {e}")
        # a later stage may switch history routing on (the paper's last stage: top_k 5) or change the degradation
        cfg = checkpoint_config(meta["config"], overrides, STAGE_FIELDS, "--resume")
        # the saved run settings, except those given now (--steps to go further; a new stage may change --data,
        # --clip_frames, --lr, ...; the resumed run is then no longer the uninterrupted one, by choice)
        train = Train(**{**meta["train"], **given, "resume": True})
        check_ranges(train, TRAIN_RANGES)
    else:
        if saved_steps(out):
            sys.exit(f"error: {out} already holds a run: pass --resume to continue it or --out to start a new one")
        try:
            cfg = rf.preset(train.preset, **overrides)
        except ValueError as e:
            sys.exit(f"error: {e}")
    real_wan = is_wan(train.preset)
    A, B = train.grad_accum, train.batch_size
    if B % (world * A):
        sys.exit(f"error: --batch_size {B} does not split into {world} process(es) x --grad_accum {A} equal "
                 f"micro-batches: use a multiple of {world * A}")
    # NOTE(choice): --batch_size is the whole batch of an optimizer step, not a per-GPU batch: the processes and the
    # micro-batches split it, so the same options train the same model on 1 GPU or 8 (tests/test_ddp.py).
    b = B // (world * A)                                   # clips per micro-batch in each process
    say(f"device {device}; preset {train.preset}; overrides {overrides or 'none'}"
        + (f"; {world} process(es) x {A} micro-batch(es) of {b} clips per step" if world * A > 1 else ""))
    if real_wan:
        data = wan_clips(train, cfg, device, rank, world)
    else:
        try:
            data = Clips(train.data, train.clip_frames, cfg.frame_size, cfg.text_len, train.seed, train.on_bad_clip)
        except (OSError, ValueError) as e:
            sys.exit(f"error: {e}")
    if train.steps == 0:                                   # e.g. build the Wan cache once, before a torchrun
        say("--steps 0: the data is ready; nothing to train")
        if world > 1:
            torch.distributed.destroy_process_group()
        return

    torch.manual_seed(train.seed)
    if real_wan and not train.resume:                           # fp32 master weights, trained under bf16 autocast
        try:
            dit = wan.load_wan(train.wan, torch.float32, device, train.preset, **overrides)
        except (OSError, ValueError) as e:
            sys.exit(f"error: {e}")
    else:
        dit = rf.DiT(cfg).to(device)
    models = {"dit": dit}
    if not real_wan:                                            # the toy learns its caption encoder; Wan's umT5 is frozen
        models["text_encoder"] = rf.CaptionEncoder(len(shapes.VOCAB), cfg.text_dim, cfg.text_len).to(device)
    # the EMA starts as a copy of each model (on --resume both are then overwritten from the checkpoint)
    emas = {name: copy.deepcopy(m).requires_grad_(False).eval() for name, m in models.items()}
    params = [p for m in models.values() for p in m.parameters()]
    say(f"DiT {sum(p.numel() for p in dit.parameters()) / 1e6:.2f}M parameters" + ("" if real_wan else
        f", caption encoder {sum(p.numel() for p in models['text_encoder'].parameters()) / 1e6:.2f}M"))
    opt = torch.optim.AdamW(params, lr=train.lr, weight_decay=train.weight_decay)
    gen = torch.Generator().manual_seed(train.seed)
    start = 0
    if train.resume:
        for name, m in models.items():
            checkpoints.load_state_strict(m, tensors[name], f"checkpoint {name}")
            checkpoints.load_state_strict(emas[name], tensors[f"{name}_ema"], f"checkpoint {name}_ema")
        state = tensors["train_state"]
        gen.set_state(state.pop("rng"))
        load_optimizer(opt, state, meta["param_groups"])
        for group in opt.param_groups:            # a new stage may give a new --lr / --weight_decay
            group["lr"], group["weight_decay"] = train.lr, train.weight_decay
        start = meta["step"]
        say(f"resumed from {saved_steps(out)[-1]} at step {start} ({meta['stage']})")
    dit.grad_checkpointing = train.grad_checkpointing
    # under torchrun each trained model is wrapped in DDP (which also makes every process start from rank 0's weights)
    wrapped = {name: DDP(m, device_ids=[device.index] if device.type == "cuda" else None) if world > 1 else m
               for name, m in models.items()}
    caption_encoder = wrapped.get("text_encoder")          # None on the Wan path: the batch holds the features

    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    log = []                                                           # (step, stage, bucket losses)
    sums = torch.zeros(len(T_BUCKETS) - 1)
    counts = torch.zeros(len(T_BUCKETS) - 1)
    bar = tqdm(range(start, train.steps), initial=start, total=train.steps, desc="train", dynamic_ncols=True,
               disable=rank != 0)
    last_ckpt = saved_steps(out)[-1] if saved_steps(out) else None
    mine = slice(rank * A * b, (rank + 1) * A * b)         # this process's rows of each batch
    t0 = time.time()
    stopping = False
    with stop_requests() as stop:                          # Ctrl-C: finish the step, save, exit
        for step in bar:
            # --- the method: pick the history, one loss -----------------------------------------------------------
            mode = "none" if step < train.warmup_steps else cfg.degrade           # teacher-forcing warm-up first
            clip, cond = data.batch(step, B, gen, train.caption_dropout, rows=mine)
            opt.zero_grad(set_to_none=True)
            before = gen.get_state()
            losses, chunk_losses, chunk_ts = [], [], []
            for a in range(A):                         # micro-batches: gradients add up, one optimizer step below
                rows = slice(mine.start + a * b, mine.start + (a + 1) * b)
                gen.set_state(before)                  # each piece draws the whole batch's randomness, keeps its rows
                last = a == A - 1                      # DDP averages the gradients across processes after the last
                with contextlib.ExitStack() as no_sync:
                    if world > 1 and not last:
                        for m in wrapped.values():
                            no_sync.enter_context(m.no_sync())
                    with autocast:
                        x, c = clip[a * b:(a + 1) * b].to(device), cond[a * b:(a + 1) * b].to(device)
                        context = c if caption_encoder is None else caption_encoder(c)
                        loss, chunk_loss, chunk_t = rf.training_loss(wrapped["dit"], x, context, mode=mode,
                                                                     generator=rf.BatchSlice(gen, B, rows))
                    # backward even on a non-finite loss: under torchrun every process must join the gradient averaging
                    (loss / A).backward()
                losses.append(loss.detach())
                chunk_losses.append(chunk_loss)
                chunk_ts.append(chunk_t)
            # ---------------------------------------------------------------------------------------------------------
            losses = gather(torch.stack(losses), world)                           # every micro-batch's loss
            chunk_loss = gather(torch.cat(chunk_losses), world)                   # (B, N), the whole batch
            chunk_t = gather(torch.cat(chunk_ts), world)
            fault = None                          # a NaN or inf is caught at the step it happens, before opt.step
            if not torch.isfinite(losses).all():
                fault = f"non-finite loss {losses[~torch.isfinite(losses)][0].item()}"
            else:
                grad_norm = torch.nn.utils.clip_grad_norm_(params, train.grad_clip)   # the same in every process
                if not torch.isfinite(grad_norm):
                    fault = f"non-finite gradient (loss {losses.mean().item():.4f})"
            if fault:
                chunk_means = [round(x, 4) for x in chunk_loss.mean(0).tolist()]
                report = (f"{fault} at step {step + 1} ({mode}); per-chunk losses {chunk_means}; "
                          f"last good checkpoint: {last_ckpt or 'none'}")
                if train.on_nan == "stop":
                    sys.exit(f"error: {report}. Resume from it with a lower --lr, or pass --on_nan skip")
                if rank == 0:
                    tqdm.write(f"warning: skipped the update: {report}")
            else:
                opt.step()
                with torch.no_grad():
                    decay = min(train.ema, (1 + step) / (10 + step))
                    for name, m in models.items():
                        for pe, p in zip(emas[name].parameters(), m.parameters()):
                            pe.lerp_(p, 1 - decay)
                bucket = torch.bucketize(chunk_t.flatten().cpu(), torch.tensor(T_BUCKETS[1:-1]))
                sums.index_add_(0, bucket, chunk_loss.flatten().float().cpu())
                counts.index_add_(0, bucket, torch.ones_like(bucket, dtype=torch.float))
            bar.set_postfix(loss=f"{losses.mean().item():.4f}", stage="TF" if mode == "none" else "RF")
            if (step + 1) % train.log_every == 0 or step + 1 == train.steps:
                means = [s / c if c else None for s, c in zip(sums.tolist(), counts.tolist())]   # None: no chunk there
                log.append((step + 1, mode, means))
                buckets = " ".join(f"t<{hi:.2f}:" + (f"{m:.4f}" if m is not None else "  -   ")
                                   for hi, m in zip(T_BUCKETS[1:], means))
                stage = "teacher forcing" if mode == "none" else "resampling " + mode
                if rank == 0:
                    tqdm.write(f"step {step + 1:6d} | {stage:<26} | loss {sums.sum() / counts.sum().clamp(min=1):.4f} "
                               f"| {buckets} | {time.time() - t0:.0f}s")
                sums.zero_()
                counts.zero_()
            stopping = any_process(stop["stop"], world, device)
            if rank == 0 and ((step + 1) % train.ckpt_every == 0 or step + 1 == train.steps or stopping):
                try:
                    last_ckpt = save(out, step + 1, models, emas, opt, gen, cfg, train, train.keep_last)
                except OSError as e:
                    sys.exit(f"error: could not write the step {step + 1} checkpoint in {out} ({e.strerror or e}); "
                             f"the last complete one is {last_ckpt or 'none'}: free disk space and --resume")
                write_log(out, log)
            if stopping:
                break
    bar.close()
    if world > 1:
        torch.distributed.destroy_process_group()
    if stopping:
        hint = ("rerun the same torchrun command with --resume" if world > 1 else
                f"go on with python train.py --out {out} --resume")
        raise Stopped(f"stopped at step {step + 1}, saved in {last_ckpt}: {hint}" if rank == 0 else 1)

    if rank != 0 or last_ckpt is None:
        return
    latest = out / "latest"
    plot_losses(out, train.warmup_steps)
    print(f"checkpoint: {latest} -> {last_ckpt.name}")
    if train.sample:
        import sample
        extra = ["--prompt", data.captions[0], "--frames", str(train.clip_frames)] if real_wan else []
        sample.main(["--ckpt", str(latest), "--out", str(out / "samples"), *extra])


def plot_losses(out, warmup_steps):
    """Loss per noise-level bucket against step, from the run's log.jsonl, to out/loss.png."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [json.loads(line) for line in open(Path(out) / "log.jsonl")]
    steps = [r["step"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, (lo, hi) in enumerate(zip(T_BUCKETS[:-1], T_BUCKETS[1:])):
        losses = [float("nan") if r["bucket_loss"][i] is None else r["bucket_loss"][i] for r in rows]  # None: empty
        ax.plot(steps, losses, marker=".", label=f"t in [{lo}, {hi})")
    ax.axvline(warmup_steps, color="grey", ls="--", lw=1, label="end of teacher-forcing warm-up")
    ax.set(xlabel="step", ylabel="flow-matching loss", yscale="log", title="training loss per noise level")
    ax.legend()
    fig.tight_layout()
    fig.savefig(Path(out) / "loss.png", dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
