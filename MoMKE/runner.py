"""One run: every fold of one setting (a condition or rate, one seed) into its run folder.

Method: docs/method.md. `run` trains under the run's lock and through an attempt folder
(`MoMKE/runlog.py`) and writes its result; `train_stage1` trains only the stage 1 that the runs of
a sweep share. Each fold is trained by `FoldTrainer` (`MoMKE/trainer.py`)."""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from dataloader.atomic import CannotWrite
from dataloader.batch import BatchBuilder
from dataloader.gcnet import MultimodalDataset, read_marker
from MoMKE import stage1_cache
from MoMKE.checkpoint import checkpoint_payload
from MoMKE.config import TrainConfig, variant_name
from MoMKE.memory import TooLarge, check_run_fits
from MoMKE.protocols import CONDITIONS, MissingSetting
from MoMKE.runlog import (VARIANT_FIELDS, RunFolder, RunLock, RunLocked, epoch_line,
                          experiment_hash, identity_hash, log_result, note_attempt_log,
                          read_result, run_folder, run_identity)
from MoMKE.runtime import amp_active, code_version, resolve_device, source_version
from MoMKE.selection import RULE_LABELS, fold_summary, mean_over_folds, mean_router
from MoMKE.trainer import Diverged, FoldTrainer, model_config_for

log = logging.getLogger("MoMKE")


# ----------------------------------------------------------------------------- what a run is

@dataclass(frozen=True)
class RunSpec:
    """One training of the sweep: a single seed and a single condition or rate."""

    config: TrainConfig
    setting: MissingSetting
    fingerprint: str  # of the data the run reads (`dataloader.gcnet.data_fingerprint`)

    @property
    def device(self) -> torch.device:
        """The device this run resolves to here: part of its identity. A GPU this process does
        not see (a Ray driver without one) stays unresolved: such a run never counts as complete
        here, and the task that trains it checks its own identity first."""
        try:
            return resolve_device(self.config.device)
        except ValueError:
            return torch.device(self.config.device)

    @property
    def folder(self) -> Path:
        return run_folder(self.config, self.setting, self.fingerprint, self.device)

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
        identity = run_identity(self.config, self.setting, self.fingerprint, self.device)
        return _reusable(self.config, self.folder, identity) is not None

    def result_stamp(self) -> tuple[int, int] | None:
        """(inode, mtime) of the run's result.json, or None: tells a result another process
        wrote from the one that was there before."""
        try:
            stat = (self.folder / "result.json").stat()
        except OSError:
            return None
        return stat.st_ino, stat.st_mtime_ns


def pending_runs(runs: Sequence[RunSpec]) -> list[RunSpec]:
    """The runs to train: those without a complete result of their identity, or all with
    --force."""
    return [run for run in runs if run.config.force or not run.is_complete()]


# ----------------------------------------------------------------------------- one run

def run(config: TrainConfig, data: MultimodalDataset, setting: MissingSetting,
        device: torch.device) -> dict:
    """Train every fold of one setting into its run folder; return the result written.

    Under the run's lock: a complete result of the same identity is returned as it is (unless
    `--force`); otherwise the run trains into a fresh attempt folder that replaces the run folder
    only once its result is written. Raises Diverged (no result written; an earlier result stays)
    and RunLocked (another process trains this run)."""
    config = as_run_on(config, device)
    identity = run_identity(config, setting, data.fingerprint, device)
    folder = RunFolder(run_folder(config, setting, data.fingerprint, device), data.data_source)
    # Reading is enough to skip a complete run (a read-only output folder included); under the
    # lock it is looked at again, as another process may have completed it meanwhile.
    if (done := _complete(config, folder, identity)) is not None:
        return done
    check_run_fits(config, data, device)  # before anything is trained or written
    with RunLock(folder.path):
        if (done := _complete(config, folder, identity)) is not None:
            return done
        header = _data_header(data)
        opened = False
        try:
            folder.open(config, header)
            opened = True
            log.info("run %s %s seed %d -> %s [%s]", config.dataset, setting.name, config.seed,
                     folder.path, header)
            with torch_threads(config.threads):
                result = _train_folds(config, data, setting, device, folder,
                                      identity_hash(identity))
            result.update(identity=identity, identity_hash=identity_hash(identity),
                          experiment=experiment_hash(identity),
                          base_experiment=experiment_hash(identity, ignore=VARIANT_FIELDS))
            folder.write_result(result)
            folder.commit()
        except BaseException as error:
            if opened:  # the log a failure report points at: this attempt's, not an earlier one's
                note_attempt_log(error, folder.log_file)
            if isinstance(error, Diverged):
                log.error("%s (log: %s)", error, folder.log_file)
            raise
        finally:
            folder.close()
    log_result(result, data.spec.metrics, data.data_source)
    return result


