"""Train stage 1 once, reuse it everywhere it is the same computation.

From: SPEC §5 (stage 1 sees complete data in the fixed protocol, so all seven conditions share it;
in the random protocol it depends on the rate). A cached stage 1 holds everything stage 2 starts
from: the weights after the hand-over, the Adam state, the random-number states, and the stage-1
epoch records, so a run that reuses it computes exactly what a run retraining it computes.
The key covers every setting stage 1 depends on; files live in `<output-dir>/_stage1/`.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import torch

from dataloader.gcnet import MultimodalDataset
from MoMKE.config import TrainConfig
from MoMKE.protocols import MissingSetting

log = logging.getLogger("MoMKE")

# Settings stage 1 depends on. Not here: epochs (stage 2 length), conditions, rates, output options.
_STAGE1_FIELDS = ("dataset", "audio_feature", "text_feature", "video_feature", "stage_epochs",
                  "batch_size", "chunk_utterances", "lr", "l2", "expert_handover", "hidden",
                  "depth", "num_heads", "mlp_ratio", "drop_rate", "attn_drop_rate", "seed", "amp")


def key_for(config: TrainConfig, data: MultimodalDataset, fold: int, setting: MissingSetting,
            device: torch.device) -> str:
    payload = {name: getattr(config, name) for name in _STAGE1_FIELDS}
    payload.update(fold=fold, missing=setting.stage1_key, device=device.type,
                   data=data.fingerprint, version=1)
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]


def group_key(config: TrainConfig, setting: MissingSetting) -> str | None:
    """Runs with the same group key share one stage 1 (on every fold); None: no stage 1."""
    if config.stage_epochs == 0 or config.ablation == "no-stage1":
        return None
    payload = {name: getattr(config, name) for name in _STAGE1_FIELDS}
    payload.update(data_root=config.data_root, missing=setting.stage1_key, device=config.device)
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]


def path_for(config: TrainConfig, key: str) -> Path:
    return Path(config.output_dir) / "_stage1" / f"{config.dataset}-{key}.pt"


def load(config: TrainConfig, key: str) -> dict | None:
    path = path_for(config, key)
    if not path.is_file():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a damaged cache is retrained, never trusted
        log.warning("stage-1 cache %s is unreadable (%s); training stage 1 again", path, error)
        return None


def save(config: TrainConfig, key: str, snapshot: dict) -> None:
    path = path_for(config, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    torch.save(snapshot, temporary)
    os.replace(temporary, path)
