"""A trained model is a tool: a saved run evaluated under any setting, its own setting reproducing
its result.json to the last digit, and every checkpoint that cannot be used refused by name."""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from dataloader.synthetic import generate
from MoMKE.experiments.evaluate import EVALUATIONS, main as evaluate_main, run_folders
from MoMKE.protocols import CONDITIONS, RATES
from MoMKE.train import main as train_main
from tests.conftest import TINY_DIMS

TINY = ["--epochs", "5", "--stage-epochs", "2", "--hidden", "8", "--depth", "1", "--batch-size",
        "4", "--device", "cpu", "--seed", "7", "--lr", "1e-3"]


@pytest.fixture(scope="module")
def runs(tiny_root, tmp_path_factory) -> Path:
    """CMU-MOSI: condition at and rate 0.3, a unified model; IEMOCAP-6: two folds of tv."""
    out = tmp_path_factory.mktemp("runs")
    common = ["--data-root", str(tiny_root), "--output-dir", str(out), *TINY]
    assert train_main(["--dataset", "CMUMOSI", "--test-condition", "at", "--missing-rate", "0.3",
                       *common]) == 0
    assert train_main(["--dataset", "CMUMOSI", "--train-missing", "any", *common]) == 0
    assert train_main(["--dataset", "IEMOCAPSix", "--test-condition", "tv", "--folds", "1,2",
                       *common]) == 0
    return out


def _run(runs: Path, dataset: str, setting: str) -> Path:
    return next(p for p in run_folders([runs / dataset]) if p.name.startswith(setting + "_"))


def _evaluations(folder: Path) -> dict:
    return json.loads((folder / EVALUATIONS).read_text())["evaluations"]


def _own(folder: Path, setting: str) -> dict:
    return next(e for e in _evaluations(folder).values() if e["setting"] == setting)


@pytest.mark.parametrize("setting", ["fixed-at", "random-0.3"])
def test_a_run_evaluated_on_its_own_setting_reproduces_its_result(runs, setting):
    folder = _run(runs, "CMUMOSI", setting)
    assert evaluate_main([str(folder), "--test-condition", "at", "--missing-rate", "0.3"]) == 0
    result = json.loads((folder / "result.json").read_text())
    entry = _own(folder, setting)
    assert entry["rule"] == "best_val" and entry["note"] == ""
    assert entry["metrics"] == {k: v for k, v in result["test"]["best_val"].items()
                                if k in entry["metrics"]}
    assert set(entry["metrics"]) >= {"acc2", "f1", "mae", "corr", "acc7"}


def test_every_fold_of_iemocap_reproduces_its_last_epoch(runs):
    folder = _run(runs, "IEMOCAPSix", "fixed-tv")
    assert evaluate_main([str(folder), "--test-condition", "tv,a"]) == 0
    result = json.loads((folder / "result.json").read_text())
    entry = _own(folder, "fixed-tv")
    assert entry["rule"] == "last" and [f["fold"] for f in entry["folds"]] == [1, 2]
    for mine, theirs in zip(entry["folds"], result["folds"]):
        assert mine["metrics"] == {k: v for k, v in theirs["test"]["last"].items()
                                   if k in mine["metrics"]}
    assert entry["metrics"] == {k: v for k, v in result["test"]["last"].items()
                                if k in entry["metrics"]}


def test_the_unified_model_reproduces_its_epoch_on_every_setting(runs):
    """One checkpoint (the epoch best on validation averaged over the seven conditions) is
    evaluated on all fifteen settings; the epoch log holds that epoch's numbers for each."""
    folder = _run(runs, "CMUMOSI", "unified-any")
    assert evaluate_main([str(folder)]) == 0
    evaluations = _evaluations(folder)
    assert len(evaluations) == len(CONDITIONS) + len(RATES)
    epoch = next(iter(evaluations.values()))["folds"][0]["epoch"]
    record = next(r for r in map(json.loads, (folder / "epochs.jsonl").read_text().splitlines())
                  if r["epoch"] == epoch)
    for entry in evaluations.values():
        expected = record["test"][entry["setting"]]
        assert entry["metrics"] == {k: v for k, v in expected.items() if k in entry["metrics"]}


