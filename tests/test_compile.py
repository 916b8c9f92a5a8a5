"""fast_attn.compile_blocks (train.py / sample.py --compile): compiled blocks compute what the eager ones do.

CI has no GPU and need not have a C compiler, so these tests compile with dynamo's aot_eager backend: the graphs
dynamo captures (guards, graph breaks, the autograd graph) run on the eager kernels. That is where a KV cache can go
wrong under compile (a traced graph keeping a stale Python int), and it is what these tests look at. With this
CPU's PyTorch they pass with or without rf's eager cache reads (LayerKV); the H100 run that made us add those used
PyTorch 2.11. Inductor's fused kernels are checked on a GPU by benchmarks/gpu.py (compiled against eager: forward,
gradients, a sampled video).
"""

import copy

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import fast_attn
import rf
import sample
from conftest import make_model, rand_inputs, rel_err, run_train

pytestmark = pytest.mark.slow                 # torch.compile (dynamo traces): seconds per test


def compiled_copy(model):
    torch._dynamo.reset()
    return fast_attn.compile_blocks(copy.deepcopy(model), backend="aot_eager")


def test_compile_keeps_the_checkpoint_names():
    model = make_model()
    keys = list(model.state_dict())
    assert list(compiled_copy(model).state_dict()) == keys       # checkpoints load either way


@pytest.mark.parametrize("mode", ["none", "autoregressive"])
def test_compiled_training_loss_and_gradients_match(mode):
    """Teacher forcing, and Resampling Forcing whose self-resampling rolls the history out through the KV cache."""
    eager = make_model().train()
    fast = compiled_copy(eager)
    fast.grad_checkpointing = True                                 # train.py's Wan default, through compiled blocks
    clip, _, ctx, _ = rand_inputs(N=4)
    losses = []
    for model in (eager, fast):
        loss, _, _ = rf.training_loss(model, clip, ctx, mode, generator=torch.Generator().manual_seed(3))
        loss.backward()
        losses.append(loss.item())
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)
    for (name, p), q in zip(eager.named_parameters(), fast.parameters()):
        assert rel_err(q.grad, p.grad) < 1e-4, name


@pytest.mark.parametrize("routing", [{}, {"top_k": 1}])
def test_compiled_cached_sampling_matches_eager(routing):
    """Five chunks through the KV cache, with CFG: every chunk, not only the first, as the eager sampler makes it.
    A sampler whose compiled graph kept the cache's length from an earlier call would get chunk 0 right only."""
    eager = make_model(**routing)
    fast = compiled_copy(eager)
    _, _, ctx, _ = rand_inputs()
    kw = dict(steps=3, neg_context=torch.zeros_like(ctx), cfg_scale=3.0, seed=0)
    with torch.no_grad():
        rf.generate(fast, ctx, 4, **kw)                            # an earlier, shorter video first
        want, got = rf.generate(eager, ctx, 10, **kw), rf.generate(fast, ctx, 10, **kw)
    for i in range(0, 10, 2):
        assert rel_err(got[:, i:i + 2], want[:, i:i + 2]) < 1e-5, f"chunk {i // 2}"


def test_compiled_training_resumes_exactly(tmp_path, monkeypatch):
    """train.py --compile stopped at step 2 and resumed to step 4 ends where a run straight to step 4 does, every
    tensor equal: weights, EMA copies, optimizer state. Resampling Forcing from step 3, so the resumed steps roll
    the history out through the compiled blocks and the KV cache. With dynamo's automatic dynamic shapes (no
    dynamic=False) the two runs differed by about 3e-8: which graphs it built hung on the order it met the shapes."""
    compile_blocks = fast_attn.compile_blocks

    def traced(model, **options):                                  # aot_eager: no C compiler needed on CI
        torch._dynamo.reset()
        return compile_blocks(model, backend="aot_eager", **options)

    monkeypatch.setattr(fast_attn, "compile_blocks", traced)
    args = ("--warmup_steps", "2", "--no-sample", "--compile")
    run_train(tmp_path / "straight", "--steps", "4", *args)
    run_train(tmp_path / "resumed", "--steps", "2", *args)
    run_train(tmp_path / "resumed", "--steps", "4", "--resume", *args)
    files = sorted(p.name for p in (tmp_path / "straight" / "latest").glob("*.safetensors"))
    assert "dit.safetensors" in files and "train_state.safetensors" in files
    for name in files:
        a, b = (load_file(str(tmp_path / run / "latest" / name)) for run in ("straight", "resumed"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_train_and_sample_with_compile_flag(tmp_path, monkeypatch, capsys):
    """train.py --compile trains the same weights as without (4 steps, Resampling Forcing from step 3), and
    sample.py --compile makes the same video: the flag only changes how the blocks run."""
    calls = []
    compile_blocks = fast_attn.compile_blocks

    def traced(model, **options):                                  # aot_eager: no C compiler needed on CI
        calls.append(model)
        torch._dynamo.reset()
        return compile_blocks(model, backend="aot_eager", **options)

    monkeypatch.setattr(fast_attn, "compile_blocks", traced)
    for name, extra in (("eager", []), ("compiled", ["--compile"])):
        run_train(tmp_path / name, "--steps", "4", "--warmup_steps", "2", "--no-sample", *extra)
    assert len(calls) == 1
    a, b = (load_file(str(tmp_path / name / "latest" / "dit.safetensors")) for name in ("eager", "compiled"))
    for key in a:
        assert rel_err(b[key], a[key]) < 1e-5, key
    for name, extra in (("eager", []), ("compiled", ["--compile"])):
        sample.main(["--ckpt", str(tmp_path / "eager" / "latest"), "--frames", "6", "--num", "1", "--save_frames",
                     "--out", str(tmp_path / f"sample_{name}"), *extra])
        assert (sample.UNVERIFIED_COMPILE in capsys.readouterr().out) == bool(extra)   # says it is unverified
    assert len(calls) == 2
    x, y = (np.load(tmp_path / f"sample_{name}" / "frames.npz") for name in ("eager", "compiled"))
    assert all((x[k] == y[k]).all() for k in x.files)
