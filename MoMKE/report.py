"""Paper-style tables and plots from saved run folders.

    python -m MoMKE.report saved/            # every complete run below saved/
    python -m MoMKE.report saved/CMUMOSI --out reports/

From: SPEC §6-7. Runs are found by their `result.json` (never by folder names) and grouped by
dataset, data source and hyperparameters; each group gets a Markdown and a CSV table (rows: the
seven fixed conditions and the missing rates, each with an average; columns: the dataset's metrics
under each epoch-selection rule; seeds as mean ± std) and PNG plots. Published MoMKE numbers sit
beside the paper-protocol column with their difference; synthetic data is announced in every
header and title.
"""
from __future__ import annotations

import argparse
import csv
import io
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from dataloader.datasets import get_spec
from MoMKE import published
from MoMKE.config import PAPER_SCHEDULE
from MoMKE.masks import CONDITIONS, RATES
from MoMKE.runlog import read_result
from MoMKE.selection import RULE_LABELS, RULES

PERCENT_METRICS = {"acc2", "f1", "acc7", "wa", "ua"}  # shown in percent; mae and corr raw
METRIC_NAMES = {"acc2": "Acc2", "f1": "F1", "mae": "MAE", "corr": "Corr", "acc7": "Acc7",
                "wa": "WA", "ua": "UA"}
PAPER_HYPERPARAMETERS = {"hidden": 256, "depth": 4, "num_heads": 2, "mlp_ratio": 1.0,
                         "drop_rate": 0.5, "attn_drop_rate": 0.0, "lr": 1e-4, "l2": 1e-5,
                         "expert_handover": "best"}


@dataclass
class Row:
    """One table row: a condition, a rate or an average, with its runs (one per seed)."""

    label: str
    protocol: str
    key: str | float | None  # the condition, the rate, or None for an average
    results: list[dict]  # for averages: one synthetic result per seed (means over the rows)
    averaged: tuple = ()  # the conditions or rates an average row covers


def collect(paths: Iterable[Path]) -> list[dict]:
    """Complete results below `paths`, each with the folder it came from."""
    results = []
    for root in paths:
        candidates = [root] if (root / "result.json").is_file() else root.rglob("result.json")
        for path in candidates:
            folder = path if path.is_dir() else path.parent
            result = read_result(folder)
            if result is not None:
                results.append({**result, "folder": str(folder)})
    return results


def group(results: Sequence[dict]) -> dict[tuple[str, str, str], list[dict]]:
    groups: dict[tuple[str, str, str], list[dict]] = {}
    for result in results:
        key = (result["dataset"], result["data_source"], result.get("experiment", "?"))
        groups.setdefault(key, []).append(result)
    return dict(sorted(groups.items()))


# ----------------------------------------------------------------------------- aggregation

def table_rows(results: Sequence[dict]) -> list[Row]:
    rows = []
    for protocol, keys, field in (("fixed", CONDITIONS, "condition"),
                                  ("random", RATES, "missing_rate")):
        chosen = [Row(str(k), protocol, k, [r for r in results if r["protocol"] == protocol
                                            and _same(r[field], k)]) for k in keys]
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


def published_value(dataset: str, row: Row, metric: str) -> published.Published | None:
    if row.protocol == "fixed":
        if row.key is None:
            if set(row.averaged) == set(CONDITIONS) - {"atv"}:  # the published averages skip atv
                return (published.fixed(dataset, "average_of_six", metric)
                        or published.fixed_average(dataset, metric))
            return None
        return published.fixed(dataset, row.key, metric)
    return published.random(dataset, row.key, metric) if row.key is not None else None


# ----------------------------------------------------------------------------- rendering

def _fmt(value: tuple[float, float, int] | None, metric: str) -> str:
    if value is None:
        return "n/a"
    mean, std, n = value
    digits = 2 if metric in PERCENT_METRICS else 3
    if np.isnan(mean):
        return "nan"
    return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if n > 1 else "")


