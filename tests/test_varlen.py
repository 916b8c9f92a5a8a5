"""Tests of the varlen backends: the packing of routed attention into variable-length sequences
(cumulative sequence lengths, index maps), the log-sum-exp merges and the LSE gradient the kernels leave out.

The kernels themselves need CUDA (benchmarks/gpu.py checks them there). Here a CPU stand-in with the exact signature
of torch.nn.attention.varlen.varlen_attn (plain softmax attention per sequence) takes their place, and behaves as
they do where it matters: it checks its sequence arguments strictly, and its LSE carries no gradient. Every
equality is paired with a wrong variant that must fail it."""

import inspect
import sys

import pytest
import torch

import fast_attn
import rf
from conftest import differs, make_model, rand_inputs, rel_err


def fake_varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                     window_size=(-1, -1), enable_gqa=False, seqused_k=None, block_table=None, num_splits=None,
                     lse_layout="heads_first"):
    """varlen_attn written plainly: sequence n is query rows cu_seq_q[n]:cu_seq_q[n + 1] against key rows
    cu_seq_k[n]:cu_seq_k[n + 1], all heads. -> out (total_q, H, hd), and with return_aux.lse the LSE (H, total_q)
    (as the real op returns it; lse_layout="tokens_first" gives (total_q, H), as its docstring says), detached:
    the real kernels' backward ignores the LSE's gradient."""
    assert cu_seq_q.dtype == cu_seq_k.dtype == torch.int32 and len(cu_seq_q) == len(cu_seq_k)
    assert cu_seq_q[0] == 0 and cu_seq_k[0] == 0
    assert cu_seq_q[-1] == len(query) and cu_seq_k[-1] == len(key) == len(value)
    len_q, len_k = cu_seq_q.diff(), cu_seq_k.diff()
    assert (len_q >= 0).all() and (len_k >= 0).all()
    assert max_q == len_q.max() and max_k == len_k.max()   # the real kernel sizes its grid by these
    assert window_size == (-1, -1) and scale is None and not enable_gqa
    outs, lses = [], []
    for a, b, c, d in zip(cu_seq_q[:-1].tolist(), cu_seq_q[1:].tolist(), cu_seq_k[:-1].tolist(),
                          cu_seq_k[1:].tolist()):
        q, k, v = (x.transpose(0, 1) for x in (query[a:b], key[c:d], value[c:d]))      # (H, L, hd)
        s = (q.float() @ k.float().transpose(-1, -2)) * query.shape[-1] ** -0.5          # (H, Lq_n, Lk_n)
        lses.append(s.logsumexp(-1))
        outs.append((s.softmax(-1) @ v.float()).transpose(0, 1).to(query.dtype))
    out, lse = torch.cat(outs), torch.cat(lses, dim=1).detach()                          # (total_q, H, hd), (H, -)
    if return_aux is not None and return_aux.lse:
        return out, lse if lse_layout == "heads_first" else lse.transpose(0, 1)
    return out


def fake_kernel(**options):
    return fast_attn.torch_varlen(lambda *args, **kw: fake_varlen_attn(*args, **kw, **options))


def test_stand_in_has_the_signature_of_the_installed_kernel():
    varlen = pytest.importorskip("torch.nn.attention.varlen", reason="PyTorch < 2.10 has no varlen_attn")
    real = list(inspect.signature(varlen.varlen_attn).parameters)
    fake = list(inspect.signature(fake_varlen_attn).parameters)
    assert fake[:len(real)] == real, (real, fake)


def routed_case(layout, seed=3, B=2, nh=2, hd=8, T=6, Nh=4, p=0.5):
    """Random q, k, v and a random selection over a layout: 'cached' (queries = the last chunk, as in sampling) or
    'two_stream' (the training forward). Returns q, k, v, selected, T, chunk, stream."""
    g = torch.Generator().manual_seed(seed)
    if layout == "cached":
        chunk, stream, n_q = torch.arange(Nh + 1), torch.full((Nh + 1,), rf.HISTORY), 1
    else:
        chunk = torch.cat([torch.arange(Nh), torch.arange(Nh + 1)])
        stream, n_q = torch.tensor([rf.HISTORY] * Nh + [rf.NOISY] * (Nh + 1)), 2 * Nh + 1
    chunk, stream = chunk.repeat_interleave(T), stream.repeat_interleave(T)
    Lq, Lk = n_q * T, len(chunk)
    q = torch.randn(B, Lq, nh, hd, generator=g).requires_grad_()
    k, v = (torch.randn(B, Lk, nh, hd, generator=g).requires_grad_() for _ in range(2))
    selected = (torch.rand(B, nh, Lq, Nh, generator=g) < p) & rf.eligible_chunks(chunk[-Lq:], Nh)
    return q, k, v, selected, T, chunk, stream


