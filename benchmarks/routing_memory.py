"""
Memory of one routed training call: the two-branch attention of a two-stream training forward, forward and
backward, at Wan's head layout, with its scores in slabs (fast_attn.in_slabs, the default) or all at once
(--one_piece, as before slabs existed). One setting per process, so that the peak resident memory belongs to it alone.

    python benchmarks/routing_memory.py                        # 540-token chunks (3 frames of 160x288 pixels)
    python benchmarks/routing_memory.py --one_piece
    python benchmarks/routing_memory.py --chunk_tokens 1080    # memory kept in one piece grows with the chunk^2

Prints the bytes autograd keeps for backward (counted with saved_tensors_hooks), the peak resident memory of the
process (CPU) or of the GPU, and the time of a second call (the first warms up).
"""

import argparse
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import fast_attn  # noqa: E402
import rf  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--chunk_tokens", type=int, default=540, help="tokens per chunk (Wan at 480x832: 4680)")
    p.add_argument("--chunks", type=int, default=7, help="chunks per clip (Wan's 21 latent frames: 7)")
    p.add_argument("--top_k", type=int, default=5)
    p.add_argument("--one_piece", action="store_true", help="every score at once (SLAB_SCORES unbounded)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.one_piece:
        fast_attn.SLAB_SCORES = 2**62
    B, nh, hd, T, N = 1, 12, 128, args.chunk_tokens, args.chunks
    L = (2 * N - 1) * T                              # [history ; noisy] without the last history chunk: all queries
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, L, nh, hd, generator=g).to(args.device).requires_grad_() for _ in range(3))
    # each query picks top_k of the N - 1 history chunks at random (which ones does not change the cost)
    score = torch.rand(B, nh, L, N - 1, generator=g)
    selected = (score >= score.sort(-1).values[..., -args.top_k:-args.top_k + 1]).to(args.device)

    def call():                                      # -> bytes kept for backward, seconds
        kept = []
        t0 = time.perf_counter()
        with torch.autograd.graph.saved_tensors_hooks(lambda x: kept.append(x.numel() * x.element_size()) or x,
                                                      lambda x: x):
            o = rf.two_branch_attention(q, k, v, selected, T, fast_attn.two_branches)
        o.float().square().mean().backward()
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        return sum(kept), time.perf_counter() - t0

    call()                                           # warm-up: first touches of fresh memory, kernel choices
    kept, seconds = call()
    if args.device.startswith("cuda"):
        peak = f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB"
    else:
        peak = f"peak resident memory {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB"
    print(f"{'one piece' if args.one_piece else 'slabs of 2^26 scores'}: {L} queries, chunks of {T} tokens, "
          f"top-{args.top_k} of {N - 1}, {args.device}: kept for backward {kept / 2**30:.2f} GiB, {peak}, "
          f"{seconds:.1f} s (the second call)")


if __name__ == "__main__":
    main()
