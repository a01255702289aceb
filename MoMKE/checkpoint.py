"""A run's selected weights as a file that travels: `checkpoint_fold<k>.pt`.

A checkpoint holds CPU tensors (a model trained on a GPU loads on a machine without one) and
everything needed to rebuild and check the model without its run folder: the model config, the
dataset, the feature folder names and dimensions it was trained on, the run's setting, seed and
fold, which epoch and selection rule the weights come from, the run identity and the code
version. It is read with `torch.load(weights_only=True)` only: plain containers and tensors, no
code. What `load_checkpoint` refuses, it refuses in one sentence naming the file
(docs/evaluate.md).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from MoMKE.model import MODALITIES, ModelConfig, MoMKE
from MoMKE.runtime import code_version

# Bumped when the fields below change meaning; a checkpoint without it predates travelling ones.
FORMAT = 2
_FIELDS = ("format", "model_state", "model_config", "dataset", "data_source", "data_fingerprint",
           "features", "dims", "setting", "train_missing", "seed", "fold", "epoch", "rule",
           "batch_size", "amp", "identity_hash", "code_version", "torch", "trained_on")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and what to do."""


def checkpoint_payload(*, state: dict[str, torch.Tensor], model_config: ModelConfig,
                       dataset: str, data_source: str, data_fingerprint: str,
                       features: dict[str, str], dims: dict[str, int], setting: str,
                       train_missing: str, seed: int, fold: int, epoch: int, rule: str,
                       batch_size: int, amp: bool, identity_hash: str,
                       device: torch.device) -> dict[str, Any]:
    """What `checkpoint_fold<fold>.pt` holds; the weights copied to the CPU."""
    return {"format": FORMAT,
            "model_state": {name: value.detach().to("cpu", copy=True)
                            for name, value in state.items()},
            "model_config": model_config.to_dict(), "dataset": dataset,
            "data_source": data_source, "data_fingerprint": data_fingerprint,
            "features": dict(features), "dims": {m: int(d) for m, d in dims.items()},
            "setting": setting, "train_missing": train_missing, "seed": seed, "fold": fold,
            "epoch": epoch, "rule": rule, "batch_size": batch_size, "amp": amp,
            "identity_hash": identity_hash, "code_version": code_version(),
            "torch": str(torch.__version__), "trained_on": str(device)}


@dataclass
class Checkpoint:
    """A loaded, checked checkpoint and its model, in eval mode on the device asked for."""

    path: Path
    model: MoMKE
    fields: dict[str, Any]  # everything but the weights

    @property
    def same_code(self) -> bool:
        return self.fields["code_version"] == code_version()

    @property
    def code_note(self) -> str:
        """'' for this code version, else a note that the evaluating code differs."""
        if self.same_code:
            return ""
        return (f"trained with code {self.fields['code_version']}, evaluated with "
                f"{code_version()}: numbers may differ from the run's own")

    @property
    def trained_modalities(self) -> str:
        """The modalities the fused model saw in stage-2 training: its condition's letters
        (fixed protocol), every modality otherwise."""
        setting = self.fields["setting"]
        return setting.split("-", 1)[1] if setting.startswith("fixed-") else "".join(MODALITIES)


def load_checkpoint(path: Path, device: torch.device, *, dataset: str | None = None
                    ) -> Checkpoint:
    """The checkpoint at `path` with its model on `device`; `dataset`, when given, must be the
    one it was trained on. Raises CheckpointError naming the file."""
    retrain = "retrain the run (its command again with --force)"
    try:
        saved = torch.load(path, map_location=device, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path} does not exist; {retrain} with checkpoints saved "
                              f"(the default, not --no-save-checkpoint).") from None
    except Exception as error:  # noqa: BLE001 - any damage: refuse, never guess
        raise CheckpointError(f"{path} is damaged and does not load ({_first_line(error)}); "
                              f"{retrain}.") from None
    if not isinstance(saved, dict) or saved.get("format") != FORMAT:
        raise CheckpointError(f"{path} was written by an older version of MoMKE, without the "
                              f"dataset, features and identity needed to check it; {retrain}.")
    missing = [name for name in _FIELDS if name not in saved]
    if missing:
        raise CheckpointError(f"{path} lacks {', '.join(missing)}; it is damaged: {retrain}.")
    if dataset is not None and saved["dataset"] != dataset:
        raise CheckpointError(f"{path} holds weights of {saved['dataset']}, not of {dataset}; "
                              f"evaluate it with {saved['dataset']} data.")
    try:
        config = ModelConfig(**{**saved["model_config"],
                                "input_dims": tuple(saved["model_config"]["input_dims"])})
        model = MoMKE(config)
        model.load_state_dict(saved["model_state"])
    except (TypeError, ValueError, RuntimeError, KeyError) as error:
        raise CheckpointError(f"{path}: its tensors do not match its model config "
                              f"({_first_line(error)}); the file is damaged: {retrain}.") from None
    bad = next((name for name, value in saved["model_state"].items()
                if value.is_floating_point() and not bool(torch.isfinite(value).all())), None)
    if bad is not None:
        raise CheckpointError(f"{path}: weight {bad} holds NaN or infinite values; {retrain}.")
    if tuple(saved["dims"][m] for m in MODALITIES) != config.input_dims:
        raise CheckpointError(f"{path}: its feature dimensions {saved['dims']} disagree with its "
                              f"model config {config.input_dims}; the file is damaged: {retrain}.")
    fields = {name: saved[name] for name in _FIELDS if name != "model_state"}
    return Checkpoint(Path(path), model.to(device).eval(), fields)


def check_data(checkpoint: Checkpoint, dataset: str, features: dict[str, str],
               dims: dict[str, int], where: str) -> None:
    """Refuse data (`where`: its folder) whose dataset, feature folders or dimensions are not
    the checkpoint's, in one sentence."""
    fields = checkpoint.fields
    if dataset != fields["dataset"]:
        raise CheckpointError(f"{where} holds {dataset} data, but {checkpoint.path} is a "
                              f"{fields['dataset']} model.")
    for m in MODALITIES:
        if m in features and features[m] != fields["features"][m]:
            raise CheckpointError(
                f"{where}: feature folder {features[m]} is not {fields['features'][m]}, which "
                f"{checkpoint.path} was trained on; pass --{_flag(m)}-feature "
                f"{fields['features'][m]} or point --data-root at data that has it.")
        if m in dims and dims[m] != fields["dims"][m]:
            raise CheckpointError(
                f"{where}: {features.get(m, m)} features are {dims[m]}-d, but {checkpoint.path} "
                f"was trained on {fields['dims'][m]}-d ones; use features extracted the same way.")


def _first_line(error: BaseException) -> str:
    """The informative line of an error: torch's state-dict errors open with a header line."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    detail = next((line for line in lines if not line.endswith(":")), lines[0] if lines else "")
    return (detail or type(error).__name__)[:160]


def _flag(m: str) -> str:
    return {"a": "audio", "t": "text", "v": "video"}[m]
