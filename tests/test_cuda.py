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


@cuda
@pytest.mark.parametrize("stage", [1, 2])
@pytest.mark.parametrize("dataset,amp", [("CMUMOSI", False), ("CMUMOSI", True),
                                         ("IEMOCAPFour", True)])
def test_a_training_step_on_the_gpu_never_waits_for_it(tiny_root, tmp_path, stage, dataset, amp):
    """Batch assembly (the layout planned on the host, moved through pinned memory), forward,
    loss, backward and the Adam step under sync debug mode "error": any host-device
    synchronisation raises. Regression (CMU-MOSI) and classification (IEMOCAP), fp32 and
    bf16."""
    from dataloader.batch import BatchBuilder
    from dataloader.gcnet import load_dataset
    from MoMKE.protocols import MissingSetting
    from MoMKE.evaluation import Collector
    from MoMKE.runtime import bf16_supported
    from MoMKE.trainer import FoldTrainer
    from tests.conftest import tiny_config
    if amp and not bf16_supported(torch.device("cuda")):
        pytest.skip("this GPU has no bfloat16 arithmetic")
    config = tiny_config(tiny_root, tmp_path, dataset=dataset, device="cuda", amp=amp,
                         reuse_stage1=False)
    data = load_dataset(config.dataset, config.data_root)
    device = torch.device("cuda")
    trainer = FoldTrainer(config, data, 0, MissingSetting("random", rate=0.3), device,
                          BatchBuilder(data, device))
    conversations = trainer.splits["train"][:config.batch_size]
    lengths = trainer.builder.lengths[conversations].tolist()
    available = trainer.setting.training_availability(stage, lengths, trainer.generator)
    counts = {"fused": sum(lengths), "batch": sum(lengths),
              **{m: int(available[:, i].sum()) for i, m in enumerate(MODALITIES)}}
    trainer.model.train()
    for step in range(2):  # the second step runs with every allocation cached
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            trainer.optimizer.zero_grad(set_to_none=True)
            trainer._train_step(*trainer._assemble(conversations, available), stage,
                                Collector(stage), counts)
            trainer.optimizer.step()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    assert all(p.isfinite().all() for p in trainer.model.parameters())


@cuda
def test_several_runs_share_the_gpu(tiny_root, tmp_path):
    from MoMKE.experiments import pool, sweep
    from tests.conftest import tiny_config
    config = tiny_config(tiny_root, tmp_path, device="cuda", test_condition=["a", "atv"])
    summary = pool.run_in_pool(sweep.plan(config, [3]), jobs=2, threads=1)
    assert len(summary.trained) == 2 and not summary.failed
    for folder in tmp_path.glob("CMUMOSI/*/"):
        if (folder / "epochs.jsonl").is_file():
            assert '"memory": "peak_cuda_allocated"' in (folder / "epochs.jsonl").read_text()


@cuda
@pytest.mark.parametrize("device", ["cuda:0", "cuda"])
def test_a_sweep_with_two_pending_runs_on_a_numbered_gpu(tiny_root, tmp_path, device):
    """--jobs auto (the default) probes the GPU's memory in the driver before the workers start:
    with cuda:0 that was the first CUDA call, made before CUDA was initialised."""
    from MoMKE.experiments import sweep
    assert sweep.main(["--dataset", "CMUMOSI", "--data-root", str(tiny_root), "--output-dir",
                       str(tmp_path), "--test-condition", "a,atv", "--epochs", "4",
                       "--stage-epochs", "2", "--hidden", "8", "--depth", "1", "--batch-size",
                       "4", "--device", device]) == 0
    assert len(list(tmp_path.glob("CMUMOSI/*/result.json"))) == 2


def _train_once(tiny_root, output, *extra: str):
    import numpy as np
    assert main(["--dataset", "CMUMOSI", "--data-root", str(tiny_root), "--output-dir",
                 str(output), "--epochs", "4", "--stage-epochs", "2", "--hidden", "16",
                 "--depth", "1", "--batch-size", "4", "--device", "cuda", *extra]) == 0
    with np.load(next(output.glob("CMUMOSI/*/predictions.npz"))) as saved:
        return {name: saved[name] for name in saved.files}


@cuda
def test_two_runs_of_one_seed_on_one_gpu_agree_to_the_bit(tiny_root, tmp_path):
    import numpy as np
    first, second = (_train_once(tiny_root, tmp_path / name) for name in ("one", "two"))
    assert first.keys() == second.keys()
    for name in first:
        np.testing.assert_array_equal(first[name], second[name], err_msg=name)


@cuda
def test_stage1_reused_on_the_gpu_gives_what_retraining_it_gives(tiny_root, tmp_path):
    """The cached stage 1 restores the CUDA random state and the fused Adam state."""
    import numpy as np
    from MoMKE.experiments import sweep
    for name, reuse in (("reused", "--reuse-stage1"), ("retrained", "--no-reuse-stage1")):
        assert sweep.main(["--dataset", "CMUMOSI", "--data-root", str(tiny_root),
                           "--output-dir", str(tmp_path / name), "--test-condition", "atv,a",
                           "--epochs", "4", "--stage-epochs", "2", "--hidden", "16", "--depth",
                           "1", "--batch-size", "4", "--device", "cuda", "--jobs", "1",
                           reuse]) == 0
    import json
    reused = next(folder for folder in (tmp_path / "reused").glob("CMUMOSI/fixed-*/")
                  if json.loads((folder / "result.json").read_text())["stage1_reused"] == [True])
    condition = reused.name.split("_seed")[0]
    retrained = next((tmp_path / "retrained").glob(f"CMUMOSI/{condition}_seed*/"))
    with np.load(reused / "predictions.npz") as one, \
            np.load(retrained / "predictions.npz") as two:
        for name in one.files:
            np.testing.assert_array_equal(one[name], two[name], err_msg=name)


@cuda
def test_compiled_experts_train_two_steps_on_the_gpu(tiny_root, tmp_path):
    from dataloader.batch import BatchBuilder
    from dataloader.gcnet import load_dataset
    from MoMKE.protocols import MissingSetting
    from MoMKE.trainer import FoldTrainer
    from tests.conftest import tiny_config
    config = tiny_config(tiny_root, tmp_path, device="cuda", compile=True)
    data, device = load_dataset(config.dataset, config.data_root), torch.device("cuda")
    trainer = FoldTrainer(config, data, 0, MissingSetting("fixed", condition="atv"), device,
                          BatchBuilder(data, device))
    for _ in range(2):
        trainer.probe_step()
    torch.cuda.synchronize()
    assert all(p.isfinite().all() for p in trainer.model.parameters())
