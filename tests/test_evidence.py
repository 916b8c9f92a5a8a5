"""The evidence experiment (experiments/evidence.py) end to end at smoke scale, and the claim its design rests on:
a method branched from the shared warm-up checkpoint is exactly the run train.py would make from scratch."""

import json
import sys

import numpy as np
import pytest
import torch

import checkpoints
import train
from conftest import ROOT

sys.path.insert(0, str(ROOT / "experiments"))
import evidence  # noqa: E402

SMOKE = ["--scale", "smoke", "--clips", "64", "--sample_steps", "1"]


@pytest.mark.slow
def test_evidence_pipeline_and_branch_equals_fresh_run(tmp_path, capsys):
    out = tmp_path / "ev"
    evidence.main(SMOKE + ["--out", str(out), "--methods", "tf", "ar_s0.6"])
    results = json.loads((out / "results.json").read_text())
    assert set(results["methods"]) == {"tf", "ar_s0.6"}
    for name, r in results["methods"].items():
        for metric in evidence.METRICS:
            for horizon in evidence.HORIZONS:
                mean, ci = r["table"][metric][horizon]
                assert np.isfinite(mean) and ci >= 0
        assert len(r["per_frame_mean"]["motion_error"]) == 4 * evidence.TRAIN_FRAMES
    assert results["floor"]["colour_error"]["4x"][0] == 0.0          # ground truth is all palette colours
    assert results["floor"]["persistence"]["4x"][0] == 1.0
    for f in ("results.md", "metrics.png", "hero.gif"):
        assert (out / f).stat().st_size > 0
    assert np.load(out / "tf" / "rollouts.npz")["frames"].shape == (64, 32, 16, 16, 3)

    # the branch (warm-up checkpoint copied, then --resume with the method's options) == a fresh run of that method
    scale = evidence.SCALES["smoke"]
    fresh = tmp_path / "fresh"
    train.main(["--out", str(fresh), "--steps", str(scale["steps"]), "--warmup_steps", str(scale["warmup_steps"]),
                "--batch_size", str(scale["batch_size"]), "--clip_frames", str(evidence.TRAIN_FRAMES),
                "--no-sample", "--degrade", "autoregressive", "--resample_shift", "0.6"])
    _, a = checkpoints.load_checkpoint(checkpoints.saved_steps(fresh)[-1])
    _, b = checkpoints.load_checkpoint(checkpoints.saved_steps(out / "ar_s0.6")[-1])
    for group in ("dit", "dit_ema", "text_encoder"):
        for key in a[group]:
            assert (a[group][key] == b[group][key]).all(), f"{group}.{key} differs"

    # a second invocation keeps the finished runs and only re-scores
    capsys.readouterr()
    evidence.main(SMOKE + ["--out", str(out), "--methods", "tf"])
    assert "tf: done already" in capsys.readouterr().out


def test_evidence_refuses_too_few_clips(tmp_path):
    with pytest.raises(SystemExit) as e:
        evidence.main(["--clips", "10", "--out", str(tmp_path)])
    assert "at least 64" in str(e.value)


