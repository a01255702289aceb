"""Evaluation metrics over unpadded utterances, as fractions (0.8123), never percent.

CMU-MOSI/MOSEI (regression in [-3, 3]):
    acc2  binary accuracy of the sign, on utterances whose label is non-zero (the paper's Acc2)
    f1    weighted F1 of the sign, on the same non-zero utterances
    mae   mean absolute error, on all utterances
    corr  Pearson correlation, on all utterances (NaN when predictions are constant)
    acc7  accuracy of round(clip(., -3, 3)) into the seven classes -3..3, on all utterances
    mae_nonzero, corr_nonzero   the same two on non-zero labels only (the official code's)
IEMOCAP (classes):
    wa    accuracy (weighted accuracy)
    ua    mean per-class recall over the classes present in the labels (unweighted accuracy)
    f1    weighted F1
The official code computes MAE and Corr on non-zero labels only; MMSA and most papers use all
utterances. Both are kept, under distinct names; the report says which it shows
(docs/differences.md).
Computed with numpy (scikit-learn's definitions; tests hold them equal to scikit-learn), which
keeps scikit-learn and SciPy out of the training process's memory. In words: docs/method.md,
Metrics.
"""
from __future__ import annotations

import math

import numpy as np


def regression_metrics(predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    predictions = np.asarray(predictions, dtype=np.float64).reshape(-1)
    labels = np.asarray(labels, dtype=np.float64).reshape(-1)
    non_zero = labels != 0
    sign_true, sign_pred = labels[non_zero] > 0, predictions[non_zero] > 0
    return {
        "acc2": float(np.mean(sign_true == sign_pred)) if sign_true.size else math.nan,
        "f1": weighted_f1(sign_true, sign_pred),
        "mae": float(np.mean(np.abs(predictions - labels))),
        "corr": _pearson(predictions, labels),
        "acc7": float(np.mean(np.round(np.clip(predictions, -3, 3)) ==
                              np.round(np.clip(labels, -3, 3)))),
        # The official code's definitions, for comparison with its logs (docs/differences.md).
        "mae_nonzero": float(np.mean(np.abs(predictions[non_zero] - labels[non_zero])))
        if non_zero.any() else math.nan,
        "corr_nonzero": _pearson(predictions[non_zero], labels[non_zero]),
    }


def classification_metrics(predicted: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """`predicted` are class indices (N,), not scores."""
    predicted, labels = np.asarray(predicted).reshape(-1), np.asarray(labels).reshape(-1)
    classes = np.unique(labels)
    recalls = [np.mean(predicted[labels == c] == c) for c in classes]
    return {"wa": float(np.mean(predicted == labels)), "ua": float(np.mean(recalls)),
            "f1": weighted_f1(labels, predicted)}


def weighted_f1(labels: np.ndarray, predicted: np.ndarray) -> float:
    """Per-class F1 averaged with the classes' support in `labels` (scikit-learn's 'weighted')."""
    if labels.size == 0:
        return math.nan
    total = 0.0
    for c in np.unique(np.concatenate([labels, predicted])):
        true_c, pred_c = labels == c, predicted == c
        support = int(true_c.sum())
        if support:
            hits = int((true_c & pred_c).sum())
            total += support * 2 * hits / (support + int(pred_c.sum()))
    return total / labels.size


def task_metrics(outputs: np.ndarray, labels: np.ndarray, *, regression: bool) -> dict[str, float]:
    """Metrics from raw model outputs (N, C): scores for regression, logits for classification."""
    if regression:
        return regression_metrics(outputs.reshape(-1), labels)
    return classification_metrics(outputs.argmax(axis=1), labels)


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    if x.size < 2 or np.std(x) == 0 or np.std(y) == 0:
        return math.nan  # undefined, and reported as such rather than as 0
    return float(np.corrcoef(x, y)[0, 1])
