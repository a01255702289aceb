"""Several runs at once on one machine: the sweep's runs in K worker processes, each pinned to its
share of the cores, on the CPU or sharing one GPU.

Measured: docs/precision-and-speed.md, "Several runs at once". MoMKE's matrices are
small (a few thousand utterances by 256), so one run does not keep many cores busy: on a 2-core
CPU two 1-thread runs at once finish a table sooner than one 2-thread run after another, and one
run uses a small fraction of a modern GPU. `run_in_pool` trains the planned runs in K processes;
a stage 1 that several runs share is trained once, by a task of its own, before they start
(`plan.shared_stage1`), and runs of other groups go on meanwhile.

Why worker processes and not Ray's local mode: Ray's local mode runs every task in the driver, one
after another (it is a debugging aid), and Ray is an optional dependency; a process pool needs
nothing beyond the standard library, lets each worker pin itself to its own cores, and writes the
same run folders as the in-process and Ray executors (so `MoMKE.report` reads all alike).
Workers are spawned (not forked: a forked copy of an OpenMP runtime can hang) and ignore Ctrl-C;
the sweep stops them.
"""
from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import os
import signal
import threading
import time
import traceback
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from typing import Callable, Sequence

import torch
from tqdm import tqdm

from dataloader.batch import BatchBuilder
from dataloader.datasets import get_spec
from dataloader.gcnet import MultimodalDataset, feature_names_from, load_dataset
from MoMKE import runner, trainer
from MoMKE.config import TrainConfig
from MoMKE.experiments.plan import (RunSpec, SweepSummary, file_locked, shared_stage1,
                                    wait_for_others)
from MoMKE.protocols import MissingSetting
from MoMKE.runlog import setup_console_logging
from MoMKE.runtime import resolve_device

log = logging.getLogger("MoMKE")

# The default number of runs at once keeps their peak memory (one CPU run's: the dataset table's
# `peak_memory_gb`) within half of the machine's.
MEMORY_SHARE = 0.5  # of the machine's (or the GPU's) memory that K runs may take together
CUDA_CONTEXT_BYTES = 600 * 2**20  # what each process's CUDA context takes besides its tensors


def available_cores() -> int:
    """The cores this process may run on (its affinity, which containers and `taskset` set)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def machine_memory_bytes() -> int:
    """Physical memory, or the container's limit where that is lower."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        limit = open("/sys/fs/cgroup/memory.max").read().strip()
        if limit.isdigit():
            total = min(total, int(limit))
    except OSError:
        pass
    return total


