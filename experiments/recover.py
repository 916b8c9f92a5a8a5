"""
experiments/recover.py -- after one corrupted history chunk, which model recovers, and how fast?

    python experiments/recover.py                          # the shipped small pair, 64 clips, every corruption
    python experiments/recover.py checkpoints/toy_tf checkpoints/toy_ar_s0.6 --clips 32 --png runs/recover.png

The paper's premise in its cleanest form: a history that is not the truth. Each held-out clip gives a true
prefix of --prefix chunks; chunk --chunk of it is corrupted in a named way, and each model then generates
--generate more frames from that prefix, reading a sliding window of --window history chunks (2 by default:
with 8-frame training clips, the widest window whose every offset the models trained on). Shape fidelity
(tiny_data.metrics) is scored per generated frame against the truth.

Corruptions of the chosen chunk:
  none     the truth (the baseline: what each model does from a perfect history)
  noise    plus Gaussian noise, sigma 0.5 (pixels in [-1, 1])
  shift    every pixel moved 2 to the right (wrapping), so the object jumps
  blank    the background only: the object vanishes for one chunk
  colour   the colour channels rotated (R, G, B) -> (G, B, R): the object changes colour
  guess    the model's own one-step guess of that chunk from the true frames before it (each model its own)

Prints, per corruption, each model's mean over the generated frames and the second minus the first, paired per
clip, with 95% intervals; --png draws one panel per corruption (fidelity per generated frame, 95% bands);
--sheet draws clip 0's prefix and rollouts per corruption.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import checkpoints  # noqa: E402
import cli  # noqa: E402
import media  # noqa: E402
import rf  # noqa: E402
from tiny_data import shapes  # noqa: E402
from tune_toy import checkpoint, fidelity, mean_ci  # noqa: E402

CORRUPTIONS = ("none", "noise", "shift", "blank", "colour", "guess")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="*", default=["checkpoints/small_tf", "checkpoints/small_rf"],
                   help="checkpoint (or run) folders; the first is the baseline of the paired differences")
    p.add_argument("--clips", type=int, default=64, help="held-out clips (the first N of the test set)")
    p.add_argument("--prefix", type=int, default=3, help="true chunks before generation starts")
    p.add_argument("--chunk", type=int, default=1, help="which prefix chunk is corrupted (0-based)")
    p.add_argument("--generate", type=int, default=10, help="frames generated after the prefix")
    p.add_argument("--window", type=int, default=2, help="history chunks each generated chunk reads (0: all)")
    p.add_argument("--corruptions", nargs="*", default=list(CORRUPTIONS), choices=CORRUPTIONS)
    p.add_argument("--seed", type=int, default=0, help="seed of the sampler's noise and of the noise corruption")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--png", default="", help="write the per-frame plot here")
    p.add_argument("--sheet", default="", help="write clip 0's prefix and rollouts here")
    p.add_argument("--json", default="", help="write the numbers here")
    p.add_argument("--test", default=str(shapes.TEST_PATH), help="held-out clips (.npz of tiny_data/shapes.py)")
    args = p.parse_args(argv)
    if not 0 <= args.chunk < args.prefix:
        p.error(f"--chunk {args.chunk} is not one of the {args.prefix} prefix chunks: pick 0 .. {args.prefix - 1}")
    if args.generate < 1 or args.clips < 1:
        p.error("--generate and --clips must be at least 1")
    return args


def corrupt(prefix, how, chunk, fpc, guess=None, seed=0):
    """prefix (B, P, 3, H, W) in [-1, 1] -> a copy with chunk `chunk` corrupted in the named way."""
    out, part = prefix.clone(), slice(chunk * fpc, (chunk + 1) * fpc)
    x = out[:, part]
    if how == "noise":
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))
        out[:, part] = (x + 0.5 * noise).clamp(-1, 1)
    elif how == "shift":
        out[:, part] = x.roll(2, dims=-1)
    elif how == "blank":
        out[:, part] = -1.0                                            # the toy's black background
    elif how == "colour":
        out[:, part] = x[:, :, [1, 2, 0]]
    elif how == "guess":
        out[:, part] = guess
    return out


@torch.no_grad()
def run_model(run, test, args, bar):
    """-> ({corruption: per-frame fidelity (clips, generate)}, {corruption: clip 0's video (uint8)}, fpc)."""
    overrides = {"window": args.window or None}
    dit, encoder, _ = checkpoints.load_models(str(checkpoint(run)), True, torch.device("cpu"), overrides)
    fpc = dit.cfg.frames_per_chunk
    P, total = args.prefix * fpc, args.prefix * fpc + args.generate
    total += -total % fpc                                              # whole chunks; extra frames are not scored
    scores, firsts = {c: [] for c in args.corruptions}, {}
    for i in range(0, args.clips, args.batch):
        rows = range(i, min(i + args.batch, args.clips))
        truth = media.from_uint8(test["frames"][rows.start:rows.stop, :P])
        context, neg = encoder.contexts(test["captions"][rows.start:rows.stop])
        guess = rf.generate(dit, context, (args.chunk + 1) * fpc, steps=1, cfg_scale=1.0,
                            prefix=truth[:, :args.chunk * fpc] if args.chunk else None,
                            size=truth.shape[-2:], seed=args.seed + i)[:, args.chunk * fpc:]
        for how in args.corruptions:
            prefix = corrupt(truth, how, args.chunk, fpc, guess, seed=args.seed + i)
            video = media.to_uint8(rf.generate(dit, context, total, neg_context=neg, prefix=prefix,
                                               seed=args.seed + i))
            scores[how].append(fidelity(video[:, P:P + args.generate], test, P, rows))
            firsts.setdefault(how, video[0])
            bar.update(len(rows))
    return {c: np.concatenate(v) for c, v in scores.items()}, firsts, fpc


def plot(results, names, args, path):
    plt = media.pyplot()
    n = len(args.corruptions)
    fig, axes = plt.subplots(1, n, figsize=(2.6 * n, 3), sharey=True)
    for ax, how in zip(np.atleast_1d(axes), args.corruptions):
        for name, res in zip(names, results):
            pf = res[how]
            x = np.arange(1, pf.shape[1] + 1)
            mean, ci = pf.mean(0), 1.96 * pf.std(0, ddof=1) / np.sqrt(len(pf))
            ax.plot(x, mean, lw=2, label=name)
            ax.fill_between(x, mean - ci, mean + ci, alpha=0.2)
        ax.set(title=how, xlabel="generated frame", ylim=(0, 1.05))
    np.atleast_1d(axes)[0].set_ylabel("shape fidelity (1 = perfect)")
    np.atleast_1d(axes)[0].legend(fontsize=7, loc="lower left")
    fig.suptitle(f"history chunk {args.chunk} corrupted, then {args.generate} frames with a window of "
                 f"{args.window or 'all'} ({args.clips} clips, 95% bands)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def sheet(firsts, names, args, path, fpc, scale=3, gap=2):
    """Clip 0: one row per (corruption, model), one column per frame (numbered); a red bar over the corrupted
    chunk, a grey line where generation starts."""
    from PIL import Image, ImageDraw
    rows = [(f"{how}: {name}", f[how]) for how in args.corruptions for name, f in zip(names, firsts)]
    n_frames, H, W = rows[0][1].shape[:3]
    cell, label, top = W * scale + gap, 120, 14
    img = Image.new("RGB", (label + n_frames * cell, top + len(rows) * (H * scale + gap)), "white")
    draw = ImageDraw.Draw(img)
    for f in range(n_frames):
        draw.text((label + f * cell + 2, 1), str(f + 1), fill="black")
    for r, (text, video) in enumerate(rows):
        y = top + r * (H * scale + gap)
        draw.text((2, y + 2), text, fill="black")
        for f in range(n_frames):
            x = label + f * cell
            img.paste(Image.fromarray(video[f]).resize((W * scale, H * scale), Image.NEAREST), (x, y))
            if args.chunk * fpc <= f < (args.chunk + 1) * fpc and not text.startswith("none"):
                draw.rectangle([x, y, x + W * scale - 1, y + 1], fill=media.RED)
    x = label + args.prefix * fpc * cell - gap
    draw.line([x, top, x, img.height], fill=(128, 128, 128), width=2)
    img.save(path)


def main(argv=None):
    args = parse_args(argv)
    test = shapes.load_dataset(args.test)
    if args.clips > len(test["frames"]):
        sys.exit(f"error: --clips {args.clips} but the test set holds {len(test['frames'])} clips")
    names = [Path(r).name for r in args.runs]
    t0 = time.time()
    with cli.progress(total=len(args.runs) * args.clips * len(args.corruptions), desc="rollouts", unit="clip") as bar:
        out = [run_model(r, test, args, bar) for r in args.runs]
    results, firsts = [o[0] for o in out], [o[1] for o in out]
    print(f"{args.clips} clips, chunk {args.chunk} of a {args.prefix}-chunk true prefix corrupted, "
          f"{args.generate} frames generated, window {args.window or 'all'} ({time.time() - t0:.0f} s)")
    table = []
    for how in args.corruptions:
        row = {"corruption": how} | {n: mean_ci(r[how].mean(1)) for n, r in zip(names, results)}
        for n, r in zip(names[1:], results[1:]):
            row[f"{n} - {names[0]}"] = mean_ci(r[how].mean(1) - results[0][how].mean(1))
        table.append(row)
        print(f"  {how:7s} " + "  ".join(f"{k} {m:+.3f}±{h:.3f}" if " - " in k else f"{k} {m:.3f}±{h:.3f}"
                                         for k, v in row.items() if k != "corruption" for m, h in [v]))
    if args.png:
        plot(results, names, args, args.png)
        print(f"wrote {args.png}")
    if args.sheet:
        sheet(firsts, names, args, args.sheet, out[0][2])
        print(f"wrote {args.sheet}")
    if args.json:
        Path(args.json).write_text(json.dumps(table, indent=1))


if __name__ == "__main__":
    main()
