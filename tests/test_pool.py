"""Several runs at once: a pool of worker processes gives the in-process tables, trains a shared
stage 1 once before its runs, and picks its size from the cores and the memory."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from MoMKE.experiments import pool, sweep
from MoMKE.results.report import write_report
from MoMKE.runlog import read_result
from tests.conftest import tiny_config

# A seed's two fixed conditions share a stage 1; the rate trains its own.
SWEEP = dict(test_condition=["a", "atv"], missing_rate=[0.5], epochs=12, stage_epochs=4,
             hidden=8, depth=1, threads=1)


def _tables(output, out) -> dict[str, str]:
    return {p.name: p.read_text() for p in write_report([output], out, plots=False)}


@pytest.mark.slow
def test_two_workers_give_the_in_process_tables_and_share_stage1(tiny_root, tmp_path):
    local = sweep.plan(tiny_config(tiny_root, tmp_path / "local", **SWEEP), [3])
    assert not sweep.run_locally(local).failed
    runs = sweep.plan(tiny_config(tiny_root, tmp_path / "pool", **SWEEP), [3])
    summary = pool.run_in_pool(runs, jobs=2, threads=1)
    assert [r.label for r in summary.trained] == [r.label for r in runs] and not summary.failed
    assert _tables(tmp_path / "pool", tmp_path / "r1") == _tables(tmp_path / "local",
                                                                  tmp_path / "r2")
    for run in runs:  # the fixed runs waited for their stage-1 task and reused it
        assert read_result(run.folder)["stage1_reused"] == [run.setting.protocol == "fixed"]
    again = pool.run_in_pool(runs, jobs=2, threads=1)
    assert not again.trained and len(again.skipped) == len(runs)


def test_a_run_that_fails_in_a_worker_is_reported_with_its_sentence(tiny_root, tmp_path):
    config = tiny_config(tiny_root, tmp_path, test_condition=["a", "t"], stage_epochs=0,
                         epochs=2, lr=1e30, threads=1)  # diverges at once
    summary = pool.run_in_pool(sweep.plan(config, [3]), jobs=2, threads=1)
    assert not summary.trained and len(summary.failed) == 2
    assert all(error.startswith("Diverged: ") and "--lr" in error for _, error in summary.failed)


def test_default_jobs_follow_the_cores_and_half_the_memory(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(pool, "available_cores", lambda: 16)
    monkeypatch.setattr(pool, "machine_memory_bytes", lambda: 64 * 2**30)
    assert pool.default_jobs("CMUMOSI", cpu)[0] == 16  # one 1-thread run per core
    assert pool.default_jobs("CMUMOSI", cpu, threads=4)[0] == 4
    monkeypatch.setattr(pool, "machine_memory_bytes", lambda: 4 * 2**30)
    jobs, why = pool.default_jobs("CMUMOSEI", cpu)
    assert jobs == int(0.5 * 4 / pool.PEAK_MEMORY_GB["CMUMOSEI"]) and "half of 4 GB" in why
    monkeypatch.setattr(pool, "available_cores", lambda: 1)
    assert pool.default_jobs("CMUMOSI", cpu)[0] == 1


def test_jobs_must_be_auto_or_a_positive_number(tiny_root, tmp_path, capsys):
    code = sweep.main(["--dataset", "CMUMOSI", "--data-root", str(tiny_root), "--output-dir",
                       str(tmp_path), "--jobs", "0"])
    assert code == 2 and "--jobs '0' must be auto or a positive number" in capsys.readouterr().err


def _children(pid: int) -> set[int]:
    children = Path(f"/proc/{pid}/task/{pid}/children")
    return {int(c) for c in children.read_text().split()} if children.exists() else set()


def _alive(pid: int) -> bool:
    """Running, not a zombie (a container's first process may never reap what it adopts)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads /proc (Linux)")
def test_workers_end_when_their_sweep_is_killed_outright(tiny_root, tmp_path):
    """SIGKILL gives a sweep no chance to stop its pool: each worker notices its parent is
    gone and ends, instead of training on for nobody."""
    root = Path(__file__).resolve().parents[1]
    output = tmp_path / "killed"
    command = [sys.executable, "-m", "MoMKE.sweep", "--dataset", "CMUMOSI", "--data-root",
               str(tiny_root), "--output-dir", str(output), "--test-condition", "a,t,atv",
               "--missing-rate", "0.3", "--seeds", "4", "--epochs", "400", "--stage-epochs",
               "200", "--hidden", "8", "--depth", "1", "--batch-size", "4", "--jobs", "2",
               "--threads", "1"]
    sweep_process = subprocess.Popen(command, cwd=root, env={**os.environ, "PYTHONPATH": str(root)},
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline, workers = time.time() + 120, set()
        while time.time() < deadline and sweep_process.poll() is None:
            if len(list(output.glob("CMUMOSI/*/epochs.jsonl"))) >= 2:  # both workers train
                workers = {c for c in _children(sweep_process.pid)
                           if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes()}
                break
            time.sleep(0.1)
        assert len(workers) == 2, "two workers should be training when the sweep is killed"
    finally:
        sweep_process.send_signal(signal.SIGKILL)
        sweep_process.wait()
    deadline = time.time() + 20
    while time.time() < deadline and any(_alive(w) for w in workers):
        time.sleep(0.2)
    assert not any(_alive(w) for w in workers), "a worker trained on after its sweep was killed"
