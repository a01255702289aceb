"""Run the sweep's list of runs as Ray tasks, on this machine or on a cluster.

Usage: docs/cluster.md. `sweep.plan` makes the list (`experiments/plan.py`), `sweep.run_locally`
and `pool.run_in_pool` run it on this machine, and `run_on_ray` runs the same list as Ray
tasks:

    stage-1 task   one per stage-1 group that two or more pending runs share: trains (or finds)
                   stage 1 of every fold and caches it in <output-dir>/_stage1/
    run task       one per pending run, given its group's stage-1 task as an argument, so Ray
                   starts it only once that stage 1 is cached; runs of other groups and seeds
                   start at once

Each task loads the dataset itself (through the feature cache) and writes the same run folder as
the local executor, so `python -m MoMKE.report` reads both alike. Faults: a task whose worker
process dies is retried, at most `max_retries` times; an exception raised by the run itself is not
(it would fail again): it is reported once, with its error. Ray is optional
(requirements-ray.txt) and imported only when this executor is used.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from dataloader.gcnet import MultimodalDataset, feature_names_from, load_dataset
from MoMKE import runner
from MoMKE.config import ConfigError, TrainConfig
from MoMKE.experiments.plan import (RunSpec, SweepSummary, file_locked, shared_stage1,
                                    wait_for_others)
from MoMKE.protocols import MissingSetting
from MoMKE.runlog import setup_console_logging
from MoMKE.runtime import resolve_device

log = logging.getLogger("MoMKE")

PROJECT_ROOT = Path(__file__).resolve().parents[2]
INSTALL_RAY = "python -m pip install -r requirements-ray.txt"


def import_ray() -> Any:
    """The `ray` module, or a ConfigError saying how to install it."""
    try:
        import ray
    except ImportError:
        raise ConfigError(f"--launcher ray needs Ray, which is not installed; install it with "
                          f"`{INSTALL_RAY}` or use --launcher local.") from None
    return ray


def run_on_ray(runs: Sequence[RunSpec], *, address: str = "local", cpus_per_run: float = 1,
               gpus_per_run: float = 0, max_retries: int = 3) -> SweepSummary:
    """Run every run of `runs` whose folder holds no complete result as a Ray task; return what
    was trained, what was complete before and what failed.

    address: "local" starts a Ray instance on this machine with its cores (and stops it at the
    end), "auto" or "host:port" joins a running cluster; if this process is connected to Ray
    already, that connection is used. Each task asks for `cpus_per_run` CPUs and `gpus_per_run`
    GPUs and, unless the run sets --threads, uses as many torch threads as it has CPUs. The data
    is loaded here once first, so bad input stops the sweep before anything is scheduled. The
    sweep's working directory must exist at the same path on every node (relative --data-root
    and --output-dir resolve against it in every task).
    """
    ray = import_ray()
    _check_resources(cpus_per_run, gpus_per_run, max_retries, runs)
    summary, pending = SweepSummary.begin(runs)
    if not pending:
        return summary
    for config in {_data_key(run.config): run.config for run in pending}.values():
        _load_data(config)  # refuses bad data now, and writes the feature cache the tasks read
    threads = max(1, int(cpus_per_run))
    connected_here = not ray.is_initialized()
    if connected_here:
        _connect(ray, address)
    try:
        _check_cluster(ray, cpus_per_run, gpus_per_run, pending,
                       own_instance=address == "local")
        options = dict(num_cpus=cpus_per_run, num_gpus=gpus_per_run, max_retries=max_retries,
                       retry_exceptions=False, runtime_env=_runtime_env())
        runs_by_ref = _submit(ray, pending, options, threads)
        _collect(ray, runs_by_ref, summary, max_retries)
    finally:
        if connected_here:
            ray.shutdown()
    summary.sort_like(pending)
    wait_for_others(summary, lambda rest: run_on_ray(
        rest, address=address, cpus_per_run=cpus_per_run, gpus_per_run=gpus_per_run,
        max_retries=max_retries))
    return summary


# ----------------------------------------------------------------------------- the tasks

def train_stage1_task(config: TrainConfig, setting: MissingSetting, workdir: str) -> None:
    """Ray task: train (or find cached) stage 1 of every fold of `setting`'s group."""
    data, device = _task_setup(config, workdir)
    runner.train_stage1(config, data, setting, device)


def train_run_task(config: TrainConfig, setting: MissingSetting, workdir: str,
                   stage1: None) -> None:
    """Ray task: train one run into its run folder. `stage1` is the group's stage-1 task (Ray
    resolves it to None before this starts: it is here so that this task waits for it), or None
    when the run trains its own stage 1."""
    data, device = _task_setup(config, workdir)
    runner.run(config, data, setting, device)


