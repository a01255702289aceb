"""A saved checkpoint rebuilds the model that produced the run's best-on-validation test metrics."""
from __future__ import annotations

import json

import numpy as np
import torch

from dataloader.batch import BatchBuilder
from dataloader.gcnet import load_dataset
from MoMKE.layout import TokenLayout
from MoMKE.metrics import task_metrics
from MoMKE.model import ModelConfig, MoMKE
from MoMKE.protocols import MissingSetting
from MoMKE.train import main


def test_checkpoint_reproduces_the_best_on_validation_test_metrics(tiny_root, tmp_path):
    assert main(["--dataset", "CMUMOSI", "--data-root", str(tiny_root), "--output-dir",
                 str(tmp_path), "--epochs", "6", "--stage-epochs", "2", "--hidden", "8",
                 "--depth", "1", "--batch-size", "4", "--device", "cpu", "--seed", "7",
                 "--test-condition", "at"]) == 0
    folder = next((tmp_path / "CMUMOSI").iterdir())
    result = json.loads((folder / "result.json").read_text())
    saved = torch.load(folder / "checkpoint_fold1.pt", weights_only=True)
    assert saved["rule"] == "best_val"

    model = MoMKE(ModelConfig(**saved["model_config"])).eval()
    model.load_state_dict(saved["model_state"])
    data = load_dataset("CMUMOSI", tiny_root)
    builder = BatchBuilder(data, torch.device("cpu"))
    test = list(data.folds[0].test)
    lengths = data.lengths()[test]
    available = MissingSetting("fixed", condition="at").evaluation_availability(
        2, int(lengths.sum()), seed=7, fold=0, split="test")
    bounds = np.concatenate([[0], np.cumsum(lengths)])
    size = result["config"]["batch_size"]  # the run's batches: the same sums, to the bit
    predictions, targets = [], []
    with torch.inference_mode():
        for start in range(0, len(test), size):
            stop = min(start + size, len(test))
            batch = builder.build(test[start:stop], available[bounds[start]:bounds[stop]])
            output = model(batch.features, TokenLayout.from_masks(batch.available, batch.padding),
                           stage=2)
            predictions.append(output.fused)
            targets.append(batch.targets(output.layout.valid))
    metrics = task_metrics(torch.cat(predictions).numpy(), torch.cat(targets).numpy(),
                           regression=True)
    expected = result["folds"][0]["test"]["best_val"]
    assert set(expected) >= {"acc2", "f1", "mae", "corr", "acc7", "mae_nonzero"}
    assert {name: float(metrics[name]) for name in expected} == expected
