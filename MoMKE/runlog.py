"""A run folder: its identity, its files, the lock of its one writer, and the logger into it.

Files and fields: docs/runs.md.

    saved/<dataset>/<fixed-atv|random-0.14>_seed<seed>_<identity hash>/
        config.yaml        the resolved configuration (loadable with --config)
        run.log            the human log: one line per epoch, with timestamps
        epochs.jsonl       one JSON object per epoch: stage, metrics per split, seconds, memory
        result.json        the final result, written last: its presence marks a complete run
        predictions.npz    the test predictions of the epochs the selection rules chose
        checkpoint_fold<k>.pt   the selected weights of fold k, with what rebuilds and checks them
        evaluations.json   what `python -m MoMKE.evaluate` measured with those weights (optional)

Identity. A run is the resolved configuration, its exact setting (the rate as written, 0.14 is not
0.1), the data fingerprint and the version of the code that computes a result. The folder name
carries a hash of all of it, so two identities never share a folder, and a complete result is
reused only when the identity stored in it matches.

Atomicity. A run trains into `<folder>.attempt/` and replaces `<folder>` only once its result is
written, so an interrupted or failed retrain (`--force` included) leaves the earlier result and
checkpoints as they were; a failed attempt keeps its logs in `.attempt/` until the next one.

One writer. `<folder>.lock` is held (flock) while a run trains; the OS releases it when the process
dies, so a stale lock file never blocks, and a second process stops with a sentence naming the
first.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import io
import json
import logging
import os
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dataloader.atomic import append_text, save_torch_atomic, write_atomic, write_errors_named
from dataloader.files import open_regular
from MoMKE.config import ConfigError, TrainConfig, config_to_yaml
from MoMKE.protocols import CONDITIONS, MissingSetting
from MoMKE.runtime import code_version, hardware
from MoMKE.selection import RULE_LABELS, json_safe

log = logging.getLogger("MoMKE")

# Fields that do not change what a run computes. The data root is replaced by the fingerprint of
# the data found there; the condition and rate by the setting; the --device flag by the hardware
# it resolved to (`runtime.hardware`: auto and cpu on a CPU are one identity). The thread count
# changes float rounding only (docs/runs.md), not the experiment.
_NOT_IN_IDENTITY = ("test_condition", "missing_rate", "data_root", "device", "threads",
                    "output_dir", "save_checkpoint", "reuse_stage1", "force", "config")
VARIANT_FIELDS = ("ablation", "train_missing")  # what tells MoMKE, its ablations and unified apart
EVALUATIONS = "evaluations.json"  # written by MoMKE/experiments/evaluate.py, read by the report


class RunLocked(RuntimeError):
    """Another live process is training the same run folder."""


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def run_identity(config: TrainConfig, setting: MissingSetting, fingerprint: str,
                 device: torch.device) -> dict:
    """Everything a run's numbers depend on: stored in its result, hashed into its folder name.
    `device` is the one the run resolved (`runtime.resolve_device`), not the flag."""
    return {"config": {k: v for k, v in config.to_dict().items() if k not in _NOT_IN_IDENTITY},
            "setting": setting.name, "data": fingerprint, "code": code_version(),
            "torch": torch.__version__, "hardware": hardware(device)}


def identity_hash(identity: dict) -> str:
    return _digest(identity)


def experiment_hash(identity: dict, *, ignore: tuple[str, ...] = ()) -> str:
    """The identity without seed and setting (and the config fields in `ignore`): the runs that
    one table aggregates. The report groups MoMKE and its variants by it with `VARIANT_FIELDS`
    ignored."""
    config = {k: v for k, v in identity["config"].items() if k != "seed" and k not in ignore}
    return _digest({**identity, "config": config, "setting": None})[:10]


def run_folder(config: TrainConfig, setting: MissingSetting, fingerprint: str,
               device: torch.device) -> Path:
    digest = identity_hash(run_identity(config, setting, fingerprint, device))[:12]
    return Path(config.output_dir) / config.dataset / f"{setting.name}_seed{config.seed}_{digest}"


def write_json(path: Path, value: Any) -> None:
    write_atomic(path, json.dumps(json_safe(value), indent=2) + "\n")


def read_result(folder: Path, identity: dict | None = None) -> dict | None:
    """The result of a complete run folder, or None (absent, partial, unreadable, or, when
    `identity` is given, computed for another identity)."""
    try:
        with open_regular(folder / "result.json") as handle:  # a pipe there would block
            result = json.loads(handle.read())
    except (OSError, ValueError):  # NotRegularFile is a ValueError
        return None
    if not isinstance(result, dict) or result.get("complete") is not True:
        return None
    if identity is not None and result.get("identity_hash") != identity_hash(identity):
        return None
    return result


def read_evaluations(folder: Path) -> dict[str, dict]:
    """The evaluations kept in a run folder's evaluations.json (key -> entry); {} when there are
    none or the file does not parse."""
    try:
        with open_regular(folder / EVALUATIONS) as handle:  # a pipe there would block
            stored = json.loads(handle.read())
        entries = stored["evaluations"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    if not isinstance(entries, dict):
        return {}
    return {key: entry for key, entry in entries.items() if isinstance(entry, dict)}


class RunLock:
    """An exclusive flock on `<folder>.lock` for as long as a run trains."""

    def __init__(self, folder: Path) -> None:
        self.path = folder.with_name(folder.name + ".lock")
        self._fd: int | None = None

    def acquire(self) -> None:
        while True:
            with write_errors_named(self.path.parent):
                self.path.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as error:
                os.close(fd)
                if error.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                holder = self.holder()
                locked = RunLocked(f"{self.path.with_suffix('')} is being trained by another "
                                   f"process ({holder}); wait for it to finish or stop it, then "
                                   f"run again.")
                locked.holder = holder  # travels with the error across processes
                raise locked from None
            # The holder before us may have removed the file after we opened it: lock the file
            # that is at the path now, or two processes could each hold a lock.
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        self._fd = fd
        try:
            with write_errors_named(self.path.parent):  # a full disk shows here first
                os.ftruncate(fd, 0)
                os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                         "started": time.strftime("%Y-%m-%d %H:%M:%S")}).encode())
        except BaseException:
            self.release()
            raise

    def release(self) -> None:
        if self._fd is None:
            return
        self.path.unlink(missing_ok=True)
        os.close(self._fd)
        self._fd = None

    def wait(self) -> None:
        """Block until no process holds the lock (taking it only for that moment)."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:  # released (the holder removes the file)
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        finally:
            os.close(fd)  # and with it the lock

    def holder(self) -> str:
        """Who holds the lock, in words."""
        try:
            holder = json.loads(self.path.read_text())
            return f"pid {holder['pid']} on {holder['host']}, started {holder['started']}"
        except (OSError, ValueError, KeyError, TypeError):
            return "its pid is not recorded yet"

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def attempt_log(error: BaseException) -> Path | None:
    """The run log of the attempt that raised `error` (`note_attempt_log`), or None when the
    run failed before its attempt began; it travels with the error across processes."""
    value = getattr(error, "run_log", None)
    return Path(value) if isinstance(value, str) else None


