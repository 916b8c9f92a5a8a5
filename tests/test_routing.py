"""Tests of history routing: the router, the log-sum-exp merge, the reference / two-branch / flex paths,
routing in both forwards and in cached sampling, and the reported sparsity.

The tiny random model of conftest.py (make_model), as in test_dit.py. Every equality test is paired with a wrong variant that must differ, so a
test cannot pass because routing silently did nothing."""

import math

import pytest
import torch

import checkpoints
import fast_attn
import media
import rf
from conftest import FPC, HW, S, TINY, block_lists, differs, make_model, rand_inputs, rel_err

T = FPC * S                           # tokens per chunk
NEG = dict(cfg_scale=3.0, neg_context=torch.zeros(1, 4, TINY["text_dim"]))   # CFG on: both branches route


def two_stream_ids(N, tokens=1):
    """Per-token (chunk, stream) of the two-stream forward's sequence [H_1 .. H_N-1 ; Z_1 .. Z_N]."""
    chunk = torch.cat([torch.arange(N - 1), torch.arange(N)]).repeat_interleave(tokens)
    stream = torch.tensor([rf.HISTORY] * (N - 1) + [rf.NOISY] * N).repeat_interleave(tokens)
    return chunk, stream


def forwards(model, x, t, ctx, hist):
    return model.forward_causal(x, t, ctx), model(x, t, ctx, history=hist)


def gen(model, ctx, num_frames, **kw):
    return rf.generate(model, ctx, num_frames, **{"steps": 2, "size": HW, "seed": 0, **NEG, **kw})


# ----------------------------------------------------------------------------------------------------------------
# 1. The router on planted inputs
# ----------------------------------------------------------------------------------------------------------------

def test_eligible_chunks_follow_the_rule():
    """Eligible = the earlier_history term of may_attend: strictly earlier history chunks, for H and Z queries alike."""
    N = 4
    chunk, stream = two_stream_ids(N)
    got = rf.eligible_chunks(chunk, N - 1)                                            # (2N - 1, N - 1)
    for q in range(len(chunk)):
        for j in range(N - 1):
            assert got[q, j] == (j < chunk[q]), (q, j)
            assert got[q, j] <= rf.may_attend(chunk[q], stream[q], torch.tensor(j), rf.HISTORY)  # a subset of it
    assert not got[stream == rf.NOISY].diagonal().any()           # Z_i never gets its own answer H_i


def planted(target, decoys, Nh, nh=2, hd=8):
    """Queries whose best *eligible* chunk is target[q]; decoys[q] (future chunks, the answer H_i) score higher."""
    Lq = len(target)
    phi = torch.eye(hd)[:Nh].expand(1, nh, Nh, hd).transpose(1, 2).clone()         # (1, Nh, nh, hd): phi_j = e_j
    q = torch.zeros(1, Lq, nh, hd)
    for i, (tg, ds) in enumerate(zip(target, decoys)):
        if tg is not None:
            q[0, i, :, tg] = 5.0
        for d in ds:
            q[0, i, :, d] = 9.0                                                      # better than the target
    q[..., Nh:] = torch.randn(1, Lq, nh, hd - Nh)                                   # noise the router must ignore
    return q, phi


def test_router_picks_the_planted_chunk_never_a_future_one_nor_the_answer():
    N = 5
    chunk, stream = two_stream_ids(N)
    Nh = N - 1
    eligible = rf.eligible_chunks(chunk, Nh)
    target, decoys = [], []
    for c, s in zip(chunk.tolist(), stream.tolist()):
        target.append(c - 2 if c >= 2 else (0 if c == 1 else None))   # an earlier chunk, not the latest one
        decoys.append([j for j in (c, c + 1) if j < Nh])              # own history copy H_c and the next chunk
    q, phi = planted(target, decoys, Nh)
    selected = rf.route(q, phi, eligible, top_k=1)                                    # (1, nh, Lq, Nh)
    for i, tg in enumerate(target):
        want = torch.zeros(Nh, dtype=torch.bool)
        if tg is not None:
            want[tg] = True
        assert torch.equal(selected[0, 0, i], want) and torch.equal(selected[0, 1, i], want), i
    assert not (selected & ~eligible).any()
    # wrong variant: without the eligibility rule, the router would pick the decoys
    assert (rf.route(q, phi, torch.ones_like(eligible), top_k=1) & ~eligible).any()
    # fewer eligible chunks than k: all of them; ties: the earlier chunk wins
    assert torch.equal(rf.route(q, phi, eligible, top_k=Nh + 3), eligible.expand_as(selected))
    tie = rf.route(torch.zeros(1, 1, 1, 4), torch.ones(1, 3, 1, 4), torch.ones(1, 3, dtype=torch.bool), top_k=2)
    assert tie.flatten().tolist() == [True, True, False]


