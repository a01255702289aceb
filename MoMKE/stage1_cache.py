"""Train stage 1 once, reuse it everywhere it is the same computation.

Stage 1 sees complete data in the fixed protocol, so all seven conditions share it; in the random
protocol it depends on the rate (docs/method.md, Missing-modality protocols). A cached stage 1
holds everything stage 2 starts from: the weights after the hand-over, the Adam state, the
random-number states, the stage-1 epoch records, the test predictions the selection rules kept
from them and the best-on-validation checkpoint so far (with `--select-from all` stage-1 epochs
are candidates), so a run that reuses it computes exactly what a run retraining it computes.
The key is the run identity restricted to what stage 1 depends on (the settings each field of
`TrainConfig` marks as touching stage 1, the data fingerprint, the code version), plus the fold
and the hardware (`runtime.hardware`: the device type, and on a GPU its model and CUDA version);
files live in `<output-dir>/_stage1/`. A file that does not load, or holds other keys or shapes
than this model's, is retrained with one warning.
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch

from dataloader.atomic import save_torch_atomic, write_errors_named
from dataloader.gcnet import MultimodalDataset
from MoMKE.config import TrainConfig
from MoMKE.protocols import MissingSetting
from MoMKE.runtime import code_version, hardware

log = logging.getLogger("MoMKE")

SNAPSHOT_KEYS = frozenset({"model", "optimizer", "rng_torch", "rng_data", "rng_cuda", "records",
                           "handover", "selected", "checkpoint", "best_val"})


def _stage1_identity(config: TrainConfig, setting: MissingSetting) -> dict:
    # Which settings count is said field by field in MoMKE/config.py (docs/runs.md).
    return {**config.stage1_settings(), "missing": setting.stage1_key, "code": code_version(),
            "torch": torch.__version__}


def key_for(config: TrainConfig, data: MultimodalDataset, fold: int, setting: MissingSetting,
            device: torch.device) -> str:
    payload = {**_stage1_identity(config, setting), "fold": fold, "device": hardware(device),
               "data": data.fingerprint}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]


def group_key(config: TrainConfig, setting: MissingSetting) -> str | None:
    """Runs with the same group key share one stage 1 (on every fold); None: no stage 1."""
    if config.stage_epochs == 0 or config.ablation == "no-stage1":
        return None
    payload = {**_stage1_identity(config, setting), "data_root": config.data_root,
               "device": config.device}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]


def path_for(config: TrainConfig, key: str) -> Path:
    return Path(config.output_dir) / "_stage1" / f"{config.dataset}-{key}.pt"


def load(config: TrainConfig, key: str, model_state: dict[str, torch.Tensor]) -> dict | None:
    """The cached snapshot, or None when there is none or it cannot be used as it is (then it
    is retrained and overwritten). `model_state` is the state dict of the model it must fit."""
    path = path_for(config, key)
    if not path.is_file():
        return None
    try:
        snapshot = torch.load(path, map_location="cpu", weights_only=True)
        problem = _problem(snapshot, model_state)
    except Exception as error:  # noqa: BLE001 - any damage means: retrain, never trust
        problem = f"it does not load ({type(error).__name__}: {error})"
    if problem is None:
        return snapshot
    log.warning("stage-1 cache %s is unusable: %s; training stage 1 again", path, problem)
    return None


def _problem(snapshot: object, model_state: dict[str, torch.Tensor]) -> str | None:
    if not isinstance(snapshot, dict) or set(snapshot) != SNAPSHOT_KEYS:
        keys = sorted(snapshot) if isinstance(snapshot, dict) else type(snapshot).__name__
        return f"it holds {keys}, not {sorted(SNAPSHOT_KEYS)}"
    weights = snapshot["model"]
    if not isinstance(weights, dict) or set(weights) != set(model_state):
        return "its weights are not this model's (other parameter names)"
    for name, value in weights.items():
        expected = model_state[name]
        if not isinstance(value, torch.Tensor) or value.shape != expected.shape \
                or value.dtype != expected.dtype:
            return f"its weight {name} has another shape or dtype than this model's"
        if value.is_floating_point() and not torch.isfinite(value).all():
            return f"its weight {name} holds non-finite values"
    if not isinstance(snapshot["selected"], list) or not all(
            isinstance(item, list) and len(item) == 5 and isinstance(item[4], torch.Tensor)
            for item in snapshot["selected"]):
        return "its kept test predictions are malformed"
    checkpoint = snapshot["checkpoint"]
    if checkpoint is not None and not (
            isinstance(checkpoint, dict) and set(checkpoint) == {"state", "epoch", "rule"}
            and isinstance(checkpoint["state"], dict) and set(checkpoint["state"]) == set(weights)):
        return "its kept checkpoint is malformed"
    if not isinstance(snapshot["best_val"], float):
        return "its best validation score is malformed"
    if not isinstance(snapshot["records"], list) or not all(
            isinstance(r, dict) and r.get("stage") == 1 for r in snapshot["records"]):
        return "its epoch records are malformed"
    return None


def save(config: TrainConfig, key: str, snapshot: dict) -> None:
    path = path_for(config, key)
    with write_errors_named(path.parent.parent):
        path.parent.mkdir(parents=True, exist_ok=True)
    save_torch_atomic(path, snapshot)
