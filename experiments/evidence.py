"""
experiments/evidence.py -- does Resampling Forcing beat teacher forcing on long rollouts?

    python experiments/evidence.py                  # CPU variant: 8 methods, several hours on 2 cores
    python experiments/evidence.py --scale gpu      # longer training, bigger batch: for one GPU
    python experiments/evidence.py --scale cpu_long --methods tf ar_s0.6 --out DIR   # twice the budget (docs/evidence.md)
    python experiments/evidence.py --only_eval      # re-score the trained runs (saved rollouts are reused)

Every method is trained with the same model, data, steps and seed. They all branch from ONE teacher-forcing
warm-up checkpoint (train.py --resume may change the degradation and routing options), so they differ only in how
the history is treated after the warm-up. The run is resumable: start the same command again after an interrupt
and finished runs are kept, a half-finished one continues from its last checkpoint.

Evaluation: every held-out clip of tiny_data/test.npz (128) gets a ground-truth prefix of one chunk (2 frames) and
is rolled out to 4x the training clip length (8 -> 32 frames) with fixed seeds. Each generated frame is scored by
tiny_data/metrics.py against the simulator's truth. A horizon's score for a clip is the mean over the frames of that
horizon (1x: the generated frames up to the training length, 2x: frames 9-16, 4x: frames 25-32); the table gives
the mean over clips with a 95% confidence interval (normal approximation, 1.96 standard errors).

Writes to --out (default runs/evidence): one train.py run per method, results.json (every number, the timings,
the machine), results.md (the table), metrics.png (metric against frame index), hero.gif (truth | teacher forcing
| Resampling Forcing), and with --ship the two small EMA checkpoints for checkpoints/.
"""

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import checkpoints  # noqa: E402
import cli  # noqa: E402
import media  # noqa: E402
import rf  # noqa: E402
import train  # noqa: E402
from tiny_data import metrics, shapes  # noqa: E402

# name -> (label, train.py options applied after the shared warm-up)
METHODS = {
    "tf":        ("teacher forcing",                 ["--degrade", "none"]),
    "noise":     ("noise augmentation",              ["--degrade", "noise"]),
    "parallel":  ("parallel resampling, s=0.6",      ["--degrade", "parallel", "--resample_shift", "0.6"]),
    "ar_s0.1":   ("RF (autoregressive), s=0.1",      ["--degrade", "autoregressive", "--resample_shift", "0.1"]),
    "ar_s0.6":   ("RF (autoregressive), s=0.6",      ["--degrade", "autoregressive", "--resample_shift", "0.6"]),
    "ar_s3.0":   ("RF (autoregressive), s=3.0",      ["--degrade", "autoregressive", "--resample_shift", "3.0"]),
    "ar_top2":   ("RF s=0.6 + top-2 routing",        ["--degrade", "autoregressive", "--resample_shift", "0.6",
                                                      "--top_k", "2"]),
    "ar_win2":   ("RF s=0.6 + window of 2 chunks",   ["--degrade", "autoregressive", "--resample_shift", "0.6",
                                                      "--window", "2"]),
}
HERO = ("tf", "ar_s0.6")              # the side-by-side GIF and the shipped checkpoints
# NOTE(choice): routing variants use k = w = 2. Training clips hold 4 chunks, so at most 3 history chunks: 2 of them
# is real sparsity during training, and at 4x length (15 history chunks) the router must pick.

