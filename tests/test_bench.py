"""The benchmark's arithmetic: FLOP counts and projected sweep times (its timings are not tests)."""
from __future__ import annotations

import pytest
import torch

from dataloader.datasets import get_spec
from MoMKE.experiments.bench import _cost, at_matmul_peak, measured_epochs, projected_seconds
from MoMKE.experiments.throughput import counted_flops, model_flops
from MoMKE.model import MODALITIES, ModelConfig, MoMKE, TokenLayout
from MoMKE.protocols import CONDITIONS


def test_flops_of_a_tiny_batch_by_hand():
    config = ModelConfig(input_dims=(2, 2, 2), num_outputs=1, hidden=4, depth=1, num_heads=1)
    layout = TokenLayout.from_masks(torch.ones(1, 2, 3, dtype=torch.bool),
                                    torch.zeros(1, 2, dtype=torch.bool))
    projections = 3 * 2 * (2 * 2 * 4)  # three modalities, two tokens, 2 -> 4
    per_stream = 2 * 2 * (3 * 16 + 2 * 16) + 2 * 2 * 4 * 2 ** 2  # linear layers + attention
    heads = 3 * 2 * (2 * 4 * 1)
    assert model_flops(layout, config, 1) == projections + 3 * per_stream + heads
    routers = 3 * 2 * 2 * (16 + 4 * 3)
    mixture = 3 * 2 * 2 * 3 * 4  # sum over three experts of weight x (D,) per token
    fusion = 2 * 2 * 12 * 12 + 2 * 2 * 12 * 1
    assert model_flops(layout, config, 2) == \
        projections + 9 * per_stream + routers + mixture + fusion


@pytest.mark.parametrize("experts", ["all", "self"])
@pytest.mark.parametrize("stage", [1, 2])
def test_hand_count_equals_torch_flop_counter(stage, experts):
    """On a batch whose packed grid has no empty slot (every conversation fills its row), the
    hand count of real-token work is what torch counts for the model's forward pass."""
    torch.manual_seed(0)
    config = ModelConfig(input_dims=(3, 4, 5), num_outputs=2, hidden=8, depth=2, num_heads=2,
                         drop_rate=0.0, experts=experts)
    model = MoMKE(config).eval()
    features = {m: torch.randn(3, 4, d) for m, d in zip(MODALITIES, config.input_dims)}
    available = torch.ones(3, 4, 3, dtype=torch.bool)
    padding = torch.zeros(3, 4, dtype=torch.bool)
    layout = TokenLayout.from_masks(available, padding)
    assert counted_flops(model, features, layout, stage) == \
        model_flops(layout, config, stage)


def test_projection_counts_stage1_once_with_reuse():
    seconds = {"stage1": {"seconds": 1.0}, "stage2": {c: {"seconds": 2.0} for c in CONDITIONS},
               "random": {"0.7": {"stage1": {"seconds": 1.0}, "stage2": {"seconds": 2.0}}},
               "stage_epochs": 10, "epochs": 30, "folds": 5}
    with_reuse = projected_seconds(seconds, reuse=True)
    without = projected_seconds(seconds, reuse=False)
    assert with_reuse["conditions"] == pytest.approx(5 * (10 * 1.0 + 7 * 20 * 2.0))
    assert without["conditions"] - with_reuse["conditions"] == pytest.approx(5 * 6 * 10 * 1.0)
    assert with_reuse["rates"] == pytest.approx(5 * 8 * (10 * 1.0 + 20 * 2.0))


def test_floor_runs_every_measured_epoch_at_the_matmul_throughput():
    cost = lambda flops: {"seconds": 9.0, "flops": flops}  # noqa: E731
    m = {"stage1": cost(2e9), "stage2": {c: cost(4e9) for c in CONDITIONS},
         "random": {"0.7": {"stage1": cost(1e9), "stage2": cost(3e9)}},
         "matmul_gflops": 100.0, "stage_epochs": 10, "epochs": 30, "folds": 1}
    floor = at_matmul_peak(m)
    assert floor["stage1"]["seconds"] == pytest.approx(0.02)
    assert all(v["seconds"] == pytest.approx(0.04) for v in floor["stage2"].values())
    assert floor["random"]["0.7"]["stage2"]["seconds"] == pytest.approx(0.03)
    assert m["stage1"]["seconds"] == 9.0  # the measurement itself is left as it was
    table = projected_seconds(floor, reuse=True)["conditions"]
    assert table == pytest.approx(10 * 0.02 + 7 * 20 * 0.04)


def test_compilation_counts_once_in_every_projection_and_not_in_the_floors():
    cost = lambda seconds: {"seconds": seconds, "flops": 1e9}  # noqa: E731
    m = {"stage1": cost(1.0), "stage2": {c: cost(2.0) for c in CONDITIONS},
         "random": {"0.7": {"stage1": cost(1.0), "stage2": cost(2.0)}},
         "stage_epochs": 10, "epochs": 30, "folds": 5, "matmul_gflops": 100.0,
         "bf16_matmul_gflops": 250.0}
    eager = projected_seconds(m, reuse=True)
    compiled = projected_seconds({**m, "compile_seconds": 40.0}, reuse=True)
    assert all(compiled[k] == pytest.approx(eager[k] + 40.0) for k in eager)
    floor = at_matmul_peak({**m, "compile_seconds": 40.0}, "bf16_matmul_gflops")
    assert floor["compile_seconds"] == 0.0 and floor["stage1"]["seconds"] == pytest.approx(1 / 250)


