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

from dataloader.datasets import get_spec
from MoMKE.experiments import pool, sweep
from MoMKE.runlog import read_result
from tests.conftest import report_tables, tiny_config

# A seed's two fixed conditions share a stage 1; the rate trains its own.
SWEEP = dict(test_condition=["a", "atv"], missing_rate=[0.5], epochs=12, stage_epochs=4,
             hidden=8, depth=1, threads=1)


@pytest.mark.slow
def test_two_workers_give_the_in_process_tables_and_share_stage1(tiny_root, tmp_path):
    local = sweep.plan(tiny_config(tiny_root, tmp_path / "local", **SWEEP), [3])
    assert not sweep.run_locally(local).failed
    runs = sweep.plan(tiny_config(tiny_root, tmp_path / "pool", **SWEEP), [3])
    summary = pool.run_in_pool(runs, jobs=2, threads=1)
    assert [r.label for r in summary.trained] == [r.label for r in runs] and not summary.failed
    assert report_tables(tmp_path / "pool", tmp_path / "r1") == \
        report_tables(tmp_path / "local", tmp_path / "r2")
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
    assert jobs == int(0.5 * 4 / get_spec("CMUMOSEI").peak_memory_gb) and "half of 4 GB" in why
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


def test_a_worker_that_starts_after_its_sweep_is_killed_ends(tmp_path):
    """The race of a SIGKILL: a worker spawned just before its sweep dies runs its initializer
    already orphaned. It must end as well, not wait for work from a sweep that is gone (a
    suite run used to leave one such worker behind, adopted by init)."""
    root = Path(__file__).resolve().parents[1]
    pid_file = tmp_path / "worker.pid"
    worker = (
        "import os, queue, sys, time\n"
        "sweep = int(sys.argv[1])\n"
        "while os.getppid() == sweep:\n"  # start only once the 'sweep' is gone
        "    time.sleep(0.05)\n"
        f"open({str(pid_file)!r} + '.tmp', 'w').write(str(os.getpid()))\n"
        f"os.replace({str(pid_file)!r} + '.tmp', {str(pid_file)!r})\n"  # whole when it appears
        "from MoMKE.experiments import pool\n"
        "slots = queue.Queue()\n"
        "slots.put(0)\n"
        "pool._init_worker(slots, [], 1, 0, sweep)\n"
        "time.sleep(60)\n")
    # The 'sweep' starts the worker and dies at once, before the worker initialises.
    dying_sweep = ("import os, subprocess, sys\n"
                   f"subprocess.Popen([sys.executable, '-c', {worker!r}, str(os.getpid())])\n")
    subprocess.run([sys.executable, "-c", dying_sweep], cwd=root, check=True,
                   env={**os.environ, "PYTHONPATH": str(root)})
    deadline = time.time() + 60
    while time.time() < deadline and not pid_file.exists():
        time.sleep(0.1)
    worker_pid = int(pid_file.read_text())
    try:
        while time.time() < deadline and _alive(worker_pid):
            time.sleep(0.2)
        assert not _alive(worker_pid), "a worker that started after its sweep died waited on"
    finally:
        if _alive(worker_pid):
            os.kill(worker_pid, signal.SIGKILL)
