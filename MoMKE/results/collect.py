"""Collecting saved runs: every complete, valid result under the given folders, grouped by
experiment; what is wrong with the rest, named."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence


from dataloader.datasets import DATASETS, get_spec
from dataloader.files import open_regular
from MoMKE.protocols import CONDITIONS
from MoMKE.selection import RULES


# ----------------------------------------------------------------------------- collecting runs

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
                with open_regular(path) as handle:  # a pipe there would block the report
                    result = json.loads(handle.read())
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