@pytest.mark.filterwarnings("ignore:.*without torch.compile.*:UserWarning")
@torch.no_grad()
def test_planted_chunk_reaches_the_attention():
    """End to end through routed_attention: keys of chunk j all point along e_j (so phi_j = e_j) and the values
    say which chunk they belong to; the output's mass per chunk shows exactly which chunks a query read."""
    N, tokens, nh, hd = 4, 3, 2, 16
    chunk, stream = two_stream_ids(N, tokens)
    Nh, L = N - 1, len(chunk)
    k = torch.zeros(1, L, nh, hd)
    for j in range(N):
        k[0, (chunk == j) & (stream == rf.HISTORY), :, j] = 1.0                        # H_j keys along e_j
    v = torch.nn.functional.one_hot(chunk + N * stream, 2 * N).float()[None, :, None].expand(1, L, nh, 2 * N)
    q = torch.zeros(1, L, nh, hd)
    is_z = stream == rf.NOISY
    q[0, is_z, :, 0] = 3.0                                           # Z queries prefer chunk 0 ...
    q[0, is_z, :, 2] = 6.0                                           # ... but chunk 2 even more when eligible
    phi = rf.chunk_means(k[:, :Nh * tokens], tokens)
    assert torch.allclose(phi[0, :, 0], torch.eye(hd)[:Nh])
    for backend in ("sdpa", "two_branch", "flex"):
        routing = rf.Routing(chunk, stream, tokens, Nh, top_k=1, backend=backend)
        mass = rf.routed_attention(q, k, v, phi, routing)[0, :, 0]                     # (L, 2N): weight per chunk
        for i in range(N):                                            # Z_i: its own chunk + one chosen H chunk
            row = mass[is_z & (chunk == i)]
            read = {c for c in range(2 * N) if row[:, c].min() > 1e-6}
            want = {N + i} | ({2} if i > 2 else {0} if i >= 1 else set())
            assert read == want, (backend, i, read)


def test_window_and_sink_select_what_they_say():
    Nh = 6
    q_chunk = torch.arange(Nh + 1)                                   # one query per chunk, chunk c sees 0..c-1
    eligible = rf.eligible_chunks(q_chunk, Nh)
    q, phi = torch.randn(1, Nh + 1, 2, 8), torch.randn(1, Nh, 2, 8)
    for w in (1, 2, 4):
        for sink in (False, True):
            got = rf.route(q, phi, eligible, window=w, sink=sink)
            for c in range(Nh + 1):
                want = {j for j in range(c) if j >= c - w} | ({0} if sink and c > 0 else set())
                assert {j for j in range(Nh) if got[0, 0, c, j]} == want, (w, sink, c)
            assert torch.equal(got[0, 0], got[0, 1])                 # no query dependence, no head dependence
    # top-k + sink: the k best plus chunk 0, which does not count toward k
    got = rf.route(q, phi, eligible, top_k=1, sink=True)
    assert torch.equal(got[..., 0], eligible[:, 0].expand(1, 2, -1))
    assert (got[..., 1:].sum(-1) <= 1).all()


def test_config_fields_and_errors():
    cfg = rf.preset("toy", top_k=5)
    assert cfg.routed and not rf.preset("toy").routed and rf.preset("toy", window=2, sink=True).routed
    assert checkpoints.config_from_dict(checkpoints.config_to_dict(cfg)) == cfg                        # JSON-able, round trips
    for bad in (dict(top_k=0), dict(window=0), dict(top_k=2, window=2), dict(sink=True)):
        with pytest.raises(ValueError) as e:
            rf.preset("toy", **bad)
        assert "\n" not in str(e.value) and str(e.value)