def out_and_grads(q, k, v, selected, T, branches):
    o = rf.two_branch_attention(q, k, v, selected, T, branches)
    return (o, *torch.autograd.grad(o.square().sum(), (q, k, v)))


def test_packing_indexes_what_it_says():
    """pack_history on a small hand-checked selection: one sequence per chosen key block, its queries in order."""
    B, nh, Lq, Nh, T = 1, 2, 3, 2, 4
    selected = torch.zeros(B, nh, Lq, Nh, dtype=torch.bool)
    selected[0, 0, 0, 1] = selected[0, 0, 2, 1] = True          # head 0: queries 0, 2 chose chunk 1
    selected[0, 1, 1, 0] = True                                 # head 1: query 1 chose chunk 0
    q_row, out_row, block, cu_q, cu_k = fast_attn.pack_history(selected, Lq, nh, T)
    assert block.tolist() == [1, 2]                             # (b nh + h) Nh + j: (h 0, j 1), (h 1, j 0)
    assert cu_q.tolist() == [0, 2, 3] and cu_k.tolist() == [0, 4, 8]
    assert q_row.tolist() == [0 * nh + 0, 2 * nh + 0, 1 * nh + 1]   # (b Lq + i) nh + h
    assert out_row.tolist() == [0 * Lq + 0, 0 * Lq + 2, 1 * Lq + 1]  # (b nh + h) Lq + i


@pytest.mark.parametrize("layout", ["cached", "two_stream"])
@pytest.mark.parametrize("lse_layout", ["heads_first", "tokens_first"])
def test_varlen_branches_equal_the_plain_ones_and_the_reference(layout, lse_layout):
    """Each branch (o and LSE) against fast_attn.plain_branches; the merged output and its gradients against plain and
    against the dense-mask reference (the sdpa backend). Queries with no history chunk (the first chunk) included."""
    q, k, v, selected, T, chunk, stream = routed_case(layout)
    kernel = fake_kernel(lse_layout=lse_layout)
    with torch.no_grad():
        got = fast_attn.varlen_branches(q, k, v, selected, T, kernel)
        want = fast_attn.plain_branches(q, k, v, selected, T)
    for (o, lse), (o_ref, lse_ref) in zip(got, want):
        assert rel_err(o, o_ref) <= 1e-5
        assert torch.equal(lse.isinf(), lse_ref.isinf())                           # -inf: no chunk chosen
        assert rel_err(lse[lse_ref.isfinite()], lse_ref[lse_ref.isfinite()]) <= 1e-5
    assert want[1][1].isinf().any() and want[1][1].isfinite().any()              # both kinds of query present
    ours = out_and_grads(q, k, v, selected, T, lambda *a: fast_attn.varlen_branches(*a, kernel))
    plain = out_and_grads(q, k, v, selected, T, fast_attn.plain_branches)
    ref = rf.attention(q, k, v, rf.routed_mask(selected, chunk, stream))
    sdpa = (ref, *torch.autograd.grad(ref.square().sum(), (q, k, v)))
    for name, a, b, c in zip("o dq dk dv".split(), ours, plain, sdpa):
        assert rel_err(a, b) <= 1e-5 and rel_err(a, c) <= 1e-5, name


