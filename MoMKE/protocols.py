"""What a run trains and evaluates on: one fixed condition or one random missing rate.

From: SPEC §5.
    fixed   stage 1 sees complete data; in stage 2 the condition masks training and evaluation.
    random  training masks are redrawn every batch at the rate, in both stages; validation and test
            masks are drawn once (seed, fold, split, rate) and reused every epoch.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from MoMKE.masks import (condition_availability, evaluation_generator, random_availability)


@dataclass(frozen=True)
class MissingSetting:
    protocol: str  # "fixed" or "random"
    condition: str | None = None
    rate: float | None = None

    @property
    def name(self) -> str:
        return f"fixed-{self.condition}" if self.protocol == "fixed" else f"random-{self.rate:.1f}"

    @property
    def stage1_key(self) -> str:
        """What stage 1 depends on: nothing in the fixed protocol, the rate in the random one."""
        return "complete" if self.protocol == "fixed" else f"rate={self.rate}"

    def training_availability(self, stage: int, utterances: int,
                              generator: torch.Generator) -> Tensor:
        """(utterances, M) bool for one training batch."""
        if self.protocol == "random":
            return random_availability(utterances, self.rate, generator)
        return condition_availability("atv" if stage == 1 else self.condition, utterances)

    def evaluation_availability(self, stage: int, utterances: int, *, seed: int, fold: int,
                                split: str) -> Tensor:
        """(utterances, M) bool for a whole evaluation split: the same in every epoch and run."""
        if self.protocol == "random":
            return random_availability(utterances, self.rate,
                                       evaluation_generator(seed, fold, split, self.rate))
        return condition_availability("atv" if stage == 1 else self.condition, utterances)


def settings_from(conditions: list[str], rates: list[float]) -> list[MissingSetting]:
    return ([MissingSetting("fixed", condition=c) for c in conditions]
            + [MissingSetting("random", rate=r) for r in rates])
