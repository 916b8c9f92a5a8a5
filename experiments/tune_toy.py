"""
experiments/tune_toy.py -- how good is a toy checkpoint at continuing a clip?

    python experiments/tune_toy.py runs/toy                       # one run (its `latest`), 64 held-out clips
    python experiments/tune_toy.py runs/tf runs/rf --clips 64 --png runs/tf_vs_rf.png   # a paired comparison
    python experiments/tune_toy.py runs/toy --steps 32 --shift 3 --cfg 1 --no-ema        # sampler settings
    python experiments/tune_toy.py runs/tf runs/rf --window 3     # each chunk sees only the 3 history chunks before it
    python experiments/tune_toy.py checkpoints/small_tf checkpoints/small_rf --true_at 3 4:1 4:2 4:3 4
                                    # one chunk after a TRUE history: chunk 3 (all history), chunk 4 with windows
    python experiments/tune_toy.py runs/long/tf runs/long/rf --frames 32 --score 24:32   # frames 24-31 of 32

Every number is tiny_data.metrics.shape_fidelity (per object, the IoU of the generated pixels of its colour with its
true pixels; 1 is perfect, a one-pixel shift scores about 0.62) on the held-out clips of tiny_data/test.npz, as the
mean over clips with a 95% interval (1.96 standard errors over clips):

  one-step     the x0 the model predicts in ONE step from pure noise (t = 1), given the first chunk clean, against
               the true second chunk: what the model "expects" next. Pure noise carries no information, so this is
               what the model takes from the history alone.
  chunk 1      the first generated chunk of a full rollout (the sampler's steps, shift, CFG), given the first chunk.
  1x           every generated frame within the training clip length L (frames fpc .. L-1).
  2x, 4x       frames L .. 2L-1 and 3L .. 4L-1 (as experiments/evidence.py scores them).
  true@L,      one chunk generated after L (or 2L - fpc) TRUE frames: what the model makes past the training length
  true@2L      when its history is perfect. Where these fall as far as 2x does, the fall past the training length
               is the model meeting a history it never trained on, not its own errors piling up.
  c4/w3        with --true_at 4:3: chunk 4 (0-based) generated after the TRUE frames before it, reading a window of
               3 history chunks ("c4" alone: all of them). One chunk, so no error of the model's own is in it.
  c4/w3/from1  with --true_at 4:3:1: the same, but the video starts at true chunk 1: the farthest chunk read is a
               first chunk, one that had no history of its own, as in every training clip.
  a:b          with --score a:b: the rollout's frames a .. b-1.

--window W samples with a sliding window of W history chunks. With W = L / fpc - 1 (3 for the toy) every chunk sees
the history a training clip's last chunk saw, at the same relative RoPE offsets, so what is left of the fall past L
is the model's own errors piling up.

With two runs or more, each later run is also compared with the first, paired per clip (same clips, same seeds).
--png writes a contact sheet: per clip, the truth, then each run's rollout; a red bar marks the frames past L.
--plot writes each run's shape fidelity per generated frame (mean over the clips, 95% band).
"""

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import checkpoints  # noqa: E402
import cli  # noqa: E402
import media  # noqa: E402
import rf  # noqa: E402
from tiny_data import metrics, shapes  # noqa: E402

KEYS = ("centres", "colours", "shapes", "radii")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run folders (their `latest`) or checkpoint folders")
    p.add_argument("--clips", type=int, default=64, help="held-out clips (the first N of test.npz)")
    p.add_argument("--frames", type=int, default=0, help="rollout length (default 4x the training clip length)")
    p.add_argument("--steps", type=int, default=None, help="sampler steps (default: the checkpoint's)")
    p.add_argument("--shift", type=float, default=None)
    p.add_argument("--cfg", type=float, default=None)
    p.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--window", type=int, default=None,
                   help="sample with a sliding window of this many history chunks (default: the checkpoint's)")
    p.add_argument("--true_at", nargs="*", default=[], metavar="CHUNK[:WINDOW[:FROM]]",
                   help="also score one chunk generated after a true history: chunk CHUNK (0-based), reading "
                        "WINDOW history chunks (default all), the video starting at true chunk FROM (default 0)")
    p.add_argument("--score", nargs="*", default=[], metavar="A:B",
                   help="also score the rollout's frames A .. B-1 (e.g. 24:32)")
    p.add_argument("--seed", type=int, default=1000, help="noise seed of the first batch of clips (batch i: seed + i)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--png", default="", help="write a contact sheet of the first --png_clips clips here")
    p.add_argument("--png_clips", type=int, default=8)
    p.add_argument("--plot", default="", help="write a plot of each run's shape fidelity per frame here (PNG)")
    p.add_argument("--json", default="", help="write the numbers here")
    p.add_argument("--test", default=str(shapes.TEST_PATH), help="held-out clips (an .npz of tiny_data/shapes.py)")
    return p.parse_args(argv)