def markdown(key: tuple[str, str, str], results: list[dict], rows: list[Row]) -> str:
    dataset, source, experiment = key
    spec = get_spec(dataset)
    metrics = spec.metrics
    out = io.StringIO()
    write = lambda line="": out.write(line + "\n")  # noqa: E731
    write(f"# {dataset}: MoMKE reproduction ({'SYNTHETIC data' if source == 'synthetic' else 'real data'})")
    write()
    for line in header_lines(key, results):
        write(f"- {line}")
    for protocol, title in (("fixed", "Fixed missing protocol (one model per test condition)"),
                            ("random", "Random missing rate (one model per rate)")):
        chosen = [r for r in rows if r.protocol == protocol]
        if not chosen:
            continue
        write()
        write(f"## {title}")
        for rule in RULES:
            if all(cell(r, rule, metrics[0]) is None for r in chosen):
                write(f"\n### {RULE_LABELS[rule]}: n/a ({dataset} has no validation split)")
                continue
            write(f"\n### Test metrics at the {RULE_LABELS[rule]}")
            write()
            columns = ["condition" if protocol == "fixed" else "missing rate", "seeds"]
            columns += [_column(m) for m in metrics]
            shown = [m for m in metrics if rule == "best_test" and any(
                published_value(dataset, r, m) for r in chosen)]
            columns += [f"published {METRIC_NAMES[m]}" for m in shown]
            columns += [f"Δ {METRIC_NAMES[m]}" for m in shown]
            write("| " + " | ".join(columns) + " |")
            write("|" + "---|" * len(columns))
            for row in chosen:
                values = [cell(row, rule, m) for m in metrics]
                n = max((v[2] for v in values if v), default=0)
                line = [row.label, str(n)] + [_fmt(v, m) for v, m in zip(values, metrics)]
                for m in shown:
                    ref = published_value(dataset, row, m)
                    line.append(f"{ref.value:.2f} [{ref.source}]" if ref else "")
                for m in shown:
                    ref, ours = published_value(dataset, row, m), cell(row, rule, m)
                    line.append(f"{ours[0] - ref.value:+.2f}" if ref and ours else "")
                write("| " + " | ".join(line) + " |")
    folds = _fold_lines(results, spec)
    if folds:
        write("\n## Per fold (paper protocol column, mean over seeds)\n")
        for line in folds:
            write(line)
    write("\n## Sources of the published numbers\n")
    for name, text in published.sources().items():
        write(f"- [{name}] {text}")
    return out.getvalue()


def _column(metric: str) -> str:
    return f"{METRIC_NAMES[metric]} ({'%' if metric in PERCENT_METRICS else 'raw'})"


def header_lines(key: tuple[str, str, str], results: list[dict]) -> list[str]:
    dataset, source, experiment = key
    config = results[0]["config"]
    lines = []
    if source == "synthetic":
        lines.append("**SYNTHETIC DATA**: generated by `python -m dataloader.synthetic`; these numbers "
                     "measure the code, not MoMKE on real data, and are NOT comparable with the "
                     "published numbers (which used the GCNet features).")
    else:
        lines.append(f"Real data from `{results[0]['data']['root']}`.")
    features = results[0]["data"]["features"]
    lines.append("Features: audio `{a}`, text `{t}`, visual `{v}`.".format(**features))
    lines.append("Test split metrics; units: " + ", ".join(_column(m) for m in
                                                            get_spec(dataset).metrics)
                 + "; cells are mean ± sample std over seeds (n in the seeds column).")
    lines.append("Epoch rules: " + "; ".join(f"{label}" for label in RULE_LABELS.values())
                 + ". Only the best-on-test column is comparable with published MoMKE numbers, "
                   "and it is optimistic by construction.")
    if get_spec(dataset).num_folds > 1:
        lines.append("IEMOCAP values are means over the five leave-one-session-out folds.")
    differences = hyperparameter_differences(dataset, config)
    lines.append("Hyperparameters different from the paper's: "
                 + (", ".join(differences) if differences else "none") + ".")
    commits = sorted({r.get("source_version", "unknown") for r in results})
    lines.append(f"Code version(s): {', '.join(commits)}; experiment `{experiment}`; "
                 f"{len(results)} runs.")
    return lines


