"""Bootstrap confidence intervals and paired bootstrap comparisons of the test metrics.

How the report uses them: docs/selection.md. Metrics are those of MoMKE/metrics.py,
plus mae_nonzero and corr_nonzero (MAE and Pearson on non-zero labels only, the official code's
definition); accuracy-like metrics stay fractions.

The resampling unit is the test conversation, not the utterance. Utterances of one conversation share
speakers, topic and context, and a model tends to be right or wrong on them together; resampling
utterances would treat them as independent and understate the spread, by up to sqrt(conversation
size) when outcomes are shared within conversations. A resample draws a fold's C test conversations
with replacement, and an utterance's weight is how many times its conversation was drawn. Every metric
is then a weighted statistic, so all R resamples are computed at once as (R, N) weight matrices times
(N, k) per-utterance columns; as weights are constant within a conversation, the columns are first
summed per conversation and the product is (R, C) by (C, k). With integer weights a metric equals the
metric on the data set in which each utterance is repeated weight times.

Folds: CMU-MOSI/MOSEI have one, IEMOCAP five with disjoint test sessions. Folds are resampled
independently; a replicate of the reported number is the mean over folds of that resample's per-fold
metrics, the fold mean the results report. Intervals are percentile intervals. The same seed and the
same conversations give the same resamples, so paired comparisons apply one set of weights to both
prediction sets and the shared variation cancels.

Shapes: R resamples, N utterances of a fold, C conversations, K classes.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from MoMKE.metrics import classification_metrics, regression_metrics

REGRESSION_METRICS = ("acc2", "f1", "mae", "corr", "acc7", "mae_nonzero", "corr_nonzero")
CLASSIFICATION_METRICS = ("wa", "ua", "f1")

Folds = np.ndarray | Sequence[np.ndarray]  # one array (a single fold) or one array per fold


@dataclass(frozen=True)
class Interval:
    """A metric on the original data and its bootstrap percentile interval at `level`.
    `undefined` counts resamples where the metric is undefined (e.g. Pearson of constant predictions);
    they are left out of the percentiles."""
    point: float
    low: float
    high: float
    level: float
    undefined: int = 0


@dataclass(frozen=True)
class Difference:
    """A − B for one metric (lower is better for mae, so there a negative difference favours A).
    `covers_zero` is None when the interval is undefined."""
    point: float
    low: float
    high: float
    level: float
    covers_zero: bool | None
    undefined: int = 0


def conversation_weights(conversation: np.ndarray, *, resamples: int = 1000,
                         rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Draw a fold's conversations with replacement, `resamples` times.

    Returns counts (R, C), how many times each conversation was drawn, and groups (N,), each
    utterance's conversation as a column of counts: utterance weights are counts[:, groups] (R, N).
    The weighted metrics take the pair as it is and sum utterances per conversation before the
    product, which is the same statistic at C instead of N columns. Ids need not be contiguous.
    """
    _, groups = np.unique(np.asarray(conversation).reshape(-1), return_inverse=True)
    count = int(groups.max()) + 1 if groups.size else 0
    if count == 0:
        raise ValueError("a fold has no test utterances to resample")
    draws = rng.integers(0, count, size=(resamples, count))  # (R, C) conversation drawn at each slot
    offset = np.arange(resamples)[:, None] * count
    drawn = np.bincount((draws + offset).ravel(), minlength=resamples * count)
    return drawn.reshape(resamples, count).astype(np.float64), groups


def point_metrics(predictions: np.ndarray, labels: np.ndarray, *,
                  regression: bool) -> dict[str, float]:
    """The metrics of MoMKE/metrics.py on the original data (regression: mae_nonzero and
    corr_nonzero included). `predictions` are scores (regression) or class indices."""
    if regression:
        return regression_metrics(predictions, labels)
    return classification_metrics(predictions, labels)


