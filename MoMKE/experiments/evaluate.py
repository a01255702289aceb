"""Evaluate saved runs under any missing pattern: `python -m MoMKE.evaluate RUN [RUN ...]`.

Each fold's checkpoint (`MoMKE/checkpoint.py`) is loaded on the device asked for and evaluated on
a split under every setting asked for, with the evaluation masks the training protocol draws for
(seed, fold, split, rate) and the run's own batches and arithmetic (`MoMKE/evaluation.py`): a run
evaluated on its own setting reproduces its `result.json` at the rule its checkpoint holds. The
results go into the run folder's `evaluations.json` (written atomically; nothing else there
changes), keyed by split, setting, data fingerprint and device; an evaluation already there, by the
same code, is reused. The weights are the best-on-validation epoch's, or the last epoch's where
the dataset has no validation split: best-on-test weights are never saved, since their epoch was
chosen on the very test set an evaluation would score. docs/evaluate.md.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch

from dataloader.atomic import CannotWrite
from dataloader.batch import BatchBuilder
from dataloader.datasets import DataError, get_spec
from dataloader.gcnet import MultimodalDataset, load_dataset
from MoMKE.checkpoint import Checkpoint, CheckpointError, check_data, load_checkpoint
from MoMKE.evaluation import Evaluator
from MoMKE.protocols import CONDITIONS, RATES, MissingSetting, parse_condition, parse_rate, \
    settings_from
from MoMKE.runlog import (EVALUATIONS, read_evaluations, read_result,
                          setup_console_logging, write_json)
from MoMKE.runtime import code_version, resolve_device
from MoMKE.selection import RULE_LABELS

log = logging.getLogger("MoMKE")

WEIGHTS_NOTE = ("weights: the checkpoint's epoch (best-on-validation; the last epoch where the "
                "dataset has no validation split); best-on-test weights are not offered, as their "
                "epoch was chosen on the test set itself")


class Refused(ValueError):
    """A run that cannot be evaluated, or data it cannot predict; the message is one sentence
    naming the run, file or flag and what to do."""


@dataclass
class Evaluation:
    """One run evaluated on one split under one setting, on one copy of the data."""

    folder: Path
    result: dict  # the run's result.json
    key: str
    entry: dict  # what evaluations.json holds under `key`
    reused: bool = False


@dataclass
class Loaded:
    """Data read once per process: datasets by (dataset, root, features), builders by device."""

    datasets: dict[tuple, MultimodalDataset] = field(default_factory=dict)
    builders: dict[tuple, BatchBuilder] = field(default_factory=dict)

    def dataset(self, name: str, root: str, features: dict[str, str]) -> MultimodalDataset:
        key = (name, str(Path(root).resolve()), tuple(sorted(features.items())))
        if key not in self.datasets:
            self.datasets[key] = load_dataset(name, root, features)
        return self.datasets[key]

    def builder(self, data: MultimodalDataset, device: torch.device) -> BatchBuilder:
        key = (id(data), str(device))
        if key not in self.builders:
            self.builders[key] = BatchBuilder(data, device)
        return self.builders[key]


def run_folders(paths: Iterable[Path]) -> list[Path]:
    """The run folders at or below `paths` (a folder holding `result.json`), in order."""
    found: list[Path] = []
    for path in paths:
        candidates = [path] if (path / "result.json").is_file() else sorted(
            p.parent for p in path.rglob("result.json"))
        found += [p for p in candidates if not p.name.endswith(".attempt") and p not in found]
    return found


def evaluation_key(split: str, setting: MissingSetting, data: MultimodalDataset,
                   device: torch.device) -> str:
    """How an evaluation is filed in evaluations.json: what makes it the same evaluation (the
    data by its content and by what it says it is, real or synthetic)."""
    return (f"{split} {setting.name} data={data.data_source}:{data.fingerprint[:16]} "
            f"device={device.type}")


def evaluate_run(folder: Path, settings: Sequence[MissingSetting], *, split: str,
                 device: torch.device, data_root: str | None = None,
                 loaded: Loaded | None = None) -> list[Evaluation]:
    """Evaluate the run in `folder` under `settings` on `split`, reusing what evaluations.json
    holds by the same code; write the new ones into it. Raises Refused."""
    loaded = loaded or Loaded()
    result = read_result(folder)
    if result is None:
        raise Refused(f"{folder} holds no complete run (no finished result.json); train it "
                      f"first, or pass a run folder.")
    spec = get_spec(result["dataset"])
    if split == "val" and not spec.has_validation:
        raise Refused(f"--split val: {spec.name} has no validation split; use --split test.")
    if not result["config"].get("save_checkpoint", True):
        raise Refused(f"{folder} was trained with --no-save-checkpoint, so it has no weights to "
                      f"evaluate; train it again with --save-checkpoint --force (same flags).")
    folds = [f["fold"] for f in result["folds"]]
    checkpoints = [_checkpoint(folder, k, result, device) for k in folds]
    root = data_root if data_root is not None else result["config"]["data_root"]
    try:
        data = loaded.dataset(spec.name, root, checkpoints[0].fields["features"])
    except DataError as error:
        raise Refused(str(error)) from None
    for checkpoint in checkpoints:
        check_data(checkpoint, data.spec.name, data.feature_names, data.dims, str(data.root))
    stored = read_evaluations(folder)
    builder = loaded.builder(data, device)
    evaluations, changed = [], False
    for setting in settings:
        key = evaluation_key(split, setting, data, device)
        old = stored.get(key)
        if old is not None and old.get("code_version") == code_version() and \
                old.get("identity_hash") == result.get("identity_hash"):
            evaluations.append(Evaluation(folder, result, key, old, reused=True))
            continue
        entry = _evaluate(checkpoints, data, builder, split, setting, device)
        entry["identity_hash"] = result.get("identity_hash")
        stored[key] = entry
        changed = True
        evaluations.append(Evaluation(folder, result, key, entry))
    if changed:
        try:
            _write_evaluations(folder, stored)
        except CannotWrite as error:
            log.warning("%s; the evaluations are printed but not kept", error)
    return evaluations


def _checkpoint(folder: Path, fold: int, result: dict, device: torch.device) -> Checkpoint:
    try:
        checkpoint = load_checkpoint(folder / f"checkpoint_fold{fold}.pt", device,
                                     dataset=result["dataset"])
    except CheckpointError as error:
        raise Refused(str(error)) from None
    if checkpoint.fields["identity_hash"] != result.get("identity_hash"):
        raise Refused(f"{checkpoint.path} belongs to another run than {folder}/result.json (its "
                      f"identity differs); retrain the run with --force.")
    return checkpoint


def _evaluate(checkpoints: list[Checkpoint], data: MultimodalDataset, builder: BatchBuilder,
              split: str, setting: MissingSetting, device: torch.device) -> dict:
    """Every fold's checkpoint on `split` under `setting`: metrics per fold and their mean, and
    per fold the predictions, labels and conversation index the report's bootstrap resamples."""
    started = time.perf_counter()
    folds = []
    for checkpoint in checkpoints:
        fields = checkpoint.fields
        fold = fields["fold"] - 1
        if fold >= len(data.folds):
            raise Refused(f"{data.root} has {len(data.folds)} fold(s), but {checkpoint.path} is "
                          f"fold {fold + 1}; use data with the same splits.")
        evaluator = Evaluator(data, fold, builder, seed=fields["seed"],
                              batch_size=fields["batch_size"], amp=fields["amp"], device=device)
        metrics, predictions = evaluator.evaluate(checkpoint.model, split, 2, setting)
        conversations = evaluator.splits[split]
        lengths = data.lengths()[conversations]
        utterances = np.concatenate([np.arange(data.offsets[c], data.offsets[c + 1])
                                     for c in conversations])
        folds.append({"fold": fold + 1, "epoch": fields["epoch"], "rule": fields["rule"],
                      "metrics": {k: v for k, v in metrics.items()
                                  if k != "loss" and not isinstance(v, dict)},
                      "router": metrics.get("router"), "loss": metrics["loss"],
                      "predictions": predictions.tolist(),
                      "labels": data.labels[utterances].tolist(),
                      "conversation": np.repeat(np.arange(len(conversations)), lengths).tolist()})
    first = checkpoints[0]
    names = list(folds[0]["metrics"])
    return {"split": split, "setting": setting.name, "protocol": setting.protocol,
            "condition": setting.condition, "missing_rate": setting.rate,
            "rule": first.fields["rule"], "weights": RULE_LABELS.get(
                first.fields["rule"], first.fields["rule"]),
            "data": {"root": str(data.root), "source": data.data_source,
                     "fingerprint": data.fingerprint},
            "device": str(device), "amp": bool(first.fields["amp"]),
            "code_version": code_version(),
            "checkpoint_code_version": first.fields["code_version"],
            "note": first.code_note,
            "metrics": {k: float(np.mean([f["metrics"][k] for f in folds])) for k in names},
            "folds": folds, "seconds": time.perf_counter() - started,
            "evaluated": time.strftime("%Y-%m-%d %H:%M:%S")}


