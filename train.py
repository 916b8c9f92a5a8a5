"""
train.py -- train a causal Wan-style DiT with Resampling Forcing.

    python train.py                      # toy preset on tiny_data/, CPU or one GPU, a few minutes
    python train.py --steps 3000 --out runs/long
    python train.py --resume             # continue the run in --out from its latest checkpoint (after Ctrl-C too)
    python train.py -h                   # every option; model options override the preset
    python train.py --preset wan2.1-t2v-1.3b --data DIR          # fine-tune Wan2.1 on DIR's videos (+ .txt captions)
    torchrun --nproc_per_node=8 train.py --preset wan2.1-t2v-1.3b --data DIR --batch_size 64 --grad_accum 8

The loop: teacher-forcing warm-up for --warmup_steps (history = ground truth), then Resampling Forcing (history
self-degraded by the model, `--degrade`). Everything that is the method lives in rf.training_loss; train_step is
the one screen that calls it.
--batch_size is the whole batch of one optimizer step: torchrun's processes and --grad_accum micro-batches share it,
and the run computes the same thing however it is split (up to float rounding).
Ctrl-C (or SIGTERM, e.g. a cluster's time limit) finishes the step, saves a checkpoint and exits; --resume goes on
from there exactly. A second Ctrl-C stops at once.
"""

import argparse
import contextlib
import copy
import dataclasses
import json
import math
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

import checkpoints
import cli
import clips
import fast_attn
import media
import rf
import wan
from cli import option
from tiny_data import shapes
from tiny_data.caption_encoder import CaptionEncoder


# NOTE(choice): the toy's quick start is 3000 teacher-forcing steps, then 500 of Resampling Forcing. The method
# needs a model whose per-chunk error is small: on a model that is bad at every chunk, resampling only adds noise
# (measured: switching at 3000 costs 0.07 of shape fidelity within the training length and gains nothing yet past
# it). The longer runs of docs/evidence.md ship in checkpoints/.
# Each field is an option of the same name; its --help is the text beside it.
@dataclass
class Train:
    preset: str = option("toy", "the model: toy (laptop) or wan2.1-t2v-1.3b (the real one)")
    data: str = option(str(shapes.TRAIN_PATH), "an .npz from tiny_data/shapes.py, or a folder of clips + .txt "
                       "captions")
    out: str = option("runs/toy", "the run's folder: checkpoints, log.jsonl, loss.png, samples/")
    steps: int = option(3500, "the step to stop at: the run's total optimizer steps (with --resume too, not the "
                        "number of steps to add)")
    warmup_steps: int = option(3000, "teacher forcing first: early on the model's errors are noise, not drift")
    batch_size: int = option(8, "clips per optimizer step, over all processes and micro-batches")
    grad_accum: int = option(1, "micro-batches per optimizer step (gradients summed before the step)")
    clip_frames: int = option(8, "frames per training clip (4 chunks of 2 in the toy; Wan: video frames, 1 + 4k)")
    lr: float = option(2e-3, "AdamW learning rate")
    lr_decay: bool = option(False, "cosine decay of the lr from --lr to --lr / 10 over the run's --steps")
    weight_decay: float = option(0.0, "AdamW weight decay")
    grad_clip: float = option(1.0, "clip the gradient norm to this")
    ema: float = option(0.995, "decay of the weights' moving average, which sampling uses")
    caption_dropout: float = option(0.1, "empty caption this often, so classifier-free guidance has something to "
                                    "use")
    log_every: int = option(250, "steps between log lines (loss per noise level)")
    ckpt_every: int = option(500, "steps between checkpoints")
    keep_last: int = option(3, "checkpoints kept on disk")
    seed: int = option(0, "one seed for the weights, the batches and every noise draw")
    device: str = option("auto", "auto (the GPU if there is one) | cpu | cuda | cuda:N")
    resume: str = option("", "continue the run in --out from its newest complete checkpoint (or from PATH)")
    sample: bool = option(True, "write sample GIFs with sample.py at the end")
    on_nan: str = option("stop", "non-finite loss or gradient: stop (keeping the last checkpoint) | skip the step")
    on_bad_clip: str = option("skip", "a corrupt, short or wrong-size clip in a --data folder: skip (warn) | stop")
    dry_run: bool = option(False, "print what would be trained and exit (Wan presets: memory needs and both "
                                  "checkpoint key layouts)")
    grad_checkpointing: bool = option(False, "recompute each block in backward: far less activation memory")
    compile: bool = option(False, "compile each DiT block (fast_attn.compile_blocks): pays on a GPU, not on a CPU")
    # Wan presets only: where the weights come from (a local folder or a hub id), and the latent cache
    wan: str = option(wan.WAN_PARTS_REPO, "Wan presets: the DiT to start from (any wan.load_wan source)")
    text_encoder: str = option("", "Wan presets: umT5 + tokenizer in the diffusers layout")
    vae: str = option("", "Wan presets: Wan's VAE in the diffusers layout")
    cache: str = option("", "Wan presets: where encoded clips go")


