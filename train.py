"""
train.py -- train a causal Wan-style DiT with Resampling Forcing.

    python train.py                      # toy preset on tiny_data/, CPU or one GPU, a few minutes
    python train.py --steps 3000 --out runs/long
    python train.py --resume             # continue the run in --out from its latest checkpoint
    python train.py -h                   # every option; model options override the preset

The loop: teacher-forcing warm-up for --warmup_steps (history = ground truth), then Resampling Forcing (history
self-degraded by the model, `--degrade`). Everything that is the method lives in rf.training_loss.
"""

import argparse
import dataclasses
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import rf
from tiny_data import shapes


@dataclass
class Train:
    preset: str = "toy"
    data: str = str(shapes.TRAIN_PATH)   # an .npz from tiny_data/shapes.py, or a folder of clips + .txt captions
    out: str = "runs/toy"
    steps: int = 2000
    warmup_steps: int = 700           # teacher forcing first: early on the model's errors are noise, not drift
    batch_size: int = 8
    clip_frames: int = 8              # frames per training clip (4 chunks of 2 in the toy)
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


# The only model options --resume may change: how the history is degraded and routed in a new stage. They hold no
# weights, so a run may branch: the evidence experiment trains every method from one shared teacher-forcing warm-up.
STAGE_FIELDS = ("degrade", "resample_shift", "resample_steps", "noise_aug_max", "top_k", "window", "sink")
T_BUCKETS = (0.0, 0.25, 0.5, 0.75, 1.0)   # log the loss per noise level: a flat average hides progress


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
    model = p.add_argument_group("model and method (override the preset)")
    for f in dataclasses.fields(rf.Config):
        default = getattr(rf.Config, f.name)
        if isinstance(default, tuple):
            model.add_argument(f"--{f.name}", type=int, nargs=len(default))
        elif isinstance(default, bool):
            model.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction)
        elif default is None:                                                   # top_k, window: off by default
            model.add_argument(f"--{f.name}", type=int)
        else:
            model.add_argument(f"--{f.name}", type=type(default))
    given = vars(p.parse_args(argv))
    config_names = {f.name for f in dataclasses.fields(rf.Config)}
    overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in given.items() if k in config_names}
    return {k: v for k, v in given.items() if k not in config_names}, overrides


# ----------------------------------------------------------------------------------------------------------------
# data: an .npz written by tiny_data/shapes.py, or a folder of clips; either way all in memory as uint8
# ----------------------------------------------------------------------------------------------------------------

VIDEO_SUFFIXES = (".gif", ".mp4", ".webm", ".avi", ".mov", ".mkv")


