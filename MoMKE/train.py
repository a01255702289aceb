"""Train and evaluate MoMKE: `python -m MoMKE.train --dataset CMUMOSI --test-condition a,t,atv`.

From: SPEC §4-7. One run folder per (dataset, condition or rate, seed), each run training stage 1
then stage 2 on every fold. `--help` lists every flag.
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from dataloader.batch import BatchBuilder
from dataloader.datasets import DataError
from dataloader.gcnet import MultimodalDataset, feature_names_from, load_dataset, read_marker
from MoMKE.config import ConfigError, TrainConfig, config_to_yaml, parse_config
from MoMKE.protocols import MissingSetting, settings_from
from MoMKE.config import variant_name
from MoMKE.runlog import (VARIANT_FIELDS, RunFolder, RunLock, RunLocked, experiment_hash,
                          identity_hash, read_result, run_folder, run_identity,
                          setup_console_logging)
from MoMKE.runtime import code_version, resolve_device, source_version
from MoMKE.protocols import CONDITIONS
from MoMKE.selection import RULE_LABELS, fold_summary, mean_over_folds, mean_router
from MoMKE.trainer import Diverged, FoldTrainer, model_config_for

log = logging.getLogger("MoMKE")


def main(argv: Sequence[str] | None = None) -> int:
    setup_console_logging()
    try:
        config = parse_config(argv)
        device = resolve_device(config.device)
        check_output_dir(config.output_dir)
        data = load_dataset(config.dataset, config.data_root, feature_names_from(
            config.audio_feature, config.text_feature, config.video_feature))
    except (ConfigError, DataError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    log.info("resolved configuration:\n%s", config_to_yaml(config).rstrip())
    log.info("%s", data.describe())
    if data.data_source == "synthetic":
        log.warning("SYNTHETIC DATA (%s): every number below is measured on generated features "
                    "and is not comparable with the paper", data.root)
    failed = 0
    for setting in settings_from(config.test_condition, config.missing_rate, config.train_missing):
        try:
            run(config, data, setting, device)
        except Diverged:  # logged by `run`, console included
            failed += 1
        except RunLocked as error:
            print(f"error: {error}", file=sys.stderr)
            failed += 1
    return 1 if failed else 0


def run(config: TrainConfig, data: MultimodalDataset, setting: MissingSetting,
        device: torch.device) -> dict:
    """Train every fold of one setting into its run folder; return the result written.

    Under the run's lock: a complete result of the same identity is returned as it is (unless
    `--force`); otherwise the run trains into a fresh attempt folder that replaces the run folder
    only once its result is written. Raises Diverged (no result written; an earlier result stays)
    and RunLocked (another process trains this run)."""
    identity = run_identity(config, setting, data.fingerprint)
    folder = RunFolder(run_folder(config, setting, data.fingerprint), data.data_source)
    with RunLock(folder.path):
        if not config.force and (done := read_result(folder.path, identity)) is not None:
            log.info("%s is complete already; skipping it (use --force to retrain)", folder.path)
            return done
        header = _data_header(data)
        folder.open(config, header)
        try:
            log.info("run %s %s seed %d -> %s [%s]", config.dataset, setting.name, config.seed,
                     folder.path, header)
            with torch_threads(config.threads):
                result = _train_folds(config, data, setting, device, folder)
            result.update(identity=identity, identity_hash=identity_hash(identity),
                          experiment=experiment_hash(identity),
                          base_experiment=experiment_hash(identity, ignore=VARIANT_FIELDS))
            folder.write_result(result)
            folder.commit()
        except Diverged as error:
            log.error("%s (log: %s)", error, folder.log_file)
            raise
        finally:
            folder.close()
    _log_result(result, data)
    return result


def train_stage1(config: TrainConfig, data: MultimodalDataset, setting: MissingSetting,
                 device: torch.device) -> None:
    """Train (or find cached) the stage 1 of every fold of `setting` without running stage 2:
    what a distributed sweep runs once before the runs that reuse it."""
    with torch_threads(config.threads):
        for fold in [k - 1 for k in config.folds] if config.folds else range(len(data.folds)):
            FoldTrainer(config, data, fold, setting, device, BatchBuilder(data, device)).stage1(
                lambda record: None)


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
                 device: torch.device, folder: RunFolder) -> dict:
    builder = BatchBuilder(data, device)
    folds = [k - 1 for k in config.folds] if config.folds else range(len(data.folds))
    summaries, seconds, handovers, reused, predictions = [], [], [], [], {}
    started = time.perf_counter()
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
            folder.save_checkpoint(fold + 1, {
                "model_state": outcome.checkpoint["state"],
                "model_config": model_config_for(config, data).to_dict(),
                "epoch": outcome.checkpoint["epoch"], "rule": outcome.checkpoint["rule"],
                "dataset": data.spec.name, "data_source": data.data_source,
                "setting": setting.name, "seed": config.seed})
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
                    "stage2": sum(s["stage2"] for s in seconds)},
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
    rows = np.concatenate([np.arange(data.offsets[c], data.offsets[c + 1]) for c in conversations])
    lengths = data.lengths()[conversations]
    prefix = f"fold{fold + 1}__"
    return {prefix + "ids": data.utterance_ids[rows],
            prefix + "conversation": np.repeat(np.arange(len(conversations)), lengths),
            prefix + "labels": data.labels[rows],
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
    line = _epoch_line(record, data)
    log.info("%s", line)
    progress.set_postfix_str(line.split("| ", 2)[-1][:60], refresh=False)


def _epoch_line(record: dict, data: MultimodalDataset) -> str:
    metric = data.spec.selection_metric
    parts = [f"[{data.data_source}] fold {record['fold']} stage {record['stage']} "
             f"epoch {record['epoch']:3d}"]
    for split in ("train", "val", "test"):
        scores = record.get(split)
        if scores is None:
            continue
        if record["stage"] == 1:
            values = " ".join(f"{m}:{scores[m][metric]:.3f}" for m in "atv" if m in scores)
            parts.append(f"{split} {metric} {values} loss {scores['loss']:.3f}")
        elif "loss" not in scores:  # unified model: one evaluation per condition and rate
            mean = np.mean([scores[f"fixed-{c}"][metric] for c in CONDITIONS])
            parts.append(f"{split} {metric} {mean:.4f} (mean of the 7 conditions)")
        else:
            parts.append(f"{split} {metric} {scores[metric]:.4f} loss {scores['loss']:.3f}")
    suffix = " (stage 1 reused)" if record.get("reused_stage1") else \
        f" {record['seconds']:.2f}s {record['peak_memory_mb']:.0f}MB"
    return " | ".join(parts) + suffix


def _log_result(result: dict, data: MultimodalDataset) -> None:
    metrics = data.spec.metrics
    scope = "mean over folds, " if len(result["folds"]) > 1 else ""
    if "test_scope" in result:
        scope += result["test_scope"] + ", "
    log.info("result %s %s seed %d [%s data, test split, %svalues as fractions]:",
             result["dataset"], result["setting"], result["seed"], data.data_source, scope)
    for rule, label in RULE_LABELS.items():
        scores = result["test"][rule]
        text = "n/a (no validation split)" if scores is None else "  ".join(
            f"{k} {scores[k]:.4f}" for k in metrics)
        log.info("  %-38s %s", label, text)


def _data_header(data: MultimodalDataset) -> str:
    if data.data_source == "synthetic":
        return f"SYNTHETIC data from {data.root} (generated; not comparable with the paper)"
    return f"real data from {data.root}"


def check_output_dir(output_dir: str) -> None:
    """Refuse before any training when results could not be written below `output_dir`."""
    target = Path(output_dir)
    probe = target
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"--output-dir {target} is not a writable folder (checked {probe}); "
                          f"choose a folder you can write to.")


if __name__ == "__main__":
    sys.exit(main())