# ----------------------------------------------------------------------------------------------------------------
# 2. The log-sum-exp merge
# ----------------------------------------------------------------------------------------------------------------

def test_merge_lse_equals_one_softmax_over_the_union():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, 5, n, 8, generator=g) * 2 for n in (4, 10, 10))         # logits up to ~20
    union = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    a = fast_attn.plain_attention_lse(q, k[:, :, :3], v[:, :, :3])
    b = fast_attn.plain_attention_lse(q, k[:, :, 3:], v[:, :, 3:])
    o, lse = rf.merge_lse(*a, *b)
    assert rel_err(o, union) <= 1e-5
    assert rel_err(lse, (q @ k.transpose(-1, -2) / math.sqrt(8)).logsumexp(-1)) <= 1e-5
    assert differs(a[0], union) and differs(b[0], union)             # neither branch alone is the answer
    # a branch with no keys (lse = -inf) changes nothing
    o2, lse2 = rf.merge_lse(*a, torch.zeros_like(a[0]), torch.full_like(a[1], -torch.inf))
    assert torch.equal(o2, a[0]) and torch.equal(lse2, a[1])
    # huge logits: still finite (the max is subtracted first)
    o3, _ = rf.merge_lse(a[0], a[1] + 1000, b[0], b[1] + 1000)
    assert rel_err(o3, union) <= 1e-5
    # many branches at once: three key sets, merged per output row
    parts = [fast_attn.plain_attention_lse(q, k[:, :, s], v[:, :, s])
             for s in (slice(0, 2), slice(2, 7), slice(7, 10))]
    rows = q.shape[0] * q.shape[1] * q.shape[2]
    o4, lse4 = fast_attn.merge_lse_many(torch.cat([o.reshape(rows, 8) for o, _ in parts]),
                                 torch.cat([lse.reshape(rows) for _, lse in parts]),
                                 torch.arange(rows).repeat(3), rows)
    assert rel_err(o4.view_as(union), union) <= 1e-5 and rel_err(lse4.view_as(lse), lse) <= 1e-5


def test_attention_lse_fused_kernel_equals_the_readable_one():
    """Without autograd on a CPU, fast_attn.attention_lse runs SDPA's fused kernel; fast_attn.plain_attention_lse is
    the plain steps. Same numbers, on contiguous tiles and on strided views (the own-chunk branch passes a transposed view)."""
    assert fast_attn._FUSED_CPU is not None, "no fused CPU kernel in this torch: the test compares a path with itself"
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, n, 16, generator=g) * 2 for n in (6, 10, 10))
    for args in ((q, k, v), tuple(x.transpose(0, 1) for x in (q, k, v))):
        readable = fast_attn.plain_attention_lse(*args)                       # grad mode on: the plain steps
        with torch.no_grad():
            fused = fast_attn.attention_lse(*args)
        assert fused[0].shape == readable[0].shape and fused[1].shape == readable[1].shape
        assert rel_err(fused[0], readable[0]) <= 1e-5 and rel_err(fused[1], readable[1]) <= 1e-5
    with torch.no_grad():                                        # wrong variant: other keys give another answer
        assert differs(fast_attn.attention_lse(q, k[:, :, :5], v[:, :, :5])[0], readable[0].transpose(0, 1))