def _complete(config: TrainConfig, folder: RunFolder, identity: dict) -> dict | None:
    """The result of a complete run of this identity, unless --force retrains it."""
    if config.force or (done := _reusable(config, folder.path, identity)) is None:
        return None
    log.info("%s is complete already; skipping it (use --force to retrain)", folder.path)
    return done


def _reusable(config: TrainConfig, folder: Path, identity: dict) -> dict | None:
    """The result in `folder` when it is all that training would leave there: of this identity
    and, with --save-checkpoint (not part of the identity), with every fold's checkpoint."""
    done = read_result(folder, identity)
    if done is None or not config.save_checkpoint:
        return done
    missing = [f["fold"] for f in done.get("folds", [])
               if not (folder / f"checkpoint_fold{f['fold']}.pt").is_file()]
    if missing:
        log.info("%s has no checkpoint of fold(s) %s, which --save-checkpoint asks for; "
                 "training it again", folder, ", ".join(map(str, missing)))
        return None
    return done


def train_stage1(config: TrainConfig, data: MultimodalDataset, setting: MissingSetting,
                 device: torch.device) -> None:
    """Train (or find cached) the stage 1 of every fold of `setting` without running stage 2:
    what a distributed sweep runs once before the runs that reuse it."""
    config = as_run_on(config, device)
    check_run_fits(config, data, device)
    with torch_threads(config.threads):
        for fold in [k - 1 for k in config.folds] if config.folds else range(len(data.folds)):
            FoldTrainer(config, data, fold, setting, device, BatchBuilder(data, device)).stage1(
                lambda record: None)