def test_an_evaluation_kept_is_reused_and_nothing_else_changes(runs, capsys):
    folder = _run(runs, "CMUMOSI", "fixed-at")
    before = {p.name: p.read_bytes() for p in folder.iterdir() if p.name != EVALUATIONS}
    assert evaluate_main([str(folder), "--test-condition", "v"]) == 0
    kept = (folder / EVALUATIONS).read_bytes()
    capsys.readouterr()
    assert evaluate_main([str(folder), "--test-condition", "v"]) == 0
    printed = capsys.readouterr().out
    assert "(reused)" in printed and "best-on-validation" in printed and "SYNTHETIC" in printed
    assert (folder / EVALUATIONS).read_bytes() == kept
    assert {p.name: p.read_bytes() for p in folder.iterdir() if p.name != EVALUATIONS} == before


def test_a_gpu_checkpoint_is_saved_as_cpu_tensors_with_what_rebuilds_it(runs):
    saved = torch.load(_run(runs, "CMUMOSI", "fixed-at") / "checkpoint_fold1.pt",
                       weights_only=True)
    assert all(t.device.type == "cpu" for t in saved["model_state"].values())
    assert saved["dims"] == dict(zip("atv", TINY_DIMS)) and saved["dataset"] == "CMUMOSI"
    assert {"identity_hash", "code_version", "features", "setting", "seed", "fold"} <= set(saved)


# ----------------------------------------------------------------------------- refusals

def _copy(runs: Path, tmp_path: Path, dataset: str, setting: str) -> Path:
    source = _run(runs, dataset, setting)
    return Path(shutil.copytree(source, tmp_path / source.name))


def _refusal(capsys, argv: list[str]) -> str:
    assert evaluate_main(argv) != 0
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, lines
    return lines[0]


def test_a_damaged_checkpoint_is_refused_by_name(runs, tmp_path, capsys):
    folder = _copy(runs, tmp_path, "CMUMOSI", "fixed-at")
    (folder / "checkpoint_fold1.pt").write_bytes(b"not a checkpoint")
    line = _refusal(capsys, [str(folder), "--test-condition", "a"])
    assert "checkpoint_fold1.pt is damaged" in line and "--force" in line


def test_an_older_checkpoint_is_refused_with_how_to_proceed(runs, tmp_path, capsys):
    folder = _copy(runs, tmp_path, "CMUMOSI", "fixed-at")
    saved = torch.load(folder / "checkpoint_fold1.pt", weights_only=True)
    old = {k: saved[k] for k in ("model_state", "model_config", "epoch", "rule", "dataset")}
    torch.save(old, folder / "checkpoint_fold1.pt")
    line = _refusal(capsys, [str(folder), "--test-condition", "a"])
    assert "older version of MoMKE" in line and "retrain" in line


def test_tensors_that_do_not_match_the_config_are_refused(runs, tmp_path, capsys):
    folder = _copy(runs, tmp_path, "CMUMOSI", "fixed-at")
    saved = torch.load(folder / "checkpoint_fold1.pt", weights_only=True)
    saved["model_config"]["hidden"] = 16
    torch.save(saved, folder / "checkpoint_fold1.pt")
    line = _refusal(capsys, [str(folder), "--test-condition", "a"])
    assert "do not match its model config" in line


def test_a_checkpoint_of_another_dataset_is_refused(runs, tmp_path, capsys):
    folder = _copy(runs, tmp_path, "CMUMOSI", "fixed-at")
    other = _run(runs, "IEMOCAPSix", "fixed-tv") / "checkpoint_fold1.pt"
    shutil.copy(other, folder / "checkpoint_fold1.pt")
    line = _refusal(capsys, [str(folder), "--test-condition", "a"])
    assert "weights of IEMOCAPSix, not of CMUMOSI" in line


def test_a_run_without_checkpoints_says_how_to_retrain(tiny_root, tmp_path, capsys):
    assert train_main(["--dataset", "CMUMOSI", "--data-root", str(tiny_root), "--output-dir",
                       str(tmp_path), "--test-condition", "t", "--no-save-checkpoint",
                       "--epochs", "2", "--stage-epochs", "1", "--hidden", "8", "--depth", "1",
                       "--device", "cpu"]) == 0
    line = _refusal(capsys, [str(tmp_path / "CMUMOSI")])
    assert "--no-save-checkpoint" in line and "--save-checkpoint --force" in line