# NOTE(choice): the warm-up is the quick start's 3000 teacher-forcing steps (the toy as shipped); each method then
# trains its own history for the rest. experiments/drift_runs.sh is the same recipe for tf and ar_s0.6 alone.
SCALES = {   # the toy preset everywhere; only the training budget differs
    "cpu": dict(steps=9000, warmup_steps=3000, batch_size=8),    # 6000 steps per method: ~30 min each at 1 thread
    "cpu_long": dict(steps=18000, warmup_steps=3000, batch_size=8),  # continues "cpu" runs if their folders are
                                                                      # copied to --out first
    "gpu": dict(steps=30000, warmup_steps=3000, batch_size=32),
    "smoke": dict(steps=4, warmup_steps=2, batch_size=2),        # the test: does the pipeline run end to end
}
TRAIN_FRAMES = 8                      # --clip_frames of every run
PREFIX = 2                            # one chunk of ground truth
HORIZONS = {"1x": (PREFIX, 8), "2x": (8, 16), "4x": (24, 32)}   # [start, end) frame ranges that are scored
METRICS = ("shape_fidelity", "motion_error", "colour_error", "persistence")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", choices=SCALES, default="cpu")
    p.add_argument("--out", default=str(ROOT / "runs" / "evidence"))
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--clips", type=int, default=128, help="held-out clips to roll out (at least 64)")
    p.add_argument("--batch", type=int, default=64, help="clips per generate() call")
    p.add_argument("--seed", type=int, default=0, help="training seed (every method uses the same)")
    p.add_argument("--sample_steps", type=int, default=None, help="Euler steps per chunk (default: the preset's)")
    p.add_argument("--only_eval", action="store_true", help="skip training; score the runs in --out")
    p.add_argument("--ship", action="store_true", help=f"also write {HERO} EMA weights to checkpoints/")
    p.add_argument("--device", default="auto")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------------------------------
# training: one warm-up, then one branch per method
# ----------------------------------------------------------------------------------------------------------------

def finished(run, steps):
    return any(p.name == f"step_{steps:07d}" for p in checkpoints.saved_steps(run))


def run_train(argv):
    """train.main; on Ctrl-C it saves and stops, and then the way on is to rerun this script, not train.py."""
    try:
        train.main(argv)
    except cli.Stopped:
        sys.exit("stopped; the steps done are saved: rerun the same experiments/evidence.py command to go on")


def train_all(args, out, timings):
    scale = SCALES[args.scale]
    w = scale["warmup_steps"]

    def options(run, steps):
        resume = ["--resume"] if checkpoints.saved_steps(run) else []
        return ["--out", str(run), "--steps", str(steps), "--warmup_steps", str(w), "--ckpt_every", "250",
                "--batch_size", str(scale["batch_size"]), "--clip_frames", str(TRAIN_FRAMES), "--seed", str(args.seed),
                "--device", args.device, "--no-sample", "--keep_last", "1"] + resume

    warm = out / "warmup"
    if not finished(warm, w):
        print(f"== shared teacher-forcing warm-up: {w} steps")
        t0 = time.time()
        run_train(options(warm, w))
        timings["warmup"] = time.time() - t0
    for name in args.methods:
        label, extra = METHODS[name]
        run = out / name
        if finished(run, scale["steps"]):
            print(f"== {name}: done already ({run})")
            continue
        if not checkpoints.saved_steps(run):                       # branch: a copy of the warm-up checkpoint
            run.mkdir(parents=True, exist_ok=True)
            shutil.copytree(warm / f"step_{w:07d}", run / f"step_{w:07d}")
        start = int(checkpoints.saved_steps(run)[-1].name.split("_")[1])           # step_0000700 -> 700
        print(f"== {name}: {label}, steps {start}..{scale['steps']}")
        t0 = time.time()
        run_train(options(run, scale["steps"]) + extra)
        timings[name] = time.time() - t0


# ----------------------------------------------------------------------------------------------------------------
# evaluation: roll out held-out clips, score every frame
# ----------------------------------------------------------------------------------------------------------------

def rollouts(run, test, args, device):
    """-> generated frames (N, 32, H, W, 3) uint8 for the first args.clips test clips (EMA weights)."""
    dit, text_encoder, _ = checkpoints.load_models(str(run / "latest"), True, device)
    videos = []
    for i in cli.progress(range(0, args.clips, args.batch), desc=f"rollouts {run.name}", unit="batch", dynamic_ncols=True):
        j = min(i + args.batch, args.clips)
        truth = media.from_uint8(test["frames"][i:j])                                 # (n, F, 3, H, W)
        context, neg = text_encoder.contexts(test["captions"][i:j])
        with torch.no_grad():
            with cli.autocast(device):
                video = rf.generate(dit, context, 4 * TRAIN_FRAMES, neg_context=neg, steps=args.sample_steps,
                                    prefix=truth[:, :PREFIX].to(device), seed=1000 + i)
        videos.append(media.to_uint8(video))
    return np.concatenate(videos)


