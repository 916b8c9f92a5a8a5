"""
The GPU check: one command that runs the first time on a bare CUDA machine, and a report of what it saw.

    python benchmarks/gpu.py --out gpu_report          # one H100 (docs/performance.md): report.md, report.json
    python benchmarks/gpu.py --tiny --out /tmp/gpu     # every section at toy sizes on the CPU (tests/ runs this)

Sections, each standing alone (a failure prints FAIL with the error and where, and the next section runs):
  d  environment: GPU, driver, torch, CUDA, package versions (run first, so a report always says where it ran)
  a  CUDA correctness in fp32 and bf16: flex against dense-mask SDPA (block-causal and two-stream forwards, the
     gradients of a Resampling Forcing loss), cached against uncached generate, routed attention (flex mask,
     two_branch, varlen, flash) against the dense-mask reference
  b  the toy on the GPU: training steps/s, teacher forcing and Resampling Forcing, eager, with compiled blocks and
     with compiled blocks replayed as CUDA graphs, and what experiments/evidence.py --scale gpu would take
  c  Wan2.1-1.3B with random weights at 480x832 in bf16: the forward of 21 latent frames (ours; diffusers' when it
     imports; TFLOP/s against the counted FLOPs), one Resampling Forcing step at 81 frames (time, peak memory),
     chunk-by-chunk sampling with CFG (seconds per chunk, dense and top-5 through the fastest routed backend there),
     routed attention at 20 history chunks (two_branch, flex with its mask built from the router's choice, varlen,
     flash), one Euler step of a 15 s video's last chunk, dense and top-5; the forward and dense sampling again
     with compiled blocks (fast_attn.compile_blocks), each checked against the eager result
On an H100 (PyTorch 2.11), sections d, a and b took 2.5 minutes, and d, b and c with --profile 7.8 minutes, before
the CUDA-graph, flex and 15 s checks were added: the whole script does not fit in 10 minutes. Pass --skip a b to run section c alone when time is short; --profile
adds profiles.txt.
No downloads; PyTorch 2.9 or later (what is newer, like torch's varlen_attn, is looked up and skipped if absent).
In --tiny mode, what needs CUDA runs on what the CPU has (flex eager and forward only; varlen through a plain
PyTorch stand-in of the kernel) and the report says what was skipped.
"""

import argparse
import ast
import importlib.metadata
import json
import platform
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))       # the project's wan.py, not benchmarks/wan.py

# Tolerances (relative Frobenius error against the reference). fp32: flex's Triton kernels may use TF32 dots, so
# 1e-3 rather than rounding level; bf16: a bf16 model's two attention kernels differ by bf16 rounding (2^-8) summed
# over layers; Wan's 30 layers at 32k tokens in bf16 against diffusers, a looser 5e-2.
TOL = {"fp32": 1e-3, "bf16": 3e-2, "wan_bf16": 5e-2}
TARGETS = {
    "wan_forward": "ours / diffusers <= 1.05x (stretch goal 0.9x)",
    "rf_step_memory": "fits in 80 GB",
    "video_5s": "5 s 480x832 video (7 chunks of 3 latent frames, 32 Euler steps, CFG) <= 40 s; FLOPs alone ~16 s",
    "top5": "top-5 routed attention at 20 history chunks <= 0.4x dense",
    "chunk32": "chunk 32 against chunk 4 with routing <= 1.3x",
    "video_15s": "a 15 s video (21 chunks) with top-5 faster than dense: per Euler step of its last chunk < 1x",
}
TINY_WAN = dict(dim=64, ffn_dim=128, num_heads=2, num_layers=2, text_len=32, text_dim=64, frame_size=(8, 8))


# ----------------------------------------------------------------------------------------------------------------
# The report: checks printed as they come, both files rewritten after every section (a killed run keeps its report)
# ----------------------------------------------------------------------------------------------------------------

