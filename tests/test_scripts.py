"""train.py and sample.py end to end, at a tiny size: what a user runs and what a user sees."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import rf
import sample
import train
from conftest import ROOT, exit_message, run_train
from tiny_data.caption_encoder import CaptionEncoder


@pytest.mark.slow
def test_train_then_sample_end_to_end(tmp_path):
    run_train(tmp_path, "--steps", "4", "--warmup_steps", "2", "--ckpt_every", "2")
    ckpts = sorted(p.name for p in tmp_path.glob("step_*"))
    assert ckpts == ["step_0000002", "step_0000004"]
    latest = tmp_path / "latest"
    assert latest.resolve().name == "step_0000004"
    meta = json.loads((latest / "meta.json").read_text())
    assert meta["step"] == 4 and meta["stage"] == "resampling_forcing" and meta["config"]["dim"] == 32
    for name in ("dit", "dit_ema", "text_encoder", "text_encoder_ema", "train_state"):
        assert (latest / f"{name}.safetensors").is_file()
    assert "patch_embedding.weight" in load_file(str(latest / "dit.safetensors"))   # Wan key names
    assert (tmp_path / "loss.png").stat().st_size > 1000
    rows = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    assert [r["mode"] for r in rows] == ["none", "none", "autoregressive", "autoregressive"]
    for f in ("samples.gif", "contact_sheet.png"):
        assert (tmp_path / "samples" / f).stat().st_size > 1000

    # --compare: the same checkpoint twice, same clips and seed -> two identical generated columns next to the truth
    sample.main(["--ckpt", str(latest), "--compare", str(tmp_path / "step_0000004"), "--frames", "8", "--num", "2",
                 "--out", str(tmp_path / "cmp")])
    gif = Image.open(tmp_path / "cmp" / "samples.gif")
    gif.seek(gif.n_frames - 1)
    grid = np.asarray(gif.convert("RGB"))[14:]                       # below the title strip
    side = 4 * 16                                                     # 16x16 frames, upscaled 4x, 2 px gaps
    truth, a, b = (grid[:side, c * (side + 2):c * (side + 2) + side] for c in range(3))
    assert grid.shape[1] == 3 * side + 2 * 2
    assert (a == b).all() and (a != truth).any()


@pytest.mark.slow
def test_sample_from_caption_and_errors(tmp_path, capsys):
    run_train(tmp_path, "--steps", "1", "--no-sample")
    out = tmp_path / "s"
    sample.main(["--ckpt", str(tmp_path / "latest"), "--caption", "red circle", "--num", "2", "--frames", "6",
                 "--steps", "2", "--out", str(out), "--seed", "5"])
    printed = capsys.readouterr().out
    assert "EMA weights" in printed and "seed 5" in printed
    assert (out / "samples.gif").is_file() and (out / "contact_sheet.png").is_file()

    cases = [(["--ckpt", str(tmp_path / "nope")], "no checkpoint at"),
             (["--ckpt", str(tmp_path)], f"is a run folder, not a checkpoint: pass its last checkpoint, {tmp_path}"),
             (["--caption", "purple circle"], "purple"),
             (["--caption", "red circle", "--frames", "5"], "not a multiple of the chunk"),
             (["--frames", "2000", "--caption", "red circle"], "RoPE table"),
             (["--steps", "-1"], "--steps -1 must be >= 1"), (["--num", "0"], "--num 0 must be >= 1")]
    for argv, expected in cases:
        argv = ["--ckpt", str(tmp_path / "latest"), "--out", str(out)] + argv if argv[0] != "--ckpt" else argv
        with pytest.raises(SystemExit) as e:
            sample.main(argv)
        assert expected in exit_message(e), (argv, exit_message(e))


@pytest.fixture
def threads(request):
    """Run the test at request.param torch threads (conftest sets 1 for speed), then back to 1."""
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(1)


@pytest.mark.slow
@pytest.mark.parametrize("threads", [1, 2], indirect=True)
def test_resume_is_exact(tmp_path, threads):
    """An interrupted run resumed with --resume ends with the same weights as the uninterrupted run (bitwise), at one
    thread and at the two a laptop run uses."""
    a, b = tmp_path / "a", tmp_path / "b"
    run_train(a, "--steps", "6", "--warmup_steps", "2", "--ckpt_every", "6", "--no-sample")
    run_train(b, "--steps", "3", "--warmup_steps", "2", "--ckpt_every", "3", "--no-sample")
    run_train(b, "--steps", "6", "--resume", "--no-sample")
    for name in ("dit", "dit_ema", "text_encoder", "train_state"):
        wa = load_file(str(a / "step_0000006" / f"{name}.safetensors"))
        wb = load_file(str(b / "step_0000006" / f"{name}.safetensors"))
        assert wa.keys() == wb.keys()
        for k in wa:
            assert torch.equal(wa[k], wb[k]), (name, k)
    la = [json.loads(line) for line in open(a / "log.jsonl")]
    lb = [json.loads(line) for line in open(b / "log.jsonl")]
    assert la == lb


@pytest.mark.slow
def test_resumed_optimizer_state_is_aligned(tmp_path):
    """The optimizer state read back from a checkpoint sits in 64-byte aligned memory, like the state of a run that
    never stopped (safetensors puts tensors at any multiple of 4 bytes; vectorised kernels may then round an
    unaligned head differently)."""
    import checkpoints
    run_train(tmp_path, "--steps", "1", "--no-sample")
    tensors = checkpoints.load_checkpoint(tmp_path / "latest")[1]["train_state"]
    assert any(v.data_ptr() % 64 for v in tensors.values())        # as read: some are not aligned
    model = rf.DiT(rf.preset("toy", dim=32, ffn_dim=64, num_heads=2, num_layers=1))
    encoder = CaptionEncoder(len(json.loads((tmp_path / "latest" / "meta.json").read_text())["vocab"]), 64, 8)
    opt = torch.optim.AdamW([*model.parameters(), *encoder.parameters()])
    meta = json.loads((tmp_path / "latest" / "meta.json").read_text())
    checkpoints.load_optimizer(opt, {k: v for k, v in tensors.items() if k != "rng"}, meta["param_groups"])
    assert all(v.data_ptr() % 64 == 0 for st in opt.state.values() for v in st.values() if v.numel() > 1)


@pytest.mark.slow
def test_train_refuses_to_clobber_or_guess(tmp_path):
    with pytest.raises(SystemExit) as e:
        run_train(tmp_path / "empty", "--resume")
    assert "no checkpoint" in exit_message(e)
    run_train(tmp_path / "r", "--steps", "1", "--no-sample")
    with pytest.raises(SystemExit) as e:
        run_train(tmp_path / "r", "--steps", "2")
    assert "already holds a run" in exit_message(e)
    with pytest.raises(SystemExit) as e:
        run_train(tmp_path / "r", "--steps", "2", "--resume", "--dim", "64")
    assert "dim" in exit_message(e)


@pytest.mark.slow
def test_nan_loss_stops_and_keeps_last_checkpoint(tmp_path, monkeypatch):
    run_train(tmp_path, "--steps", "2", "--ckpt_every", "2", "--no-sample")
    before = load_file(str(tmp_path / "step_0000002" / "dit.safetensors"))
    real = rf.training_loss

    def poisoned(*args, **kwargs):
        loss, chunk_loss, t = real(*args, **kwargs)
        return loss * float("nan"), chunk_loss, t

    monkeypatch.setattr(rf, "training_loss", poisoned)
    with pytest.raises(SystemExit) as e:
        run_train(tmp_path, "--steps", "4", "--resume", "--no-sample")
    msg = exit_message(e)
    assert "non-finite loss" in msg and "step 3" in msg and "step_0000002" in msg
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_0000002"]
    after = load_file(str(tmp_path / "step_0000002" / "dit.safetensors"))
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_a_part_not_written_yet_stops_train_in_one_line_and_leaves_no_out(tmp_path, monkeypatch):
    """In a student copy rf.py raises NotImplementedError("part 6 (loss): write this, ...") where a part is missing:
    train.py says which part to write, in one line, and removes the --out folders it made (nothing was saved)."""
    def stub(*args, **kwargs):
        raise NotImplementedError("part 6 (loss): write this, about 8 lines; see kit/ASSIGNMENT.md")

    monkeypatch.setattr(rf, "training_loss", stub)
    out = tmp_path / "runs" / "new"
    with pytest.raises(SystemExit) as e:
        run_train(out, "--steps", "2")
    msg = exit_message(e)
    assert "part 6 (loss)" in msg and "kit.grade --part loss" in msg and "\n" not in msg
    assert not out.exists() and not (tmp_path / "runs").exists()


def test_dry_run_on_the_toy_prints_the_model_and_writes_nothing(tmp_path, capsys):
    train.main(["--dry_run", "--out", str(tmp_path / "r")])
    text = capsys.readouterr().out
    assert "1.22M parameters" in text and "224 tokens" in text and not (tmp_path / "r").exists()


@pytest.mark.slow
def test_train_sent_to_a_file_writes_plain_lines_not_a_progress_bar(tmp_path):
    from conftest import TINY_TRAIN_ARGS
    run = subprocess.run([sys.executable, "train.py", *TINY_TRAIN_ARGS, "--out", str(tmp_path / "r"), "--steps", "4",
                          "--log_every", "2", "--no-sample"], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "\r" not in run.stdout + run.stderr and "it/s" not in run.stderr
    assert run.stdout.count("step      2 |") == 1 and run.stdout.count("step      4 |") == 1


def test_help_lists_model_options(capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["-h"])
    text = capsys.readouterr().out
    for option in ("--warmup_steps", "--degrade", "--frames_per_chunk", "--resample_shift", "--resume"):
        assert option in text


@pytest.mark.slow
def test_resume_can_switch_routing_on_for_a_last_stage(tmp_path):
    """The paper's last stage fine-tunes the dense model with top-k routing: --resume accepts routing options."""
    run_train(tmp_path, "--steps", "2", "--warmup_steps", "1", "--no-sample")
    run_train(tmp_path, "--steps", "3", "--resume", "--top_k", "2", "--sink", "--clip_frames", "6", "--no-sample")
    meta = json.loads((tmp_path / "latest" / "meta.json").read_text())
    assert meta["step"] == 3 and meta["config"]["top_k"] == 2 and meta["config"]["sink"] is True
    assert meta["train"]["clip_frames"] == 6 and meta["config"]["dim"] == 32
    assert meta["param_groups"][0]["lr"] == meta["train"]["lr"] == train.Train.lr
    run_train(tmp_path, "--steps", "4", "--resume", "--lr", "1e-4", "--no-sample")     # a new stage, a new lr
    meta = json.loads((tmp_path / "latest" / "meta.json").read_text())
    assert meta["param_groups"][0]["lr"] == meta["train"]["lr"] == 1e-4
    with pytest.raises(SystemExit) as e:
        run_train(tmp_path, "--steps", "5", "--resume", "--window", "2", "--no-sample")
    assert "top_k" in exit_message(e) and "window" in exit_message(e)


