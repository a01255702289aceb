"""Paper-style tables and plots from saved run folders.

    python -m MoMKE.report saved/            # every complete run below saved/
    python -m MoMKE.report saved/CMUMOSI --out reports/

From: SPEC §6-7. Runs are found by their `result.json` (never by folder names) and grouped by
dataset, data source and hyperparameters. Each group gets a Markdown and a CSV file: MoMKE's rows
(the seven fixed conditions and the missing rates, each with averages; columns: the dataset's
metrics under each epoch-selection rule; seeds as mean ± std) with the published numbers and our
difference beside the paper-protocol column; then, where they were run, the unified model beside
the per-condition models, the ablation table, and the router weights. Synthetic data is announced
in every header and plot title.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
import tempfile
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import yaml

from dataloader.atomic import NoSpace, write_atomic, write_errors_named
from dataloader.datasets import DATASETS, get_spec
from MoMKE.config import PAPER_SCHEDULE
from MoMKE.protocols import CONDITIONS, RATES
from MoMKE.results import equivalence
from MoMKE.results.uncertainty import SavedRuns
from MoMKE.runlog import experiment_hash
from MoMKE.selection import POOLS, RULE_LABELS, RULES, VIEW

# ----------------------------------------------------------------------------- published numbers
# MoMKE/results/published_results.yaml: every value comes back with the key of its source, so a table can
# cite it. Values are percent, as published; our results are fractions, converted for the tables.

PUBLISHED_FILE = Path(__file__).with_name("published_results.yaml")


@dataclass(frozen=True)
class Published:
    value: float  # percent
    source: str  # key into `published_sources()`


@lru_cache(maxsize=1)
def _published_table() -> dict:
    return yaml.safe_load(PUBLISHED_FILE.read_text())


def published_sources() -> dict[str, str]:
    return {key: " ".join(text.split()) for key, text in _published_table()["sources"].items()}


def published_fixed(dataset: str, condition: str, metric: str) -> Published | None:
    """A published fixed-protocol value; `condition` 'average_of_six' for the published mean."""
    entry = _published_table()["fixed"].get(dataset)
    if entry is None or metric not in entry["metrics"]:
        return None
    values = entry["average_of_six"] if condition == "average_of_six" \
        else entry["conditions"].get(condition)
    return None if values is None else Published(values[entry["metrics"].index(metric)],
                                                 entry["source"])


def published_fixed_average(dataset: str, metric: str) -> Published | None:
    """The mean over missing conditions that TMDC reports (no per-condition values)."""
    table = _published_table()["fixed_average"]
    entry = table.get(dataset)
    if entry is None or metric not in entry["metrics"]:
        return None
    return Published(entry["values"][entry["metrics"].index(metric)], table["source"])


def published_random(dataset: str, rate: float, metric: str) -> Published | None:
    for section in ("random", "random_extra"):
        entry = _published_table()[section].get(dataset)
        if entry is None or metric not in entry["metrics"]:
            continue
        # Only the rate itself: a run at 0.14 has no published counterpart at 0.1.
        values = {round(float(r), 6): v for r, v in entry["rates"].items()}.get(round(rate, 6))
        if values is not None:
            return Published(values[entry["metrics"].index(metric)], entry["source"])
    return None


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
    return {k: float(np.mean([_num(s[k]) for s in scores])) for k in scores[0]}


def _num(value) -> float:
    return float("nan") if value is None else float(value)


def cell(row: Row, rule: str, metric: str) -> tuple[float, float, int] | None:
    """(mean, std, n) over seeds, in display units (percent or raw), or None."""
    values = [_num(r["test"][rule][metric]) for r in row.results if r["test"][rule] is not None]
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


# ----------------------------------------------------------------------------- collecting runs

PAPER_HYPERPARAMETERS = {"hidden": 256, "depth": 4, "num_heads": 2, "mlp_ratio": 1.0,
                         "drop_rate": 0.5, "attn_drop_rate": 0.0, "lr": 1e-4, "l2": 1e-5,
                         "expert_handover": "best"}
ABLATION_ORDER = ("MoMKE", "no-stage1", "uniform-router", "self-experts", "frozen-experts")
Key = tuple[str, str, str]  # dataset, data source, base experiment


@dataclass
class Found:
    """What the report found below its paths: the results it uses (one per run identity, each
    with its folder) and every folder it skipped, with the reason."""

    results: list[dict] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (folder, why)


def collect(paths: Iterable[Path]) -> Found:
    """Complete, well-formed results below `paths`, one per run identity; the rest is listed
    in `skipped` with the reason (a copied run folder is the same run, not a second seed)."""
    found, seen = Found(), {}
    for root in paths:
        candidates = [root / "result.json"] if (root / "result.json").is_file() else \
            sorted(root.rglob("result.json"))
        for path in candidates:
            folder = str(path.parent)
            try:
                result = json.loads(path.read_text())
            except (OSError, ValueError) as error:
                found.skipped.append((folder, f"result.json does not parse ({error})"))
                continue
            problem = result_problem(result)
            if problem is not None:
                found.skipped.append((folder, problem))
                continue
            key = _identity_key(result)
            if key in seen:
                found.skipped.append((folder, f"the same run (identity) as {seen[key]}: a copy, "
                                              f"counted once"))
                continue
            seen[key] = folder
            found.results.append({**result, "folder": folder})
    return found


def _identity_key(result: dict) -> tuple:
    if "identity_hash" in result:
        return ("identity", result["identity_hash"])
    # Results written before run identities existed: their configuration hash, setting and seed.
    return ("legacy", result.get("experiment"), result["setting"], result["seed"])


def result_problem(result: object) -> str | None:
    """Why a parsed result.json cannot be reported, in a few words; None when it can."""
    if not isinstance(result, dict):
        return "result.json is not an object"
    if result.get("complete") is not True:
        return "the run is not complete (interrupted before its result)"
    missing = [k for k in ("dataset", "data_source", "protocol", "setting", "seed", "test",
                           "config", "data") if k not in result]
    if missing:
        return f"result.json lacks {', '.join(missing)}"
    if result["dataset"] not in DATASETS:
        return f"unknown dataset {result['dataset']!r}"
    if result["protocol"] not in ("fixed", "random", "unified") or not isinstance(
            result["seed"], int) or not isinstance(result["config"], dict) or not isinstance(
            result["data"], dict) or not isinstance(result["data"].get("features"), dict):
        return "result.json has fields of the wrong type (protocol, seed, config or data)"
    if result["protocol"] == "fixed" and result.get("condition") not in CONDITIONS:
        return f"unknown condition {result.get('condition')!r}"
    if result["protocol"] == "random" and not isinstance(result.get("missing_rate"),
                                                         (int, float)):
        return "a random-protocol result without a numeric missing_rate"
    test = result["test"]
    metrics = get_spec(result["dataset"]).metrics
    if not isinstance(test, dict) or set(test) != set(RULES):
        return f"its test metrics are not keyed by the rules {', '.join(RULES)}"
    for rule, scores in test.items():
        if scores is None:
            continue
        if not isinstance(scores, dict) or any(k not in scores for k in metrics):
            return f"its {rule} test metrics lack some of {', '.join(metrics)}"
        if any(not isinstance(scores[k], (int, float)) for k in metrics):
            return (f"its {rule} test metrics hold null or non-numbers (a run that diverged "
                    f"before the divergence guard existed); retrain it with --force")
    if not isinstance(result.get("folds", []), list):
        return "its folds are not a list"
    return None


def group(results: Sequence[dict]) -> dict[Key, list[dict]]:
    """Runs of one dataset, data source and base experiment (MoMKE, its ablations, unified)."""
    groups: dict[Key, list[dict]] = {}
    for result in results:
        base = result.get("base_experiment", result.get("experiment", "?"))
        groups.setdefault((result["dataset"], result["data_source"], base), []).append(result)
    return dict(sorted(groups.items()))


# ----------------------------------------------------------------------------- intervals

class Intervals:
    """95 % bootstrap intervals of table cells and of paired differences, from the runs' kept
    test predictions (`MoMKE/results/uncertainty.py`): whole test conversations are resampled, since the
    utterances of one conversation are correlated. All runs share the resamples, so the interval
    of a mean over seeds or conditions, or of a difference, is computed on paired replicates."""

    def __init__(self, dataset: str, mae_corr: str, resamples: int = 1000) -> None:
        self.saved = SavedRuns(resamples=resamples)
        self.regression = get_spec(dataset).is_regression
        self.mae_corr = mae_corr
        self.resamples = resamples

    def header(self) -> str:
        return (f"Intervals: [low, high] is a 95 % percentile bootstrap interval over test "
                f"conversations (whole conversations resampled, as their utterances are "
                f"correlated; {self.resamples} resamples, the same for every run, so means and "
                f"differences are paired); ± beside it is the sample std over seeds. \"≈0\" marks "
                f"a difference whose interval covers zero.")

    def run(self, result: dict, rule: str, metric: str) -> np.ndarray | None:
        """(R,) replicates of one run's metric in display units, or None."""
        if not result.get("folder") or result["test"].get(rule) is None:
            return None
        arrays = self.saved.replicates(result["folder"], result.get("view", VIEW), rule,
                                       regression=self.regression)
        if arrays is None:
            return None
        name = MAE_CORR_NONZERO.get(metric, metric) if self.mae_corr == "nonzero" else metric
        return arrays[name] * (100.0 if metric in PERCENT_METRICS else 1.0)

    def row(self, row: Row, rule: str, metric: str, base: Sequence[Row]) -> np.ndarray | None:
        """Replicates of a row's value: the mean over its seeds; for an average row, per seed the
        mean over the rows it averages (taken from `base`), then the mean over seeds."""
        if row.key is not None:
            sets = [self.run(r, rule, metric) for r in row.results if r["test"][rule] is not None]
        else:
            members = [b for b in base if b.protocol == row.protocol and b.key is not None
                       and b.key in row.averaged]
            sets = []
            for seed in (r["seed"] for r in row.results):
                runs = [next((r for r in b.results if r["seed"] == seed), None) for b in members]
                arrays = [self.run(r, rule, metric) if r else None for r in runs]
                sets.append(None if any(a is None for a in arrays) else np.mean(arrays, axis=0))
        if not sets or any(a is None for a in sets):
            return None
        return np.mean(sets, axis=0)

    def text(self, replicates: np.ndarray | None, metric: str) -> str:
        if replicates is None:
            return ""
        low, high = self.saved.interval([replicates])
        digits = 2 if metric in PERCENT_METRICS else 3
        return f" [{low:.{digits}f}, {high:.{digits}f}]"

    def difference(self, point: float, a: np.ndarray | None, b: np.ndarray | None,
                   metric: str) -> str:
        """'+1.23 [−0.40, +2.85]' for A − B (≈0 when the interval covers zero)."""
        digits = 2 if metric in PERCENT_METRICS else 3
        if a is None or b is None:
            return f"{point:+.{digits}f}"
        low, high = self.saved.interval([a - b])
        mark = " ≈0" if low <= 0 <= high else ""
        return f"{point:+.{digits}f} [{low:+.{digits}f}, {high:+.{digits}f}]{mark}"


