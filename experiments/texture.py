"""
experiments/texture.py -- the textured toy: does the model keep the detail only its history holds?

    python -m tiny_data.shapes --textured            # the data, once (tiny_data/textured_*.npz)
    python experiments/texture.py runs/textured/seed0/tf runs/textured/seed0/na runs/textured/seed0/rf \
        --window 2 --frames 64 --png runs/textured/seed0/sheet.png --plot runs/textured/seed0/scores.png
    python experiments/texture.py RUNS --first       # first the check that the models learned the task at all
    python experiments/texture.py RUNS --probe --png probe.png   # one chunk after a blurred or dimmed history

Each object of the textured toy carries its own random pattern of 2x2-pixel blocks; the caption does not say it,
so only the history holds it. Every model continues each held-out clip from its first chunk of true frames; the
frames it generates are scored (tiny_data/metrics.py, "The textured toy"):

  detail_kept  without the truth: the frame's fine detail (Laplacian energy) against the prompt's, 1 = the same,
               less for a smooth, faded or vanished object (a flat object of the right shape scores about 0.68)
  present      without the truth: at least half the prompt's lit pixels are lit
  shade_error  without the truth: how far the lit pixels are from the allowed shades (lower is better)
  psnr, lit_iou  against the truth: the right object in the right place (dB; the overlap of the lit pixels)

Windows of the rollout: 1x = frames 2-7 (inside the 8-frame training clips), 2x = 8-15, 4x = 24-31, 8x = 56-63.
Every later run is compared with the first, paired per clip (same clips, same noise), with 95% intervals.

--first scores one chunk generated after TRUE frames instead (chunks 1-3, the window as given): what each model
makes when its history is perfect. A model that is poor here never learned the task, and a later fall in its
rollout says nothing about its history. Beside it: copying the last true frame, and a black frame.

--probe asks what a rollout asks at every chunk, once and under control: each model continues the 4 true frames of
each clip after they were spoiled on purpose (blurred 3x3, or dimmed to half their brightness), and its next chunk
(frames 5-6) is scored against the true prompt, as in a rollout. A model that copies a spoiled history passes the
damage on, and a rollout compounds it; one that repairs it does not. --png draws what each model made.
"""

import argparse
import json
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import checkpoints  # noqa: E402
import cli  # noqa: E402
import media  # noqa: E402
import rf  # noqa: E402
from tiny_data import metrics, shapes  # noqa: E402
from tune_toy import checkpoint, mean_ci  # noqa: E402

FPC = 2                                    # the toy's chunk: 2 frames (WINDOWS assume 8-frame training clips)
SCORES = ("detail_kept", "present", "shade_error", "psnr", "lit_iou")
WINDOWS = {"1x": (2, 8), "2x": (8, 16), "4x": (24, 32), "8x": (56, 64)}
PROBE_HISTORY = 2 * FPC                    # --probe: true frames given, spoiled, before the chunk it scores


def blurred(frames):
    """uint8 (..., H, W, 3) frames, each pixel the mean of its 3x3 neighbourhood (black beyond the border)."""
    x = np.pad(frames.astype(np.float64), [(0, 0)] * (frames.ndim - 3) + [(1, 1), (1, 1), (0, 0)])
    H, W = frames.shape[-3:-1]
    return np.round(sum(x[..., i:i + H, j:j + W, :] for i in range(3) for j in range(3)) / 9).astype(np.uint8)


