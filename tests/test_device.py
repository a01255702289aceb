"""Where a run executes, held on a CPU: the device resolved once, its hardware in the identity,
GPUs shared out to workers and Ray tasks, bfloat16 and peak memory per GPU (torch.cuda replaced
where a GPU would answer)."""
from __future__ import annotations

import types

import pytest
import torch

from MoMKE import runtime, stage1_cache
from MoMKE.config import ConfigError, TrainConfig
from MoMKE.experiments import official, pool
from MoMKE.experiments.ray_executor import _check_device
from MoMKE.protocols import MissingSetting
from MoMKE.runlog import identity_hash, run_identity
from MoMKE.runner import RunSpec
from MoMKE.trainer import _chunks
from tests.conftest import tiny_config

ATV = MissingSetting("fixed", condition="atv")


@pytest.fixture
def fake_gpus(monkeypatch):
    """Two visible 'H100's whose CUDA calls are recorded instead of made."""
    calls: list[tuple] = []
    current = types.SimpleNamespace(index=0)
    cuda = torch.cuda
    monkeypatch.setattr(cuda, "is_available", lambda: True)
    monkeypatch.setattr(cuda, "device_count", lambda: 2)
    monkeypatch.setattr(cuda, "init", lambda: calls.append(("init",)))
    monkeypatch.setattr(cuda, "current_device", lambda: current.index)

    def set_device(index):
        calls.append(("set_device", index))
        current.index = index
    monkeypatch.setattr(cuda, "set_device", set_device)
    monkeypatch.setattr(cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(cuda, "reset_peak_memory_stats",
                        lambda device=None: calls.append(("reset", device)))
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    return calls


def test_a_numbered_gpu_is_initialised_and_made_current(fake_gpus):
    """Without this, the first CUDA call naming cuda:0 by index (peak-memory statistics) fails
    with 'did you call init?', and cuda:1 would leave a context on GPU 0."""
    assert runtime.resolve_device("cuda:1") == torch.device("cuda", 1)
    assert fake_gpus == [("init",), ("set_device", 1)]
    assert runtime.resolve_device("cuda") == torch.device("cuda", 1)  # the current one, numbered
    assert runtime.resolve_device("auto") == torch.device("cuda", 1)
    with pytest.raises(ValueError, match="only 2 GPU"):
        runtime.resolve_device("cuda:2")


def test_the_identity_names_the_hardware_not_the_flag(fake_gpus, monkeypatch, tmp_path):
    config = TrainConfig(dataset="CMUMOSI", output_dir=str(tmp_path)).resolved()
    on_gpu = identity_hash(run_identity(config, ATV, "data", torch.device("cuda", 0)))
    assert run_identity(config, ATV, "data", torch.device("cuda", 1))["hardware"] == {
        "device": "cuda", "gpu": "NVIDIA H100 80GB HBM3", "cuda": "12.8"}
    # the GPU's index is not the experiment; its model is
    assert identity_hash(run_identity(config, ATV, "data", torch.device("cuda", 1))) == on_gpu
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100")
    assert identity_hash(run_identity(config, ATV, "data", torch.device("cuda", 0))) != on_gpu
    on_cpu = identity_hash(run_identity(config, ATV, "data", torch.device("cpu")))
    assert on_cpu != on_gpu
    # the stage-1 cache key follows the same hardware
    data = types.SimpleNamespace(fingerprint="data")
    assert stage1_cache.key_for(config, data, 0, ATV, torch.device("cpu")) != \
        stage1_cache.key_for(config, data, 0, ATV, torch.device("cuda", 0))


def test_auto_and_cpu_are_one_identity_on_a_cpu(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cpu, auto = (tiny_config(tmp_path, tmp_path / "out", device=d) for d in ("cpu", "auto"))
    assert RunSpec(cpu, ATV, "data").folder == RunSpec(auto, ATV, "data").folder
    assert RunSpec(auto, ATV, "data").device == torch.device("cpu")


def test_ray_refuses_to_hide_the_gpu_the_runs_are_planned_for(fake_gpus):
    with pytest.raises(ConfigError, match="--gpus-per-run 0 Ray hides every GPU"):
        _check_device("auto", 0)
    with pytest.raises(ConfigError, match="--gpus-per-run 0"):
        _check_device("cuda", 0)
    _check_device("cuda", 0.25)  # four runs share a GPU
    _check_device("cpu", 0)


def test_ray_refuses_gpus_for_runs_planned_on_the_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="--gpus-per-run 1 gives each run a GPU"):
        _check_device("auto", 1)
    _check_device("auto", 0)
    _check_device("cuda", 0)  # a GPU only the nodes have: the task says whether it finds one


def test_workers_map_through_the_inherited_visible_devices():
    assert pool.worker_gpus("cuda", None, 2) == ["0", "1"]
    assert pool.worker_gpus("auto", "2,3", 2) == ["2", "3"]
    assert pool.worker_gpus("cuda:1", "2,3", 2) == ["3"]  # the parent's cuda:1, not GPU 1
    mig = "MIG-4f0c7e4b-aaaa,MIG-4f0c7e4b-bbbb"
    assert pool.worker_gpus("cuda:0", mig, 2) == ["MIG-4f0c7e4b-aaaa"]
    assert pool.worker_gpus("cuda", "GPU-1, GPU-2,bad", 2) == ["GPU-1", "GPU-2"]
    config = pool._for_worker(TrainConfig(dataset="CMUMOSI", device="cuda:1"), 2, own_gpu=True)
    assert (config.device, config.threads) == ("cuda", 2)  # the one GPU the worker sees


def test_runs_at_once_are_sized_per_gpu(fake_gpus, monkeypatch):
    monkeypatch.setattr(pool, "available_cores", lambda: 64)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device=None: types.SimpleNamespace(total_memory=16 * 2**30))
    peak = 2**30 - pool.CUDA_CONTEXT_BYTES  # 1 GB with the context: 8 in half of 16 GB
    assert pool.default_jobs("CMUMOSI", torch.device("cuda", 0), cuda_peak_bytes=peak)[0] == 8
    jobs, why = pool.default_jobs("CMUMOSI", torch.device("cuda", 0), cuda_peak_bytes=peak,
                                  gpus=2)
    assert jobs == 16 and "2 x NVIDIA H100" in why


