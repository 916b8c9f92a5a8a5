"""
clips.py -- training clips, all in memory or cached on disk, drawn in an order a resumed run repeats exactly.

    Clips        the toy: an .npz written by tiny_data/shapes.py, or a folder of clips (NAME.gif + NAME.txt)
    wan_clips    Wan: a folder of videos + captions, encoded once (VAE latents, umT5 features) into a cache of
                 safetensors files, then read per batch (LatentClips)
"""

import json
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import media
import wan
from tiny_data import shapes

VIDEO_SUFFIXES = (".gif", ".mp4", ".webm", ".avi", ".mov", ".mkv")


def video_files(folder):
    """The video files of a --data folder, sorted; a ValueError if there are none."""
    files = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in VIDEO_SUFFIXES)
    if not files:
        raise ValueError(f"no video files ({' '.join(VIDEO_SUFFIXES)}) in {folder}")
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

    def __init__(self, path, clip_frames, frame_size, text_len, seed, on_bad_clip="skip", preset="toy"):
        expects = (f"the {preset} preset trains on clips of at least {clip_frames} frames of {frame_size[0]}x"
                   f"{frame_size[1]} pixels: an .npz written by tiny_data/shapes.py (the default --data) or a "
                   f"folder of NAME.gif / NAME.mp4 clips, each with its caption in NAME.txt")
        if Path(path).is_dir():
            try:
                self.videos, captions = read_clip_folder(path, clip_frames, frame_size, text_len, on_bad_clip)
            except ValueError as e:
                raise ValueError(f"{e}; {expects}") from None
        elif not Path(path).exists():
            raise ValueError(f"--data {path} does not exist ({shapes.REGENERATE_HINT} the shipped data); {expects}")
        else:
            data = shapes.load_dataset(path)
            if data["frames"].shape[1] < clip_frames or data["frames"].shape[2:4] != tuple(frame_size):
                raise ValueError(f"{path} has clips of {data['frames'].shape[1]} frames of "
                                 f"{data['frames'].shape[2]}x{data['frames'].shape[3]}: {expects}")
            self.videos, captions = list(data["frames"]), data["captions"]
        self.ids = torch.from_numpy(shapes.tokenize_all(captions, text_len))
        self.empty = torch.from_numpy(shapes.tokenize("", text_len))
        self.clip_frames, self.seed = clip_frames, seed

    def batch(self, step, batch_size, generator, caption_dropout, rows=slice(None)):
        """-> clip (B, F, 3, H, W) in [-1, 1], caption ids (B, Lt); only the batch's `rows`, drawn as for all B."""
        idx = batch_order(len(self.videos), self.seed, step, batch_size)
        crops = []
        for i in idx:                                           # a random window of clip_frames from each video
            start = torch.randint(0, len(self.videos[i]) - self.clip_frames + 1, (1,), generator=generator).item()
            crops.append(torch.from_numpy(self.videos[i][start:start + self.clip_frames]))
        clip = media.from_uint8(torch.stack(crops))                                    # (B, F, 3, H, W)
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
            video = media.from_uint8(np.stack(window))[None]                          # (1, F, 3, H, W)
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
        raise ValueError(f"--clip_frames {e}") from None
    if not train.data or not Path(train.data).is_dir():
        raise ValueError(f"--data {train.data!r} is not a folder: the Wan presets train on a folder of videos, each "
                 f"with its caption in a .txt of the same name")
    size = (8 * cfg.frame_size[0], 8 * cfg.frame_size[1])                  # pixels: Wan2.1's VAE is 8x spatially
    parts = {"text_encoder": train.text_encoder or train.wan, "vae": train.vae or train.wan}
    folder = Path(train.cache or Path(train.data) / ".rf_cache") / f"{size[0]}x{size[1]}_{train.clip_frames}f"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"cannot write the cache {folder} ({e.strerror}): pass --cache with a writable folder")
    videos = video_files(train.data)

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
            raise ValueError(f"the VAE in {parts['vae']} has strides {wan.vae_strides(vae)} and {vae.config.z_dim} "
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
    skip_bad_clips(bad, train.on_bad_clip, print if rank == 0 else lambda _: None)
    if not entries:
        raise ValueError(f"no usable clip in {train.data} ({len(bad)} bad)")
    if rank == 0:
        print(f"cache {folder}: {len(jobs) - len(todo)} videos reused, {len(todo)} encoded now -> {len(entries)} "
              f"clips of {train.clip_frames} frames ({F_} latent frames of {cfg.frame_size[0]}x{cfg.frame_size[1]}). "
              f"Later runs reuse it; delete the folder to encode again")
    empty = load_file(str(empty_file))["context"]
    return LatentClips(entries, captions, empty, cfg.text_len, train.seed)