def note_attempt_log(error: BaseException, log_file: Path) -> None:
    with contextlib.suppress(AttributeError, TypeError):  # an exception without a __dict__
        error.run_log = str(log_file)


class RunFolder:
    """The files of one run. `open` starts a fresh attempt in `<path>.attempt/`; `commit`
    replaces `<path>` with it once the result is written. Call both under the run's lock."""

    def __init__(self, path: Path, data_source: str) -> None:
        self.path = path
        self.attempt = path.with_name(path.name + ".attempt")
        self.data_source = data_source
        self._handler: logging.Handler | None = None

    def open(self, config: TrainConfig, header: str) -> None:
        with write_errors_named(self.attempt):
            if self.attempt.exists():
                shutil.rmtree(self.attempt)  # what an interrupted or failed attempt left
            self.attempt.mkdir(parents=True)
            write_atomic(self.attempt / "config.yaml",
                         f"# MoMKE run configuration; load it again with --config (flags "
                         f"override).\n# data: {header}\n" + config_to_yaml(config))
            (self.attempt / "epochs.jsonl").touch()
        self._handler = _RunLogHandler(self.attempt / "run.log")
        self._handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        self._handler.setLevel(logging.DEBUG)
        log.addHandler(self._handler)

    @property
    def log_file(self) -> Path:
        """The run log of this attempt while it trains or after it failed, else the result's."""
        return self.attempt / "run.log" if self.attempt.exists() else self.path / "run.log"

    def append_epoch(self, record: dict) -> None:
        append_text(self.attempt / "epochs.jsonl",
                    json.dumps(json_safe({"data_source": self.data_source, **record})) + "\n")

    def save_checkpoint(self, fold: int, payload: dict) -> None:
        save_torch_atomic(self.attempt / f"checkpoint_fold{fold}.pt", payload)

    def save_predictions(self, arrays: dict[str, Any]) -> None:
        """The test predictions of the selected epochs (read by `MoMKE/results/uncertainty.py`)."""
        buffer = io.BytesIO()
        np.savez_compressed(buffer, **arrays)
        write_atomic(self.attempt / "predictions.npz", buffer.getbuffer())

    def write_result(self, result: dict) -> None:
        write_json(self.attempt / "result.json", {"data_source": self.data_source, **result,
                                                  "complete": True})

    def commit(self) -> None:
        """Put the finished attempt in place of the earlier folder (whose files stay intact up
        to this point)."""
        self.close()
        previous = self.path.with_name(self.path.name + f".replaced-{os.getpid()}")
        if self.path.exists():
            os.replace(self.path, previous)
        os.replace(self.attempt, self.path)
        if previous.exists():
            shutil.rmtree(previous)

    def close(self) -> None:
        if self._handler is not None:
            log.removeHandler(self._handler)
            self._handler.close()
            self._handler = None