def score(videos, test):
    """-> {metric: (N, F) per-frame values}."""
    keys = ("centres", "colours", "shapes", "radii")
    F_ = videos.shape[1]
    per_clip = [metrics.evaluate(v, {k: (test[k][i][:F_] if k == "centres" else test[k][i]) for k in keys})
                for i, v in enumerate(videos)]
    return {m: np.stack([r[m] for r in per_clip]) for m in METRICS}


def summarise(per_frame, base=None):
    """{metric: (N, F)} -> {metric: {horizon: (mean, half-width of the 95% CI)}} over clips. With `base` (another
    method's per_frame): the same for the paired difference per clip, this minus base. Every method rolls out the
    same clips with the same seeds, so pairing removes the clip-to-clip spread that the unpaired intervals carry."""
    table = {}
    for m, values in per_frame.items():
        table[m] = {}
        for h, (a, b) in HORIZONS.items():
            per_clip = values[:, a:b].mean(1) - (0 if base is None else base[m][:, a:b].mean(1))
            table[m][h] = (float(per_clip.mean()), float(1.96 * per_clip.std(ddof=1) / np.sqrt(len(per_clip))))
    return table


# ----------------------------------------------------------------------------------------------------------------
# reporting
# ----------------------------------------------------------------------------------------------------------------

def markdown_table(tables, floor=None):
    cols = [(m, h) for m in METRICS for h in HORIZONS]
    head = "| method | " + " | ".join(f"{m.replace('_', ' ')} {h}" for m, h in cols) + " |"
    lines = [head, "|" + "---|" * (len(cols) + 1)]
    rows = ([("ground truth (floor)", floor)] if floor else []) + [(METHODS[n][0], t) for n, t in tables.items()]
    for name, table in rows:
        cells = [f"{table[m][h][0]:.3f} ± {table[m][h][1]:.3f}" for m, h in cols]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(per_frames, floor_frames, path):
    plt = media.pyplot()
    fig, axes = plt.subplots(1, len(METRICS), figsize=(5.3 * len(METRICS), 4.5))
    frames = np.arange(PREFIX, 4 * TRAIN_FRAMES) + 1                  # 1-based frame index, generated frames only
    for ax, m in zip(axes, METRICS):
        for name, pf in [("ground truth", floor_frames)] + list(per_frames.items()):
            v = pf[m][:, PREFIX:]
            mean, ci = v.mean(0), 1.96 * v.std(0, ddof=1) / np.sqrt(len(v))
            style = dict(color="black", ls=":") if name == "ground truth" else {}
            label = name if name == "ground truth" else METHODS[name][0]
            ax.plot(frames, mean, label=label, lw=2 if name in HERO else 1, **style)
            ax.fill_between(frames, mean - ci, mean + ci, alpha=0.15, **({"color": "black"} if style else {}))
        ax.axvline(TRAIN_FRAMES + 0.5, color="grey", ls="--", lw=1)
        ax.text(TRAIN_FRAMES + 0.8, ax.get_ylim()[1], " training length", va="top", fontsize=8, color="grey")
        higher = {"persistence": " (fraction of frames, higher is better)", "shape_fidelity": " (higher is better)"}
        ax.set(xlabel="frame", title=m.replace("_", " ") + higher.get(m, " (lower is better)"))
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def hero_gif(videos, test, path, clips=(0, 1, 2, 3)):
    """Rows: test clips; columns: truth | teacher forcing | Resampling Forcing. A red bar past the training
    length."""
    rows = [[test["frames"][i][:4 * TRAIN_FRAMES]] + [videos[n][i] for n in HERO] for i in clips]
    titles = ["truth", "TF", "RF"]
    media.save_gif(media.grid_frames(rows, titles=titles), path, boundary=TRAIN_FRAMES)


