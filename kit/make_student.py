"""
python -m kit.make_student --out ../rf-student [--parts mask,resample,loss] -- the student's copy.

Copies the project's files, replaces each chosen part's lines (between its `# [part: NAME]` and
`# [end: NAME]` markers) by a line that raises NotImplementedError, and leaves out what gives an answer
away: the instructor's guide (kit/README.md), the list of wrong answers and its planter, the kit's own tests,
the test files that hold a chosen part in another form, and the paragraphs of the docs that answer a question.
The copy knows its parts (kit/assigned.json): `python -m kit.grade` grades them, its README.md opens with the
student's front page (install, parts, grading, what runs before the parts are written), kit/ASSIGNMENT.md names
them, and its .ci/run runs the grader and the tests. Then it checks the copy:

  * every chosen part fails the grader (or is blocked by another chosen part);
  * every other part passes, or is blocked by a chosen part (its checks run that part's code);
  * no line taken out appears verbatim anywhere else in the copy;
  * every relative link of its Markdown files resolves in the copy.

    python -m kit.make_student --out ../rf-student                             # every part
    python -m kit.make_student --out ../rf-workshop --parts mask,resample,loss  # the 90-minute workshop
"""

import argparse
import json
import re
import sys
import time
from pathlib import Path

from kit.parts import ASSIGNED, MARKED_FILES, PARTS, ROOT, parse_parts, stub
from kit.plant import copy_project, grade_copy, project_files

INSTRUCTORS_ONLY = ("kit/README.md", "kit/wrong_answers.py", "kit/plant.py", "kit/make_student.py",
                    "tests/test_kit.py")
TEXT = (".py", ".md", ".txt", ".sh", ".json", ".toml", ".cfg", ".ini", "")

# Paragraphs (or bullets, or table rows) of the docs that answer a question of kit/ASSIGNMENT.md: (file, the words
# they open with, the question). The copy has a one-line note in their place. A paragraph that is no longer there
# makes the copy fail its check: find where the answer went and update this list.
ANSWERS = [
    ("docs/evidence.md", "- **Just past the training length both fall**", 3),
    ("docs/evidence.md", "The row that decides it:", 3),
    ("docs/evidence.md", "After a blank or heavy noise, teacher forcing keeps falling", 2),
    ("docs/evidence.md", "| the 1.2M quick-start model, 500 steps of Resampling Forcing", 5),
    ("README.md", "Inside the training length Resampling Forcing pays a per-chunk cost", 3),
    ("docs/evidence.md", "- **Teacher forcing passes the damage on.**", 7),
    ("docs/evidence.md", "- **Resampling Forcing repairs it**", 7),
    ("docs/evidence.md", "This is the step a rollout repeats.", 7),
    ("docs/evidence.md", "- **A toy with detail to lose: the mechanism shows in every seed", 7),
    ("README.md", "**Why: what each model makes of a spoiled history.**", 7),
]

# What each command needs written (the parts its code runs), for the front page
COMMANDS = [
    ("`python -m kit.grade`", "grades your parts", ()),
    ("`python -m pytest -q tests`", "the test suite; a test that needs a part not written yet is skipped, and says "
                                    "which", ()),
    ("`python sample.py --ckpt checkpoints/small_tf`", "samples from a shipped checkpoint", ("frame_t", "sampler")),
    ("`python train.py`", "trains the toy (teacher forcing, then Resampling Forcing), then samples",
     ("mask", "frame_t", "two_stream", "sampler", "resample", "loss")),
    ("The questions of kit/ASSIGNMENT.md", "they train, score and sample", tuple(PARTS)),
]

LINK = re.compile(r"(!?)\[([^\]]*)\]\(([^)\s]+)\)")


def section(text, heading, body):
    """text with the body of section `heading` (up to the next heading of its level or above) replaced."""
    level = heading.split(" ")[0]
    start = text.index(heading + "\n") + len(heading) + 1
    nxt = re.compile(rf"^#{{1,{len(level)}}} ", re.M).search(text, start)
    return text[:start] + "\n" + body.rstrip("\n") + "\n\n" + (text[nxt.start():] if nxt else "")


def trim(text, opening, note):
    """The paragraph, bullet or table row of `text` that opens with `opening`, replaced by `note` -> (text, found)."""
    lines = text.split("\n")
    for i, line in enumerate(lines):
        if line.lstrip().startswith(opening):
            j = i + 1
            if not line.lstrip().startswith("|"):
                bullet = line.lstrip().startswith("- ")
                while j < len(lines) and lines[j].strip() and not (bullet and lines[j].lstrip().startswith("- ")):
                    j += 1
            indent = line[:len(line) - len(line.lstrip())]
            if line.lstrip().startswith("|"):
                cells = line.split("|")
                new = "|" + cells[1] + f"| {note} |" + " |" * (len(cells) - 4)
            else:
                new = indent + ("- " if line.lstrip().startswith("- ") else "") + f"*({note})*"
            return "\n".join(lines[:i] + [new] + lines[j:]), True
    return text, False


