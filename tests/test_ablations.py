"""Each ablation changes exactly what it claims; the unified model sees every missing pattern."""
from __future__ import annotations

import json

import pytest
import torch

from dataloader.batch import BatchBuilder
from dataloader.gcnet import load_dataset
from MoMKE.experiments.sweep import plan, run_locally
from MoMKE.model import MODALITIES
from MoMKE.protocols import CONDITIONS, RATES, MissingSetting, condition_availability
from MoMKE.results.report import write_report
from MoMKE.trainer import FoldTrainer
from tests.conftest import tiny_config


def _trainer(tiny_root, tmp_path, setting=None, **overrides) -> FoldTrainer:
    config = tiny_config(tiny_root, tmp_path, **overrides)
    data = load_dataset(config.dataset, config.data_root)
    return FoldTrainer(config, data, 0, setting or MissingSetting("fixed", condition="atv"),
                       torch.device("cpu"), BatchBuilder(data, torch.device("cpu")))


def _state(trainer):
    return {k: v.clone() for k, v in trainer.model.state_dict().items()}


def _changed(before, after, prefix):
    return {k for k in before if k.startswith(prefix) and not torch.equal(before[k], after[k])}


def test_no_stage1_trains_the_mixture_from_its_initialisation(tiny_root, tmp_path):
    trainer = _trainer(tiny_root, tmp_path, ablation="no-stage1", epochs=5, stage_epochs=2)
    initial = _state(trainer)
    records, handover, reused = trainer.stage1(lambda record: None)
    assert (records, handover, reused) == ([], None, False)
    assert all(torch.equal(v, trainer.model.state_dict()[k]) for k, v in initial.items())
    records, _ = trainer.stage2([], lambda record: None)
    assert [r["stage"] for r in records] == [2, 2, 2]  # as many stage-2 epochs as MoMKE's


def test_uniform_router_gives_equal_weights_and_learns_no_router(tiny_root, tmp_path):
    trainer = _trainer(tiny_root, tmp_path, ablation="uniform-router", reuse_stage1=False)
    before = _state(trainer)
    record = trainer._epoch(2, 3, lambda r: None, None)
    after = trainer.model.state_dict()
    assert not _changed(before, after, "routers.")
    assert _changed(before, after, "experts.") and _changed(before, after, "fusion.")
    for weights in record["test"]["router"].values():
        assert weights == pytest.approx([1 / 3] * 3, abs=1e-7)


def test_self_experts_use_no_other_expert(tiny_root, tmp_path):
    only_audio = MissingSetting("fixed", condition="a")
    for ablation, touched in (("self-experts", {"a"}), ("none", {"a", "t", "v"})):
        trainer = _trainer(tiny_root, tmp_path, setting=only_audio, ablation=ablation,
                           reuse_stage1=False)
        before = {m: trainer.model.modality_state(m) for m in MODALITIES}
        trainer._train_epoch(stage=2)
        moved = {m for m in MODALITIES
                 if any(not torch.equal(before[m][k], v) for k, v in
                        trainer.model.modality_state(m).items() if k.startswith("experts."))}
        assert moved == touched, ablation


def test_frozen_experts_keep_their_stage1_weights(tiny_root, tmp_path):
    trainer = _trainer(tiny_root, tmp_path, ablation="frozen-experts", reuse_stage1=False)
    trainer.stage1(lambda record: None)
    handed_over = _state(trainer)
    trainer.stage2([], lambda record: None)
    after = trainer.model.state_dict()
    assert not _changed(handed_over, after, "experts.")
    for part in ("projections.", "routers.", "fusion.", "head."):
        assert _changed(handed_over, after, part), part


def test_unified_training_masks_are_whole_conditions_per_conversation():
    setting = MissingSetting("unified", mix="any")
    generator = torch.Generator().manual_seed(0)
    lengths = [3, 5, 2, 4] * 10
    available = setting.training_availability(2, lengths, generator)
    rows, seen, start = [tuple(r.tolist()) for r in available], set(), 0
    for length in lengths:
        assert len(set(rows[start:start + length])) == 1  # one condition per conversation
        seen.add(rows[start])
        start += length
    assert seen == {tuple(condition_availability(c, 1)[0].tolist()) for c in CONDITIONS}
    assert setting.training_availability(1, lengths, generator).all()  # stage 1: complete


def test_unified_model_is_evaluated_on_the_per_condition_runs_masks(tiny_root, tmp_path):
    unified = _trainer(tiny_root, tmp_path, setting=MissingSetting("unified", mix="any"))
    names = [s.name for s in unified.setting.evaluation_settings(2)]
    assert names == [f"fixed-{c}" for c in CONDITIONS] + [f"random-{r:.1f}" for r in RATES]
    per_rate = _trainer(tiny_root, tmp_path, setting=MissingSetting("random", rate=0.3))
    ours = unified.evaluator.batches("test", 2, MissingSetting("random", rate=0.3))
    theirs = per_rate.evaluator.batches("test", 2, per_rate.setting)
    assert all(torch.equal(a.available, b.available) for (a, _), (b, _) in zip(ours, theirs))


def test_sweep_runs_unified_and_ablations_into_one_report(tiny_root, tmp_path):
    config = tiny_config(tiny_root, tmp_path / "runs", test_condition=["a", "atv"], epochs=3,
                         stage_epochs=1)
    runs = plan(config, [3], unified="any", ablations=["uniform-router"])
    summary = run_locally(runs)
    assert len(summary.trained) == 5 and not summary.failed
    results = [json.loads(p.read_text()) for p in (tmp_path / "runs").glob("*/*/result.json")]
    unified = next(r for r in results if r["variant"] == "unified (any)")
    assert len(unified["evaluations"]) == 15 and unified["test_scope"].startswith("mean")
    ablated = [r for r in results if r["variant"] == "uniform-router"]
    assert all(r["stage1_reused"] == [True] for r in ablated)  # MoMKE's stage 1 serves them
    report = write_report([tmp_path / "runs"], tmp_path / "report", plots=True)
    text = (tmp_path / "report" / "CMUMOSI.md").read_text()
    assert "## One model for every missing pattern (unified)" in text
    assert "| uniform-router | 1 |" in text and "## Router weights" in text
    assert "Averages over the fixed conditions a, atv" in text
    assert (tmp_path / "report" / "CMUMOSI_router.png") in report
