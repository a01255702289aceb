"""Run a trained model on features: `python -m MoMKE.predict RUN --data-root D --out FILE.csv`.

One CSV row per utterance: the conversation and utterance ids, the split, the modalities used,
the prediction (CMU: the sentiment score and its sign; IEMOCAP: each class's probability and the
argmax class name), the label where the data has one, and the stage-2 router weights of every
modality used (which experts it leaned on). D is GCNet-layout data (`<D>/<DIR>/<label file>` and
its feature folders), or a folder of one's own features without labels (`<D>/manifest.csv` and
`<D>/features/<feature name>/`, `dataloader/manifest.py`). The weights are the run's checkpoint of
`--fold` (best-on-validation, or the last epoch without a validation split). docs/evaluate.md.
"""
from __future__ import annotations

import argparse
import csv
import io
import logging
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from dataloader.atomic import CannotWrite, write_atomic
from dataloader.batch import BatchBuilder
from dataloader.datasets import DataError, get_spec
from dataloader.gcnet import MultimodalDataset, load_dataset
from dataloader.manifest import MANIFEST, load_manifest, present_modalities
from MoMKE.checkpoint import Checkpoint, CheckpointError, check_data, load_checkpoint
from MoMKE.evaluation import Evaluator
from MoMKE.experiments.evaluate import Refused
from MoMKE.model import MODALITIES
from MoMKE.protocols import MissingSetting, parse_condition, parse_rate
from MoMKE.runlog import read_result, setup_console_logging
from MoMKE.runtime import resolve_device
from MoMKE.selection import RULE_LABELS

log = logging.getLogger("MoMKE")


def load_data(root: Path, checkpoint: Checkpoint) -> tuple[MultimodalDataset, bool]:
    """The data at `root` for `checkpoint`'s dataset and feature folders, and whether it has
    labels (a GCNet label file) or not (a manifest)."""
    spec = get_spec(checkpoint.fields["dataset"])
    features = checkpoint.fields["features"]
    if (root / MANIFEST).is_file():
        return load_manifest(root, spec, features), False
    if not (root / spec.folder / spec.label_file).is_file():
        raise Refused(f"{root} holds neither {MANIFEST} nor {spec.folder}/{spec.label_file}; for "
                      f"features of your own write {root / MANIFEST} (columns conversation,"
                      f"utterance) beside features/<feature folder>/ (docs/evaluate.md).")
    return load_dataset(spec.name, root, features), True


def choose_setting(data: MultimodalDataset, checkpoint: Checkpoint, condition: str | None,
                   rate: str | None) -> MissingSetting:
    """The modalities to use: --test-condition, --missing-rate, or every modality the data has;
    refused when the data lacks one of them or has none the model was trained on."""
    present = present_modalities(data)
    if rate is not None:
        if present != "".join(MODALITIES):
            raise Refused(f"--missing-rate draws masks over all three modalities, but "
                          f"{data.root} has features for {present} only; use --test-condition.")
        return MissingSetting("random", rate=parse_rate(rate))
    letters = parse_condition(condition) if condition is not None else present
    lacking = [m for m in letters if m not in present]
    if lacking:
        raise Refused(f"--test-condition {letters}: {data.root} has no "
                      f"{checkpoint.fields['features'][lacking[0]]} features; use the "
                      f"modalities it has ({present}).")
    trained = checkpoint.trained_modalities
    if not set(letters) & set(trained):
        raise Refused(f"{checkpoint.path} was trained (stage 2) on {trained} only and the "
                      f"conversations of {data.root} would have {letters}: no modality it was "
                      f"trained on; predict with a run trained on {letters} or on missing rates.")
    return MissingSetting("fixed", condition=letters)


