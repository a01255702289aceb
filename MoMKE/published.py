"""Published MoMKE numbers (MoMKE/published_results.yaml), looked up per table cell.

Every value comes back with the key of its source, so a table can cite it. Values are percent, as
published; our results are fractions and the report converts them, saying so.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import yaml

PUBLISHED_FILE = Path(__file__).with_name("published_results.yaml")


@dataclass(frozen=True)
class Published:
    value: float  # percent
    source: str  # key into `sources()`


@lru_cache(maxsize=1)
def _table() -> dict:
    return yaml.safe_load(PUBLISHED_FILE.read_text())


def sources() -> dict[str, str]:
    return {key: " ".join(text.split()) for key, text in _table()["sources"].items()}


def fixed(dataset: str, condition: str, metric: str) -> Published | None:
    """A published fixed-protocol value; `condition` 'average_of_six' for the published mean."""
    entry = _table()["fixed"].get(dataset)
    if entry is None or metric not in entry["metrics"]:
        return None
    values = entry["average_of_six"] if condition == "average_of_six" \
        else entry["conditions"].get(condition)
    return None if values is None else Published(values[entry["metrics"].index(metric)],
                                                 entry["source"])


def fixed_average(dataset: str, metric: str) -> Published | None:
    """The mean over missing conditions that TMDC reports (no per-condition values)."""
    table = _table()["fixed_average"]
    entry = table.get(dataset)
    if entry is None or metric not in entry["metrics"]:
        return None
    return Published(entry["values"][entry["metrics"].index(metric)], table["source"])


def random(dataset: str, rate: float, metric: str) -> Published | None:
    for section in ("random", "random_extra"):
        entry = _table()[section].get(dataset)
        if entry is None or metric not in entry["metrics"]:
            continue
        # Only the rate itself: a run at 0.14 has no published counterpart at 0.1.
        values = {round(float(r), 6): v for r, v in entry["rates"].items()}.get(round(rate, 6))
        if values is not None:
            return Published(values[entry["metrics"].index(metric)], entry["source"])
    return None
