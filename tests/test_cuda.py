"""The CUDA path: the same code on a GPU, bfloat16 autocast checked against fp32 (skipped without
a GPU; the CPU parity tests cover the computation itself)."""
from __future__ import annotations

import pytest
import torch

from MoMKE.layout import TokenLayout
from MoMKE.model import MODALITIES, ModelConfig, MoMKE
from MoMKE.runtime import autocast
from MoMKE.train import main

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@cuda
def test_gpu_forward_matches_cpu_and_amp_stays_close():
    torch.manual_seed(0)
    model = MoMKE(ModelConfig(input_dims=(6, 7, 8), num_outputs=4, hidden=32, depth=2,
                              drop_rate=0.0)).eval()
    features = {m: torch.randn(3, 9, d) for m, d in zip(MODALITIES, (6, 7, 8))}
    padding = torch.arange(9)[None, :] >= torch.tensor([9, 4, 6])[:, None]
    available = torch.rand(3, 9, 3) < 0.7
    available[..., 0] |= ~available.any(-1)
    layout = TokenLayout.from_masks(available, padding)
    cpu = model(features, layout, 2).fused
    device = torch.device("cuda")
    model = model.to(device)
    on_gpu = {m: x.to(device) for m, x in features.items()}
    with torch.inference_mode():
        fp32 = model(on_gpu, layout.to(device), 2).fused
        with autocast(device, True):
            bf16 = model(on_gpu, layout.to(device), 2).fused
    torch.testing.assert_close(fp32.cpu(), cpu, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(bf16.float().cpu(), cpu, atol=5e-2, rtol=5e-2)


@cuda
def test_training_runs_on_the_gpu(tiny_root, tmp_path):
    assert main(["--dataset", "CMUMOSI", "--data-root", str(tiny_root), "--output-dir",
                 str(tmp_path), "--epochs", "2", "--hidden", "8", "--depth", "1",
                 "--device", "cuda", "--amp"]) == 0
    assert "cuda" in next(tmp_path.glob("CMUMOSI/*/epochs.jsonl")).read_text()
