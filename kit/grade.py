"""
python -m kit.grade [--part NAME ...] -- grade the parts of rf.py, print a table, write grade.json.

Each part's checks (kit/checks.py) compare your code with the project's own equivalences and with properties
the method must have; none of them stores an answer. A part passes when all its checks pass. A part whose
prerequisite fails is reported "blocked by part N", not failed: fix that part first.

    python -m kit.grade                      # your parts (in a student copy), or every part
    python -m kit.grade --part mask          # one part (and what it needs)
    python -m kit.grade --part mask,loss     # several: mask,loss or mask loss
"""

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

from kit.parts import PARTS, assigned_parts, parse_parts


def run_part(name, checks):
    """-> (passed, first failing check and its reason, seconds)."""
    t0 = time.time()
    for title, fn in checks.get(name, []):
        try:
            fn()
        except NotImplementedError:
            return False, f"{title}: not written yet", time.time() - t0
        except Exception as e:                                     # a student's bug is a failed check, not a crash
            reason = str(e).strip().split("\n")[0] or type(e).__name__
            if not isinstance(e, AssertionError):
                where = traceback.extract_tb(e.__traceback__)[-1]
                reason = f"{type(e).__name__}: {reason} ({Path(where.filename).name}, line {where.lineno})"
            return False, f"{title}: {reason}", time.time() - t0
    return True, "", time.time() - t0


def needed(names):
    """The parts to run for `names`: they and, recursively, their prerequisites, in the parts' order."""
    want, todo = set(), list(names)
    while todo:
        name = todo.pop()
        if name not in want:
            want.add(name)
            todo += PARTS[name].needs
    return [p for p in PARTS if p in want]


def grade(names):
    from kit import checks                                          # imports rf: a syntax error shows here
    results = {}
    for name in needed(names):
        blocked = [n for n in PARTS[name].needs if not results[n]["passed"]]
        if blocked:                           # name the part to fix: a blocked prerequisite's own blocker
            first = results[blocked[0]].get("blocker") or blocked[0]
            results[name] = dict(passed=False, status=f"blocked by part {PARTS[first].number} ({first})",
                                 reason="", points=0, seconds=0.0, blocker=first)
            continue
        ok, reason, seconds = run_part(name, checks.CHECKS)
        results[name] = dict(passed=ok, status="passed" if ok else "failed", reason=reason,
                             points=PARTS[name].points if ok else 0, seconds=round(seconds, 1))
    return {n: results[n] for n in names}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mine = assigned_parts()
    p.add_argument("--part", "--parts", nargs="+", metavar="NAME",
                   help=f"parts to grade, as mask,loss or mask loss (default: "
                        f"{'your parts, ' + ','.join(mine) if mine else 'all'}); from: {', '.join(PARTS)}")
    p.add_argument("--json", default="grade.json", help="where to write the results")
    args = p.parse_args(argv)
    names = parse_parts(args.part) if args.part else mine or list(PARTS)
    try:
        results = grade(names)
    except Exception as e:                                         # rf.py does not even import
        missing = (getattr(e, "name", None) or "").split(".")[0]
        root = Path(__file__).resolve().parents[1]
        ours = (root / f"{missing}.py").exists() or (root / missing).is_dir()
        if isinstance(e, ModuleNotFoundError) and missing and not ours:     # the wrong Python, not a bug of ours
            sys.exit(f"error: {missing} is not installed in this Python ({sys.executable}): activate the project's "
                     f"virtual environment (. .venv/bin/activate), or install it as README.md says")
        sys.exit(f"error: rf.py does not import: {type(e).__name__}: {e}")
    print(f"{'part':<24} {'points':>6}  {'result':<28} first failing check")
    for name, r in results.items():
        part = PARTS[name]
        print(f"{part.number}. {part.name:<21} {r['points']:>3}/{part.points:<3} {r['status']:<28} "
              f"{r['reason']}")
    total = sum(r["points"] for r in results.values())
    print(f"{'total':<24} {total:>3}/{sum(PARTS[n].points for n in results)}")
    Path(args.json).write_text(json.dumps(results, indent=1))
    return 0 if all(r["passed"] for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
