"""Shared pytest setup: make the repository root importable (rf.py, tiny_data/) however pytest is started."""

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


# The test models are tiny: one thread is faster than two, and far faster when another process keeps the other
# core busy (OpenMP threads then wait on each other; a 2-layer forward went from 10 ms to 400 ms).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed_everything():
    """Every test starts from the same global RNG state, so a failure reproduces exactly."""
    torch.manual_seed(0)
    yield
