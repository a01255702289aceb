"""Rows of a table: one per condition or rate (and averages), with the selected test metrics of
every seed, and the cells that aggregate them; which MAE/Corr definition a table shows."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from MoMKE.protocols import CONDITIONS, RATES
from MoMKE.results.published import (Published, published_fixed, published_fixed_average,
                                     published_random)
from MoMKE.selection import RULES


# ----------------------------------------------------------------------------- rows and cells
# A cell is the mean, sample standard deviation and count over seeds of one test metric at one
# epoch-selection rule, in display units (accuracy-like metrics in percent, MAE and Corr raw).
# Averages over conditions (or rates) are taken per seed over the seeds that have every row, then
# over seeds, as papers average their conditions.

PERCENT_METRICS = {"acc2", "f1", "acc7", "wa", "ua"}  # shown in percent; mae and corr raw
METRIC_NAMES = {"acc2": "Acc2", "f1": "F1", "mae": "MAE", "corr": "Corr", "acc7": "Acc7",
                "wa": "WA", "ua": "UA"}


@dataclass
class Row:
    """One table row: a condition, a rate or an average, with its runs (one per seed)."""

    label: str
    protocol: str
    key: str | float | None  # the condition, the rate, or None for an average
    results: list[dict]  # for averages: one synthetic result per seed (means over the rows)
    averaged: tuple = ()  # the conditions or rates an average row covers


def table_rows(results: Sequence[dict]) -> list[Row]:
    rows = []
    rates = sorted({round(float(r["missing_rate"]), 6) for r in results
                    if r["protocol"] == "random"} | set(RATES))  # every rate run, not only 0.1 steps
    for protocol, keys, name in (("fixed", CONDITIONS, "condition"),
                                 ("random", rates, "missing_rate")):
        chosen = [Row(str(k), protocol, k, [r for r in results if r["protocol"] == protocol
                                            and _same(r[name], k)]) for k in keys]
        chosen = [row for row in chosen if row.results]
        if not chosen:
            continue
        rows.extend(chosen)
        rows.extend(_averages(protocol, chosen))
    return rows


def _same(value, key) -> bool:
    return value == key if isinstance(key, str) else value is not None and abs(value - key) < 1e-9


def _averages(protocol: str, rows: list[Row]) -> list[Row]:
    """Mean over rows per seed (only seeds that have every row), as papers average conditions."""
    subsets = [("average", rows)]
    if protocol == "fixed" and any(r.key == "atv" for r in rows) and len(rows) > 1:
        subsets.append(("average without atv", [r for r in rows if r.key != "atv"]))
    if protocol == "random" and any(r.key == 0.0 for r in rows) and len(rows) > 1:
        subsets.append(("average 0.1-0.7", [r for r in rows if r.key != 0.0]))
    out = []
    for label, subset in subsets:
        seeds = set.intersection(*({r["seed"] for r in row.results} for row in subset))
        per_seed = []
        for seed in sorted(seeds):
            members = [next(r for r in row.results if r["seed"] == seed) for row in subset]
            per_seed.append({"seed": seed, "test": {rule: _mean_scores(
                [m["test"][rule] for m in members]) for rule in RULES}})
        out.append(Row(f"{label} ({len(subset)})", protocol, None, per_seed,
                       tuple(row.key for row in subset)))
    return out


def _mean_scores(scores: list[dict | None]) -> dict | None:
    if any(s is None for s in scores):
        return None
    return {k: float(np.mean([as_number(s[k]) for s in scores])) for k in scores[0]}


def as_number(value) -> float:
    return float("nan") if value is None else float(value)


def cell(row: Row, rule: str, metric: str) -> tuple[float, float, int] | None:
    """(mean, std, n) over seeds, in display units (percent or raw), or None."""
    values = [as_number(r["test"][rule][metric]) for r in row.results if r["test"][rule] is not None]
    if not values:
        return None
    scale = 100.0 if metric in PERCENT_METRICS else 1.0
    values = np.array(values) * scale
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0, len(values)


def published_value(dataset: str, row: Row, metric: str) -> Published | None:
    if row.protocol == "fixed":
        if row.key is None:
            if set(row.averaged) == set(CONDITIONS) - {"atv"}:  # the published averages skip atv
                return (published_fixed(dataset, "average_of_six", metric)
                        or published_fixed_average(dataset, metric))
            return None
        return published_fixed(dataset, row.key, metric)
    return published_random(dataset, row.key, metric) if row.key is not None else None


def variant(result: dict) -> str:
    return result.get("variant", "MoMKE")


def unified_as_runs(results: Sequence[dict]) -> list[dict]:
    """Each unified-model result as one pseudo-run per condition and rate it was evaluated on,
    so its rows line up with the per-condition models' rows."""
    runs = []
    for result in results:
        for view, evaluation in result.get("evaluations", {}).items():
            protocol, value = view.split("-", 1)
            runs.append({"seed": result["seed"], "protocol": protocol, "test": evaluation["test"],
                         "router": evaluation.get("router"), "folder": result.get("folder"),
                         "view": view,
                         "condition": value if protocol == "fixed" else None,
                         "missing_rate": float(value) if protocol == "random" else None})
    return runs


def router_table(results: Sequence[dict]) -> dict[str, dict[str, np.ndarray]]:
    """condition -> modality -> mean router weight per expert (E,), over seeds, at the last epoch."""
    table: dict[str, dict[str, list]] = {}
    for result in results:
        if result.get("protocol") != "fixed" or not result.get("router"):
            continue
        for m, weights in result["router"].items():
            table.setdefault(result["condition"], {}).setdefault(m, []).append(weights)
    return {c: {m: np.mean(w, axis=0) for m, w in by_m.items()}
            for c, by_m in sorted(table.items(), key=lambda item: CONDITIONS.index(item[0]))}


# ----------------------------------------------------------------------------- CSV and files

MAE_CORR_NONZERO = {"mae": "mae_nonzero", "corr": "corr_nonzero"}


def mae_corr_mode(choice: str, results: Sequence[dict]) -> str:
    """'all' or 'nonzero': as chosen, or for 'auto' nonzero when every run was --official."""
    if choice != "auto":
        return choice
    return "nonzero" if all(r["config"].get("official") for r in results) else "all"


def with_nonzero_mae_corr(result: dict) -> dict:
    """`result` with MAE and Corr replaced by their non-zero-label values at every rule."""
    def swap(scores: dict | None) -> dict | None:
        if scores is None:
            return None
        if any(not isinstance(scores.get(v), (int, float)) for v in MAE_CORR_NONZERO.values()):
            raise ValueError("it holds no MAE/Corr on non-zero labels (written before they were "
                             "kept); use --mae-corr all")
        return {**scores, **{k: scores[v] for k, v in MAE_CORR_NONZERO.items()}}
    return {**result, "test": {rule: swap(scores) for rule, scores in result["test"].items()}}