def test_data_of_other_dimensions_is_refused(runs, tmp_path, capsys):
    other = tmp_path / "other"
    generate("CMUMOSI", other, seed=1, scale=0.06, dims=(12, 16, 20))
    line = _refusal(capsys, [str(_run(runs, "CMUMOSI", "fixed-at")), "--test-condition", "a",
                             "--data-root", str(other)])
    assert "20-d" in line and "16-d" in line


def test_val_on_a_dataset_without_validation_is_refused(runs, capsys):
    line = _refusal(capsys, [str(_run(runs, "IEMOCAPSix", "fixed-tv")), "--split", "val"])
    assert "--split val" in line and "no validation split" in line


def test_another_copy_of_the_data_is_named_beside_each_number(runs, tiny_root, tmp_path, capsys):
    copy = Path(shutil.copytree(tiny_root / "CMUMOSI", tmp_path / "copy" / "CMUMOSI"))
    (copy / "SYNTHETIC.json").unlink()  # the same bytes, now presented as real data
    folder = _copy(runs, tmp_path, "CMUMOSI", "fixed-at")
    assert evaluate_main([str(folder), "--test-condition", "at", "--data-root",
                          str(tmp_path / "copy")]) == 0
    assert "REAL data" in capsys.readouterr().out
    entry = _own(folder, "fixed-at")
    result = json.loads((folder / "result.json").read_text())
    assert entry["data"]["source"] == "real" and entry["data"]["root"] == str(copy)
    assert entry["metrics"]["f1"] == result["test"]["best_val"]["f1"]


# ----------------------------------------------------------------------------- predict

def _manifest_root(tiny_root: Path, tmp_path: Path, modalities: str) -> Path:
    """Features of one's own: a manifest of three test conversations and the feature files of
    `modalities`, no label file."""
    from dataloader.gcnet import load_dataset
    from dataloader.datasets import DEFAULT_FEATURES
    data = load_dataset("CMUMOSI", tiny_root)
    root = tmp_path / "mine"
    lines = ["conversation,utterance"]
    for c in list(data.folds[0].test)[:3]:
        for u in data.utterance_ids[data.offsets[c]:data.offsets[c + 1]]:
            lines.append(f"{data.conversation_ids[c]},{u}")
            for m in modalities:
                folder = root / "features" / DEFAULT_FEATURES[m]
                folder.mkdir(parents=True, exist_ok=True)
                shutil.copy(tiny_root / "CMUMOSI" / "features" / DEFAULT_FEATURES[m] / f"{u}.npy",
                            folder / f"{u}.npy")
    (root / "manifest.csv").write_text("\n".join(lines) + "\n")
    return root


def test_predict_on_features_without_labels(runs, tiny_root, tmp_path, capsys):
    from MoMKE.experiments.predict import main as predict_main
    import csv
    root = _manifest_root(tiny_root, tmp_path, "at")
    out = tmp_path / "predictions.csv"
    assert predict_main([str(_run(runs, "CMUMOSI", "fixed-at")), "--data-root", str(root),
                         "--out", str(out)]) == 0
    assert "no labels" in capsys.readouterr().out
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == len((root / "manifest.csv").read_text().splitlines()) - 1
    assert {r["modalities"] for r in rows} == {"at"} and "label" not in rows[0]
    for row in rows:
        assert row["sign"] == ("positive" if float(row["score"]) > 0 else "negative")
        for m in "at":
            assert sum(float(row[f"router_{m}_to_{e}"]) for e in "atv") == pytest.approx(1, 1e-5)
        assert row["router_v_to_a"] == ""


def test_predict_on_the_test_split_matches_the_evaluation(runs, tmp_path):
    """The labelled test split, predicted under the run's own condition: the scores the
    evaluation scored (the same checkpoint, batches and masks)."""
    from MoMKE.experiments.predict import main as predict_main
    import csv
    from MoMKE.metrics import regression_metrics
    folder = _run(runs, "CMUMOSI", "fixed-at")
    out = tmp_path / "p.csv"
    assert predict_main([str(folder), "--data-root", json.loads(
        (folder / "result.json").read_text())["config"]["data_root"], "--out", str(out),
        "--test-condition", "at"]) == 0
    rows = list(csv.DictReader(out.open()))
    metrics = regression_metrics([float(r["score"]) for r in rows],
                                 [float(r["label"]) for r in rows])
    result = json.loads((folder / "result.json").read_text())
    assert metrics["f1"] == result["test"]["best_val"]["f1"]
    assert metrics["mae"] == pytest.approx(result["test"]["best_val"]["mae"], abs=1e-5)