# NOTE(choice): a 3x3 blur and half the brightness stand for the two ways a rollout's errors spoil its history
# on this toy (docs/method.md, "The textured toy's probe").
SPOILED = {"true": lambda f: f, "blurred": blurred, "dimmed": lambda f: np.round(f * 0.5).astype(np.uint8)}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run folders (their `latest`) or checkpoint folders; the first is the "
                                           "baseline of the paired differences")
    p.add_argument("--test", default=str(shapes.TEXTURED_TEST_PATH), help="held-out clips (.npz)")
    p.add_argument("--clips", type=int, default=128, help="held-out clips (the first N)")
    p.add_argument("--frames", type=int, default=32, help="rollout length, prompt included")
    p.add_argument("--window", type=int, default=2, help="history chunks each new chunk reads (0: all of them)")
    p.add_argument("--first", action="store_true", help="score one chunk after a true history instead")
    p.add_argument("--probe", action="store_true", help="score one chunk after a true, blurred or dimmed history")
    p.add_argument("--seed", type=int, default=1000, help="noise seed of batch i: seed + i")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--cfg", type=float, default=None, help="guidance scale (default: the model's, 3 for the toy)")
    p.add_argument("--steps", type=int, default=None, help="sampler steps per chunk (default: the model's, 16)")
    p.add_argument("--png", default="", help="write a numbered contact sheet of the first --png_clips clips")
    p.add_argument("--png_clips", type=int, default=4)
    p.add_argument("--plot", default="", help="write each score per frame (mean over clips, 95% band)")
    p.add_argument("--json", default="", help="write the numbers here")
    args = p.parse_args(argv)
    if args.first and args.probe:
        p.error("--first and --probe are two separate checks: give one of them")
    if args.frames < 4 or args.frames % 2:
        p.error(f"--frames {args.frames}: give an even number of frames, at least 4")
    return args


def load(run, window):
    dit, encoder, _ = checkpoints.load_models(str(checkpoint(run)), True, torch.device("cpu"),
                                              {"window": window or None})
    if dit.cfg.frames_per_chunk != FPC:
        sys.exit(f"error: {run} has {dit.cfg.frames_per_chunk}-frame chunks; this script scores the toy's {FPC}")
    return dit, encoder


def score(videos, truth, prompt):
    """(N, F, H, W, 3) generated frames against the truth's same frames and each clip's prompt -> {score: (N, F)}."""
    per_clip = [metrics.textured_scores(v, t, p) for v, t, p in zip(videos, truth, prompt)]
    return {k: np.stack([s[k] for s in per_clip]) for k in SCORES}


@torch.no_grad()
def rollouts(run, test, args, bar):
    """Each clip continued from its first chunk to --frames frames: uint8 (clips, frames, H, W, 3)."""
    dit, encoder = load(run, args.window)
    out = []
    for i in range(0, args.clips, args.batch):
        j = min(i + args.batch, args.clips)
        context, neg = encoder.contexts(test["captions"][i:j])
        prompt = media.from_uint8(test["frames"][i:j, :FPC])
        out.append(media.to_uint8(rf.generate(dit, context, args.frames, neg_context=neg, prefix=prompt,
                                              seed=args.seed + i, cfg_scale=args.cfg, steps=args.steps)))
        bar.update(j - i)
    return np.concatenate(out)


@torch.no_grad()
def next_chunks(dit, encoder, test, given, spoil, args, bar):
    """The chunk each model makes after each clip's first `given` true frames, passed through `spoil` first:
    uint8 (clips, FPC, H, W, 3)."""
    made = []
    for i in range(0, args.clips, args.batch):
        j = min(i + args.batch, args.clips)
        context, neg = encoder.contexts(test["captions"][i:j])
        history = media.from_uint8(spoil(test["frames"][i:j, :given]))
        video = rf.generate(dit, context, given + FPC, neg_context=neg, prefix=history, seed=args.seed + i,
                            cfg_scale=args.cfg, steps=args.steps)
        made.append(media.to_uint8(video[:, given:]))
        bar.update(j - i)
    return np.concatenate(made)


def first_chunks(run, test, args, bar):
    """{chunk c: its frames generated after the true frames before it, uint8 (clips, FPC, H, W, 3)}, c = 1..3."""
    dit, encoder = load(run, args.window)
    return {c: next_chunks(dit, encoder, test, c * FPC, SPOILED["true"], args, bar) for c in (1, 2, 3)}


def probe_chunks(run, test, args, bar):
    """{history kind: the chunk generated after the clip's first PROBE_HISTORY frames, spoiled that way,
    uint8 (clips, FPC, H, W, 3)} for each kind of SPOILED."""
    dit, encoder = load(run, args.window)
    return {kind: next_chunks(dit, encoder, test, PROBE_HISTORY, spoil, args, bar) for kind, spoil in SPOILED.items()}


def summary(per_frame, windows):
    """{score: {window: per-clip means (N,)}} of {score: (N, F)} per-frame values, F counted from frame 0; nan for
    a clip where the score is never defined in the window (shade_error of a frame with no lit pixel)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return {k: {w: np.nanmean(v[:, a:b], axis=1) for w, (a, b) in windows.items() if b <= v.shape[1]}
                for k, v in per_frame.items()}


def defined_ci(per_clip):
    """mean_ci over the clips where the score is defined (nan when it is nowhere)."""
    per_clip = np.asarray(per_clip, dtype=np.float64)
    per_clip = per_clip[~np.isnan(per_clip)]
    return mean_ci(per_clip) if len(per_clip) else (float("nan"), float("nan"))


def report(names, tables):
    """Print each run's means and each later run minus the first, paired per clip; return them as rows."""
    rows = []
    for name, table in zip(names, tables):
        cells = {f"{k} {w}": defined_ci(v) for k, by_w in table.items() for w, v in by_w.items()}
        rows.append(dict(run=name, **cells))
        print(name)
        for k, by_w in table.items():
            print(f"  {k:12s} " + "  ".join(f"{w} {defined_ci(v)[0]:7.3f}" for w, v in by_w.items()))
    for name, table in zip(names[1:], tables[1:]):             # paired: the clips where both are defined
        cells = {f"{k} {w}": defined_ci(v - tables[0][k][w]) for k, by_w in table.items() for w, v in by_w.items()}
        rows.append(dict(paired=f"{name} - {names[0]}", **cells))
        print(f"{name} minus {names[0]}, paired per clip (95% interval)")
        for k, by_w in table.items():
            print(f"  {k:12s} " + "  ".join(f"{w} {m:+.3f}±{h:.3f}" for w, v in by_w.items()
                                             for m, h in [defined_ci(v - tables[0][k][w])]))
    return rows


def contact_sheet(truth, videos, names, path, clips, scale=4, gap=2):
    """Per clip: the truth, then each run; for each window of WINDOWS that fits, its frames, numbered on top."""
    F, H, W = videos[0].shape[1:4]
    windows = [(a, b) for a, b in [(0, 8), *list(WINDOWS.values())[1:]] if b <= F]
    cell, label, top, block_gap = W * scale + gap, 64, 14, 10
    width = label + sum((b - a) * cell + block_gap for a, b in windows)
    rows = 1 + len(videos)
    sheet = Image.new("RGB", (width, top + clips * (rows * (H * scale + gap) + 8)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    x = label
    for a, b in windows:                                            # frame numbers (1-based) above each column
        for f in range(a, b):
            draw.text((x + (f - a) * cell + 2, 1), str(f + 1), fill=(0, 0, 0))
        x += (b - a) * cell + block_gap
    for c in range(clips):
        for r, (name, video) in enumerate([("truth", truth)] + list(zip(names, videos))):
            y = top + c * (rows * (H * scale + gap) + 8) + r * (H * scale + gap)
            draw.text((2, y + 4), f"{c}: {name}"[:11], fill=(0, 0, 0))
            x = label
            for a, b in windows:
                for f in range(a, b):
                    img = Image.fromarray(video[c, f]).resize((W * scale, H * scale), Image.NEAREST)
                    sheet.paste(img, (x + (f - a) * cell, y))
                x += (b - a) * cell + block_gap
    sheet.save(path)


def probe_sheet(truth, made, names, path, clips, scale=4, gap=2):
    """Per clip and kind of history: the last two frames given (spoiled), the truth's next chunk, then each run's."""
    H, W = truth.shape[2:4]
    cell, label, top, group_gap = W * scale + gap, 72, 14, 10
    columns = ["given", "truth"] + list(names)
    width = label + len(columns) * (FPC * cell + group_gap)
    row_h = H * scale + gap
    sheet = Image.new("RGB", (width, top + clips * (len(SPOILED) * row_h + 8)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for g, name in enumerate(columns):                         # the column titles, over each pair of frames
        frames = f"{PROBE_HISTORY - 1}-{PROBE_HISTORY}" if name == "given" else \
            f"{PROBE_HISTORY + 1}-{PROBE_HISTORY + FPC}"
        draw.text((label + g * (FPC * cell + group_gap) + 2, 1), f"{name} {frames}"[:18], fill=(0, 0, 0))
    for c in range(clips):
        for k, (kind, spoil) in enumerate(SPOILED.items()):
            y = top + c * (len(SPOILED) * row_h + 8) + k * row_h
            draw.text((2, y + 4), f"{c}: {kind}", fill=(0, 0, 0))
            given = spoil(truth[c, PROBE_HISTORY - FPC:PROBE_HISTORY])
            groups = [given, truth[c, PROBE_HISTORY:PROBE_HISTORY + FPC]] + [m[kind][c] for m in made]
            for g, frames in enumerate(groups):
                for f, frame in enumerate(frames):
                    img = Image.fromarray(frame).resize((W * scale, H * scale), Image.NEAREST)
                    sheet.paste(img, (label + g * (FPC * cell + group_gap) + f * cell, y))
    sheet.save(path)


def plot(per_frames, names, fpc, path, title):
    """One panel per score: its mean per generated frame over the clips, with a 95% band, one line per run."""
    plt = media.pyplot()
    shown = ("detail_kept", "present", "psnr", "lit_iou")
    labels = {"detail_kept": "detail kept (no truth needed)", "present": "object present (no truth needed)",
              "psnr": "PSNR against the truth (dB)", "lit_iou": "lit-pixel overlap with the truth"}
    fig, axes = plt.subplots(1, len(shown), figsize=(3.4 * len(shown), 3.2))
    for ax, k in zip(axes, shown):
        for name, pf in zip(names, per_frames):
            v = pf[k][:, fpc:]
            frames = np.arange(fpc, fpc + v.shape[1]) + 1
            mean, ci = v.mean(0), 1.96 * v.std(0, ddof=1) / np.sqrt(len(v))
            ax.plot(frames, mean, lw=1.8, label=name)
            ax.fill_between(frames, mean - ci, mean + ci, alpha=0.2)
        ax.axvline(8.5, color="red", ls="--", lw=1)
        ax.set(title=labels[k], xlabel="frame")
        ax.title.set_fontsize(9)
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    try:
        test = shapes.load_dataset(args.test)
    except (FileNotFoundError, ValueError) as err:
        sys.exit(f"error: {err}".replace(shapes.REGENERATE_HINT, shapes.TEXTURED_HINT))
    if "textures" not in test:
        sys.exit(f"error: {args.test} is not a textured data set; {shapes.TEXTURED_HINT}")
    args.clips = min(args.clips, len(test["frames"]))
    if args.frames > test["frames"].shape[1]:
        sys.exit(f"error: --frames {args.frames} is longer than the held-out clips ({test['frames'].shape[1]})")
    names = [Path(r).name for r in args.runs]
    truth = test["frames"][:args.clips]
    if args.first:
        per_runs = []
        with cli.progress(total=3 * args.clips * len(args.runs), desc="first chunks", unit="clip") as bar:
            for run in args.runs:
                made = first_chunks(run, test, args, bar)
                per_runs.append({c: score(v, truth[:, c * FPC:(c + 1) * FPC], truth[:, :FPC])
                                 for c, v in made.items()})
        baselines = {"copy the last true frame": lambda c: np.repeat(truth[:, c * FPC - 1:c * FPC], FPC, axis=1),
                     "black": lambda c: np.zeros_like(truth[:, :FPC])}
        for make in baselines.values():
            per_runs.append({c: score(make(c), truth[:, c * FPC:(c + 1) * FPC], truth[:, :FPC]) for c in (1, 2, 3)})
        whole = {"chunk": (0, FPC)}
        tables = [{k: {f"chunk {c}": summary(pr[c], whole)[k]["chunk"] for c in (1, 2, 3)} for k in SCORES}
                  for pr in per_runs]
        rows = report(names + list(baselines), tables)
    elif args.probe:
        made = []
        with cli.progress(total=len(SPOILED) * args.clips * len(args.runs), desc="probe", unit="clip") as bar:
            for run in args.runs:
                made.append(probe_chunks(run, test, args, bar))
        after = truth[:, PROBE_HISTORY:PROBE_HISTORY + FPC]
        whole = {"chunk": (0, FPC)}
        tables = [{k: {kind: summary(score(v, after, truth[:, :FPC]), whole)[k]["chunk"] for kind, v in m.items()}
                   for k in SCORES} for m in made]
        print(f"one chunk (frames {PROBE_HISTORY + 1}-{PROBE_HISTORY + FPC}) after the first {PROBE_HISTORY} "
              f"true frames, as given (true), blurred 3x3 or dimmed to half")
        rows = report(names, tables)
        if args.png:
            probe_sheet(truth, made, names, args.png, args.png_clips)
            print(f"wrote {args.png}")
    else:
        videos = []
        with cli.progress(total=args.clips * len(args.runs), desc="rollouts", unit="clip") as bar:
            for run in args.runs:
                videos.append(rollouts(run, test, args, bar))
        truth = truth[:, :args.frames]
        per_frames = [score(v, truth, truth[:, :FPC]) for v in videos]
        rows = report(names, [summary(pf, WINDOWS) for pf in per_frames])
        window = f"a window of {args.window} history chunks" if args.window else "the whole history"
        guidance = "" if args.cfg is None else f", guidance {args.cfg:g}"
        if args.png:
            contact_sheet(truth, [v[:args.png_clips] for v in videos], names, args.png, args.png_clips)
            print(f"wrote {args.png}")
        if args.plot:
            plot(per_frames, names, FPC, args.plot,
                 f"textured toy, {args.clips} held-out clips from 2 true frames, {window}{guidance} (95% bands); "
                 f"red line: the training clips' length")
            print(f"wrote {args.plot}")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(args=vars(args), rows=rows), indent=1))


if __name__ == "__main__":
    main()