def test_the_mode_table_has_one_row_per_mode_with_the_official_ratios():
    from MoMKE.experiments.bench import compare
    cost = lambda seconds: {"seconds": seconds, "flops": 1e9}  # noqa: E731
    base = {"dataset": "CMUMOSI", "stage1": cost(0.36), "stage2": {c: cost(0.9) for c in CONDITIONS},
            "random": {"0.7": {"stage1": cost(0.3), "stage2": cost(0.8)}}, "stage_epochs": 150,
            "epochs": 300, "folds": 1, "peak_memory": {"peak_memory_mb": 700.0}}
    lines = compare([{**base, "mode": "fp32"}, {**base, "mode": "amp", "compile_seconds": 30.0}])
    assert len(lines) == 5 and lines[3].startswith("| fp32 |") and "| 30 s |" in lines[4]
    official = get_spec("CMUMOSI").official_seconds
    assert f"x{official.stage1 / 0.36:.1f} / x{official.stage2 / 0.9:.1f}" in lines[3]


def test_a_late_recompilation_lands_in_the_excess_not_in_the_steady_epoch():
    """A compiled run recompiles when a batch first has one packed row, in whatever epoch that
    comes (CMU-MOSI stage 1: epoch 2): the steady epoch is the median of the measured epochs,
    and every epoch's excess over it is compilation."""
    seconds = [31.0, 10.2, 0.30, 0.32, 0.31]  # warm-up, then one late recompilation
    counts = dict.fromkeys(("flops", "utterances", "real", "padded", "slots", "placed"), 10.0)
    cost = _cost([{"seconds": s} for s in seconds], counts)
    assert cost["seconds"] == pytest.approx(0.315)
    assert cost["excess_seconds"] == pytest.approx(30.685 + 9.885 + 0.005, abs=1e-9)
    assert measured_epochs(2, compiled=True) >= 4 and measured_epochs(2, compiled=False) == 2


def test_the_operations_of_a_training_step_are_counted_and_printed(tiny_root, tmp_path):
    """What a GPU step costs in launches: hundreds of ATen operations at the paper's depth."""
    from dataloader.batch import BatchBuilder
    from dataloader.gcnet import load_dataset
    from MoMKE.experiments.bench import summarise
    from MoMKE.experiments.throughput import step_operations
    from MoMKE.protocols import MissingSetting
    from MoMKE.trainer import FoldTrainer
    from tests.conftest import tiny_config
    config = tiny_config(tiny_root, tmp_path, depth=4)
    data, cpu = load_dataset("CMUMOSI", str(tiny_root)), torch.device("cpu")
    count = step_operations(FoldTrainer(config, data, 0, MissingSetting("fixed", condition="atv"),
                                        cpu, BatchBuilder(data, cpu)))
    assert 300 < count < 3000
    cost = lambda seconds: {"seconds": seconds, "flops": 1e9, "utterances": 100,  # noqa: E731
                            "real_tokens": 90, "padded_tokens": 100, "grid_tokens": 90,
                            "grid_slots": 100}
    m = {"dataset": "CMUMOSI", "stage1": cost(0.3), "stage2": {c: cost(0.9) for c in CONDITIONS},
         "random": {"0.7": {"stage1": cost(0.3), "stage2": cost(0.8)}}, "stage_epochs": 150,
         "epochs": 300, "folds": 1, "batch_size": 32, "threads": 1, "device": "cpu",
         "matmul_gflops": 10.0, "peak_memory": {"peak_memory_mb": 700.0, "memory": "x"},
         "step_operations": count}
    assert f"{count} ATen compute operations per stage-2 training step" in \
        next(line for line in summarise(m) if line.startswith("stage 2 epoch"))


def test_flops_from_the_host_counts_equal_the_device_count():
    """The meter counts attention from the layout's host counts, never waiting for a GPU."""
    config = ModelConfig(input_dims=(2, 2, 2), num_outputs=1, hidden=4, depth=1, num_heads=1)
    available = torch.rand(3, 5, 3) < 0.6
    padding = torch.arange(5)[None, :] >= torch.tensor([5, 2, 4])[:, None]
    layout = TokenLayout.from_masks(available, padding)
    counts = (available[..., 0] & ~padding).sum(1).tolist()
    assert layout.segments["a"] == tuple(n for n in counts if n)
    without = TokenLayout(*[getattr(layout, f) for f in (
        "conversations", "length", "observed", "valid", "valid_position", "row_counts", "slots",
        "attend")])
    for stage in (1, 2):
        assert model_flops(layout, config, stage) == model_flops(without, config, stage)
