"""What a new user meets on the command line: -h, where files go, what meta.json records, and the one-line messages
of train.py and sample.py. Tiny runs made here in tmp_path; the shipped checkpoints/ are only read."""

import argparse
import dataclasses
import json
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

import checkpoints
import cli
import media
import rf
import sample
import train

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--dim", "32", "--ffn_dim", "64", "--num_heads", "2", "--num_layers", "1", "--batch_size", "2",
        "--clip_frames", "4", "--log_every", "1", "--no-sample"]
TOY_TF, SMALL_TF = ROOT / "checkpoints" / "toy_tf", ROOT / "checkpoints" / "small_tf"
QUICK = ["--num", "1", "--frames", "4", "--steps", "1"]          # one generated chunk, one Euler step


def run_train(out, *extra):
    train.main(TINY + ["--data", str(ROOT / "tiny_data/train.npz"), "--out", str(out), *extra])


def one_line_error(excinfo):
    msg = str(excinfo.value.code)
    assert msg.startswith("error: ") and "\n" not in msg, msg
    return msg


def help_text(parse, capsys):
    with pytest.raises(SystemExit):
        parse(["-h"])
    return " ".join(capsys.readouterr().out.split())          # argparse wraps lines: join them back


# ---------------------------------------------------------------------------------------------------------------
# -h: each preset's model defaults, help from a table / the fields' metadata
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("script", ["train", "sample"])
def test_help_gives_model_defaults_per_preset(script, capsys):
    """A plain `python train.py` trains the toy: -h must not present Wan's values as the defaults."""
    text = help_text((train if script == "train" else sample).parse_args, capsys)
    toy, wan = rf.preset("toy"), rf.preset("wan2.1-t2v-1.3b")
    for name in ("dim", "num_layers", "train_shift", "sample_cfg"):
        assert f"toy: {getattr(toy, name)}; wan2.1-t2v-1.3b: {getattr(wan, name)}" in text, name
    for wrong in ("(default: 1536)", "(default: 30)", "(default: 5.0)"):
        assert wrong not in text
    assert "(default: 1e-06)" in text                           # the same in every preset: one default


def test_train_help_gives_wan_defaults_of_training_options(capsys):
    text = help_text(train.parse_args, capsys)
    assert "(default: 3500; Wan presets: 25000)" in text and "(default: 0.002; Wan presets: 5e-05)" in text


def test_every_option_has_help():
    """rf.Config's help is cli.CONFIG_HELP (not rf.py's comments), Train's is each field's metadata."""
    config_fields = {f.name for f in dataclasses.fields(rf.Config)}
    assert set(cli.CONFIG_HELP) == config_fields, set(cli.CONFIG_HELP) ^ config_fields
    assert all(cli.option_help(rf.Config)[name].strip() for name in config_fields)
    train_help = cli.option_help(train.Train)
    for f in dataclasses.fields(train.Train):
        assert train_help.get(f.name, "").strip(), f.name
    assert not hasattr(cli, "field_help")                      # nothing parses source comments any more


# ---------------------------------------------------------------------------------------------------------------
# where files go, and what meta.json records
# ---------------------------------------------------------------------------------------------------------------

