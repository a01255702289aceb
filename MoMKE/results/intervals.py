"""Bootstrap intervals of a group's cells, from the saved test predictions."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from dataloader.datasets import get_spec
from MoMKE.results.rows import MAE_CORR_NONZERO, PERCENT_METRICS, Row
from MoMKE.results.uncertainty import SavedRuns
from MoMKE.selection import VIEW


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