def test_off_by_one_sequence_boundaries_fail(monkeypatch):
    """Wrong variant: cu_seqlens with one inner boundary moved by one row (a query read against its neighbour's
    chunk) must fail the comparison, so the test above cannot pass by accident."""
    q, k, v, selected, T, chunk, stream = routed_case("two_stream")
    right = fast_attn.pack_history

    def shifted(*args):
        q_row, out_row, block, cu_q, cu_k = right(*args)
        cu_q = cu_q.clone()
        cu_q[len(cu_q) // 2] += 1
        return q_row, out_row, block, cu_q, cu_k

    monkeypatch.setattr(fast_attn, "pack_history", shifted)
    with torch.no_grad():
        o = rf.two_branch_attention(q, k, v, selected, T, lambda *a: fast_attn.varlen_branches(*a, fake_kernel()))
        assert differs(o, rf.attention(q, k, v, rf.routed_mask(selected, chunk, stream)))


def test_without_the_lse_gradient_the_gradients_are_wrong(monkeypatch):
    """The kernels do not backpropagate through their LSE; _LSEGrad adds that term. Without it (the kernel's own
    autograd alone) q's and k's gradients must be wrong, while the values stay right."""
    q, k, v, selected, T, chunk, stream = routed_case("two_stream")
    kernel = fake_kernel()
    right = out_and_grads(q, k, v, selected, T, fast_attn.plain_branches)
    monkeypatch.setattr(fast_attn._LSEGrad, "apply", lambda lse, *rest: lse)
    wrong = out_and_grads(q, k, v, selected, T, lambda *a: fast_attn.varlen_branches(*a, kernel))
    assert rel_err(wrong[0], right[0]) <= 1e-5 and rel_err(wrong[3], right[3]) <= 1e-5   # o and dv need no LSE
    assert differs(wrong[1], right[1]) and differs(wrong[2], right[2])


@pytest.fixture
def cpu_varlen(monkeypatch):
    """attn_backend 'varlen' served by the stand-in, so the model's whole path runs on the CPU."""
    monkeypatch.setitem(fast_attn.KERNELS, "varlen", fake_kernel)


@pytest.mark.parametrize("rule", [dict(top_k=1), dict(window=1, sink=True)])
def test_model_with_the_varlen_backend_equals_sdpa(cpu_varlen, rule):
    """Both forwards of a routed model, values and parameter gradients: backend varlen against sdpa."""
    x, t, ctx, hist = rand_inputs(N=4)
    m = make_model(**rule)
    out, grads = {}, {}
    for backend in ("sdpa", "varlen"):
        m.attn_backend = backend
        m.zero_grad()
        out[backend] = m.forward_causal(x, t, ctx), m(x, t, ctx, history=hist)
        sum(o.square().mean() for o in out[backend]).backward()
        grads[backend] = torch.cat([p.grad.flatten() for p in m.parameters()])
    for got, ref in zip(out["varlen"], out["sdpa"]):
        assert rel_err(got, ref) <= 1e-5
    assert rel_err(grads["varlen"], grads["sdpa"]) <= 1e-5
    dense = make_model()                                     # wrong variant: routing off gives another answer
    assert differs(dense(x, t, ctx, history=hist), out["sdpa"][1])


def test_cached_sampling_through_varlen_equals_the_sdpa_reference(cpu_varlen):
    """The sampler's path (one chunk of queries against the KV cache, CFG, re-encoding at t = 0) through the varlen
    backend: the video equals the uncached SDPA reference. (benchmarks/gpu.py samples this way on CUDA.)"""
    g = torch.Generator().manual_seed(5)
    m = make_model(top_k=1)
    ctx = torch.randn(2, 4, m.cfg.text_dim, generator=g)
    prefix = torch.randn(2, m.cfg.frames_per_chunk, 3, 8, 8, generator=g)
    kw = dict(steps=2, size=(8, 8), seed=0, cfg_scale=3.0, neg_context=torch.zeros(1, 4, m.cfg.text_dim),
              prefix=prefix)
    videos = {}
    for backend, cache in (("varlen", True), ("sdpa", False)):
        m.attn_backend = backend
        videos[backend] = rf.generate(m, ctx, 5 * m.cfg.frames_per_chunk, use_cache=cache, **kw)
    assert rel_err(videos["varlen"], videos["sdpa"]) <= 1e-5
    m.attn_backend = "sdpa"                                  # wrong variant: routing off gives another video
    m.cfg.top_k = None
    assert differs(rf.generate(m, ctx, 5 * m.cfg.frames_per_chunk, **kw), videos["sdpa"])


def test_missing_kernels_are_one_line_errors(monkeypatch):
    q, k, v, selected, T, chunk, stream = routed_case("cached")
    routing = rf.Routing(chunk, stream, chunk_tokens=T, num_history=4, top_k=1, backend="varlen")
    phi = rf.chunk_means(k[:, :4 * T], T)
    if _has_varlen():
        with pytest.raises(RuntimeError, match="CUDA only") as e:               # the real kernel, on a CPU tensor
            rf.routed_attention(q, k, v, phi, routing)
        assert "\n" not in str(e.value) and "two_branch" in str(e.value)
    monkeypatch.setitem(sys.modules, "torch.nn.attention.varlen", None)          # a torch without the module
    with pytest.raises(RuntimeError, match=r"PyTorch 2\.10 or later") as e:
        rf.routed_attention(q, k, v, phi, routing)
    assert "\n" not in str(e.value)
    monkeypatch.setitem(sys.modules, "flash_attn", None)                         # no flash-attn installed
    routing.backend = "flash"
    with pytest.raises(RuntimeError, match="needs flash-attn") as e:
        rf.routed_attention(q, k, v, phi, routing)
    assert "\n" not in str(e.value)


def _has_varlen():
    try:
        import torch.nn.attention.varlen  # noqa: F401
        return True
    except ImportError:
        return False