@pytest.mark.slow
def test_dry_run_prints_wan_memory_without_allocating(capsys):
    train.main(["--preset", "wan2.1-t2v-1.3b", "--dry_run"])
    text = capsys.readouterr().out
    assert "1,418,996,800 parameters" in text and "total, checkpointing" in text and "KV cache" in text


@pytest.mark.slow
def test_compare_labels_red_bar_and_frames(tmp_path, capsys):
    """--compare names each column by its method (from the checkpoint's meta), the GIF's red bar starts at the
    training length (not at the prefix), and --save_frames writes every rollout as uint8 arrays."""
    tf, rf_ = ROOT / "checkpoints" / "toy_tf", ROOT / "checkpoints" / "toy_ar_s0.6"
    out = tmp_path / "cmp"
    sample.main(["--ckpt", str(tf), "--compare", str(rf_), "--frames", "12", "--num", "2", "--steps", "1",
                 "--out", str(out), "--save_frames"])
    assert "columns: truth | teacher forcing | RF s=0.6" in capsys.readouterr().out
    arrays = np.load(out / "frames.npz")
    assert sorted(arrays.files) == sorted(["truth", "teacher forcing", "RF s=0.6"])
    for name in arrays.files:
        assert arrays[name].dtype == np.uint8 and arrays[name].shape == (2, 12, 16, 16, 3), name
    assert np.array_equal(arrays["truth"][:, :2], arrays["RF s=0.6"][:, :2])      # the prefix is the truth
    train_frames = json.loads((tf / "meta.json").read_text())["train"]["clip_frames"]
    gif = Image.open(out / "samples.gif")
    bar = []
    for i in range(gif.n_frames):
        gif.seek(i)
        r, g, b = gif.convert("RGB").getpixel((gif.width // 2, 1))
        bar.append(r > 200 and g < 80 and b < 80)
    assert bar == [i >= train_frames for i in range(12)]
    # routing given at sampling time (a sliding window of the trained history) is named in the columns too
    sample.main(["--ckpt", str(tf), "--compare", str(rf_), "--frames", "12", "--num", "1", "--steps", "1",
                 "--out", str(out), "--window", "3"])
    assert "columns: truth | teacher forcing window 3 | RF s=0.6 window 3" in capsys.readouterr().out


def test_method_labels():
    cfg = dict(degrade="autoregressive", resample_shift=0.6, top_k=None, window=None)
    assert sample.method_label(dict(stage="teacher_forcing", config=cfg)) == "teacher forcing"
    assert sample.method_label(dict(stage="resampling_forcing", config={**cfg, "degrade": "none"})) == "teacher forcing"
    assert sample.method_label(dict(stage="resampling_forcing", config=cfg)) == "RF s=0.6"
    assert sample.method_label(dict(stage="resampling_forcing", config={**cfg, "top_k": 2})) == "RF s=0.6 top-2"
    assert sample.method_label(dict(stage="resampling_forcing", config={**cfg, "degrade": "noise"})) == \
        "noise augmentation"
    assert sample.method_label(dict(stage="resampling_forcing", config={**cfg, "degrade": "parallel",
                                                                        "resample_shift": 3.0})) == \
        "parallel resampling s=3"


@pytest.mark.slow
def test_only_a_resampling_run_calls_itself_resampling_forcing(tmp_path):
    run_train(tmp_path / "w", "--steps", "2", "--warmup_steps", "2", "--no-sample")       # all warm-up
    assert json.loads((tmp_path / "w" / "latest" / "meta.json").read_text())["stage"] == "teacher_forcing"
    run_train(tmp_path / "n", "--steps", "3", "--warmup_steps", "1", "--degrade", "none", "--no-sample")
    assert json.loads((tmp_path / "n" / "latest" / "meta.json").read_text())["stage"] == "teacher_forcing"
    run_train(tmp_path / "a", "--steps", "2", "--warmup_steps", "1", "--degrade", "noise", "--no-sample")
    assert json.loads((tmp_path / "a" / "latest" / "meta.json").read_text())["stage"] == "noise_augmentation"


@pytest.mark.slow
def test_sample_says_when_it_replaces_samples(tmp_path, capsys):
    argv = ["--ckpt", str(ROOT / "checkpoints" / "toy_tf"), "--num", "1", "--frames", "4", "--steps", "1",
            "--out", str(tmp_path / "s")]
    sample.main(argv)
    assert "replacing" not in capsys.readouterr().out
    sample.main(argv)
    assert f"note: replacing the samples in {tmp_path / 's'}" in capsys.readouterr().out
