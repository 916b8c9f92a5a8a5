"""
cli.py -- what train.py and sample.py share on the command line: options generated from dataclasses (each with
its help), range checks that fail in one line, the device and autocast choice, Ctrl-C handling, and the set-up of
several processes under torchrun.
"""

import argparse
import contextlib
import dataclasses
import inspect
import os
import re
import signal
import threading
from datetime import timedelta

import torch

import rf


def fail(message):
    """Stop the script with one line on stderr, no traceback: what is wrong and how to fix it."""
    raise SystemExit(f"error: {message}")


# ----------------------------------------------------------------------------------------------------------------
# options from dataclasses: every field is an option, and the comment beside the field is its help
# ----------------------------------------------------------------------------------------------------------------

# options whose value is one of a few words: -h lists them
CHOICES = dict(degrade=rf.DEGRADE_MODES, train_t=rf.TRAIN_T, on_nan=("stop", "skip"), on_bad_clip=("stop", "skip"),
               preset=tuple(rf.PRESETS))


def field_help(cls) -> dict:
    """{field name: the comment on its line} from the source of dataclass `cls`."""
    helps = {}
    for line in inspect.getsource(cls).splitlines():
        m = re.match(r"\s+(\w+): [^#]+#\s*(.+)$", line)
        if m:
            helps[m.group(1)] = m.group(2).removeprefix("[RF] ")
    return helps


def add_dataclass_options(parser, cls, skip=()):
    """One option per field of `cls`, absent from the result unless given (argparse.SUPPRESS), so a caller can tell
    "keep the saved value" from "change it". Tuples take several ints; bools get --x / --no-x."""
    helps = field_help(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        default = f.default
        text = helps.get(f.name, "")
        kind = dict(type=int) if default is None else dict(type=type(default))     # top_k, window: off = None
        if isinstance(default, tuple):
            kind = dict(type=int, nargs=len(default))
        elif isinstance(default, bool):
            kind = dict(action=argparse.BooleanOptionalAction)
        if f.name in CHOICES:     # shown, not enforced by argparse (its error is a usage dump): check_ranges or
            kind["metavar"] = "{" + ",".join(CHOICES[f.name]) + "}"    # the Config check says it in one line
        parser.add_argument(f"--{f.name}", default=argparse.SUPPRESS, help=f"{text} (default: {default})", **kind)


def add_config_options(parser):
    """The rf.Config fields, as options that override the preset (or, where allowed, a checkpoint's config)."""
    add_dataclass_options(parser.add_argument_group("model and method (override the preset)"), rf.Config)


def split_config_options(given: dict):
    """Parsed options -> (the others, the rf.Config fields given)."""
    names = {f.name for f in dataclasses.fields(rf.Config)}
    overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in given.items() if k in names}
    return {k: v for k, v in given.items() if k not in names}, overrides


# What each numeric option must be, checked before anything is built: a bad value is one line, not a traceback
# from deep inside (or, worse, a run that silently does nothing).
AT_LEAST_0, AT_LEAST_1, ABOVE_0 = (lambda x: x >= 0, ">= 0"), (lambda x: x >= 1, ">= 1"), (lambda x: x > 0, "> 0")
STOP_OR_SKIP = (lambda x: x in ("stop", "skip"), "stop or skip")


def check_ranges(options, ranges):
    """Fail in one line at the first option outside its range. options: an object holding the values (None: not
    given); ranges: {name: (test, what the value must be)}."""
    for name, (ok, want) in ranges.items():
        value = getattr(options, name)
        if value is not None and not ok(value):
            fail(f"--{name} {value!r} must be {want}")


# ----------------------------------------------------------------------------------------------------------------
# device and precision
# ----------------------------------------------------------------------------------------------------------------

def pick_device(name="auto") -> torch.device:
    """auto: the GPU when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def autocast(device: torch.device):
    """bf16 autocast on CUDA (Wan's regime: bf16 matmuls, fp32 islands), plain fp32 elsewhere."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


# ----------------------------------------------------------------------------------------------------------------
# Ctrl-C: finish the step, save, exit
# ----------------------------------------------------------------------------------------------------------------

class Stopped(SystemExit):
    """The run stopped on Ctrl-C or SIGTERM after saving a checkpoint. Uncaught, it exits with its message."""


@contextlib.contextmanager
def stop_requests():
    """While inside: the first Ctrl-C or SIGTERM only sets flag["stop"], so the loop can finish its step and save;
    a second one acts as usual (the handler puts the previous one back). Outside the main thread: no handlers."""
    flag = {"stop": False}
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return
    previous = {}

    def request(signum, frame):
        flag["stop"] = True
        signal.signal(signum, previous[signum])

    for signum in (signal.SIGINT, signal.SIGTERM):
        previous[signum] = signal.signal(signum, request)
    try:
        yield flag
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


# ----------------------------------------------------------------------------------------------------------------
# several processes: torchrun starts them and sets RANK / WORLD_SIZE / LOCAL_RANK; torch's DistributedDataParallel
# averages the gradients. One plain process needs none of it.
# ----------------------------------------------------------------------------------------------------------------

class DDP(torch.nn.parallel.DistributedDataParallel):
    """torch's DistributedDataParallel, answering for the wrapped model's own attributes too (cfg, encode_text,
    forward_chunk), so rf.training_loss takes it as it takes the bare DiT. The loss's one forward with gradient,
    model(...), goes through DDP, which averages the gradients across processes; the no-grad self-resampling calls
    reach the bare model."""

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.module, name)


def start_processes(device_name):
    """-> (rank, world size, device). Under torchrun: joins the process group (NCCL on GPUs, gloo on the CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_name)
    if world > 1:
        if device.type == "cuda":                          # one GPU per process
            device = torch.device("cuda", local)
            torch.cuda.set_device(device)
        # NOTE(choice): a 2-hour timeout, since the processes wait for each other while the first run encodes the
        # video cache (torch's default, 10 to 30 min, could run out); a hung process is also noticed that late.
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(hours=2))
    return rank, world, device


def gather(x, world):
    """Each process's (b, ...) -> every process's, concatenated in rank order (B, ...), on every process."""
    if world == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world)]
    torch.distributed.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def any_process(flag, world, device):
    """True on every process if it is True on any (so all of them stop at the same step)."""
    if world == 1:
        return flag
    t = torch.tensor([float(flag)], device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item())


def say_from(rank):
    """print on rank 0, nothing elsewhere: one process speaks."""
    return print if rank == 0 else (lambda *a, **k: None)

