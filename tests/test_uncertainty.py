"""Conversation bootstrap: weighted metrics agree with metrics.py, intervals have known widths."""
from __future__ import annotations

import math
import time

import numpy as np
import pytest

from MoMKE.metrics import classification_metrics, regression_metrics
from MoMKE.results.uncertainty import (
    CLASSIFICATION_METRICS,
    REGRESSION_METRICS,
    conversation_weights,
    interval,
    paired_difference,
    point_metrics,
    selection_optimism,
    weighted_metrics,
)


def _regression_case(seed: int, n: int = 60) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    # Labels on the datasets' grid of thirds with many zeros; predictions with exact zeros and
    # values on .5 so that sign and acc7 rounding edges are exercised.
    labels = np.round(rng.uniform(-3.4, 3.4, n) * 3) / 3
    labels[rng.random(n) < 0.2] = 0.0
    predictions = labels + rng.normal(0, 1.2, n)
    predictions[rng.random(n) < 0.1] = 0.0
    predictions[rng.random(n) < 0.1] = 1.5
    return predictions, labels


def _classification_case(seed: int, n: int = 60, classes: int = 6) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes - 1, n)  # the last class is only ever predicted
    predicted = np.where(rng.random(n) < 0.5, labels, rng.integers(0, classes, n))
    return predicted, labels


CASES = [pytest.param(True, seed, id=f"regression-{seed}") for seed in range(4)] + [
    pytest.param(False, seed, id=f"classification-{seed}") for seed in range(4)]


def _case(regression: bool, seed: int) -> tuple[np.ndarray, np.ndarray]:
    return _regression_case(seed) if regression else _classification_case(seed)


@pytest.mark.parametrize("regression, seed", CASES)
def test_unit_weights_reproduce_metrics_module(regression, seed):
    predictions, labels = _case(regression, seed)
    expected = (regression_metrics(predictions, labels) if regression
                else classification_metrics(predictions, labels))
    if regression:
        non_zero = labels != 0
        expected["mae_nonzero"] = np.mean(np.abs(predictions - labels)[non_zero])
        expected["corr_nonzero"] = np.corrcoef(predictions[non_zero], labels[non_zero])[0, 1]
    names = REGRESSION_METRICS if regression else CLASSIFICATION_METRICS
    assert set(expected) == set(names)
    got = weighted_metrics(predictions, labels, np.ones((1, labels.size)), regression=regression)
    point = point_metrics(predictions, labels, regression=regression)
    for name in names:
        assert got[name].shape == (1,)
        assert got[name][0] == pytest.approx(expected[name], rel=1e-12, abs=1e-14), name
        assert point[name] == pytest.approx(expected[name], rel=1e-12, abs=1e-14), name


@pytest.mark.parametrize("regression, seed", CASES)
def test_integer_weights_equal_metrics_on_replicated_data(regression, seed):
    predictions, labels = _case(regression, seed)
    weights = np.random.default_rng(100 + seed).integers(0, 4, (5, labels.size))
    got = weighted_metrics(predictions, labels, weights, regression=regression)
    for r, row in enumerate(weights):
        expected = point_metrics(np.repeat(predictions, row), np.repeat(labels, row),
                                 regression=regression)
        for name, value in expected.items():
            assert got[name][r] == pytest.approx(value, rel=1e-10, abs=1e-12), (name, r)


@pytest.mark.parametrize("regression, seed", CASES)
def test_conversation_counts_equal_expanded_utterance_weights(regression, seed):
    predictions, labels = _case(regression, seed)
    conversation = np.sort(np.random.default_rng(seed).integers(0, 12, labels.size)) * 7  # gaps
    counts, groups = conversation_weights(conversation, resamples=40,
                                          rng=np.random.default_rng(seed))
    assert counts.shape == (40, np.unique(conversation).size)
    assert np.all(counts.sum(axis=1) == counts.shape[1])  # C draws of C conversations
    grouped = weighted_metrics(predictions, labels, counts, groups, regression=regression)
    expanded = weighted_metrics(predictions, labels, counts[:, groups], regression=regression)
    for name in grouped:
        np.testing.assert_allclose(grouped[name], expanded[name], rtol=1e-12, atol=1e-14)


def test_constant_predictions_have_undefined_correlation_in_every_resample():
    labels = np.array([1.0, -1.0, 2.0, -2.0, 0.5, 0.0])
    got = interval(np.zeros(6), labels, np.arange(6), regression=True, resamples=50)
    assert math.isnan(got["corr"].point) and math.isnan(got["corr"].low)
    assert got["corr"].undefined == 50
    assert got["mae"].undefined == 0


