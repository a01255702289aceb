"""The Ray executor: the sweep's list of runs as Ray tasks gives the local executor's tables, joins a
cluster by address, survives a killed worker, and reports a run's own error once.

Every test but the first needs Ray (requirements-ray.txt) and is skipped without it. One local Ray
instance with 2 CPUs serves the in-process tests; the head started with `ray start` comes first in
this file because `ray stop` stops every Ray process of the machine, that instance included.
"""
from __future__ import annotations

import dataclasses
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from MoMKE.experiments import sweep
from MoMKE.experiments.ray_executor import run_on_ray
from MoMKE.runlog import read_result
from MoMKE.runner import torch_threads
from tests.conftest import report_tables, tiny_config

ROOT = Path(__file__).resolve().parents[1]
RAY_CLI = [sys.executable, "-c", "from ray.scripts.scripts import main; main()"]  # `ray`, any PATH
SEEDS = [3, 4]
# Two seeds, each with a stage 1 shared by two fixed conditions and a rate that trains its own.
SWEEP = dict(test_condition=["a", "atv"], missing_rate=[0.5], epochs=40, stage_epochs=10,
             hidden=8, depth=1, threads=1)


def _runs(tiny_root: Path, output: Path) -> list[sweep.RunSpec]:
    return sweep.plan(tiny_config(tiny_root, output, **SWEEP), SEEDS)


@pytest.fixture(scope="module")
def local_tables(tiny_root, tmp_path_factory) -> dict[str, str]:
    """The tables of the in-process executor: what every Ray sweep below must reproduce."""
    output = tmp_path_factory.mktemp("local")
    summary = sweep.run_locally(_runs(tiny_root, output))
    assert len(summary.trained) == 6 and not summary.failed
    return report_tables(output, tmp_path_factory.mktemp("local_report"))


@pytest.fixture(scope="module")
def ray_module():
    """Ray, or a skip: listed first by the tests that need it, so nothing is computed before."""
    return pytest.importorskip("ray")


@pytest.fixture(scope="module")
def ray_instance(ray_module):
    ray_module.init(address="local", num_cpus=2, include_dashboard=False)
    yield ray_module
    ray_module.shutdown()


