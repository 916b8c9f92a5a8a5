"""
experiments/turning_toy.py -- a toy whose future is NOT fixed by its past, where Resampling Forcing started to pay
(the shipped toy is deterministic, and there teacher forcing was never worse; see docs/evidence.md).

    python experiments/turning_toy.py data runs/turning             # train.npz (2000 x 16), test.npz (128 x 64)
    DATA=runs/turning/train.npz OUT=runs/turning STEPS=6000 bash experiments/drift_runs.sh
    python experiments/turning_toy.py eval runs/turning/tf runs/turning/rf --window 3 --png pair.png

The clips are the shipped toy's (one 7x7 shape, whole-pixel motion, exact bounces), except that on every frame each
axis of the velocity flips with probability TURN: the object wanders, and no model can know where it goes next. A
rollout must then sample a future, and its frames can drift away from what real frames look like while staying
plausible: the drift Resampling Forcing is meant to cure.

The shipped metric (tiny_data.metrics.shape_fidelity) compares with the true positions, which a sampled future need
not match. `free_fidelity` scores the shape alone: the best IoU of the generated pixels of the object's colour with
its captioned shape placed anywhere. 1 on the truth, also shifted; lower for blur, speckle, a wrong shape; 0 when
the object is gone. Every number is its mean over the generated frames of a window (chunk 1, 1x = frames fpc..L-1,
2x, 4x as in tune_toy.py), over held-out clips, with a 95% interval; later runs are also paired with the first.
"""

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import checkpoints  # noqa: E402
import media  # noqa: E402
import rf  # noqa: E402
from tiny_data import metrics, shapes  # noqa: E402
from tune_toy import checkpoint, contact_sheet, mean_ci  # noqa: E402

TURN = 0.15        # per frame and axis: the chance that the velocity flips (about one turn every 3 frames)
SIZE = shapes.FRAME_SIZE


def make_dataset(seed, num_clips, num_frames, turn=TURN):
    """The shipped generator (tiny_data.shapes.make_dataset, one object per clip) with random turns."""
    return shapes.make_dataset(seed, num_clips, num_frames, turn=turn)


def placements(shape, radius):
    """The shape's pixels at every centre that keeps it inside the frame: (P, H * W) float."""
    r = int(radius)
    return np.stack([shapes.shape_mask(shape, np.array([y + 0.5, x + 0.5]), radius, SIZE).reshape(-1)
                     for y in range(r, SIZE - r) for x in range(r, SIZE - r)]).astype(np.float64)


def free_fidelity(frames, colour, shape, radius):
    """(F, H, W, 3) uint8 frames of one clip -> (F,) the best IoU of the pixels that snap to `colour` (an index
    into COLOURS) with shape `shape` (an index into SHAPES) of half-extent `radius` placed anywhere."""
    made = (metrics.snap(frames) == colour).reshape(len(frames), -1).astype(np.float64)         # (F, H W)
    placed = placements(shapes.SHAPES[shape], radius)                                          # (P, H W)
    inter = made @ placed.T
    union = made.sum(1, keepdims=True) + placed.sum(1) - inter
    return (inter / union).max(1)


def evaluate(run, test, clips, frames, window):
    """One checkpoint's rollouts of the first `clips` test clips from one true chunk -> (per-clip scores, videos)."""
    dit, text_encoder, meta = checkpoints.load_models(str(checkpoint(run)), True, torch.device("cpu"),
                                                      {} if window is None else {"window": window})
    fpc, L = dit.cfg.frames_per_chunk, meta["train"]["clip_frames"]
    with torch.no_grad():
        truth = media.from_uint8(test["frames"][:clips])
        context, neg = text_encoder.contexts(test["captions"][:clips])
        videos = media.to_uint8(rf.generate(dit, context, frames, neg_context=neg, prefix=truth[:, :fpc], seed=1000))
    scores = np.stack([free_fidelity(videos[i], test["colours"][i, 0], test["shapes"][i, 0], test["radii"][i, 0])
                       for i in range(clips)])
    windows = {"chunk 1": (fpc, 2 * fpc), "1x": (fpc, L), "2x": (L, 2 * L), "4x": (3 * L, 4 * L)}
    return {k: scores[:, a:b].mean(1) for k, (a, b) in windows.items() if b <= frames}, videos, L


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("data", help="write train.npz and test.npz into a folder")
    d.add_argument("folder")
    d.add_argument("--turn", type=float, default=TURN)
    e = sub.add_parser("eval", help="score run folders or checkpoints on the test clips")
    e.add_argument("runs", nargs="+")
    e.add_argument("--test", default="runs/turning/test.npz")
    e.add_argument("--clips", type=int, default=64)
    e.add_argument("--frames", type=int, default=32, help="rollout length (default 32: 4x the toy's 8)")
    e.add_argument("--window", type=int, default=None, help="sample with a sliding window of this many chunks")
    e.add_argument("--png", default="", help="a contact sheet of the first 8 clips")
    args = p.parse_args(argv)
    if args.command == "data":
        folder = Path(args.folder)
        folder.mkdir(parents=True, exist_ok=True)
        for name, seed, n, f in (("train", 0, 2000, 16), ("test", 1, 128, 64)):
            shapes.save_dataset(folder / f"{name}.npz", make_dataset(seed, n, f, args.turn))
            print(f"wrote {folder / name}.npz: {n} clips x {f} frames, turn {args.turn}")
        return
    test = shapes.load_dataset(args.test)
    results, videos = [], []
    for run in args.runs:
        t0 = time.time()
        per_clip, video, L = evaluate(run, test, args.clips, args.frames, args.window)
        results.append(per_clip)
        videos.append(video)
        print(f"{run} ({args.clips} clips, window {args.window}, {time.time() - t0:.0f} s): " +
              "  ".join(f"{k} {m:.3f}±{h:.3f}" for k, v in per_clip.items() for m, h in [mean_ci(v)]), flush=True)
    for run, per_clip in zip(args.runs[1:], results[1:]):
        print(f"{run} minus {args.runs[0]} (paired): " + "  ".join(
            f"{k} {m:+.3f}±{h:.3f}" for k in per_clip for m, h in [mean_ci(per_clip[k] - results[0][k])]))
    if args.png:
        n = min(8, args.clips)
        names = [Path(r).parent.name if Path(r).name.startswith("step_") else Path(r).name for r in args.runs]
        contact_sheet(test["frames"][:n, :args.frames], [v[:n] for v in videos], names, L, args.png, n)
        print(f"wrote {args.png}")


if __name__ == "__main__":
    main()