@pytest.mark.parametrize("max_tile", [16, 256])
def test_history_branch_splits_big_groups_into_tiles(monkeypatch, max_tile):
    """A (batch, head, chunk) group read by more queries than a tile holds is cut into several tiles (MAX_TILE=16
    with 40 queries); the result is the same as one softmax per query over its selected chunks' keys. The keys are
    slices of bigger buffers, as in cached sampling."""
    monkeypatch.setattr(fast_attn, "MAX_TILE", max_tile)
    g = torch.Generator().manual_seed(1)
    B, Lq, nh, hd, Nh, Tc = 2, 40, 2, 8, 3, 5
    q, k, v = torch.randn(B, Lq, nh, hd, generator=g), *torch.randn(2, B, Nh * Tc + 7, nh, hd, generator=g)
    k, v = k[:, :Nh * Tc], v[:, :Nh * Tc]                        # slices of bigger buffers, as the KV cache passes
    selected = torch.rand(B, nh, Lq, Nh, generator=g) < 0.6
    selected[0, 0, :, 1] = True                                  # one group read by all 40 queries
    selected[1, 1, 7] = False                                    # a query with nothing selected
    chunk = torch.arange(Nh).repeat_interleave(Tc)
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(hd)
    allowed = selected[..., chunk]                                                    # (B, nh, Lq, Nh Tc)
    want = torch.einsum("bhqk,bkhd->bhqd", s.masked_fill(~allowed, -torch.inf).softmax(-1).nan_to_num(), v)
    for grad in (True, False):
        with torch.set_grad_enabled(grad):
            o, lse = fast_attn.history_branch(q, k, v, selected)
        assert rel_err(o, want) <= 1e-5
        assert rel_err(lse[allowed.any(-1)], s.masked_fill(~allowed, -torch.inf).logsumexp(-1)[allowed.any(-1)]) <= 1e-5
        assert (lse[1, 1, 7] == -torch.inf) and (o[1, 1, 7] == 0).all()
    assert differs(fast_attn.history_branch(q, k, v, selected.roll(1, dims=-1))[0], want)   # other chunks, other answer


def test_two_branch_in_slabs_equals_one_piece_and_keeps_no_scores(monkeypatch):
    """At Wan's size the scores of a two-branch call do not fit at once, so both branches run in slabs of at most
    SLAB_SCORES scores, each checkpointed under autograd. Slabs of one tile or one chunk (SLAB_SCORES=1) give the
    same values and gradients as one piece, and keep far less for backward: no scores, only the slabs' inputs and
    outputs. The layout is the two-stream training one: every token a query, Nh = N - 1 history chunks."""
    g = torch.Generator().manual_seed(0)
    B, nh, hd, T, N = 1, 2, 8, 64, 3
    L = (2 * N - 1) * T
    q, k, v = (torch.randn(B, L, nh, hd, generator=g).requires_grad_() for _ in range(3))
    selected = torch.rand(B, nh, L, N - 1, generator=g) < 0.5
    runs = {}
    for slab in (2**40, 1):
        monkeypatch.setattr(fast_attn, "SLAB_SCORES", slab)
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x.numel()) or x, lambda x: x):
            o = rf.two_branch_attention(q, k, v, selected, T, fast_attn.two_branches)
        grads = torch.autograd.grad(o.square().sum(), (q, k, v))
        runs[slab] = o, grads, sum(saved)
    (o1, g1, saved1), (o2, g2, saved2) = runs[2**40], runs[1]
    assert rel_err(o2, o1) <= 1e-6 and all(rel_err(a, b) <= 1e-6 for a, b in zip(g2, g1))
    assert saved2 < saved1 / 3, (saved2, saved1)               # T = 64 keys per query vs hd = 8: scores dominate


