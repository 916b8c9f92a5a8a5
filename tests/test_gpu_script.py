"""benchmarks/gpu.py --tiny: the GPU check runs every section at toy sizes on the CPU, so the script cannot rot while
no GPU is at hand. It must exit 0, write both reports, and every section must pass (a check may SKIP only with its
reason)."""

import json
import subprocess
import sys

import pytest

from conftest import ROOT

pytestmark = pytest.mark.slow                 # the GPU script as a subprocess


def test_gpu_check_tiny_runs_every_section(tmp_path):
    out = tmp_path / "report"
    script = str(ROOT / "benchmarks" / "gpu.py")
    run = subprocess.run([sys.executable, script, "--tiny", "--profile", "--out", str(out)],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    markdown = (out / "report.md").read_text()
    assert report["tiny"] is True
    assert [s["key"] for s in report["sections"]] == ["d", "a", "b", "c"]
    for section in report["sections"]:
        assert section["status"] == "PASS", section
        assert section["checks"], section["key"]
        for check in section["checks"]:
            assert check["status"] in ("PASS", "SKIP"), check
            assert check["status"] == "PASS" or check["note"], check                  # a SKIP says why
        assert f"## {section['key']}. {section['title']}: PASS" in markdown
    names = [c["name"] for s in report["sections"] for c in s["checks"]]
    for expected in ("two-stream forward, flex vs sdpa", "routed attention, varlen vs reference",
                     "generate, cached vs uncached", "training steps/s", "forward, ours", "Resampling Forcing step",
                     "sampling, top-5", "evidence --scale gpu", "15 s video, chunk"):
        assert any(expected in n for n in names), expected
    assert "PASS" in run.stdout and "FAIL" not in run.stdout
    # --profile: where the time of each timed call goes, one table per call
    headers = [line for line in (out / "profiles.txt").read_text().splitlines() if line.startswith("#####")]
    for expected in ("toy training step, degrade autoregressive", "Wan forward, ours", "Wan forward, diffusers",
                     "history chunks, two_branch"):
        assert any(expected in h for h in headers), expected