def _outcomes(correct: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Class predictions and labels whose accuracy is the mean of `correct`."""
    return np.where(correct, 0, 1), np.zeros(correct.size, dtype=int)


def test_independent_utterances_match_the_binomial_interval():
    n, p = 2000, 0.8
    correct = np.random.default_rng(0).random(n) < p
    got = interval(*_outcomes(correct), np.arange(n), regression=False, resamples=2000)["wa"]
    p_hat = correct.mean()
    half = 1.96 * math.sqrt(p_hat * (1 - p_hat) / n)
    assert got.point == p_hat
    assert got.low == pytest.approx(p_hat - half, abs=0.0015)
    assert got.high == pytest.approx(p_hat + half, abs=0.0015)


def test_correlated_conversations_widen_the_interval_by_sqrt_size():
    conversations, size = 200, 10
    correct = np.repeat(np.random.default_rng(1).random(conversations) < 0.8, size)
    conversation = np.repeat(np.arange(conversations), size)
    by_conversation = interval(*_outcomes(correct), conversation, regression=False,
                               resamples=2000)["wa"]
    by_utterance = interval(*_outcomes(correct), np.arange(correct.size), regression=False,
                            resamples=2000)["wa"]
    p_hat = correct.mean()
    binomial_width = 2 * 1.96 * math.sqrt(p_hat * (1 - p_hat) / correct.size)
    width = by_conversation.high - by_conversation.low
    assert width / binomial_width == pytest.approx(math.sqrt(size), rel=0.1)
    assert width / (by_utterance.high - by_utterance.low) == pytest.approx(math.sqrt(size), rel=0.1)


def test_fold_mean_averages_points_and_narrows_with_more_folds():
    n, p, folds = 1000, 0.8, 5
    rng = np.random.default_rng(2)
    correct = [rng.random(n) < p for _ in range(folds)]
    pairs = [_outcomes(c) for c in correct]
    got = interval([a for a, _ in pairs], [b for _, b in pairs], [np.arange(n)] * folds,
                   regression=False, resamples=2000)["wa"]
    assert got.point == pytest.approx(np.mean([c.mean() for c in correct]), rel=1e-12)
    p_hat = np.mean(correct)
    expected_width = 2 * 1.96 * math.sqrt(p_hat * (1 - p_hat) / (n * folds))
    assert got.high - got.low == pytest.approx(expected_width, rel=0.1)


@pytest.mark.parametrize("regression, seed", CASES)
def test_prediction_set_against_itself_differs_by_exactly_zero(regression, seed):
    predictions, labels = _case(regression, seed)
    conversation = np.arange(labels.size) // 4
    got = paired_difference(predictions, predictions.copy(), labels, conversation,
                            regression=regression, resamples=200)
    for name, difference in got.items():
        assert (difference.point, difference.low, difference.high) == (0.0, 0.0, 0.0), name
        assert difference.covers_zero is True


def test_uniform_shift_gives_a_zero_width_difference_in_mae():
    rng = np.random.default_rng(3)
    labels = rng.uniform(0.5, 3.0, 80)  # positive and far from 0, so shifts keep every sign
    conversation = np.arange(80) // 5
    got = paired_difference(labels + 0.25, labels + 0.75, labels, conversation, regression=True,
                            resamples=200)
    assert got["mae"].point == pytest.approx(-0.5)
    assert got["mae"].low == pytest.approx(-0.5) and got["mae"].high == pytest.approx(-0.5)
    assert got["mae"].covers_zero is False
    for name in ("acc2", "f1", "corr", "corr_nonzero"):
        assert got[name].low == pytest.approx(0, abs=1e-12), name
        assert got[name].high == pytest.approx(0, abs=1e-12), name


def test_one_error_per_conversation_is_a_constant_accuracy_gap():
    size, conversations = 5, 30
    labels = np.zeros(size * conversations, dtype=int)
    worse = labels.copy()
    worse[::size] = 1  # one wrong utterance in each conversation
    got = paired_difference(labels, worse, labels, np.arange(labels.size) // size,
                            regression=False, resamples=200)["wa"]
    assert got.point == pytest.approx(1 / size)
    assert got.low == pytest.approx(1 / size) and got.high == pytest.approx(1 / size)
    assert got.covers_zero is False


def test_pairing_cancels_the_variation_shared_by_both_sets():
    n = 1000
    rng = np.random.default_rng(4)
    correct = np.repeat(rng.random(n // 10) < 0.7, 10)
    changed = correct | (rng.random(n) < 0.02)
    conversation = np.arange(n) // 10
    labels = np.zeros(n, dtype=int)
    a, b = np.where(changed, 0, 1), np.where(correct, 0, 1)
    paired = paired_difference(a, b, labels, conversation, regression=False)["wa"]
    alone = interval(a, labels, conversation, regression=False)["wa"]
    assert paired.high - paired.low < (alone.high - alone.low) / 3
    assert paired.covers_zero is False


def test_selection_optimism_is_the_mean_paired_gap_over_runs():
    conversation = np.arange(120) // 6
    runs = [_regression_case(seed, n=120) for seed in range(3)]
    labels = runs[0][1]
    best = [p + 0.1 * (k + 1) for k, (p, _) in enumerate(runs)]
    honest = [p for p, _ in runs]
    got = selection_optimism(best, honest, labels, conversation, regression=True, resamples=300)
    for name, gap in got.items():
        expected = np.mean([point_metrics(b, labels, regression=True)[name]
                            - point_metrics(h, labels, regression=True)[name]
                            for b, h in zip(best, honest)])
        assert gap.point == pytest.approx(expected, rel=1e-12, abs=1e-14), name
        assert gap.low <= gap.point + 1e-12 or math.isnan(gap.low)
    one_run = selection_optimism(best[:1], honest[:1], labels, conversation, regression=True,
                                 resamples=300)
    assert one_run == paired_difference(best[0], honest[0], labels, conversation, regression=True,
                                        resamples=300)
    same = selection_optimism(honest, honest, labels, conversation, regression=True, resamples=300)
    assert all(g.low == g.high == 0.0 for g in same.values())


def test_same_seed_same_interval_and_another_seed_another():
    predictions, labels = _classification_case(5, n=200)
    conversation = np.arange(200) // 8
    first = interval(predictions, labels, conversation, regression=False, seed=7)
    assert first == interval(predictions, labels, conversation, regression=False, seed=7)
    assert first != interval(predictions, labels, conversation, regression=False, seed=8)
    narrow = interval(predictions, labels, conversation, regression=False, seed=7, level=0.5)
    assert all(first[k].low <= narrow[k].low <= narrow[k].high <= first[k].high for k in first)


def test_mismatched_inputs_fail_with_a_sentence():
    with pytest.raises(ValueError, match="folds of predictions"):
        interval([np.zeros(4)] * 2, [np.zeros(4)], [np.arange(4)], regression=True)
    with pytest.raises(ValueError, match="predictions but"):
        interval(np.zeros(3), np.zeros(4), np.arange(4), regression=True)
    with pytest.raises(ValueError, match="level"):
        interval(np.zeros(4), np.ones(4), np.arange(4), regression=True, level=95)
    with pytest.raises(ValueError, match="number of runs"):
        selection_optimism([np.zeros(4)], [], np.ones(4), np.arange(4), regression=True)


def _seconds(call, repeats: int = 3) -> float:
    start = time.perf_counter()
    for _ in range(repeats):
        call()
    return (time.perf_counter() - start) / repeats


def test_speed_at_dataset_sizes(capsys):
    rng = np.random.default_rng(6)
    conversation = np.sort(rng.integers(0, 93, 2200))
    labels = np.round(rng.uniform(-3, 3, 2200) * 3) / 3
    predictions = labels + rng.normal(0, 1, 2200)
    cmu = _seconds(lambda: interval(predictions, labels, conversation, regression=True))
    iemocap_labels = [rng.integers(0, 6, 1100) for _ in range(5)]
    iemocap_predicted = [np.where(rng.random(1100) < 0.6, y, rng.integers(0, 6, 1100))
                         for y in iemocap_labels]
    iemocap_conversation = [np.sort(rng.integers(0, 30, 1100)) for _ in range(5)]
    iemocap = _seconds(lambda: interval(iemocap_predicted, iemocap_labels, iemocap_conversation,
                                        regression=False))
    runs = 15
    optimism = _seconds(lambda: selection_optimism(
        [predictions] * runs, [predictions + 0.1] * runs, labels, conversation, regression=True),
        repeats=1)
    # A report: an interval for each of 15 runs x 3 rules, and the optimism of two honest rules.
    report = 45 * cmu + 2 * optimism
    with capsys.disabled():
        print(f"\nR=1000: CMU interval (N=2200, C=93) {cmu * 1e3:.0f} ms; IEMOCAP interval "
              f"(5 folds x 1100) {iemocap * 1e3:.0f} ms; optimism over {runs} runs "
              f"{optimism * 1e3:.0f} ms; CMU report estimate {report:.1f} s")