def test_tuned_branches_equal_the_plain_ones():
    """fast_attn.two_branches (tiles, slabs, gathers) against fast_attn.plain_branches (two masked softmaxes, as one
    would write them), and the merged two_branch_attention against the dense-mask reference (the sdpa backend): values
    and gradients. Keys of the cached layout (queries = the last chunk) and of the two-stream one."""
    g = torch.Generator().manual_seed(3)
    B, nh, hd, T, Nh = 2, 2, 8, 6, 4
    cached = torch.arange(Nh + 1), torch.full((Nh + 1,), rf.HISTORY), 1                  # chunk, stream, query chunks
    two_stream = (torch.cat([torch.arange(Nh), torch.arange(Nh + 1)]),
                  torch.tensor([rf.HISTORY] * Nh + [rf.NOISY] * (Nh + 1)), 2 * Nh + 1)
    for chunk, stream, n_q in (cached, two_stream):
        chunk, stream = chunk.repeat_interleave(T), stream.repeat_interleave(T)           # (Lk,) per token
        Lq, Lk = n_q * T, len(chunk)
        q = torch.randn(B, Lq, nh, hd, generator=g).requires_grad_()
        k, v = (torch.randn(B, Lk, nh, hd, generator=g).requires_grad_() for _ in range(2))
        selected = (torch.rand(B, nh, Lq, Nh, generator=g) < 0.5) & rf.eligible_chunks(chunk[-Lq:], Nh)
        outs = {}
        for name, branches in (("plain", fast_attn.plain_branches), ("tuned", fast_attn.two_branches)):
            o = rf.two_branch_attention(q, k, v, selected, T, branches)
            outs[name] = (o, *torch.autograd.grad(o.square().sum(), (q, k, v)))
        mask = rf.routed_mask(selected, chunk, stream)                                  # (B, nh, Lq, Lk)
        ref = rf.attention(q, k, v, mask)
        outs["sdpa"] = (ref, *torch.autograd.grad(ref.square().sum(), (q, k, v)))
        for name in ("plain", "tuned"):
            assert all(rel_err(a, b) <= 1e-5 for a, b in zip(outs[name], outs["sdpa"])), name
        assert differs(rf.two_branch_attention(q, k, v, ~selected, T), ref)             # other chunks: other answer


# ----------------------------------------------------------------------------------------------------------------
# 3. Routed forwards: k >= history equals dense; fast path and flex equal the reference
# ----------------------------------------------------------------------------------------------------------------

@torch.no_grad()
def test_k_at_least_the_history_equals_dense():
    N = 4                                      # at most N - 1 = 3 history chunks for any query
    x, t, ctx, hist = rand_inputs(N=N)
    dense = forwards(make_model(), x, t, ctx, hist)
    for backend in ("sdpa", "two_branch"):
        for k in (N - 1, N + 2):
            m = make_model(top_k=k)
            m.attn_backend = backend
            for got, want in zip(forwards(m, x, t, ctx, hist), dense):
                assert rel_err(got, want) <= 1e-5, (backend, k)
        m = make_model(top_k=1)                # wrong variant: k = 1 is not dense
        m.attn_backend = backend
        assert all(differs(got, want) for got, want in zip(forwards(m, x, t, ctx, hist), dense))
    # the window with w >= history is dense too, and w = 1 is not
    assert rel_err(make_model(window=N)(x, t, ctx, history=hist), dense[1]) <= 1e-5
    assert differs(make_model(window=1)(x, t, ctx, history=hist), dense[1])


@pytest.mark.filterwarnings("ignore:.*without torch.compile.*:UserWarning")
@pytest.mark.parametrize("rule", [dict(top_k=1), dict(top_k=2), dict(window=1, sink=True), dict(top_k=1, sink=True)])
def test_fast_path_and_flex_equal_the_reference(rule):
    N = 5
    x, t, ctx, hist = rand_inputs(N=N)
    m = make_model(**rule)
    out, grads = {}, {}
    for backend in ("sdpa", "two_branch"):
        m.attn_backend = backend
        m.zero_grad()
        out[backend] = forwards(m, x, t, ctx, hist)
        sum(o.square().mean() for o in out[backend]).backward()
        grads[backend] = torch.cat([p.grad.flatten() for p in m.parameters()])
    for got, ref in zip(out["two_branch"], out["sdpa"]):
        assert rel_err(got, ref) <= 1e-5
    assert rel_err(grads["two_branch"], grads["sdpa"]) <= 1e-5 and torch.isfinite(grads["two_branch"]).all()
    with torch.no_grad():
        m.attn_backend = "two_branch"          # without autograd the CPU tiles run SDPA's fused kernel
        for got, ref in zip(forwards(m, x, t, ctx, hist), out["sdpa"]):
            assert rel_err(got, ref) <= 1e-5
        m.attn_backend = "flex"                # CPU: flex runs unfused; forward only
        for got, ref in zip(forwards(m, x, t, ctx, hist), out["sdpa"]):
            assert rel_err(got, ref) <= 1e-5
        m.attn_backend = "sdpa"                # wrong variant: dense differs from this routing
        dense = forwards(make_model(), x, t, ctx, hist)
        assert all(differs(a, b) for a, b in zip(out["sdpa"], dense))