def test_bfloat16_counts_from_ampere_on(fake_gpus, monkeypatch):
    assert runtime.bf16_supported(torch.device("cuda", 0))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 0))
    assert not runtime.bf16_supported(torch.device("cuda", 0))  # a V100 emulates it


def test_peak_memory_starts_afresh_per_fold_on_a_gpu_and_says_what_it_is_on_a_cpu(fake_gpus):
    runtime.reset_peak_memory(torch.device("cpu"))
    assert fake_gpus == []
    runtime.reset_peak_memory(torch.device("cuda", 1))
    assert fake_gpus == [("reset", torch.device("cuda", 1))]
    assert runtime.peak_memory(torch.device("cpu"))["memory"] == "peak_rss_of_process"


def test_the_keep_mask_op_is_a_cpu_kernel_whose_fake_follows_its_input():
    from torch._subclasses.fake_tensor import FakeTensorMode
    import MoMKE.model  # noqa: F401 - registers the op
    assert torch._C._dispatch_has_kernel_for_dispatch_key("momke::keep_mask", "CPU")
    assert not torch._C._dispatch_has_kernel_for_dispatch_key("momke::keep_mask", "CUDA")
    with FakeTensorMode():
        x = torch.empty(3, 5, device="cuda")
        mask = torch.ops.momke.keep_mask(x, 0.1)
    assert mask.device == x.device and mask.dtype == torch.uint8 and mask.shape == (3, 5)


def test_a_gpu_runs_whole_batches_and_the_cpu_keeps_its_chunks(fake_gpus):
    assert TrainConfig(dataset="CMUMOSI", device="cpu").resolved().chunk_utterances == 256
    assert TrainConfig(dataset="CMUMOSI", device="cpu", amp=True).resolved().chunk_utterances \
        == 1024
    assert TrainConfig(dataset="CMUMOSI", device="cuda:1").resolved().chunk_utterances == 0
    assert TrainConfig(dataset="CMUMOSI", device="auto").resolved().chunk_utterances == 0
    assert TrainConfig(dataset="CMUMOSI", device="auto",
                       chunk_utterances=512).resolved().chunk_utterances == 512
    assert _chunks([300, 300, 300], 0) == [(0, 3)]
    assert _chunks([300, 300, 300], 600) == [(0, 2), (2, 3)]
    with pytest.raises(ConfigError, match="--chunk-utterances -1"):
        TrainConfig(dataset="CMUMOSI", chunk_utterances=-1).resolved()


def test_the_official_code_runs_on_our_gpu():
    argv = lambda device: official.command(  # noqa: E731
        dataset="CMUMOSI", condition="atv", seed=1, epochs=2, stage_epochs=1, batch_size=2,
        lr=1e-3, l2=0.0, hidden=8, depth=1, num_heads=1, drop_rate=0.0, attn_drop_rate=0.0,
        feature_names={"a": "a", "t": "t", "v": "v"}, device=device)
    assert argv("cuda:1")[-1] == "--gpu=1" and argv("cuda")[-1] == "--gpu=0"
    assert argv("cpu")[-1] == "--no-cuda"


def test_a_gpu_evaluates_a_split_in_one_pass_and_the_cpu_in_batches(tiny_root, monkeypatch):
    from dataloader.gcnet import load_dataset
    from MoMKE import evaluation
    data = load_dataset("CMUMOSI", str(tiny_root))
    # Batches recorded instead of built: only the grouping of conversations is looked at.
    monkeypatch.setattr(evaluation, "assemble",
                        lambda builder, conversations, available, device: (list(conversations),
                                                                           None))
    evaluator = lambda device: evaluation.Evaluator(  # noqa: E731
        data, 0, None, seed=3, batch_size=1, amp=False, device=device)
    on_cpu = [batch for batch, _ in evaluator(torch.device("cpu")).batches("test", 2, ATV)]
    assert len(on_cpu) > 1 and all(len(batch) <= 1 for batch in on_cpu)
    # Only the device's type is read, so a CUDA device object stands in for a GPU here.
    on_gpu = [batch for batch, _ in evaluator(torch.device("cuda", 0)).batches("test", 2, ATV)]
    assert on_gpu == [sum(on_cpu, [])]
