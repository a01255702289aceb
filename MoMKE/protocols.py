"""Missing-modality protocols: which modalities each utterance has, in training and evaluation.

Method: docs/method.md, Missing-modality protocols.
    fixed   stage 1 sees complete data; in stage 2 the condition masks training and evaluation.
            A condition is a non-empty subset of {a, t, v}.
    random  a missing rate r in [0, 0.7] removes round(3 n r) of the 3 n (utterance, modality)
            entries, keeping at least one modality per utterance (from r = 2/3 on, exactly one).
            Training masks are redrawn every batch at the rate, in both stages; validation and
            test masks are drawn once from (seed, fold, split, rate) alone and reused every
            epoch, so every run and method is compared on the same masks.
    unified one model for every missing pattern (beyond the paper): stage 1 as in the fixed
            protocol; in stage 2 each training conversation draws one of the seven conditions
            (`any`), or for half of them per-utterance masks at a random rate (`any+rates`); it
            is evaluated on all seven conditions and all rates with the fixed evaluation masks.
"""
from __future__ import annotations

from dataclasses import dataclass

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


@dataclass(frozen=True)
class MissingSetting:
    protocol: str  # "fixed" or "random"
    condition: str | None = None
    rate: float | None = None

    mix: str | None = None  # unified only: "any" or "any+rates"

    @property
    def name(self) -> str:
        if self.protocol == "fixed":
            return f"fixed-{self.condition}"
        if self.protocol == "random":
            return f"random-{self.rate!r}"  # the rate as written: 0.14 is not 0.1
        return f"unified-{self.mix}"

    @property
    def stage1_key(self) -> str:
        """What stage 1 depends on: nothing in the fixed and unified protocols, the rate in the
        random one (so one stage 1 serves all seven conditions and the unified model)."""
        return f"rate={self.rate}" if self.protocol == "random" else "complete"

    def training_availability(self, stage: int, lengths: list[int],
                              generator: torch.Generator) -> Tensor:
        """(utterances, M) bool for one training batch of conversations of these `lengths`."""
        utterances = sum(lengths)
        if self.protocol == "random":
            return random_availability(utterances, self.rate, generator)
        if self.protocol == "fixed" or stage == 1:
            return condition_availability("atv" if stage == 1 else self.condition, utterances)
        return torch.cat([self._unified_conversation(length, generator) for length in lengths])

    def _unified_conversation(self, length: int, generator: torch.Generator) -> Tensor:
        if self.mix == "any+rates" and torch.rand(1, generator=generator).item() < 0.5:
            rate = MAX_RATE * torch.rand(1, generator=generator).item()
            return random_availability(length, rate, generator)
        condition = CONDITIONS[int(torch.randint(len(CONDITIONS), (1,), generator=generator))]
        return condition_availability(condition, length)

    def evaluation_availability(self, stage: int, utterances: int, *, seed: int, fold: int,
                                split: str) -> Tensor:
        """(utterances, M) bool for a whole evaluation split: the same in every epoch and run."""
        if self.protocol == "random":
            return random_availability(utterances, self.rate,
                                       evaluation_generator(seed, fold, split, self.rate))
        return condition_availability("atv" if stage == 1 else self.condition, utterances)

    def evaluation_settings(self, stage: int) -> list[MissingSetting]:
        """What an epoch is evaluated on: the run's own setting, or for the unified model in
        stage 2 every condition and every rate (the per-condition runs' own masks)."""
        if self.protocol != "unified":
            return [self]
        if stage == 1:
            return [MissingSetting("fixed", condition="atv")]  # stage 1 sees complete data
        return settings_from(list(CONDITIONS), list(RATES))


def settings_from(conditions: list[str], rates: list[float],
                  train_missing: str = "run") -> list[MissingSetting]:
    """The runs a configuration asks for: one per condition and rate, or one unified model."""
    if train_missing != "run":
        return [MissingSetting("unified", mix=train_missing)]
    return ([MissingSetting("fixed", condition=c) for c in conditions]
            + [MissingSetting("random", rate=r) for r in rates])