def routed_layout(kind, chunks, T):
    """(chunk, stream) key ids and the number of queries: the two-stream training sequence, or one chunk of queries
    against the cache's `chunks` finished chunks (the sampler's layout)."""
    if kind == "two_stream":
        chunk, stream = two_stream_ids(chunks + 1, T)
        return chunk, stream, len(chunk)
    chunk = torch.arange(chunks + 1).repeat_interleave(T)
    return chunk, torch.full_like(chunk, rf.HISTORY), T


@pytest.mark.filterwarnings("ignore:.*without torch.compile.*:UserWarning")
@pytest.mark.parametrize("kind,chunks,T,rule", [
    ("two_stream", 4, 40, dict(top_k=2)),           # 360 tokens: chunks and 128-token blocks do not line up
    ("two_stream", 1, 128, dict(top_k=1)),          # [H_0 ; Z_0 Z_1]: H_0 and Z_0 are one chunk, two streams
    ("two_stream", 3, 64, dict(window=1, sink=True)),
    ("cache", 6, 100, dict(top_k=2)),                # one chunk of queries against 700 keys
    ("cache", 3, 128, dict(top_k=1)),                # whole blocks: some are read fully, skipping the mask_mod
])
def test_flex_mask_built_from_the_selection(kind, chunks, T, rule):
    """fast_attn.flex_routed_mask builds the routed BlockMask from the router's choice, chunk by chunk: the same
    blocks, partial and full, as create_block_mask evaluating the rule on every (query, key) pair, and the same
    attention as the dense-mask reference, without ever evaluating an (Lq, Lk) grid."""
    B, nh, hd = 2, 2, 16
    chunk, stream, Lq = routed_layout(kind, chunks, T)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, n, nh, hd, generator=g) for n in (Lq, len(chunk), len(chunk)))
    selected = rf.route(q, rf.chunk_means(k[:, :chunks * T], T), rf.eligible_chunks(chunk[-Lq:], chunks), **rule)
    selected[0, 0] = False                                            # one head of one video reads no history
    largest = []

    def rule_spy(*ids):
        out = rf.may_attend_routed(*ids)
        largest.append(out.numel())
        return out

    fast_attn.flex_routed_mask(rule_spy, selected, chunk, stream)
    assert max(largest) <= B * nh * Lq * 2 * (chunks + 1)                  # (Lq, segments), not (Lq, Lk)
    mask = fast_attn.flex_routed_mask(rf.may_attend_routed, selected, chunk, stream)
    want = fast_attn.flex_routed_mask_grid(rf.may_attend_routed, selected, chunk, stream)
    assert all(torch.equal(a, b) for a, b in zip(block_lists(mask), block_lists(want)))
    if T == 128:
        assert mask.full_kv_num_blocks.sum() > 0
    ref = rf.attention(q, k, v, rf.routed_mask(selected, chunk, stream))
    assert rel_err(rf.attention(q, k, v, mask), ref) <= 1e-5
    other = fast_attn.flex_routed_mask(rf.may_attend_routed, ~selected, chunk, stream)   # wrong chunks: other answer
    assert differs(rf.attention(q, k, v, other), ref)


def test_flex_mask_keeps_a_key_block_past_the_end_partial():
    """A key block the keys do not fill is read through the mask_mod (partial), never as a full block, as
    create_block_mask has it: 128 queries of chunk 1 against 72 keys of chunk 0 and their own 128."""
    chunk = torch.cat([torch.zeros(72), torch.ones(128)]).long()
    stream = torch.full_like(chunk, rf.HISTORY)
    selected = torch.ones(1, 1, 128, 1, dtype=torch.bool)
    mask = fast_attn.flex_routed_mask(rf.may_attend_routed, selected, chunk, stream)
    want = fast_attn.flex_routed_mask_grid(rf.may_attend_routed, selected, chunk, stream)
    assert all(torch.equal(a, b) for a, b in zip(block_lists(mask), block_lists(want)))
    assert mask.kv_num_blocks.item() == 1 and mask.full_kv_num_blocks.item() == 1


