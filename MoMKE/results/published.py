"""Published MoMKE numbers (`published_results.yaml`), each with the key of its source, so a table can
cite what it compares with."""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import yaml


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