def test_sample_writes_under_runs_not_beside_a_shipped_checkpoint(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    sample.main(["--ckpt", str(TOY_TF), *QUICK])
    out = Path("runs/samples/toy_tf")
    assert f"samples go to {out}" in capsys.readouterr().out
    assert (tmp_path / out / "samples.gif").is_file() and (tmp_path / out / "contact_sheet.png").is_file()
    assert not (ROOT / "checkpoints" / "samples").exists()
    # a checkpoint of a train.py run: the run's samples/ folder, as before
    run = tmp_path / "run"
    (run / "step_0000002").mkdir(parents=True)
    (run / "latest").symlink_to("step_0000002")
    for ckpt in (run / "latest", run / "step_0000002"):
        assert sample.output_folder(argparse.Namespace(out=None, compare=None), [str(ckpt)]) == run / "samples"


def test_shipped_meta_has_repository_paths_and_its_own_steps():
    for meta_file in sorted((ROOT / "checkpoints").glob("*/meta.json")):
        meta = json.loads(meta_file.read_text())
        for name in ("data", "out"):
            assert not Path(meta["train"][name]).is_absolute(), (meta_file, meta["train"][name])
        assert (ROOT / meta["train"]["data"]).is_file(), meta_file
        assert meta["step"] <= meta["train"]["steps"], meta_file
    for name in ("small_tf", "small_rf"):
        meta = json.loads((ROOT / "checkpoints" / name / "meta.json").read_text())
        assert meta["train"]["steps"] == meta["step"] == 12000


def test_train_stores_paths_relative_to_the_repository(tmp_path, monkeypatch):
    run_train(tmp_path / "run", "--steps", "1")
    saved = json.loads((tmp_path / "run" / "latest" / "meta.json").read_text())["train"]
    assert saved["data"] == "tiny_data/train.npz"                     # inside the repository: relative
    assert saved["out"] == str(tmp_path / "run")                      # outside: absolute
    assert saved["wan"] == train.Train.wan                            # a hub id is not a path
    inside = checkpoints.portable_paths(dict(out=str(ROOT / "tiny_data"), resume="latest", cache=""))
    assert inside == dict(out="tiny_data", resume="latest", cache="")
    assert checkpoints.local_paths(dict(data="tiny_data/train.npz"))["data"] == str(ROOT.resolve() /
                                                                                   "tiny_data/train.npz")
    # resumed from another folder: the relative data path is read against the repository, not the current folder
    monkeypatch.chdir(tmp_path)
    train.main(TINY + ["--out", str(tmp_path / "run"), "--steps", "2", "--resume"])
    assert json.loads((tmp_path / "run" / "latest" / "meta.json").read_text())["step"] == 2


# ---------------------------------------------------------------------------------------------------------------
# one-line messages
# ---------------------------------------------------------------------------------------------------------------

def test_empty_caption_is_not_blamed_on_prefix_frames(tmp_path, capsys):
    sample.main(["--ckpt", str(TOY_TF), "--caption", "", *QUICK, "--out", str(tmp_path / "s")])
    printed = capsys.readouterr().out
    assert "--caption is empty" in printed and "prefix_frames" not in printed
    assert (tmp_path / "s" / "samples.gif").is_file()
    with pytest.raises(SystemExit) as e:                          # both given: the message names both
        sample.main(["--ckpt", str(TOY_TF), "--caption", "red circle", "--prefix_frames", "2", *QUICK,
                     "--out", str(tmp_path / "s")])
    msg = one_line_error(e)
    assert "--prefix_frames 2" in msg and "--caption" in msg


def test_steps_0_on_the_toy_says_so_and_creates_nothing(tmp_path):
    with pytest.raises(SystemExit) as e:
        run_train(tmp_path / "out", "--steps", "0")
    msg = one_line_error(e)
    assert "--steps 0 trains nothing" in msg and "--steps 3500" in msg and "data is ready" not in msg
    assert not (tmp_path / "out").exists()


def test_a_checkpoint_saved_in_the_warm_up_is_teacher_forcing(tmp_path, capsys):
    run_train(tmp_path, "--steps", "1", "--warmup_steps", "3")       # as if stopped by Ctrl-C in the warm-up
    sample.main(["--ckpt", str(tmp_path / "latest"), "--num", "1", "--frames", "4", "--steps", "1",
                 "--out", str(tmp_path / "s")])
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("checkpoint "))
    assert "teacher forcing: saved during the warm-up" in line and "starts at step 3" in line, line
    assert "teacher forcing: degrade" not in line
    cfg = dict(degrade="autoregressive", resample_shift=0.6, top_k=None, window=None)
    assert sample.trained_with(dict(stage="resampling_forcing", config=cfg)) == "RF s=0.6: degrade autoregressive"
    assert sample.trained_with(dict(stage="teacher_forcing", config={**cfg, "degrade": "none"})) == \
        "teacher forcing: degrade none"


@pytest.mark.parametrize("damage", ["{not json", "", "[1, 2]"])
def test_sample_on_a_damaged_meta_json_is_one_line(tmp_path, damage):
    run_train(tmp_path, "--steps", "2", "--ckpt_every", "1")
    (tmp_path / "step_0000002" / "meta.json").write_text(damage)
    with pytest.raises(SystemExit) as e:
        sample.main(["--ckpt", str(tmp_path / "latest"), *QUICK, "--out", str(tmp_path / "s")])
    msg = one_line_error(e)
    assert "corrupt" in msg and "meta.json" in msg and "step_0000001" in msg, msg   # names an earlier one


