"""
python -m kit.plant [--suite] -- plant each usual wrong answer in a copy of the project and show that the
part's checks reject it. With --suite, the test suite's quick tests must reject it too (pytest -m "not slow",
without the kit's own tests, which run the same checks).

Exits 1 if any wrong answer gets through. CI runs it beside the test suite.
"""

import argparse
import json
import queue
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from kit.parts import ROOT, regions
from kit.wrong_answers import WRONG


def project_files(root=ROOT):
    """The project's files: tracked or not ignored by git (outside a git checkout, all but runs and caches)."""
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root,
                             capture_output=True, text=True, check=True)
        files = [f for f in out.stdout.split("\0") if f]
    except (OSError, subprocess.CalledProcessError):
        skip = {".git", ".venv", "venv", "runs", "__pycache__", ".pytest_cache"}
        files = [str(p.relative_to(root)) for p in root.rglob("*")
                 if p.is_file() and not skip & set(p.relative_to(root).parts)]
    return [f for f in files if (root / f).is_file()]


def copy_project(dest, files, root=ROOT):
    for f in files:
        (dest / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / f, dest / f)


def plant(text, wrong):
    """text of wrong.file -> text with the wrong answer in it (a clear error if the right one is not there)."""
    edits = list(wrong.also)
    if isinstance(wrong.old, int):
        lines = text.split("\n")
        _, a, b = [r for r in regions(text) if r[0] == wrong.part][wrong.old]
        text = "\n".join(lines[:a] + wrong.new.rstrip("\n").split("\n") + lines[b + 1:])
    else:
        edits.insert(0, (wrong.old, wrong.new))
    for old, new in edits:
        if text.count(old) != 1:
            raise SystemExit(f"error: kit/wrong_answers.py ({wrong.what}): the right answer {old[:60]!r} is not "
                             f"in {wrong.file} exactly once: update the wrong answer to today's code")
        text = text.replace(old, new)
    return text


def grade_copy(copy, parts=None):
    """Run the grader in a copy of the project -> its results ({part: dict(status, reason, ...)})."""
    args = [sys.executable, "-m", "kit.grade", "--json", "grade.json"] + (["--part", *parts] if parts else [])
    run = subprocess.run(args, cwd=copy, capture_output=True, text=True)
    if not (copy / "grade.json").exists():               # a grader that did not run rejects nothing
        raise SystemExit(f"error: the grader did not run in the copy: {run.stderr.strip()[-300:]}")
    results = json.loads((copy / "grade.json").read_text())
    (copy / "grade.json").unlink()
    return results


def rejected_by_checks(copy, part):
    """-> (the part's checks failed, the grader's line for it)."""
    result = grade_copy(copy, [part])[part]
    return result["status"] == "failed", f"{result['status']}: {result['reason']}"


def rejected_by_suite(copy):
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-m", "not slow", "-p", "no:cacheprovider",
                          "--ignore", "tests/test_kit.py", "tests"], cwd=copy, capture_output=True, text=True)
    failed = [ln for ln in run.stdout.splitlines() if ln.startswith("FAILED")]
    return run.returncode != 0, failed[0][7:] if failed else run.stdout.strip().splitlines()[-1]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", action="store_true", help="also run the quick tests on each (minutes each)")
    p.add_argument("--only", default="", help="only the wrong answers whose description contains this")
    p.add_argument("--jobs", type=int, default=1, help="wrong answers graded at a time, each in its own copy")
    args = p.parse_args(argv)
    files, through = project_files(), []
    wrongs = [w for w in WRONG if args.only in w.what]
    print(f"{len(wrongs)} wrong answers, each planted in turn in a copy of the project ({args.jobs} at a time)")
    start = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        copies = queue.Queue()
        for i in range(args.jobs):
            (Path(tmp) / str(i)).mkdir()
            copy_project(Path(tmp) / str(i), files)
            copies.put(Path(tmp) / str(i))

        def one(w):                                        # in the copy this worker takes, then gives back
            copy = copies.get()
            t0, right = time.time(), (copy / w.file).read_text()
            (copy / w.file).write_text(plant(right, w))
            try:
                caught, line = rejected_by_checks(copy, w.part)
                result = f"{w.part:<11} {'rejected' if caught else 'ACCEPTED':<9} {w.what}"
                missed = [] if caught else [w.what]
                if args.suite:
                    by_suite, first = rejected_by_suite(copy)
                    result += f"\n{'':<21}suite: {'rejected by ' + first if by_suite else 'ACCEPTED: ' + first}"
                    missed += [] if by_suite else [w.what + " (suite)"]
            finally:
                (copy / w.file).write_text(right)
                copies.put(copy)
            return f"{result}  ({time.time() - t0:.0f} s)" + (f"\n{'':<21}{line[:240]}" if caught else ""), missed

        with ThreadPoolExecutor(args.jobs) as pool:
            for text, missed in pool.map(one, wrongs):
                print(text, flush=True)
                through += missed
    print(f"{time.time() - start:.0f} s in all")
    if through:
        print(f"{len(through)} wrong answers got through: {through}")
        return 1
    print(f"all {len(wrongs)} wrong answers rejected")
    return 0


if __name__ == "__main__":
    sys.exit(main())
