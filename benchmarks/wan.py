"""
Wan2.1 benchmark, random weights at the full 1.3B size:

  1. forward  our DiT against diffusers' WanTransformer3DModel on the same weights, at 21 latent frames of 480x832
              (32,760 tokens), both in their bf16 regime (bf16 weights, fp32 norms / modulation / time embedding)
              with PyTorch SDPA attention; medians of interleaved repeats, side by side. Ours with one chunk is
              bidirectional like Wan's; the block-causal row (7 chunks of 3) is shown for reference.
  2. train    one Resampling Forcing step (autoregressive self-resampling, then the two-stream forward and
              backward, AdamW) at batch 1, fp32 weights under bf16 autocast, activation checkpointing (train.py's
              Wan regime): time and peak GPU memory.
  3. sample   time per generated chunk as the video grows (KV cache, CFG: 2 branches, --steps Euler steps each).

    python benchmarks/wan.py                # on a GPU (about 50 GB for the training step)
    python benchmarks/wan.py --tiny         # a tiny model on the CPU: checks the script, says nothing about GPUs
    python benchmarks/wan.py --frames 3 --size 20 36 --skip train sample --repeats 3   # the full 1.3B on a CPU
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import checkpoints  # noqa: E402
import rf  # noqa: E402
import wan  # noqa: E402
from core import clock, training_step  # noqa: E402  (benchmarks/core.py)

TINY = dict(dim=64, ffn_dim=128, num_heads=2, num_layers=2, text_len=32, text_dim=64, frame_size=(8, 8))


def bf16_like_load_wan(model, dtype):
    """Parameters in dtype except Wan's fp32 islands, as wan.load_wan(dtype=...) leaves them."""
    for name, p in model.named_parameters():
        p.data = p.data.to(wan._param_dtype(name, dtype))
    return model


def diffusers_like_from_pretrained(ref, dtype):
    """Parameters in dtype except diffusers' _keep_in_fp32_modules, as from_pretrained(torch_dtype=dtype) does."""
    keep = ref._keep_in_fp32_modules or []
    for name, p in ref.named_parameters():
        p.data = p.data.to(torch.float32 if any(k in name.split(".") for k in keep) else dtype)
    return ref


def median_of(fns, device, repeats):
    """{name: median seconds}, the calls interleaved so drift in machine load hits all alike."""
    times = {name: [] for name in fns}
    for fn in fns.values():                                             # warm-up (compilation, allocator)
        fn()
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(clock(fn, device))
    return {name: statistics.median(t) for name, t in times.items()}


