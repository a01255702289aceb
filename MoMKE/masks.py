"""Which modalities each utterance has: fixed test conditions and random missing rates.

From: SPEC §5. A condition is a non-empty subset of {a, t, v}; a missing rate r in [0, 0.7] removes
round(3 n r) of the 3 n (utterance, modality) entries while keeping at least one modality per
utterance (from r = 2/3 on, exactly one). Evaluation masks are drawn once from the seed, the fold,
the split and the rate alone, so every run and method is compared on the same masks.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from MoMKE.model import MODALITIES

CONDITIONS = ("a", "t", "v", "at", "av", "tv", "atv")
MAX_RATE = 0.7
RATES = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)


def parse_condition(text: str) -> str:
    """Canonical form ('ta' -> 'at') of a test condition, or a ValueError naming the flag."""
    letters = text.strip().lower()
    if not letters or set(letters) - set(MODALITIES) or len(set(letters)) != len(letters):
        raise ValueError(f"--test-condition {text!r} is invalid: use a non-empty set of the letters "
                         f"a, t, v without repeats, e.g. {', '.join(CONDITIONS)}.")
    return "".join(m for m in MODALITIES if m in letters)


def parse_rate(value: str | float) -> float:
    try:
        rate = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"--missing-rate {value!r} is not a number; use values in [0, 0.7].") \
            from None
    if not 0.0 <= rate <= MAX_RATE:
        raise ValueError(f"--missing-rate {rate} is outside [0, {MAX_RATE}]: at least one modality "
                         f"per utterance must stay, so use a rate between 0 and {MAX_RATE}.")
    return round(rate, 6)


def condition_availability(condition: str, utterances: int) -> Tensor:
    """(utterances, M) bool: every utterance has exactly the modalities of `condition`."""
    row = torch.tensor([m in condition for m in MODALITIES])
    return row.expand(utterances, -1).clone()


def random_availability(utterances: int, rate: float, generator: torch.Generator) -> Tensor:
    """(utterances, M) bool with exactly round(3 n rate) missing entries (at most 2 n), at least
    one modality per utterance. Each utterance keeps one random modality protected; the missing
    entries are a uniform choice among the 2 n unprotected ones."""
    available = torch.ones(utterances, len(MODALITIES), dtype=torch.bool)
    missing = min(int(round(len(MODALITIES) * utterances * rate)), 2 * utterances)
    if missing == 0:
        return available
    protected = torch.randint(len(MODALITIES), (utterances,), generator=generator)
    offsets = torch.stack([(protected + 1) % 3, (protected + 2) % 3], dim=1)  # (n, 2)
    candidates = (torch.arange(utterances)[:, None] * 3 + offsets).reshape(-1)
    chosen = candidates[torch.randperm(candidates.numel(), generator=generator)[:missing]]
    available.view(-1)[chosen] = False
    return available


def evaluation_generator(seed: int, fold: int, split: str, rate: float) -> torch.Generator:
    """The generator of a split's fixed evaluation masks: a function of these four values only."""
    split_code = {"train": 0, "val": 1, "test": 2}[split]
    state = np.random.SeedSequence([seed, fold, split_code, int(round(rate * 1000))])
    return torch.Generator().manual_seed(int(state.generate_state(1, dtype=np.uint64)[0] >> 1))