def checkpoint(path):
    """A run folder (its `latest`) or a checkpoint folder -> the checkpoint folder; a one-line error if absent."""
    path = Path(path)
    if not path.exists():
        sys.exit(f"error: no checkpoint at {path}: pass a checkpoint folder or a run folder of train.py")
    return path / "latest" if (path / "latest").exists() else path


def fidelity(videos, test, start, rows=None):
    """(n, F', H, W, 3) uint8 frames start .. start+F'-1 of test clips `rows` (default the first n) -> per-frame
    shape fidelity (n, F')."""
    f = videos.shape[1]
    rows = range(len(videos)) if rows is None else rows
    return np.stack([metrics.shape_fidelity(v, test["centres"][i][start:start + f], *(test[k][i] for k in KEYS[1:]))
                     for v, i in zip(videos, rows)])


def mean_ci(per_clip):
    """Mean over clips and its 95% half-interval (0 for a single clip)."""
    per_clip = np.asarray(per_clip, dtype=np.float64)
    n = len(per_clip)
    return float(per_clip.mean()), float(1.96 * per_clip.std(ddof=1) / np.sqrt(n)) if n > 1 else 0.0


def load(run, args, window):
    overrides = {} if window is None else {"window": window}
    return checkpoints.load_models(str(checkpoint(run)), args.ema, torch.device("cpu"), overrides)


def parse_true_at(spec):
    """"4:3" -> (4, 3, 0): chunk 4 after the true chunks before it, reading a window of 3 history chunks
    ("4": all of them). "4:3:1" -> (4, 3, 1): the same, but the video starts at true chunk 1 (chunk 0 never
    existed), so chunk 1 is a first chunk, encoded without a history of its own."""
    chunk, window, start = (spec.split(":") + ["", ""])[:3]
    return int(chunk), int(window) if window else None, int(start) if start else 0


def true_history_chunks(run, test, args, fpc):
    """--true_at: per spec, each clip's chunk `chunk` generated after TRUE frames -> per-clip means."""
    out = {}
    for spec in args.true_at:
        chunk, window, start = parse_true_at(spec)
        dit, text_encoder, _ = load(run, args, window)
        P, first, made = chunk * fpc, start * fpc, []
        for i in cli.progress(range(0, args.clips, args.batch), desc=f"true history, chunk {spec}", unit="batch"):
            j = min(i + args.batch, args.clips)
            truth = media.from_uint8(test["frames"][i:j, first:P])
            context, neg = text_encoder.contexts(test["captions"][i:j])
            video = rf.generate(dit, context, P - first + fpc, steps=args.steps, shift=args.shift,
                                cfg_scale=args.cfg, neg_context=neg, prefix=truth, seed=args.seed + i)
            made.append(media.to_uint8(video[:, P - first:]))
        name = f"c{chunk}" + (f"/w{window}" if window else "") + (f"/from{start}" if start else "")
        out[name] = fidelity(np.concatenate(made), test, P).mean(1)
    return out


def evaluate_run(run, test, args):
    dit, text_encoder, meta = load(run, args, args.window)
    cfg, fpc = dit.cfg, dit.cfg.frames_per_chunk
    L = meta["train"]["clip_frames"]
    frames = args.frames or 4 * L
    one_step, rollouts = [], []
    true_at = {P: [] for P in (L, 2 * L - fpc) if P + fpc <= test["frames"].shape[1]}
    t0 = time.time()
    for i in cli.progress(range(0, args.clips, args.batch), desc=f"rollouts {Path(run).name}", unit="batch"):
        j = min(i + args.batch, args.clips)
        truth = media.from_uint8(test["frames"][i:j])                                 # (n, F, 3, H, W)
        seed = args.seed + i
        context, neg = text_encoder.contexts(test["captions"][i:j])
        # One Euler step from t = 1 to 0 is x0 = eps - v: the model's one-step prediction of the next chunk.
        x0 = rf.generate(dit, context, 2 * fpc, steps=1, cfg_scale=1.0, prefix=truth[:, :fpc], seed=seed)
        video = rf.generate(dit, context, frames, steps=args.steps, shift=args.shift, cfg_scale=args.cfg,
                            neg_context=neg, prefix=truth[:, :fpc], seed=seed)
        for P in true_at:                      # one chunk after P true frames (the test clips are long enough)
            true_at[P].append(media.to_uint8(rf.generate(dit, context, P + fpc, steps=args.steps,
                                                         shift=args.shift, cfg_scale=args.cfg, neg_context=neg,
                                                         prefix=truth[:, :P], seed=seed)[:, P:]))
        one_step.append(media.to_uint8(x0[:, fpc:]))
        rollouts.append(media.to_uint8(video))
    seconds = time.time() - t0
    one_step, rollouts = np.concatenate(one_step), np.concatenate(rollouts)
    per_frame = fidelity(rollouts[:, fpc:], test, fpc)                    # generated frames only: (N, frames - fpc)
    windows = {"chunk 1": (fpc, 2 * fpc), "1x": (fpc, L), "2x": (L, 2 * L), "4x": (3 * L, 4 * L)}
    windows |= {spec: tuple(int(x) for x in spec.split(":")) for spec in args.score}
    per_clip = {"one-step": fidelity(one_step, test, fpc).mean(1)}
    for name, (a, b) in windows.items():
        if max(a, fpc) < b <= frames:
            per_clip[name] = per_frame[:, max(a, fpc) - fpc:b - fpc].mean(1)
    for P, name in zip(true_at, ("true@L", "true@2L")):
        per_clip[name] = fidelity(np.concatenate(true_at[P]), test, P).mean(1)
    per_clip |= true_history_chunks(run, test, args, fpc)
    info = dict(run=str(run), step=meta["step"], stage=meta["stage"], clip_frames=L,
                sampler=dict(steps=args.steps or cfg.sample_steps, shift=args.shift or cfg.sample_shift,
                             cfg=cfg.sample_cfg if args.cfg is None else args.cfg, ema=args.ema, window=cfg.window),
                seconds=round(seconds, 1))
    return info, per_clip, rollouts, per_frame, L


