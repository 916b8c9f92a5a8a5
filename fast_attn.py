"""
fast_attn.py -- the tuned attention paths behind rf.py's attention calls.

rf.py defines what every attention computes, readably: one mask rule, the router, and the paper's two-branch
attention (own chunk + chosen history chunks, merged through their log-sum-exps). This module computes the same
numbers faster or in less memory, and tests/test_routing.py proves each path equal to rf.py's reference:

    plain_branches   the two branches of routed attention written plainly: the reference for the tuned paths
    two_branches     both branches of routed attention: the history branch grouped by key block and cut into
                     tiles (one batched matmul), every score in bounded slabs (checkpointed under autograd), and
                     on a CPU without autograd SDPA's fused kernel, which also returns the log-sum-exp
    flex_attention   torch's flex_attention, compiled once on CUDA, with BlockMasks of rf's mask rule: built by
                     a compiled create_block_mask (flex_block_mask), or for routing from the router's choice
                     (flex_routed_mask)
    varlen_branches  the same two branches through a varlen kernel that returns the LSE (the paper's fast path):
                     torch's varlen_attn or flash-attn's flash_attn_varlen_func, CUDA only (attn_backend varlen |
                     flash); tests/test_varlen.py proves the packing and merge with a CPU stand-in of the kernel

It imports only torch: rf.py hands it tensors and mask functions, never the other way round.
"""

from functools import lru_cache

import torch
from torch.nn.attention.flex_attention import BlockMask, create_block_mask
from torch.nn.attention.flex_attention import flex_attention as _flex_attention
from torch.utils.checkpoint import checkpoint

# SDPA's fused CPU kernel, which also returns the LSE (see attention_lse); a private op, so None if a torch lacks it
_FUSED_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
MAX_TILE = 1024     # most queries per tile in the two-branch history matmul (see history_branch)
TILE_OVERHEAD = 32  # the fixed cost of a tile, in query rows (measured on a CPU; see tile_size)
SLAB_SCORES = 2**26  # most attention scores a two-branch call holds at once (256 MB in fp32; see in_slabs)


# ----------------------------------------------------------------------------------------------------------------
# Which kernel runs an attention call
# ----------------------------------------------------------------------------------------------------------------
# DiT.attn_backend: auto (flex on CUDA, SDPA elsewhere; two_branch for routed models) | sdpa | flex, and for
# routed models two_branch | varlen | flash (the paper's varlen kernels, CUDA only).
ATTN_BACKENDS = ("auto", "sdpa", "flex", "two_branch", "varlen", "flash")


def routed_backend(attn_backend):
    """The backend a routed model's attention runs on: `auto` means two_branch on every device.

    NOTE(choice): flex works on 128x128 blocks, and per-token routing leaves few blocks that no query chose
    (see flex_routed_mask), so it is not the default (docs/method.md, "The default routed backend")."""
    return "two_branch" if attn_backend == "auto" else attn_backend


def routed_branches(backend):
    """The function computing routed attention's two branches on `backend` (two_branch | varlen | flash), for
    rf.two_branch_attention, which merges them: the same numbers as rf's dense-mask reference."""
    if backend == "two_branch":
        return two_branches
    if backend in KERNELS:
        return varlen_backend(backend)
    raise ValueError(f"attn_backend={backend!r} for a routed model: choose one of sdpa, two_branch, flex, "
                     f"varlen, flash")


# ----------------------------------------------------------------------------------------------------------------
# flex_attention on CUDA
# ----------------------------------------------------------------------------------------------------------------

RECOMPILE_LIMIT = 64  # compiled variants per function (each new length, dtype or grad mode is one; see compiled)


@lru_cache(maxsize=None)
def compiled(fn, **options):
    """torch.compile(fn, **options), made once. Only the CUDA fast paths use it.

    dynamic=False compiles one kernel per sequence length, dtype and grad mode. Past torch's default of 8 such
    variants, dynamo silently runs the function eagerly, and eager flex_attention materialises every score: on an
    H100 a Wan forward of 21 frames then asked for 48 GiB and a toy step took 0.26 s. A run meets a few lengths per
    video length (training, the resampling rollout, uncached sampling), so the limit is raised, never lowered."""
    _raise_recompile_limit()
    return torch.compile(fn, **options)