def test_predict_refuses_what_cannot_be_predicted(runs, tiny_root, tmp_path, capsys):
    from MoMKE.experiments.predict import main as predict_main
    root = _manifest_root(tiny_root, tmp_path, "v")
    folder = str(_run(runs, "CMUMOSI", "fixed-at"))
    out = str(tmp_path / "p.csv")
    assert predict_main([folder, "--data-root", str(root), "--out", out]) == 2
    assert "trained (stage 2) on at only" in capsys.readouterr().err
    assert predict_main([folder, "--data-root", str(root), "--out", out,
                         "--test-condition", "t"]) == 2
    assert "has no deberta-large-4-UTT features" in capsys.readouterr().err
    other = tmp_path / "other"
    generate("CMUMOSI", other, seed=1, scale=0.06, dims=(12, 16, 20))
    assert predict_main([folder, "--data-root", str(other), "--out", out]) == 2
    assert "20-d" in capsys.readouterr().err
    assert not Path(out).exists()


# ----------------------------------------------------------------------------- the matrix

def test_a_sweep_with_evaluate_all_reports_the_robustness_matrices(tiny_root, tmp_path, capsys):
    from MoMKE.experiments.sweep import main as sweep_main
    out = tmp_path / "saved"
    assert sweep_main(["--dataset", "CMUMOSI", "--data-root", str(tiny_root), "--output-dir",
                       str(out), "--seeds", "7,8", "--jobs", "1", "--test-condition", "a,atv",
                       "--missing-rate", "0.5", "--unified", "any", "--evaluate-all",
                       "--report", "--epochs", "3", "--stage-epochs", "1", "--hidden", "8",
                       "--depth", "1", "--batch-size", "8", "--device", "cpu"]) == 0
    report = (out / "CMUMOSI" / "report")
    text = (report / "CMUMOSI.md").read_text()
    assert "## Robustness" in text and "best_val" in text and "SYNTHETIC" in text
    conditions = text.split("Evaluated on the conditions")[1].split("###")[0]
    rates = text.split("Evaluated on the rates")[1].split("##")[0]
    atv = next(line for line in conditions.splitlines() if line.startswith("| atv |"))
    assert atv.count("**") == 2  # its own setting, marked
    assert "| unified (any) |" in conditions and "| rate 0.5 |" in rates
    cells = list(csv.DictReader((report / "CMUMOSI_robustness.csv").open()))
    assert len(cells) == 4 * 15 and {c["seeds"] for c in cells} == {"2"}
    own = next(c for c in cells if c["trained_on"] == c["evaluated_on"] == "fixed-atv")
    results = [json.loads(p.read_text()) for p in out.glob("CMUMOSI/fixed-atv_*/result.json")]
    expected = 100 * np.mean([r["test"]["best_val"]["acc2"] for r in results])
    assert float(own["mean"]) == pytest.approx(expected, abs=1e-4)
    assert float(own["low"]) <= float(own["mean"]) <= float(own["high"])
    assert (report / "CMUMOSI_robustness_conditions.png").is_file()
    assert (report / "CMUMOSI_robustness_rates.png").is_file()


def test_predict_gives_iemocap_class_probabilities_on_every_split(runs, tmp_path):
    from MoMKE.experiments.predict import main as predict_main
    folder = _run(runs, "IEMOCAPSix", "fixed-tv")
    out = tmp_path / "p.csv"
    assert predict_main([str(folder), "--data-root", json.loads(
        (folder / "result.json").read_text())["config"]["data_root"], "--out", str(out),
        "--split", "all", "--fold", "2"]) == 0
    rows = list(csv.DictReader(out.open()))
    names = ("hap", "sad", "neu", "ang", "exc", "fru")
    assert {r["split"] for r in rows} == {"train", "test"} and {r["modalities"] for r in rows} \
        == {"atv"}
    for row in rows:
        probabilities = [float(row[f"p_{n}"]) for n in names]
        assert sum(probabilities) == pytest.approx(1, abs=1e-5)
        assert row["predicted"] == names[int(np.argmax(probabilities))]
        assert row["label"] in names