# ----------------------------------------------------------------------------- Markdown

def _fmt(value: tuple[float, float, int] | None, metric: str) -> str:
    if value is None:
        return "n/a"
    mean, std, n = value
    if np.isnan(mean):
        return "nan"
    digits = 2 if metric in PERCENT_METRICS else 3
    return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if n > 1 else "")


def _column(metric: str) -> str:
    return f"{METRIC_NAMES[metric]} ({'%' if metric in PERCENT_METRICS else 'raw'})"


def _table(header: list[str], lines: list[list[str]]) -> list[str]:
    return (["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            + ["| " + " | ".join(line) + " |" for line in lines])


def markdown(key: Key, results: list[dict], rows: list[Row], mae_corr: str = "all",
             intervals: Intervals | None = None) -> str:
    dataset, source, _ = key
    metrics = get_spec(dataset).metrics
    kind = "SYNTHETIC data" if source == "synthetic" else "real data"
    out = [f"# {dataset}: MoMKE reproduction ({kind})", ""]
    out += [f"- {line}" for line in header_lines(key, results, mae_corr)]
    if intervals is not None:
        out += [f"- {intervals.header()}"]
        unusable = [f"{r['folder']}/predictions.npz {why}" for r in results if r.get("folder")
                    and (why := intervals.saved.problem(r["folder"])) is not None]
        if unusable:
            out += [f"- No interval from {len(unusable)} run(s) (nor for the rows and averages "
                    f"they are part of): {'; '.join(unusable)}."]
        out += _optimism_section(dataset, results, intervals)
    for protocol, title in (("fixed", "Fixed missing protocol (one model per test condition)"),
                            ("random", "Random missing rate (one model per rate)")):
        chosen = [r for r in rows if r.protocol == protocol]
        if chosen:
            out += ["", f"## {title}"] + _rule_tables(dataset, chosen, metrics, protocol,
                                                      intervals)
    unified = [r for r in results if variant(r).startswith("unified")]
    if unified:
        out += ["", "## One model for every missing pattern (unified) beside the per-condition "
                    "models"] + _unified_section(dataset, results, unified, intervals)
    if len({variant(r) for r in results if not variant(r).startswith("unified")}) > 1:
        out += ["", "## Ablations (averages over the fixed conditions every variant ran)"]
        out += _ablation_section(dataset, results, intervals)
    routers = router_table([r for r in results if variant(r) == "MoMKE"])
    if routers:
        out += ["", "## Router weights (MoMKE, fixed protocol, test split, last epoch)", "",
                "Mean weight that each modality's router gives each expert, over its observed "
                "utterances, folds and seeds (rows sum to 1)."]
        out += [""] + _table(["condition", "modality", "expert a", "expert t", "expert v"],
                             [[c, m] + [f"{w:.3f}" for w in weights]
                              for c, by_m in routers.items() for m, weights in by_m.items()])
    folds = _fold_lines([r for r in results if variant(r) == "MoMKE"], get_spec(dataset))
    if folds:
        out += ["", "## Per fold (paper protocol column, mean over seeds)", ""] + folds
    out += ["", "## Sources of the published numbers", ""]
    out += [f"- [{name}] {text}" for name, text in published_sources().items()]
    return "\n".join(out) + "\n"


def _rule_tables(dataset: str, rows: list[Row], metrics: tuple[str, ...],
                 protocol: str, intervals: Intervals | None = None) -> list[str]:
    out = []
    for rule in RULES:
        if all(cell(r, rule, metrics[0]) is None for r in rows):
            out += ["", f"### {RULE_LABELS[rule]}: n/a ({dataset} has no validation split)"]
            continue
        shown = [m for m in metrics if rule == "best_test"
                 and any(published_value(dataset, r, m) for r in rows)]
        header = ["condition" if protocol == "fixed" else "missing rate", "seeds"]
        header += [_column(m) for m in metrics]
        header += [f"published {METRIC_NAMES[m]}" for m in shown]
        header += [f"Δ {METRIC_NAMES[m]}" for m in shown]
        lines = []
        for row in rows:
            values = [cell(row, rule, m) for m in metrics]
            line = [row.label, str(max((v[2] for v in values if v), default=0))]
            line += [_fmt(v, m) + (intervals.text(intervals.row(row, rule, m, rows), m)
                                   if intervals and v else "")
                     for v, m in zip(values, metrics)]
            references = [published_value(dataset, row, m) for m in shown]
            line += [f"{p.value:.2f} [{p.source}]" if p else "" for p in references]
            line += [f"{cell(row, rule, m)[0] - p.value:+.2f}" if p and cell(row, rule, m) else ""
                     for m, p in zip(shown, references)]
            lines.append(line)
        out += ["", f"### Test metrics at the {RULE_LABELS[rule]}", ""] + _table(header, lines)
    return out


def _unified_section(dataset: str, results: list[dict], unified: list[dict],
                     intervals: Intervals | None = None) -> list[str]:
    metrics = [m for m in get_spec(dataset).metrics if m in PERCENT_METRICS][:2]
    own_rows = table_rows([r for r in results if variant(r) == "MoMKE"])
    per_condition = {(r.protocol, r.label): r for r in own_rows}
    unified_rows = table_rows(unified_as_runs(unified))
    header = ["row"]
    for m in metrics:
        header += [f"{METRIC_NAMES[m]} per-condition, {tag}" for tag in ("test-best", "last")]
        header += [f"{METRIC_NAMES[m]} unified, {tag}" for tag in ("test-best", "last")]
        header += [f"Δ {METRIC_NAMES[m]} unified − per-condition, last"]
    lines = []
    for row in unified_rows:
        own = per_condition.get((row.protocol, row.label))
        line = [row.label if row.protocol == "fixed" or row.key is None else f"rate {row.label}"]
        for m in metrics:
            for source in (own, row):
                line += [_fmt(cell(source, rule, m), m) if source else "n/a"
                         for rule in ("best_test", "last")]
            line.append(_difference(row, unified_rows, own, own_rows, "last", m, intervals))
        lines.append(line)
    cost = _costs(results, unified)
    return ["", "Per-condition: one MoMKE model per condition or rate (stage 1 shared). Unified: "
                "one model, stage 2 trained with a condition drawn per conversation, evaluated "
                "on every row with the per-condition runs' evaluation masks; each row picks its "
                "own best-on-test epoch.", ""] + _table(header, lines) + ["", cost]


def _difference(a: Row, a_base: list[Row], b: Row | None, b_base: list[Row], rule: str,
                metric: str, intervals: Intervals | None) -> str:
    """The cell of A − B at `rule`: the difference of the two cells, with its paired interval
    when `intervals` is given."""
    ours, theirs = cell(a, rule, metric), cell(b, rule, metric) if b else None
    if ours is None or theirs is None:
        return "n/a"
    if intervals is None:
        return f"{ours[0] - theirs[0]:+.2f}"
    return intervals.difference(ours[0] - theirs[0], intervals.row(a, rule, metric, a_base),
                                intervals.row(b, rule, metric, b_base), metric)


def _costs(results: list[dict], unified: list[dict]) -> str:
    per_condition = [r["seconds"]["total"] for r in results
                     if variant(r) == "MoMKE" and "seconds" in r]
    single = [r["seconds"]["total"] for r in unified if "seconds" in r]
    return (f"Wall time: per-condition models {sum(per_condition):.0f} s for "
            f"{len(per_condition)} runs; unified {sum(single):.0f} s for {len(single)} run(s) "
            f"(this machine, all seeds summed).")


def _ablation_section(dataset: str, results: list[dict],
                      intervals: Intervals | None = None) -> list[str]:
    """Each variant's average over the fixed conditions that every variant ran (so the
    averages compare like with like)."""
    metrics = get_spec(dataset).metrics
    names = sorted({variant(r) for r in results if not variant(r).startswith("unified")},
                   key=lambda v: ABLATION_ORDER.index(v) if v in ABLATION_ORDER else 99)
    ran = {name: {r["condition"] for r in results if variant(r) == name and r["protocol"] ==
                  "fixed"} for name in names}
    common = set.intersection(*ran.values()) if ran else set()
    if not common:
        return ["", "No fixed condition was run by every variant; nothing to compare."]
    rules = [r for r in RULES if r != "best_val" or get_spec(dataset).has_validation]
    tags = {"best_test": "test-best", "best_val": "val-best", "last": "last"}
    header = ["variant", "seeds"] + [f"{METRIC_NAMES[m]} {tags[r]}" for m in metrics
                                     for r in rules]
    lines, averages = [], {}
    for name in names:
        members = [r for r in results if variant(r) == name and r["protocol"] == "fixed"
                   and r["condition"] in common]
        base = table_rows(members)
        averages[name] = (next(r for r in base if r.key is None), base)
        average = averages[name][0]
        n = max((v[2] for v in (cell(average, "last", m) for m in metrics) if v), default=0)
        lines.append([name, str(n)] + [_fmt(cell(average, rule, m), m)
                                       for m in metrics for rule in rules])
    order = [c for c in ("a", "t", "v", "at", "av", "tv", "atv") if c in common]
    out = ["", f"Averages over the fixed conditions {', '.join(order)} (those every variant "
               "ran). MoMKE: the paper's method. no-stage1: the mixture trained from scratch. "
               "uniform-router: equal expert weights. self-experts: no cross-expert knowledge. "
               "frozen-experts: experts fixed at their stage-1 weights in stage 2.", ""] + \
        _table(header, lines)
    if "MoMKE" not in averages or len(averages) < 2:
        return out
    honest = "best_val" if get_spec(dataset).has_validation else "last"
    reference, reference_base = averages["MoMKE"]
    diff_lines = []
    for name, (average, base) in averages.items():
        if name == "MoMKE":
            continue
        line = [f"MoMKE − {name}"]
        line += [_difference(reference, reference_base, average, base, honest, m, intervals)
                 for m in metrics]
        diff_lines.append(line)
    return out + ["", f"Paired differences at the {RULE_LABELS[honest]} (MoMKE minus each "
                      f"variant; for MAE a negative difference favours MoMKE)"
                  + (", with paired bootstrap intervals." if intervals else "; add --ci for "
                     "their intervals."), ""] + \
        _table(["comparison"] + [METRIC_NAMES[m] for m in metrics], diff_lines)


def _optimism_section(dataset: str, results: list[dict], intervals: Intervals) -> list[str]:
    """The mean gap between the best-on-test epoch and an honest rule's epoch over every MoMKE
    run: what a published best-on-test number should be discounted by."""
    spec = get_spec(dataset)
    honest = "best_val" if spec.has_validation else "last"
    runs = [r for r in results if variant(r) == "MoMKE" and r["test"].get(honest) is not None]
    if not runs:
        return []
    line = [f"{len(runs)}"]
    for m in spec.metrics:
        gaps = [100.0 ** (m in PERCENT_METRICS) * (_num(r["test"]["best_test"][m])
                                                     - _num(r["test"][honest][m])) for r in runs]
        best = [intervals.run(r, "best_test", m) for r in runs]
        other = [intervals.run(r, honest, m) for r in runs]
        if any(a is None for a in best + other):
            line.append(f"{np.mean(gaps):+.2f}")
            continue
        line.append(intervals.difference(float(np.mean(gaps)), np.mean(best, axis=0),
                                         np.mean(other, axis=0), m))
    return ["", "## Selection optimism", "",
            f"Mean over the MoMKE runs below of (best-on-test − {RULE_LABELS[honest]}), with its "
            f"paired bootstrap interval (epochs held fixed): how much the paper protocol flatters "
            f"a number here, and what to discount from a published best-on-test figure.", ""] + \
        _table(["runs"] + [_column(m) for m in spec.metrics], [line])


def header_lines(key: Key, results: list[dict], mae_corr: str = "all") -> list[str]:
    dataset, source, base = key
    lines = []
    if source == "synthetic":
        lines.append("**SYNTHETIC DATA**: generated by `python -m dataloader.synthetic`; these "
                     "numbers measure the code, not MoMKE on real data, and are NOT comparable "
                     "with the published numbers (which used the GCNet features).")
    else:
        lines.append(f"Real data from `{results[0]['data']['root']}`.")
    lines.append("Features: audio `{a}`, text `{t}`, visual `{v}`.".format(
        **results[0]["data"]["features"]))
    lines.append("Test split metrics; units: " + ", ".join(
        _column(m) for m in get_spec(dataset).metrics)
        + "; cells are mean ± sample std over seeds (n in the seeds column).")
    lines.append("Epoch rules: " + "; ".join(RULE_LABELS.values()) + ". Only the best-on-test "
                 "column is comparable with published MoMKE numbers, and it is optimistic by "
                 "construction.")
    config = results[0]["config"]
    pool = config.get("select_from", "stage2")
    lines.append(f"Selection pool: {POOLS[pool]} (--select-from {pool}); expert hand-over: "
                 f"{config.get('expert_handover', 'best')} (--expert-handover; best: each "
                 f"modality's best stage-1 epoch, last: the released code's)"
                 + ("; trained with --official." if config.get("official") else "."))
    lines.append("Arithmetic: " + ("bfloat16 autocast (--amp)" if config.get("amp") else "float32")
                 + (", expert stack compiled (--compile)" if config.get("compile") else "")
                 + f"; batches run in chunks of at most {config.get('chunk_utterances')} "
                 f"utterances.")
    if "mae" in get_spec(dataset).metrics:
        lines.append("MAE and Corr: " + ("on non-zero labels only (the official code's "
                                         "definition; --mae-corr nonzero)." if mae_corr ==
                                         "nonzero" else "on all utterances (MMSA's convention; "
                                         "--mae-corr nonzero shows the official definition)."))
    if get_spec(dataset).num_folds > 1:
        lines.append("IEMOCAP values are means over the five leave-one-session-out folds.")
    differences = hyperparameter_differences(dataset, results[0]["config"])
    lines.append("Hyperparameters different from the paper's: "
                 + (", ".join(differences) if differences else "none") + ".")
    commits = sorted({r.get("source_version", "unknown") for r in results})
    codes = sorted({r.get("code_version", "not recorded") for r in results})
    lines.append(f"Code version(s): git {', '.join(commits)}, computing code {', '.join(codes)}; "
                 f"experiment `{base}`; {len(results)} runs (one per run identity).")
    return lines


def hyperparameter_differences(dataset: str, config: dict) -> list[str]:
    batch, epochs, stage = PAPER_SCHEDULE[dataset]
    paper = {**PAPER_HYPERPARAMETERS, "batch_size": batch, "epochs": epochs, "stage_epochs": stage}
    return [f"{name} {config[name]} (paper {value})" for name, value in paper.items()
            if config.get(name) != value]


def _fold_lines(results: list[dict], spec) -> list[str]:
    if spec.num_folds == 1 or not results:
        return []
    metric = spec.selection_metric
    by_setting: dict[str, list[dict]] = {}
    for result in results:
        by_setting.setdefault(result["setting"], []).append(result)
    lines = []
    for setting in sorted(by_setting, key=_setting_order):
        values = []
        for k in range(1, spec.num_folds + 1):
            scores = [f["test"]["best_test"][metric] for r in by_setting[setting]
                      for f in r["folds"] if f["fold"] == k]
            values.append(f"{100 * np.mean(scores):.2f}" if scores else "n/a")
        lines.append([f"{setting} ({METRIC_NAMES[metric]} %)"] + values)
    return _table(["run"] + [f"fold {k}" for k in range(1, spec.num_folds + 1)], lines)


def _setting_order(name: str) -> tuple[int, float]:
    protocol, value = name.split("-", 1)
    if protocol == "fixed":
        return 0, CONDITIONS.index(value) if value in CONDITIONS else 99
    return 1, float(value)


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


def csv_text(key: Key, results: list[dict], mae_corr: str = "all",
             intervals: Intervals | None = None) -> str:
    """Long format: one line per (variant, row, rule, metric); with `intervals`, the bounds of
    each cell's 95 % bootstrap interval (empty where no predictions were kept)."""
    dataset, source, base = key
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["dataset", "data_source", "experiment", "variant", "protocol", "row", "rule",
                     "metric", "unit", "mean", "std", "n", "published", "published_source",
                     "difference", "ci_low", "ci_high"])
    by_variant: dict[str, list[dict]] = {}
    for result in results:
        by_variant.setdefault(variant(result), []).append(result)
    for name, members in sorted(by_variant.items()):
        runs = unified_as_runs(members) if name.startswith("unified") else members
        rows = table_rows(runs)
        for row in rows:
            for rule in RULES:
                for metric in get_spec(dataset).metrics:
                    value = cell(row, rule, metric)
                    if value is None:
                        continue
                    ref = published_value(dataset, row, metric) if rule == "best_test" else None
                    shown = MAE_CORR_NONZERO.get(metric, metric) if mae_corr == "nonzero" \
                        else metric
                    replicates = intervals.row(row, rule, metric, rows) if intervals else None
                    bounds = intervals.saved.interval([replicates]) if replicates is not None \
                        else None
                    writer.writerow([
                        dataset, source, base, name, row.protocol, row.label, rule, shown,
                        "percent" if metric in PERCENT_METRICS else "raw", f"{value[0]:.4f}",
                        f"{value[1]:.4f}", value[2], f"{ref.value:.2f}" if ref else "",
                        ref.source if ref else "", f"{value[0] - ref.value:.2f}" if ref else "",
                        *((f"{b:.4f}" for b in bounds) if bounds else ("", ""))])
    return out.getvalue()


# ----------------------------------------------------------------------------- arithmetic parity
# Runs that differ only in how they compute (--amp, --compile, --chunk-utterances) form one
# experiment done in several arithmetics: compared with float32 eager, the reference.

ARITHMETIC_FIELDS = ("amp", "compile", "chunk_utterances")


def arithmetic(config: dict) -> str:
    return ("bf16" if config.get("amp") else "fp32") + ("+compile" if config.get("compile") else "")


def arithmetic_comparisons(results: Sequence[dict]) -> dict[str, list[str]]:
    """A Markdown comparison per experiment run in float32 and in another arithmetic: every
    metric of every condition or rate under the three epoch rules, seed-paired differences with
    their interval and verdict (`_arithmetic_table`). Keyed by a file stem
    (`<dataset>-arithmetic`, with the experiment when a dataset has several)."""
    clusters: dict[tuple[str, str], list[dict]] = {}
    for result in results:
        if "identity" in result and variant(result) == "MoMKE":
            key = (result["dataset"], experiment_hash(result["identity"], ignore=ARITHMETIC_FIELDS))
            clusters.setdefault(key, []).append(result)
    out: dict[str, list[str]] = {}
    for (dataset, experiment), members in sorted(clusters.items()):
        by_arithmetic: dict[str, list[dict]] = {}
        for result in members:
            by_arithmetic.setdefault(arithmetic(result["config"]), []).append(result)
        if "fp32" not in by_arithmetic or len(by_arithmetic) < 2:
            continue
        stem = f"{dataset}-arithmetic"
        stem = stem if stem not in out else f"{stem}-{experiment}"
        out[stem] = _arithmetic_table(dataset, experiment, by_arithmetic)
    return out


def _arithmetic_table(dataset: str, experiment: str, runs: dict[str, list[dict]]) -> list[str]:
    """Each other arithmetic against float32, seed by seed (MoMKE/results/equivalence.py)."""
    spec = get_spec(dataset)
    reference = {row.label: row for row in table_rows(runs["fp32"]) if row.key is not None}
    others = [name for name in sorted(runs) if name != "fp32"]
    first = runs["fp32"][0]
    lines = [f"# {dataset}: other arithmetics against float32 (experiment `{experiment}`)", ""]
    if first["data_source"] == "synthetic":
        lines.append("**SYNTHETIC DATA**: this compares arithmetics of the code, not MoMKE's "
                     "accuracy on real data.")
    config = first["config"]
    lines += [f"Schedule: {config['epochs']} epochs ({config['stage_epochs']} of stage 1), "
              f"folds {config.get('folds') or 'all'}; otherwise identical runs. Test-split "
              f"metrics. The unit of evidence is the seed, paired: a seed trains with the same "
              f"data order, masks and initialisation in both arithmetics. A cell gives the "
              f"float32 and the other mean over the common seeds (n), then the mean of the "
              f"per-seed differences (other − float32) with its 95 % t-interval and the verdict: "
              f"*equivalent* when the interval lies within ±{equivalence.MARGINS['percent']:g} "
              f"point (accuracy-like metrics, in %) or ±{equivalence.MARGINS['raw']:g} (MAE, "
              f"Corr), *different* when it excludes zero and reaches beyond that margin, "
              f"*undecided* otherwise (more seeds would decide).", ""]
    metrics = equivalence.HEADLINE[spec.task]
    header = ["setting", "comparison", "rule", *(_column(m) for m in metrics)]
    table, verdicts = [], {}
    for name in others:
        rows = {row.label: row for row in table_rows(runs[name]) if row.key is not None}
        for label in [label for label in reference if label in rows]:
            for rule in RULES:
                pairs = _seed_pairs(reference[label], rows[label], rule)
                if not pairs:
                    continue
                line = [f"{label} (n {len(pairs)})", f"{name} − fp32", RULES_SHORT[rule]]
                for metric in metrics:
                    scale = 100.0 if metric in PERCENT_METRICS else 1.0
                    base = [scale * _num(a[metric]) for a, _ in pairs]
                    other = [scale * _num(b[metric]) for _, b in pairs]
                    comparison = equivalence.paired(base, other, equivalence.margin_of(metric))
                    verdicts[comparison.verdict] = verdicts.get(comparison.verdict, 0) + 1
                    digits = 2 if metric in PERCENT_METRICS else 3
                    line.append(f"{np.mean(base):.{digits}f} → {np.mean(other):.{digits}f}; "
                                f"{equivalence.describe(comparison, metric)}")
                table.append(line)
    lines += _table(header, table)
    counts = ", ".join(f"{verdicts.get(v, 0)} {v}" for v in ("equivalent", "undecided",
                                                             "different"))
    lines += ["", f"Verdicts over {sum(verdicts.values())} cells: {counts}."]
    return lines


RULES_SHORT = {"best_test": "best-on-test", "best_val": "best-on-validation", "last": "last"}


def _seed_pairs(reference: Row, other: Row, rule: str) -> list[tuple[dict, dict]]:
    """(reference, other) test metrics at `rule` for every seed both rows ran, by seed."""
    mine = {r["seed"]: r["test"][rule] for r in reference.results if r["test"][rule] is not None}
    theirs = {r["seed"]: r["test"][rule] for r in other.results if r["test"][rule] is not None}
    return [(mine[seed], theirs[seed]) for seed in sorted(mine) if seed in theirs]


def write_report(paths: Sequence[Path], out: Path, *, plots: bool = True, mae_corr: str = "auto",
                 ci: bool = False, resamples: int = 1000,
                 skipped: list[tuple[str, str]] | None = None) -> list[Path]:
    """Write tables (and plots) for every group of runs below `paths`; return the files.
    `mae_corr`: all, nonzero or auto (see `mae_corr_mode`). Folders it could not use are
    appended to `skipped` as (folder, why)."""
    found = collect(paths)
    groups = group(found.results)
    check_writable(out)
    written = []
    datasets = [key[0] for key in groups]
    for key, members in groups.items():
        prefix = key[0] if datasets.count(key[0]) == 1 else f"{key[0]}-{key[1]}-{key[2]}"
        try:
            mode = mae_corr_mode(mae_corr, members) if "mae" in get_spec(key[0]).metrics \
                else "all"
            if mode == "nonzero":
                members = [with_nonzero_mae_corr(r) for r in members]
            rows = table_rows([r for r in members if variant(r) == "MoMKE"])
            intervals = Intervals(key[0], mode, resamples) if ci else None
            tables = (markdown(key, members, rows, mode, intervals),
                      csv_text(key, members, mode, intervals))
        except Exception as error:  # noqa: BLE001 - one odd group must not cost the others
            found.skipped += [(r["folder"], f"its group {prefix} could not be tabulated "
                                            f"({type(error).__name__}: {error})") for r in members]
            continue
        write_atomic(out / f"{prefix}.md", tables[0])
        write_atomic(out / f"{prefix}.csv", tables[1])
        written += [out / f"{prefix}.md", out / f"{prefix}.csv"]
        if plots:
            from MoMKE.results.plots import plot_group  # matplotlib only when plotting
            written += plot_group(key, members, rows, out, prefix)
    for stem, lines in arithmetic_comparisons(found.results).items():
        write_atomic(out / f"{stem}.md", "\n".join(lines) + "\n")
        written.append(out / f"{stem}.md")
    if skipped is not None:
        skipped.extend(found.skipped)
    return written


def check_writable(out: Path) -> None:
    """Raise OSError unless files can be created in `out` (made when absent), before any table
    is computed: the default output lies inside the runs, which may be read-only."""
    with write_errors_named(out):
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m MoMKE.report", allow_abbrev=False,
                                     description="Tables and plots from saved MoMKE runs.")
    parser.add_argument("paths", nargs="*", type=Path, default=[Path("saved")],
                        help="run folders or folders above them (default: saved)")
    parser.add_argument("--out", type=Path, default=None,
                        help="where to write the tables and plots (default: <first path>/report)")
    parser.add_argument("--no-plots", action="store_true", help="write tables only")
    parser.add_argument("--mae-corr", choices=["auto", "all", "nonzero"], default="auto",
                        help="MAE and Corr on all utterances (MMSA) or on non-zero labels (the "
                             "official code); auto: nonzero for runs trained with --official, "
                             "else all (default)")
    parser.add_argument("--ci", action="store_true",
                        help="add 95 %% bootstrap intervals (over test conversations) to every "
                             "cell, paired intervals to the comparisons, and the selection "
                             "optimism (needs the runs' predictions.npz)")
    parser.add_argument("--resamples", type=int, default=1000,
                        help="bootstrap resamples with --ci (default: 1000)")
    args = parser.parse_args(argv)
    if args.resamples < 1:
        print(f"error: --resamples {args.resamples} must be at least 1, e.g. 1000.",
              file=sys.stderr)
        return 2
    missing = [p for p in args.paths if not p.exists()]
    if missing:
        print(f"error: {missing[0]} does not exist; pass the output folder of your runs.",
              file=sys.stderr)
        return 2
    skipped: list[tuple[str, str]] = []
    out = args.out or args.paths[0] / "report"
    try:
        check_writable(out)
        written = write_report(args.paths, out, plots=not args.no_plots, mae_corr=args.mae_corr,
                               ci=args.ci, resamples=args.resamples, skipped=skipped)
    except NoSpace as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        why = os.strerror(error.errno) if error.errno else str(error)
        fix = "choose a folder you can write to" if args.out else \
            (f"write the report elsewhere with `python -m MoMKE.report "
             f"{' '.join(map(str, args.paths))} --out DIR`")
        print(f"error: {out} cannot be written ({why}); {fix}.", file=sys.stderr)
        return 2
    for folder, why in skipped:
        print(f"skipped {folder}: {why}", file=sys.stderr)
    if not written:
        print(f"error: no complete run (result.json) below {', '.join(map(str, args.paths))}.",
              file=sys.stderr)
        return 2
    for path in written:
        if path.suffix == ".md":
            print(path.read_text())
    print("written: " + ", ".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