def predict_rows(checkpoint: Checkpoint, data: MultimodalDataset, setting: MissingSetting,
                 splits: dict[str, list[int]], device: torch.device, *,
                 labelled: bool) -> list[dict]:
    """One dict per utterance of `splits`, in split and conversation order."""
    fields, spec = checkpoint.fields, data.spec
    fold = fields["fold"] - 1 if labelled else 0
    evaluator = Evaluator(data, fold, BatchBuilder(data, device), seed=fields["seed"],
                          batch_size=fields["batch_size"], amp=fields["amp"], device=device,
                          splits=splits)
    rows = []
    for split in splits:
        for batch, output in evaluator.outputs(checkpoint.model, split, 2, setting):
            valid = output.layout.valid
            where = batch.utterance_index.reshape(-1).index_select(0, valid).cpu().numpy()
            available = batch.available.reshape(-1, len(MODALITIES))[valid.cpu()].numpy()
            fused = output.fused.float().cpu()
            router = {m: torch.full((len(valid), len(MODALITIES)), float("nan"))
                      for m in output.router_weights}
            for m, weights in output.router_weights.items():
                router[m][output.layout.valid_position[m].cpu()] = weights.float().cpu()
            router = {m: weights.numpy() for m, weights in router.items()}
            probabilities = None if spec.is_regression else fused.softmax(dim=-1).numpy()
            for i, row in enumerate(where):
                line = {"conversation": data.conversation_ids[
                            int(np.searchsorted(data.offsets, row, side="right") - 1)],
                        "utterance": str(data.utterance_ids[row]),
                        "split": split if labelled else "",
                        "modalities": "".join(m for k, m in enumerate(MODALITIES)
                                              if available[i, k])}
                if spec.is_regression:
                    score = float(fused[i, 0])
                    line.update(score=f"{score:.6f}", sign="positive" if score > 0 else
                                "negative" if score < 0 else "zero")
                else:
                    line.update({f"p_{name}": f"{probabilities[i, c]:.6f}"
                                 for c, name in enumerate(spec.class_names)})
                    line["predicted"] = spec.class_names[int(probabilities[i].argmax())]
                if labelled:
                    label = data.labels[row]
                    line["label"] = f"{float(label):.4f}" if spec.is_regression else \
                        spec.class_names[int(label)]
                for m in MODALITIES:
                    for k, e in enumerate(MODALITIES):
                        value = router[m][i, k] if m in router else float("nan")
                        line[f"router_{m}_to_{e}"] = "" if np.isnan(value) else f"{value:.6f}"
                rows.append(line)
    return rows


def _splits(data: MultimodalDataset, fold: int, split: str, labelled: bool
            ) -> dict[str, list[int]]:
    if not labelled:
        return {"test": list(range(len(data.conversation_ids)))}
    if fold >= len(data.folds):
        raise Refused(f"--fold {fold + 1}: {data.root} has {len(data.folds)} fold(s).")
    chosen = data.folds[fold]
    parts = {"train": list(chosen.train), "val": list(chosen.val), "test": list(chosen.test)}
    if split == "all":
        return {name: ids for name, ids in parts.items() if ids}
    if not parts[split]:
        raise Refused(f"--split {split}: {data.spec.name} has no {split} split here; use "
                      f"--split test or all.")
    return {split: parts[split]}


def csv_text(rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m MoMKE.predict", allow_abbrev=False,
        description="Predict with a trained run on GCNet data or on features of your own "
                    "(docs/evaluate.md).")
    parser.add_argument("run", type=Path, help="a run folder (holding checkpoint_fold<k>.pt)")
    parser.add_argument("--data-root", type=Path, required=True,
                        help="GCNet-layout data (the folder above <DIR>/), or a folder holding "
                             "manifest.csv and features/<feature name>/")
    parser.add_argument("--out", type=Path, required=True, help="the CSV file to write")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--test-condition", default=None,
                       help="the modalities to use, e.g. at (default: every modality the data "
                            "has)")
    group.add_argument("--missing-rate", default=None,
                       help="drop modalities at this rate with the evaluation masks of the "
                            "run's seed and fold")
    parser.add_argument("--split", choices=["train", "val", "test", "all"], default="test",
                        help="GCNet data: which conversations (default test); a manifest is "
                             "always all of its rows")
    parser.add_argument("--fold", type=int, default=1,
                        help="whose checkpoint: IEMOCAP has one model per session fold "
                             "(default 1, trained without session 1)")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda[:N] or auto")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    setup_console_logging(logging.WARNING)
    args = build_parser().parse_args(argv)
    try:
        device = resolve_device(args.device)
        result = read_result(args.run)
        if result is None:
            raise Refused(f"{args.run} holds no complete run (no finished result.json); pass "
                          f"a run folder.")
        checkpoint = load_checkpoint(args.run / f"checkpoint_fold{args.fold}.pt", device,
                                     dataset=result["dataset"])
        data, labelled = load_data(args.data_root, checkpoint)
        check_data(checkpoint, data.spec.name, data.feature_names, data.dims, str(data.root))
        setting = choose_setting(data, checkpoint, args.test_condition, args.missing_rate)
        splits = _splits(data, args.fold - 1, args.split, labelled)
        rows = predict_rows(checkpoint, data, setting, splits, device, labelled=labelled)
        write_atomic(args.out, csv_text(rows))
    except (Refused, CheckpointError, DataError, ValueError, CannotWrite) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    rule = RULE_LABELS.get(checkpoint.fields["rule"], checkpoint.fields["rule"])
    print(f"{len(rows)} utterances of {len(data.conversation_ids)} conversations "
          f"[{data.data_source.upper()} data from {data.root}, "
          f"{'labelled' if labelled else 'no labels'}] predicted with {args.run.name} fold "
          f"{args.fold} ({rule}, epoch {checkpoint.fields['epoch']}) using {setting.name} -> "
          f"{args.out}" + (f" [{checkpoint.code_note}]" if checkpoint.code_note else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
