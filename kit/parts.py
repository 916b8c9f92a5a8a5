"""
kit/parts.py -- the parts a student writes, and how they are cut out of the live files.

Each part is marked in rf.py (and, for the merge, in fast_attn.py) by a line `# [part: NAME]` before its lines
and `# [end: NAME]` after them. A part may have several such regions. The student copy keeps the markers
and replaces what lies between them by one line that raises NotImplementedError.
"""

import json
import re
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MARKED_FILES = ("rf.py", "fast_attn.py")
ASSIGNED = "kit/assigned.json"     # in a student copy: the parts it asks for, written by kit.make_student
START = re.compile(r"^(\s*)# \[part: (\w+)\]\s*$")
END = re.compile(r"^\s*# \[end: (\w+)\]\s*$")


@dataclass(frozen=True)
class Part:
    name: str
    number: int
    title: str
    points: int
    needs: tuple            # parts whose checks must pass first (else this one is "blocked")
    what: str               # what to write, in one line
    tests: tuple = ()       # test files that hold the answer in another form: left out of the student copy


PARTS = {p.name: p for p in [
    Part("mask", 1, "the mask rule", 10, (),
         "may_attend and earlier_history: who sees whom, for the block-causal and two-stream layouts",
         ("tests/test_mask.py",)),
    Part("frame_t", 2, "per-frame noise conditioning", 10, (),
         "modulate and gate: one (shift, scale, gate) per frame, broadcast over the frame's tokens"),
    Part("two_stream", 3, "the two-stream training forward", 15, ("mask", "frame_t"),
         "DiT.forward: lay out [history ; noisy] with chunk, stream, positions and noise levels"),
    Part("sampler", 4, "the KV cache and the chunk-by-chunk sampler", 20, ("mask", "frame_t"),
         "euler, LayerKV.extend and Velocity.finish: integrate, write the cache, commit a finished chunk"),
    Part("resample", 5, "autoregressive self-resampling", 20, ("sampler",),
         "the simulation timestep t_s in degrade_history, and resample_autoregressive (Eq. 5)",
         ("tests/test_training.py",)),        # it rebuilds the resampler (and the loss) to compare
    Part("loss", 6, "the training loss", 15, ("two_stream",),
         "training_loss: history, t per chunk, the noisy clip, one forward, the loss of Eq. 4",
         ("tests/test_training.py",)),
    Part("routing", 7, "top-k routing and the log-sum-exp merge", 10, ("mask", "frame_t"),
         "top_k_chunks (Eq. 9), merge_lse, and fast_attn.merge_lse_many (the same merge, batched)",
         ("tests/test_routing.py", "tests/test_varlen.py")),
]}


def parse_parts(given):
    """["mask,loss"] or ["mask", "loss"] or "mask,loss" -> ["mask", "loss"] in the parts' order; one-line error."""
    given = [given] if isinstance(given, str) else given
    names = [n.strip() for g in given for n in g.split(",") if n.strip()]
    unknown = [n for n in names if n not in PARTS]
    if unknown or not names:
        raise SystemExit(f"error: unknown part {(unknown or [' '.join(given)])[0]!r}: choose from "
                         f"{', '.join(PARTS)}, as mask,loss or mask loss")
    return [p for p in PARTS if p in names]


def assigned_parts(root=ROOT):
    """The parts a student copy asks for, or None outside a copy."""
    path = root / ASSIGNED
    return json.loads(path.read_text())["parts"] if path.exists() else None


def regions(text):
    """-> [(part, first line, last line)] of the marked regions (0-based line numbers, markers excluded)."""
    out, open_part, start = [], None, 0
    for i, line in enumerate(text.split("\n")):
        if m := START.match(line):
            if open_part:
                raise ValueError(f"line {i + 1}: part {m[2]!r} opens inside part {open_part!r}")
            open_part, start = m[2], i + 1
        elif m := END.match(line):
            if m[1] != open_part:
                raise ValueError(f"line {i + 1}: [end: {m[1]}] closes {open_part!r}")
            out.append((open_part, start, i - 1))
            open_part = None
    if open_part:
        raise ValueError(f"part {open_part!r} is never closed")
    unknown = {p for p, _, _ in out} - set(PARTS)
    if unknown:
        raise ValueError(f"unknown parts {sorted(unknown)}: add them to kit/parts.py")
    return out


def stub(text, chosen):
    """text with the chosen parts' lines replaced -> (new text, the lines taken out)."""
    lines, taken = text.split("\n"), []
    for part, a, b in reversed(regions(text)):
        if part not in chosen:
            continue
        indent = re.match(r"\s*", lines[a]).group(0)
        p = PARTS[part]
        n = sum(1 for line in lines[a:b + 1] if line.strip() and not line.strip().startswith("#"))
        taken += lines[a:b + 1]
        lines[a:b + 1] = [f'{indent}raise NotImplementedError("part {p.number} ({part}): write this, '
                          f'about {n} line{"s" if n > 1 else ""}; see kit/ASSIGNMENT.md")']
    return "\n".join(lines), taken