def default_jobs(dataset: str, device: torch.device, threads: int = 0,
                 cuda_peak_bytes: int | None = None, gpus: int = 1) -> tuple[int, str]:
    """K, the runs to train at once, and the reason in words.

    CPU: one run per `threads` cores (one per core when --threads is not given), as many as
    half of the memory holds at the measured peak of one run. GPU: on each of the `gpus` GPUs
    the workers share (`worker_gpus`), as many runs as half of its memory holds at
    `cuda_peak_bytes` (one run's measured peak, `probe_cuda_peak`) plus a CUDA context each; and
    at most one per CPU core, which drives it."""
    cores = available_cores()
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        per_run = (cuda_peak_bytes or 2**30) + CUDA_CONTEXT_BYTES
        by_memory = max(1, int(MEMORY_SHARE * total / per_run))
        jobs = min(cores, by_memory * max(1, gpus))
        return jobs, (f"{jobs} runs at once on {max(1, gpus)} x "
                      f"{torch.cuda.get_device_name(device)}: {total / 2**30:.0f} GB hold "
                      f"{by_memory} runs of {per_run / 2**30:.2f} GB (measured peak plus a CUDA "
                      f"context) in half of it; {cores} CPU cores")
    per_run = max(1, threads)
    peak = get_spec(dataset).peak_memory_gb * 2**30
    by_memory = max(1, int(MEMORY_SHARE * machine_memory_bytes() / peak))
    jobs = max(1, min(cores // per_run, by_memory))
    return jobs, (f"{jobs} run(s) at once with {max(1, cores // jobs)} thread(s) each: {cores} "
                  f"cores; half of {machine_memory_bytes() / 2**30:.0f} GB holds {by_memory} "
                  f"runs of {peak / 2**30:.2f} GB")


def worker_gpus(device_flag: str, inherited: str | None, count: int) -> list[str]:
    """The CUDA_VISIBLE_DEVICES value of each GPU the workers share out, for --device
    `device_flag` in a process that inherited CUDA_VISIBLE_DEVICES=`inherited` (None: unset) and
    sees `count` GPUs. Entries of the inherited list (indices, UUIDs, MIG names) are passed on as
    they are, so a worker sees the GPU its parent calls cuda:N, not physical GPU N; 'cuda:N'
    puts every worker on that one GPU, 'cuda' and 'auto' spread them over all."""
    if inherited is None:
        entries = [str(i) for i in range(count)]
    else:  # CUDA stops at the first entry it cannot use: so does torch's count
        entries = [entry.strip() for entry in inherited.split(",")][:count]
    index = torch.device(device_flag).index if device_flag.startswith("cuda") else None
    return [entries[index]] if index is not None else entries


def probe_cuda_peak(config: TrainConfig, data: MultimodalDataset, device: torch.device) -> int:
    """Peak CUDA memory of one run, measured in this process: the dataset's tables, the model,
    Adam and one stage-2 training step on the longest training conversations."""
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    trainer.FoldTrainer(config, data, 0, MissingSetting("fixed", condition="atv"), device,
                        BatchBuilder(data, device)).probe_step()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    torch.cuda.empty_cache()
    return peak


# ----------------------------------------------------------------------------- the workers

_DATA: dict[tuple, MultimodalDataset] = {}  # per worker process: each dataset loaded once


def _init_worker(slots: "multiprocessing.Queue[int]", cores_per_slot: list[list[int]],
                 threads: int, gpus: list[str], sweep_pid: int) -> None:
    """Take a slot: pin to its cores (CPU) or its GPU, set the thread count, quiet console."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the sweep handles Ctrl-C and stops workers
    # The sweep's pid comes from the sweep: a worker spawned just before its sweep was killed
    # starts here already orphaned, and its own parent's pid would name the adopting process.
    _end_with_parent(sweep_pid)
    slot = slots.get()
    if cores_per_slot and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, cores_per_slot[slot % len(cores_per_slot)])
    if gpus:  # the slot's GPU, the only one this worker sees (its runs say --device cuda)
        os.environ["CUDA_VISIBLE_DEVICES"] = gpus[slot % len(gpus)]  # before CUDA starts here
    torch.set_num_threads(threads)
    setup_console_logging(logging.WARNING)  # epoch lines go to each run.log
    # tqdm's default lock is a multiprocessing one: a worker stopped by Ctrl-C would leave it
    # registered, and its "leaked semaphore" warning would follow the sweep's last line.
    tqdm.set_lock(threading.RLock())


def _end_with_parent(parent: int, every_seconds: float = 1.0) -> None:
    """End this worker once the sweep that started it is gone. A sweep killed outright (SIGKILL,
    the out-of-memory killer) cannot stop its pool, and an orphaned worker would train on,
    holding its cores, for a sweep nobody waits for; its unfinished run has no result.json and
    is trained again by the next sweep."""
    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(every_seconds)
        os._exit(1)

    threading.Thread(target=watch, name="end-with-sweep", daemon=True).start()


def _dataset(config: TrainConfig) -> MultimodalDataset:
    key = (config.dataset, config.data_root, config.audio_feature, config.text_feature,
           config.video_feature)
    if key not in _DATA:
        _DATA[key] = load_dataset(config.dataset, config.data_root, feature_names_from(
            config.audio_feature, config.text_feature, config.video_feature))
    return _DATA[key]


def _stage1_task(config: TrainConfig, setting: MissingSetting) -> None:
    runner.train_stage1(config, _dataset(config), setting, resolve_device(config.device))


def _run_task(config: TrainConfig, setting: MissingSetting) -> None:
    runner.run(config, _dataset(config), setting, resolve_device(config.device))


# ----------------------------------------------------------------------------- the driver

def run_in_pool(runs: Sequence[RunSpec], jobs: int, threads: int) -> SweepSummary:
    """Train every pending run of `runs` in `jobs` worker processes with `threads` torch
    threads each (a run's own --threads wins); return what was trained, complete and failed."""
    summary, pending = SweepSummary.begin(runs)
    if not pending:
        return summary
    groups = shared_stage1(pending)
    grouped = {id(run) for members in groups.values() for run in members}
    jobs = min(jobs, len(pending))
    context = multiprocessing.get_context("spawn")
    slots = context.Queue()
    for slot in range(jobs):
        slots.put(slot)
    device = resolve_device(pending[0].config.device)
    gpus = worker_gpus(pending[0].config.device, os.environ.get("CUDA_VISIBLE_DEVICES"),
                       torch.cuda.device_count()) if device.type == "cuda" else []
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    per_slot = [cores[k * threads:(k + 1) * threads] for k in range(jobs)] \
        if device.type == "cpu" and len(cores) >= jobs * threads else []
    with_threads = lambda run: _for_worker(run.config, threads, bool(gpus))  # noqa: E731
    started, total = time.perf_counter(), len(pending)
    pool = ProcessPoolExecutor(max_workers=jobs, mp_context=context, initializer=_init_worker,
                               initargs=(slots, per_slot, threads, gpus, os.getpid()))
    futures: dict[Future, tuple[str, object]] = {}
    try:
        for key, members in groups.items():
            first = members[0]
            futures[_submit(pool, _stage1_task, with_threads(first), first.setting)] = \
                ("stage 1", key)
        for run in pending:
            if id(run) not in grouped:
                futures[_submit(pool, _run_task, with_threads(run), run.setting)] = ("run", run)
        while futures:
            done, _ = wait(futures, return_when=FIRST_COMPLETED)
            for future in done:
                kind, what = futures.pop(future)
                error = future.exception()
                if kind == "stage 1":
                    for run in groups[what]:
                        if error is None:
                            futures[_submit(pool, _run_task, with_threads(run),
                                            run.setting)] = ("run", run)
                        else:
                            summary.failed.append((run, f"its stage 1 failed: {_line(error)}"))
                    if error is not None:
                        log.error("stage 1 of %s failed: %s", groups[what][0].label,
                                  _detail(error))
                    continue
                if error is None:
                    summary.trained.append(what)
                elif file_locked(summary, what, error):
                    continue  # another process trains it: waited for below
                else:
                    log.error("%s failed: %s", what.label, _detail(error))
                    summary.fail(what, _line(error), error)
                log.info("[%d/%d] %s %s (%.0f s into the sweep)",
                         len(summary.trained) + len(summary.failed), total, what.label,
                         "done" if error is None else "FAILED", time.perf_counter() - started)
    except BaseException:
        _stop(pool)
        raise
    pool.shutdown()
    summary.sort_like(pending)
    wait_for_others(summary, lambda rest: run_in_pool(rest, jobs, threads))
    return summary


def _for_worker(config: TrainConfig, threads: int, own_gpu: bool) -> TrainConfig:
    """A run's config as a worker runs it: its share of threads (unless the run sets them), and
    on a GPU 'cuda', the one GPU the worker sees (`worker_gpus`)."""
    changes = {} if config.threads else {"threads": threads}
    if own_gpu:
        changes["device"] = "cuda"
    return dataclasses.replace(config, **changes) if changes else config


def _submit(pool: ProcessPoolExecutor, task: Callable[..., None], *args: object) -> Future:
    """`pool.submit`, with Ctrl-C ignored for that moment. A worker is spawned inside submit,
    and Python keeps an ignored SIGINT ignored, so the worker never sees a Ctrl-C sent to the
    whole process group, not even while it still imports (where its initializer could not
    help yet); the sweep stops its workers itself."""
    if threading.current_thread() is not threading.main_thread():
        return pool.submit(task, *args)
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        return pool.submit(task, *args)
    finally:
        signal.signal(signal.SIGINT, previous)


def _stop(pool: ProcessPoolExecutor) -> None:
    """Cancel what has not started and end the workers now (their runs resume on the next
    sweep: a run without result.json is trained again)."""
    processes = list((getattr(pool, "_processes", None) or {}).values())  # shutdown drops them
    pool.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        process.terminate()
    for process in processes:
        process.join(timeout=10)


def _line(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


def _detail(error: BaseException) -> str:
    """A refusal in its one sentence; anything unexpected with the worker's traceback."""
    if isinstance(error, runner.STATED_FAILURES):
        return str(error)
    return "".join(traceback.format_exception(error)).rstrip()