class _RunLogHandler(logging.Handler):
    """run.log, one append per line (`append_text`): a full disk stops the run with `NoSpace`,
    where a FileHandler would print a logging traceback for every line and go on."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = path

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record) + "\n"
        except Exception:  # noqa: BLE001 - a bad log call is logging's to report, not ours
            self.handleError(record)
            return
        append_text(self.path, line)


def epoch_line(record: dict, metric: str, data_source: str) -> str:
    """The console and run.log line of one epoch: its metric per split, seconds, memory."""
    parts = [f"[{data_source}] fold {record['fold']} stage {record['stage']} "
             f"epoch {record['epoch']:3d}"]
    for split in ("train", "val", "test"):
        scores = record.get(split)
        if scores is None:
            continue
        if record["stage"] == 1:
            values = " ".join(f"{m}:{scores[m][metric]:.3f}" for m in "atv" if m in scores)
            parts.append(f"{split} {metric} {values} loss {scores['loss']:.3f}")
        elif "loss" not in scores:  # unified model: one evaluation per condition and rate
            mean = np.mean([scores[f"fixed-{c}"][metric] for c in CONDITIONS])
            parts.append(f"{split} {metric} {mean:.4f} (mean of the 7 conditions)")
        else:
            parts.append(f"{split} {metric} {scores[metric]:.4f} loss {scores['loss']:.3f}")
    suffix = " (stage 1 reused)" if record.get("reused_stage1") else \
        f" {record['seconds']:.2f}s {record['peak_memory_mb']:.0f}MB"
    return " | ".join(parts) + suffix


def log_result(result: dict, metrics: tuple[str, ...], data_source: str) -> None:
    """The final lines of a run: its test metrics under each selection rule."""
    scope = "mean over folds, " if len(result["folds"]) > 1 else ""
    if "test_scope" in result:
        scope += result["test_scope"] + ", "
    log.info("result %s %s seed %d [%s data, test split, %svalues as fractions]:",
             result["dataset"], result["setting"], result["seed"], data_source, scope)
    for rule, label in RULE_LABELS.items():
        scores = result["test"][rule]
        text = "n/a (no validation split)" if scores is None else "  ".join(
            f"{k} {scores[k]:.4f}" for k in metrics)
        log.info("  %-38s %s", label, text)


def check_output_dir(output_dir: str, dataset: str, pending: int | None = None) -> None:
    """Refuse before any training when results could not be written below `output_dir`.
    Reading is enough to skip a complete run, so where runs of `dataset` may lie already, a
    folder is refused only once the runs left to train (`pending`) are known, and some are."""
    target = Path(output_dir)
    if pending == 0 or (pending is None and (target / dataset).is_dir()):
        return
    if target.is_symlink() and not target.exists():
        raise ConfigError(f"--output-dir {target} is a symbolic link to {os.readlink(target)}, "
                          f"which does not exist; create that folder or choose another.")
    probe = target
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        left = "" if pending is None else f" ({pending} run(s) left to train)"
        raise ConfigError(f"--output-dir {target} is not a writable folder (checked {probe})"
                          f"{left}; choose a folder you can write to.")


def setup_console_logging(level: int = logging.INFO) -> None:
    """The MoMKE logger's console lines on stdout at `level` (the run folder's file handler
    takes everything). While a progress bar is shown, `tqdm.contrib.logging.logging_redirect_tqdm`
    sends them through `tqdm.write`, so they do not break the bar."""
    handler = next((h for h in log.handlers if h.get_name() == "console"), None)
    if handler is None:
        handler = logging.StreamHandler(sys.stdout)
        handler.set_name("console")
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
    # The current stdout, which a caller may have replaced (setStream would flush the old one,
    # which may be closed by now).
    handler.stream = sys.stdout
    handler.setLevel(level)
    log.setLevel(logging.DEBUG)
    log.propagate = False