def _task_setup(config: TrainConfig, workdir: str) -> tuple[MultimodalDataset, torch.device]:
    if not Path(workdir).is_dir():
        raise FileNotFoundError(
            f"node {socket.gethostname()} has no folder {workdir}: run the sweep from a folder "
            f"that every node sees at the same path (docs/cluster.md).")
    os.chdir(workdir)
    # Epoch lines go to run.log only; warnings and errors still reach the driver's console.
    setup_console_logging(logging.WARNING)
    return _load_data(config), resolve_device(config.device)


# ----------------------------------------------------------------------------- the driver

def _submit(ray: Any, pending: list[RunSpec], options: dict, threads: int) -> dict[Any, tuple]:
    """Schedule the stage-1 tasks, then the runs; return {ObjectRef: (kind, run, stage1 ref)}."""
    stage1_remote, run_remote = ray.remote(train_stage1_task), ray.remote(train_run_task)
    workdir = os.getcwd()
    refs: dict[Any, tuple] = {}
    stage1_refs = {}
    for key, members in shared_stage1(pending).items():
        first = members[0]
        ref = stage1_remote.options(name=f"stage 1 of {first.label}", **options).remote(
            _with_threads(first.config, threads), first.setting, workdir)
        stage1_refs[key] = ref
        refs[ref] = ("stage 1", first, None)
    for run in pending:
        stage1 = stage1_refs.get(run.stage1_group)
        ref = run_remote.options(name=f"run {run.label}", **options).remote(
            _with_threads(run.config, threads), run.setting, workdir, stage1)
        refs[ref] = ("run", run, stage1)
    log.info("ray: %d stage-1 task(s) and %d run task(s) scheduled", len(stage1_refs),
             len(pending))
    return refs


@dataclass(frozen=True)
class _Failure:
    line: str  # the error in one line, as the summary shows it
    detail: str  # what Ray reports: the remote traceback, or how the worker died
    error: BaseException | None = None  # the run's own exception, when it raised one


def _collect(ray: Any, refs: dict[Any, tuple], summary: SweepSummary, max_retries: int) -> None:
    """Wait for every task; file each run as trained or failed, logging each error once."""
    failures: dict[Any, _Failure | None] = {}
    waiting = list(refs)
    total = sum(kind == "run" for kind, _, _ in refs.values())
    started = time.perf_counter()
    while waiting:
        done, waiting = ray.wait(waiting, num_returns=1)
        for ref in done:
            kind, run, stage1 = refs[ref]
            failure = _failure_of(ray, ref, failures, max_retries)
            if kind == "stage 1":
                if failure is not None:
                    log.error("stage 1 of %s failed; the runs sharing it fail with it: %s",
                              run.label, failure.detail)
                continue
            if failure is None:
                summary.trained.append(run)
            elif stage1 is not None and (shared := _failure_of(ray, stage1, failures,
                                                                max_retries)) is not None:
                summary.failed.append((run, f"its stage 1 failed: {shared.line}"))
            elif file_locked(summary, run, failure.error):
                continue  # another process trains it: waited for after the others
            else:
                log.error("%s failed: %s", run.label, failure.detail)
                summary.fail(run, failure.line, failure.error)
            log.info("[%d/%d] %s %s (%.0f s into the sweep)",
                     len(summary.trained) + len(summary.failed), total, run.label,
                     "done" if failure is None else "FAILED", time.perf_counter() - started)


def _failure_of(ray: Any, ref: Any, failures: dict, max_retries: int) -> _Failure | None:
    """None when the task behind `ref` succeeded, else its failure (memoised, so a stage-1
    failure is read once however many runs wait on it)."""
    if ref not in failures:
        try:
            ray.get(ref)
            failures[ref] = None
        except ray.exceptions.RayTaskError as error:  # the run's own exception: not retried
            cause = error.cause
            failures[ref] = _Failure(f"{type(cause).__name__}: {cause}", str(error), cause)
        except ray.exceptions.RayError as error:  # its worker or node died on every attempt
            text = str(error).strip()
            failures[ref] = _Failure(
                f"{type(error).__name__} (retried {max_retries} time(s)): "
                f"{text.splitlines()[0] if text else 'no detail'}", text)
    return failures[ref]


def _check_resources(cpus_per_run: float, gpus_per_run: float, max_retries: int,
                     runs: Sequence[RunSpec]) -> None:
    if cpus_per_run <= 0:
        raise ConfigError(f"--cpus-per-run {cpus_per_run} must be positive, e.g. 1.")
    if gpus_per_run < 0:
        raise ConfigError(f"--gpus-per-run {gpus_per_run} must be 0 (CPU runs) or more.")
    if max_retries < 0:
        raise ConfigError(f"--max-retries {max_retries} must be 0 or more.")
    numbered = next((run.config.device for run in runs if run.config.device.startswith("cuda:")),
                    None)
    if gpus_per_run > 0 and numbered is not None:
        raise ConfigError(f"--device {numbered} names a GPU by number, but Ray gives each run "
                          f"its own GPU (--gpus-per-run); use --device auto or cuda.")
    if runs:
        _check_device(runs[0].config.device, gpus_per_run)