def test_resume_with_too_few_steps_says_steps_is_where_to_stop(tmp_path):
    run_train(tmp_path, "--steps", "2", "--ckpt_every", "50")
    with pytest.raises(SystemExit) as e:
        run_train(tmp_path, "--steps", "1", "--resume")
    msg = one_line_error(e)
    assert "is at step 2" in msg and "the step to stop at" in msg and "greater than 2" in msg, msg
    assert "--steps 52" in msg                                       # an example: one more checkpoint interval


def test_compare_tells_same_method_checkpoints_apart(tmp_path, capsys):
    sample.main(["--ckpt", str(TOY_TF), "--compare", str(SMALL_TF), *QUICK, "--out", str(tmp_path / "c"),
                 "--save_frames"])
    assert "columns: truth | teacher forcing (4 layers) | teacher forcing (2 layers)" in capsys.readouterr().out
    assert len(np.load(tmp_path / "c" / "frames.npz").files) == 3
    # same size: the folder names; the same checkpoint twice: one name
    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(TOY_TF, a, ignore=shutil.ignore_patterns("*.safetensors"))
    shutil.copytree(TOY_TF, b, ignore=shutil.ignore_patterns("*.safetensors"))
    meta = json.loads((TOY_TF / "meta.json").read_text())
    model = (SimpleNamespace(cfg=rf.Config(**meta["config"])), None, meta)
    assert sample.column_names([str(a), str(b)], [model, model]) == ["teacher forcing (a)", "teacher forcing (b)"]
    assert sample.column_names([str(a), str(a)], [model, model]) == ["teacher forcing"] * 2


# ---------------------------------------------------------------------------------------------------------------
# contact sheets: frame numbers and the training length
# ---------------------------------------------------------------------------------------------------------------

def test_contact_sheet_numbers_frames_and_marks_the_training_length(tmp_path):
    videos = [np.full((12, 16, 16, 3), 128, np.uint8) for _ in range(2)]
    media.save_contact_sheet(videos, ["a", "b"], tmp_path / "sheet.png", boundary=8)
    media.save_contact_sheet(videos, ["a", "b"], tmp_path / "plain.png")
    sheet, plain = (np.asarray(Image.open(tmp_path / f).convert("RGB")) for f in ("sheet.png", "plain.png"))
    label_w, w = 180, 16 * 3

    def red(img, y, x):
        r, g, b = img[y, x]
        return r > 200 and g < 80 and b < 80
    bar = [any(red(sheet, y, label_w + j * w + w // 2) for y in range(16)) for j in range(6)]   # frames 1, 3, .., 11
    assert bar == [False] * 4 + [True] * 2                     # frames 9 and 11 are past the 8 trained ones
    assert not any(red(plain, y, x) for y in range(plain.shape[0]) for x in range(0, plain.shape[1], 3))
    assert sheet.shape[0] > plain.shape[0]                     # the line that explains the red bar
    numbers = sheet[:12, label_w:]                             # the header holds text above the frames
    assert (numbers < 100).any()
    assert (sheet[16:16 + 48, label_w:label_w + 48] == 128).all()      # the frames themselves are unchanged


# ---------------------------------------------------------------------------------------------------------------
# CI and words
# ---------------------------------------------------------------------------------------------------------------

def test_ci_installs_pytorchs_cpu_wheel():
    text = (ROOT / ".ci" / "run").read_text()
    assert "pip install -q torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu" in text


def test_code_cites_no_issue_numbers_or_missing_notes():
    files = [ROOT / f for f in ("train.py", "sample.py", "cli.py", "checkpoints.py", "media.py", "clips.py", "wan.py")]
    files += sorted((ROOT / "benchmarks").glob("*.py"))
    for f in files:
        text = f.read_text()
        assert not re.search(r"\bissues? \d+", text, re.I), f
        assert not re.search(r"\blease\b", text, re.I), f
        assert "shared/notes" not in text, f
    wan_text = (ROOT / "wan.py").read_text()
    assert not re.search(r"^# \d+\.", wan_text, re.M) and wan_text.count("a pure rename") == 1
