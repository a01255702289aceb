"""scripts/gpu_check.sh on a machine without a GPU: the CPU parts run, the table says so, exit 0;
a part that breaks is a FAILED row naming its log, and the check fails loudly."""
from __future__ import annotations

import os
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
    assert "skipped" in summary.split("| 2 tests |")[1].splitlines()[0]  # the CUDA tests skip
    assert "| 3 devices | CMU-MOSI atv, 6 epochs on the CPU |" in summary
    assert 'sh scripts/gpu_check.sh --out "$OUT"' in summary
    assert len(list((tmp_path / "check").iterdir())) <= 8


def test_a_part_that_breaks_is_a_failed_row_and_the_others_still_run(tmp_path):
    (tmp_path / "empty").mkdir()
    done = subprocess.run(["sh", "scripts/gpu_check.sh", "--out", str(tmp_path / "check"),
                           "--data-root", str(tmp_path / "empty")], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and "GPU check FAILED" in done.stderr
    assert "label file not found" in done.stderr
    summary = (tmp_path / "check" / "summary.md").read_text()
    assert "| 2 tests |" in summary and "| 4 runs/GPU |" in summary  # before and after it
    assert "FAILED: exited with" in summary and "(see devices.log)" in summary


def test_with_only_python3_on_the_path_the_script_runs(tmp_path):
    """A GPU image may have python3 and no `python`: the script finds it."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("dirname", "sh"):
        (bin_dir / tool).symlink_to(subprocess.run(["sh", "-c", f"command -v {tool}"],
                                                   capture_output=True, text=True,
                                                   check=True).stdout.strip())
    (bin_dir / "python3").symlink_to(os.path.realpath(__import__("sys").executable))
    done = subprocess.run(["sh", "scripts/gpu_check.sh", "--help"], cwd=ROOT,
                          env={**os.environ, "PATH": str(bin_dir)}, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "--deadline" in done.stdout


def test_a_part_out_of_time_is_a_failed_row_and_the_table_is_written(tmp_path):
    done = subprocess.run(["sh", "scripts/gpu_check.sh", "--out", str(tmp_path / "check"),
                           "--data-root", str(tmp_path), "--deadline", "8"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    summary = (tmp_path / "check" / "summary.md").read_text()
    assert done.returncode == 1 and "FAILED" in summary
    assert "time" in summary.split("| 2 tests |")[1].splitlines()[0]
