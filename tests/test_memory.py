"""Memory before training: the estimate grows linearly past LONG_ROW, and a run that cannot fit
is refused with the estimate and the flags to change, before anything is trained or written."""
from __future__ import annotations

import pytest
import torch

from MoMKE import memory
from MoMKE.config import TrainConfig
from MoMKE.layout import LONG_ROW
from MoMKE.trainer import largest_chunk
from MoMKE.train import main

DIMS = {"a": 64, "t": 64, "v": 64}


def _config(**overrides) -> TrainConfig:
    values = dict(dataset="CMUMOSI", hidden=16, epochs=2, batch_size=4)
    return TrainConfig(**{**values, **overrides}).resolved()


def test_the_estimate_is_linear_past_long_rows_unless_attention_drops():
    config, n = _config(), 2 * LONG_ROW
    one, two, three = (memory.chunk_peak_bytes([k * n], config, DIMS) for k in (1, 2, 3))
    assert three - two == two - one > 0  # linear
    dropping = _config(attn_drop_rate=0.1)
    one, two, three = (memory.chunk_peak_bytes([k * n], dropping, DIMS) for k in (1, 2, 3))
    assert three - two > 1.5 * (two - one)  # the kernel's dropout holds the scores again


def test_a_conversation_longer_than_the_chunk_budget_is_a_chunk_alone():
    assert largest_chunk([30, 6000, 50, 40], batch_size=4, budget=256) == [1]
    assert largest_chunk([30, 100, 50, 40], batch_size=4, budget=256) == [1, 2, 3, 0]
    assert largest_chunk([30, 100, 50, 40], batch_size=4, budget=160) == [1, 2]  # longest first
    assert largest_chunk([30, 100, 50, 40], batch_size=2, budget=256) == [1, 2]


def test_a_long_conversation_is_refused_naming_the_estimate_and_the_flags(monkeypatch):
    monkeypatch.setattr(memory, "free_bytes", lambda device: 2**30)
    with pytest.raises(memory.TooLarge) as refused:
        memory.check_fits(_config(hidden=256), [200_000], DIMS, torch.device("cpu"))
    message = str(refused.value)
    assert "200,000 utterances" in message and "GiB" in message and "1.0 GiB free" in message
    assert "--hidden or --depth" in message and "--chunk-utterances" not in message
    memory.check_fits(_config(), [500], DIMS, torch.device("cpu"))  # this one fits


def test_cuda_free_memory_is_the_devices(monkeypatch):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (123, 456))
    assert memory.free_bytes(torch.device("cuda:0")) == 123
    assert memory.free_bytes(torch.device("cpu")) > 0


def test_a_run_that_cannot_fit_is_refused_before_training(tiny_root, tmp_path, monkeypatch,
                                                           capsys):
    monkeypatch.setattr(memory, "free_bytes", lambda device: 2**20)  # a 1 MiB machine
    code = main(["--dataset", "CMUMOSI", "--data-root", str(tiny_root), "--output-dir",
                 str(tmp_path), "--hidden", "8", "--depth", "1", "--epochs", "2",
                 "--device", "cpu"])
    error = capsys.readouterr().err
    assert code == 1 and error.count("error:") == 1
    assert "needs about" in error and "--chunk-utterances" in error and "--hidden" in error
    assert not list(tmp_path.glob("CMUMOSI/*/result.json"))
    assert not list(tmp_path.glob("CMUMOSI/*/*epochs.jsonl"))  # nothing was trained