def _check_device(flag: str, gpus_per_run: float) -> None:
    """The device the driver resolves is the one the runs' identities name, so the tasks must
    train on it. Ray hides every GPU from a task that asks for none (its CUDA_VISIBLE_DEVICES is
    empty), and shows one to a task that asks for some: refuse what would put a run elsewhere."""
    try:
        device = resolve_device(flag)
    except ValueError:  # a GPU only the nodes have: the task resolves it, or says why not
        return
    if device.type == "cuda" and gpus_per_run == 0:
        raise ConfigError(f"--device {flag} trains on a GPU, but with --gpus-per-run 0 Ray hides "
                          f"every GPU from its runs; give --gpus-per-run 1 (0.25: four runs "
                          f"share a GPU) or --device cpu.")
    if device.type == "cpu" and flag == "auto" and gpus_per_run > 0:
        raise ConfigError(f"--gpus-per-run {gpus_per_run:g} gives each run a GPU, but this "
                          f"driver sees none, so --device auto names the CPU in the runs' "
                          f"identities; start the sweep on a node with a GPU, or give "
                          f"--gpus-per-run 0 or --device cpu.")


def _connect(ray: Any, address: str) -> None:
    """ray.init, with a wrong address refused in one sentence (Ray itself retries a host:port
    that does not answer for minutes)."""
    if address not in ("local", "auto") and "://" not in address:
        host, _, port = address.rpartition(":")
        try:
            socket.create_connection((host, int(port)), timeout=10).close()
        except (OSError, ValueError):
            raise ConfigError(f"--ray-address {address}: no Ray head answers there; start one "
                              f"with `ray start --head --port PORT` or check the host:port."
                              ) from None
    try:
        ray.init(address=address, include_dashboard=False)
    except ConnectionError as error:
        raise ConfigError(f"--ray-address {address}: {error}; start a cluster with `ray start "
                          f"--head` or use --ray-address local (a head with token "
                          f"authentication also needs RAY_AUTH_MODE=token and its token here: "
                          f"RAY_AUTH_TOKEN or ~/.ray/auth_token).") from None


def _check_cluster(ray: Any, cpus: float, gpus: float, runs: Sequence[RunSpec], *,
                   own_instance: bool) -> None:
    """Refuse (own instance) or warn (a cluster that may grow) when no node could run a task,
    as such tasks would wait forever; warn when GPUs are there but not shared out."""
    nodes = [node["Resources"] for node in ray.nodes() if node["Alive"]]
    if gpus == 0 and any(r.get("GPU", 0) for r in nodes) and any(
            run.config.device != "cpu" for run in runs):
        log.warning("the Ray cluster has GPUs but --gpus-per-run is 0: Ray hides them from "
                    "every run, which trains on its node's CPU; to use them, start the sweep "
                    "on a node with a GPU and give --gpus-per-run 1 (0.25: four runs share a "
                    "GPU).")
    if any(r.get("CPU", 0) >= cpus and r.get("GPU", 0) >= gpus for r in nodes):
        return
    have = ", ".join(f"{r.get('CPU', 0):g} CPU/{r.get('GPU', 0):g} GPU" for r in nodes)
    message = (f"no Ray node has the {cpus:g} CPU(s) and {gpus:g} GPU(s) that one run asks for "
               f"(nodes: {have or 'none'})")
    if own_instance:
        raise ConfigError(f"{message}; lower --cpus-per-run or --gpus-per-run.")
    log.warning("%s; the runs wait until such a node joins the cluster.", message)


def _runtime_env() -> dict:
    """Tasks import this project from the driver's checkout (which must be at the same path on
    every node), so every task runs the driver's code."""
    paths = [str(PROJECT_ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep)
                                   if p]
    return {"env_vars": {"PYTHONPATH": os.pathsep.join(paths)}}


def _with_threads(config: TrainConfig, threads: int) -> TrainConfig:
    return config if config.threads else dataclasses.replace(config, threads=threads)


def _data_key(config: TrainConfig) -> tuple:
    return (config.dataset, config.data_root, config.audio_feature, config.text_feature,
            config.video_feature)


def _load_data(config: TrainConfig) -> MultimodalDataset:
    return load_dataset(config.dataset, config.data_root, feature_names_from(
        config.audio_feature, config.text_feature, config.video_feature))
