"""What every test module shares: the tiny configs, the tiny random model, and small helpers.

pytest loads this file before any test module and puts tests/ on sys.path, so a test module takes what it needs with
`from conftest import make_model, rel_err, ...`. Test modules never import one another: a helper used by two of
them lives here.

    ROOT                  the repository root (made importable here: rf.py, train.py, tiny_data/, ...)
    TINY, HW, S, FPC, C   the toy preset shrunk to a 2-layer, 64-wide DiT, on 16x16 frames
    make_model(...)       that DiT with every output-relevant parameter random (so equality tests mean something)
    rand_inputs(...)      noisy frames, per-chunk t, text context and a history for it
    chunk(v, i)           frames of chunk i
    rel_err, max_diff, differs, seeded, one_line
    TINY_TRAIN_ARGS, run_train(out, ...), exit_message(e)     train.py at a tiny size, in this process
    TINY_WAN, TINY_WAN_T2V                                    the Wan2.1 layout at a tiny size

Markers: `slow` marks the tests that run scripts as subprocesses or take long (train/sample end to end, torchrun,
the GPU script's --tiny run, torch.compile). `pytest -m "not slow"` runs the method's tests in under a minute.
"""

import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import rf  # noqa: E402  (needs ROOT on sys.path)


# The test models are tiny: one thread is faster than two, and far faster when another process keeps the other
# core busy (OpenMP threads then wait on each other; a 2-layer forward went from 10 ms to 400 ms).
torch.set_num_threads(1)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: runs a script as a subprocess or takes long; skip with -m 'not slow'")


@pytest.fixture(autouse=True)
def _seed_everything():
    """Every test starts from the same global RNG state, so a failure reproduces exactly."""
    torch.manual_seed(0)
    yield


# ----------------------------------------------------------------------------------------------------------------
# The tiny toy DiT (rf.preset("toy", **TINY)), on the CPU in fp32
# ----------------------------------------------------------------------------------------------------------------

TINY = dict(num_layers=2, dim=64, ffn_dim=128, num_heads=2, text_len=6, text_dim=32)   # rf.preset("toy") overrides
HW = (16, 16)                 # 16x16 frames, patch (1, 4, 4) -> 16 tokens per frame
S = 16                        # tokens per frame
FPC = 2                       # the toy preset's frames_per_chunk
C = 3                         # the toy preset's in_dim


def make_model(seed=0, **overrides):
    """The toy preset shrunk to TINY, with every output-relevant parameter non-trivial, in eval mode.

    The Wan init zeros the head weight (every output would be the same constant), so the model gets random head
    weights and perturbed modulation / norm / bias parameters; an equality test on it then means something, and each
    one is paired with a check that a deliberately wrong variant DOES change the result."""
    torch.manual_seed(seed)
    model = rf.DiT(rf.preset("toy", **{**TINY, **overrides}))
    g = torch.Generator().manual_seed(seed + 1000)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if name == "head.head.weight":
                p.copy_(noise / math.sqrt(p.shape[1]))               # Wan inits it to zero
            elif name.endswith("modulation"):
                p.add_(0.3 * noise)
            elif name.endswith("bias"):
                p.add_(0.05 * noise)
            elif p.ndim == 1:                                          # norm3 / RMSNorm weights
                p.add_(0.2 * noise)
    return model.eval()


@pytest.fixture(scope="module")
def model():
    """One make_model() per test module, for the tests that only run it (never train it)."""
    return make_model()


def rand_inputs(B=2, N=3, seed=1, Lt=4):
    """x (B, N*FPC, C, *HW), t (B, N*FPC) one value per chunk, ctx (B, Lt, text_dim), history like x."""
    g = torch.Generator().manual_seed(seed)
    F_ = N * FPC
    x = torch.randn(B, F_, C, *HW, generator=g)
    t = torch.rand(B, N, generator=g).repeat_interleave(FPC, dim=1)  # one t per chunk
    ctx = torch.randn(B, Lt, TINY["text_dim"], generator=g)
    hist = torch.randn(B, F_, C, *HW, generator=g)
    return x, t, ctx, hist


def chunk(v, i):
    """Frames of chunk i of v (B, F, ...)."""
    return v[:, i * FPC:(i + 1) * FPC]


# ----------------------------------------------------------------------------------------------------------------
# Comparisons and messages
# ----------------------------------------------------------------------------------------------------------------

def seeded(seed):
    return torch.Generator().manual_seed(seed)


def rel_err(a, b):
    """||a - b|| / ||b||, computed in fp32 (so bf16 / fp16 tensors compare too)."""
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def max_diff(a, b):
    return (a - b).abs().max().item() if a.numel() else 0.0


def differs(a, b, tol=1e-4):
    """Clearly different, not merely rounding: relative difference above tol."""
    return rel_err(a, b) > tol


def one_line(e):
    """The message of a raised error (a pytest.raises ExceptionInfo, an exception or a string), checked to be one
    non-empty line."""
    msg = str(e.value) if isinstance(e, pytest.ExceptionInfo) else str(e)
    assert msg and "\n" not in msg, f"not a one-line message: {msg!r}"
    return msg


# ----------------------------------------------------------------------------------------------------------------
# train.py at a tiny size, run in this process
# ----------------------------------------------------------------------------------------------------------------

TINY_TRAIN_ARGS = ["--dim", "32", "--ffn_dim", "64", "--num_heads", "2", "--num_layers", "1", "--batch_size", "2",
                   "--clip_frames", "4", "--data", str(ROOT / "tiny_data/train.npz"), "--log_every", "1"]


def run_train(out, *extra):
    """train.py with TINY_TRAIN_ARGS, writing to `out`; a usage error raises SystemExit (see exit_message)."""
    import train
    train.main(TINY_TRAIN_ARGS + ["--out", str(out), *extra])


def exit_message(excinfo):
    """The message a script exited with, from pytest.raises(SystemExit)."""
    return str(excinfo.value.code)


# ----------------------------------------------------------------------------------------------------------------
# The Wan2.1 layout at a tiny size
# ----------------------------------------------------------------------------------------------------------------

# rf.preset("wan2.1-t2v-1.3b") overrides: a 2-layer Wan, 3 latent frames per chunk of 8x8 (test_wan_loading.py)
TINY_WAN = dict(dim=64, ffn_dim=128, freq_dim=32, num_heads=2, num_layers=2, text_len=8, text_dim=32, in_dim=4,
                out_dim=4, frames_per_chunk=3, frame_size=(8, 8))

# the tiny Wan2.1 repo of test_wan_t2v.py: latent 4x4 -> 32x32 pixels; chunks of 3 latent frames (the preset's)
TINY_WAN_T2V = dict(dim=32, ffn_dim=64, freq_dim=32, num_heads=2, num_layers=2, text_len=16, text_dim=32, in_dim=4,
                    out_dim=4, frame_size=(4, 4))


def block_lists(mask):
    """A BlockMask's four block tensors: which key blocks each query block reads, partly and fully."""
    return [getattr(mask, k) for k in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices")]