class Report:
    def __init__(self, out: Path, tiny: bool, profile: bool = False):
        self.out, self.tiny, self.sections, self.current = out, tiny, [], None
        self.profile = profile
        out.mkdir(parents=True, exist_ok=True)
        (out / "profiles.txt").unlink(missing_ok=True)

    def profiled(self, name, fn, device):
        """With --profile: one more call of fn under torch.profiler, its busiest kernels appended to profiles.txt
        (where the time goes when a number misses its target)."""
        if not self.profile:
            return
        activities = [torch.profiler.ProfilerActivity.CPU]
        if device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        sync(device)
        t0 = time.perf_counter()
        with torch.profiler.profile(activities=activities) as prof:
            fn()
            sync(device)
        wall = time.perf_counter() - t0
        events = prof.key_averages()
        key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
        busy = sum(getattr(e, key) for e in events) / 1e3
        launches = sum(e.count for e in events if e.key == "cudaLaunchKernel")
        with open(self.out / "profiles.txt", "a") as f:
            f.write(f"\n##### {name}: {wall * 1e3:.1f} ms wall under the profiler, {busy:.1f} ms "
                    f"{'GPU' if device.type == 'cuda' else 'CPU'} busy, {launches} kernel launches\n")
            f.write(events.table(sort_by=key, row_limit=15, max_name_column_width=70) + "\n")

    def section(self, key, title, fn, *args):
        """Run fn(self, *args) as one section; any exception ends it with FAIL (one line + where)."""
        self.current = {"key": key, "title": title, "checks": [], "status": "PASS"}
        self.sections.append(self.current)
        print(f"\n== {key}. {title}", flush=True)
        t0 = time.perf_counter()
        try:
            fn(self, *args)
        except Exception as e:                                           # noqa: BLE001 -- the section's verdict
            self.check("section", "FAIL", error=one_line(e))
        finally:
            self.current["seconds"] = round(time.perf_counter() - t0, 1)
            if any(c["status"] == "FAIL" for c in self.current["checks"]):
                self.current["status"] = "FAIL"
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            self.write()

    def check(self, name, status, target=None, note=None, error=None, **numbers):
        """One line: PASS / FAIL / SKIP, the numbers, the target beside them."""
        numbers = {k: (float(f"{v:.4g}") if isinstance(v, float) else v) for k, v in numbers.items()}
        entry = {"name": name, "status": status, "numbers": numbers, "target": target, "note": note, "error": error}
        self.current["checks"].append(entry)
        print(f"  {status:4}  {format_entry(entry)}", flush=True)
        return status == "PASS"

    def compare(self, name, got, want, tol, **extra):
        err = rel_err(got, want)
        finite = bool(torch.isfinite(got).all())
        return self.check(name, "PASS" if err <= tol and finite else "FAIL", rel_err=err, tol=tol, **extra)

    def write(self):
        (self.out / "report.json").write_text(json.dumps({"tiny": self.tiny, "sections": self.sections}, indent=1))
        lines = ["# GPU check" + (" (--tiny: toy sizes on the CPU; says nothing about GPUs)" if self.tiny else ""), ""]
        for s in self.sections:
            lines += [f"## {s['key']}. {s['title']}: {s['status']} ({s.get('seconds', '?')} s)", "",
                      "| check | status | numbers | target |", "|---|---|---|---|"]
            for c in s["checks"]:
                nums = "; ".join(f"{k} = {fmt(v)}" for k, v in c["numbers"].items())
                extra = " ".join(x for x in (c["note"], c["error"]) if x)
                lines.append(f"| {c['name']} | {c['status']} | {nums}{' — ' + extra if extra else ''} | "
                             f"{c['target'] or ''} |")
            lines.append("")
        (self.out / "report.md").write_text("\n".join(lines))


def fmt(v):
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def format_entry(c):
    parts = [c["name"]] + [f"{k}={fmt(v)}" for k, v in c["numbers"].items()]
    parts += [f"[target: {c['target']}]"] if c["target"] else []
    parts += [f"({c['note']})"] if c["note"] else []
    parts += [c["error"]] if c["error"] else []
    return "  ".join(parts)


def one_line(e):
    """The error in one line, and where: the innermost frame in this project's files."""
    frames = [f for f in traceback.extract_tb(e.__traceback__) if str(ROOT) in f.filename] or \
        traceback.extract_tb(e.__traceback__)
    where = f" at {Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else ""
    msg = " ".join(str(e).split())[:300]
    return f"{type(e).__name__}: {msg}{where}"


def rel_err(a, b):
    a, b = a.detach().float(), b.detach().float()
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeats):
    """Median seconds of fn over repeats (after one warm-up call: compilation, the allocator)."""
    fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def peak_gib(device):
    return torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")


# ----------------------------------------------------------------------------------------------------------------
# d. Environment
# ----------------------------------------------------------------------------------------------------------------

