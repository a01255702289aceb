"""The sections beyond the rule tables: the unified model, the ablations, the costs and the
selection optimism."""
from __future__ import annotations

import numpy as np

from dataloader.datasets import get_spec
from MoMKE.results.collect import ABLATION_ORDER
from MoMKE.results.intervals import Intervals
from MoMKE.results.render import column_title, format_cell, markdown_table
from MoMKE.results.rows import (METRIC_NAMES, PERCENT_METRICS, Row, as_number, cell, table_rows,
                                unified_as_runs, variant)
from MoMKE.selection import RULE_LABELS, RULES


def unified_section(dataset: str, results: list[dict], unified: list[dict],
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
                line += [format_cell(cell(source, rule, m), m) if source else "n/a"
                         for rule in ("best_test", "last")]
            line.append(_difference(row, unified_rows, own, own_rows, "last", m, intervals))
        lines.append(line)
    cost = _costs(results, unified)
    return ["", "Per-condition: one MoMKE model per condition or rate (stage 1 shared). Unified: "
                "one model, stage 2 trained with a condition drawn per conversation, evaluated "
                "on every row with the per-condition runs' evaluation masks; each row picks its "
                "own best-on-test epoch.", ""] + markdown_table(header, lines) + ["", cost]


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


def ablation_section(dataset: str, results: list[dict],
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
        lines.append([name, str(n)] + [format_cell(cell(average, rule, m), m)
                                       for m in metrics for rule in rules])
    order = [c for c in ("a", "t", "v", "at", "av", "tv", "atv") if c in common]
    out = ["", f"Averages over the fixed conditions {', '.join(order)} (those every variant "
               "ran). MoMKE: the paper's method. no-stage1: the mixture trained from scratch. "
               "uniform-router: equal expert weights. self-experts: no cross-expert knowledge. "
               "frozen-experts: experts fixed at their stage-1 weights in stage 2.", ""] + \
        markdown_table(header, lines)
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
        markdown_table(["comparison"] + [METRIC_NAMES[m] for m in metrics], diff_lines)


def optimism_section(dataset: str, results: list[dict], intervals: Intervals) -> list[str]:
    """The mean gap between the best-on-test epoch and an honest rule's epoch over every MoMKE
    run: what a published best-on-test number should be discounted by."""
    spec = get_spec(dataset)
    honest = "best_val" if spec.has_validation else "last"
    runs = [r for r in results if variant(r) == "MoMKE" and r["test"].get(honest) is not None]
    if not runs:
        return []
    line = [f"{len(runs)}"]
    for m in spec.metrics:
        gaps = [100.0 ** (m in PERCENT_METRICS) * (as_number(r["test"]["best_test"][m])
                                                     - as_number(r["test"][honest][m])) for r in runs]
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
        markdown_table(["runs"] + [column_title(m) for m in spec.metrics], [line])