def dead_links(root):
    """[(file, target)] of the relative links in the Markdown files under root that point at nothing."""
    found = []
    for md in sorted(root.rglob("*.md")):
        if ".venv" in md.parts or "runs" in md.relative_to(root).parts:
            continue
        for _, _, target in LINK.findall(md.read_text()):
            path = target.split("#")[0]
            if path and not re.match(r"^[a-z]+:", path) and not (md.parent / path).exists():
                found.append((str(md.relative_to(root)), target))
    return found


def unlink_dead(root):
    """Dead relative links in the copy's Markdown become their plain text (a file the copy leaves out)."""
    for md in sorted(root.rglob("*.md")):
        text = md.read_text()

        def keep(m):
            path = m[3].split("#")[0]
            if not path or re.match(r"^[a-z]+:", path) or (md.parent / path).exists():
                return m[0]
            return m[2]
        new = LINK.sub(keep, text)
        if new != text:
            md.write_text(new)


def install_lines():
    """The README's install commands (the same in the copy's front page): venv, PyTorch's CPU wheel, requirements."""
    readme = (ROOT / "README.md").read_text()
    venv = re.search(r"^python -m venv .*$", readme, re.M)
    torch = re.search(r"^pip install torch==.*$", readme, re.M)
    if not (venv and torch):
        raise SystemExit("error: README.md's quick start has no 'python -m venv' or 'pip install torch==' line: "
                         "update kit/make_student.py's install_lines")
    return [venv[0], torch[0], "pip install -r requirements.txt -r tests/requirements.txt"]


def front_page(chosen):
    points = sum(PARTS[n].points for n in chosen)
    rows = "\n".join(f"| {PARTS[n].number} | `{n}` | {PARTS[n].points} | {PARTS[n].what} |" for n in chosen)
    runs = []
    for command, what, needs in COMMANDS:
        missing = [f"{PARTS[n].number} ({n})" for n in needs if n in chosen]
        runs.append(f"- {command}: {what}. " + (f"Needs your part{'s' if len(missing) > 1 else ''} "
                                                   f"{', '.join(missing)} written first; until then it says so in "
                                                   f"one line." if missing else "Runs now."))
    install = "\n".join(install_lines())
    return f"""# Your assignment: write Resampling Forcing

This is a student copy of `rf`, a compact implementation of Resampling Forcing. Some parts of `rf.py` are taken
out; you write them back, grade yourself as you go, then answer questions with the project's own experiments.
[kit/ASSIGNMENT.md](kit/ASSIGNMENT.md) has the parts, a hint for each, and the questions. The rest of this page,
after the line, is the project's own README.

## Install (once)

```bash
{install}
```

The second line installs PyTorch's CPU build (a plain `pip install torch` pulls the multi-GB CUDA build: use it on
a GPU machine).

## Your parts: {points} points

| # | part | points | what to write |
|---|---|---|---|
{rows}

Each sits in `rf.py` between `# [part: NAME]` and `# [end: NAME]` and raises `NotImplementedError` until you write
it.

## Grade yourself

```bash
python -m kit.grade                    # your parts: a table of points, and grade.json
python -m kit.grade --part {chosen[0]}{' ' * max(0, 11 - len(chosen[0]))} # one part (several: --part {','.join(chosen[:2])})
```

## What runs before your parts are written

{chr(10).join(runs)}

---

"""


def assignment(text, chosen):
    """kit/ASSIGNMENT.md for the copy: it names the copy's parts, lists only their rows and hints."""
    numbers = {str(PARTS[n].number) for n in chosen}
    points = sum(PARTS[n].points for n in chosen)
    names = ", ".join(f"{PARTS[n].number} (`{n}`)" for n in chosen)
    given = ", ".join(f"{PARTS[n].number} (`{n}`)" for n in PARTS if n not in chosen)
    written = (f" Parts {given} are written already: yours may call them (the table's column 'needs' names "
               f"them).") if given else ""
    text = section(text, "## Your parts", f"Part{'s' if len(chosen) > 1 else ''} {names}: {points} points. "
                                         f"`python -m kit.grade` grades them.{written}")
    keep, dropping = [], False
    for line in text.split("\n"):
        row, hint = re.match(r"^\| (\d) \|", line), re.match(r"^- \*\*Part (\d) ", line)
        if row or hint:
            dropping = (row or hint)[1] not in numbers
        elif not line.startswith("  "):                   # a hint's continuation lines go with it
            dropping = False
        if not dropping:
            keep.append(line)
    text = "\n".join(keep)
    text = re.sub(r"\n## A 90-minute workshop\n.*?(?=\n## )", "", text, flags=re.S)
    return re.sub(r"\n{3,}", "\n\n", text)


