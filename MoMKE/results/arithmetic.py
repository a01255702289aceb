"""Arithmetics compared: each experiment run in float32 and in another arithmetic, seed by seed
(`equivalence.py`), as `<dataset>-arithmetic.md`."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from dataloader.datasets import get_spec
from MoMKE.results import equivalence
from MoMKE.results.render import column_title, markdown_table
from MoMKE.results.rows import PERCENT_METRICS, Row, as_number, table_rows, variant
from MoMKE.runlog import experiment_hash
from MoMKE.selection import RULES


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
    header = ["setting", "comparison", "rule", *(column_title(m) for m in metrics)]
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
                    base = [scale * as_number(a[metric]) for a, _ in pairs]
                    other = [scale * as_number(b[metric]) for _, b in pairs]
                    comparison = equivalence.paired(base, other, equivalence.margin_of(metric))
                    verdicts[comparison.verdict] = verdicts.get(comparison.verdict, 0) + 1
                    digits = 2 if metric in PERCENT_METRICS else 3
                    line.append(f"{np.mean(base):.{digits}f} → {np.mean(other):.{digits}f}; "
                                f"{equivalence.describe(comparison, metric)}")
                table.append(line)
    lines += markdown_table(header, table)
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