def _raise_recompile_limit():
    """Let dynamo keep RECOMPILE_LIMIT compiled variants per function (see compiled); never lowers a higher one."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)


def compile_blocks(model, **options):
    """Compile each of the DiT's blocks in place ("regional" compilation: the 30 blocks share one graph per shape).

    What it buys is fusion. Eager, the fp32 islands (norms, modulation, gated residual adds) and RoPE are dozens of
    small elementwise kernels per block: on an H100 they took more GPU time than attention in a sampling step and
    most of the gap between our Wan forward and diffusers' (benchmarks/gpu.py --profile); compiled, the forward went
    from 752 to 560 ms. The weights and their names are untouched, so checkpoints, EMA copies and DDP see the same
    model. options go to torch.compile."""
    _raise_recompile_limit()
    for block in model.blocks:
        block.compile(**options)
    return model


def block_mask(mask_mod, B, H, Lq, Lk, device: str):
    """create_block_mask, compiled on CUDA. Eager, it evaluates mask_mod on the whole (Lq, Lk) grid at once: 6.2 GB
    at 25k tokens (measured on a CPU), so some 35 GB at the 61k tokens of Wan's two-stream training forward.
    Compiled, mask_mod is fused into the per-block reduction (0.4 GB there), and the blocks come out the same."""
    return (compiled(create_block_mask) if device.startswith("cuda") else create_block_mask)(
        mask_mod, B, H, Lq, Lk, device=device)


@lru_cache(maxsize=16)
def flex_block_mask(rule, chunk: tuple, stream: tuple, device: str):
    """rf's mask rule (may_attend) over a layout, as a flex_attention BlockMask. Cached: building it is not free,
    and the key holds the whole layout, so a new length or resolution can never reuse a stale mask."""
    c = torch.tensor(chunk, device=device)
    s = torch.tensor(stream, device=device)

    def mask_mod(b, h, q, k):
        return rule(c[q], s[q], c[k], s[k])

    return block_mask(mask_mod, None, None, len(chunk), len(chunk), device)


def flex_routed_mask(rule, selected, chunk, stream, block=128):
    """rf's routed rule (may_attend_routed) as a BlockMask per batch and head, built from the router's choice: no
    (Lq, Lk) grid is ever evaluated. selected: (B, nh, Lq, Nh); chunk, stream: (Lk,) key ids, the queries the last Lq.

    The keys fall into segments, runs of one (chunk, stream). Whether a query may read a segment needs only the
    query's ids and its row of `selected`: a (B, nh, Lq, segments) table, some tens of columns. A query block reads
    a key block when any of its queries may read a segment there (partial block: mask_mod decides per token); when
    all of them may read every segment the block holds, the block is full and skips mask_mod. Key blocks no query
    of a query block chose are never visited; per-token routing leaves few such blocks unless neighbouring queries
    choose alike."""
    B, nh, Lq, Nh = selected.shape
    Lk, dev = len(chunk), chunk.device
    mask_mod, table, col = routed_mask_mod(rule, selected, chunk, stream)
    q_chunk, q_stream = chunk[-Lq:], stream[-Lq:]
    starts = torch.cat([torch.ones(1, dtype=torch.bool, device=dev), (chunk.diff() != 0) | (stream.diff() != 0)])
    first = starts.nonzero()[:, 0]                                                    # (G,) each segment's first key
    allowed = rule(q_chunk[:, None], q_stream[:, None], chunk[first], stream[first],
                   table[..., col[first]])                                            # (B, nh, Lq, G)
    nq, nk = -(-Lq // block), -(-Lk // block)
    rows = torch.nn.functional.pad(allowed, (0, 0, 0, nq * block - Lq)).unflatten(2, (nq, block))
    segment = starts.cumsum(0) - 1                                                    # (Lk,) segment of each key
    holds = torch.zeros(len(first), nk * block, dtype=torch.float, device=dev)
    holds[segment, torch.arange(Lk, device=dev)] = 1
    holds = holds.unflatten(1, (nk, block)).amax(2)                                   # (G, nk): block holds segment
    some = rows.any(3).float() @ holds > 0                                            # (B, nh, nq, nk)
    every = (~rows.all(3)).float() @ holds == 0
    inside = ((torch.arange(nq, device=dev) + 1) * block <= Lq)[:, None] & \
        ((torch.arange(nk, device=dev) + 1) * block <= Lk)[None]         # a block cut by an end: partial
    full = some & every & inside
    partial = some & ~full

    def listed(blocks):                    # (B, nh, nq, nk) bool -> counts, indices (listed blocks first, in order)
        return blocks.sum(-1, dtype=torch.int32), torch.argsort(~blocks, dim=-1, stable=True).int()

    return BlockMask.from_kv_blocks(*listed(partial), *listed(full), BLOCK_SIZE=block, mask_mod=mask_mod,
                                    seq_lengths=(Lq, Lk))


def flex_routed_mask_grid(rule, selected, chunk, stream):
    """flex_routed_mask built the plain way, the reference it is tested against: create_block_mask evaluates the
    mask_mod on every (query, key) pair, all at once when eager (benchmarks/flex_mask.py times the two)."""
    B, nh, Lq, _ = selected.shape
    mask_mod = routed_mask_mod(rule, selected, chunk, stream)[0]
    return create_block_mask(mask_mod, B, nh, Lq, len(chunk), device=str(chunk.device))


def routed_mask_mod(rule, selected, chunk, stream):
    """The routed rule as flex's mask_mod(b, h, q, k), with the table it reads: `selected` (B, nh, Lq, Nh) padded
    with a column of False that keys of chunks >= Nh (never anyone's routed past) read, and each key's column."""
    Lq, Nh = selected.shape[-2:]
    table, col = torch.nn.functional.pad(selected, (0, 1)), chunk.clamp(max=Nh)      # (B, nh, Lq, Nh + 1), (Lk,)
    q_chunk, q_stream = chunk[-Lq:], stream[-Lq:]

    def mask_mod(b, h, q, k):
        return rule(q_chunk[q], q_stream[q], chunk[k], stream[k], table[b, h, q, col[k]])

    return mask_mod, table, col


def flex_attention(q, k, v, mask):
    """flex_attention with a BlockMask; q, k, v: (B, nh, L, hd). Compiled on CUDA (eager flex is a slow reference)."""
    return (compiled(_flex_attention, dynamic=False) if q.is_cuda else _flex_attention)(q, k, v, block_mask=mask)


# ----------------------------------------------------------------------------------------------------------------
# The two branches of routed attention, tiled and slabbed
# ----------------------------------------------------------------------------------------------------------------
# Letters as in rf.py; Nh history chunks of T tokens each; P selected (query, chunk) pairs.

def plain_branches(q, k, v, selected, chunk_tokens):
    """The two branches written plainly, the reference for the tuned paths: (o, lse) of each, o (B, nh, Lq, hd) and
    lse (B, nh, Lq) in fp32. q: (B, Lq, nh, hd), whole chunks of chunk_tokens tokens at the end of the keys;
    k, v: (B, Lk, nh, hd), opening with Nh history chunks; selected: (B, nh, Lq, Nh)."""
    T, Lq, Nh = chunk_tokens, q.shape[1], selected.shape[-1]
    q, k, v = (x.transpose(1, 2) for x in (q, k, v))                                   # (B, nh, L, hd)
    own = [x[:, :, x.shape[2] - Lq:].unflatten(2, (-1, T)) for x in (q, k, v)]          # per chunk
    o_own, l_own = plain_attention_lse(*own)
    mask = selected.repeat_interleave(T, dim=-1)
    history = plain_attention_lse(q, k[:, :, :Nh * T], v[:, :, :Nh * T], mask)
    return (o_own.flatten(2, 3), l_own.flatten(2, 3)), history


def plain_attention_lse(q, k, v, mask=None):
    """Softmax attention that also returns the log-sum-exp of its scaled scores, written plainly.
    q: (..., Lq, hd); k, v: (..., Lk, hd); mask: (..., Lq, Lk) bool or None.
    Returns o (..., Lq, hd) and lse (..., Lq) in fp32; a query with no key gets o = 0, lse = -inf."""
    s = ((q * q.shape[-1] ** -0.5) @ k.transpose(-1, -2)).float()                     # (..., Lq, Lk)
    if mask is not None:
        s = s.masked_fill(~mask, -torch.inf)
    lse = s.logsumexp(-1)                                                              # (..., Lq)
    p = torch.exp(s - lse[..., None]).nan_to_num(0.0)                            # no key: 0, not nan
    return (p.to(v.dtype) @ v).float(), lse


def two_branches(q, k, v, selected, chunk_tokens):
    """plain_branches, tiled and slabbed: (o, lse) each with o (B, nh, Lq, hd) fp32 and lse (B, nh, Lq).

    q: (B, Lq, nh, hd); k, v: (B, Lk, nh, hd), opening with Nh history chunks; selected: (B, nh, Lq, Nh)."""
    T, (B, Lq, nh, _), Nh = chunk_tokens, q.shape, selected.shape[-1]

    def own_chunks(x):      # the queries are whole chunks at the end of the keys, their own keys at the same places
        return x.transpose(1, 2)[:, :, x.shape[1] - Lq:].reshape(-1, T, x.shape[-1])    # (B nh Lq / T, T, hd)

    o_own, l_own = in_slabs(attention_lse, SLAB_SCORES // T**2, *(own_chunks(x) for x in (q, k, v)))
    own = o_own.float().view(B, nh, Lq, -1), l_own.view(B, nh, Lq)
    return own, history_branch(q, k[:, :Nh * T], v[:, :Nh * T], selected)


def attention_lse(q, k, v):
    """plain_attention_lse without a mask, in less memory: on a CPU without autograd SDPA's fused kernel (it returns
    the LSE too, but has no gradient for it), otherwise the plain steps with the score matrix updated in place.
    q: (..., Lq, hd); k, v: (..., Lk, hd) -> o (..., Lq, hd), lse (..., Lq) in fp32."""
    fits_fused = _FUSED_CPU is not None and q.dtype == k.dtype == v.dtype and q.shape[-1] == v.shape[-1]
    if q.device.type == "cpu" and not torch.is_grad_enabled() and fits_fused:
        o, lse = _FUSED_CPU(*(x.reshape(-1, 1, *x.shape[-2:]) for x in (q, k, v)))
        return o.view(*q.shape[:-1], -1), lse.view(q.shape[:-1])
    s = ((q * q.shape[-1] ** -0.5) @ k.transpose(-1, -2)).float()                     # (..., Lq, Lk)
    top = s.amax(-1, keepdim=True).detach()                    # for stability only: the result does not depend on it
    p = s.sub_(top).exp_()                                     # in place: the score matrix is the big tensor here
    total = p.sum(-1, keepdim=True)                                                   # (..., Lq, 1)
    return (p.to(v.dtype) @ v) / total, (top + total.log()).squeeze(-1)


def history_branch(q, k, v, selected):
    """Each query against the history chunks it selected and nothing else. q: (B, Lq, nh, hd); k, v: (B, Nh T, nh,
    hd); selected: (B, nh, Lq, Nh) -> o (B, nh, Lq, hd), lse (B, nh, Lq); lse = -inf where nothing was selected.

    The P selected (query, chunk) pairs are grouped by the key block they read, (b, h, j), and cut into tiles of at
    most `tile` queries (tile_size): each tile is one small dense attention, its queries against the T keys of its
    block, all tiles in one batched call. Scores and compute scale with P, not with Nh; what does grow with Nh is
    the copy of every block some query chose (per-token routing leaves few unchosen)."""
    B, Lq, nh, hd = q.shape
    b, h, j, i = selected.transpose(2, 3).nonzero(as_tuple=True)                      # (P,) each, sorted by (b, h, j)
    if len(i) == 0:
        return (q.new_zeros(B, nh, Lq, v.shape[-1], dtype=torch.float),
                q.new_full((B, nh, Lq), -torch.inf, dtype=torch.float))
    Nh = selected.shape[-1]
    T = k.shape[1] // Nh
    group = (b * nh + h) * Nh + j                                                     # (P,) the key block it reads
    tile = tile_size(torch.bincount(group))
    pair_tile, slot, tile_group = tile_pairs(group, B * nh * Nh, tile)
    n = len(tile_group)
    row = pair_tile * tile + slot                                                     # (P,) row among the tiles' rows
    # gathers are index_select on tables of hd-wide rows (several times faster on a CPU than advanced indexing)
    qt = q.new_zeros(n * tile, hd).index_copy_(0, row, q.reshape(-1, hd).index_select(0, (b * Lq + i) * nh + h))
    tb, th, tj = tile_group // (nh * Nh), tile_group // Nh % nh, tile_group % Nh      # (n,) each tile's key block
    key_row = (tj[:, None] * T + torch.arange(T, device=q.device)) * nh + th[:, None]  # (n, T) rows of k[tb]

    def tiles(qt, tb, key_row):                 # some tiles' queries against their blocks' keys, gathered here
        return attention_lse(qt, gather_rows(k, tb, key_row), gather_rows(v, tb, key_row))

    o_t, l_t = in_slabs(tiles, SLAB_SCORES // (tile * T), qt.view(n, tile, hd), tb, key_row)  # (n, tile, hd / -)
    o, lse = merge_lse_many(o_t.flatten(0, 1).index_select(0, row), l_t.flatten().index_select(0, row),
                            (b * nh + h) * Lq + i, B * nh * Lq)
    return o.view(B, nh, Lq, -1), lse.view(B, nh, Lq)


def merge_lse_many(o, lse, index, n):
    """rf.merge_lse over many branches at once: row p of o (P, hd), lse (P,) is one branch of output index[p].
    -> o (n, hd), lse (n,); an output with no branch gets o = 0, lse = -inf (so it weighs 0 in a merge)."""
    # [part: routing]
    top = lse.new_full((n,), -torch.inf).scatter_reduce(0, index, lse.detach(), "amax")  # (n,) max per output
    w = torch.exp(lse - top[index])                                                   # (P,) in (0, 1]
    total = w.new_zeros(n).index_add(0, index, w).clamp(min=1e-30)                    # (n,) clamp: no 0/0
    out = o.new_zeros(n, o.shape[-1], dtype=w.dtype).index_add(0, index, w[:, None] * o.float())
    return out / total[:, None], top + total.log()
    # [end: routing]


def tile_pairs(group, num_groups, tile):
    """Cut pairs sorted by group (P,) into tiles of at most `tile` pairs, never mixing groups.
    -> tile of each pair (P,), its slot in the tile (P,), group of each tile (n_tiles,)."""
    count = torch.bincount(group, minlength=num_groups)                              # (G,) pairs per group
    rank = torch.arange(len(group), device=group.device) - (count.cumsum(0) - count)[group]  # (P,) place in group
    tiles = (count + tile - 1) // tile                                                # (G,) tiles per group
    pair_tile = (tiles.cumsum(0) - tiles)[group] + rank // tile
    return pair_tile, rank % tile, torch.repeat_interleave(torch.arange(num_groups, device=group.device), tiles)


def tile_size(count):
    """Queries per tile for groups of count (G,) queries. Every tile costs its padded rows plus a fixed overhead (the
    copy of its key block, the call): of the multiples of 16 up to MAX_TILE, take the size with the least total."""
    size = torch.arange(16, MAX_TILE + 1, 16, device=count.device)                   # (S,) candidates
    tiles = ((count[:, None] + size - 1) // size).sum(0)                             # (S,) tiles needed at each size
    return size[(tiles * (size + TILE_OVERHEAD)).argmin()].item()


def gather_rows(x, tb, rows):
    """x: (B, L, nh, hd); tb: (n,) batch index; rows: (n, R) rows of x[tb] seen as an (L nh, hd) table -> (n, R, hd).

    One index_select on a view of x's rows, without copying x. Where x is a slice of the KV cache's buffer, batch
    b's rows start x.stride(0) / hd rows after batch b - 1's (not L nh): the view spans the unused rows between
    batches too, and the index never points at them."""
    B, L, nh, hd = x.shape
    if x.stride()[1:] != (nh * hd, hd, 1) or x.stride(0) % hd:
        x = x.contiguous()                                     # rows not on that grid (e.g. an expanded tensor)
    sB = x.stride(0) // hd
    table = x.as_strided(((B - 1) * sB + L * nh, hd), (hd, 1))
    return table.index_select(0, (tb[:, None] * sB + rows).flatten()).view(*rows.shape, hd)


def in_slabs(fn, per_slab, *xs):
    """fn(*xs), run on slabs of per_slab rows of every x (dim 0) and concatenated, so that its temporaries (the
    attention scores) stay bounded: at Wan's size all of them at once would take tens of GB per layer. With
    autograd each slab is checkpointed: backward recomputes its scores one slab at a time instead of keeping all."""
    n, per_slab = len(xs[0]), max(1, per_slab)
    if n <= per_slab:
        return fn(*xs)
    parts = []
    for lo in range(0, n, per_slab):
        slab = [x[lo:lo + per_slab] for x in xs]
        parts.append(checkpoint(fn, *slab, use_reentrant=False) if torch.is_grad_enabled() else fn(*slab))
    return tuple(torch.cat(outputs) for outputs in zip(*parts))


# ----------------------------------------------------------------------------------------------------------------
# The two branches through a varlen kernel (the paper's fast path)
# ----------------------------------------------------------------------------------------------------------------
# A varlen kernel runs many independent attentions of different lengths in one call: the queries of all of them
# packed into one (total_q, H, hd) tensor, their keys into one (total_k, H, hd) tensor, and the cumulative
# sequence lengths cu_q, cu_k (N + 1,) saying where sequence n's rows start and end. Routed attention fits it:
#   own chunk    each (batch, chunk) is a sequence of T queries against its own T keys (all nh heads at once)
#   history      each key block (batch, head, history chunk j) is a sequence: the queries that chose chunk j
#                against chunk j's T keys (one head per sequence, so H = 1)
# A query that chose k chunks is in k history sequences; merge_lse_many folds its k outputs into one, and
# rf.merge_lse then folds in the own chunk. Both kernels return the LSE, but neither backpropagates through it
# (their backward ignores the LSE's gradient): lse_with_grad adds that term (see there).
#
# The kernels take the signature of torch.nn.attention.varlen.varlen_attn as found in PyTorch 2.10 to 2.13:
#   varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=AuxRequest(lse=True), ...)
#   -> out (total_q, H, hd), lse; lse comes out (H, total_q) from the op although the docstring says (total_q, H),
#   so lse_heads_first accepts both. PyTorch 2.9 and older have no varlen module. Flash-attn's
#   flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, return_attn_probs=True)
#   -> (out, softmax_lse (H, total_q), _) is wrapped to look the same (flash_varlen). Both need CUDA and fp16/bf16.

def torch_varlen(fn=None):
    """torch's varlen_attn (or fn, a function with its signature: tests pass a CPU stand-in) as a kernel
    (q, k, v, cu_q, cu_k, max_q, max_k) -> (out, lse). Imported here, not at the top: torch < 2.10 lacks it."""
    try:
        from torch.nn.attention.varlen import AuxRequest, varlen_attn
    except ImportError as e:
        raise RuntimeError(f"attn_backend='varlen' needs torch.nn.attention.varlen.varlen_attn (PyTorch 2.10 or "
                           f"later; this is {torch.__version__}): upgrade PyTorch or use attn_backend="
                           f"'two_branch'") from e
    def kernel(q, k, v, cu_q, cu_k, max_q, max_k):
        if fn is None:
            cuda_only("varlen", q)
        return (fn or varlen_attn)(q, k, v, cu_q, cu_k, max_q, max_k, return_aux=AuxRequest(lse=True))
    return kernel


def flash_varlen():
    """flash-attn's flash_attn_varlen_func as a kernel (q, k, v, cu_q, cu_k, max_q, max_k) -> (out, lse)."""
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError as e:
        raise RuntimeError("attn_backend='flash' needs flash-attn (pip install flash-attn on a CUDA machine); "
                           "without it use attn_backend='varlen' (PyTorch's own kernel) or 'two_branch'") from e

    def kernel(q, k, v, cu_q, cu_k, max_q, max_k):
        cuda_only("flash", q)
        out, lse, _ = flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, return_attn_probs=True)
        return out, lse
    return kernel


