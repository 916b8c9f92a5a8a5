"""
cli.py -- what train.py and sample.py share on the command line: options generated from dataclasses (each with
its help), range checks that fail in one line, the device and autocast choice, Ctrl-C handling, and the set-up of
several processes under torchrun.
"""

import argparse
import contextlib
import dataclasses
import os
import re
import signal
import sys
import threading
from datetime import timedelta
from pathlib import Path

import torch
from tqdm import tqdm

import rf


def fail(message):
    """Stop the script with one line on stderr, no traceback: what is wrong and how to fix it."""
    raise SystemExit(f"error: {message}")


def progress(*args, **kwargs):
    """A tqdm progress bar on a terminal; none when stderr goes to a file or a pipe (a log would fill with the bar's
    carriage-return updates), where the scripts' own lines are the log."""
    kwargs["disable"] = kwargs.get("disable", False) or not sys.stderr.isatty()
    return tqdm(*args, **kwargs)


# ----------------------------------------------------------------------------------------------------------------
# a student copy (kit/): rf.py with parts still to write, each stubbed by a NotImplementedError("part N (name): ...")
# ----------------------------------------------------------------------------------------------------------------

STUB = re.compile(r'raise NotImplementedError\("part (\d+) \((\w+)\)')


def unwritten_parts(root=Path(__file__).resolve().parent):
    """The course parts still stubbed in rf.py and fast_attn.py -> ["5 (resample)", ...] (none outside a copy)."""
    found = set()
    for name in ("rf.py", "fast_attn.py"):
        path = root / name
        found |= set(STUB.findall(path.read_text())) if path.exists() else set()
    return [f"{n} ({part})" for n, part in sorted(found, key=lambda f: int(f[0]))]


@contextlib.contextmanager
def parts_written(script):
    """A part of rf.py that is not written yet stops `script` with one line (which part, how to check it), not a
    traceback."""
    try:
        yield
    except NotImplementedError as e:
        m = STUB.search(f'raise NotImplementedError("{e}')
        if not m:
            raise
        others = [p for p in unwritten_parts() if p != f"{m[1]} ({m[2]})"]
        fail(f"{script} needs part {m[1]} ({m[2]}) of rf.py, which is not written yet: write it first (see "
             f"kit/ASSIGNMENT.md) and check it with python -m kit.grade --part {m[2]}"
             + (f". Also still to write: {', '.join(others)}" if others else ""))


def new_folders(path):
    """The folders that creating `path` would make (path first, then its parents), for remove_if_empty."""
    path = Path(path).absolute()
    return [p for p in (path, *path.parents) if not p.exists()]


def remove_if_empty(folders):
    """Remove the folders a failed run made, innermost first, as long as they are empty."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return


# ----------------------------------------------------------------------------------------------------------------
# options from dataclasses: every field is an option; its help comes from the field's metadata (train.py's Train,
# through `option`) or from a table (CONFIG_HELP, for rf.Config)
# ----------------------------------------------------------------------------------------------------------------

# options whose value is one of a few words: -h lists them
CHOICES = dict(degrade=rf.DEGRADE_MODES, train_t=rf.TRAIN_T, on_nan=("stop", "skip"), on_bad_clip=("stop", "skip"),
               preset=tuple(rf.PRESETS))

# The --help of each rf.Config field. (rf.py keeps short comments beside the fields for readers of the code; the
# options' help is this table.) tests/test_cli_messages.py checks that every field has an entry.
CONFIG_HELP = dict(
    dim="model width D",
    ffn_dim="hidden width of each block's feed-forward layer",
    freq_dim="width of the timestep sinusoid",
    num_heads="attention heads (head width = dim / num_heads)",
    num_layers="DiT blocks",
    text_len="text tokens the cross-attention reads (padded with zeros)",
    text_dim="width of the text features (Wan's umT5: 4096)",
    in_dim="channels of the model's input frames (Wan: latent channels; toy: RGB)",
    out_dim="channels of the predicted velocity",
    patch_size="(frames, height, width) per token; frames must be 1",
    eps="epsilon of the norms",
    frames_per_chunk="frames denoised together; attention is causal across chunks",
    frame_size="(H, W) of the frames the sampler draws (Wan: 480x832 pixels / 8, the VAE's stride; toy: pixels)",
    degrade="how the history is degraded in training after the warm-up: none (teacher forcing) | noise | parallel | "
            "autoregressive (Resampling Forcing)",
    resample_shift="shift s of Eq. 7 for the simulation timestep t_s (paper: 0.6)",
    resample_steps="Euler steps from t_s down to 0 when the history is resampled (paper: 1)",
    noise_aug_max="degrade noise: history = x_tau with tau ~ U(0, noise_aug_max)",
    train_t="per-chunk training t: uniform | logit_normal, then shifted by train_shift",
    train_shift="shift s of Eq. 7 applied to the training t (s > 1: more weight near noise)",
    sample_steps="Euler steps per chunk when sampling",
    sample_shift="shift of the sampler's timestep grid",
    sample_cfg="classifier-free guidance scale when sampling (1 = off)",
    top_k="history routing: each query reads its own chunk + the k best history chunks, not all of them",
    window="ablation: the last `window` history chunks instead of the top k",
    sink="ablation: always read history chunk 0 too (the \"attention sink\"); needs top_k or window",
)


def option(default, help):
    """A dataclass field whose --help is `help` (kept in the field's metadata)."""
    return dataclasses.field(default=default, metadata={"help": help})


def option_help(cls) -> dict:
    """{field name: its help}: rf.Config's from CONFIG_HELP, any other dataclass's from its fields' metadata."""
    if cls is rf.Config:
        return dict(CONFIG_HELP)
    return {f.name: f.metadata["help"] for f in dataclasses.fields(cls) if "help" in f.metadata}


def show(value):
    """A default as the command line writes it: (1, 4, 4) -> 1 4 4; None -> off."""
    if isinstance(value, (tuple, list)):
        return " ".join(map(str, value))
    return "off" if value is None else str(value)


def add_dataclass_options(parser, cls, skip=(), defaults=None):
    """One option per field of `cls`, absent from the result unless given (argparse.SUPPRESS), so a caller can tell
    "keep the saved value" from "change it". Tuples take several ints; bools get --x / --no-x.
    defaults: {field name: the text that says its default} where the field's own default is not the whole story
    (e.g. a value that depends on --preset)."""
    helps = option_help(cls)
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
        said = (defaults or {}).get(f.name, f"default: {show(default)}")
        parser.add_argument(f"--{f.name}", default=argparse.SUPPRESS, help=f"{text} ({said})", **kind)


def preset_defaults() -> dict:
    """{Config field: "toy: 128; wan2.1-t2v-1.3b: 1536"}, or "default: X" where every preset has the same value."""
    values = {name: rf.preset(name) for name in rf.PRESETS}
    said = {}
    for f in dataclasses.fields(rf.Config):
        per = {name: show(getattr(cfg, f.name)) for name, cfg in values.items()}
        said[f.name] = (f"default: {next(iter(per.values()))}" if len(set(per.values())) == 1 else
                        "; ".join(f"{name}: {v}" for name, v in per.items()))
    return said


def add_config_options(parser, title="model and method (default: the --preset's value, given per preset)",
                       description=None):
    """The rf.Config fields, as options that override the preset (or, where allowed, a checkpoint's config). Each
    option's help gives its value in every preset, since the default depends on --preset."""
    add_dataclass_options(parser.add_argument_group(title, description), rf.Config, defaults=preset_defaults())


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