def ship(out):
    """The EMA weights + meta of the hero methods -> checkpoints/toy_<name>/, loadable by sample.py. fp32 (5 MB
    each), so the shipped models make exactly the rollouts scored here."""
    for name in HERO:
        meta, tensors = checkpoints.load_checkpoint(out / name / "latest")
        groups = {k: tensors[k] for k in ("dit_ema", "text_encoder_ema")}
        dest = ROOT / "checkpoints" / f"toy_{name}"
        checkpoints.save_checkpoint(dest, groups, {k: meta[k] for k in ("config", "step", "stage", "vocab", "train")})
        print(f"shipped {dest} ({sum(f.stat().st_size for f in dest.iterdir()) / 2**20:.1f} MiB)")


def main(argv=None):
    args = parse_args(argv)
    if args.clips < 64:
        sys.exit("error: --clips must be at least 64 for the confidence intervals to mean something")
    device = cli.pick_device(args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {"timings_s": {}}
    t_start = time.time()
    if not args.only_eval:
        train_all(args, out, results["timings_s"])

    test = shapes.load_dataset(shapes.TEST_PATH)
    floor_frames = score(test["frames"][:args.clips, :4 * TRAIN_FRAMES], test)
    per_frames, videos = {}, {}
    for name in args.methods:
        t0 = time.time()
        saved, meta = out / name / "rollouts.npz", json.loads((out / name / "latest" / "meta.json").read_text())
        key = np.array([args.clips, args.sample_steps or 0, meta["step"]])   # what the saved rollouts were made with
        if saved.exists() and np.array_equal(np.load(saved)["key"], key):
            videos[name] = np.load(saved)["frames"]
            print(f"{name}: reusing {saved}")
        else:
            videos[name] = rollouts(out / name, test, args, device)
            np.savez_compressed(saved, frames=videos[name], key=key)
            results["timings_s"][f"eval_{name}"] = time.time() - t0
        per_frames[name] = score(videos[name], test)
        print(f"{name}: scored {args.clips} rollouts in {time.time() - t0:.0f}s")
    tables = {n: summarise(pf) for n, pf in per_frames.items()}
    floor = summarise(floor_frames)
    diffs = {n: summarise(pf, per_frames["tf"]) for n, pf in per_frames.items() if n != "tf" and "tf" in per_frames}

    results |= dict(scale=args.scale, train=SCALES[args.scale], clips=args.clips, horizons=HORIZONS,
                    floor=floor, methods={n: dict(label=METHODS[n][0], options=METHODS[n][1], table=tables[n],
                                                   minus_tf=diffs.get(n),
                                                   per_frame_mean={m: pf[m].mean(0).tolist() for m in METRICS})
                                          for n, pf in per_frames.items()},
                    machine=dict(device=torch.cuda.get_device_name() if device.type == "cuda" else
                                 f"CPU, {os.cpu_count()} cores ({platform.processor() or platform.machine()})",
                                 torch=torch.__version__, threads=torch.get_num_threads()))
    results["timings_s"]["this_invocation"] = time.time() - t_start
    results_path.write_text(json.dumps(results, indent=1))
    report = markdown_table(tables, floor)
    if diffs:
        report += "\n\nPaired difference to teacher forcing (method minus TF, same clips and seeds):\n\n"
        report += markdown_table(diffs)
    (out / "results.md").write_text(report + "\n")
    plot(per_frames, floor_frames, out / "metrics.png")
    if all(n in videos for n in HERO):
        hero_gif(videos, test, out / "hero.gif")
    if args.ship:
        ship(out)
    print(report)
    print(f"wrote {out}/results.json, results.md, metrics.png, hero.gif")


if __name__ == "__main__":
    main()
