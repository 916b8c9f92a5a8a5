"""
python -m kit.make_student --out ../rf-student [--parts mask,resample,loss] -- the student's copy.

Copies the project's files, replaces each chosen part's lines (between its `# [part: NAME]` and
`# [end: NAME]` markers) by a line that raises NotImplementedError, and leaves out what gives an answer
away: the instructor's guide (kit/README.md), the list of wrong answers and its planter, the kit's own tests,
and the test files that hold a chosen part in another form. Then it checks the copy:

  * every chosen part fails the grader (or is blocked by another chosen part);
  * every other part passes, or is blocked by a chosen part (its checks run that part's code);
  * no line taken out appears verbatim anywhere else in the copy.

    python -m kit.make_student --out ../rf-student                             # every part
    python -m kit.make_student --out ../rf-workshop --parts mask,resample,loss  # the 90-minute workshop
"""

import argparse
import subprocess
import sys
from pathlib import Path

from kit.parts import MARKED_FILES, PARTS, ROOT, stub
from kit.plant import copy_project, grade_copy, project_files

INSTRUCTORS_ONLY = ("kit/README.md", "kit/wrong_answers.py", "kit/plant.py", "kit/make_student.py",
                    "tests/test_kit.py")
TEXT = (".py", ".md", ".txt", ".sh", ".json", ".toml", ".cfg", ".ini", "")


def parse_parts(text):
    names = [p.strip() for p in text.split(",") if p.strip()]
    unknown = [n for n in names if n not in PARTS]
    if unknown or not names:
        raise SystemExit(f"error: unknown part(s) {unknown or text!r}: choose from {', '.join(PARTS)}")
    return names


def make(out, chosen, files):
    """Write the student copy into `out` -> the lines taken out of the marked files."""
    drop = set(INSTRUCTORS_ONLY) | {t for name in chosen for t in PARTS[name].tests}
    copy_project(out, [f for f in files if f not in drop])
    taken = []
    for name in MARKED_FILES:
        text, lines = stub((out / name).read_text(), chosen)
        (out / name).write_text(text)
        taken += lines
    return taken


def leaked(out, taken):
    """Lines taken out that still appear, verbatim, in a text file of the copy -> [(line, file)]."""
    wanted = {ln.strip() for ln in taken if len(ln.strip()) >= 16 and not ln.strip().startswith("#")}
    found = []
    for path in sorted(out.rglob("*")):
        if path.is_file() and path.suffix in TEXT and "__pycache__" not in path.parts:
            text = path.read_text(errors="ignore")
            found += [(ln, str(path.relative_to(out))) for ln in wanted if ln in text]
    return found


def self_check(out, chosen, originals):
    """Grade the copy -> a list of problems (empty when the copy is right). originals: the marked files' text."""
    problems, excused = [], set(chosen)        # a part blocked by a missing part (or one it blocks) is fine
    for name, r in grade_copy(out).items():         # the parts come in order, prerequisites first
        blocker = r["status"].split("(")[-1].rstrip(")") if r["status"].startswith("blocked") else None
        if name in chosen and r["passed"]:
            problems.append(f"part {name} still passes: its lines were not all taken out")
        elif name not in chosen and not r["passed"]:
            if blocker in excused:
                excused.add(name)
            else:
                problems.append(f"part {name} should pass in the copy: {r['status']} {r['reason']}")
    if len(chosen) > 1:                   # each chosen part alone: its own checks must notice it is missing
        stubbed = {f: (out / f).read_text() for f in MARKED_FILES}
        for name in chosen:
            for f in MARKED_FILES:
                (out / f).write_text(stub(originals[f], [name])[0])
            if grade_copy(out, [name])[name]["status"] != "failed":
                problems.append(f"part {name} alone: its checks do not fail without it")
        for f, text in stubbed.items():
            (out / f).write_text(text)
    return problems


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="a new (or empty) folder for the student copy")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, from: {', '.join(PARTS)}")
    args = p.parse_args(argv)
    chosen, out = parse_parts(args.parts), Path(args.out).resolve()
    if out == ROOT or ROOT in out.parents:
        raise SystemExit(f"error: --out {args.out} is inside the project: pick a folder outside it")
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"error: --out {args.out} is not empty: pick a new folder")
    out.mkdir(parents=True, exist_ok=True)
    originals = {f: (ROOT / f).read_text() for f in MARKED_FILES}
    taken = make(out, chosen, project_files())
    problems = self_check(out, chosen, originals)
    problems += [f"the line {ln!r} is still in {where}" for ln, where in leaked(out, taken)]
    points = sum(PARTS[n].points for n in chosen)
    if problems:
        print(f"the copy in {out} is NOT ready:\n  " + "\n  ".join(problems))
        return 1
    print(f"wrote {out}: parts {', '.join(chosen)} to write ({points} points, {len(taken)} lines taken out); "
          f"checked: each fails, the others pass, no answer left in the copy")
    print(f"students: cd {out} && python -m kit.grade   (see kit/ASSIGNMENT.md)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