def environment(rep, device):
    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": str(torch.version.cuda),
            "cudnn": str(torch.backends.cudnn.version()), "device": str(device)}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update(gpu=p.name, gpu_memory_gib=round(p.total_memory / 2**30, 1), capability=f"{p.major}.{p.minor}")
        try:
            info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                            capture_output=True, text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.SubprocessError) as e:
            info["driver"] = f"unknown ({one_line(e)})"
    else:
        info["cpu_threads"] = torch.get_num_threads()
    for pkg in ("diffusers", "transformers", "flash-attn", "einops", "numpy", "safetensors", "triton", "accelerate"):
        try:
            info[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            info[pkg] = "not installed"
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
        info["torch varlen_attn"] = "present"
    except ImportError:
        info["torch varlen_attn"] = "absent (PyTorch < 2.10)"
    rep.check("environment", "PASS", **info)
    if info["einops"] == "not installed":
        rep.check("einops", "FAIL", error="rf.py needs einops: bring it as a wheel (pip download einops --no-deps)")


# ----------------------------------------------------------------------------------------------------------------
# a. Correctness: flex and the routed kernels against the dense-mask SDPA reference
# ----------------------------------------------------------------------------------------------------------------

def toy_model(rf, device, tiny, **overrides):
    small = dict(num_layers=2, dim=64, ffn_dim=128, num_heads=2, text_len=6, text_dim=32) if tiny else {}
    torch.manual_seed(0)
    model = rf.DiT(rf.preset("toy", **{**small, **overrides})).to(device)
    with torch.no_grad():                               # Wan's init zeroes the head: outputs would be all zero
        model.head.head.weight.normal_(std=0.02)
    return model


def toy_inputs(cfg, B, frames, device, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, frames, cfg.in_dim, *cfg.frame_size, generator=g)
    t = torch.rand(B, frames // cfg.frames_per_chunk, generator=g).repeat_interleave(cfg.frames_per_chunk, 1)
    ctx = torch.randn(B, cfg.text_len, cfg.text_dim, generator=g)
    hist = torch.randn(B, frames, cfg.in_dim, *cfg.frame_size, generator=g)
    return [z.to(device) for z in (x, t, ctx, hist)]


def correctness(rep, device, tiny):
    import rf
    cuda = device.type == "cuda"
    for dtype in ("fp32", "bf16"):
        tol = TOL[dtype]
        autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bf16")
        model = toy_model(rf, device, tiny)
        x, t, ctx, hist = toy_inputs(model.cfg, 2, 8, device)
        outs = {}
        with torch.no_grad(), autocast:
            for backend in ("sdpa", "flex"):
                model.attn_backend = backend
                outs[backend] = model.forward_causal(x, t, ctx), model(x, t, ctx, history=hist)
        rep.compare(f"{dtype} block-causal forward, flex vs sdpa", outs["flex"][0], outs["sdpa"][0], tol)
        rep.compare(f"{dtype} two-stream forward, flex vs sdpa", outs["flex"][1], outs["sdpa"][1], tol)

        # gradients of one Resampling Forcing loss (autoregressive self-resampling included), the same draws
        grads = {}
        for backend in ("sdpa", "flex") if cuda else ("sdpa",):
            model.attn_backend = backend
            model.zero_grad()
            with autocast:
                loss, _, _ = rf.training_loss(model, x.clamp(-1, 1), ctx, mode="autoregressive",
                                              generator=torch.Generator().manual_seed(5))
            loss.backward()
            grads[backend] = torch.cat([p.grad.flatten() for p in model.parameters()])
        if cuda:
            rep.compare(f"{dtype} Resampling Forcing loss gradients, flex vs sdpa", grads["flex"], grads["sdpa"], tol)
        else:
            rep.check(f"{dtype} Resampling Forcing loss gradients, flex vs sdpa", "SKIP",
                      note="CPU: flex has no backward there; ran the SDPA loss and backward only",
                      grad_norm=grads["sdpa"].norm().item())

        model.attn_backend = "auto"
        neg = torch.zeros_like(ctx[:1])
        with autocast:
            videos = [rf.generate(model, ctx[:1], 8, steps=2, cfg_scale=3.0, neg_context=neg, use_cache=c)
                      for c in (True, False)]
        rep.compare(f"{dtype} generate, cached vs uncached ({'flex' if cuda else 'sdpa'})", videos[0], videos[1], tol)
        routed_checks(rep, rf, device, dtype, tiny)


def stand_in_varlen(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, **_):
    """torch's varlen_attn written plainly, for --tiny on a CPU: per sequence, softmax attention and its LSE
    (H, total_q), the LSE detached as the kernel's is. (tests/test_varlen.py checks the packing with the same.)"""
    outs, lses = [], []
    bounds = zip(cu_seq_q[:-1].tolist(), cu_seq_q[1:].tolist(), cu_seq_k[:-1].tolist(), cu_seq_k[1:].tolist())
    for a, b, c, d in bounds:
        q, k, v = (z.transpose(0, 1).float() for z in (query[a:b], key[c:d], value[c:d]))   # (H, L, hd)
        s = q @ k.transpose(-1, -2) * query.shape[-1] ** -0.5
        lses.append(s.logsumexp(-1))
        outs.append((s.softmax(-1) @ v).transpose(0, 1).to(query.dtype))
    return torch.cat(outs), torch.cat(lses, 1).detach()


def routed_case(device, tiny, seed=3):
    """q, k, v over the two-stream layout with Nh history chunks, and a top-2 selection from the router."""
    import rf
    # GPU: Wan's head width, shorter chunks and fewer heads, so that the dense (B, nh, L, L) reference mask fits
    B, nh, hd, T, Nh = (2, 2, 16, 8, 4) if tiny else (2, 4, 128, 256, 6)
    g = torch.Generator().manual_seed(seed)
    chunk = torch.cat([torch.arange(Nh), torch.arange(Nh + 1)]).repeat_interleave(T).to(device)
    stream = torch.tensor([rf.HISTORY] * Nh + [rf.NOISY] * (Nh + 1)).repeat_interleave(T).to(device)
    Lq = Lk = len(chunk)
    q = torch.randn(B, Lq, nh, hd, generator=g).to(device)
    k, v = (torch.randn(B, Lk, nh, hd, generator=g).to(device) for _ in range(2))
    selected = rf.route(q, rf.chunk_means(k[:, :Nh * T], T), rf.eligible_chunks(chunk, Nh), top_k=2)
    return q, k, v, selected, T, chunk, stream


def routed_checks(rep, rf, device, dtype, tiny):
    import fast_attn
    cuda = device.type == "cuda"
    tol = TOL[dtype]
    q, k, v, selected, T, chunk, stream = routed_case(device, tiny)
    if dtype == "bf16":
        q, k, v = (z.bfloat16() for z in (q, k, v))
    q, k, v = (z.requires_grad_() for z in (q, k, v))

    def run(fn):
        o = fn()
        return (o, *torch.autograd.grad(o.float().square().sum(), (q, k, v)))

    ref = run(lambda: rf.attention(q, k, v, rf.routed_mask(selected, chunk, stream)))
    paths = {"two_branch": lambda: rf.two_branch_attention(q, k, v, selected, T, fast_attn.two_branches)}
    notes = {}
    for name in ("varlen", "flash"):
        try:
            branches = fast_attn.varlen_backend(name)
        except RuntimeError as e:
            rep.check(f"{dtype} routed attention, {name} vs reference", "SKIP", note=one_line(e))
            continue
        if not cuda:            # the same packing and merge, through a stand-in (the real kernel needs CUDA)
            if name == "flash":
                continue
            branches = lambda *a: fast_attn.varlen_branches(*a, fast_attn.torch_varlen(stand_in_varlen))  # noqa: E731
            notes[name] = "CPU: plain PyTorch stand-in for the kernel"
        elif dtype == "fp32":
            rep.check(f"{dtype} routed attention, {name} vs reference", "SKIP",
                      note="the flash kernels take fp16/bf16 only; checked in bf16")
            continue
        paths[name] = lambda b=branches: rf.two_branch_attention(q, k, v, selected, T, b)
    for name, fn in paths.items():
        got = run(fn)
        errs = {f"rel_err_{n}": rel_err(a, b) for n, a, b in zip(("o", "dq", "dk", "dv"), got, ref)}
        ok = max(errs.values()) <= tol and all(torch.isfinite(z).all() for z in got)
        rep.check(f"{dtype} routed attention, {name} vs reference (values, gradients)", "PASS" if ok else "FAIL",
                  note=notes.get(name), tol=tol, **errs)
    mask = fast_attn.flex_routed_mask(rf.may_attend_routed, selected, chunk, stream)      # from the router's choice
    if cuda:
        got = run(lambda: rf.attention(q, k, v, mask))
        errs = {f"rel_err_{n}": rel_err(a, b) for n, a, b in zip(("o", "dq", "dk", "dv"), got, ref)}
        rep.check(f"{dtype} routed attention, flex mask vs reference (values, gradients)",
                  "PASS" if max(errs.values()) <= tol else "FAIL", tol=tol, **errs)
    else:                                                              # flex has no backward on a CPU
        with torch.no_grad():
            rep.compare(f"{dtype} routed attention, flex mask vs reference (forward)",
                        rf.attention(*(z.detach() for z in (q, k, v)), mask), ref[0], tol)


# ----------------------------------------------------------------------------------------------------------------
# b. The toy on the GPU
# ----------------------------------------------------------------------------------------------------------------

def evidence_scale(name):
    """experiments/evidence.py's SCALES[name], read from the source (importing it would import train.py)."""
    tree = ast.parse((ROOT / "experiments" / "evidence.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "SCALES":
            for key, value in zip(node.value.keys, node.value.values):
                if key.value == name:
                    return {kw.arg: ast.literal_eval(kw.value) for kw in value.keywords}
    raise KeyError(f"no SCALES[{name!r}] in experiments/evidence.py")


def compile_options(tiny):
    """torch.compile options for fast_attn.compile_blocks: inductor on the GPU; dynamo's tracing alone (no C compiler,
    seconds not minutes) when --tiny checks the script on a CPU."""
    return {"backend": "eager"} if tiny else {}


def toy(rep, device, tiny):
    import fast_attn
    import rf
    gpu = evidence_scale("gpu")
    batches = (2, 4) if tiny else (8, gpu["batch_size"], 64)
    repeats = 2 if tiny else 10
    from core import training_step
    model = toy_model(rf, device, tiny)
    rate = {}
    for B in batches:
        x, _, ctx, _ = toy_inputs(model.cfg, B, 8, device)              # evidence.py's TRAIN_FRAMES = 8
        step = training_step(model, x.clamp(-1, 1), ctx, device)
        for mode in ("none", "autoregressive"):
            rate[B, mode] = 1 / timed(lambda: step(mode), device, repeats)
            if B == batches[0]:
                rep.profiled(f"toy training step, degrade {mode}, batch {B}", lambda: step(mode), device)
        rep.check(f"training steps/s at batch {B}", "PASS", teacher_forcing=rate[B, "none"],
                  resampling_forcing=rate[B, "autoregressive"],
                  ratio_rf_over_tf=rate[B, "none"] / rate[B, "autoregressive"])
    # the same steps with every block compiled as train.py --compile does (static shapes), then on CUDA also with
    # CUDA graphs (mode reduce-overhead: each compiled piece replayed as one graph, no per-kernel launches): first
    # one Resampling Forcing loss and its gradients against the eager model's (the self-resampling rollout goes
    # through the KV cache), then the speed
    B = batches[1]
    variants = [("compiled blocks", {})]
    if device.type == "cuda":
        variants.append(("compiled blocks, CUDA graphs", {"mode": "reduce-overhead"}))
    for label, options in variants:
        eager, compiled = toy_model(rf, device, tiny), toy_model(rf, device, tiny)
        torch._dynamo.reset()
        fast_attn.compile_blocks(compiled, dynamic=False, **{**compile_options(tiny), **options})
        x, _, ctx, _ = toy_inputs(compiled.cfg, B, 8, device)
        grads = []
        for model in (eager, compiled):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                loss, _, _ = rf.training_loss(model, x.clamp(-1, 1), ctx, "autoregressive",
                                              generator=torch.Generator().manual_seed(0))
            loss.backward()
            grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
            model.zero_grad(set_to_none=True)
        rep.compare(f"{label} vs eager: gradients of a Resampling Forcing loss", grads[1], grads[0],
                    TOL["bf16"] if device.type == "cuda" else TOL["fp32"])
        del eager
        step = training_step(compiled, x.clamp(-1, 1), ctx, device)
        fast = {mode: 1 / timed(lambda: step(mode), device, repeats) for mode in ("none", "autoregressive")}
        rep.check(f"training steps/s at batch {B}, {label}", "PASS", teacher_forcing=fast["none"],
                  resampling_forcing=fast["autoregressive"], speedup_tf=fast["none"] / rate[B, "none"],
                  speedup_rf=fast["autoregressive"] / rate[B, "autoregressive"],
                  ratio_rf_over_tf=fast["none"] / fast["autoregressive"])
    # evidence --scale gpu: a teacher-forcing warm-up, then per method the rest of the steps; 2 of its methods
    # (tf, noise) cost a teacher-forcing step, the other 6 (parallel, the autoregressive ones) at most an RF step
    B = gpu["batch_size"] if gpu["batch_size"] in batches else batches[-1]
    rest = gpu["steps"] - gpu["warmup_steps"]
    seconds = gpu["warmup_steps"] / rate[B, "none"] + rest * (2 / rate[B, "none"] + 6 / rate[B, "autoregressive"])
    rep.check("evidence --scale gpu training time (estimate)", "PASS", hours=seconds / 3600, batch=B,
              note=f"{gpu['steps']} steps, warm-up {gpu['warmup_steps']}, 8 methods; training only, not evaluation"
              + ("; tiny: CPU toy numbers, not a GPU estimate" if tiny else ""))


# ----------------------------------------------------------------------------------------------------------------
# c. Wan2.1-1.3B, random weights, 480x832
# ----------------------------------------------------------------------------------------------------------------

def wan_flops(cfg, L, Lt, causal_keys=None):
    """FLOPs of one DiT forward over L tokens (2 per multiply-add), from the matmuls; Lt text tokens (text_len);
    causal_keys: the keys each query sees on average, L for the bidirectional forward. Per layer:
        self-attention  q, k, v, o projections 4 * 2 L D^2; scores and weighted sum 2 * 2 L Lk D
        cross-attention q, o projections 2 * 2 L D^2; k, v of the text 2 * 2 Lt D^2; 2 * 2 L Lt D
        feed-forward    2 * 2 L D ffn
    plus the patch embedding and the head, 2 L D (C ph pw) each. Norms, RoPE, modulation: elementwise, left out."""
    D, Lk = cfg.dim, causal_keys or L
    patch = cfg.in_dim * cfg.patch_size[1] * cfg.patch_size[2]
    layer = 8 * L * D * D + 4 * L * Lk * D + 4 * L * D * D + 4 * Lt * D * D + 4 * L * Lt * D + 4 * L * D * cfg.ffn_dim
    return cfg.num_layers * layer + 2 * L * D * patch * 2


def load_benchmark_helpers():
    """benchmarks/wan.py's helpers (parameter dtypes as the two loaders leave them), imported by path: the name
    `wan` belongs to the project's wan.py."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("wan_benchmark", ROOT / "benchmarks" / "wan.py")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(1, str(ROOT / "benchmarks"))                         # its `from core import clock`
    spec.loader.exec_module(module)
    return module


def wan_model(rep, device, tiny):
    import fast_attn
    import rf
    import wan
    helpers = load_benchmark_helpers()
    from core import training_step             # benchmarks/, on sys.path from load_benchmark_helpers
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    frames, repeats = (6, 1) if tiny else (21, 3)
    cfg = rf.preset("wan2.1-t2v-1.3b", **(TINY_WAN if tiny else {}))
    H, W = cfg.frame_size
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, frames, cfg.in_dim, H, W, generator=g).to(device)
    context = torch.randn(1, cfg.text_len, cfg.text_dim, generator=g).to(device)
    context[:, cfg.text_len // 8:] = 0
    t = torch.full((1, frames), 0.5, device=device)
    S = (H // 2) * (W // 2)
    L = frames * S
    rep.check("setup", "PASS", preset="wan2.1-t2v-1.3b" + (" (tiny)" if tiny else ""), frames=frames,
              size=f"{H * 8}x{W * 8}", tokens=L, dtype=str(dtype).removeprefix("torch."))

    # c1. the forward: ours (one chunk: bidirectional like Wan; and block-causal), diffusers' when it imports
    with torch.device(device):
        ours = rf.DiT(cfg).eval()
    torch.nn.init.normal_(ours.head.head.weight, std=0.02)
    bidir = rf.Config(**{**vars(cfg), "frames_per_chunk": frames})
    ctx = context.to(dtype)

    @torch.no_grad()
    def run_ours(model_cfg):
        ours.cfg = model_cfg
        with autocast:
            return ours.forward_causal(x.to(dtype), t, ctx)

    ref = why = None
    try:
        from diffusers import WanTransformer3DModel
    except ImportError as e:
        why = one_line(e)
    else:               # diffusers' model with our random weights, through wan.py's key rename: the same function
        with torch.device(device):
            ref = WanTransformer3DModel(**wan.diffusers_wan_config(cfg)).eval()
        ref.load_state_dict({wan.wan_to_diffusers_key(k): v for k, v in ours.state_dict().items()})
        helpers.diffusers_like_from_pretrained(ref, dtype)
    helpers.bf16_like_load_wan(ours, dtype)

    flops = wan_flops(cfg, L, cfg.text_len)
    causal_keys = (frames // cfg.frames_per_chunk + 1) / 2 * cfg.frames_per_chunk * S   # chunk i sees i + 1 chunks
    fns = {"ours": lambda: run_ours(bidir), "ours_block_causal": lambda: run_ours(cfg)}
    if ref is not None:
        @torch.no_grad()
        def run_ref():
            return ref(hidden_states=x.to(dtype).permute(0, 2, 1, 3, 4), timestep=1000 * t[:, 0],
                       encoder_hidden_states=ctx, return_dict=False)[0]
        fns["diffusers"] = run_ref
    secs = {name: timed(fn, device, repeats) for name, fn in fns.items()}
    for name, fn in fns.items():
        rep.profiled(f"Wan forward, {name}", fn, device)
    eager = run_ours(bidir).float()
    fast_attn.compile_blocks(ours, **compile_options(tiny))                   # from here on, ours is compiled
    secs["ours_compiled"] = timed(lambda: run_ours(bidir), device, repeats)
    rep.profiled("Wan forward, ours_compiled", lambda: run_ours(bidir), device)
    rep.compare("forward, compiled blocks vs eager (ours)", run_ours(bidir).float(), eager,
                TOL["bf16"] if cuda else TOL["fp32"], ms=secs["ours_compiled"] * 1e3,
                speedup=secs["ours"] / secs["ours_compiled"])
    tflops = {name: f / secs[name] / 1e12 for name, f in
              (("ours", flops), ("ours_block_causal", wan_flops(cfg, L, cfg.text_len, causal_keys)))}
    rep.check("forward, ours (one chunk, bidirectional)", "PASS", ms=secs["ours"] * 1e3, tflop=flops / 1e12,
              tflops_per_s=tflops["ours"])
    rep.check(f"forward, ours block-causal ({'flex' if cuda else 'dense-mask SDPA'})", "PASS",
              ms=secs["ours_block_causal"] * 1e3, tflops_per_s=tflops["ours_block_causal"])
    if ref is None:
        rep.check("forward, against diffusers' WanTransformer3DModel", "SKIP", target=TARGETS["wan_forward"],
                  note=f"diffusers does not import ({why}); bring it as a wheel (docs/performance.md)")
    else:
        rep.compare("forward, outputs ours vs diffusers", eager, run_ref().float().permute(0, 2, 1, 3, 4),
                    TOL["wan_bf16"] if cuda else TOL["fp32"])
        for name in ("ours", "ours_compiled"):
            ratio = secs[name] / secs["diffusers"]
            rep.check(f"forward, time {name.replace('_', ' ')} / diffusers", "PASS" if ratio <= 1.05 or tiny
                      else "FAIL", target=TARGETS["wan_forward"], ratio=ratio, diffusers_ms=secs["diffusers"] * 1e3,
                      note="tiny: CPU time, no target" if tiny else None)
        del ref
    del ours
    if cuda:
        torch.cuda.empty_cache()

    # c2. one Resampling Forcing step: fp32 master weights, bf16 autocast, activation checkpointing, AdamW
    with torch.device(device):
        model = rf.DiT(cfg)
    model.grad_checkpointing = True
    step = training_step(model, x.clamp(-3, 3), context, device, lr=5e-5)

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    seconds = timed(step, device, 1)
    peak = peak_gib(device)
    fits = tiny or peak * 2**30 <= 80e9
    rep.check(f"Resampling Forcing step, batch 1 x {frames} latent frames ({frames * 4 - 3} video frames)",
              "PASS" if fits else "FAIL", target=TARGETS["rf_step_memory"], seconds=seconds, peak_gib=peak,
              note="tiny: no memory on a CPU" if not cuda else None)
    del model, step                              # step holds the optimizer
    if cuda:
        torch.cuda.empty_cache()

    # c3. chunk-by-chunk sampling with CFG, dense and top-5: seconds per chunk for chunks 1..7
    chunks, steps = (2, 2) if tiny else (7, 32)
    fpc = cfg.frames_per_chunk
    neg = torch.zeros_like(context)
    backends = routed_backends(rep, device)
    routed = backends[-1]                                # the fastest one here (H100: varlen 6x two_branch)
    videos = {}
    for label, over, compile_it in (("dense", {}, False), ("dense, compiled blocks", {}, True),
                                    (f"top-5 {routed}", {"top_k": 5}, False)):
        dense = not over
        model = seeded_wan(helpers, cfg, device, dtype, **over)     # the same weights each: videos compare
        model.attn_backend = "auto" if dense else routed
        if compile_it:
            fast_attn.compile_blocks(model, **compile_options(tiny))
        stamps = []

        def progress(i):
            sync(device)
            stamps.append(time.perf_counter())

        try:                                  # a failure here is this check's, and the attention timings still run
            with autocast:
                # warm-up at every length the timed run meets: compilation, the allocator
                rf.generate(model, context, (chunks + 1) * fpc, steps=1, neg_context=neg, seed=0)
                rep.profiled(f"sampling, {label}: chunk 1 (one Euler step, CFG) and its cache write",
                             lambda: rf.generate(model, context, 2 * fpc, steps=1, neg_context=neg, seed=0), device)
                sync(device)
                stamps.append(time.perf_counter())
                videos[label] = rf.generate(model, context, (chunks + 1) * fpc, steps=steps, neg_context=neg,
                                            seed=0, progress=progress).float()
        except Exception as e:                                           # noqa: BLE001 -- reported as FAIL
            rep.check(f"sampling, {label}", "FAIL", error=one_line(e))
            continue
        finally:
            del model
            if cuda:
                torch.cuda.empty_cache()
        per_chunk = [b - a for a, b in zip(stamps[:-1], stamps[1:])][:chunks]    # the last chunk skips a re-encode
        total = sum(per_chunk)
        ok = tiny or not dense or total <= 40
        rep.check(f"sampling, {label}, {steps} Euler steps, CFG: seconds per chunk 1..{chunks}",
                  "PASS" if ok else "FAIL", target=TARGETS["video_5s"] if dense else None,
                  per_chunk=" ".join(f"{s:.3f}" for s in per_chunk), total_s=total,
                  last_over_first=per_chunk[-1] / per_chunk[0])
    if {"dense", "dense, compiled blocks"} <= videos.keys():
        # a compiled sampler that lost track of its KV cache would still get the first chunk right: check the last
        a, b = videos["dense, compiled blocks"], videos["dense"]
        rep.compare("sampling, compiled blocks vs eager: the whole video", a, b, TOL["wan_bf16"],
                    first_chunk=rel_err(a[:, :fpc], b[:, :fpc]), last_chunk=rel_err(a[:, -fpc:], b[:, -fpc:]))

    routed_speed(rep, device, tiny, cfg, S, backends)
    long_video_step(rep, device, tiny, cfg, helpers, context, backends)


def seeded_wan(helpers, cfg, device, dtype, **overrides):
    """A Wan-sized DiT with seed-0 random weights, in dtype but for Wan's fp32 layers, for inference: every
    variant built this way has the same weights."""
    import rf
    torch.manual_seed(0)
    with torch.device(device):
        return helpers.bf16_like_load_wan(rf.DiT(rf.Config(**{**vars(cfg), **overrides})), dtype).eval()


def routed_backends(rep, device):
    """The routed attention backends that run here: two_branch, then on CUDA flex (its BlockMask built from the
    router's choice, fast_attn.flex_routed_mask) and the varlen kernels."""
    import fast_attn
    backends = ["two_branch"] + (["flex"] if device.type == "cuda" else [])
    for name in ("varlen", "flash") if device.type == "cuda" else ():
        try:
            fast_attn.varlen_backend(name)
            backends.append(name)
        except RuntimeError as e:
            rep.check(f"routed backend {name}", "SKIP", note=one_line(e))
    return backends


def routed_speed(rep, device, tiny, cfg, S, backends):
    """One layer's attention for one chunk of queries (the sampler's case, CFG batch 2) against Nh history chunks
    in the cache: dense SDPA against top-5 routing through each of `backends` (routed_backends)."""
    import rf
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    T = cfg.frames_per_chunk * S
    nh, hd = cfg.num_heads, cfg.dim // cfg.num_heads
    repeats = 1 if tiny else 5

    def time_attention(Nh, backend):
        g = torch.Generator().manual_seed(0)
        q = torch.randn(2, T, nh, hd, generator=g).to(device, dtype)
        k, v = (torch.randn(2, (Nh + 1) * T, nh, hd, generator=g).to(device, dtype) for _ in range(2))
        chunk = torch.arange(Nh + 1, device=device).repeat_interleave(T)
        routing = rf.Routing(chunk, torch.zeros_like(chunk), T, Nh, top_k=5, backend=backend)
        phi = rf.chunk_means(k[:, :Nh * T], T)
        fn = (lambda: rf.attention(q, k, v)) if backend == "dense" else \
            (lambda: rf.routed_attention(q, k, v, phi, routing))
        with torch.no_grad():
            seconds = timed(fn, device, repeats)
            if Nh == n20:
                rep.profiled(f"attention at {Nh} history chunks, {backend}", fn, device)
        return seconds

    n20, n31, n3, n6 = (3, 4, 1, 2) if tiny else (20, 31, 3, 6)
    dense, dense_5s = time_attention(n20, "dense"), time_attention(n6, "dense")
    for backend in backends:
        ratio_5s = time_attention(n6, backend) / dense_5s
        rep.check(f"attention, top-5 {backend} vs dense at {n6} history chunks (a 5 s video's last chunk)", "PASS",
                  ratio=ratio_5s, dense_ms=dense_5s * 1e3)
        top5 = time_attention(n20, backend)
        ratio = top5 / dense
        rep.check(f"attention, top-5 {backend} vs dense at {n20} history chunks (one layer, one chunk, CFG)",
                  "PASS" if tiny or ratio <= 0.4 else "FAIL", target=TARGETS["top5"], ratio=ratio,
                  dense_ms=dense * 1e3, top5_ms=top5 * 1e3)
        late, early = time_attention(n31, backend), time_attention(n3, backend)
        rep.check(f"attention, top-5 {backend}, chunk {n31 + 1} vs chunk {n3 + 1}", "PASS" if tiny or late / early
                  <= 1.3 else "FAIL", target=TARGETS["chunk32"], ratio=late / early,
                  note="attention only: the layer's other work is the same at every chunk, so the whole chunk's "
                       "ratio is lower")


def long_video_step(rep, device, tiny, cfg, helpers, context, backends):
    """A 15 s video's last chunk (chunk 21 after 20 in the cache): seconds per Euler step with CFG, the whole model,
    dense against top-5 through each routed backend. Per step, because the whole video does not fit the GPU's time:
    21 chunks x 32 steps of it (the cache's re-encodes aside) is the video."""
    import rf
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    history, repeats = (3, 1) if tiny else (20, 3)
    fpc, (H, W) = cfg.frames_per_chunk, cfg.frame_size
    text = torch.cat([context, torch.zeros_like(context)])                     # CFG: [cond ; uncond]
    seconds = {}
    for label, over, backend in (("dense", {}, "auto"), *((f"top-5 {b}", {"top_k": 5}, b) for b in backends)):
        model = seeded_wan(helpers, cfg, device, dtype, **over)
        model.attn_backend = backend
        g = torch.Generator().manual_seed(0)
        try:
            with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
                text_kv = model.encode_text(text)
                cache = rf.KVCache(model, (history + 1) * fpc, (H, W))
                zeros = torch.zeros(2, fpc, device=device)
                for _ in range(history):                     # finished chunks: random frames, re-encoded at t = 0
                    x = torch.randn(1, fpc, cfg.in_dim, H, W, generator=g).to(device).expand(2, -1, -1, -1, -1)
                    model.forward_chunk(x, zeros, text_kv, cache, commit=True)
                x = torch.randn(1, fpc, cfg.in_dim, H, W, generator=g).to(device).expand(2, -1, -1, -1, -1)
                seconds[label] = timed(lambda: model.forward_chunk(x, zeros + 0.5, text_kv, cache), device, repeats)
        except Exception as e:                                           # noqa: BLE001 -- reported as FAIL
            rep.check(f"15 s video, last chunk, {label}", "FAIL", error=one_line(e))
        finally:
            del model
            if cuda:
                torch.cuda.empty_cache()
    for label, s in seconds.items():
        if label != "dense" and "dense" in seconds:
            ratio = s / seconds["dense"]
            rep.check(f"15 s video, chunk {history + 1}: one Euler step with CFG, {label} vs dense", "PASS" if tiny
                      or ratio < 1 else "FAIL", target=TARGETS["video_15s"], ratio=ratio, dense_ms=seconds["dense"]
                      * 1e3, top5_ms=s * 1e3, note="tiny: CPU time, no target" if tiny else None)


# ----------------------------------------------------------------------------------------------------------------

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for report.md and report.json")
    p.add_argument("--tiny", action="store_true", help="every section at toy sizes on the CPU (checks the script)")
    p.add_argument("--skip", nargs="*", default=[], choices=["a", "b", "c", "d"], help="sections to leave out")
    p.add_argument("--profile", action="store_true",
                   help="also profile the timed calls (toy steps, Wan forwards, sampling, routed attention): "
                        "profiles.txt")
    args = p.parse_args(argv)
    if args.tiny:
        device = torch.device("cpu")
    elif torch.cuda.is_available():
        device = torch.device("cuda")
    else:
        p.error("no CUDA device: run on a GPU machine, or pass --tiny for the CPU check of the script")
    rep = Report(Path(args.out), args.tiny, args.profile)
    t0 = time.perf_counter()
    sections = [("d", "environment", environment, device), ("a", "correctness, fp32 and bf16", correctness,
                device, args.tiny), ("b", "the toy: training speed", toy, device, args.tiny),
                ("c", "Wan2.1-1.3B, random weights", wan_model, device, args.tiny)]
    for key, title, fn, *fn_args in sections:
        if key not in args.skip:
            rep.section(key, title, fn, *fn_args)
    failed = [s["key"] for s in rep.sections if s["status"] == "FAIL"]
    print(f"\n{len(rep.sections)} sections in {time.perf_counter() - t0:.0f} s; "
          f"{'FAIL: ' + ' '.join(failed) if failed else 'all PASS'}; reports in {rep.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
