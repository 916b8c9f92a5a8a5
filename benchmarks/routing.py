"""
Routing benchmark: attention time and whole per-chunk sampling time against the history length, for dense
attention, top-k routing (k = 1, 3, 5) and a sliding window, measured side by side (interleaved repeats, medians).

    python benchmarks/routing.py                      # toy preset on the CPU (one thread)
    python benchmarks/routing.py --wan                # Wan2.1-1.3B layer size, bf16 (meant for a GPU)
    python benchmarks/routing.py --histories 4 8 --repeats 3 --steps 4
    python benchmarks/routing.py --wan --fp32 --size 20 36 --no_chunk   # Wan's heads, a smaller frame, on a CPU

attention: one self-attention call of the chunk being generated (its T queries) against Nh cached history chunks
plus itself, batch 2 (the two CFG branches), routing included (scores, top-k, both branches, merge).
chunk:     one whole generated chunk with the KV cache: `steps` denoising forwards plus the t = 0 re-encode.
Targets (what routing must reach to pay off): top-5 attention with 20 history chunks <= 0.4x dense; routed,
chunk 32 <= 1.3x chunk 4.

On the CPU, --keep_freed_memory matters for the routed paths: they allocate big temporaries (gathered keys, tiles),
and glibc maps every block over 32 MB afresh and hands freed memory back to the OS, so the next call page-faults on
every first touch (at 20 history chunks of Wan's layout this made top-5 1.8x slower). The flag turns both off, as a
caching allocator (CUDA's) would. Dense SDPA allocates almost nothing either way.
"""

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import checkpoints  # noqa: E402
import rf  # noqa: E402
from core import clock  # noqa: E402  (benchmarks/core.py: this folder is on sys.path when run as a script)

VARIANTS = {"dense": {}, "top1": dict(top_k=1), "top3": dict(top_k=3), "top5": dict(top_k=5),
            "window5": dict(window=5)}


def attention_call(variant, H, T, nh, hd, device, dtype, backend):
    """A closure running one attention call of the current chunk over H cached chunks, and its inputs."""
    g = torch.Generator(device="cpu").manual_seed(H)
    q, k, v = (torch.randn(2, n, nh, hd, generator=g).to(device, dtype) for n in (T, (H + 1) * T, (H + 1) * T))
    if not VARIANTS[variant]:
        return lambda: rf.attention(q, k, v)                   # the cached dense path: no mask at all
    phi = rf.chunk_means(k[:, :H * T], T)
    chunk = torch.arange(H + 1, device=device).repeat_interleave(T)
    routing = rf.Routing(chunk, torch.full_like(chunk, rf.HISTORY), T, H, backend=backend, **VARIANTS[variant])
    return lambda: rf.routed_attention(q, k, v, phi, routing)


def keep_freed_memory():
    """Ask glibc (mallopt) never to mmap big blocks and never to trim freed memory: what a caching allocator does."""
    import ctypes
    libc = ctypes.CDLL("libc.so.6")
    M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_MAX = -1, -2, -4
    ok = (libc.mallopt(M_MMAP_MAX, 0) and libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1)
          and libc.mallopt(M_TOP_PAD, 256 << 20))
    if not ok:
        sys.exit("error: mallopt refused the settings (not glibc?): run without --keep_freed_memory")


def set_history(cache, chunks, chunk_tokens, fpc):
    """Pretend the cache holds only its first `chunks` chunks (their K/V stay; later ones are ignored)."""
    for layer in cache.layers:
        layer.length, layer.chunks = chunks * chunk_tokens, chunks
    cache.frames = chunks * fpc


def table(title, rows, names, histories):
    """One panel, {history: {variant: [seconds]}}, as a table of median ms and ratios to dense."""
    print(f"\n{title} (median ms; in brackets: ratio to dense at the same history)")
    print(f"{'history':>8} " + " ".join(f"{n:>17}" for n in names))
    for H in histories:
        dense = statistics.median(rows[H]["dense"])
        cells = []
        for n in names:
            m = statistics.median(rows[H][n])
            cells.append(f"{m * 1e3:9.2f} ({m / dense:4.2f}x)")
        print(f"{H:>8} " + " ".join(f"{c:>17}" for c in cells))