def weighted_regression_metrics(predictions: np.ndarray, labels: np.ndarray, weights: np.ndarray,
                                groups: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """REGRESSION_METRICS under each row of `weights`: each value is (R,), NaN where undefined.

    weights: (R, N) utterance weights, or (R, G) group weights with `groups` (N,) naming each
    utterance's column, as conversation_weights returns them.
    """
    predictions = np.asarray(predictions, dtype=np.float64).reshape(-1)
    labels = np.asarray(labels, dtype=np.float64).reshape(-1)
    weights, groups = _check_weights(weights, groups, labels.size)
    nz = labels != 0
    sign_true, sign_pred = labels > 0, predictions > 0
    acc7_hit = np.round(np.clip(predictions, -3, 3)) == np.round(np.clip(labels, -3, 3))
    error = np.abs(predictions - labels)
    columns = np.stack([np.ones_like(error), error, acc7_hit,
                        nz, error * nz, (sign_true == sign_pred) & nz], axis=1)  # (N, 6)
    total, error_sum, acc7_sum, total_nz, error_sum_nz, acc2_sum = (
        weights @ _group_sum(columns, groups, weights.shape[1])).T
    return {
        "acc2": _ratio(acc2_sum, total_nz),
        "f1": _weighted_f1(*_class_counts(weights, groups[nz], sign_true[nz], sign_pred[nz])),
        "mae": _ratio(error_sum, total),
        "corr": _weighted_pearson(weights, groups, predictions, labels),
        "acc7": _ratio(acc7_sum, total),
        "mae_nonzero": _ratio(error_sum_nz, total_nz),
        "corr_nonzero": _weighted_pearson(weights, groups[nz], predictions[nz], labels[nz]),
    }


def weighted_classification_metrics(predicted: np.ndarray, labels: np.ndarray, weights: np.ndarray,
                                    groups: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """CLASSIFICATION_METRICS under each row of `weights` (as in weighted_regression_metrics), from
    class indices `predicted`. UA averages recall over the classes present in the resample
    (total weight > 0)."""
    predicted, labels = np.asarray(predicted).reshape(-1), np.asarray(labels).reshape(-1)
    weights, groups = _check_weights(weights, groups, labels.size)
    support, predicted_count, hits = _class_counts(weights, groups, labels, predicted)  # (R, K)
    present = support > 0
    recall = np.where(present, _ratio(hits, support), 0.0)
    return {"wa": _ratio(hits.sum(axis=1), support.sum(axis=1)),
            "ua": _ratio(recall.sum(axis=1), present.sum(axis=1)),
            "f1": _weighted_f1(support, predicted_count, hits)}


def weighted_metrics(predictions: np.ndarray, labels: np.ndarray, weights: np.ndarray,
                     groups: np.ndarray | None = None, *, regression: bool) -> dict[str, np.ndarray]:
    """weighted_regression_metrics or weighted_classification_metrics, by task."""
    if regression:
        return weighted_regression_metrics(predictions, labels, weights, groups)
    return weighted_classification_metrics(predictions, labels, weights, groups)


def interval(predictions: Folds, labels: Folds, conversation: Folds, *, regression: bool,
             resamples: int = 1000, level: float = 0.95, seed: int = 0) -> dict[str, Interval]:
    """Per metric, the fold-mean point estimate and its conversation-bootstrap percentile interval.

    predictions, labels, conversation: one array each for a single fold, or one array per fold
    (N,) each; conversation is each utterance's conversation within that fold's test split.
    """
    (points, replicates), = _fold_mean_replicates([_as_folds(predictions)], labels, conversation,
                                                  regression=regression, resamples=resamples,
                                                  seed=seed)
    return {name: Interval(points[name], *_percentiles(replicates[name], level), level,
                           _undefined(replicates[name])) for name in points}


def fold_mean_replicates(predictions: Folds, labels: Folds, conversation: Folds, *,
                         regression: bool, resamples: int = 1000,
                         seed: int = 0) -> dict[str, np.ndarray]:
    """Per metric, the (R,) fold-mean bootstrap replicates of one prediction set. Every call
    with the same seed and test conversations draws the same resamples, so replicates of several
    runs can be averaged (over seeds) and compared as pairs."""
    (_, replicates), = _fold_mean_replicates([_as_folds(predictions)], labels, conversation,
                                             regression=regression, resamples=resamples,
                                             seed=seed)
    return replicates


def paired_difference(a: Folds, b: Folds, labels: Folds, conversation: Folds, *, regression: bool,
                      resamples: int = 1000, level: float = 0.95,
                      seed: int = 0) -> dict[str, Difference]:
    """A − B per metric for two prediction sets on the same test data, with the percentile interval
    of the difference over resamples shared by A and B."""
    return selection_optimism([a], [b], labels, conversation, regression=regression,
                              resamples=resamples, level=level, seed=seed)


def selection_optimism(best_on_test: Sequence[Folds], honest: Sequence[Folds], labels: Folds,
                       conversation: Folds, *, regression: bool, resamples: int = 1000,
                       level: float = 0.95, seed: int = 0) -> dict[str, Difference]:
    """Mean over runs of (metric at the best-on-test epoch − metric at an honest rule's epoch),
    with a paired-bootstrap interval.

    best_on_test[k], honest[k]: run k's predictions at the two epochs (per fold as in `interval`).
    All runs share the test data (labels, conversation); conversations are resampled once and each
    resample's gap is averaged over runs. The point equals the mean gap of the runs' recorded metrics
    when these are the predictions those metrics came from. The epochs are held fixed: the interval
    is the test-sample spread of this gap, not of a selection redone within each resample.
    """
    if len(best_on_test) != len(honest) or not best_on_test:
        raise ValueError(f"need the same, non-zero number of runs at both epochs, got "
                         f"{len(best_on_test)} and {len(honest)}")
    sets = [_as_folds(run) for pair in zip(best_on_test, honest) for run in pair]
    summaries = _fold_mean_replicates(sets, labels, conversation, regression=regression,
                                      resamples=resamples, seed=seed)
    pairs = list(zip(summaries[::2], summaries[1::2]))  # ((points, replicates) best, honest) per run
    result = {}
    for name in summaries[0][0]:
        point = float(np.mean([best[0][name] - other[0][name] for best, other in pairs]))
        gaps = np.mean([best[1][name] - other[1][name] for best, other in pairs], axis=0)  # (R,)
        low, high = _percentiles(gaps, level)
        covers = None if math.isnan(low) else bool(low <= 0 <= high)
        result[name] = Difference(point, low, high, level, covers, _undefined(gaps))
    return result


def _fold_mean_replicates(prediction_sets: list[list[np.ndarray]], labels: Folds,
                          conversation: Folds, *, regression: bool, resamples: int,
                          seed: int) -> list[tuple[dict[str, float], dict[str, np.ndarray]]]:
    """Per prediction set: fold-mean points and fold-mean replicates (R,), every set on the same
    resamples. Folds are drawn one after the other from one generator, hence independently."""
    labels, conversation = _as_folds(labels), _as_folds(conversation)
    if len(labels) != len(conversation):
        raise ValueError(f"{len(labels)} folds of labels but {len(conversation)} of conversations")
    for predictions in prediction_sets:
        if len(predictions) != len(labels):
            raise ValueError(f"{len(predictions)} folds of predictions but {len(labels)} of labels")
    if resamples < 1:
        raise ValueError(f"resamples must be positive, got {resamples}")
    rng = np.random.default_rng(seed)
    names = REGRESSION_METRICS if regression else CLASSIFICATION_METRICS
    points = [dict.fromkeys(names, 0.0) for _ in prediction_sets]
    replicates = [{name: np.zeros(resamples) for name in names} for _ in prediction_sets]
    for fold, (fold_labels, fold_conversation) in enumerate(zip(labels, conversation)):
        if fold_conversation.size != fold_labels.size:
            raise ValueError(f"fold {fold}: {fold_labels.size} labels but "
                             f"{fold_conversation.size} conversation ids")
        counts, groups = conversation_weights(fold_conversation, resamples=resamples, rng=rng)
        for k, predictions in enumerate(prediction_sets):
            if predictions[fold].size != fold_labels.size:
                raise ValueError(f"fold {fold}: {predictions[fold].size} predictions but "
                                 f"{fold_labels.size} labels")
            point = point_metrics(predictions[fold], fold_labels, regression=regression)
            weighted = weighted_metrics(predictions[fold], fold_labels, counts, groups,
                                        regression=regression)
            for name in names:
                points[k][name] += point[name] / len(labels)
                replicates[k][name] += weighted[name] / len(labels)
    return list(zip(points, replicates))


def _as_folds(x: Folds) -> list[np.ndarray]:
    if isinstance(x, np.ndarray):
        return [x.reshape(-1)]
    return [np.asarray(fold).reshape(-1) for fold in x]


def _check_weights(weights: np.ndarray, groups: np.ndarray | None,
                   size: int) -> tuple[np.ndarray, np.ndarray]:
    weights = np.asarray(weights, dtype=np.float64)
    if weights.ndim == 1:
        weights = weights[None]
    if groups is None:
        groups = np.arange(size)
    groups = np.asarray(groups).reshape(-1)
    if weights.ndim != 2 or groups.size != size or (size and not 0 <= groups.min() <= groups.max()
                                                    < weights.shape[1]):
        raise ValueError(f"weights {weights.shape} and groups {groups.shape} do not fit "
                         f"{size} utterances")
    return weights, groups


def _group_sum(columns: np.ndarray, groups: np.ndarray, count: int) -> np.ndarray:
    """(N, k) per-utterance columns summed per group: (G, k)."""
    sums = np.zeros((count, columns.shape[1]))
    np.add.at(sums, groups, columns)
    return sums


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """numerator / denominator, NaN where the denominator is 0 (an empty resample or class)."""
    numerator, denominator = np.broadcast_arrays(np.asarray(numerator, dtype=np.float64),
                                                 np.asarray(denominator, dtype=np.float64))
    out = np.full(numerator.shape, math.nan)
    np.divide(numerator, denominator, out=out, where=denominator > 0)
    return out


def _class_counts(weights: np.ndarray, groups: np.ndarray, labels: np.ndarray,
                  predicted: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Weighted support, predicted count and hits per class (R, K each), from one-hot columns so
    that all classes and resamples are one matrix product."""
    classes = np.union1d(labels, predicted)
    true_hot = labels[:, None] == classes  # (N, K)
    pred_hot = predicted[:, None] == classes
    one_hot = np.concatenate([true_hot, pred_hot, true_hot & pred_hot], axis=1)  # (N, 3K)
    counts = weights @ _group_sum(one_hot, groups, weights.shape[1])
    return tuple(np.split(counts, 3, axis=1))


def _weighted_f1(support: np.ndarray, predicted_count: np.ndarray,
                 hits: np.ndarray) -> np.ndarray:
    """Support-weighted F1 (scikit-learn's 'weighted') from per-class counts (R, K)."""
    f1 = np.where(support > 0, _ratio(2 * hits, support + predicted_count), 0.0)
    return _ratio((support * f1).sum(axis=1), support.sum(axis=1))


def _weighted_pearson(weights: np.ndarray, groups: np.ndarray, x: np.ndarray,
                      y: np.ndarray) -> np.ndarray:
    """Pearson correlation under each weight row; NaN where x or y is constant on the drawn
    utterances, as metrics.py reports constant predictions."""
    count = weights.shape[1]
    if x.size == 0:
        return np.full(weights.shape[0], math.nan)
    # Centring at the fold means first keeps the one-pass moments below from cancelling.
    x, y = x - x.mean(), y - y.mean()
    sums = weights @ _group_sum(np.stack([np.ones_like(x), x, y, x * x, y * y, x * y], axis=1),
                                groups, count)  # (R, 6)
    total = sums[:, 0]
    mean_x, mean_y, mean_xx, mean_yy, mean_xy = _ratio(sums[:, 1:], total[:, None]).T
    var_x, var_y = mean_xx - mean_x ** 2, mean_yy - mean_y ** 2
    corr = np.clip(_ratio(mean_xy - mean_x * mean_y, np.sqrt(np.clip(var_x * var_y, 0, None))),
                   -1, 1)
    drawn = weights > 0  # (R, G)
    constant = (total < 2) | _constant(drawn, groups, x) | _constant(drawn, groups, y)
    corr[constant] = math.nan
    return corr


def _constant(drawn: np.ndarray, groups: np.ndarray, values: np.ndarray) -> np.ndarray:
    """(R,) whether `values` take one value on the drawn utterances. Compares per-group extremes,
    so it is exact where a variance test would depend on rounding."""
    lowest, highest = np.full(drawn.shape[1], np.inf), np.full(drawn.shape[1], -np.inf)
    np.minimum.at(lowest, groups, values)
    np.maximum.at(highest, groups, values)
    return (np.where(drawn, highest, -np.inf).max(axis=1)
            <= np.where(drawn, lowest, np.inf).min(axis=1))


def _percentiles(replicates: np.ndarray, level: float) -> tuple[float, float]:
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    defined = replicates[~np.isnan(replicates)]
    if defined.size == 0:
        return math.nan, math.nan
    low, high = np.quantile(defined, [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)


def _undefined(replicates: np.ndarray) -> int:
    return int(np.isnan(replicates).sum())


# ----------------------------------------------------------------------------- saved runs

def _unreadable(path: Path, error: Exception) -> str:
    """Why `path` does not load, in a few words (numpy's own words assume a pickle)."""
    try:
        with path.open("rb") as handle:
            archive = handle.read(4) == b"PK\x03\x04"
    except OSError:
        archive = True
    if not archive:
        return "is not an .npz archive"
    return f"cannot be read ({type(error).__name__}: {error})"


def _check_predictions(arrays: dict[str, np.ndarray]) -> None:
    """Raise ValueError unless every fold has ids, conversation and labels of one length and
    predictions of that length (what `MoMKE/trainer.py` writes)."""
    folds = {name.split("__")[0] for name in arrays}
    if not folds or any(not (f.startswith("fold") and f[4:].isdigit()) for f in folds):
        raise ValueError(f"its arrays are not per fold ({', '.join(sorted(arrays)[:3])})")
    for fold in folds:
        members = {name: a for name, a in arrays.items() if name.startswith(fold + "__")}
        missing = [k for k in ("ids", "conversation", "labels") if f"{fold}__{k}" not in members]
        if missing:
            raise ValueError(f"{fold} lacks {', '.join(missing)}")
        sizes = {a.shape for a in members.values()}
        if len(sizes) != 1 or len(next(iter(sizes))) != 1:
            raise ValueError(f"{fold} holds arrays of different shapes {sorted(sizes)}")


class SavedRuns:
    """Bootstrap replicates of the test metrics of saved runs, read from their `predictions.npz`
    (written by MoMKE.train: per fold the test utterances' ids, conversation index and labels, and
    the predictions '<view>__<rule>' of each selected epoch).

    Every run is resampled with the same generator seed, so two runs on the same test data get the
    same resamples: their replicates are paired, and a difference of replicates is a paired
    bootstrap. Replicates are fold means, as the results are."""

    def __init__(self, *, resamples: int = 1000, level: float = 0.95, seed: int = 0) -> None:
        self.resamples, self.level, self.seed = resamples, level, seed
        self._files: dict[str, dict[str, np.ndarray] | None] = {}
        self._replicates: dict[tuple[str, str, str], dict[str, np.ndarray] | None] = {}
        self.problems: dict[str, str] = {}  # folder -> why its predictions.npz is not used

    def problem(self, folder: str) -> str | None:
        """Why the predictions of the run in `folder` cannot be used, or None."""
        self._load(folder)
        return self.problems.get(folder)

    def replicates(self, folder: str, view: str, rule: str, *,
                   regression: bool) -> dict[str, np.ndarray] | None:
        """metric -> (R,) fold-mean replicates of the run in `folder` at `rule`, or None when
        the run kept no predictions for it."""
        key = (folder, view, rule)
        if key not in self._replicates:
            self._replicates[key] = self._compute(folder, view, rule, regression)
        return self._replicates[key]

    def test_data(self, folder: str) -> tuple | None:
        """What identifies a run's test data (ids per fold), to check that two runs pair."""
        arrays = self._load(folder)
        if arrays is None:
            return None
        return tuple(arrays[name].tobytes() for name in sorted(arrays) if name.endswith("__ids"))

    def interval(self, replicate_sets: Sequence[np.ndarray]) -> tuple[float, float]:
        """The percentile interval of the mean of paired replicate arrays (seeds, conditions)."""
        return _percentiles(np.mean(np.stack(replicate_sets), axis=0), self.level)

    def _load(self, folder: str) -> dict[str, np.ndarray] | None:
        if folder not in self._files:
            self._files[folder] = None
            try:
                with np.load(f"{folder}/predictions.npz", allow_pickle=False) as data:
                    arrays = {name: data[name] for name in data.files}
                _check_predictions(arrays)
                self._files[folder] = arrays
            except FileNotFoundError:
                self.problems[folder] = "is absent"
            except Exception as error:  # noqa: BLE001 - any damage: no interval, and said so
                self.problems[folder] = _unreadable(Path(folder) / "predictions.npz", error)
        return self._files[folder]

    def _compute(self, folder: str, view: str, rule: str,
                 regression: bool) -> dict[str, np.ndarray] | None:
        arrays = self._load(folder)
        if arrays is None:
            return None
        folds = sorted({name.split("__")[0] for name in arrays}, key=lambda f: int(f[4:]))
        if any(f"{fold}__{view}__{rule}" not in arrays for fold in folds):
            return None
        predictions = [arrays[f"{fold}__{view}__{rule}"] for fold in folds]
        (_, replicates), = _fold_mean_replicates(
            [predictions], [arrays[f"{fold}__labels"] for fold in folds],
            [arrays[f"{fold}__conversation"] for fold in folds], regression=regression,
            resamples=self.resamples, seed=self.seed)
        return replicates