def read_clip_folder(folder, clip_frames, frame_size, text_len, on_bad_clip):
    """NAME.gif / NAME.mp4 / ... with its caption in NAME.txt -> (videos, captions).

    Every clip is read and checked up front, so a bad one is reported by name before training starts, never in
    the middle of an epoch. on_bad_clip: "skip" (warn and go on) or "stop"."""
    import imageio.v2 as imageio
    files = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in VIDEO_SUFFIXES)
    if not files:
        raise ValueError(f"no video files ({' '.join(VIDEO_SUFFIXES)}) in {folder}: put clips there, each with "
                         f"a NAME.txt caption")
    videos, captions, bad = [], [], []
    for f in files:
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
            try:
                shapes.tokenize(caption_file.read_text().strip(), text_len)
            except ValueError as e:
                problem = str(e)
        if problem:
            bad.append(f"{f.name}: {problem}")
            continue
        videos.append(frames)
        captions.append(caption_file.read_text().strip())
    for b in bad:
        if on_bad_clip == "stop":
            raise ValueError(f"bad clip {b} (pass --on_bad_clip skip to leave such clips out)")
        print(f"warning: skipping bad clip {b}")
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

    def batch(self, step, batch_size, generator, caption_dropout):
        """-> clip (B, F, 3, H, W) in [-1, 1], caption ids (B, Lt)."""
        n, k = len(self.videos), step * batch_size              # k: position in the endless stream of clips
        orders = [torch.randperm(n, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + epoch))
                  for epoch in range(k // n, (k + batch_size - 1) // n + 1)]
        idx = torch.cat(orders)[k % n:k % n + batch_size].tolist()
        crops = []
        for i in idx:                                           # a random window of clip_frames from each video
            start = torch.randint(0, len(self.videos[i]) - self.clip_frames + 1, (1,), generator=generator).item()
            crops.append(torch.from_numpy(self.videos[i][start:start + self.clip_frames]))
        clip = torch.stack(crops).permute(0, 1, 4, 2, 3).float() / 127.5 - 1
        ids = self.ids[idx].clone()
        ids[torch.rand(batch_size, generator=generator) < caption_dropout] = self.empty
        return clip, ids


# ----------------------------------------------------------------------------------------------------------------
# checkpoints: a folder per save, written atomically; `latest` is the newest complete one
# ----------------------------------------------------------------------------------------------------------------

def checkpoints(out):
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
    meta = dict(config=rf.config_to_dict(cfg), train=dataclasses.asdict(train), step=step,
                stage="teacher_forcing" if step < train.warmup_steps else "resampling_forcing",
                vocab=shapes.VOCAB, param_groups=param_groups)
    path = Path(out) / f"step_{step:07d}"
    rf.save_checkpoint(path, groups, meta)
    link = Path(out) / "latest.tmp"                  # `latest` -> this one, swapped atomically like the folder
    link.unlink(missing_ok=True)
    link.symlink_to(path.name)
    os.replace(link, Path(out) / "latest")
    for old in checkpoints(out)[:-keep_last]:
        shutil.rmtree(old)
    return path


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
# the loop
# ----------------------------------------------------------------------------------------------------------------

def main(argv=None):
    given, overrides = parse_args(argv)
    train = Train(**given)
    if train.dry_run:              # builds the model on the meta device only: nothing is allocated or trained
        print(rf.wan_memory_report(rf.preset(train.preset, **overrides)))
        return
    for flag in ("on_nan", "on_bad_clip"):
        if getattr(train, flag) not in ("stop", "skip"):
            sys.exit(f"error: --{flag} {getattr(train, flag)!r}: choose stop or skip")
    out = Path(train.out)
    check_writable(out)
    device = torch.device("cuda" if train.device == "auto" and torch.cuda.is_available() else
                          "cpu" if train.device == "auto" else train.device)

    if train.resume:
        if not checkpoints(out):
            sys.exit(f"error: --resume but no checkpoint in {out}: drop --resume to start a new run")
        try:
            meta, tensors = rf.load_checkpoint(checkpoints(out)[-1])
        except (FileNotFoundError, ValueError) as e:
            sys.exit(f"error: {e}")
        cfg = rf.config_from_dict(meta["config"])
        # a later stage may switch history routing on (the paper's last stage: top_k 5) or change the degradation
        stage = {k: v for k, v in overrides.items() if k in STAGE_FIELDS}
        clash = {k: v for k, v in overrides.items() if k not in STAGE_FIELDS and getattr(cfg, k) != v}
        if clash:
            sys.exit(f"error: --resume uses the checkpoint's config; these options differ from it: {clash}")
        try:
            cfg = dataclasses.replace(cfg, **stage)
        except ValueError as e:
            sys.exit(f"error: {e}")
        # the saved run settings, except those given now (--steps to go further; a new stage may change --data,
        # --clip_frames, --lr, ...; the resumed run is then no longer the uninterrupted one, by choice)
        train = Train(**{**meta["train"], **given, "resume": True})
    else:
        if checkpoints(out):
            sys.exit(f"error: {out} already holds a run: pass --resume to continue it or --out to start a new one")
        try:
            cfg = rf.preset(train.preset, **overrides)
        except ValueError as e:
            sys.exit(f"error: {e}")
    print(f"device {device}; preset {train.preset}; overrides {overrides or 'none'}")
    try:
        data = Clips(train.data, train.clip_frames, cfg.frame_size, cfg.text_len, train.seed, train.on_bad_clip)
    except (OSError, ValueError) as e:
        sys.exit(f"error: {e}")

    torch.manual_seed(train.seed)
    dit = rf.DiT(cfg).to(device)
    text_encoder = rf.CaptionEncoder(len(shapes.VOCAB), cfg.text_dim, cfg.text_len).to(device)
    models = {"dit": dit, "text_encoder": text_encoder}
    emas = {name: rf.DiT(cfg) if name == "dit" else
            rf.CaptionEncoder(len(shapes.VOCAB), cfg.text_dim, cfg.text_len) for name in models}
    params = [p for m in models.values() for p in m.parameters()]
    print(f"DiT {sum(p.numel() for p in dit.parameters()) / 1e6:.2f}M parameters, "
          f"caption encoder {sum(p.numel() for p in text_encoder.parameters()) / 1e6:.2f}M")
    opt = torch.optim.AdamW(params, lr=train.lr, weight_decay=train.weight_decay)
    gen = torch.Generator().manual_seed(train.seed)
    start = 0
    if train.resume:
        for name, m in models.items():
            rf.load_state_strict(m, tensors[name], f"checkpoint {name}")
            rf.load_state_strict(emas[name], tensors[f"{name}_ema"], f"checkpoint {name}_ema")
        state = tensors["train_state"]
        gen.set_state(state.pop("rng"))
        load_optimizer(opt, state, meta["param_groups"])
        for group in opt.param_groups:            # a new stage may give a new --lr / --weight_decay
            group["lr"], group["weight_decay"] = train.lr, train.weight_decay
        start = meta["step"]
        print(f"resumed from {checkpoints(out)[-1]} at step {start} ({meta['stage']})")
    else:
        for name, m in models.items():
            emas[name].load_state_dict(m.state_dict())
    for m in emas.values():
        m.to(device).requires_grad_(False).eval()

    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    log = []                                                           # (step, stage, bucket losses)
    sums = torch.zeros(len(T_BUCKETS) - 1)
    counts = torch.zeros(len(T_BUCKETS) - 1)
    bar = tqdm(range(start, train.steps), initial=start, total=train.steps, desc="train", dynamic_ncols=True)
    last_ckpt = checkpoints(out)[-1] if checkpoints(out) else None
    t0 = time.time()
    for step in bar:
        # --- the method: pick the history, one loss -----------------------------------------------------------
        mode = "none" if step < train.warmup_steps else cfg.degrade           # teacher-forcing warm-up first
        clip, ids = data.batch(step, train.batch_size, gen, train.caption_dropout)
        clip, ids = clip.to(device), ids.to(device)
        with autocast:
            context = text_encoder(ids)
            loss, chunk_loss, chunk_t = rf.training_loss(dit, clip, context, mode=mode, generator=gen)
        # ---------------------------------------------------------------------------------------------------------
        opt.zero_grad(set_to_none=True)
        fault = None                          # a NaN or inf is caught at the step it happens, before opt.step
        if not torch.isfinite(loss):
            fault = f"non-finite loss {loss.item()}"
        else:
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(params, train.grad_clip)
            if not torch.isfinite(grad_norm):
                fault = f"non-finite gradient (loss {loss.item():.4f})"
        if fault:
            losses = [round(x, 4) for x in chunk_loss.mean(0).tolist()]
            report = (f"{fault} at step {step + 1} ({mode}); per-chunk losses {losses}; "
                      f"last good checkpoint: {last_ckpt or 'none'}")
            if train.on_nan == "stop":
                sys.exit(f"error: {report}. Resume from it with a lower --lr, or pass --on_nan skip")
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
        bar.set_postfix(loss=f"{loss.item():.4f}", stage="TF" if mode == "none" else "RF")
        if (step + 1) % train.log_every == 0 or step + 1 == train.steps:
            means = [s / c if c else None for s, c in zip(sums.tolist(), counts.tolist())]   # None: no chunk there
            log.append((step + 1, mode, means))
            buckets = " ".join(f"t<{hi:.2f}:" + (f"{m:.4f}" if m is not None else "  -   ")
                               for hi, m in zip(T_BUCKETS[1:], means))
            tqdm.write(f"step {step + 1:6d} | {'teacher forcing' if mode == 'none' else 'resampling ' + mode:<26} "
                       f"| loss {sums.sum() / counts.sum().clamp(min=1):.4f} | {buckets} | {time.time() - t0:.0f}s")
            sums.zero_()
            counts.zero_()
        if (step + 1) % train.ckpt_every == 0 or step + 1 == train.steps:
            try:
                last_ckpt = save(out, step + 1, models, emas, opt, gen, cfg, train, train.keep_last)
            except OSError as e:
                sys.exit(f"error: could not write the step {step + 1} checkpoint in {out} ({e.strerror or e}); "
                         f"the last complete one is {last_ckpt or 'none'}: free disk space and --resume")
    bar.close()

    if last_ckpt is None:
        return
    latest = out / "latest"
    with open(out / "log.jsonl", "a") as f:
        for row in log:
            f.write(json.dumps(dict(step=row[0], mode=row[1], bucket_loss=row[2])) + "\n")
    plot_losses(out, train.warmup_steps)
    print(f"checkpoint: {latest} -> {last_ckpt.name}")
    if train.sample:
        import sample
        sample.main(["--ckpt", str(latest), "--out", str(out / "samples")])


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
