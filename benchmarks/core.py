"""
Core benchmark: training step time (teacher forcing vs Resampling Forcing) and sampling time with and without the
KV cache. Prints medians over repeats, measured side by side in one process.

    python benchmarks/core.py                 # toy preset, CPU or the GPU present
    python benchmarks/core.py --repeats 7 --chunks 16
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import rf  # noqa: E402


def training_step(model, clip, context, device, lr=1e-4):
    """-> step(mode): one optimizer step on rf.training_loss as train.py takes it (AdamW, bf16 autocast on CUDA),
    with the history degraded by `mode` (none = teacher forcing, autoregressive = Resampling Forcing)."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr)

    def step(mode="autoregressive"):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss, _, _ = rf.training_loss(model, clip, context, mode=mode)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def clock(fn, device):
    """Wall-clock seconds of one call of fn (waiting for the GPU, when there is one)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="toy")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--clip_frames", type=int, default=8)
    p.add_argument("--chunks", type=int, default=16, help="chunks generated in the sampling benchmark")
    p.add_argument("--sample_steps", type=int, default=16)
    p.add_argument("--sample_batch", type=int, nargs="+", default=[1, 4],
                   help="videos per generate call; each runs with CFG (2 branches), as sample.py does")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {name}; torch {torch.__version__}; preset {args.preset}")

    torch.manual_seed(0)
    cfg = rf.preset(args.preset)
    model = rf.DiT(cfg).to(device)
    H, W = cfg.frame_size
    clip = torch.rand(args.batch_size, args.clip_frames, cfg.in_dim, H, W, device=device) * 2 - 1
    context = torch.randn(args.batch_size, cfg.text_len, cfg.text_dim, device=device)
    step = training_step(model, clip, context, device)

    step("none"), step("autoregressive")                                         # warm-up
    results = {}
    for _ in range(args.repeats):                         # interleaved, so drift in machine load hits both alike
        for mode in ("none", "autoregressive"):
            results.setdefault(mode, []).append(clock(lambda: step(mode), device))
    tf, rs = statistics.median(results["none"]), statistics.median(results["autoregressive"])
    print(f"training step, batch {args.batch_size} x {args.clip_frames} frames "
          f"({args.clip_frames // cfg.frames_per_chunk} chunks):")
    print(f"  teacher forcing      {tf:.3f} s  ({1 / tf:.2f} steps/s)")
    print(f"  Resampling Forcing   {rs:.3f} s  ({1 / rs:.2f} steps/s)")
    print(f"  ratio RF / TF        {rs / tf:.2f}   (target <= 1.6)")

    model.eval()
    frames = args.chunks * cfg.frames_per_chunk
    for batch in args.sample_batch:
        ctx, neg = context[:1].expand(batch, -1, -1), torch.zeros_like(context[:1])
        times = {}
        for _ in range(max(1, args.repeats // 2)):
            for use_cache in (True, False):
                times.setdefault(use_cache, []).append(clock(lambda: rf.generate(
                    model, ctx, frames, steps=args.sample_steps, cfg_scale=3.0, neg_context=neg,
                    use_cache=use_cache), device))
        cached, uncached = statistics.median(times[True]), statistics.median(times[False])
        print(f"sampling {args.chunks} chunks ({frames} frames), {args.sample_steps} Euler steps, batch {batch}, CFG:")
        print(f"  with KV cache        {cached:.2f} s")
        print(f"  without (recompute)  {uncached:.2f} s")
        print(f"  ratio cached / not   {cached / uncached:.3f}   (target <= 0.25)")


if __name__ == "__main__":
    main()
