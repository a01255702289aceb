"""A group's Markdown: the header (which data, split, selection rule and definitions), one table
per epoch-selection rule, and the sections beside them."""
from __future__ import annotations

import dataclasses

import numpy as np

from dataloader.datasets import get_spec
from MoMKE.protocols import CONDITIONS
from MoMKE.results.collect import Key
from MoMKE.results.intervals import Intervals
from MoMKE.results.published import published_sources
from MoMKE.results.render import column_title, format_cell, markdown_table
from MoMKE.results.rows import METRIC_NAMES, Row, cell, published_value, router_table, variant
from MoMKE.results.sections import ablation_section, optimism_section, unified_section
from MoMKE.selection import POOLS, RULE_LABELS, RULES


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
        out += optimism_section(dataset, results, intervals)
    for protocol, title in (("fixed", "Fixed missing protocol (one model per test condition)"),
                            ("random", "Random missing rate (one model per rate)")):
        chosen = [r for r in rows if r.protocol == protocol]
        if chosen:
            out += ["", f"## {title}"] + _rule_tables(dataset, chosen, metrics, protocol,
                                                      intervals)
    unified = [r for r in results if variant(r).startswith("unified")]
    if unified:
        out += ["", "## One model for every missing pattern (unified) beside the per-condition "
                    "models"] + unified_section(dataset, results, unified, intervals)
    if len({variant(r) for r in results if not variant(r).startswith("unified")}) > 1:
        out += ["", "## Ablations (averages over the fixed conditions every variant ran)"]
        out += ablation_section(dataset, results, intervals)
    routers = router_table([r for r in results if variant(r) == "MoMKE"])
    if routers:
        out += ["", "## Router weights (MoMKE, fixed protocol, test split, last epoch)", "",
                "Mean weight that each modality's router gives each expert, over its observed "
                "utterances, folds and seeds (rows sum to 1)."]
        out += [""] + markdown_table(["condition", "modality", "expert a", "expert t", "expert v"],
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
        header += [column_title(m) for m in metrics]
        header += [f"published {METRIC_NAMES[m]}" for m in shown]
        header += [f"Δ {METRIC_NAMES[m]}" for m in shown]
        lines = []
        for row in rows:
            values = [cell(row, rule, m) for m in metrics]
            line = [row.label, str(max((v[2] for v in values if v), default=0))]
            line += [format_cell(v, m) + (intervals.text(intervals.row(row, rule, m, rows), m)
                                   if intervals and v else "")
                     for v, m in zip(values, metrics)]
            references = [published_value(dataset, row, m) for m in shown]
            line += [f"{p.value:.2f} [{p.source}]" if p else "" for p in references]
            line += [f"{cell(row, rule, m)[0] - p.value:+.2f}" if p and cell(row, rule, m) else ""
                     for m, p in zip(shown, references)]
            lines.append(line)
        out += ["", f"### Test metrics at the {RULE_LABELS[rule]}", ""] + markdown_table(header, lines)
    return out


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
        column_title(m) for m in get_spec(dataset).metrics)
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
    if get_spec(dataset).session_folds:
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
    paper = dataclasses.asdict(get_spec(dataset).paper)
    return [f"{name} {config[name]} (paper {value})" for name, value in paper.items()
            if config.get(name) != value]


def _fold_lines(results: list[dict], spec) -> list[str]:
    if not spec.session_folds or not results:
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
    return markdown_table(["run"] + [f"fold {k}" for k in range(1, spec.num_folds + 1)], lines)


def _setting_order(name: str) -> tuple[int, float]:
    protocol, value = name.split("-", 1)
    if protocol == "fixed":
        return 0, CONDITIONS.index(value) if value in CONDITIONS else 99
    return 1, float(value)