@pytest.mark.filterwarnings("ignore:.*without torch.compile.*:UserWarning")
def test_cached_sampling_through_the_flex_mask_equals_the_reference():
    ctx = torch.randn(2, 4, TINY["text_dim"], generator=torch.Generator().manual_seed(7))
    m = make_model(top_k=1)
    videos = {}
    for backend in ("sdpa", "flex"):
        m.attn_backend = backend
        videos[backend] = gen(m, ctx, 4 * FPC)
    assert rel_err(videos["flex"], videos["sdpa"]) <= 1e-5
    assert differs(videos["flex"], gen(make_model(), ctx, 4 * FPC))                   # routing did something


@torch.no_grad()
def test_history_queries_route_too():
    """In the two-stream forward the H queries route as well, so H_j's features are what the cache will hold:
    the routed two-stream forward equals the routed block-causal forward on [history_<i at t = 0 ; x_i]."""
    N = 4
    x, t, ctx, hist = rand_inputs(N=N)
    m = make_model(top_k=1)
    v = m(x, t, ctx, history=hist)
    i = N - 1
    seq = torch.cat([hist[:, :i * FPC], x[:, i * FPC:]], dim=1)
    ts = torch.cat([torch.zeros(x.shape[0], i * FPC), t[:, i * FPC:]], dim=1)
    assert rel_err(v[:, i * FPC:], m.forward_causal(seq, ts, ctx)[:, -FPC:]) <= 1e-5
    assert differs(v[:, i * FPC:], make_model().forward_causal(seq, ts, ctx)[:, -FPC:])              # dense history differs


# ----------------------------------------------------------------------------------------------------------------
# 4. Cached sampling
# ----------------------------------------------------------------------------------------------------------------

def test_cache_keeps_each_chunks_mean_key():
    m = make_model(top_k=1)
    x, t, ctx, _ = rand_inputs(N=3)
    cache = rf.KVCache(m, 3 * FPC, HW)
    text_kv = m.encode_text(ctx)
    with torch.no_grad():
        for i in range(2):
            m.forward_chunk(x[:, i * FPC:(i + 1) * FPC], torch.zeros(2, FPC), text_kv, cache, commit=True)
    for layer in cache.layers:
        assert layer.chunks == 2 and layer.phi.dtype == torch.float
        want = layer.k[:, :2 * T].unflatten(1, (2, T)).mean(2)
        assert torch.allclose(layer.mean_keys(), want, atol=1e-6)


@pytest.mark.parametrize("rule", [dict(top_k=1), dict(top_k=2), dict(window=1, sink=True)])
def test_cached_sampling_with_routing_equals_uncached(rule):
    g = torch.Generator().manual_seed(5)
    ctx = torch.randn(2, 4, TINY["text_dim"], generator=g)
    prefix = torch.randn(2, FPC, 3, *HW, generator=g)
    m = make_model(**rule)
    a = gen(m, ctx, 5 * FPC, prefix=prefix, use_cache=True)
    b = gen(m, ctx, 5 * FPC, prefix=prefix, use_cache=False)
    assert rel_err(a, b) <= 1e-5
    assert differs(a[:, 3 * FPC:], gen(make_model(), ctx, 5 * FPC, prefix=prefix)[:, 3 * FPC:])  # not dense


def test_cached_sampling_with_k_at_least_the_history_equals_dense():
    ctx = torch.randn(1, 4, TINY["text_dim"], generator=torch.Generator().manual_seed(6))
    dense = gen(make_model(), ctx, 4 * FPC)
    assert rel_err(gen(make_model(top_k=3), ctx, 4 * FPC), dense) <= 1e-5
    assert differs(gen(make_model(top_k=1), ctx, 4 * FPC), dense)


