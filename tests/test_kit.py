"""The course kit: the parts are marked in the live rf.py, the grader passes the reference and rejects wrong
answers, and the student copy takes the chosen parts out and holds no answer. (The whole list of wrong answers is
planted by `python -m kit.plant`, a step of CI of its own.)"""

import json
import subprocess
import sys

import pytest

from conftest import ROOT
from kit import parts
from kit.grade import grade, needed
from kit.plant import plant
from kit.wrong_answers import WRONG


def test_every_part_is_marked_and_the_markers_pair_up():
    found = {p for f in parts.MARKED_FILES for p, _, _ in parts.regions((ROOT / f).read_text())}
    assert found == set(parts.PARTS)
    with pytest.raises(ValueError, match="never closed"):
        parts.regions("x = 1\n    # [part: mask]\n    y = 2\n")
    with pytest.raises(ValueError, match="unknown parts"):
        parts.regions("# [part: nope]\n1\n# [end: nope]\n")


def test_stub_keeps_the_markers_and_takes_out_only_the_chosen_part():
    text = (ROOT / "rf.py").read_text()
    new, taken = parts.stub(text, ["mask"])
    assert new.count("# [part: mask]") == text.count("# [part: mask]")
    assert "return (k_stream == HISTORY) & (k_chunk < q_chunk)" in "\n".join(taken)
    assert "return (k_stream == HISTORY) & (k_chunk < q_chunk)" not in new
    assert new.count("raise NotImplementedError(\"part 1 (mask)") == 2
    assert "def resample_autoregressive" in new and parts.stub(text, [])[0] == text


def test_the_reference_passes_every_part():
    results = grade(list(parts.PARTS))
    assert {n: r["status"] for n, r in results.items()} == {n: "passed" for n in parts.PARTS}


def test_prerequisites_come_first():
    assert needed(["resample"]) == ["mask", "frame_t", "sampler", "resample"]


@pytest.mark.parametrize("what", ["a leaking mask", "t_s drawn without its shift", "the target built from"])
def test_a_planted_wrong_answer_fails_its_part(what, tmp_path, monkeypatch):
    wrong = next(w for w in WRONG if w.what.startswith(what))
    for name in ("rf.py", "fast_attn.py", "checks.py"):
        (tmp_path / name).write_text((ROOT / name).read_text())
    (tmp_path / wrong.file).write_text(plant((tmp_path / wrong.file).read_text(), wrong))
    code = (f"import sys; sys.path[:0] = [{str(tmp_path)!r}, {str(ROOT)!r}]; import json, kit.grade as g; "
            f"print(json.dumps(g.grade([{wrong.part!r}])))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    result = json.loads(out.stdout.strip().splitlines()[-1])[wrong.part]
    assert result["status"] == "failed", (wrong.what, result)


@pytest.mark.slow
def test_student_copy_takes_the_parts_out_and_checks_itself(tmp_path):
    out = tmp_path / "student"
    run = subprocess.run([sys.executable, "-m", "kit.make_student", "--out", str(out), "--parts", "mask,loss"],
                         cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "checked" in run.stdout
    for gone in ("kit/README.md", "kit/wrong_answers.py", "tests/test_mask.py", "tests/test_kit.py"):
        assert not (out / gone).exists(), gone
    assert (out / "kit/ASSIGNMENT.md").exists() and (out / "tests/test_routing.py").exists()
    assert "NotImplementedError(\"part 6 (loss)" in (out / "rf.py").read_text()


def test_student_copy_refuses_a_bad_request(tmp_path):
    for args, says in [(["--parts", "mask,nope"], "unknown part"), (["--out", str(ROOT / "x")], "inside the project")]:
        argv = ["--out", str(tmp_path / "s"), *args] if args[0] == "--parts" else args
        run = subprocess.run([sys.executable, "-m", "kit.make_student", *argv], cwd=ROOT, capture_output=True,
                             text=True)
        assert run.returncode != 0 and says in run.stderr and "Traceback" not in run.stderr
