"""`python -m MoMKE.train` end to end: files, determinism, learning, config precedence, refusals."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import yaml

from dataloader.gcnet import load_dataset
from dataloader.synthetic import generate

from MoMKE.config import ConfigError, parse_config
from MoMKE.metrics import regression_metrics
from MoMKE.train import main

TINY = ["--hidden", "8", "--depth", "1", "--batch-size", "4", "--device", "cpu", "--seed", "5"]


def _run(tiny_root, output, *extra):
    assert main(["--dataset", "CMUMOSI", "--data-root", str(tiny_root), "--output-dir",
                 str(output), *TINY, *extra]) == 0
    return [json.loads(p.read_text()) for p in sorted(output.glob("*/*/result.json"))]


def test_run_writes_every_file_and_labels_the_data(tiny_root, tmp_path):
    (result,) = _run(tiny_root, tmp_path, "--epochs", "4", "--test-condition", "at")
    folder = next((tmp_path / "CMUMOSI").iterdir())
    assert {p.name for p in folder.iterdir()} == {
        "config.yaml", "run.log", "epochs.jsonl", "result.json", "checkpoint_fold1.pt",
        "predictions.npz"}
    assert result["data_source"] == "synthetic" and result["complete"] is True
    assert (result["dataset"], result["protocol"], result["condition"]) == ("CMUMOSI", "fixed", "at")
    assert set(result["test"]) == {"best_test", "best_val", "last"}
    assert set(result["test"]["best_test"]) == {"acc2", "f1", "mae", "corr", "acc7",
                                                "mae_nonzero", "corr_nonzero"}
    assert 0 <= result["test"]["last"]["acc2"] <= 1  # fractions, not percent
    epochs = [json.loads(line) for line in (folder / "epochs.jsonl").read_text().splitlines()]
    assert [e["stage"] for e in epochs] == [1, 1, 2, 2]
    assert all(e["data_source"] == "synthetic" and e["peak_memory_mb"] > 0 for e in epochs)
    assert all(set(e) >= {"train", "val", "test", "seconds", "device"} for e in epochs)
    assert "SYNTHETIC" in (folder / "config.yaml").read_text()
    assert "[synthetic]" in (folder / "run.log").read_text()
    checkpoint = torch.load(folder / "checkpoint_fold1.pt", weights_only=True)
    assert checkpoint["rule"] == "best_val" and checkpoint["data_source"] == "synthetic"
    assert checkpoint["model_config"]["hidden"] == 8
    # The kept test predictions reproduce every rule's metrics, in the order of the labels.
    with np.load(folder / "predictions.npz", allow_pickle=False) as kept:
        assert len(kept["fold1__ids"]) == len(kept["fold1__labels"]) == len(
            kept["fold1__conversation"])
        for rule in ("best_test", "best_val", "last"):
            again = regression_metrics(kept[f"fold1__run__{rule}"], kept["fold1__labels"])
            assert again == pytest.approx(result["test"][rule], rel=1e-6, abs=1e-9)


def test_same_seed_twice_gives_identical_metrics(tiny_root, tmp_path):
    args = ["--epochs", "4", "--missing-rate", "0.3", "--no-reuse-stage1"]
    first = _run(tiny_root, tmp_path / "one", *args)[0]
    second = _run(tiny_root, tmp_path / "two", *args)[0]
    assert first["test"] == second["test"]


@pytest.mark.slow
def test_a_run_learns_well_above_chance(tmp_path):
    generate("IEMOCAPSix", tmp_path / "data", seed=2, scale=0.2, dims=(16, 16, 16))
    (result,) = _run(tmp_path / "data", tmp_path / "out", "--dataset", "IEMOCAPFour", "--epochs",
                     "30", "--stage-epochs", "15", "--lr", "3e-3", "--hidden", "16", "--folds",
                     "1", "--drop-rate", "0.1")
    labels = load_dataset("IEMOCAPFour", tmp_path / "data").labels
    majority = np.bincount(labels).max() / labels.size
    assert result["test"]["last"]["wa"] > majority + 0.2


def test_complete_runs_are_skipped_and_force_retrains(tiny_root, tmp_path, capsys):
    _run(tiny_root, tmp_path, "--epochs", "3")
    result = next(tmp_path.glob("CMUMOSI/*/result.json"))
    stamp = result.stat().st_mtime_ns
    capsys.readouterr()
    _run(tiny_root, tmp_path, "--epochs", "3")
    assert result.stat().st_mtime_ns == stamp and "skipping" in capsys.readouterr().out
    _run(tiny_root, tmp_path, "--epochs", "3", "--force")
    assert result.stat().st_mtime_ns != stamp


def test_yaml_config_is_read_and_flags_override_it(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"dataset": "IEMOCAPFour", "lr": 0.002, "hidden": 64,
                                    "test-condition": "a,tv"}))
    config = parse_config(["--config", str(path), "--hidden", "32"])
    assert (config.dataset, config.lr, config.hidden) == ("IEMOCAPFour", 0.002, 32)
    assert config.test_condition == ["a", "tv"]
    assert (config.batch_size, config.epochs, config.stage_epochs) == (16, 200, 100)  # paper's


@pytest.mark.parametrize("content, message", [
    ({"learning_rate": 1}, "unknown key 'learning_rate'"),
    ({"hidden": "big"}, "hidden = 'big' is not a valid int"),
    ({"epochs": 2.5}, "epochs = 2.5 is not a valid int"),
])
def test_bad_yaml_keys_are_refused(tmp_path, content, message):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"dataset": "CMUMOSI", **content}))
    with pytest.raises(ConfigError, match=message):
        parse_config(["--config", str(path)])


@pytest.mark.parametrize("args, message", [
    (["--test-condition", "ax"], "--test-condition 'ax' is invalid"),
    (["--missing-rate", "0.9"], "--missing-rate 0.9 is outside"),
    (["--epochs", "4", "--stage-epochs", "4"], "--stage-epochs 4 must be in"),
    (["--hidden", "7", "--num-heads", "2"], "divisible"),
    (["--folds", "2"], "--folds"),
    (["--device", "tpu"], "--device"),
    (["--test-condition", ""], "--test-condition lists nothing to run"),
    (["--test-condition", ","], "--test-condition lists nothing to run"),
    (["--missing-rate", ""], "--missing-rate lists nothing to run"),
    (["--test-condition", "", "--missing-rate", ""], "list nothing to run"),
    (["--batch-size", "0"], "--batch-size 0 must be at least 1"),
    (["--lr", "nan"], "--lr nan must be a positive number"),
    (["--lr", "inf"], "--lr inf must be a positive number"),
    (["--l2", "nan"], "--l2 nan must be a non-negative number"),
    (["--mlp-ratio", "0"], "--mlp-ratio 0.0 must be positive"),
    (["--mlp-ratio", "-1"], "--mlp-ratio -1.0 must be positive"),
    (["--seed", "-1"], "--seed -1 is outside"),
    (["--seed", str(2**64)], "is outside"),
])
def test_invalid_values_are_refused_before_any_work(tiny_root, tmp_path, capsys, args, message):
    code = main(["--dataset", "CMUMOSI", "--data-root", str(tiny_root), "--output-dir",
                 str(tmp_path / "out"), *args])
    assert code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_unwritable_output_dir_is_refused(tiny_root, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    code = main(["--dataset", "CMUMOSI", "--data-root", str(tiny_root), "--output-dir",
                 str(blocker / "out")])
    assert code == 2 and "--output-dir" in capsys.readouterr().err


@pytest.mark.parametrize("official", [[], ["--official"]])
def test_stage1_reuse_gives_exactly_the_metrics_of_retraining(tiny_root, tmp_path, official):
    """Also with --official, whose selection pool holds the stage-1 epochs: the cache keeps the
    test predictions they were scored by."""
    args = ["--epochs", "4", "--test-condition", "atv,t", "--drop-rate", "0.3", *official]
    reused = _run(tiny_root, tmp_path / "reuse", *args)
    retrained = _run(tiny_root, tmp_path / "fresh", *args, "--no-reuse-stage1")
    assert [r["stage1_reused"] for r in reused] == [[False], [True]]
    assert [r["test"] for r in reused] == [r["test"] for r in retrained]
    assert [r["folds"][0]["stage"] for r in reused] == [r["folds"][0]["stage"] for r in retrained]
    assert not math.isnan(reused[1]["test"]["last"]["acc2"])