# Train defaults of the Wan presets, where the command line does not set them. The paper fine-tunes with AdamW at
# lr 5e-5, batch 64, 10K teacher-forcing then 15K Resampling Forcing steps on 81-frame (5 s) videos.
# NOTE(choice): batch 1 by default, the size that fits one 80 GB GPU with activation checkpointing; the paper's 64 is
# --batch_size 64 with --grad_accum and/or torchrun. No caption dropout: the paper does not mention one, and Wan's
# CFG contrasts with its negative prompt (a real prompt), not with an empty one. No samples at the end by default:
# sampling a Wan video needs the text encoder again (python sample.py --ckpt OUT/latest --prompt "...").
WAN_DEFAULTS = dict(data="", out="runs/wan", steps=25_000, warmup_steps=10_000, batch_size=1, clip_frames=81, lr=5e-5,
                    caption_dropout=0.0, log_every=10, ckpt_every=500, keep_last=2, grad_checkpointing=True,
                    sample=False)
T_BUCKETS = (0.0, 0.25, 0.5, 0.75, 1.0)   # log the loss per noise level: a flat average hides progress
TRAIN_RANGES = dict(steps=cli.AT_LEAST_0, warmup_steps=cli.AT_LEAST_0, batch_size=cli.AT_LEAST_1,
                    grad_accum=cli.AT_LEAST_1, clip_frames=cli.AT_LEAST_1, lr=cli.ABOVE_0,
                    weight_decay=cli.AT_LEAST_0, grad_clip=cli.ABOVE_0, ema=(lambda x: 0 <= x < 1, "in [0, 1)"),
                    caption_dropout=(lambda x: 0 <= x <= 1, "in [0, 1]"), log_every=cli.AT_LEAST_1,
                    ckpt_every=cli.AT_LEAST_1, keep_last=cli.AT_LEAST_1, on_nan=cli.STOP_OR_SKIP,
                    on_bad_clip=cli.STOP_OR_SKIP)


def is_wan(preset):
    return preset.startswith("wan")