KERNELS = {"varlen": torch_varlen, "flash": flash_varlen}


def cuda_only(name, q):
    if not q.is_cuda:
        raise RuntimeError(f"attn_backend={name!r} runs on CUDA only (its kernel is flash attention), these "
                           f"tensors are on {q.device.type}: use attn_backend='two_branch' there")


def varlen_backend(name):
    """The two branches of routed attention through kernel `name` (varlen | flash), or a clear error."""
    kernel = KERNELS[name]()

    def branches(q, k, v, selected, chunk_tokens):
        return varlen_branches(q, k, v, selected, chunk_tokens, kernel)
    return branches


def lse_heads_first(lse, H, total):
    """A kernel's LSE as (H, total) fp32, whether it came out (H, total) or (total, H)."""
    return (lse if tuple(lse.shape) == (H, total) else lse.transpose(0, 1)).float()


class _LSEGrad(torch.autograd.Function):
    """Identity on a kernel's LSE (H, total_q) whose backward adds what the kernel's own backward leaves out.

    lse_i = log sum_j exp(s_ij), s_ij = scale q_i . k_j, so with g = dLoss/dlse:
        dq_i += scale g_i sum_j p_ij k_j      (= scale g_i times attention with the keys as values)
        dk_j += scale sum_i g_i p_ij q_i      (= the value gradient of that attention for output gradient scale g q)
    Both come from one more call of the kernel (forward and its backward), with the same sequences."""

    @staticmethod
    def forward(ctx, lse, q, k, call):
        ctx.save_for_backward(q, k)
        ctx.call = call
        return lse.clone()

    @staticmethod
    def backward(ctx, g):                                                             # g: (H, total_q)
        q, k = ctx.saved_tensors
        scale = q.shape[-1] ** -0.5
        g = scale * g.transpose(0, 1)[..., None]                                      # (total_q, H, 1)
        with torch.enable_grad():
            keys_as_values = k.detach().requires_grad_()
            pk = ctx.call(q.detach(), k.detach(), keys_as_values)                      # (total_q, H, hd)
            dk, = torch.autograd.grad(pk, keys_as_values, (g * q.float()).to(pk.dtype))
        return None, (g * pk.float()).to(q.dtype), dk, None


