"""The ablations that explain MoMKE, each one switch of `--ablation` that changes one thing.

    no-stage1       the mixture trained from scratch: stage 1 skipped, stage 2 as long as usual
    uniform-router  every modality mixes the experts with equal weights; no router is learnt
    self-experts    each modality uses only its own expert: no knowledge from the other experts
    frozen-experts  the experts keep their stage-1 weights during stage 2; the rest learns

All but no-stage1 leave stage 1 untouched (the same parameters are created in the same order), so
they reuse MoMKE's stage 1. The unified model (`--train-missing any`) is not an ablation but a
different training regime; both are named by `variant_name`.
"""
from __future__ import annotations

from MoMKE.config import TrainConfig

ABLATIONS = ("no-stage1", "uniform-router", "self-experts", "frozen-experts")


def model_options(ablation: str) -> dict[str, str]:
    """The ModelConfig fields an ablation sets."""
    return {"router": "uniform" if ablation == "uniform-router" else "soft",
            "experts": "self" if ablation == "self-experts" else "all"}


def has_stage1(config: TrainConfig) -> bool:
    return config.stage_epochs > 0 and config.ablation != "no-stage1"


def variant_name(config: dict) -> str:
    """'MoMKE', an ablation name, or 'unified (any)' for a result's configuration."""
    if config.get("train_missing", "run") != "run":
        return f"unified ({config['train_missing']})"
    return "MoMKE" if config.get("ablation", "none") == "none" else config["ablation"]
