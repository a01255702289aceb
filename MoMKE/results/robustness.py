"""The robustness matrix: how a model trained on one missing pattern holds up under every other.

Built from the runs' `evaluations.json` (`python -m MoMKE.evaluate`, or `python -m MoMKE.sweep
--evaluate-all`). Rows: what a model was trained on (each fixed condition, each missing rate, the
unified model); columns: what it was evaluated on, the seven conditions in one matrix and the
eight rates in another. A cell is the dataset's headline metric (Acc2 or WA, in percent) of the
test split as the mean over seeds, with its 95 % bootstrap interval over test conversations
(replicates averaged over seeds, every run on the same resamples); the diagonal is each run's own
setting. The weights are the checkpoints' (best-on-validation, or the last epoch without a
validation split), never best-on-test ones. One set of matrices per copy of the data evaluated
on (by content) and device.
"""
from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dataloader.datasets import get_spec
from MoMKE.protocols import CONDITIONS, RATES
from MoMKE.results.render import markdown_table
from MoMKE.results.rows import METRIC_NAMES, variant
from MoMKE.results.uncertainty import fold_mean_replicates
from MoMKE.runlog import read_evaluations

HEADLINE = {"regression": "acc2", "classification": "wa"}
COLUMNS = {"conditions": [f"fixed-{c}" for c in CONDITIONS],
           "rates": [f"random-{r!r}" for r in RATES]}


@dataclass
class Matrix:
    """One robustness matrix: cells (trained, evaluated) -> (mean, low, high, seeds)."""

    kind: str  # "conditions" or "rates"
    data: tuple[str, str, str]  # (source, fingerprint, device)
    rule: str  # the checkpoints' rule: best_val or last
    metric: str
    rows: list[str]
    columns: list[str]
    cells: dict[tuple[str, str], tuple[float, float, float, int]] = field(default_factory=dict)


def robustness_matrices(dataset: str, results: list[dict], *,
                        resamples: int = 1000) -> list[Matrix]:
    """The matrices of a group's MoMKE and unified runs, from their test-split evaluations."""
    spec = get_spec(dataset)
    metric = HEADLINE[spec.task]
    found: dict[tuple, dict[tuple[str, str], list[dict]]] = {}
    rules: dict[tuple, str] = {}
    for result in results:
        if not result.get("folder") or not (variant(result) == "MoMKE"
                                            or variant(result).startswith("unified")):
            continue
        for entry in read_evaluations(Path(result["folder"])).values():
            if entry.get("split") != "test" or entry.get("identity_hash") != result.get(
                    "identity_hash"):
                continue
            data = (entry["data"]["source"], entry["data"]["fingerprint"],
                    entry["device"].split(":")[0])
            found.setdefault(data, {}).setdefault((result["setting"], entry["setting"]),
                                                  []).append(entry)
            rules[data] = entry["rule"]
    matrices = []
    for data, cells in found.items():
        trained = sorted({row for row, _ in cells}, key=_order)
        for kind, columns in COLUMNS.items():
            matrix = Matrix(kind, data, rules[data], metric, trained, columns)
            for (row, column), entries in cells.items():
                if column in columns:
                    matrix.cells[row, column] = _cell(entries, metric, spec.is_regression,
                                                      resamples)
            if matrix.cells:
                matrices.append(matrix)
    return matrices


def _cell(entries: list[dict], metric: str, regression: bool,
          resamples: int) -> tuple[float, float, float, int]:
    """Mean over seeds (percent) and the percentile interval of the seed-mean replicates."""
    mean = 100.0 * float(np.mean([e["metrics"][metric] for e in entries]))
    replicates = [fold_mean_replicates(
        [np.asarray(f["predictions"]) for f in e["folds"]],
        [np.asarray(f["labels"]) for f in e["folds"]],
        [np.asarray(f["conversation"]) for f in e["folds"]],
        regression=regression, resamples=resamples)[metric] for e in entries]
    pooled = 100.0 * np.mean(replicates, axis=0)
    pooled = pooled[np.isfinite(pooled)]
    low, high = (np.percentile(pooled, [2.5, 97.5]) if pooled.size else (np.nan, np.nan))
    return mean, float(low), float(high), len(entries)