def test_without_ray_the_ray_launcher_says_how_to_install_it(tiny_root, tmp_path, monkeypatch,
                                                             capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now fails as if absent
    code = sweep.main(["--launcher", "ray", "--dataset", "CMUMOSI", "--data-root",
                       str(tiny_root), "--output-dir", str(tmp_path)])
    assert code == 2
    assert "python -m pip install -r requirements-ray.txt" in capsys.readouterr().err
    assert not tmp_path.joinpath("CMUMOSI").exists()


def test_a_run_uses_its_thread_count_and_restores_the_previous_one():
    before = torch.get_num_threads()
    with torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with torch_threads(0):  # 0: torch's own setting, untouched
        assert torch.get_num_threads() == before


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.slow
def test_a_sweep_joins_a_head_by_address(ray_module, tiny_root, tmp_path, local_tables):
    port = _free_port()
    # Token authentication as on a real cluster, with a token of this test's own (no file).
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    subprocess.run(RAY_CLI + ["start", "--head", "--node-ip-address", "127.0.0.1", "--port",
                              str(port), "--num-cpus", "2", "--include-dashboard", "false"],
                   cwd=tmp_path, env=env, check=True, capture_output=True, timeout=120)
    try:
        config = tiny_config(tiny_root, tmp_path / "saved", **SWEEP)
        command = [sys.executable, "-m", "MoMKE.sweep", "--launcher", "ray", "--ray-address",
                   f"127.0.0.1:{port}", "--seeds", ",".join(map(str, SEEDS))]
        for name in ("dataset", "data_root", "test_condition", "missing_rate", "epochs",
                     "stage_epochs", "batch_size", "hidden", "depth", "num_heads", "lr",
                     "drop_rate", "seed", "device", "threads", "output_dir"):
            value = getattr(config, name)
            command += [f"--{name.replace('_', '-')}",
                        ",".join(map(str, value)) if isinstance(value, list) else str(value)]
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=300)
    finally:
        subprocess.run(RAY_CLI + ["stop"], env=env, capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "sweep finished" in done.stdout and "6 trained" in done.stdout
    assert report_tables(tmp_path / "saved", tmp_path / "report") == local_tables
    with pytest.raises(OSError):  # the head is gone
        socket.create_connection(("127.0.0.1", port), timeout=2).close()


@pytest.mark.slow
def test_a_ray_sweep_gives_the_local_tables_and_resumes(ray_instance, tiny_root, tmp_path,
                                                        local_tables):
    runs = _runs(tiny_root, tmp_path / "saved")
    summary = run_on_ray(runs, cpus_per_run=1)
    assert [r.label for r in summary.trained] == [r.label for r in runs]
    assert not summary.failed and not summary.skipped
    assert report_tables(tmp_path / "saved", tmp_path / "report") == local_tables
    # Fixed runs waited for their seed's stage-1 task and reused it; the rate trained its own.
    for run in runs:
        reused = read_result(run.folder)["stage1_reused"]
        assert reused == [run.setting.protocol == "fixed"], run.label

    again = run_on_ray(runs, cpus_per_run=1)
    assert not again.trained and [r.label for r in again.skipped] == [r.label for r in runs]


def _ray_processes(prefix: str) -> dict[int, str]:
    """pid -> process title of this machine's processes whose title starts with `prefix`."""
    found = {}
    for entry in Path("/proc").iterdir():
        try:
            title = (entry / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
            title = title.strip()
        except (OSError, ValueError):
            continue
        if entry.name.isdigit() and title.startswith(prefix):
            found[int(entry.name)] = title
    return found


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds Ray's workers through /proc")
def test_a_killed_worker_is_retried_and_the_table_is_whole(ray_instance, tiny_root, tmp_path,
                                                           local_tables):
    runs = _runs(tiny_root, tmp_path / "saved")
    killed: list[str] = []

    def kill_one_run_mid_training() -> None:
        deadline = time.time() + 120
        while time.time() < deadline and not killed:
            for pid, title in _ray_processes("ray::run ").items():
                run = next((r for r in runs if r.label == title.removeprefix("ray::run ")), None)
                if run is None:
                    continue
                epochs = run.folder.with_name(run.folder.name + ".attempt") / "epochs.jsonl"
                lines = epochs.read_text().count("\n") if epochs.is_file() else 0
                if lines > SWEEP["stage_epochs"]:  # in stage 2
                    os.kill(pid, signal.SIGKILL)
                    killed.append(f"killed pid {pid} ({title}) after {lines} of "
                                  f"{SWEEP['epochs']} epochs")
                    break
            time.sleep(0.02)

    killer = threading.Thread(target=kill_one_run_mid_training)
    killer.start()
    summary = run_on_ray(runs, cpus_per_run=1, max_retries=2)
    killer.join()
    print("\n".join(killed), summary.report(), sep="\n")
    assert len(killed) == 1, "a run task should have been killed while it trained"
    assert not summary.failed and len(summary.trained) == len(runs)
    assert report_tables(tmp_path / "saved", tmp_path / "report") == local_tables


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_run_that_fails_by_itself_is_reported_once_and_not_retried(ray_instance, tiny_root,
                                                                     tmp_path):
    config = tiny_config(tiny_root, tmp_path / "saved", test_condition=["a", "t"],
                         epochs=4, stage_epochs=0, hidden=8, depth=1)
    good, bad = sweep.plan(config, [3])
    # A flag the driver cannot check (its nodes may have GPUs that it has not): the task raises.
    bad = sweep.RunSpec(dataclasses.replace(bad.config, device="cuda"), bad.setting,
                        bad.fingerprint)
    started = time.perf_counter()
    summary = run_on_ray([good, bad], cpus_per_run=1, max_retries=3)
    assert time.perf_counter() - started < 120
    assert [r.label for r in summary.trained] == [good.label]
    assert [(r.label, error) for r, error in summary.failed] == [
        (bad.label, "ValueError: --device cuda asks for CUDA, but this torch build sees no GPU; "
                    "use --device cpu or auto.")]
    assert summary.report().count("FAILED") == 1
    time.sleep(1)  # task events reach Ray's timeline with a short delay
    attempts = [e for e in ray_instance.timeline() if e.get("cat") == f"task::run {bad.label}"]
    assert len(attempts) == 1


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_failed_shared_stage1_fails_its_runs_with_its_error(ray_instance, tiny_root, tmp_path):
    config = tiny_config(tiny_root, tmp_path / "saved", test_condition=["a", "t"], epochs=4,
                         stage_epochs=2, hidden=8, depth=1, device="cuda")
    runs = sweep.plan(config, [3])
    summary = run_on_ray(runs, cpus_per_run=1)
    error = "ValueError: --device cuda asks for CUDA, but this torch build sees no GPU; use " \
            "--device cpu or auto."
    assert [(r.label, e) for r, e in summary.failed] == [
        (run.label, f"its stage 1 failed: {error}") for run in runs]
    assert not summary.trained


def test_resources_no_node_has_are_refused_instead_of_waiting(ray_instance, tiny_root,
                                                              tmp_path):
    runs = sweep.plan(tiny_config(tiny_root, tmp_path, epochs=4, stage_epochs=0), [3])
    with pytest.raises(ValueError, match="--gpus-per-run"):
        run_on_ray(runs, gpus_per_run=64)