def peak_gib(device):
    return torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="a tiny model (CPU check of the script)")
    p.add_argument("--frames", type=int, default=21, help="latent frames (21 = 81 video frames)")
    p.add_argument("--size", type=int, nargs=2, default=None, help="latent frame size H W (default: 60 104 = 480x832)")
    p.add_argument("--chunks", type=int, default=7, help="chunks timed in the sampling benchmark (>= 2)")
    p.add_argument("--steps", type=int, default=32, help="Euler steps per chunk in the sampling benchmark")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--skip", nargs="*", default=[], choices=["forward", "train", "sample"])
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32                # bf16 on the GPU; the CPU has no fast bf16
    size = {"frame_size": tuple(args.size)} if args.size else {}
    cfg = rf.preset("wan2.1-t2v-1.3b", **{**(TINY if args.tiny else {}), **size})
    H, W = cfg.frame_size
    name = torch.cuda.get_device_name() if cuda else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {name}; torch {torch.__version__}; {'tiny model' if args.tiny else 'Wan2.1-T2V-1.3B size'}, "
          f"random weights; {args.frames} latent frames of {H}x{W}; {str(dtype).removeprefix('torch.')}")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, args.frames, cfg.in_dim, H, W, generator=g).to(device)
    context = torch.randn(1, cfg.text_len, cfg.text_dim, generator=g).to(device)
    context[:, cfg.text_len // 8:] = 0                                  # a short prompt, zero-padded as Wan's
    torch.manual_seed(0)

    if "forward" not in args.skip:
        from diffusers import WanTransformer3DModel
        with torch.device(device):
            ours = rf.DiT(cfg).eval()
        torch.nn.init.normal_(ours.head.head.weight, std=0.02)        # Wan's init zeroes the head: not here
        with torch.device(device):
            ref = WanTransformer3DModel(**wan.diffusers_wan_config(cfg)).eval()
        ref.load_state_dict({wan.wan_to_diffusers_key(k): v for k, v in ours.state_dict().items()})
        bf16_like_load_wan(ours, dtype), diffusers_like_from_pretrained(ref, dtype)
        t = torch.full((1, args.frames), 0.5, device=device)
        ctx = context.to(dtype)
        bidir = rf.Config(**{**checkpoints.config_to_dict(cfg), "frames_per_chunk": args.frames})

        @torch.no_grad()
        def run_ours(model_cfg):
            ours.cfg = model_cfg                                        # the chunking is config, not weights
            with autocast:
                return ours.forward_causal(x.to(dtype), t, ctx)

        @torch.no_grad()
        def run_ref():
            return ref(hidden_states=x.to(dtype).permute(0, 2, 1, 3, 4), timestep=1000 * t[:, 0],
                       encoder_hidden_states=ctx, return_dict=False)[0]

        a, b = run_ours(bidir).float(), run_ref().float().permute(0, 2, 1, 3, 4)
        rel = ((a - b).norm() / b.norm()).item()
        med = median_of({"ours": lambda: run_ours(bidir), "diffusers": run_ref,
                         "ours, block-causal": lambda: run_ours(cfg)}, device, args.repeats)
        print(f"1. forward, {args.frames} latent frames ({args.frames * ours.tokens_per_frame(H, W):,} tokens), batch 1, "
              f"medians of {args.repeats} (relative difference of the outputs: {rel:.1e})")
        print(f"   diffusers WanTransformer3DModel   {med['diffusers'] * 1e3:9.1f} ms")
        print(f"   ours, one chunk (bidirectional)   {med['ours'] * 1e3:9.1f} ms   "
              f"{med['ours'] / med['diffusers']:.3f}x diffusers (target <= 1.05)")
        print(f"   ours, block-causal ({args.frames // cfg.frames_per_chunk} chunks)     "
              f"{med['ours, block-causal'] * 1e3:9.1f} ms   ({'flex_attention' if cuda else 'dense-mask SDPA'})")
        del ours, ref
        if cuda:
            torch.cuda.empty_cache()

    if "train" not in args.skip:
        with torch.device(device):
            model = rf.DiT(cfg)                                         # fp32 master weights, as train.py
        model.grad_checkpointing = True
        step = training_step(model, x.clamp(-3, 3), context, device, lr=5e-5)

        step()                                                          # AdamW's state exists from here on
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        times = [clock(step, device) for _ in range(args.repeats)]
        print(f"2. one Resampling Forcing step, batch 1 x {args.frames} latent frames, activation checkpointing, "
              f"AdamW: {statistics.median(times):.3f} s (median of {args.repeats}); peak memory "
              + (f"{peak_gib(device):.1f} GiB" if cuda else "not measured on the CPU"))
        del model, step                                  # step holds the optimizer
        if cuda:
            torch.cuda.empty_cache()

    if "sample" not in args.skip:
        with torch.device(device):
            model = bf16_like_load_wan(rf.DiT(cfg), dtype).eval()
        fpc = cfg.frames_per_chunk
        stamps = []

        def progress(i):
            if cuda:
                torch.cuda.synchronize()
            stamps.append(time.perf_counter())

        neg = torch.zeros_like(context)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        with autocast:
            rf.generate(model, context, fpc, steps=2, neg_context=neg, seed=0)        # warm-up
            stamps.append(time.perf_counter())
            rf.generate(model, context, (args.chunks + 1) * fpc, steps=args.steps, neg_context=neg, seed=0,
                        progress=progress)
        # the video's last chunk skips the t = 0 re-encode (nothing follows it): one chunk more, and its time dropped
        per_chunk = [b - a for a, b in zip(stamps[:-1], stamps[1:])][:args.chunks]
        print(f"3. sampling with the KV cache, CFG (2 branches), {args.steps} Euler steps per chunk of {fpc} latent "
              f"frames: seconds per chunk as the video grows" + (f" (peak memory {peak_gib(device):.1f} GiB)"
                                                                 if cuda else ""))
        print("   " + "  ".join(f"#{i + 1}: {s:.3f}" for i, s in enumerate(per_chunk)))
        print(f"   last / first: {per_chunk[-1] / per_chunk[0]:.2f}x; last / second: "
              f"{per_chunk[-1] / per_chunk[1]:.2f}x (#1 also holds generate's set-up: the prompt's K/V, the cache)")


if __name__ == "__main__":
    main()