def ci_script(text):
    """The copy's .ci/run: the project's install, then the grader on the student's parts and the test suite."""
    head = text.split("python -m kit.plant")[0]
    if head == text:
        raise SystemExit("error: .ci/run has no 'python -m kit.plant' line to replace: update kit/make_student.py")
    head = re.sub(r"\A#!.*?\n(#.*\n)*", "", head)
    return ("#!/usr/bin/env bash\n"
            "# CI of a student copy: a fresh virtual environment, the README's install, the grader on your parts\n"
            "# (CI fails until they pass), then the test suite (a test that needs a part not written yet is skipped,\n"
            "# and says which).\n" + head +
            "status=0\npython -m kit.grade || status=1\npython -m pytest -q tests\nexit $status\n")


def make(out, chosen, files):
    """Write the student copy into `out` -> (the lines taken out of the marked files, problems)."""
    drop = set(INSTRUCTORS_ONLY) | {t for name in chosen for t in PARTS[name].tests}
    copy_project(out, [f for f in files if f not in drop])
    taken, problems = [], []
    for name in MARKED_FILES:
        text, lines = stub((out / name).read_text(), chosen)
        (out / name).write_text(text)
        taken += lines
    (out / ASSIGNED).write_text(json.dumps(dict(parts=chosen)) + "\n")
    for f, opening, question in ANSWERS:
        text, found = trim((out / f).read_text(), opening, f"left out of the student copy: it answers question "
                                                            f"{question} of kit/ASSIGNMENT.md")
        (out / f).write_text(text)
        if not found:
            problems.append(f"{f}: no paragraph opens with {opening!r} (it answers question {question}): find where "
                            f"the answer went and update ANSWERS in kit/make_student.py")
    readme = section((out / "README.md").read_text(), "## For a course",
                     "This is a student copy: its front page, at the top of this file, says how to install, which "
                     "parts are yours and how to grade them; [kit/ASSIGNMENT.md](kit/ASSIGNMENT.md) has the parts "
                     "and the questions.")
    (out / "README.md").write_text(front_page(chosen) + readme)
    (out / "kit/ASSIGNMENT.md").write_text(assignment((out / "kit/ASSIGNMENT.md").read_text(), chosen))
    (out / ".ci/run").write_text(ci_script((out / ".ci/run").read_text()))
    with open(out / "tests/conftest.py", "a") as f:     # skip (and name) a test's part not written yet
        f.write("\n\n# The course kit: a test that needs a part of rf.py not written yet is skipped, and says which.\n"
                "from kit.pytest_parts import pytest_runtest_makereport  # noqa: E402, F401\n")
    unlink_dead(out)
    return taken, problems


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
    for name, r in grade_copy(out, list(PARTS)).items():    # the parts come in order, prerequisites first
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
    p.add_argument("--parts", "--part", nargs="+", default=[",".join(PARTS)],
                   help=f"the parts to take out, as mask,loss or mask loss (default all): {', '.join(PARTS)}")
    args = p.parse_args(argv)
    t0 = time.time()
    chosen, out = parse_parts(args.parts), Path(args.out).resolve()
    if out == ROOT or ROOT in out.parents:
        raise SystemExit(f"error: --out {args.out} is inside the project: pick a folder outside it")
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"error: --out {args.out} is not empty: pick a new folder")
    out.mkdir(parents=True, exist_ok=True)
    originals = {f: (ROOT / f).read_text() for f in MARKED_FILES}
    taken, problems = make(out, chosen, project_files())
    problems += self_check(out, chosen, originals)
    problems += [f"the line {ln!r} is still in {where}" for ln, where in leaked(out, taken)]
    problems += [f"{f}: the link {target} points at nothing in the copy" for f, target in dead_links(out)]
    points = sum(PARTS[n].points for n in chosen)
    if problems:
        print(f"the copy in {out} is NOT ready:\n  " + "\n  ".join(problems))
        return 1
    print(f"wrote {out} in {time.time() - t0:.0f} s: parts {', '.join(chosen)} to write ({points} points, "
          f"{len(taken)} lines taken out); checked: each fails, the others pass, no answer left in the copy, every "
          f"link resolves")
    print(f"students: cd {out}, then follow its README.md (python -m kit.grade grades their parts)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