def lse_kernel_call(kernel, q, k, v, cu_q, cu_k, max_q, max_k):
    """One kernel call -> out (total_q, H, hd), lse (H, total_q) fp32, differentiable in both."""
    out, lse = kernel(q, k, v, cu_q, cu_k, max_q, max_k)
    lse = lse_heads_first(lse.detach(), q.shape[1], q.shape[0])
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad):
        lse = _LSEGrad.apply(lse, q, k, lambda q, k, v: kernel(q, k, v, cu_q, cu_k, max_q, max_k)[0])
    return out, lse


def varlen_branches(q, k, v, selected, chunk_tokens, kernel):
    """fast_attn.two_branches computed by a varlen kernel: ((o, lse) own chunk, (o, lse) history), o (B, nh, Lq, hd)
    fp32, lse (B, nh, Lq). q: (B, Lq, nh, hd); k, v: (B, Lk, nh, hd), opening with Nh history chunks of T tokens;
    selected: (B, nh, Lq, Nh); kernel: (q, k, v, cu_q, cu_k, max_q, max_k) -> (out, lse), e.g. torch_varlen()."""
    T, (B, Lq, nh, hd), Nh = chunk_tokens, q.shape, selected.shape[-1]
    Lk, dev = k.shape[1], q.device

    # own chunk: B Lq / T sequences of T queries and T keys, nh heads, in the order the tokens already have
    cu = torch.arange(0, B * Lq + 1, T, device=dev, dtype=torch.int32)                 # (B Lq / T + 1,)
    own = [x[:, x.shape[1] - Lq:].reshape(B * Lq, nh, -1) for x in (q, k, v)]         # (B Lq, nh, hd)
    o_own, l_own = lse_kernel_call(kernel, *own, cu, cu, T, T)
    own = o_own.float().view(B, Lq, nh, -1).transpose(1, 2), l_own.view(nh, B, Lq).transpose(0, 1)
    return own, varlen_history(q, k[:, :Nh * T], v[:, :Nh * T], selected, T, kernel)