def parse_args(argv=None):
    """-> (the Train fields given on the command line, the Config fields given). Unset options are absent, so a
    resumed run can tell "keep the checkpoint's value" from "change it"."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    wan_too = {name: f"default: {cli.show(getattr(Train, name))}; Wan presets: {cli.show(value)}"
               for name, value in WAN_DEFAULTS.items() if value != getattr(Train, name)}
    wan_too |= dict(data="default: tiny_data/train.npz; Wan presets: a folder you give", text_encoder="default: --wan",
                    vae="default: --wan", cache="default: DATA/.rf_cache")
    cli.add_dataclass_options(p, Train, skip=("resume",), defaults=wan_too)
    p.add_argument("--resume", nargs="?", const="latest", default=argparse.SUPPRESS, metavar="PATH",
                   help="continue the run in --out from its newest complete checkpoint, or from checkpoint PATH")
    cli.add_config_options(p)
    return cli.split_config_options(vars(p.parse_args(argv)))


# ----------------------------------------------------------------------------------------------------------------
# one step: the method on one screen
# ----------------------------------------------------------------------------------------------------------------

@dataclass
class BatchSlice:
    """Rows `rows` of a batch of `batch` videos, computed apart from the others (a gradient-accumulation
    micro-batch, or one process's share under torchrun). It goes where rf's functions take a generator: every
    random draw (t, t_s, noise) is then made for the whole batch and only these rows are kept, so a split batch
    gets exactly the numbers of the unsplit one."""
    # NOTE(choice): slice the whole batch's draws, not a generator per video (docs/method.md,
    # "A split batch draws what the whole batch would").
    generator: torch.Generator
    batch: int
    rows: slice

    def draw(self, fn, shape):
        """fn(shape) for fn = torch.rand or torch.randn, shape[0] the slice's rows."""
        return fn((self.batch, *shape[1:]), generator=self.generator)[self.rows]


def history_mode(run, step):
    """The history degradation of step `step` (0-based): the ground truth through the warm-up, then --degrade."""
    return "none" if step < run.train.warmup_steps else run.cfg.degrade


def train_step(run, step):
    """One optimizer step: batch -> (degrade history -> per-chunk t -> one forward -> loss) per micro-batch ->
    backward -> update. Returns (the history mode, the loss of every micro-batch, chunk losses (B, N), chunk t
    (B, N), and what went wrong or None: a non-finite loss or gradient skips the update)."""
    train, world = run.train, run.world
    mode = history_mode(run, step)                                            # teacher-forcing warm-up first
    clip, cond = run.data.batch(step, train.batch_size, run.gen, train.caption_dropout, rows=run.mine)
    run.opt.zero_grad(set_to_none=True)
    before = run.gen.get_state()
    losses, chunk_losses, chunk_ts = [], [], []
    for a in range(train.grad_accum):            # micro-batches: gradients add up, one optimizer step below
        b = run.micro_batch
        rows = slice(run.mine.start + a * b, run.mine.start + (a + 1) * b)
        run.gen.set_state(before)                # each piece draws the whole batch's randomness, keeps its rows
        with contextlib.ExitStack() as no_sync:
            if world > 1 and a < train.grad_accum - 1:        # DDP averages the gradients after the last one
                for m in run.wrapped.values():
                    no_sync.enter_context(m.no_sync())
            with cli.autocast(run.device):
                x, c = clip[a * b:(a + 1) * b].to(run.device), cond[a * b:(a + 1) * b].to(run.device)
                encoder = run.wrapped.get("text_encoder")     # None on the Wan path: the batch holds the features
                context = c if encoder is None else encoder(c)
                # [RF] lines 2-7 of Algorithm 1: degrade the history, draw t per chunk, one forward, one loss
                loss, chunk_loss, chunk_t = rf.training_loss(run.wrapped["dit"], x, context, mode=mode,
                                                             generator=BatchSlice(run.gen, train.batch_size, rows))
            # backward even on a non-finite loss: under torchrun every process must join the gradient averaging
            (loss / train.grad_accum).backward()
        losses.append(loss.detach())
        chunk_losses.append(chunk_loss)
        chunk_ts.append(chunk_t)
    losses = cli.gather(torch.stack(losses), world)                       # every micro-batch's loss
    chunk_loss, chunk_t = cli.gather(torch.cat(chunk_losses), world), cli.gather(torch.cat(chunk_ts), world)
    if not torch.isfinite(losses).all():      # a NaN or inf is caught at the step it happens, before opt.step
        return mode, losses, chunk_loss, chunk_t, f"non-finite loss {losses[~torch.isfinite(losses)][0].item()}"
    grad_norm = torch.nn.utils.clip_grad_norm_(run.params, train.grad_clip)     # the same in every process
    if not torch.isfinite(grad_norm):
        return mode, losses, chunk_loss, chunk_t, f"non-finite gradient (loss {losses.mean().item():.4f})"
    for group in run.opt.param_groups:
        group["lr"] = learning_rate(train, step)
    run.opt.step()
    with torch.no_grad():
        decay = min(train.ema, (1 + step) / (10 + step))
        for name, m in run.models.items():
            for pe, p in zip(run.emas[name].parameters(), m.parameters()):
                pe.lerp_(p, 1 - decay)
    return mode, losses, chunk_loss, chunk_t, None


def learning_rate(train, step):
    """--lr, or with --lr_decay a cosine from --lr down to --lr / 10 at --steps: a function of the step alone, so a
    resumed run sets the same lr as the uninterrupted one."""
    if not train.lr_decay:
        return train.lr
    return train.lr * (0.55 + 0.45 * math.cos(math.pi * min(step / train.steps, 1.0)))


# ----------------------------------------------------------------------------------------------------------------
# the run: options -> data -> models -> loop -> checkpoints, log, pictures
# ----------------------------------------------------------------------------------------------------------------

def main(argv=None):
    given, overrides = parse_args(argv)
    train = Train(**{**(WAN_DEFAULTS if is_wan(given.get("preset", Train.preset)) else {}), **given})
    if train.dry_run:              # builds the model on the meta device only: nothing is allocated or trained
        return print(dry_run(train, overrides))
    cli.check_ranges(train, TRAIN_RANGES)
    try:
        train, cfg, resumed = settings(train, given, overrides)
    except ValueError as e:
        cli.fail(e)
    made = cli.new_folders(train.out)                      # a run that fails before its first checkpoint
    try:                                                   # leaves no empty --out behind
        with cli.parts_written("train.py"):
            run_training(train, cfg, resumed, overrides)
    except BaseException:
        cli.remove_if_empty(made)
        raise


def run_training(train, cfg, resumed, overrides):
    """The run, once its settings are checked: data, models, the loop, checkpoints, log and pictures."""
    if train.steps == 0 and not is_wan(train.preset):     # only the Wan presets have something to prepare
        cli.fail(f"--steps 0 trains nothing (the {train.preset} preset has no cache to build first): pass the step to "
                 f"stop at, e.g. --steps {Train.steps}")
    run = Run(train, cfg, resumed, overrides)
    say = run.say
    say(f"device {run.device}; preset {train.preset}; overrides {overrides or 'none'}" + run.split_note)
    if train.steps == 0:                                   # e.g. build the Wan cache once, before a torchrun
        say("--steps 0: the video cache is built (see above); nothing trained and --out left alone. Pass --steps N "
            "to train")
        return run.close()
    say(f"DiT {run.size('dit')}M parameters" + ("" if run.real_wan else f", caption encoder {run.size('text_encoder')}M"))
    if resumed:
        say(f"resumed from {resumed[0]} at step {run.start} ({resumed[1]['stage']})")
    log = LossLog(run.out, speak=run.rank == 0)
    bar = cli.progress(range(run.start, train.steps), initial=run.start, total=train.steps, desc="train",
                       dynamic_ncols=True, disable=run.rank != 0)
    stopping, t0 = False, time.time()
    with cli.stop_requests() as stop:                      # Ctrl-C: finish the step, save, exit
        for step in bar:
            mode, losses, chunk_loss, chunk_t, fault = train_step(run, step)
            if fault:
                report = (f"{fault} at step {step + 1} ({mode}); per-chunk losses "
                          f"{[round(x, 4) for x in chunk_loss.mean(0).tolist()]}; last good checkpoint: "
                          f"{run.last_ckpt or 'none'}")
                if train.on_nan == "stop":
                    cli.fail(f"{report}. Resume from it with a lower --lr, or pass --on_nan skip")
                if run.rank == 0:
                    tqdm.write(f"warning: skipped the update: {report}")
            else:
                log.add(chunk_t, chunk_loss)
            bar.set_postfix(loss=f"{losses.mean().item():.4f}", stage="TF" if mode == "none" else "RF")
            if (step + 1) % train.log_every == 0 or step + 1 == train.steps:
                log.row(step + 1, mode, time.time() - t0)
            stopping = cli.any_process(stop["stop"], run.world, run.device)
            if run.rank == 0 and ((step + 1) % train.ckpt_every == 0 or step + 1 == train.steps or stopping):
                run.save(step + 1)
                log.write()
            if stopping:
                break
    bar.close()
    run.close()
    if stopping:
        hint = ("rerun the same torchrun command with --resume" if run.world > 1 else
                f"go on with python train.py --out {run.out} --resume")
        raise cli.Stopped(f"stopped at step {step + 1}, saved in {run.last_ckpt}: {hint}" if run.rank == 0 else 1)
    if run.rank == 0 and run.last_ckpt is not None:
        finish(run)


def dry_run(train, overrides):
    """--dry_run: Wan's memory estimate and key layouts; for the toy, the model and sequence it would train."""
    cfg = rf.preset(train.preset, **overrides)
    if is_wan(train.preset):
        try:
            return wan.wan_memory_report(cfg)
        except ValueError as e:
            cli.fail(e)
    fpc, (H, W) = cfg.frames_per_chunk, cfg.frame_size
    if train.clip_frames % fpc:
        cli.fail(f"--clip_frames {train.clip_frames} is not a multiple of frames_per_chunk {fpc}")
    with torch.device("meta"):
        model = rf.DiT(cfg)
    S = model.tokens_per_frame(H, W)
    return (f"{train.preset}: DiT {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters (built on the "
            f"meta device, nothing allocated); {train.clip_frames}-frame clips of {H}x{W} in chunks of {fpc}: "
            f"{S} tokens per frame, a training sequence [history ; noisy] of (2 x {train.clip_frames} - {fpc}) x "
            f"{S} = {(2 * train.clip_frames - fpc) * S} tokens; batch {train.batch_size}. Nothing trained or written")


def settings(train, given, overrides):
    """-> (the run's Train, its rf.Config, (checkpoint path, meta, tensors) or None), checked before anything is
    created. A ValueError (one line) for a setting that cannot work."""
    if not train.resume:
        return train, rf.preset(train.preset, **overrides), None
    out = Path(train.out) if "out" in given or train.resume == "latest" else Path(train.resume).parent
    if train.resume == "latest":
        path, meta, tensors = checkpoints.load_newest(out)
    else:
        path, (meta, tensors) = Path(train.resume), checkpoints.load_checkpoint(train.resume)
    # a later stage may switch history routing on (the paper's last stage: top_k 5) or change the degradation
    cfg = checkpoints.checkpoint_config(meta["config"], overrides, checkpoints.STAGE_FIELDS, "--resume")
    # the saved run settings, except those given now (--steps to go further; a new stage may change --data,
    # --clip_frames, --lr, ...; the resumed run is then no longer the uninterrupted one, by choice)
    known = {f.name for f in dataclasses.fields(Train)} - {"resume"}       # a field an older version had: ignored
    saved = {k: v for k, v in checkpoints.local_paths(meta["train"]).items() if k in known}
    train = Train(**{**saved, **given, "out": str(out)})
    cli.check_ranges(train, TRAIN_RANGES)
    if train.steps <= meta["step"]:
        raise ValueError(f"{path} is at step {meta['step']}, and --steps is the step to stop at (not the number of "
                         f"steps to add), so --steps {train.steps} has nothing left to train: pass --steps greater "
                         f"than {meta['step']} (e.g. --steps {meta['step'] + train.ckpt_every} for "
                         f"{train.ckpt_every} more)")
    return train, cfg, (path, meta, tensors)


class Run:
    """Everything a run holds: settings, processes and device, data, models and their EMAs, optimizer, generator."""

    def __init__(self, train, cfg, resumed, overrides):
        self.train, self.cfg, self.out = train, cfg, Path(train.out)
        self.rank, self.world, self.device = cli.start_processes(train.device)
        self.say, self.real_wan = cli.say_from(self.rank), is_wan(train.preset)
        A, B = train.grad_accum, train.batch_size
        if B % (self.world * A):
            cli.fail(f"--batch_size {B} does not split into {self.world} process(es) x --grad_accum {A} equal "
                     f"micro-batches: use a multiple of {self.world * A}")
        # NOTE(choice): --batch_size is the whole batch of an optimizer step, not a per-GPU batch: the processes and
        # the micro-batches split it, so the same options train the same model on 1 GPU or 8 (tests/test_ddp.py).
        self.micro_batch = B // (self.world * A)                     # clips per micro-batch in each process
        self.mine = slice(self.rank * A * self.micro_batch, (self.rank + 1) * A * self.micro_batch)
        self.split_note = (f"; {self.world} process(es) x {A} micro-batch(es) of {self.micro_batch} clips per step"
                           if self.world * A > 1 else "")
        try:                                               # the data is checked before anything is written
            self.data = (clips.wan_clips(train, cfg, self.device, self.rank, self.world) if self.real_wan else
                         clips.Clips(train.data, train.clip_frames, cfg.frame_size, cfg.text_len, train.seed,
                                     train.on_bad_clip, preset=train.preset))
            if not resumed and checkpoints.saved_steps(self.out):
                raise ValueError(f"{self.out} already holds a run: pass --resume to continue it or --out to start "
                                 f"a new one")
            if train.steps:                                # --steps 0 (Wan: build the cache) writes no run folder
                check_writable(self.out)
                self.build(resumed, overrides)
        except (OSError, ValueError) as e:
            cli.fail(str(e).splitlines()[0])

    def build(self, resumed, overrides):
        train, cfg, device = self.train, self.cfg, self.device
        torch.manual_seed(train.seed)
        if self.real_wan and not resumed:                  # fp32 master weights, trained under bf16 autocast
            dit = wan.load_wan(train.wan, torch.float32, device, train.preset, **overrides)
        else:
            dit = rf.DiT(cfg).to(device)
        self.models = {"dit": dit}
        if not self.real_wan:                              # the toy learns its caption encoder; Wan's umT5 is frozen
            self.models["text_encoder"] = CaptionEncoder(len(shapes.VOCAB), cfg.text_dim, cfg.text_len).to(device)
        # the EMA starts as a copy of each model (on --resume both are then overwritten from the checkpoint)
        self.emas = {name: copy.deepcopy(m).requires_grad_(False).eval() for name, m in self.models.items()}
        self.params = [p for m in self.models.values() for p in m.parameters()]
        self.opt = torch.optim.AdamW(self.params, lr=train.lr, weight_decay=train.weight_decay)
        self.gen = torch.Generator().manual_seed(train.seed)
        self.start, self.last_ckpt = 0, None
        if resumed:
            self.last_ckpt, meta, tensors = resumed
            for name, m in self.models.items():
                checkpoints.load_state_strict(m, tensors[name], f"checkpoint {name}")
                checkpoints.load_state_strict(self.emas[name], tensors[f"{name}_ema"], f"checkpoint {name}_ema")
            state = dict(tensors["train_state"])
            self.gen.set_state(state.pop("rng"))
            checkpoints.load_optimizer(self.opt, state, meta["param_groups"])
            for group in self.opt.param_groups:            # a new stage may give a new --lr / --weight_decay
                group["lr"], group["weight_decay"] = train.lr, train.weight_decay
            self.start = meta["step"]
        dit.grad_checkpointing = train.grad_checkpointing
        if train.compile:                                  # after the EMA copies and the loads: only the trained model
            # NOTE(choice): static shapes, so a resumed run compiles what a straight one does (docs/method.md,
            # "Compiled training uses static shapes").
            fast_attn.compile_blocks(dit, dynamic=False)
        # under torchrun each trained model is wrapped in DDP (which also makes every process start from rank 0's
        # weights)
        self.wrapped = {name: cli.DDP(m, device_ids=[device.index] if device.type == "cuda" else None)
                        if self.world > 1 else m for name, m in self.models.items()}

    def size(self, name):
        return f"{sum(p.numel() for p in self.models[name].parameters()) / 1e6:.2f}"

    def save(self, step):
        train, cfg = self.train, self.cfg
        tensors = {name: m.state_dict() for name, m in self.models.items()}
        tensors |= {f"{name}_ema": m.state_dict() for name, m in self.emas.items()}
        opt_tensors, param_groups = checkpoints.optimizer_tensors(self.opt)
        tensors["train_state"] = opt_tensors | {"rng": self.gen.get_state()}
        last = history_mode(self, step - 1)                                      # of the last step taken
        stage = {"none": "teacher_forcing", "noise": "noise_augmentation"}.get(last, "resampling_forcing")
        options = checkpoints.portable_paths(dataclasses.asdict(train))     # paths relative to the repository
        meta = dict(config=checkpoints.config_to_dict(cfg), train=options, step=step, stage=stage,
                    vocab=shapes.VOCAB, param_groups=param_groups)
        try:
            self.last_ckpt = checkpoints.save_step(self.out, step, tensors, meta, train.keep_last)
        except OSError as e:
            cli.fail(f"could not write the step {step} checkpoint in {self.out} ({e.strerror or e}); the last "
                     f"complete one is {self.last_ckpt or 'none'}: free disk space and --resume")

    def close(self):
        if self.world > 1:
            torch.distributed.barrier()          # no process leaves while rank 0 is still writing a checkpoint
            torch.distributed.destroy_process_group()


class LossLog:
    """The loss per noise-level bucket since the last log line; rows go to OUT/log.jsonl with each checkpoint, so
    the log and the checkpoints agree: a run killed between two resumes from the last one and logs the lost steps
    once, not twice."""

    def __init__(self, out, speak):
        self.out, self.speak, self.rows = Path(out), speak, []
        self.sums, self.counts = torch.zeros(len(T_BUCKETS) - 1), torch.zeros(len(T_BUCKETS) - 1)

    def add(self, chunk_t, chunk_loss):
        bucket = torch.bucketize(chunk_t.flatten().cpu(), torch.tensor(T_BUCKETS[1:-1]))
        self.sums.index_add_(0, bucket, chunk_loss.flatten().float().cpu())
        self.counts.index_add_(0, bucket, torch.ones_like(bucket, dtype=torch.float))

    def row(self, step, mode, seconds):
        means = [s / c if c else None for s, c in zip(self.sums.tolist(), self.counts.tolist())]  # None: no chunk
        self.rows.append((step, mode, means))
        buckets = " ".join(f"t<{hi:.2f}:" + (f"{m:.4f}" if m is not None else "  -   ")
                           for hi, m in zip(T_BUCKETS[1:], means))
        stage = "teacher forcing" if mode == "none" else "resampling " + mode
        total = self.sums.sum() / self.counts.sum().clamp(min=1)
        if self.speak:
            tqdm.write(f"step {step:6d} | {stage:<26} | loss {total:.4f} | {buckets} | {seconds:.0f}s")
        self.sums.zero_()
        self.counts.zero_()

    def write(self):
        with open(self.out / "log.jsonl", "a") as f:
            for step, mode, means in self.rows:
                f.write(json.dumps(dict(step=step, mode=mode, bucket_loss=means)) + "\n")
        self.rows.clear()


def check_writable(out):
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write_test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise ValueError(f"cannot write to --out {out} ({e.strerror}): choose a writable folder") from None
    if shutil.disk_usage(out).free < 200 * 2**20:
        raise ValueError(f"less than 200 MB free under {out}: free some space or choose another --out")


def finish(run):
    """The end of a run: the loss plot, where the checkpoint is, and samples drawn by sample.py."""
    rows = [json.loads(line) for line in open(run.out / "log.jsonl")]
    media.plot_losses(rows, run.out / "loss.png", run.train.warmup_steps, T_BUCKETS)
    latest = run.out / "latest"
    print(f"checkpoint: {latest} -> {run.last_ckpt.name}")
    if run.train.sample:
        extra = ["--prompt", run.data.captions[0], "--frames", str(run.train.clip_frames)] if run.real_wan else []
        sys.stdout.flush()
        subprocess.run([sys.executable, str(Path(__file__).with_name("sample.py")), "--ckpt", str(latest),
                        "--out", str(run.out / "samples"), *extra], check=False)


if __name__ == "__main__":
    main()
