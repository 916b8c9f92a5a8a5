"""The mask rule of rf.py: who sees whom, in one stream (block-causal) and in two ([history ; noisy]).

The rule is checked against a brute-force reading of its plain-language statement, one (query, key) pair at a time,
as the dense mask, as the model expands it from frames to tokens, as the ASCII picture, and as the flex BlockMasks
that torch.compile builds on a GPU."""

import shutil

import pytest
import torch

import fast_attn
import media
import rf
from conftest import FPC, block_lists


def brute_mask(chunk_ids, stream_ids):
    """The plain-language rules, one (query, key) pair at a time.

    One stream (all HISTORY): block-causal, chunk i sees chunks <= i.
    Two streams [H ; Z]: H_j sees H_<=j; Z_i sees Z_i and H_<i only (never H_i, never another Z)."""
    L = len(chunk_ids)
    m = torch.zeros(L, L, dtype=torch.bool)
    for q in range(L):
        for k in range(L):
            cq, ck = chunk_ids[q], chunk_ids[k]
            sq, sk = stream_ids[q], stream_ids[k]
            if sq == rf.HISTORY:
                m[q, k] = sk == rf.HISTORY and ck <= cq
            else:
                m[q, k] = (sk == rf.NOISY and ck == cq) or (sk == rf.HISTORY and ck < cq)
    return m


def per_token(ids, tokens):
    return [c for c in ids for _ in range(tokens)]


@pytest.mark.parametrize("num_chunks", [1, 2, 3, 5])
@pytest.mark.parametrize("tokens", [1, 3])
def test_dense_mask_matches_brute_force(num_chunks, tokens):
    # block-causal
    c = per_token(list(range(num_chunks)), tokens)
    s = [rf.HISTORY] * len(c)
    got = rf.dense_mask(torch.tensor(c), torch.tensor(s))
    assert torch.equal(got, brute_mask(c, s))
    # two-stream, full [H_1..H_N ; Z_1..Z_N] and as the forward builds it, without H_N
    for n_hist in (num_chunks, num_chunks - 1):
        c = per_token(list(range(n_hist)) + list(range(num_chunks)), tokens)
        s = per_token([rf.HISTORY] * n_hist + [rf.NOISY] * num_chunks, tokens)
        got = rf.dense_mask(torch.tensor(c), torch.tensor(s))
        want = brute_mask(c, s)
        assert torch.equal(got, want)
        if num_chunks >= 2:     # the rule is not trivially "all" or "causal over the whole sequence"
            assert not want.all() and not torch.equal(want, torch.ones_like(want).tril())


def test_model_mask_expands_frames_to_tokens(model):
    """DiT._attention_rule takes ids per frame and expands them per token before applying the rule."""
    fpc, N, S_ = 2, 3, 4
    chunk_f = torch.arange(N * fpc) // fpc
    hist_f = chunk_f[: (N - 1) * fpc]
    c_f = torch.cat([hist_f, chunk_f])
    s_f = torch.cat([torch.full_like(hist_f, rf.HISTORY), torch.full_like(chunk_f, rf.NOISY)])
    got = model._attention_rule(c_f, s_f, S_)[0]
    assert got.dtype == torch.bool and got.shape == (len(c_f) * S_,) * 2
    assert torch.equal(got, brute_mask(per_token(c_f.tolist(), S_), per_token(s_f.tolist(), S_)))


def test_mask_ascii():
    want = "\n".join([
        "q\\k  H1  H2  H3  Z1  Z2  Z3",
        " H1   #   .   .   .   .   .",
        " H2   #   #   .   .   .   .",
        " H3   #   #   #   .   .   .",
        " Z1   .   .   .   #   .   .",
        " Z2   #   .   .   .   #   .",
        " Z3   #   #   .   .   .   #",
    ])
    assert media.mask_ascii(3) == want
    assert media.mask_ascii(3, two_stream=False) == "\n".join([
        "q\\k  C1  C2  C3",
        " C1   #   .   .",
        " C2   #   #   .",
        " C3   #   #   #",
    ])


@pytest.mark.slow                                                  # torch.compile: some 20 s on 2 cores
@pytest.mark.skipif(not (shutil.which("g++") or shutil.which("c++")), reason="torch.compile needs a C++ compiler")
def test_compiled_block_masks_equal_eager(monkeypatch):
    """On CUDA the flex masks are built by torch.compile(create_block_mask): eager, it materialises the whole
    (L, L) grid (some 35 GB at Wan's training length). Compiled here on the CPU, both of our mask_mods (the rule's
    two-stream layout, and routing) must give the same blocks as eager. Inputs span several 128-token blocks. (The
    routed mask the flex backend uses is built from the selection instead, fast_attn.flex_routed_mask; test_routing
    checks that it gives these same blocks.)"""
    frames, tokens = 12, 40                                        # 2 streams x 12 frames x 40 = 960 tokens
    chunk = torch.arange(frames) // FPC
    chunk, stream = torch.cat([chunk, chunk]), torch.tensor([rf.HISTORY] * frames + [rf.NOISY] * frames)
    chunk, stream = chunk.repeat_interleave(tokens), stream.repeat_interleave(tokens)
    selected = torch.rand(1, 2, len(chunk), frames // FPC, generator=torch.Generator().manual_seed(0)) < 0.3
    selected[:, 0] = False                                         # head 0 routes to no history chunk at all

    def build():                                                   # __wrapped__: past flex_block_mask's cache
        return (fast_attn.flex_block_mask.__wrapped__(rf.may_attend, tuple(chunk.tolist()), tuple(stream.tolist()),
                                                     "cpu"),
                fast_attn.flex_routed_mask_grid(rf.may_attend_routed, selected, chunk, stream))

    eager = build()
    monkeypatch.setattr(fast_attn, "create_block_mask", torch.compile(fast_attn.create_block_mask))
    for want, got in zip(eager, build()):
        assert all(torch.equal(a, b) for a, b in zip(block_lists(want), block_lists(got)))
    routed = eager[1].kv_num_blocks + eager[1].full_kv_num_blocks                          # (1, 2, query blocks)
    assert (routed[0, 0] <= routed[0, 1]).all() and (routed[0, 0] < routed[0, 1]).any()  # per head, as selected
