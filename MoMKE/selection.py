"""Which epoch a reported number comes from, named by its rule, and the mean over folds.

From: SPEC §6. Only stage-2 epochs are candidates (the fused head is untrained in stage 1).
    best_test  the epoch with the best test score: what the official code reports ("paper protocol")
    best_val   the epoch with the best validation score (only where a validation split exists)
    last       the final epoch
Scores are the dataset's selection metric (CMU: f1, IEMOCAP: wa, as the official code); ties go to
the earliest epoch. IEMOCAP results are the mean over the five session folds, each fold choosing its
own epoch, with the per-fold values kept.
"""
from __future__ import annotations

import math

import numpy as np

RULES = ("best_test", "best_val", "last")
RULE_LABELS = {"best_test": "best-on-test epoch (paper protocol)",
               "best_val": "best-on-validation epoch", "last": "last epoch"}


def select_epochs(records: list[dict], metric: str,
                  view: str | None = None) -> dict[str, dict | None]:
    """The stage-2 record chosen by each rule (best_val is None without a validation split).
    `view` names one evaluation of a unified-model record (e.g. 'fixed-at')."""
    stage2 = [r for r in records if r["stage"] == 2]
    if not stage2:
        raise ValueError("no stage-2 epoch to select from")
    score = lambda r, split: _scores(r, split, view)[metric]  # noqa: E731
    best = lambda split: max(stage2, key=lambda r: (score(r, split), -r["epoch"]))  # noqa: E731
    return {"best_test": best("test"),
            "best_val": best("val") if stage2[0]["val"] is not None else None,
            "last": stage2[-1]}


def fold_summary(records: list[dict], metric: str, view: str | None = None) -> dict:
    """Test (and validation) metrics at each rule's epoch, the epochs, and the mean router
    weights on the test split at each of them."""
    chosen = select_epochs(records, metric, view)
    return {"test": {rule: _metrics(_scores(r, "test", view)) if r else None
                     for rule, r in chosen.items()},
            "val": {rule: _metrics(_scores(r, "val", view)) if r and r["val"] else None
                    for rule, r in chosen.items()},
            "epoch": {rule: r["epoch"] if r else None for rule, r in chosen.items()},
            "router": {rule: _scores(r, "test", view).get("router") if r else None
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


def _scores(record: dict, split: str, view: str | None) -> dict:
    return record[split] if view is None else record[split][view]


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
