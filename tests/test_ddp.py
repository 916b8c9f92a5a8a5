"""A batch split across processes (torchrun, DistributedDataParallel over gloo on the CPU) or into gradient-accumulation
micro-batches trains as the whole batch in one process does: the same per-step losses and the same final weights,
up to float rounding. Each piece draws the whole batch's randomness and keeps its rows (train.BatchSlice)."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, TINY_TRAIN_ARGS, run_train

pytestmark = pytest.mark.slow                 # train.py runs, one of them under torchrun

RUN = ["--batch_size", "4", "--steps", "4", "--warmup_steps", "2", "--ckpt_every", "4", "--no-sample"]


def logged(out):
    return [json.loads(line) for line in open(out / "log.jsonl")]


def assert_same_run(a, b):
    la, lb = logged(a), logged(b)
    assert [r["mode"] for r in la] == [r["mode"] for r in lb] == ["none", "none", "autoregressive", "autoregressive"]
    for ra, rb in zip(la, lb):
        assert [x is None for x in ra["bucket_loss"]] == [x is None for x in rb["bucket_loss"]]
        got = [x for x in rb["bucket_loss"] if x is not None]
        assert got == pytest.approx([x for x in ra["bucket_loss"] if x is not None], rel=1e-5), (ra, rb)
    for name in ("dit", "dit_ema", "text_encoder"):
        wa, wb = (load_file(str(o / "step_0000004" / f"{name}.safetensors")) for o in (a, b))
        assert wa.keys() == wb.keys()
        for k in wa:
            torch.testing.assert_close(wb[k], wa[k], rtol=0, atol=1e-6, msg=f"{name} {k}")


def test_gradient_accumulation_matches_the_whole_batch(tmp_path):
    run_train(tmp_path / "one", *RUN)
    run_train(tmp_path / "accum", *RUN, "--grad_accum", "2")
    assert_same_run(tmp_path / "one", tmp_path / "accum")


def test_torchrun_two_processes_match_one(tmp_path):
    run_train(tmp_path / "one", *RUN)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    # 2 processes x 2 micro-batches of 1 clip: DDP's gradient averaging and its no_sync() both take part
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "train.py", *TINY_TRAIN_ARGS, "--out", str(tmp_path / "two"), *RUN, "--grad_accum", "2"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("device cpu; preset toy") == 1                  # one process speaks ...
    assert "2 process(es) x 2 micro-batch(es) of 1 clips per step" in proc.stdout
    assert sorted(p.name for p in (tmp_path / "two").glob("step_*")) == ["step_0000004"]   # ... and writes
    assert_same_run(tmp_path / "one", tmp_path / "two")


def test_a_batch_that_does_not_split_is_one_line_error(tmp_path):
    with pytest.raises(SystemExit) as e:
        run_train(tmp_path, *RUN, "--grad_accum", "3")
    assert "--batch_size 4 does not split" in str(e.value.code) and "multiple of 3" in str(e.value.code)