def as_run_on(config: TrainConfig, device: torch.device) -> TrainConfig:
    """`config` as it runs on `device`: without --amp where the device has no bfloat16 arithmetic
    (said once in the log), so that a run's identity and result record float32."""
    return dataclasses.replace(config, amp=False) if config.amp and not amp_active(device) \
        else config


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Run the block with `count` torch CPU threads (0: as they are), then restore them. The
    rounding of CPU float sums can depend on the thread count, so runs computed under different
    executors agree to the bit only at the same count."""
    previous = torch.get_num_threads()
    if count:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _train_folds(config: TrainConfig, data: MultimodalDataset, setting: MissingSetting,
                 device: torch.device, folder: RunFolder, identity: str) -> dict:
    builder = BatchBuilder(data, device)
    folds = [k - 1 for k in config.folds] if config.folds else range(len(data.folds))
    summaries, seconds, handovers, reused, predictions = [], [], [], [], {}
    started, cpu_started = time.perf_counter(), time.process_time()
    for fold in folds:
        name = data.folds[fold].name
        description = f"{data.spec.name} {setting.name} {name} [{data.data_source}]"
        with tqdm(total=config.epochs, desc=description, unit="epoch", leave=False,
                  disable=None) as progress, logging_redirect_tqdm(loggers=[log]):
            trainer = FoldTrainer(config, data, fold, setting, device, builder)
            outcome = trainer.run(lambda record: _on_epoch(record, folder, progress, data),
                                  progress)
        summaries.append({"fold": fold + 1, "name": name,
                          **_summaries(outcome.records, data, setting, config.select_from)})
        predictions.update(_prediction_arrays(data, fold, outcome.predictions))
        seconds.append(outcome.seconds)
        handovers.append(outcome.handover)
        reused.append(outcome.stage1_reused)
        if outcome.checkpoint is not None:
            folder.save_checkpoint(fold + 1, checkpoint_payload(
                state=outcome.checkpoint["state"], model_config=model_config_for(config, data),
                dataset=data.spec.name, data_source=data.data_source,
                data_fingerprint=data.fingerprint, features=data.feature_names, dims=data.dims,
                setting=setting.name, train_missing=config.train_missing, seed=config.seed,
                fold=fold + 1, epoch=outcome.checkpoint["epoch"],
                rule=outcome.checkpoint["rule"], batch_size=config.batch_size, amp=config.amp,
                identity_hash=identity, device=device))
    folder.save_predictions(predictions)
    return {
        "dataset": data.spec.name, "protocol": setting.protocol, "condition": setting.condition,
        "missing_rate": setting.rate, "seed": config.seed, "setting": setting.name,
        "selection_metric": data.spec.selection_metric, "units": "fraction (0.8123 = 81.23 %)",
        "rules": RULE_LABELS, "selection_pool": config.select_from,
        "expert_handover": config.expert_handover, **_aggregate(summaries, setting),
        "handover": handovers, "stage1_reused": reused,
        "seconds": {"total": time.perf_counter() - started,
                    "stage1": sum(s["stage1"] for s in seconds),
                    "stage2": sum(s["stage2"] for s in seconds),
                    "cpu": time.process_time() - cpu_started},  # this process, all threads
        "data": {"root": str(data.root), "features": data.feature_names, "dims": data.dims,
                 "conversations": len(data.conversation_ids),
                 "utterances": data.num_utterances, "empty_faces": data.empty_faces,
                 "synthetic": read_marker(data.root)},
        "device": str(device), "config": config.to_dict(),
        "variant": variant_name(config.to_dict()),
        "source_version": source_version(), "code_version": code_version(),
        "predictions": "predictions.npz",
    }


def _prediction_arrays(data: MultimodalDataset, fold: int,
                       selected: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """One fold's entries of `predictions.npz`: the test utterances (ids, conversation index
    within the test split, labels, in the order of the predictions) and the predictions of the
    epochs each rule selected, '<view>__<rule>' ('run' is the run's own evaluation)."""
    conversations = list(data.folds[fold].test)
    utterances = np.concatenate([np.arange(data.offsets[c], data.offsets[c + 1])
                                 for c in conversations])
    lengths = data.lengths()[conversations]
    prefix = f"fold{fold + 1}__"
    return {prefix + "ids": data.utterance_ids[utterances],
            prefix + "conversation": np.repeat(np.arange(len(conversations)), lengths),
            prefix + "labels": data.labels[utterances],
            **{prefix + key: values for key, values in selected.items()}}


def _summaries(records: list[dict], data: MultimodalDataset, setting: MissingSetting,
               pool: str) -> dict:
    """One fold's selected epochs; for the unified model, per condition and rate evaluated."""
    metric = data.spec.selection_metric
    if setting.protocol != "unified":
        return fold_summary(records, metric, pool=pool)
    views = [s.name for s in setting.evaluation_settings(stage=2)]
    return {"evaluations": {view: fold_summary(records, metric, view) for view in views}}


def _aggregate(folds: list[dict], setting: MissingSetting) -> dict:
    """Means over folds; the unified model's `test` is the mean over the seven conditions."""
    if setting.protocol != "unified":
        return {"test": mean_over_folds(folds), "router": mean_router(folds), "folds": folds}
    views = list(folds[0]["evaluations"])
    evaluations = {}
    for view in views:
        per_fold = [f["evaluations"][view] for f in folds]
        evaluations[view] = {"test": mean_over_folds(per_fold), "router": mean_router(per_fold)}
    conditions = [evaluations[f"fixed-{c}"]["test"] for c in CONDITIONS]
    test = {rule: None if any(c[rule] is None for c in conditions) else
            {k: float(np.mean([c[rule][k] for c in conditions])) for k in conditions[0][rule]}
            for rule in RULE_LABELS}
    return {"test": test, "test_scope": "mean over the seven fixed conditions",
            "evaluations": evaluations, "folds": folds}


def _on_epoch(record: dict, folder: RunFolder, progress: tqdm, data: MultimodalDataset) -> None:
    folder.append_epoch(record)
    line = epoch_line(record, data.spec.selection_metric, data.data_source)
    log.info("%s", line)
    progress.set_postfix_str(line.split("| ", 2)[-1][:60], refresh=False)


def _data_header(data: MultimodalDataset) -> str:
    if data.data_source == "synthetic":
        return f"SYNTHETIC data from {data.root} (generated; not comparable with the paper)"
    return f"real data from {data.root}"


# A run's failures that are one sentence for the user (no traceback): what went wrong and what
# to do (a full disk and a read-only output are CannotWrite). Executors list them and go on.
STATED_FAILURES = (Diverged, RunLocked, CannotWrite, TooLarge)
