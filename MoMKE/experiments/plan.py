"""The list of runs a sweep plans, the stage-1 tasks they share, and what an executor did with them.

Executors: docs/cluster.md (Ray), docs/precision-and-speed.md (several runs at once). Every
executor (`sweep.run_locally` in this process, `pool.run_in_pool` in worker processes,
`ray_executor.run_on_ray` on a cluster) takes the same `RunSpec`s (`MoMKE/runner.py`: one run, as
`python -m MoMKE.train` plans it too), trains each stage 1 that several pending runs share once and
before them (`shared_stage1`), and returns a `SweepSummary`.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from MoMKE.runlog import RunLock, RunLocked, attempt_log
from MoMKE.runner import RunSpec, pending_runs

log = logging.getLogger("MoMKE")


def shared_stage1(pending: Sequence[RunSpec]) -> dict[str, list[RunSpec]]:
    """Stage-1 group -> its pending runs, for every group that two or more runs share: an
    executor trains that stage 1 once (`runner.train_stage1` of the first member) before the
    members start. A run alone in its group trains its own stage 1."""
    groups: dict[str, list[RunSpec]] = {}
    for run in pending:
        if run.stage1_group is not None and run.config.reuse_stage1:
            groups.setdefault(run.stage1_group, []).append(run)
    return {key: members for key, members in groups.items() if len(members) > 1}


@dataclass
class SweepSummary:
    """What an executor did with a list of runs: trained, complete before, completed by another
    process while this one waited for it, failed (with error)."""

    trained: list[RunSpec] = field(default_factory=list)
    skipped: list[RunSpec] = field(default_factory=list)
    failed: list[tuple[RunSpec, str]] = field(default_factory=list)
    elsewhere: list[RunSpec] = field(default_factory=list)
    # Run folder -> the run log of the attempt that failed; absent when it failed before one.
    failed_logs: dict[Path, Path] = field(default_factory=dict)
    # Runs another live process held, with who it was (see `wait_for_others`).
    locked: list[tuple[RunSpec, str]] = field(default_factory=list)
    # Run folder -> its result's stamp when the sweep began (see `wait_for_others`).
    stamps: dict[Path, tuple[int, int] | None] = field(default_factory=dict)

    @classmethod
    def begin(cls, runs: Sequence[RunSpec]) -> tuple[SweepSummary, list[RunSpec]]:
        """The summary of an executor about to run `runs`, with the complete ones filed as
        skipped, and the pending runs."""
        pending = pending_runs(runs)
        summary = cls(skipped=[run for run in runs if run not in pending])
        summary.stamps = {run.folder: run.result_stamp() for run in pending}
        return summary, pending

    def fail(self, run: RunSpec, line: str, error: BaseException | None = None) -> None:
        """File `run` as failed with `line`; its log is that of the attempt that raised
        `error`, never an earlier attempt's."""
        self.failed.append((run, line))
        if error is not None and (log_file := attempt_log(error)) is not None:
            self.failed_logs[run.folder] = log_file

    def report(self, seconds: float | None = None) -> str:
        """The counts, then one line per run with its log file (or its error)."""
        took = "" if seconds is None else f" in {seconds:.1f} s"
        elsewhere = f"{len(self.elsewhere)} completed by another process, " \
            if self.elsewhere else ""
        lines = [f"sweep finished{took}: {len(self.trained)} trained, {len(self.skipped)} "
                 f"complete before, {elsewhere}{len(self.failed)} failed"]
        lines += [f"  trained  {run.label} (log: {run.log_file})" for run in self.trained]
        lines += [f"  complete {run.label} (log: {run.log_file})" for run in self.skipped]
        lines += [f"  complete {run.label}, trained by another process (log: "
                  f"{run.log_file})" for run in self.elsewhere]
        for run, error in self.failed:
            log_file = self.failed_logs.get(run.folder)
            where = f"log: {log_file}" if log_file is not None and log_file.is_file() else \
                "no run log of this attempt: it failed before its run started"
            lines.append(f"  FAILED {run.label}: {error} ({where})")
        return "\n".join(lines)

    def sort_like(self, runs: Sequence[RunSpec]) -> None:
        """Order trained and failed runs as planned (executors finish them in any order)."""
        self.trained.sort(key=runs.index)
        self.failed.sort(key=lambda item: runs.index(item[0]))

    def merge(self, other: SweepSummary) -> None:
        """Add what a later pass over some of the same runs did."""
        self.trained += other.trained
        self.skipped += other.skipped
        self.failed += other.failed
        self.elsewhere += other.elsewhere
        self.failed_logs.update(other.failed_logs)


def wait_for_others(summary: SweepSummary,
                    train: Callable[[list[RunSpec]], SweepSummary]) -> None:
    """The runs that another live process was training when the executor came to them
    (`summary.locked`) are work in progress, not failures: wait until that process lets go of
    each (said once), count those it completed, and `train` the rest here (it failed or was
    stopped), so that the report afterwards is whole."""
    retry = []
    for run, holder in summary.locked:
        log.info("waiting for %s: another process is training it (%s); the report waits for "
                 "its result", run.label, holder)
        RunLock(run.folder).wait()
        if run.is_complete() and run.result_stamp() != summary.stamps.get(run.folder):
            summary.elsewhere.append(run)
        else:
            retry.append(run)
    summary.locked = []
    if retry:
        summary.merge(train(retry))


def file_locked(summary: SweepSummary, run: RunSpec, error: BaseException | None) -> bool:
    """File `run` for `wait_for_others` when `error` is a RunLocked; False otherwise."""
    if not isinstance(error, RunLocked):
        return False
    summary.locked.append((run, getattr(error, "holder", "who is not recorded")))
    return True
