"""The list of runs a sweep plans, the stage-1 tasks they share, and what an executor did with them.

From: SPEC §7, issue 7 (the Ray executor) and issue 19 (several runs at once on one machine). Every
executor (`experiments.sweep.run_locally` in this process, `experiments.pool.run_in_pool` in worker processes,
`experiments.ray_executor.run_on_ray` on a cluster) takes the same `RunSpec`s, trains each stage 1 that
several pending runs share once and before them (`shared_stage1`), and returns a `SweepSummary`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from MoMKE import stage1_cache
from MoMKE.config import TrainConfig
from MoMKE.protocols import MissingSetting
from MoMKE.runlog import RunFolder, read_result, run_folder, run_identity


@dataclass(frozen=True)
class RunSpec:
    """One training of the sweep: a single seed and a single condition or rate."""

    config: TrainConfig
    setting: MissingSetting
    fingerprint: str  # of the data the run reads (`dataloader.gcnet.data_fingerprint`)

    @property
    def folder(self) -> Path:
        return run_folder(self.config, self.setting, self.fingerprint)

    @property
    def log_file(self) -> Path:
        """The run log: of the failed or running attempt when there is one, else the result's."""
        return RunFolder(self.folder, "").log_file

    @property
    def label(self) -> str:
        variant = "" if self.config.ablation == "none" else f" [{self.config.ablation}]"
        return f"{self.config.dataset} {self.setting.name}{variant} seed {self.config.seed}"

    @property
    def stage1_group(self) -> str | None:
        """Runs of one group share a stage 1 (trained by the first, reused by the others)."""
        return stage1_cache.group_key(self.config, self.setting)

    def is_complete(self) -> bool:
        identity = run_identity(self.config, self.setting, self.fingerprint)
        return read_result(self.folder, identity) is not None


def pending_runs(runs: Sequence[RunSpec]) -> list[RunSpec]:
    """The runs to train: those without a complete result of their identity, or all with
    --force."""
    return [run for run in runs if run.config.force or not run.is_complete()]


def shared_stage1(pending: Sequence[RunSpec]) -> dict[str, list[RunSpec]]:
    """Stage-1 group -> its pending runs, for every group that two or more runs share: an
    executor trains that stage 1 once (`trainer.train_stage1` of the first member) before the
    members start. A run alone in its group trains its own stage 1."""
    groups: dict[str, list[RunSpec]] = {}
    for run in pending:
        if run.stage1_group is not None and run.config.reuse_stage1:
            groups.setdefault(run.stage1_group, []).append(run)
    return {key: members for key, members in groups.items() if len(members) > 1}


@dataclass
class SweepSummary:
    """What an executor did with a list of runs: trained, complete before, failed (with error)."""

    trained: list[RunSpec] = field(default_factory=list)
    skipped: list[RunSpec] = field(default_factory=list)
    failed: list[tuple[RunSpec, str]] = field(default_factory=list)

    def report(self, seconds: float | None = None) -> str:
        """The counts, then one line per run with its log file (or its error)."""
        took = "" if seconds is None else f" in {seconds:.1f} s"
        lines = [f"sweep finished{took}: {len(self.trained)} trained, {len(self.skipped)} "
                 f"complete before, {len(self.failed)} failed"]
        lines += [f"  trained  {run.label} (log: {run.log_file})" for run in self.trained]
        lines += [f"  complete {run.label} (log: {run.log_file})" for run in self.skipped]
        for run, error in self.failed:
            log_file = run.log_file
            where = f"log: {log_file}" if log_file.is_file() else "no run log: it failed before " \
                                                                  "its run started"
            lines.append(f"  FAILED {run.label}: {error} ({where})")
        return "\n".join(lines)

    def sort_like(self, runs: Sequence[RunSpec]) -> None:
        """Order trained and failed runs as planned (executors finish them in any order)."""
        self.trained.sort(key=runs.index)
        self.failed.sort(key=lambda item: runs.index(item[0]))
