"""What a run trains and evaluates on: one fixed condition or one random missing rate.

From: SPEC §5.
    fixed   stage 1 sees complete data; in stage 2 the condition masks training and evaluation.
    random  training masks are redrawn every batch at the rate, in both stages; validation and test
            masks are drawn once (seed, fold, split, rate) and reused every epoch.
    unified one model for every missing pattern (beyond the paper): stage 1 as in the fixed
            protocol; in stage 2 each training conversation draws one of the seven conditions
            (`any`), or for half of them per-utterance masks at a random rate (`any+rates`); it
            is evaluated on all seven conditions and all rates with the fixed evaluation masks.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from MoMKE.masks import (CONDITIONS, MAX_RATE, RATES, condition_availability,
                          evaluation_generator, random_availability)


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
