"""Rendering: cells as text, Markdown tables, and a group's CSV."""
from __future__ import annotations

import csv
import io

import numpy as np

from dataloader.datasets import get_spec
from MoMKE.results.collect import Key
from MoMKE.results.intervals import Intervals
from MoMKE.results.rows import (MAE_CORR_NONZERO, METRIC_NAMES, PERCENT_METRICS, cell,
                                published_value, table_rows, unified_as_runs, variant)
from MoMKE.selection import RULES


# ----------------------------------------------------------------------------- Markdown

def format_cell(value: tuple[float, float, int] | None, metric: str) -> str:
    if value is None:
        return "n/a"
    mean, std, n = value
    if np.isnan(mean):
        return "nan"
    digits = 2 if metric in PERCENT_METRICS else 3
    return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if n > 1 else "")


def column_title(metric: str) -> str:
    return f"{METRIC_NAMES[metric]} ({'%' if metric in PERCENT_METRICS else 'raw'})"


def markdown_table(header: list[str], lines: list[list[str]]) -> list[str]:
    return (["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            + ["| " + " | ".join(line) + " |" for line in lines])


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
