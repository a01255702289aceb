"""Reusing earlier work computes exactly what redoing it computes (docs/runs.md).

A reused stage 1 gives the run it would have trained, for every flag; the code version moves with
what computes numbers and with nothing else; reading the data never blocks on a file that is not
a regular file; conversations that no split uses are said.
"""
from __future__ import annotations

import ast
import contextlib
import dataclasses
import json
import os
import pickle
import shutil
import signal
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import torch

from dataloader import cache, gcnet, source
from dataloader.datasets import DEFAULT_FEATURES, DataError, get_spec
from dataloader.features import _read_array
from dataloader.gcnet import data_fingerprint, load_dataset
from dataloader.labels import load_label_pickle, read_label_file
from MoMKE import runtime
from MoMKE.config import NOT_STAGE1, STAGE1, TrainConfig
from MoMKE.protocols import MissingSetting
from MoMKE.results.collect import collect
from MoMKE.runlog import read_result
from MoMKE.runtime import source_digest
from MoMKE.stage1_cache import group_key
from MoMKE.train import main
from tests.conftest import tiny_config

ATV = MissingSetting("fixed", condition="atv")

TINY = ["--dataset", "CMUMOSI", "--hidden", "8", "--depth", "1", "--batch-size", "4",
        "--device", "cpu", "--seed", "2", "--epochs", "4", "--stage-epochs", "2", "--official"]


def _result(root: Path, output: Path, ablation: str, *extra: str) -> dict:
    """The numbers of one run: its result's test and per-fold blocks, the epoch of its saved
    checkpoint and its kept test predictions."""
    assert main([*TINY, "--data-root", str(root), "--output-dir", str(output),
                 "--ablation", ablation, *extra]) == 0
    found = [(p.parent, json.loads(p.read_text())) for p in output.glob("CMUMOSI/*/result.json")]
    [(folder, result)] = [(f, r) for f, r in found if r["config"]["ablation"] == ablation]
    checkpoint = torch.load(folder / "checkpoint_fold1.pt", weights_only=True)
    with np.load(folder / "predictions.npz") as predictions:
        kept = {name: predictions[name].tolist() for name in predictions.files}
    return {"test": result["test"], "folds": result["folds"], "predictions": kept,
            "checkpoint_epoch": checkpoint["epoch"]}


def test_an_ablation_reusing_momkes_stage1_equals_one_training_its_own(tiny_root, tmp_path):
    shared = tmp_path / "shared"
    _result(tiny_root, shared, "none")  # MoMKE trains stage 1 and caches it
    for ablation in ("uniform-router", "self-experts", "frozen-experts"):
        reused = _result(tiny_root, shared, ablation)
        retrained = _result(tiny_root, tmp_path / ablation, ablation, "--no-reuse-stage1")
        assert reused == retrained, ablation


def test_every_setting_says_whether_it_touches_stage1():
    silent = [f.name for f in dataclasses.fields(TrainConfig)
              if not (f.metadata.get("stage1") in (STAGE1, NOT_STAGE1)
                      or callable(f.metadata.get("stage1")))]
    assert not silent, f"say with _option(STAGE1 | NOT_STAGE1, ...) whether {silent} touch stage 1"


def test_ablations_share_stage1_unless_its_epochs_run_their_fused_head(tiny_root, tmp_path):
    def key(**overrides) -> str | None:
        return group_key(tiny_config(tiny_root, tmp_path, **overrides), ATV)

    momke = key()
    assert key(ablation="uniform-router") == key(ablation="self-experts") == momke
    assert key(ablation="frozen-experts", epochs=9, train_missing="any") == momke
    official = key(select_from="all")
    assert key(select_from="all", ablation="frozen-experts") == official != momke
    assert len({official, key(select_from="all", ablation="uniform-router"),
                key(select_from="all", ablation="self-experts")}) == 3
    assert key(ablation="no-stage1") is None


# ----------------------------------------------------------------------------- the code version

CODE = '''"""A module."""
SCALE = 2.0  # the factor


def score(x):
    """Scaled."""
    return x * SCALE
'''


@pytest.mark.parametrize("edit", [
    lambda code: code.replace("# the factor", "# the factor, explained at length"),
    lambda code: code.replace('"""Scaled."""', '"""Scaled by SCALE, a constant."""'),
    lambda code: code.replace('"""A module."""\n', "# no docstring at all\n"),
    lambda code: code.replace("return x * SCALE", "return (x\n            * SCALE)")])
def test_comments_docstrings_and_layout_leave_the_code_version(edit):
    assert source_digest({"m.py": edit(CODE)}) == source_digest({"m.py": CODE})


@pytest.mark.parametrize("edit", [
    lambda code: code.replace("x * SCALE", "x / SCALE"),
    lambda code: code.replace("2.0", "2.5"),
    lambda code: code.replace("def score(x)", "def score(y)").replace("x *", "y *")])
def test_operators_constants_and_names_change_the_code_version(edit):
    assert source_digest({"m.py": edit(CODE)}) != source_digest({"m.py": CODE})


def test_the_code_version_keeps_only_the_named_definitions_of_a_partial_module():
    keep = {"m.py": ("score",)}
    assert source_digest({"m.py": CODE.replace("2.0", "3.0")}, keep) == \
        source_digest({"m.py": CODE}, keep)
    assert source_digest({"m.py": CODE.replace("x *", "-x *")}, keep) != \
        source_digest({"m.py": CODE}, keep)