@pytest.mark.slow
def test_shipped_checkpoints_sample_side_by_side(tmp_path, capsys):
    """The README's command for the shipped toy models (shortened): both load with today's rf.py and roll out."""
    import sample
    tf, rf_ = ROOT / "checkpoints" / "toy_tf", ROOT / "checkpoints" / "toy_ar_s0.6"
    sample.main(["--ckpt", str(tf), "--compare", str(rf_), "--frames", "4", "--num", "1", "--steps", "2",
                 "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    assert "degrade none" in printed and "degrade autoregressive" in printed
    assert "columns: truth | teacher forcing | RF s=0.6" in printed      # columns named by method
    assert (tmp_path / "samples.gif").stat().st_size > 0


@pytest.mark.slow
def test_tune_toy_scores_two_checkpoints_paired(tmp_path, capsys):
    """experiments/tune_toy.py end to end on the shipped pair, few clips and one sampler step: every window is
    scored, the second run is compared with the first, and the numbers land in the JSON."""
    import tune_toy
    tf, rf_ = ROOT / "checkpoints" / "toy_tf", ROOT / "checkpoints" / "toy_ar_s0.6"
    tune_toy.main([str(tf), str(rf_), "--clips", "3", "--steps", "1", "--json", str(tmp_path / "r.json"),
                   "--png", str(tmp_path / "r.png"), "--png_clips", "2", "--plot", str(tmp_path / "f.png")])
    printed = capsys.readouterr().out
    assert "(paired)" in printed and (tmp_path / "r.png").stat().st_size > 1000
    assert (tmp_path / "f.png").stat().st_size > 1000
    results = json.loads((tmp_path / "r.json").read_text())
    for key in ("one-step", "chunk 1", "1x", "2x", "4x", "true@L", "true@2L"):
        mean, ci = results[0][key]
        assert 0 <= mean <= 1 and ci >= 0, key
    assert results[2]["paired"].endswith(str(tf)) and "1x" in results[2]


@pytest.mark.slow
def test_recover_scores_each_corruption_for_each_model(tmp_path, capsys):
    """experiments/recover.py end to end on the shipped small pair, 2 clips: a row per corruption with both models
    and their paired difference; with no corruption the prefix is the truth, and the plot and sheet are written."""
    import recover
    recover.main(["--clips", "2", "--corruptions", "none", "blank", "--png", str(tmp_path / "p.png"),
                  "--sheet", str(tmp_path / "s.png"), "--json", str(tmp_path / "r.json")])
    rows = json.loads((tmp_path / "r.json").read_text())
    assert [r["corruption"] for r in rows] == ["none", "blank"]
    for r in rows:
        assert set(r) == {"corruption", "small_tf", "small_rf", "small_rf - small_tf"}
        assert all(0 <= r[k][0] <= 1 for k in ("small_tf", "small_rf"))
    assert (tmp_path / "p.png").stat().st_size > 1000 and (tmp_path / "s.png").stat().st_size > 1000
    prefix = recover.corrupt(torch.zeros(1, 6, 3, 4, 4), "blank", 1, 2)
    assert (prefix[:, 2:4] == -1).all() and (prefix[:, :2] == 0).all() and (prefix[:, 4:] == 0).all()


@pytest.mark.slow
def test_turning_toy_walks_whole_pixels_and_scores_the_shape_anywhere(tmp_path, capsys):
    """experiments/turning_toy.py: every step is one whole pixel per axis (or an exact bounce), turns happen, the
    position-free score is 1 on the truth and on the truth shifted, lower for a blur, 0 with the object gone; and the
    evaluation runs end to end on a checkpoint."""
    import turning_toy
    def turns(data):             # a reversal of a step away from the walls (a bounce reverses at a wall)
        pixel = data["centres"][:, :, 0] - 0.5                                      # (N, F, 2)
        steps = np.diff(pixel, axis=1)
        assert np.all(np.abs(steps) == 1)                                           # one whole pixel per axis
        r = data["radii"][:, 0, None, None]
        inner = (pixel[:, 1:-1] > r) & (pixel[:, 1:-1] < 15 - r)
        return ((steps[:, 1:] != steps[:, :-1]) & inner).mean()

    data = turning_toy.make_dataset(seed=3, num_clips=16, num_frames=24)
    assert turns(turning_toy.make_dataset(seed=3, num_clips=16, num_frames=24, turn=0.0)) == 0
    assert 0.1 < turns(data) < 0.2                                                  # about TURN = 0.15
    assert np.array_equal(turning_toy.make_dataset(3, 16, 24)["frames"], data["frames"])   # deterministic
    frames, colour, shape, radius = data["frames"][0], data["colours"][0, 0], data["shapes"][0, 0], data["radii"][0, 0]
    assert np.allclose(turning_toy.free_fidelity(frames, colour, shape, radius), 1.0)
    shifted = np.zeros_like(frames)                                                 # one pixel to the right
    shifted[:, :, 1:] = frames[:, :, :-1]
    room = ~frames[:, :, -1].any(axis=(1, 2))                                       # nothing lost at the edge
    assert room.any() and np.allclose(turning_toy.free_fidelity(shifted, colour, shape, radius)[room], 1.0)
    box = np.pad(frames.astype(float), ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
    blurred = sum(box[:, dy:dy + 16, dx:dx + 16] for dy in range(3) for dx in range(3)) / 9     # 3x3 box blur
    assert turning_toy.free_fidelity(blurred.astype(np.uint8), colour, shape, radius).mean() < 0.95
    assert np.all(turning_toy.free_fidelity(np.zeros_like(frames), colour, shape, radius) == 0)
    turning_toy.shapes.save_dataset(tmp_path / "test.npz", turning_toy.make_dataset(1, 4, 16))
    turning_toy.main(["eval", str(ROOT / "checkpoints" / "toy_tf"), str(ROOT / "checkpoints" / "toy_ar_s0.6"),
                      "--test", str(tmp_path / "test.npz"), "--clips", "2", "--frames", "16", "--window", "3"])
    printed = capsys.readouterr().out
    assert "(paired)" in printed and "2x" in printed and "4x" not in printed
