"""--amp (bfloat16 autocast) on the CPU and --compile: what stays float32, how close bfloat16 is,
what a CPU without bfloat16 records, and that compiling changes no parameter name."""
from __future__ import annotations

import json

import pytest
import torch

import MoMKE.runtime as runtime
from MoMKE.config import AMP_CHUNK_UTTERANCES, CHUNK_UTTERANCES, TrainConfig
from MoMKE.layout import TokenLayout
from MoMKE.model import MODALITIES, ModelConfig, MoMKE
from MoMKE.runtime import autocast, compile_experts
from MoMKE.train import main
from tests.conftest import tiny_config

CPU = torch.device("cpu")
bf16_cpu = pytest.mark.skipif(not runtime.cpu_has_bf16(), reason="this CPU has no bfloat16")


def _batch(seed: int = 0):
    torch.manual_seed(seed)
    features = {m: torch.randn(3, 9, d) for m, d in zip(MODALITIES, (6, 7, 8))}
    padding = torch.arange(9)[None, :] >= torch.tensor([9, 4, 6])[:, None]
    available = torch.rand(3, 9, 3) < 0.7
    available[..., 0] |= ~available.any(-1)
    return features, available, padding


def _model() -> MoMKE:
    torch.manual_seed(0)
    return MoMKE(ModelConfig(input_dims=(6, 7, 8), num_outputs=4, hidden=32, depth=2,
                             drop_rate=0.0))


@bf16_cpu
@pytest.mark.parametrize("stage", [1, 2])
def test_cpu_autocast_runs_matrix_products_in_bf16_and_stays_close_to_fp32(stage):
    model = _model().eval()
    features, available, padding = _batch()
    with torch.inference_mode():
        fp32 = model(features, TokenLayout.from_masks(available, padding), stage)
        with autocast(CPU, True):
            bf16 = model(features, TokenLayout.from_masks(available, padding), stage)
    if stage == 1:
        for m in fp32.unimodal:
            assert bf16.unimodal[m].dtype == torch.bfloat16
            torch.testing.assert_close(bf16.unimodal[m].float(), fp32.unimodal[m],
                                       atol=5e-2, rtol=5e-2)
    else:
        assert bf16.fused.dtype == torch.bfloat16
        torch.testing.assert_close(bf16.fused.float(), fp32.fused, atol=5e-2, rtol=5e-2)
        for m, weights in bf16.router_weights.items():  # the softmaxes run in float32
            assert weights.dtype == torch.float32
            torch.testing.assert_close(weights, fp32.router_weights[m], atol=2e-2, rtol=2e-2)


@bf16_cpu
def test_cpu_autocast_keeps_weights_and_their_gradients_in_fp32():
    model = _model().train()
    features, available, padding = _batch()
    with autocast(CPU, True):
        output = model(features, TokenLayout.from_masks(available, padding), 2)
    output.fused.float().square().mean().backward()
    for name, parameter in model.named_parameters():
        assert parameter.dtype == torch.float32, name
        if parameter.grad is not None:
            assert parameter.grad.dtype == torch.float32 and parameter.grad.isfinite().all(), name


def test_a_cpu_without_bf16_runs_and_records_fp32(tiny_root, tmp_path, monkeypatch):
    monkeypatch.setattr(runtime, "cpu_has_bf16", lambda: False)
    assert isinstance(autocast(CPU, True), type(autocast(CPU, False)))  # no autocast at all
    assert main(["--dataset", "CMUMOSI", "--data-root", str(tiny_root), "--output-dir",
                 str(tmp_path), "--epochs", "2", "--hidden", "8", "--depth", "1", "--device",
                 "cpu", "--amp"]) == 0
    result = json.loads(next(tmp_path.glob("CMUMOSI/*/result.json")).read_text())
    assert result["config"]["amp"] is False and result["identity"]["config"]["amp"] is False


def test_chunk_default_follows_the_precision_and_an_explicit_value_wins(tiny_root, tmp_path):
    assert tiny_config(tiny_root, tmp_path).chunk_utterances == CHUNK_UTTERANCES
    assert tiny_config(tiny_root, tmp_path, amp=True).chunk_utterances == AMP_CHUNK_UTTERANCES
    assert tiny_config(tiny_root, tmp_path, amp=True, chunk_utterances=64).chunk_utterances == 64
    # 0 is the whole batch at once (a GPU's default); below it is refused
    assert tiny_config(tiny_root, tmp_path, chunk_utterances=0).chunk_utterances == 0
    with pytest.raises(ValueError, match="--chunk-utterances -1"):
        TrainConfig(dataset="CMUMOSI", chunk_utterances=-1).resolved()


def test_compiled_experts_keep_their_names_and_compute_the_same():
    model = _model().eval()
    features, available, padding = _batch()
    names = list(model.state_dict())
    with torch.inference_mode():
        eager = model(features, TokenLayout.from_masks(available, padding), 2).fused
        compile_experts(model)
        compiled = model(features, TokenLayout.from_masks(available, padding), 2).fused
        # another batch shape: dynamic shapes, no error and still the same computation
        other = _batch(seed=1)
        again = model(other[0], TokenLayout.from_masks(*other[1:]), 2).fused
    assert list(model.state_dict()) == names
    torch.testing.assert_close(compiled, eager, atol=1e-4, rtol=1e-4)
    for expert in model.experts.values():
        expert._compiled_call_impl = None  # back to eager for the reference
    torch.testing.assert_close(again, model(other[0], TokenLayout.from_masks(*other[1:]), 2).fused, atol=1e-4, rtol=1e-4)


def test_compiled_training_draws_the_same_dropout_masks_as_eager():
    """Under torch.compile the CPU dropout mask comes from the same generator (an opaque operator
    instead of the compiler's own random stream), so a compiled training pass equals eager."""
    torch.manual_seed(0)
    model = MoMKE(ModelConfig(input_dims=(6, 7, 8), num_outputs=4, hidden=16, depth=1,
                              drop_rate=0.5, bit_dropout=True)).train()
    features, available, padding = _batch()
    layout = TokenLayout.from_masks(available, padding)
    outputs = []
    for compiled in (False, True):
        if compiled:  # aot_eager traces what inductor would compile, without generating C++
            for expert in model.experts.values():
                expert.compile(dynamic=True, backend="aot_eager", fullgraph=True)
        torch.manual_seed(1)
        outputs.append(model(features, layout, 1).unimodal["t"])
    torch.testing.assert_close(outputs[1], outputs[0], atol=1e-5, rtol=1e-5)


def test_a_sweep_with_amp_on_a_cpu_without_bf16_finds_its_own_complete_runs(tiny_root, tmp_path,
                                                                              monkeypatch):
    from MoMKE.experiments import sweep
    monkeypatch.setattr(runtime, "cpu_has_bf16", lambda: False)
    argv = ["--dataset", "CMUMOSI", "--data-root", str(tiny_root), "--output-dir", str(tmp_path),
            "--epochs", "2", "--hidden", "8", "--depth", "1", "--device", "cpu", "--amp",
            "--jobs", "1"]  # in this process, where the CPU is patched to lack bfloat16
    assert sweep.main(argv) == 0
    trained_again = []
    monkeypatch.setattr(sweep.runner, "run", lambda *args: trained_again.append(args))
    assert sweep.main(argv) == 0
    assert trained_again == []  # planned as float32, the folder it wrote: complete before
