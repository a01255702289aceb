"""A run folder: its name, its files, and the logger that writes into it.

From: SPEC §7.

    saved/<dataset>/<fixed-atv|random-0.3>_seed<seed>_<config hash>/
        config.yaml        the resolved configuration (loadable with --config)
        run.log            the human log: one line per epoch, with timestamps
        epochs.jsonl       one JSON object per epoch: stage, metrics per split, seconds, memory
        result.json        the final result, written last: its presence marks a complete run
        checkpoint_fold<k>.pt   the selected weights of fold k and the model config

Every file that is written whole is written atomically (temporary file, then rename), so a crash
never leaves a half-written result that looks whole. The data source (real or synthetic) is in
every file.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from MoMKE.config import TrainConfig, config_to_yaml
from MoMKE.protocols import MissingSetting
from MoMKE.selection import json_safe

log = logging.getLogger("MoMKE")

# Settings that do not change what a run computes, left out of its folder name.
_NOT_IN_IDENTITY = ("test_condition", "missing_rate", "seed", "device", "threads", "output_dir",
                    "save_checkpoint", "reuse_stage1", "force", "config")


def experiment_hash(config: TrainConfig, *, ignore: tuple[str, ...] = ()) -> str:
    """Identifies the hyperparameters and data of a run, apart from condition/rate and seed
    (and the fields in `ignore`: the report compares variants under one base experiment)."""
    values = {k: v for k, v in config.to_dict().items()
              if k not in _NOT_IN_IDENTITY and k not in ignore}
    return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:8]


VARIANT_FIELDS = ("ablation", "train_missing")  # what tells MoMKE, its ablations and unified apart


def run_folder(config: TrainConfig, setting: MissingSetting) -> Path:
    return (Path(config.output_dir) / config.dataset
            / f"{setting.name}_seed{config.seed}_{experiment_hash(config)}")


def write_atomic(path: Path, content: str | bytes) -> None:
    temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    temporary.write_bytes(content.encode() if isinstance(content, str) else content)
    os.replace(temporary, path)


def write_json(path: Path, value: Any) -> None:
    write_atomic(path, json.dumps(json_safe(value), indent=2) + "\n")


def read_result(folder: Path) -> dict | None:
    """The result of a complete run folder, or None (absent, partial or unreadable)."""
    try:
        result = json.loads((folder / "result.json").read_text())
    except (OSError, ValueError):
        return None
    return result if result.get("complete") is True else None


class RunFolder:
    """Files of one run; `open` starts it afresh, removing what an interrupted attempt left."""

    def __init__(self, path: Path, data_source: str) -> None:
        self.path = path
        self.data_source = data_source
        self._handler: logging.Handler | None = None

    def open(self, config: TrainConfig, header: str) -> None:
        if self.path.exists():
            shutil.rmtree(self.path)
        self.path.mkdir(parents=True)
        write_atomic(self.path / "config.yaml",
                     f"# MoMKE run configuration; load it again with --config (flags override).\n"
                     f"# data: {header}\n" + config_to_yaml(config))
        (self.path / "epochs.jsonl").touch()
        self._handler = logging.FileHandler(self.path / "run.log")
        self._handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        self._handler.setLevel(logging.DEBUG)
        log.addHandler(self._handler)

    def append_epoch(self, record: dict) -> None:
        with (self.path / "epochs.jsonl").open("a") as handle:
            handle.write(json.dumps(json_safe({"data_source": self.data_source, **record})) + "\n")

    def save_checkpoint(self, fold: int, payload: dict) -> None:
        temporary = self.path / f"checkpoint_fold{fold}.pt.{os.getpid()}.tmp"
        torch.save(payload, temporary)
        os.replace(temporary, self.path / f"checkpoint_fold{fold}.pt")

    def write_result(self, result: dict) -> None:
        write_json(self.path / "result.json", {"data_source": self.data_source, **result,
                                               "complete": True})

    def close(self) -> None:
        if self._handler is not None:
            log.removeHandler(self._handler)
            self._handler.close()
            self._handler = None


class TqdmHandler(logging.Handler):
    """Console log lines that do not break the progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        tqdm.write(self.format(record))


def setup_console_logging(level: int = logging.INFO) -> None:
    if any(isinstance(h, TqdmHandler) for h in log.handlers):
        return
    handler = TqdmHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler.setLevel(level)
    log.addHandler(handler)
    log.setLevel(logging.DEBUG)
    log.propagate = False
