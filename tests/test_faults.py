"""Fault injection: a save killed mid-write, unwritable output, corrupt data, NaN with --on_nan skip."""

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

import checkpoints
import rf
from conftest import ROOT, TINY_TRAIN_ARGS, exit_message, run_train


@pytest.mark.slow
def test_kill_during_save_keeps_previous_checkpoint(tmp_path):
    run_train(tmp_path, "--steps", "2", "--ckpt_every", "2", "--no-sample")
    # a child resumes and hangs right after writing the first file of the next checkpoint; we SIGKILL it there
    child = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(ROOT)!r})
        import safetensors.torch as st
        real = st.save_file
        def save_then_hang(*args, **kwargs):
            real(*args, **kwargs)
            print("WROTE", flush=True)
            time.sleep(600)
        st.save_file = save_then_hang
        import train
        train.main({TINY_TRAIN_ARGS!r} + ["--out", {str(tmp_path)!r}, "--steps", "4", "--ckpt_every", "2",
                              "--resume", "--no-sample"])
    """)
    proc = subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True, cwd=ROOT)
    try:
        assert any(line.strip() == "WROTE" for line in proc.stdout), "the child never reached the save"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert (tmp_path / "step_0000004.tmp").is_dir()                       # the half-written save
    assert not (tmp_path / "step_0000004").exists()
    assert [p.name for p in checkpoints.saved_steps(tmp_path)] == ["step_0000002"]
    meta, tensors = checkpoints.load_checkpoint(tmp_path / "step_0000002")            # intact and loadable
    assert meta["step"] == 2 and "dit" in tensors
    run_train(tmp_path, "--steps", "4", "--ckpt_every", "2", "--resume", "--no-sample")
    assert [p.name for p in checkpoints.saved_steps(tmp_path)] == ["step_0000002", "step_0000004"]
    assert not (tmp_path / "step_0000004.tmp").exists()


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_finishes_the_step_saves_and_resumes(tmp_path, sig):
    """Ctrl-C (SIGINT) or SIGTERM mid-run: the step finishes and is saved, the log holds exactly the saved steps,
    the exit says how to go on, and --resume continues the log without repeating or skipping a step."""
    argv = [sys.executable, "-u", "train.py", *TINY_TRAIN_ARGS, "--out", str(tmp_path), "--steps", "100000",
            "--ckpt_every", "100000", "--no-sample"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert any(line.startswith("step      3 ") for line in proc.stdout), "the run never reached step 3"
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 1 and "--resume" in err.splitlines()[-1], err[-500:]
    (ckpt,) = checkpoints.saved_steps(tmp_path)                        # saved although no checkpoint was due
    step = checkpoints.load_checkpoint(ckpt)[0]["step"]
    assert 3 <= step < 100000

    def logged():
        return [json.loads(line)["step"] for line in open(tmp_path / "log.jsonl")]
    assert logged() == list(range(1, step + 1))
    run_train(tmp_path, "--steps", str(step + 2), "--resume", "--no-sample")
    assert logged() == list(range(1, step + 3))


@pytest.mark.slow
def test_keep_last_n(tmp_path):
    run_train(tmp_path, "--steps", "5", "--ckpt_every", "1", "--keep_last", "2", "--no-sample")
    assert [p.name for p in checkpoints.saved_steps(tmp_path)] == ["step_0000004", "step_0000005"]


def test_unwritable_output_fails_before_training(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(SystemExit) as e:
        run_train(blocker / "run", "--steps", "1")
    msg = exit_message(e)
    assert msg.startswith("error: cannot write to --out") and "\n" not in msg
    if os.geteuid() != 0:                                  # root ignores permission bits
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        with pytest.raises(SystemExit) as e:
            run_train(ro / "run", "--steps", "1")
        assert "cannot write" in exit_message(e)


def test_out_of_range_options_are_one_line_errors(tmp_path):
    for flag, value, want in (("--steps", "-3", ">= 0"), ("--batch_size", "0", ">= 1"), ("--grad_accum", "0", ">= 1"),
                              ("--lr", "-1", "> 0"), ("--ema", "1", "in [0, 1)"), ("--on_nan", "maybe", "stop or skip"),
                              ("--num_layers", "0", ">= 1")):
        with pytest.raises(SystemExit) as e:
            run_train(tmp_path / "r", flag, value)
        msg = exit_message(e)
        assert msg.startswith("error:") and flag.lstrip("-") in msg and want in msg and "\n" not in msg, msg
    assert not list(tmp_path.glob("r/step_*"))                   # refused before any training


def test_missing_and_corrupt_data_are_one_line_errors(tmp_path):
    with pytest.raises(SystemExit) as e:
        run_train(tmp_path / "r", "--steps", "1", "--data", str(tmp_path / "nope.npz"))
    assert "nope.npz" in exit_message(e) and "python -m tiny_data.shapes" in exit_message(e)
    bad = tmp_path / "bad.npz"
    bad.write_bytes((ROOT / "tiny_data/train.npz").read_bytes()[:5000])    # truncated
    with pytest.raises(SystemExit) as e:
        run_train(tmp_path / "r2", "--steps", "1", "--data", str(bad))
    assert "bad.npz" in exit_message(e) and "\n" not in exit_message(e)


@pytest.mark.slow
def test_nan_skip_mode_skips_only_bad_steps(tmp_path, monkeypatch, capsys):
    real = rf.training_loss
    calls = {"n": 0}

    def nan_on_second_call(*args, **kwargs):
        calls["n"] += 1
        loss, chunk_loss, t = real(*args, **kwargs)
        return (loss * float("nan") if calls["n"] == 2 else loss), chunk_loss, t

    monkeypatch.setattr(rf, "training_loss", nan_on_second_call)
    run_train(tmp_path, "--steps", "3", "--on_nan", "skip", "--no-sample")
    printed = capsys.readouterr()
    assert "skipped the update: non-finite loss nan at step 2" in printed.out + printed.err
    weights = load_file(str(tmp_path / "latest" / "dit.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())


@pytest.mark.slow
def test_clip_folder_reports_and_skips_bad_clips(tmp_path, capsys):
    import imageio.v2 as imageio
    from tiny_data import shapes
    clips = shapes.load_dataset(ROOT / "tiny_data/test.npz")
    folder = tmp_path / "clips"
    folder.mkdir()

    def write(name, frames, caption="red circle"):
        imageio.mimsave(folder / name, list(frames), duration=0.1)
        if caption is not None:
            (folder / name).with_suffix(".txt").write_text(caption)

    write("good1.gif", clips["frames"][0, :8], clips["captions"][0])
    write("good2.gif", clips["frames"][1, :8], clips["captions"][1])
    write("short.gif", clips["frames"][2, :2])
    write("big.gif", clips["frames"][3, :8].repeat(2, 1).repeat(2, 2))
    write("nocap.gif", clips["frames"][4, :8], caption=None)
    write("badword.gif", clips["frames"][5, :8], "purple circle")
    (folder / "corrupt.gif").write_bytes(b"GIF89a" + bytes(range(200)))
    (folder / "corrupt.txt").write_text("red circle")

    run_train(tmp_path / "run", "--steps", "2", "--data", str(folder), "--no-sample")
    out = capsys.readouterr().out
    for name, reason in [("short.gif", "2 frames, fewer than --clip_frames 4"), ("big.gif", f"{2 * shapes.FRAME_SIZE}x{2 * shapes.FRAME_SIZE} frames"),
                         ("nocap.gif", "no caption file nocap.txt"), ("badword.gif", "purple"),
                         ("corrupt.gif", "unreadable")]:
        assert f"warning: skipping bad clip {name}: " in out and reason in out, (name, out)
    assert "good1.gif" not in out and (tmp_path / "run" / "latest").exists()

    with pytest.raises(SystemExit) as e:
        run_train(tmp_path / "run2", "--steps", "1", "--data", str(folder), "--on_bad_clip", "stop")
    assert exit_message(e).startswith("error: bad clip badword.gif")

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SystemExit) as e:
        run_train(tmp_path / "run3", "--steps", "1", "--data", str(empty))
    assert "no video files" in exit_message(e)


@pytest.mark.slow
def test_latest_follows_every_save(tmp_path):
    """An interrupted run still has `latest`: it moves at every checkpoint, not only at the end."""
    run_train(tmp_path, "--steps", "2", "--ckpt_every", "1", "--keep_last", "1", "--no-sample")
    assert (tmp_path / "latest").resolve().name == "step_0000002"
    assert not (tmp_path / "latest.tmp").exists() and checkpoints.load_checkpoint(tmp_path / "latest")[0]["step"] == 2


@pytest.mark.slow
def test_resume_falls_back_past_a_corrupt_newest_checkpoint(tmp_path, capsys):
    """A corrupt newest checkpoint: --resume says so and goes on from the one before; --resume PATH picks one."""
    run_train(tmp_path, "--steps", "4", "--ckpt_every", "2", "--no-sample")
    newest = tmp_path / "step_0000004" / "dit.safetensors"
    newest.write_bytes(newest.read_bytes()[:100])                     # truncated, as a disk full mid-copy leaves it
    run_train(tmp_path, "--steps", "6", "--resume", "--no-sample")
    printed = capsys.readouterr().out
    assert "step_0000004" in printed and "corrupt" in printed and "resumed from" in printed
    assert "step_0000002 at step 2" in printed
    run_train(tmp_path, "--steps", "8", "--resume", str(tmp_path / "step_0000006"), "--no-sample")
    assert "resumed from" in capsys.readouterr().out and (tmp_path / "step_0000008").is_dir()


@pytest.mark.slow
def test_resume_with_steps_at_or_below_the_saved_step_is_one_line(tmp_path):
    run_train(tmp_path, "--steps", "2", "--no-sample")
    for steps in ([], ["--steps", "2"], ["--steps", "1"]):        # a finished run; --steps is the total
        with pytest.raises(SystemExit) as e:
            run_train(tmp_path, "--resume", "--no-sample", *steps)
        msg = str(e.value.code)
        assert msg.startswith("error:") and "at step 2" in msg and "\n" not in msg, msg
        assert "pass --steps" in msg


def test_empty_data_folder_creates_nothing(tmp_path):
    (tmp_path / "clips").mkdir()
    with pytest.raises(SystemExit) as e:
        run_train(tmp_path / "out", "--steps", "1", "--data", str(tmp_path / "clips"))
    msg = str(e.value.code)
    assert "no video files" in msg and "toy preset trains on clips" in msg and "\n" not in msg
    assert not (tmp_path / "out").exists()


def test_loss_plot_skips_an_empty_log(tmp_path):
    import media
    assert media.plot_losses([], tmp_path / "loss.png", 0, (0.0, 0.5, 1.0)) is False
    assert not (tmp_path / "loss.png").exists()
    assert media.plot_losses([dict(step=1, mode="none", bucket_loss=[0.5, None])], tmp_path / "loss.png", 0,
                             (0.0, 0.5, 1.0)) and (tmp_path / "loss.png").stat().st_size > 1000
