"""Report tables: rows, seeds as mean ± std, published numbers with their difference, units."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from MoMKE.results.report import main, write_report


def _result(folder, *, dataset, setting, seed, wa, source="synthetic", epochs=200):
    protocol, value = setting.split("-")
    metrics = {"wa": wa, "ua": wa - 0.01, "f1": wa + 0.01}
    result = {
        "dataset": dataset, "data_source": source, "protocol": protocol,
        "condition": value if protocol == "fixed" else None,
        "missing_rate": float(value) if protocol == "random" else None,
        "seed": seed, "setting": setting, "experiment": "e1", "complete": True,
        "test": {"best_test": metrics, "best_val": None, "last": {k: v - 0.02 for k, v in
                                                                  metrics.items()}},
        "folds": [{"fold": k, "test": {"best_test": metrics}} for k in range(1, 6)],
        "config": {"hidden": 256, "depth": 4, "num_heads": 2, "mlp_ratio": 1.0, "drop_rate": 0.5,
                   "attn_drop_rate": 0.0, "lr": 1e-4, "l2": 1e-5, "expert_handover": "best",
                   "batch_size": 16, "epochs": epochs, "stage_epochs": 100},
        "data": {"root": "features/IEMOCAP", "features": {"a": "A", "t": "T", "v": "V"}},
        "source_version": "abc123",
    }
    path = folder / f"{setting}_seed{seed}"
    path.mkdir(parents=True)
    (path / "result.json").write_text(json.dumps(result))


def test_tables_aggregate_seeds_and_compare_with_published(tmp_path):
    for seed, wa in ((1, 0.70), (2, 0.72)):
        _result(tmp_path / "runs", dataset="IEMOCAPFour", setting="fixed-a", seed=seed, wa=wa)
    _result(tmp_path / "runs", dataset="IEMOCAPFour", setting="random-0.3", seed=1, wa=0.6)
    (tmp_path / "runs" / "partial").mkdir()
    (tmp_path / "runs" / "partial" / "result.json").write_text('{"complete": false}')
    written = write_report([tmp_path / "runs"], tmp_path / "out")
    names = {p.name for p in written}
    assert {"IEMOCAPFour.md", "IEMOCAPFour.csv", "IEMOCAPFour_conditions.png"} <= names
    text = (tmp_path / "out" / "IEMOCAPFour.md").read_text()
    assert "SYNTHETIC DATA" in text and "NOT comparable" in text
    # WA of condition a: mean 71.00, sample std 1.41 over 2 seeds; published 69.53 [primd]
    assert "| a | 2 | 71.00 ± 1.41 | 70.00 ± 1.41 | 72.00 ± 1.41 | 69.53 [primd] | 70.21 [primd] " \
           "| +1.47 | -0.21 |" in text
    assert "| 0.3 | 1 | 60.00 | 59.00 | 61.00 | 73.47 [comp] | 72.59 [comp] | -13.47 | -13.59 |" \
           in text
    assert "best-on-validation epoch: n/a (IEMOCAPFour has no validation split)" in text
    assert "Hyperparameters different from the paper's: none." in text
    assert "WA (%)" in text and "abc123" in text and "five leave-one-session-out folds" in text
    rows = list(csv.DictReader((tmp_path / "out" / "IEMOCAPFour.csv").open()))
    cell = next(r for r in rows if r["row"] == "a" and r["rule"] == "last" and r["metric"] == "wa")
    assert (cell["mean"], cell["n"], cell["unit"]) == ("69.0000", "2", "percent")


def test_changed_hyperparameters_are_named(tmp_path):
    _result(tmp_path, dataset="IEMOCAPFour", setting="fixed-atv", seed=1, wa=0.7, epochs=20)
    write_report([tmp_path], tmp_path / "out", plots=False)
    assert "epochs 20 (paper 200)" in (tmp_path / "out" / "IEMOCAPFour.md").read_text()


def test_no_runs_is_an_error(tmp_path, capsys):
    assert main([str(tmp_path)]) == 2
    assert "no complete run" in capsys.readouterr().err


@pytest.mark.parametrize("missing", ["nowhere"])
def test_missing_path_is_an_error(tmp_path, capsys, missing):
    assert main([str(tmp_path / missing)]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_intervals_are_the_conversation_bootstrap_of_the_kept_predictions(tiny_root, tmp_path):
    from MoMKE.experiments.sweep import plan, run_locally
    from MoMKE.results.uncertainty import interval
    from tests.conftest import tiny_config
    config = tiny_config(tiny_root, tmp_path / "runs", test_condition=["atv"], epochs=3,
                         stage_epochs=1)
    summary = run_locally(plan(config, [3], ablations=["uniform-router"]))
    assert len(summary.trained) == 2 and not summary.failed
    write_report([tmp_path / "runs"], tmp_path / "out", plots=False, ci=True, resamples=200)
    text = (tmp_path / "out" / "CMUMOSI.md").read_text()
    assert "95 % percentile bootstrap interval over test conversations" in text
    assert "200 resamples" in text
    # The atv cell's interval is the bootstrap of the run's own predictions, resampled by
    # conversation, converted to points.
    (folder,) = [p.parent for p in (tmp_path / "runs").glob("CMUMOSI/*/result.json")
                 if json.loads(p.read_text())["variant"] == "MoMKE"]
    with np.load(folder / "predictions.npz") as kept:
        expected = interval(kept["fold1__run__best_val"], kept["fold1__labels"],
                            kept["fold1__conversation"], regression=True, resamples=200)
    acc2 = expected["acc2"]
    best_val = text.split("### Test metrics at the best-on-validation epoch")[1]
    assert f"| atv | 1 | {100 * acc2.point:.2f} [{100 * acc2.low:.2f}, {100 * acc2.high:.2f}]" \
        in best_val
    # The ablation comparison is paired and marked when its interval covers zero.
    line = next(line for line in text.splitlines() if line.startswith("| MoMKE − uniform-router"))
    assert line.count("[") == 5
    assert "## Selection optimism" in text
    rows = list(csv.DictReader((tmp_path / "out" / "CMUMOSI.csv").open()))
    cell = next(r for r in rows if r["variant"] == "MoMKE" and r["row"] == "atv"
                and r["rule"] == "best_val" and r["metric"] == "acc2")
    assert (float(cell["ci_low"]), float(cell["ci_high"])) == pytest.approx(
        (100 * acc2.low, 100 * acc2.high), abs=1e-3)


def test_runs_that_differ_only_in_arithmetic_are_compared_with_float32(tmp_path):
    def saved(amp: bool, seed: int, wa: float) -> None:
        folder = tmp_path / ("bf16" if amp else "fp32")
        _result(folder, dataset="IEMOCAPFour", setting="fixed-atv", seed=seed, wa=wa)
        path = folder / f"fixed-atv_seed{seed}" / "result.json"
        result = json.loads(path.read_text())
        arithmetic = {"amp": amp, "compile": False, "chunk_utterances": 1024 if amp else 256}
        result["config"].update(arithmetic)
        result["identity"] = {"config": {"hidden": 256, "seed": seed, **arithmetic},
                              "setting": "fixed-atv", "data": "d", "code": "c", "torch": "t"}
        result["experiment"] = "bf16" if amp else "fp32"  # two tables, one comparison
        path.write_text(json.dumps(result))

    for seed, (fp32, bf16) in zip((1, 2, 3), ((0.70, 0.705), (0.72, 0.73), (0.71, 0.69))):
        saved(False, seed, fp32)
        saved(True, seed, bf16)
    written = write_report([tmp_path], tmp_path / "out", plots=False)
    assert sorted(p.name for p in written if p.suffix == ".md") == [
        "IEMOCAPFour-arithmetic.md", "IEMOCAPFour-synthetic-bf16.md",
        "IEMOCAPFour-synthetic-fp32.md"]
    text = (tmp_path / "out" / "IEMOCAPFour-arithmetic.md").read_text()
    # WA at the best-on-test epoch, seed by seed: differences +0.5, +1.0, -2.0 points; mean -0.17,
    # sample std 1.607, t(2) = 4.303: half-width 4.303 * 1.607 / sqrt(3) = 3.99
    line = next(line for line in text.splitlines() if "| bf16 − fp32 | best-on-test |" in line)
    assert line.startswith("| atv (n 3) |")
    assert "71.00 → 70.83; -0.17 [-4.16, +3.83] undecided" in line
    assert "SYNTHETIC DATA" in text and "Verdicts over" in text and "moved" not in text
    assert "Arithmetic: bfloat16 autocast (--amp)" in \
        next(p for p in written if p.name.endswith("bf16.md")).read_text()


def test_equivalence_verdicts_follow_the_interval_and_the_margin():
    from MoMKE.results.equivalence import paired, verdict, welch
    assert verdict(-0.4, 0.6, 1.0) == "equivalent"
    assert verdict(0.2, 1.4, 1.0) == "different"  # excludes zero, beyond the margin
    assert verdict(0.2, 0.9, 1.0) == "equivalent"  # a real but small difference
    assert verdict(-0.5, 1.4, 1.0) == "undecided"
    same = paired([1.0, 2.0, 3.0], [1.1, 2.1, 3.1], 1.0)
    assert same.difference == pytest.approx(0.1) and same.low == pytest.approx(0.1)
    assert same.verdict == "equivalent"
    # Welch: equal variances and sizes give the pooled t-interval on 2n - 2 degrees of freedom
    from scipy.stats import ttest_ind
    a, b = [70.0, 71.0, 72.5, 69.0], [71.0, 73.0, 72.0, 74.5]
    comparison = welch(a, b, 1.0)
    assert comparison.difference == pytest.approx(2.0)
    test = ttest_ind(b, a, equal_var=False).confidence_interval(0.95)
    assert (comparison.low, comparison.high) == pytest.approx((test.low, test.high))
