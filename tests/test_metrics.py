"""Metrics equal hand-computed values (docs/method.md, Metrics) and scikit-learn's definitions."""
from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import f1_score, recall_score

from MoMKE.metrics import classification_metrics, regression_metrics, task_metrics


def test_regression_metrics_by_hand():
    labels = np.array([2.0, -1.0, 0.0, 1.4, -2.6])
    predictions = np.array([1.0, 0.5, -0.2, 1.6, -3.4])
    got = regression_metrics(predictions, labels)
    # non-zero labels: signs (T, F, T, F) vs predicted (T, T, T, F): 3 of 4 right
    assert got["acc2"] == pytest.approx(0.75)
    # weighted F1: positive class F1 = 2*2/(2+3) = 0.8 (support 2); negative = 2*1/(2+1) (support 2)
    assert got["f1"] == pytest.approx((0.8 * 2 + 2 / 3 * 2) / 4)
    assert got["mae"] == pytest.approx(np.mean([1.0, 1.5, 0.2, 0.2, 0.8]))
    assert got["corr"] == pytest.approx(np.corrcoef(predictions, labels)[0, 1])
    # round(clip): predictions -> 1, 0(0.5 rounds to even), 0, 2, -3; labels -> 2, -1, 0, 1, -3
    assert got["acc7"] == pytest.approx(2 / 5)


def test_constant_predictions_have_undefined_correlation():
    got = regression_metrics(np.zeros(4), np.array([1.0, -1.0, 2.0, -2.0]))
    assert math.isnan(got["corr"])


def test_classification_metrics_by_hand():
    labels = np.array([0, 0, 1, 1, 1, 2])
    predicted = np.array([0, 1, 1, 1, 0, 2])
    got = classification_metrics(predicted, labels)
    assert got["wa"] == pytest.approx(4 / 6)
    assert got["ua"] == pytest.approx((1 / 2 + 2 / 3 + 1) / 3)
    assert got["f1"] == pytest.approx(f1_score(labels, predicted, average="weighted"))


def test_classification_metrics_match_scikit_learn_on_random_cases():
    rng = np.random.default_rng(0)
    for _ in range(50):
        labels, predicted = rng.integers(0, 4, 40), rng.integers(0, 5, 40)
        got = classification_metrics(predicted, labels)
        assert got["f1"] == pytest.approx(f1_score(labels, predicted, average="weighted"))
        assert got["ua"] == pytest.approx(
            recall_score(labels, predicted, labels=np.unique(labels), average="macro"))


def test_task_metrics_take_logits_for_classes():
    logits = np.array([[2.0, 0.1], [0.0, 1.0], [3.0, -1.0]])
    assert task_metrics(logits, np.array([0, 1, 1]), regression=False)["wa"] == pytest.approx(2 / 3)
