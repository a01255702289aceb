"""The sweep: one planned list of runs, complete runs skipped, an interrupted sweep resumed."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from MoMKE.experiments import sweep
from MoMKE.results.report import write_report
from tests.conftest import tiny_config

ROOT = Path(__file__).resolve().parents[1]


def test_plan_lists_every_seed_and_setting_in_stage1_order(tiny_root, tmp_path):
    config = tiny_config(tiny_root, tmp_path, test_condition=["a", "atv"], missing_rate=[0.3])
    runs = sweep.plan(config, [1, 2])
    assert [run.label for run in runs] == [
        "CMUMOSI fixed-a seed 1", "CMUMOSI fixed-atv seed 1", "CMUMOSI random-0.3 seed 1",
        "CMUMOSI fixed-a seed 2", "CMUMOSI fixed-atv seed 2", "CMUMOSI random-0.3 seed 2"]
    assert len({run.folder for run in runs}) == 6


def test_failed_runs_are_reported_and_the_sweep_goes_on(tiny_root, tmp_path, monkeypatch):
    config = tiny_config(tiny_root, tmp_path, test_condition=["a", "t"])
    original = sweep.runner.run

    def flaky(config, data, setting, device):
        if setting.condition == "a":
            raise RuntimeError("disk full")
        return original(config, data, setting, device)

    monkeypatch.setattr(sweep.runner, "run", flaky)
    summary = sweep.run_locally(sweep.plan(config, [3]))
    assert [r.label for r in summary.trained] == ["CMUMOSI fixed-t seed 3"]
    assert [(r.label, e) for r, e in summary.failed] == [
        ("CMUMOSI fixed-a seed 3", "RuntimeError: disk full")]
    assert "FAILED CMUMOSI fixed-a seed 3: RuntimeError: disk full" in summary.report()


def _sweep_command(tiny_root, output):
    return [sys.executable, "-m", "MoMKE.sweep", "--dataset", "CMUMOSI", "--data-root",
            str(tiny_root), "--output-dir", str(output), "--test-condition", "atv,a,t",
            "--seeds", "4", "--epochs", "40", "--stage-epochs", "10", "--hidden", "8",
            "--depth", "1", "--batch-size", "4", "--device", "cpu"]


@pytest.mark.slow
def test_a_killed_sweep_resumes_to_the_same_table(tiny_root, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    killed = tmp_path / "killed"
    process = subprocess.Popen(_sweep_command(tiny_root, killed), cwd=ROOT, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    second = None
    while time.time() < deadline and process.poll() is None:
        done = list(killed.glob("CMUMOSI/*/result.json"))
        started = [p for p in killed.glob("CMUMOSI/*/epochs.jsonl") if p.stat().st_size > 0]
        if len(done) == 1 and len(started) == 2:
            second = next(p.parent for p in started if not (p.parent / "result.json").exists())
            break
        time.sleep(0.05)
    assert second is not None, "the sweep should be killed while its second run trains"
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (second / "result.json").exists()  # the half-written run does not look whole

    subprocess.run(_sweep_command(tiny_root, killed), cwd=ROOT, env=env, check=True,
                   capture_output=True)
    whole = tmp_path / "whole"
    subprocess.run(_sweep_command(tiny_root, whole), cwd=ROOT, env=env, check=True,
                   capture_output=True)
    resumed = write_report([killed], tmp_path / "report_killed", plots=False)
    reference = write_report([whole], tmp_path / "report_whole", plots=False)
    assert [p.name for p in resumed] == [p.name for p in reference]
    for a, b in zip(resumed, reference):
        assert a.read_text() == b.read_text()
    assert len(list(killed.glob("CMUMOSI/*/result.json"))) == 3