# ----------------------------------------------------------------------------------------------------------------
# 5. Sparsity
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("k", [1, 2, 3])
def test_reported_sparsity_is_one_minus_k_over_history(k):
    """While generating chunk Nh + 1 every query has the same Nh history chunks: sparsity = 1 - k / Nh."""
    Nh = 4
    m = make_model(top_k=k)
    ctx = torch.randn(1, 4, TINY["text_dim"])
    log = media.RoutingLog()
    last = Nh                                                          # 0-based index of the chunk to watch

    def watch(i):                                                      # called after chunk i is finished
        m.routing_log = log if i == last - 1 else None

    gen(m, ctx, (Nh + 1) * FPC, progress=watch)
    assert log.sparsity() == pytest.approx(1 - k / Nh)
    assert len(log.frequency()) == Nh and log.frequency().sum().item() == pytest.approx(k)
    # in a forward, the history grows chunk by chunk: sparsity = 1 - sum min(k, n_q) / sum n_q over queries
    x, t, ctx2, hist = rand_inputs(B=1, N=Nh + 1)
    m.routing_log = log = media.RoutingLog()
    with torch.no_grad():
        m(x, t, ctx2, history=hist)
    n_q = [c for c in range(Nh) for _ in range(T)] + [c for c in range(Nh + 1) for _ in range(T)]   # H, then Z
    want = 1 - sum(min(k, n) for n in n_q) / sum(n_q)
    assert log.sparsity() == pytest.approx(want)
    m.routing_log = log = media.RoutingLog()                              # dense model: nothing skipped
    dense = make_model()
    dense.routing_log = log
    with torch.no_grad():
        dense(x, t, ctx2, history=hist)
    assert log.sparsity() == 0.0 and len(log.selected) == 0            # dense never routes


# ----------------------------------------------------------------------------------------------------------------
# 6. sample.py --routing_plot
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_sample_routing_plot(tmp_path, capsys):
    import sample
    from tiny_data import shapes
    from tiny_data.caption_encoder import CaptionEncoder

    def checkpoint(name, **routing):
        cfg = rf.preset("toy", **TINY, **routing)
        enc = CaptionEncoder(len(shapes.VOCAB), cfg.text_dim, cfg.text_len)
        checkpoints.save_checkpoint(tmp_path / name, {"dit": rf.DiT(cfg).state_dict(), "text_encoder": enc.state_dict()},
                           {"config": checkpoints.config_to_dict(cfg), "vocab": shapes.VOCAB, "step": 0, "stage": "test"})
        return str(tmp_path / name)

    png = tmp_path / "routing.png"
    argv = ["--caption", "red circle", "--num", "1", "--frames", str(4 * FPC), "--steps", "1", "--no-ema",
            "--out", str(tmp_path / "out"), "--routing_plot", str(png)]
    sample.main(["--ckpt", checkpoint("routed", top_k=1)] + argv)
    assert png.stat().st_size > 1000
    assert "sparsity 67%" in capsys.readouterr().out          # the last of 4 chunks: 1 - 1/3 of its history
    with pytest.raises(SystemExit) as e:
        sample.main(["--ckpt", checkpoint("dense")] + argv)
    assert "dense" in str(e.value.code)


def test_compiled_kernels_keep_compiling_past_eight_lengths():
    """Past dynamo's default of 8 compiled variants, flex_attention silently runs eagerly and materialises every
    score (the H100 run: 48 GiB asked for at 21 Wan frames). fast_attn.compiled raises the limit; counted with dynamo's
    eager backend, 12 lengths compile 12 times, none falls back. (config.patch, not monkeypatch: undoing a
    monkeypatch on dynamo's config left the setting missing for later tests.)"""
    from torch._dynamo.utils import counters
    with torch._dynamo.config.patch(recompile_limit=8):
        torch._dynamo.reset()
        counters.clear()
        fn = fast_attn.compiled(lambda x: x * 2 + 1, backend="eager", dynamic=False)
        assert torch._dynamo.config.recompile_limit >= fast_attn.RECOMPILE_LIMIT
        for n in range(1, 13):
            assert torch.equal(fn(torch.ones(n)), torch.full((n,), 3.0))
        assert counters["stats"]["unique_graphs"] == 12