def hyperparameter_differences(dataset: str, config: dict) -> list[str]:
    batch, epochs, stage = PAPER_SCHEDULE[dataset]
    paper = {**PAPER_HYPERPARAMETERS, "batch_size": batch, "epochs": epochs, "stage_epochs": stage}
    return [f"{name} {config[name]} (paper {value})" for name, value in paper.items()
            if config.get(name) != value]


def _fold_lines(results: list[dict], spec) -> list[str]:
    if spec.num_folds == 1:
        return []
    metric = spec.selection_metric
    lines = ["| run | " + " | ".join(f"fold {k}" for k in range(1, spec.num_folds + 1)) + " |",
             "|---|" + "---|" * spec.num_folds]
    by_setting: dict[str, list[dict]] = {}
    for result in results:
        by_setting.setdefault(result["setting"], []).append(result)
    for setting in sorted(by_setting, key=_setting_order):
        values = []
        for k in range(1, spec.num_folds + 1):
            scores = [f["test"]["best_test"][metric] for r in by_setting[setting]
                      for f in r["folds"] if f["fold"] == k]
            values.append(f"{100 * np.mean(scores):.2f}" if scores else "n/a")
        lines.append(f"| {setting} ({METRIC_NAMES[metric]} %) | " + " | ".join(values) + " |")
    return lines


def _setting_order(name: str) -> tuple[int, float]:
    protocol, value = name.split("-", 1)
    if protocol == "fixed":
        return 0, CONDITIONS.index(value) if value in CONDITIONS else 99
    return 1, float(value)


def csv_text(key: tuple[str, str, str], rows: list[Row]) -> str:
    dataset, source, experiment = key
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["dataset", "data_source", "experiment", "protocol", "row", "rule", "metric",
                     "unit", "mean", "std", "n", "published", "published_source", "difference"])
    for row in rows:
        for rule in RULES:
            for metric in get_spec(dataset).metrics:
                value = cell(row, rule, metric)
                if value is None:
                    continue
                ref = published_value(dataset, row, metric) if rule == "best_test" else None
                writer.writerow([dataset, source, experiment, row.protocol, row.label, rule, metric,
                                 "percent" if metric in PERCENT_METRICS else "raw",
                                 f"{value[0]:.4f}", f"{value[1]:.4f}", value[2],
                                 f"{ref.value:.2f}" if ref else "", ref.source if ref else "",
                                 f"{value[0] - ref.value:.2f}" if ref else ""])
    return out.getvalue()


def write_report(paths: Sequence[Path], out: Path, *, plots: bool = True) -> list[Path]:
    """Write tables (and plots) for every group of runs below `paths`; return the files."""
    results = collect(paths)
    groups = group(results)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    datasets = [key[0] for key in groups]
    for key, members in groups.items():
        prefix = key[0] if datasets.count(key[0]) == 1 else f"{key[0]}-{key[1]}-{key[2]}"
        rows = table_rows(members)
        (out / f"{prefix}.md").write_text(markdown(key, members, rows))
        (out / f"{prefix}.csv").write_text(csv_text(key, rows))
        written += [out / f"{prefix}.md", out / f"{prefix}.csv"]
        if plots:
            from MoMKE.plots import plot_group  # matplotlib only when plotting
            written += plot_group(key, rows, out, prefix)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m MoMKE.report", allow_abbrev=False,
                                     description="Tables and plots from saved MoMKE runs.")
    parser.add_argument("paths", nargs="*", type=Path, default=[Path("saved")],
                        help="run folders or folders above them (default: saved)")
    parser.add_argument("--out", type=Path, default=None,
                        help="where to write the tables and plots (default: <first path>/report)")
    parser.add_argument("--no-plots", action="store_true", help="write tables only")
    args = parser.parse_args(argv)
    missing = [p for p in args.paths if not p.exists()]
    if missing:
        print(f"error: {missing[0]} does not exist; pass the output folder of your runs.",
              file=sys.stderr)
        return 2
    out = args.out or args.paths[0] / "report"
    written = write_report(args.paths, out, plots=not args.no_plots)
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
