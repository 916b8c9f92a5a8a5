"""The course kit: the parts are marked in the live rf.py, the grader passes the reference and rejects wrong
answers, and the student copy takes the chosen parts out and holds no answer. (The whole list of wrong answers is
planted by `python -m kit.plant`, a step of CI of its own.)"""

import json
import re
import subprocess
import sys

import pytest

from conftest import ROOT
from kit import parts
from kit import make_student
from kit.grade import grade, needed
from kit.grade import main as grade_main
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


@pytest.mark.parametrize("what", ["a leaking mask", "t_s drawn without its shift", "the target built from",
                                  "the history never degraded", "the noise from torch's global generator (torch.rand",
                                  "the noise drawn once and reused for every chunk", "merge_lse without the max",
                                  "the same noise for every chunk"])
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


def test_parts_are_named_as_mask_loss_or_mask_space_loss(tmp_path, capsys):
    assert parts.parse_parts(["mask,loss"]) == parts.parse_parts(["loss", "mask"]) == ["mask", "loss"]
    with pytest.raises(SystemExit, match="unknown part 'nope'"):
        parts.parse_parts(["mask,nope"])
    for given in (["mask,frame_t"], ["mask", "frame_t"]):
        assert grade_main(["--part", *given, "--json", str(tmp_path / "g.json")]) == 0
        assert list(json.loads((tmp_path / "g.json").read_text())) == ["mask", "frame_t"]
    assert "total                     20/20" in capsys.readouterr().out


def test_the_paragraphs_a_copy_leaves_out_are_where_make_student_looks():
    """docs that answer a question are trimmed in a copy: each paragraph must still open as ANSWERS says (else the
    copy would hand the answer out; make_student refuses to make it, and this test says so first)."""
    for f, opening, question in make_student.ANSWERS:
        text, found = make_student.trim((ROOT / f).read_text(), opening, "@@gone@@")
        assert found, f"{f}: no paragraph opens with {opening!r} (question {question}): update ANSWERS"
        assert text.count("@@gone@@") == 1 and len(text) < len((ROOT / f).read_text())


LINK = re.compile(r"\]\(([^)\s]+)\)")


def links_that_resolve_nowhere(root):
    dead = []
    for md in root.rglob("*.md"):
        for target in LINK.findall(md.read_text()):
            path = target.split("#")[0]
            if path and "://" not in path and not path.startswith("mailto:") and not (md.parent / path).exists():
                dead.append(f"{md.relative_to(root)}: {target}")
    return dead


@pytest.mark.slow
def test_workshop_copy_knows_its_parts_and_stands_alone(tmp_path):
    out = tmp_path / "workshop"
    run = subprocess.run([sys.executable, "-m", "kit.make_student", "--out", str(out), "--parts", "mask,resample,loss"],
                         cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "checked" in run.stdout
    for gone in ("kit/README.md", "kit/wrong_answers.py", "kit/plant.py", "tests/test_mask.py", "tests/test_kit.py",
                 "tests/test_training.py"):
        assert not (out / gone).exists(), gone
    assert (out / "tests/test_routing.py").exists()
    assert "NotImplementedError(\"part 6 (loss)" in (out / "rf.py").read_text()
    # the grader grades the copy's parts, out of their points
    graded = subprocess.run([sys.executable, "-m", "kit.grade"], cwd=out, capture_output=True, text=True)
    assert graded.returncode == 1 and "total                      0/45" in graded.stdout, graded.stdout
    assert list(json.loads((out / "grade.json").read_text())) == ["mask", "resample", "loss"]
    assert "blocked by part 1 (mask)" in graded.stdout
    # the assignment and the front page name them; the front page installs as the README does
    assignment = (out / "kit/ASSIGNMENT.md").read_text()
    assert "Parts 1 (`mask`), 5 (`resample`), 6 (`loss`): 45 points" in assignment
    assert "| 2 | `frame_t`" not in assignment and "make_student" not in assignment
    front = (out / "README.md").read_text().split("\n---\n")[0]
    torch_line = next(ln for ln in (ROOT / "README.md").read_text().splitlines() if ln.startswith("pip install torch"))
    assert torch_line in front and "pip install -r requirements.txt -r tests/requirements.txt" in front
    assert "45 points" in front and "python -m kit.grade" in front
    # docs that answer a question are trimmed; every relative link resolves in the copy
    evidence = (out / "docs/evidence.md").read_text()
    assert "The row that decides it" not in evidence and "left out of the student copy" in evidence
    assert links_that_resolve_nowhere(out) == []
    # CI: the grader and the tests, no planter
    ci = (out / ".ci/run").read_text()
    assert "kit.plant" not in ci and "python -m kit.grade" in ci and "pytest -q tests" in ci
    # train.py and sample.py say in one line which part to write
    trained = subprocess.run([sys.executable, "train.py", "--steps", "2", "--out", str(tmp_path / "r")], cwd=out,
                             capture_output=True, text=True)
    assert trained.returncode == 1 and "Traceback" not in trained.stderr
    assert trained.stderr.strip().splitlines()[-1].startswith("error: train.py needs part 6 (loss)")
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("missing, says", [("torch", "torch is not installed in this Python"),
                                            ("rf", "rf.py does not import")])
def test_the_grader_tells_a_missing_package_from_a_broken_rf(missing, says, monkeypatch, capsys):
    def fails(names):
        raise ModuleNotFoundError(f"No module named '{missing}'", name=missing)
    monkeypatch.setattr(sys.modules["kit.grade"], "grade", fails)
    with pytest.raises(SystemExit) as e:
        grade_main(["--part", "mask"])
    assert says in str(e.value)


def test_links_that_resolve_nowhere_finds_a_dead_link(tmp_path):
    (tmp_path / "a.md").write_text("[ok](a.md) [gone](kit/README.md) [web](https://x.org/y) [anchor](#z)\n")
    assert links_that_resolve_nowhere(tmp_path) == ["a.md: kit/README.md"]


def test_student_copy_refuses_a_bad_request(tmp_path):
    for args, says in [(["--parts", "mask,nope"], "unknown part"), (["--out", str(ROOT / "x")], "inside the project")]:
        argv = ["--out", str(tmp_path / "s"), *args] if args[0] == "--parts" else args
        run = subprocess.run([sys.executable, "-m", "kit.make_student", *argv], cwd=ROOT, capture_output=True,
                             text=True)
        assert run.returncode != 0 and says in run.stderr and "Traceback" not in run.stderr
