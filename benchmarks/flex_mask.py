"""
Building the routed flex_attention mask: from the router's choice (fast_attn.flex_routed_mask, what the flex backend
uses) against create_block_mask evaluating the rule on every (query, key) pair (the plain way), side by side in one
process. Also prints how many key blocks the mask lets the kernel skip.

    python benchmarks/flex_mask.py                       # one chunk of queries against 20 cached chunks (sampling)
    python benchmarks/flex_mask.py --chunk_tokens 4680   # Wan's chunk at 480x832 (slow on the plain side)

On a GPU the flex backend compiles create_block_mask (fast_attn.block_mask), which fuses the rule into the per-block
reduction; this script runs both eagerly, as they run on a CPU.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import fast_attn  # noqa: E402
import rf  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--chunk_tokens", type=int, default=1024)
    p.add_argument("--history", type=int, default=20, help="cached history chunks (a 15 s Wan video: 20)")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--top_k", type=int, default=5)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    T, J = args.chunk_tokens, args.history
    g = torch.Generator().manual_seed(0)
    chunk = torch.arange(J + 1).repeat_interleave(T)
    stream = torch.full_like(chunk, rf.HISTORY)
    q = torch.randn(1, T, args.heads, 16, generator=g)
    k = torch.randn(1, len(chunk), args.heads, 16, generator=g)
    selected = rf.route(q, rf.chunk_means(k[:, :J * T], T), rf.eligible_chunks(chunk[-T:], J), top_k=args.top_k)
    print(f"{T} queries against {J} history chunks of {T} tokens + their own, {args.heads} heads, top-{args.top_k} "
          f"(random keys); median of {args.repeats}")
    for name, build in (("from the selection", lambda: fast_attn.flex_routed_mask(rf.may_attend_routed, selected,
                                                                                 chunk, stream)),
                        ("create_block_mask", lambda: fast_attn.flex_routed_mask_grid(rf.may_attend_routed, selected,
                                                                                     chunk, stream))):
        seconds = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            mask = build()
            seconds.append(time.perf_counter() - t0)
        read = int(mask.kv_num_blocks.sum() + mask.full_kv_num_blocks.sum())
        print(f"  {name:20s} {statistics.median(seconds) * 1e3:9.1f} ms   key blocks read {read} of "
              f"{mask.kv_num_blocks.numel() * -(-len(chunk) // 128)}")


if __name__ == "__main__":
    main()
