"""Two-stage training: what stage 1 updates, and a hand-over that really loads the best experts."""
from __future__ import annotations

import pytest
import torch

from dataloader.batch import BatchBuilder
from dataloader.gcnet import load_dataset
from MoMKE.model import MODALITIES
from MoMKE.protocols import MissingSetting
from MoMKE.trainer import FoldTrainer
from tests.conftest import tiny_config


def _trainer(tiny_root, tmp_path, **overrides) -> FoldTrainer:
    config = tiny_config(tiny_root, tmp_path, reuse_stage1=False, **overrides)
    data = load_dataset(config.dataset, config.data_root)
    return FoldTrainer(config, data, 0, MissingSetting("fixed", condition="atv"),
                       torch.device("cpu"), BatchBuilder(data, torch.device("cpu")))


def test_stage1_updates_only_projections_experts_and_unimodal_heads(tiny_root, tmp_path):
    trainer = _trainer(tiny_root, tmp_path, stage_epochs=1, epochs=2)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer._train_epoch(stage=1)
    after = trainer.model.state_dict()
    for name, value in before.items():
        learns = name.startswith(("projections.", "experts.", "unimodal_heads."))
        assert (not torch.equal(value, after[name])) == learns, name


def test_hand_over_loads_each_modalitys_best_stage1_epoch(tiny_root, tmp_path):
    trainer = _trainer(tiny_root, tmp_path, stage_epochs=5, epochs=6, lr=3e-3)
    snapshots = []  # the weights of every modality after every stage-1 epoch
    records, handover, reused = trainer.stage1(
        lambda record: snapshots.append({m: trainer.model.modality_state(m) for m in MODALITIES}))
    assert not reused and handover["rule"] == "best" and handover["split"] == "val"
    for m in MODALITIES:
        scores = [r["val"][m]["acc2"] for r in records]
        best = scores.index(max(scores)) + 1
        assert handover["epochs"][m] == best
        held = trainer.model.modality_state(m)
        for name, value in snapshots[best - 1][m].items():
            assert torch.equal(held[name], value), (m, name)
    assert len({handover["epochs"][m] for m in MODALITIES}) > 1 or max(
        handover["epochs"].values()) < 5, "the test should exercise a non-last epoch"


def test_hand_over_last_keeps_the_last_weights(tiny_root, tmp_path):
    trainer = _trainer(tiny_root, tmp_path, stage_epochs=3, epochs=4, expert_handover="last")
    last = []
    trainer.stage1(lambda record: last.append(
        {k: v.clone() for k, v in trainer.model.state_dict().items()}))
    for name, value in trainer.model.state_dict().items():
        assert torch.equal(value, last[-1][name]), name


def test_snapshot_is_a_copy_not_a_view(tiny_root, tmp_path):
    trainer = _trainer(tiny_root, tmp_path)
    state = trainer.model.modality_state("t")
    with torch.no_grad():
        for p in trainer.model.parameters():
            p.add_(1.0)
    assert not torch.equal(state["projections.t.weight"],
                           trainer.model.projections["t"].weight)


@pytest.mark.parametrize("stage, setting", [
    (1, MissingSetting("random", rate=0.4)), (2, MissingSetting("fixed", condition="av"))])
def test_chunked_batches_give_the_batch_update(tiny_root, tmp_path, stage, setting):
    states = []
    for chunk in (10_000, 9):  # the whole batch at once, or chunks of at most 9 utterances
        config = tiny_config(tiny_root, tmp_path, drop_rate=0.0, reuse_stage1=False,
                             chunk_utterances=chunk, batch_size=6)
        data = load_dataset(config.dataset, config.data_root)
        trainer = FoldTrainer(config, data, 0, setting, torch.device("cpu"),
                              BatchBuilder(data, torch.device("cpu")))
        metrics = trainer._train_epoch(stage)
        states.append((trainer.model.state_dict(), metrics["loss"]))
    (whole, whole_loss), (chunked, chunked_loss) = states
    assert chunked_loss == pytest.approx(whole_loss, rel=1e-5)
    for name, value in whole.items():
        if name.endswith("attention.qkv.bias"):
            # The key bias adds q . b_k to all scores of a query alike, so its gradient is zero
            # but for rounding, which Adam scales up to steps of size lr: left out.
            D = value.shape[0] // 3
            value, chunked[name] = value[[*range(D), *range(2 * D, 3 * D)]], \
                chunked[name][[*range(D), *range(2 * D, 3 * D)]]
        torch.testing.assert_close(chunked[name], value, atol=2e-6, rtol=1e-5, msg=name)
