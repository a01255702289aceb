"""Which epoch a reported number comes from, named by its rule, and the mean over folds.

See docs/selection.md. By default only stage-2 epochs are candidates (the fused head is untrained in
stage 1); `--select-from all` adds the stage-1 epochs, scored by the fused head's pass on the
stage-1 masks, as the official code does.
    best_test  the epoch with the best test score: what the official code reports ("paper protocol")
    best_val   the epoch with the best validation score (only where a validation split exists)
    last       the final epoch
Scores are the dataset's selection metric (CMU: f1, IEMOCAP: wa, as the official code); ties go to
the earliest epoch. IEMOCAP results are the mean over the five session folds, each fold choosing its
own epoch, with the per-fold values kept. `SelectedPredictions` keeps the test predictions of the
epochs these rules pick while training runs, so the bootstrap can resample them later.
"""
from __future__ import annotations

import math

import numpy as np
import torch

RULES = ("best_test", "best_val", "last")
RULE_LABELS = {"best_test": "best-on-test epoch (paper protocol)",
               "best_val": "best-on-validation epoch", "last": "last epoch"}


POOLS = {"stage2": "stage-2 epochs", "all": "stage-1 and stage-2 epochs (official code)"}
VIEW = "run"  # the name of a run's own evaluation among its predictions (unified: one per view)


def in_pool(record: dict, pool: str) -> bool:
    """Whether the epoch of `record` is a candidate of the selection rules under `pool`."""
    return record["stage"] == 2 or (pool == "all" and "fused" in record["test"])


def select_epochs(records: list[dict], metric: str, view: str | None = None,
                  pool: str = "stage2") -> dict[str, dict | None]:
    """The record chosen by each rule among the epochs of `pool` (best_val is None without a
    validation split). `view` names one evaluation of a unified-model record (e.g. 'fixed-at')."""
    candidates = [r for r in records if in_pool(r, pool)]
    if not candidates:
        raise ValueError(f"no epoch among the {POOLS[pool]} to select from")
    score = lambda r, split: scores_of(r, split, view)[metric]  # noqa: E731
    best = lambda split: max(candidates, key=lambda r: (score(r, split), -r["epoch"]))  # noqa: E731
    return {"best_test": best("test"),
            "best_val": best("val") if candidates[0]["val"] is not None else None,
            "last": candidates[-1]}


class SelectedPredictions:
    """The test predictions of the epochs each rule picks, kept as training goes (the rules of
    `select_epochs`: strictly better replaces, so ties keep the earliest epoch)."""

    def __init__(self, metric: str, pool: str) -> None:
        self.metric, self.pool = metric, pool
        self.best: dict[tuple[str, str], tuple[float, int, np.ndarray]] = {}

    def add(self, record: dict, predictions: dict[str, np.ndarray]) -> None:
        """`predictions`: the test predictions of `record`'s epoch per view."""
        if not in_pool(record, self.pool):
            return
        for view, values in predictions.items():
            name = None if view == VIEW else view
            for rule, split in (("best_test", "test"), ("best_val", "val"), ("last", None)):
                if split is not None and record[split] is None:
                    continue
                score = 0.0 if split is None else scores_of(record, split, name)[self.metric]
                kept = self.best.get((view, rule))
                if kept is None or split is None or score > kept[0]:
                    self.best[view, rule] = (score, record["epoch"], values)

    def state(self) -> list:
        """What is kept so far, as plain values and tensors (for the stage-1 cache, which
        `torch.load(weights_only=True)` reads)."""
        return [[view, rule, score, epoch, torch.from_numpy(np.ascontiguousarray(values))]
                for (view, rule), (score, epoch, values) in self.best.items()]

    def load_state(self, state: list) -> None:
        self.best = {(view, rule): (score, epoch, values.numpy())
                     for view, rule, score, epoch, values in state}

    def arrays(self, records: list[dict]) -> dict[str, np.ndarray]:
        """'<view>__<rule>' -> predictions, checked against `select_epochs` on `records`."""
        out = {}
        for (view, rule), (_, epoch, values) in self.best.items():
            chosen = select_epochs(records, self.metric, None if view == VIEW else view,
                                   self.pool)[rule]
            if chosen is None or chosen["epoch"] != epoch:
                raise RuntimeError(f"predictions kept for epoch {epoch} but {rule} selects "
                                   f"{chosen and chosen['epoch']}: selection rules disagree")
            out[f"{view}__{rule}"] = values
        return out


def fold_summary(records: list[dict], metric: str, view: str | None = None,
                 pool: str = "stage2") -> dict:
    """Test (and validation) metrics at each rule's epoch, the epochs, and the mean router
    weights on the test split at each of them."""
    chosen = select_epochs(records, metric, view, pool)
    return {"test": {rule: _metrics(scores_of(r, "test", view)) if r else None
                     for rule, r in chosen.items()},
            "val": {rule: _metrics(scores_of(r, "val", view)) if r and r["val"] else None
                    for rule, r in chosen.items()},
            "epoch": {rule: r["epoch"] if r else None for rule, r in chosen.items()},
            "stage": {rule: r["stage"] if r else None for rule, r in chosen.items()},
            "router": {rule: scores_of(r, "test", view).get("router") if r else None
                       for rule, r in chosen.items()}}


def mean_over_folds(folds: list[dict]) -> dict[str, dict | None]:
    """Per rule, the mean of each test metric over folds (NaN stays NaN: it is not a zero)."""
    out = {}
    for rule in RULES:
        values = [f["test"][rule] for f in folds]
        if any(v is None for v in values):
            out[rule] = None
            continue
        out[rule] = {k: float(np.mean([v[k] for v in values])) for k in values[0]}
    return out


def mean_router(folds: list[dict], rule: str = "last") -> dict[str, list[float]] | None:
    """Mean over folds of the test router weights (modality -> weight per expert) at `rule`."""
    weights = [f["router"][rule] for f in folds if f["router"].get(rule)]
    if not weights:
        return None
    return {m: np.mean([w[m] for w in weights], axis=0).tolist() for m in weights[0]}


def scores_of(record: dict, split: str, view: str | None = None) -> dict:
    """The fused model's metrics of `split` in `record` (stage 1: its "fused" pass)."""
    scores = record[split] if view is None else record[split][view]
    return scores["fused"] if record["stage"] == 1 else scores


def _metrics(scores: dict) -> dict:
    return {k: v for k, v in scores.items() if k != "loss" and not isinstance(v, dict)}


def json_safe(value):
    """NaN and infinities become null so result files stay strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value