def pack_history(selected, Lq, nh, T):
    """The history branch as varlen sequences. selected: (B, nh, Lq, Nh) ->
        q_row (P,)    row of each packed query in q seen as a (B Lq nh, hd) table (the pair's query token and head)
        out_row (P,)  the output it belongs to, (b nh + h) Lq + i, for merge_lse_many
        block (G,)    each sequence's key block (b nh + h) Nh + j, one sequence per block some query chose
        cu_q (G + 1,) cumulative query counts; cu_k (G + 1,) cumulative key counts (T each), both int32
    Pairs are sorted by block, so a sequence's queries are consecutive rows."""
    B, _, _, Nh = selected.shape
    b, h, j, i = selected.transpose(2, 3).nonzero(as_tuple=True)                      # (P,) each, sorted by (b, h, j)
    block, count = torch.unique_consecutive((b * nh + h) * Nh + j, return_counts=True)  # (G,) each
    zero = count.new_zeros(1)
    cu_q = torch.cat([zero, count.cumsum(0)]).int()
    cu_k = (torch.arange(len(block) + 1, device=selected.device) * T).int()
    return (b * Lq + i) * nh + h, (b * nh + h) * Lq + i, block, cu_q, cu_k


def varlen_history(q, k, v, selected, T, kernel):
    """The history branch through the kernel -> o (B, nh, Lq, hd), lse (B, nh, Lq); -inf where nothing chosen."""
    B, Lq, nh, hd = q.shape
    Nh = selected.shape[-1]
    q_row, out_row, block, cu_q, cu_k = pack_history(selected, Lq, nh, T)
    if len(q_row) == 0:
        return (q.new_zeros(B, nh, Lq, v.shape[-1], dtype=torch.float),
                q.new_full((B, nh, Lq), -torch.inf, dtype=torch.float))
    qp = q.reshape(-1, hd).index_select(0, q_row)[:, None]                            # (P, 1, hd)
    kb, kh, kj = block // (nh * Nh), block // Nh % nh, block % Nh                     # (G,) each block's b, h, j
    key_row = (kj[:, None] * T + torch.arange(T, device=q.device)) * nh + kh[:, None]  # (G, T) rows of k[kb]
    kp, vp = (gather_rows(x, kb, key_row).flatten(0, 1)[:, None] for x in (k, v))     # (G T, 1, hd)
    max_q = int((cu_q[1:] - cu_q[:-1]).max())
    o, lse = lse_kernel_call(kernel, qp, kp, vp, cu_q, cu_k, max_q, T)                # (P, 1, hd), (1, P)
    o, lse = merge_lse_many(o[:, 0], lse[0], out_row, B * nh * Lq)
    return o.view(B, nh, Lq, -1), lse.view(B, nh, Lq)