def plot(path, where, T, panels, histories):
    """Median time against the history length, one panel per table, one line per variant."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    for ax, (title, rows, names) in zip(axes[0], panels):
        for n in names:
            ax.plot(histories, [statistics.median(rows[H][n]) * 1e3 for H in histories], marker="o", label=n,
                    linestyle="--" if n == "dense" else "-")
        ax.set(xlabel="history chunks", ylabel="median ms", title=title, ylim=(0, None))
        ax.set_xticks(histories, [str(H) if H + 1 not in histories else "" for H in histories])  # e.g. 31 by 32
        ax.grid(alpha=0.3)
    axes[0][0].legend()
    fig.suptitle(f"routed vs dense, chunks of {T} tokens; {where}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def chunk_times(cfg, names, histories, steps, repeats, T, device, dtype):
    """{history: {variant: [seconds]}}: one whole generated chunk of T tokens with the KV cache (`steps` denoising
    forwards plus the t = 0 re-encode). Each variant's cache is filled once, then cut to each history length."""
    fpc, max_h = cfg.frames_per_chunk, max(histories)
    torch.manual_seed(0)
    base = rf.DiT(cfg).to(device).eval()
    H_, W_ = cfg.frame_size
    ctx = torch.randn(2, 8, cfg.text_dim, device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)
    models, caches = {}, {}
    with torch.no_grad(), autocast:
        text_kv = base.encode_text(ctx)
        for n in names:
            models[n] = rf.DiT(rf.Config(**{**checkpoints.config_to_dict(cfg), **VARIANTS[n]})).to(device).eval()
            models[n].load_state_dict(base.state_dict())
            caches[n] = rf.KVCache(models[n], (max_h + 1) * fpc, (H_, W_))
            for _ in range(max_h):                     # fill with chunks the model itself encoded at t = 0
                frames = torch.randn(2, fpc, cfg.in_dim, H_, W_, device=device)
                models[n].forward_chunk(frames, torch.zeros(2, fpc, device=device), text_kv, caches[n], commit=True)
    x = torch.randn(2, fpc, cfg.in_dim, H_, W_, device=device)
    ts = [torch.full((2, fpc), s, device=device) for s in torch.linspace(1, 0, steps + 1).tolist()]

    def one_chunk(n, H):
        set_history(caches[n], H, T, fpc)
        with torch.no_grad(), autocast:
            for t in ts:                               # `steps` denoising forwards + the t = 0 re-encode
                models[n].forward_chunk(x, t, text_kv, caches[n])

    for n in names:                                                                  # warm-up
        one_chunk(n, histories[0])
    times = {H: {n: [] for n in names} for H in histories}
    for _ in range(repeats):
        for H in histories:
            for n in names:
                times[H][n].append(clock(lambda: one_chunk(n, H), device))
    return times


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--wan", action="store_true", help="Wan2.1-1.3B layer size in bf16 (for a GPU)")
    p.add_argument("--histories", type=int, nargs="+", default=[3, 4, 8, 16, 20, 31, 32],
                   help="history lengths Nh; generating chunk n has Nh = n - 1")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--steps", type=int, default=None, help="denoising steps per chunk (toy: 16, --wan: 2)")
    p.add_argument("--layers", type=int, default=None, help="DiT depth for the chunk timing (--wan default: 4)")
    p.add_argument("--size", type=int, nargs=2, default=None, help="latent frame size H W (default: the preset's)")
    p.add_argument("--fp32", action="store_true", help="--wan in fp32 (the CPU's fast dtype) instead of bf16")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (1: steadier next to other jobs)")
    p.add_argument("--no_chunk", action="store_true", help="attention only")
    p.add_argument("--plot", default=None, help="also draw the times against the history length into this PNG")
    p.add_argument("--keep_freed_memory", action="store_true",
                   help="CPU: keep freed blocks mapped (glibc mallopt), so big temporaries do not page-fault")
    args = p.parse_args()
    if args.keep_freed_memory:
        keep_freed_memory()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.set_num_threads(args.threads)
    dtype = torch.bfloat16 if args.wan and not args.fp32 else torch.float32
    cfg = rf.preset("wan2.1-t2v-1.3b" if args.wan else "toy")
    overrides = dict(num_layers=args.layers or (4 if args.wan else cfg.num_layers))
    if args.size:
        overrides["frame_size"] = tuple(args.size)
    cfg = rf.Config(**{**checkpoints.config_to_dict(cfg), **overrides})
    steps = args.steps or (2 if args.wan else cfg.sample_steps)
    fpc = cfg.frames_per_chunk
    S = (cfg.frame_size[0] // cfg.patch_size[1]) * (cfg.frame_size[1] // cfg.patch_size[2])   # tokens per frame
    T, nh, hd = fpc * S, cfg.num_heads, cfg.dim // cfg.num_heads
    where = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} thread(s)"
    print(f"device: {where}; torch {torch.__version__}; {'Wan2.1-1.3B layer size' if args.wan else 'toy preset'}, "
          f"{dtype}; chunk = {fpc} frames x {S} tokens = {T} tokens; {nh} heads of {hd}; batch 2 (CFG); "
          f"allocator: {'glibc, freed memory kept' if args.keep_freed_memory else 'default'}")
    histories = sorted(args.histories)
    names = list(VARIANTS)
    backends = ["two_branch"] + (["flex"] if device.type == "cuda" else [])
    att_names = names + [f"top5-{b}" for b in backends[1:]]

    # --- attention alone, then (unless --no_chunk) whole generated chunks ---------------------------------------
    calls = {(H, n): attention_call(n if "-" not in n else "top5", H, T, nh, hd, device, dtype,
                                    n.split("-")[1] if "-" in n else "two_branch")
             for H in histories for n in att_names}
    for (H, n), fn in list(calls.items()):                                           # warm-up
        try:
            fn()
        except (RuntimeError, torch.OutOfMemoryError) as e:   # e.g. flex failing to compile: report, go on
            if n == "top5-flex" and n in att_names:
                print(f"note: {n} dropped ({type(e).__name__}: {str(e).splitlines()[0][:120]})")
                att_names.remove(n)
            if n == "top5-flex":
                del calls[(H, n)]
            else:
                raise
    att = {H: {n: [] for n in att_names} for H in histories}
    with torch.no_grad():
        for _ in range(args.repeats):                   # interleaved: load drift hits every variant alike
            for H in histories:
                for n in att_names:
                    att[H][n].append(clock(calls[(H, n)], device))
    del calls
    panels = [("attention, one layer", att, att_names)]                 # (title, times, variants)
    table(*panels[-1], histories)
    per_chunk = {}
    if not args.no_chunk:
        per_chunk = chunk_times(cfg, names, histories, steps, max(1, args.repeats // 2), T, device, dtype)
        panels.append((f"one generated chunk ({steps} steps + re-encode, {cfg.num_layers} layers)", per_chunk, names))
        table(*panels[-1], histories)
    if args.plot:
        plot(args.plot, where, T, panels, histories)

    # --- the targets ---------------------------------------------------------------------------------------------
    print()
    if 20 in att:
        r = statistics.median(att[20]["top5"]) / statistics.median(att[20]["dense"])
        print(f"target: top-5 attention at 20 history chunks / dense = {r:.2f}   (target <= 0.4)")
    if 3 in per_chunk and 31 in per_chunk:
        for n in names:
            r = statistics.median(per_chunk[31][n]) / statistics.median(per_chunk[3][n])
            flag = "(target <= 1.3)" if n.startswith("top") else ""
            print(f"target: {n:>8}: chunk 32 / chunk 4 time = {r:.2f}   {flag}")


if __name__ == "__main__":
    main()
