"""scripts/gpu_check.sh on a machine without a GPU: the CPU parts run, the table says so, exit 0;
a part that breaks fails the check loudly."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine the check runs in full")
def test_without_a_gpu_the_check_runs_the_cpu_parts_and_says_so(tiny_root, tmp_path):
    done = subprocess.run(["sh", "scripts/gpu_check.sh", "--out", str(tmp_path / "check"),
                           "--data-root", str(tiny_root), "--hidden", "8"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = (tmp_path / "check" / "summary.md").read_text()
    assert "no CUDA device" in summary and summary in done.stdout
    assert "skipped" in summary.split("| 1 tests |")[1].splitlines()[0]  # the CUDA tests skip
    assert "| 3 devices | CMU-MOSI atv, 6 epochs on the CPU |" in summary


def test_a_part_that_breaks_fails_the_check(tmp_path):
    (tmp_path / "empty").mkdir()
    done = subprocess.run(["sh", "scripts/gpu_check.sh", "--out", str(tmp_path / "check"),
                           "--data-root", str(tmp_path / "empty")], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and "GPU check FAILED" in done.stderr
    assert "label file not found" in done.stderr