def _order(setting: str) -> tuple[int, float, str]:
    protocol, value = setting.split("-", 1)
    if protocol == "fixed":
        return 0, CONDITIONS.index(value) if value in CONDITIONS else 99, ""
    if protocol == "random":
        return 1, float(value), ""
    return 2, 0.0, value


def _label(setting: str) -> str:
    protocol, value = setting.split("-", 1)
    return {"fixed": value, "random": f"rate {value}"}.get(protocol, f"unified ({value})")


def robustness_section(dataset: str, matrices: list[Matrix]) -> list[str]:
    """The report's Markdown section: one table per matrix."""
    if not matrices:
        return []
    metric = METRIC_NAMES[matrices[0].metric]
    out = ["", "## Robustness: trained on one missing pattern, tested on another", "",
           f"{metric} (%) on the test split: rows are what a model was trained on, columns what "
           f"it was evaluated on (`python -m MoMKE.evaluate`, the training protocol's own "
           f"evaluation masks). A cell is the mean over seeds with its 95 % bootstrap interval "
           f"over test conversations; **bold** is the run's own setting (the diagonal). Weights: "
           f"each run's checkpoint, the best-on-validation epoch (the last epoch where the "
           f"dataset has no validation split); best-on-test weights are not used, as their "
           f"epoch was chosen on this test set."]
    for matrix in matrices:
        source, fingerprint, device = matrix.data
        seeds = sorted({n for *_, n in matrix.cells.values()})
        out += ["", f"### Evaluated on the {matrix.kind} ({source.upper()} data {fingerprint[:12]}"
                    f", device {device}, weights {matrix.rule}, seeds per cell "
                    f"{'/'.join(map(str, seeds))})", ""]
        lines = []
        for row in matrix.rows:
            line = [_label(row)]
            for column in matrix.columns:
                value = matrix.cells.get((row, column))
                if value is None:
                    line.append("")
                    continue
                mean, low, high, _ = value
                text = f"{mean:.2f}"
                line.append((f"**{text}**" if row == column else text)
                            + f" [{low:.1f}, {high:.1f}]")
            lines.append(line)
        out += markdown_table(["trained on \\ evaluated on"]
                              + [_label(c) for c in matrix.columns], lines)
    return out


def robustness_csv(dataset: str, matrices: list[Matrix]) -> str:
    """Every cell of every matrix as one CSV row."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["dataset", "data_source", "data_fingerprint", "device", "split", "weights",
                     "trained_on", "evaluated_on", "metric", "unit", "mean", "low", "high",
                     "seeds", "own_setting"])
    for matrix in matrices:
        for (row, column), (mean, low, high, n) in sorted(matrix.cells.items()):
            writer.writerow([dataset, *matrix.data, "test", matrix.rule, row, column,
                             matrix.metric, "percent", f"{mean:.4f}", f"{low:.4f}",
                             f"{high:.4f}", n, row == column])
    return buffer.getvalue()


def plot_matrix(dataset: str, matrix: Matrix, path: Path) -> Path:
    """A heatmap of one matrix, the diagonal outlined."""
    from MoMKE.results.plots import heatmap_png  # matplotlib only when plotting
    values = np.array([[matrix.cells.get((r, c), (np.nan,))[0] for c in matrix.columns]
                       for r in matrix.rows])
    source = matrix.data[0]
    title = (f"{METRIC_NAMES[matrix.metric]} (%), test split, weights {matrix.rule}: "
             f"trained on (rows) vs evaluated on the {matrix.kind}")
    own = [(i, matrix.columns.index(r)) for i, r in enumerate(matrix.rows)
           if r in matrix.columns]
    return heatmap_png(dataset, source, title, values, [_label(r) for r in matrix.rows],
                       [_label(c) for c in matrix.columns], own, path)