def _write_evaluations(folder: Path, evaluations: dict) -> None:
    # Another process may have added evaluations since we read: keep theirs too.
    merged = {**read_evaluations(folder), **evaluations}
    write_json(folder / EVALUATIONS, {"run": folder.name, "evaluations": dict(sorted(
        merged.items()))})


# ----------------------------------------------------------------------------- the command

def requested_settings(conditions: str | None, rates: str | None) -> list[MissingSetting]:
    """The settings of --test-condition and --missing-rate (either alone: only those; neither:
    all seven conditions and all eight rates)."""
    if conditions is None and rates is None:
        return settings_from(list(CONDITIONS), list(RATES))
    return settings_from([parse_condition(c) for c in (conditions or "").split(",") if c.strip()],
                         [parse_rate(r) for r in (rates or "").split(",") if r.strip()])


def table_lines(evaluations: Sequence[Evaluation]) -> list[str]:
    """The printed table: per run and setting, the weights, data and metrics."""
    lines = [f"# {WEIGHTS_NOTE}; values are fractions; 'reused' = read from evaluations.json"]
    for item in evaluations:
        entry, result = item.entry, item.result
        spec = get_spec(result["dataset"])
        epochs = ",".join(str(f["epoch"]) for f in entry["folds"])
        data = entry["data"]
        metrics = "  ".join(f"{k} {entry['metrics'][k]:.4f}" for k in spec.metrics
                            if k in entry["metrics"])
        folds = f" mean of {len(entry['folds'])} folds" if len(entry["folds"]) > 1 else ""
        note = f"  [{entry['note']}]" if entry.get("note") else ""
        lines.append(
            f"{result['dataset']} trained {result['setting']} seed {result['seed']} | weights "
            f"{entry['rule']} epoch {epochs} | evaluated {entry['setting']} on {entry['split']}"
            f"{folds} | {data['source'].upper()} data {data['fingerprint'][:8]} | {metrics}"
            f"{' (reused)' if item.reused else ''}{note}")
    return lines


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m MoMKE.evaluate", allow_abbrev=False,
        description="Evaluate saved runs under other missing patterns (docs/evaluate.md).")
    parser.add_argument("runs", nargs="+", type=Path,
                        help="run folders, or folders holding run folders (e.g. saved/CMUMOSI)")
    parser.add_argument("--test-condition", default=None,
                        help="comma list of conditions among a,t,v,at,av,tv,atv (default: all "
                             "seven, and all eight rates, when neither flag is given)")
    parser.add_argument("--missing-rate", default=None,
                        help="comma list of missing rates in [0, 0.7]")
    parser.add_argument("--split", choices=["test", "val"], default="test",
                        help="the split to evaluate (val only where the dataset has one)")
    parser.add_argument("--data-root", default=None,
                        help="evaluate on this copy of the data instead of the run's own (same "
                             "dataset, feature folders and dimensions)")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda[:N] or auto")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    setup_console_logging(logging.WARNING)
    args = build_parser().parse_args(argv)
    try:
        settings = requested_settings(args.test_condition, args.missing_rate)
        device = resolve_device(args.device)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    missing = [p for p in args.runs if not p.exists()]
    if missing:
        print(f"error: {missing[0]} does not exist; pass a run folder or the folder above runs.",
              file=sys.stderr)
        return 2
    folders = run_folders(args.runs)
    if not folders:
        print(f"error: no run (result.json) below {', '.join(map(str, args.runs))}.",
              file=sys.stderr)
        return 2
    evaluations, refused, loaded = [], 0, Loaded()
    for folder in folders:
        try:
            evaluations += evaluate_run(folder, settings, split=args.split, device=device,
                                        data_root=args.data_root, loaded=loaded)
        except (Refused, CheckpointError) as error:
            print(f"error: {error}", file=sys.stderr)
            refused += 1
    for line in table_lines(evaluations):
        print(line)
    return 1 if refused else 0


if __name__ == "__main__":
    sys.exit(main())