def contact_sheet(truth, rollouts, names, L, path, clips, scale=3, gap=2):
    """Per clip: the truth, then each run; one column per frame; a red bar over frames >= L."""
    n_rows = 1 + len(rollouts)
    F_, H, W = rollouts[0].shape[1:4]
    cell_w, cell_h, label = W * scale + gap, H * scale + gap, 90
    sheet = Image.new("RGB", (label + F_ * cell_w, clips * (n_rows * cell_h + 6)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for c in range(clips):
        for r, (name, video) in enumerate([("truth", truth)] + list(zip(names, rollouts))):
            y = c * (n_rows * cell_h + 6) + r * cell_h
            draw.text((2, y + 2), f"{c}: {name}"[:14], fill=(0, 0, 0))
            for f in range(F_):
                img = Image.fromarray(video[c, f]).resize((W * scale, H * scale), Image.NEAREST)
                x = label + f * cell_w
                sheet.paste(img, (x, y))
                if f >= L:
                    draw.rectangle([x, y, x + W * scale - 1, y + 1], fill=(220, 40, 40))
    sheet.save(path)


def plot_per_frame(per_frames, names, L, fpc, path):
    """Mean shape fidelity per generated frame (frames fpc ..) over the clips, with its 95% band, one line per run."""
    plt = media.pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, pf in zip(names, per_frames):                                   # pf: (N, generated frames)
        frames = np.arange(fpc, fpc + pf.shape[1]) + 1                        # 1-based frame index
        mean, ci = pf.mean(0), 1.96 * pf.std(0, ddof=1) / np.sqrt(len(pf))
        ax.plot(frames, mean, lw=2, label=name)
        ax.fill_between(frames, mean - ci, mean + ci, alpha=0.2)
    ax.axvline(L + 0.5, color="red", ls="--", lw=1)
    ax.text(L + 0.8, 1.02, "past the training length", color="red", fontsize=8, va="bottom")
    ax.set(xlabel="frame", ylabel="shape fidelity (1 = perfect)", ylim=(0, 1.08),
           title=f"shape fidelity per frame, {len(per_frames[0])} held-out clips (95% bands)")
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


@torch.no_grad()
def main(argv=None):
    args = parse_args(argv)
    test = shapes.load_dataset(args.test)
    results, per_clips, videos, per_frames = [], [], [], []
    for run in args.runs:
        info, per_clip, rollouts, per_frame, L = evaluate_run(run, test, args)
        results.append(info | {k: mean_ci(v) for k, v in per_clip.items()})
        per_clips.append(per_clip)
        videos.append(rollouts)
        per_frames.append(per_frame)
        cells = "  ".join(f"{k} {m:.3f}±{h:.3f}" for k, v in per_clip.items() for m, h in [mean_ci(v)])
        print(f"{run} (step {info['step']}, {info['stage']}, {args.clips} clips, {info['seconds']} s): {cells}",
              flush=True)
    for run, per_clip in zip(args.runs[1:], per_clips[1:]):
        diff = {k: mean_ci(per_clip[k] - per_clips[0][k]) for k in per_clip if k in per_clips[0]}
        print(f"{run} minus {args.runs[0]} (paired): " +
              "  ".join(f"{k} {m:+.3f}±{h:.3f}" for k, (m, h) in diff.items()))
        results.append(dict(paired=f"{run} - {args.runs[0]}", **diff))
    names = [Path(r).name for r in args.runs]
    if args.png:
        contact_sheet(test["frames"][:args.png_clips, :videos[0].shape[1]], [v[:args.png_clips] for v in videos],
                      names, L, args.png, args.png_clips)
        print(f"wrote {args.png}")
    if args.plot:
        fpc = videos[0].shape[1] - per_frames[0].shape[1]                # the prefix: one chunk of true frames
        plot_per_frame(per_frames, names, L, fpc, args.plot)
        print(f"wrote {args.plot}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