def test_every_module_is_known_to_compute_numbers_or_not():
    root = Path(runtime.__file__).resolve().parents[1]
    modules = {str(p.relative_to(root)) for folder in ("MoMKE", "dataloader")
               for p in (root / folder).glob("*.py")}
    assert modules == set(runtime._COMPUTES) | runtime._NOT_COMPUTING
    for name, kept in runtime._COMPUTES.items():  # a renamed definition is not silently dropped
        if kept is not None:
            defined = set().union(*(source._defined_names(statement) for statement in
                                    ast.parse((root / name).read_text()).body))
            assert set(kept) <= defined, name


# ----------------------------------------------------------------------------- reads that block

@pytest.fixture
def mosi(tmp_path, tiny_root):
    """A private copy of the tiny CMU-MOSI set that a test may change."""
    shutil.copytree(tiny_root / "CMUMOSI", tmp_path / "data" / "CMUMOSI",
                    ignore=shutil.ignore_patterns(".cache"))
    return tmp_path / "data"


class Blocked(BaseException):
    """Raised into a read that blocks; no `except OSError` or `except Exception` takes it."""


@contextlib.contextmanager
def _within(seconds: float) -> Iterator[None]:
    """Fail instead of hanging when the block does not end in time (a read blocked on a pipe)."""
    def stop(*_):
        raise Blocked(f"blocked for more than {seconds} s")

    previous = signal.signal(signal.SIGALRM, stop)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _pipe_in_place_of(path: Path) -> Path:
    path.unlink()
    os.mkfifo(path)
    return path


@pytest.mark.parametrize("which", ["feature", "label"])
def test_a_pipe_in_place_of_a_data_file_is_refused_naming_it(mosi, which):
    folder = mosi / "CMUMOSI"
    victim = sorted((folder / "features" / DEFAULT_FEATURES["t"]).glob("*.npy"))[0] \
        if which == "feature" else folder / get_spec("CMUMOSI").label_file
    _pipe_in_place_of(victim)
    with _within(5), pytest.raises(DataError, match="is a named pipe, not a regular file") as error:
        load_dataset("CMUMOSI", mosi)
    assert str(victim) in str(error.value)
    with _within(5), pytest.raises(DataError, match=str(victim)):
        load_label_pickle(victim) if which == "label" else _read_array(victim)


def test_a_pipe_in_place_of_the_feature_cache_is_replaced(mosi, caplog, monkeypatch):
    fingerprint = load_dataset("CMUMOSI", mosi).fingerprint
    [cached] = (mosi / "CMUMOSI" / ".cache").glob("*.bin")
    _pipe_in_place_of(cached)
    monkeypatch.setattr(gcnet, "_FINGERPRINTS", {})  # as in a new process: the cache is read
    with _within(5):
        assert data_fingerprint("CMUMOSI", mosi) == fingerprint
        assert load_dataset("CMUMOSI", mosi).fingerprint == fingerprint
    assert "is a named pipe" in caplog.text and cached.is_file()


# ----------------------------------------------------------------------------- unused data

def test_conversations_in_no_split_are_said_in_one_line(mosi, caplog):
    path = mosi / "CMUMOSI" / get_spec("CMUMOSI").label_file
    content = list(pickle.loads(path.read_bytes()))
    train = sorted(content[4])
    dropped = train[:2]
    content[4] = set(train[2:])
    path.write_bytes(pickle.dumps(tuple(content)))
    utterances = sum(len(content[0][vid]) for vid in dropped)
    labels = read_label_file(path, get_spec("CMUMOSI"))  # goes on: it may be a held-out set
    assert len(labels.folds[0].train) == len(train) - 2
    [line] = [r.getMessage() for r in caplog.records if "in no split" in r.getMessage()]
    assert f"2 conversation(s) with {utterances} utterance(s)" in line
    assert str(path) in line and all(repr(vid) in line for vid in dropped)


def test_label_files_that_use_every_conversation_say_nothing(tiny_root, caplog):
    for name in ("CMUMOSI", "IEMOCAPSix"):
        spec = get_spec(name)
        read_label_file(tiny_root / spec.folder / spec.label_file, spec)
    assert "in no split" not in caplog.text


def test_the_feature_cache_is_read_again_when_the_reading_code_changes(mosi, caplog, monkeypatch):
    first = load_dataset("CMUMOSI", mosi)
    assert "loaded from cache" in _loading(mosi, caplog)
    monkeypatch.setattr(cache, "reading_code_version", lambda: "other reading rules")
    assert "read from files" in _loading(mosi, caplog)
    assert load_dataset("CMUMOSI", mosi).fingerprint == first.fingerprint  # the same bytes


def _loading(root: Path, caplog) -> str:
    caplog.clear()
    with caplog.at_level("INFO"):
        load_dataset("CMUMOSI", root)
    return caplog.text


def test_a_pipe_in_place_of_a_result_is_no_result(tmp_path):
    folder = tmp_path / "CMUMOSI" / "fixed-atv_seed1_0123456789ab"
    folder.mkdir(parents=True)
    os.mkfifo(folder / "result.json")
    with _within(5):
        assert read_result(folder) is None  # so the run trains again, and replaces it
        [(where, why)] = collect([tmp_path]).skipped
    assert where == str(folder) and "is a named pipe" in why


def test_a_result_without_the_checkpoints_asked_for_is_trained_again(tiny_root, tmp_path):
    def train(*extra: str) -> list[Path]:
        assert main([*TINY[:-1], "--data-root", str(tiny_root), "--output-dir", str(tmp_path),
                     *extra]) == 0
        return sorted(tmp_path.glob("CMUMOSI/*/checkpoint_fold*.pt"))

    assert train("--no-save-checkpoint") == []
    assert len(train()) == 1  # skipped before: "complete already", and no checkpoint written
    assert len(train()) == 1
