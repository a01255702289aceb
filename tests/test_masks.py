"""Missing-modality masks: fixed conditions, random rates, fixed evaluation masks
(docs/method.md, Missing-modality protocols)."""
from __future__ import annotations

import pytest
import torch

from MoMKE.protocols import (CONDITIONS, condition_availability, evaluation_generator, parse_condition,
                         parse_rate, random_availability)


@pytest.mark.parametrize("rate", [0.1, 0.2, 0.3, 0.4, 0.5, 0.6])
def test_random_rate_is_hit_and_no_utterance_loses_everything(rate):
    available = random_availability(5000, rate, torch.Generator().manual_seed(0))
    realised = 1 - available.float().mean().item()
    assert abs(realised - rate) < 0.01
    assert available.any(dim=1).all()
    per_modality = 1 - available.float().mean(dim=0)
    assert torch.all((per_modality - rate).abs() < 0.03)  # no modality is favoured


def test_rate_point_seven_keeps_exactly_one_modality():
    available = random_availability(3000, 0.7, torch.Generator().manual_seed(1))
    assert torch.all(available.sum(dim=1) == 1)


def test_rate_zero_is_complete():
    assert random_availability(100, 0.0, torch.Generator()).all()


@pytest.mark.parametrize("condition", CONDITIONS)
def test_fixed_conditions_mask_exactly_their_letters(condition):
    available = condition_availability(condition, 11)
    assert available.shape == (11, 3)
    for i, m in enumerate("atv"):
        assert bool(available[:, i].all()) == (m in condition)
        assert bool(available[:, i].any()) == (m in condition)


def test_evaluation_masks_depend_only_on_seed_fold_split_rate():
    draw = lambda *key: random_availability(500, 0.4, evaluation_generator(*key))  # noqa: E731
    torch.manual_seed(123)  # the global state must not matter
    first = draw(66, 0, "test", 0.4)
    torch.manual_seed(999)
    assert torch.equal(first, draw(66, 0, "test", 0.4))
    assert not torch.equal(first, draw(66, 0, "val", 0.4))
    assert not torch.equal(first, draw(67, 0, "test", 0.4))


@pytest.mark.parametrize("text, canonical", [("ta", "at"), ("VAT", "atv"), ("v", "v")])
def test_conditions_are_canonical(text, canonical):
    assert parse_condition(text) == canonical


@pytest.mark.parametrize("bad", ["", "x", "aa", "atvx"])
def test_invalid_conditions_are_refused(bad):
    with pytest.raises(ValueError, match="--test-condition"):
        parse_condition(bad)


@pytest.mark.parametrize("bad", ["0.8", "-0.1", "abc", "1"])
def test_invalid_rates_are_refused(bad):
    with pytest.raises(ValueError, match="--missing-rate"):
        parse_rate(bad)
