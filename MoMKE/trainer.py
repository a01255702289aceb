"""Train one fold: stage 1 (unimodal experts), expert hand-over and stage 2 (mixing).

Method: docs/method.md. `FoldTrainer` trains one fold of one run; `MoMKE/runner.py` runs it
for every fold into the run folder. One Adam optimiser serves both stages, as in the reference
code.
Every epoch's metrics are kept for train (measured on the training pass itself: dropout on, the
batch's training masks), val and test; which epoch is reported is decided afterwards
(`MoMKE/selection.py`), never here.
"""
from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
from tqdm import tqdm

from dataloader.batch import Batch, BatchBuilder
from dataloader.gcnet import MultimodalDataset
from MoMKE import stage1_cache
from MoMKE.config import TrainConfig, has_stage1, model_options
from MoMKE.evaluation import Collector, Evaluator, assemble
from MoMKE.layout import TokenLayout
from MoMKE.model import MODALITIES, ModelConfig, MoMKE
from MoMKE.protocols import CONDITIONS, MissingSetting
from MoMKE.runtime import HeapTrimmer, autocast, compile_experts, peak_memory, reset_peak_memory
from MoMKE.selection import VIEW, SelectedPredictions, in_pool, scores_of

log = logging.getLogger("MoMKE")

# The stage-1 metric that picks each expert's best epoch: the official code's unimodal accuracy.
HANDOVER_METRIC = {"regression": "acc2", "classification": "wa"}


# ----------------------------------------------------------------------------- one fold

@dataclass
class FoldOutcome:
    records: list[dict]  # one per epoch, stage 1 then stage 2
    handover: dict | None  # {"rule", "epochs": {m: epoch}, "split"} or None without stage 1
    checkpoint: dict | None  # {"state", "epoch", "rule"}
    seconds: dict[str, float] = field(default_factory=dict)
    stage1_reused: bool = False
    predictions: dict[str, np.ndarray] = field(default_factory=dict)  # see SelectedPredictions


class Diverged(RuntimeError):
    """A loss, an output or a metric became NaN or infinite: the run stops, no result is kept."""


def model_config_for(config: TrainConfig, data: MultimodalDataset) -> ModelConfig:
    return ModelConfig(input_dims=tuple(data.dims[m] for m in MODALITIES),
                       num_outputs=data.spec.num_classes, hidden=config.hidden, depth=config.depth,
                       num_heads=config.num_heads, mlp_ratio=config.mlp_ratio,
                       drop_rate=config.drop_rate, attn_drop_rate=config.attn_drop_rate,
                       bit_dropout=config.bit_dropout, **model_options(config.ablation))


class FoldTrainer:
    def __init__(self, config: TrainConfig, data: MultimodalDataset, fold: int,
                 setting: MissingSetting, device: torch.device, builder: BatchBuilder) -> None:
        self.config, self.data, self.fold, self.setting = config, data, fold, setting
        self.device, self.builder = device, builder
        self.regression = data.spec.is_regression
        self.splits = {"train": list(data.folds[fold].train), "val": list(data.folds[fold].val),
                       "test": list(data.folds[fold].test)}
        self.heap = HeapTrimmer()
        reset_peak_memory(device)  # each fold's epochs log its own peak, not earlier runs'
        fold_seed = config.seed + 1000 * fold
        torch.manual_seed(fold_seed)  # initialisation and dropout
        self.generator = torch.Generator().manual_seed(fold_seed + 1)  # data order, train masks
        self.model = MoMKE(model_config_for(config, data)).to(device)
        self.evaluator = Evaluator(data, fold, builder, seed=config.seed,
                                   batch_size=config.batch_size, amp=config.amp, device=device,
                                   splits=self.splits)
        if config.compile:
            compile_experts(self.model)
        # One Adam for both stages, as in the reference code; the fused kernel is the same update
        # in one pass over the parameters instead of a dozen small operations per tensor.
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=config.lr,
                                          weight_decay=config.l2, fused=True)
        self.selected = SelectedPredictions(data.spec.selection_metric, config.select_from)
        self._best_val, self._checkpoint = -np.inf, None

    # ------------------------------------------------------------------ the two stages

    def run(self, on_epoch: Callable[[dict], None], progress: tqdm | None = None) -> FoldOutcome:
        """Stage 1 (or its cached result), the hand-over, then stage 2."""
        started = time.perf_counter()
        records, handover, reused = self.stage1(on_epoch, progress)
        stage1_seconds = time.perf_counter() - started
        records, checkpoint = self.stage2(records, on_epoch, progress)
        total = time.perf_counter() - started
        return FoldOutcome(records, handover, checkpoint,
                           {"stage1": stage1_seconds, "stage2": total - stage1_seconds}, reused,
                           self.selected.arrays(records))

    def stage1(self, on_epoch: Callable[[dict], None],
               progress: tqdm | None = None) -> tuple[list[dict], dict | None, bool]:
        """Unimodal expert training and the hand-over; returns (records, hand-over, reused)."""
        config = self.config
        if not has_stage1(config):
            return [], None, False
        key = stage1_cache.key_for(config, self.data, self.fold, self.setting, self.device)
        cached = stage1_cache.load(config, key, self.model.state_dict()) \
            if config.reuse_stage1 else None
        if cached is not None:
            self._restore(cached)
            for record in cached["records"]:
                on_epoch({**record, "reused_stage1": True})
            if progress is not None:
                progress.update(config.stage_epochs)
            log.info("stage 1 reused from %s (trained before with identical settings)",
                     stage1_cache.path_for(config, key))
            return cached["records"], cached["handover"], True
        records = [self._epoch(1, epoch, on_epoch, progress)
                   for epoch in range(1, config.stage_epochs + 1)]
        handover = self._hand_over(records)
        if config.reuse_stage1:
            stage1_cache.save(config, key, self._snapshot(records, handover))
        return records, handover, False

    def stage2(self, records: list[dict], on_epoch: Callable[[dict], None],
               progress: tqdm | None = None) -> tuple[list[dict], dict | None]:
        """Experts mixing training; returns all records and the selected checkpoint."""
        config = self.config
        records = list(records)
        if config.ablation == "frozen-experts":
            for parameter in self.model.expert_parameters():
                parameter.requires_grad_(False)  # Adam skips parameters without gradients
        for epoch in range(config.stage_epochs + 1, config.epochs + 1):
            records.append(self._epoch(2, epoch, on_epoch, progress))
        if config.save_checkpoint and not self.splits["val"]:
            self._checkpoint = {"state": self._copy_weights(None), "epoch": config.epochs,
                                "rule": "last"}
        return records, self._checkpoint

    def _keep_checkpoint(self, record: dict) -> None:
        """Copy the weights when `record` is the best-on-validation epoch so far, among the
        epochs the selection rules choose from (`--select-from`)."""
        if not (self.config.save_checkpoint and self.splits["val"]) or not in_pool(
                record, self.config.select_from):
            return
        score = self._validation_score(record)
        if score > self._best_val:
            self._best_val = score
            self._checkpoint = {"state": self._copy_weights(self._checkpoint),
                                "epoch": record["epoch"], "rule": "best_val"}

    def _validation_score(self, record: dict) -> float:
        """The checkpoint criterion: the selection metric on validation (for the unified model,
        its mean over the seven fixed conditions)."""
        metric = self.data.spec.selection_metric
        if self.setting.protocol != "unified":
            return scores_of(record, "val")[metric]
        return float(np.mean([record["val"][f"fixed-{c}"][metric] for c in CONDITIONS]))

    def _copy_weights(self, previous: dict | None) -> dict[str, torch.Tensor]:
        """A real copy of the model's weights, reusing the buffers of the previous copy."""
        if previous is None:
            return copy.deepcopy(self.model.state_dict())
        for name, value in self.model.state_dict().items():
            previous["state"][name].copy_(value)
        return previous["state"]

    def _hand_over(self, records: list[dict]) -> dict:
        """Give each modality's projection and expert the weights of its best stage-1 epoch
        (docs/method.md, The hand-over)."""
        if self.config.expert_handover == "last":
            return {"rule": "last", "epochs": {m: self.config.stage_epochs for m in MODALITIES}}
        for m in MODALITIES:
            self.model.load_modality_state(m, self._best_states[m][1])
        return {"rule": "best", "split": self._handover_split, "metric": self._handover_metric,
                "epochs": {m: self._best_states[m][0] for m in MODALITIES}}

    def _epoch(self, stage: int, epoch: int, on_epoch: Callable[[dict], None],
               progress: tqdm | None) -> dict:
        started = time.perf_counter()
        record = {"fold": self.fold + 1, "stage": stage, "epoch": epoch,
                  "train": self._train_epoch(stage)}
        predictions = {}
        for split in ("val", "test"):
            record[split], predictions[split] = self._evaluate(split, stage) \
                if self.splits[split] else (None, {})
        self.heap.after_epoch()
        record["seconds"] = time.perf_counter() - started
        record.update(peak_memory(self.device))
        on_epoch(record)
        problem = _non_finite(record) or _non_finite(
            {split: {view: float(np.abs(p).sum()) for view, p in by_view.items()}
             for split, by_view in predictions.items()})
        if problem is not None:
            raise Diverged(
                f"{self.data.spec.name} {self.setting.name} fold {self.fold + 1}: training "
                f"diverged at stage {stage} epoch {epoch} ({problem} is not finite); no result "
                f"was written. Try a lower --lr (now {self.config.lr:g}) or check the features "
                f"for extreme values.")
        if stage == 1:
            self._track_best_experts(record, epoch)
        self._keep_checkpoint(record)
        self.selected.add(record, predictions["test"])
        if progress is not None:
            progress.update(1)
        return record

    def _track_best_experts(self, record: dict, epoch: int) -> None:
        if epoch == 1:
            self._best_states: dict[str, tuple[int, dict, float]] = {}
            self._handover_split = "val" if self.splits["val"] else "train"
            self._handover_metric = HANDOVER_METRIC[self.data.spec.task]
        if self.config.expert_handover != "best":
            return
        scores = record[self._handover_split]
        for m in MODALITIES:
            value = scores[m][self._handover_metric]
            if m not in self._best_states or value > self._best_states[m][2]:
                self._best_states[m] = (epoch, self.model.modality_state(m), value)

    # ------------------------------------------------------------------ one pass over a split

    def _train_epoch(self, stage: int) -> dict:
        model, config = self.model, self.config
        model.train()
        order = torch.randperm(len(self.splits["train"]), generator=self.generator).tolist()
        collected = Collector(stage)
        for start in range(0, len(order), config.batch_size):
            conversations = [self.splits["train"][i] for i in order[start:start + config.batch_size]]
            lengths = self.builder.lengths[conversations].tolist()
            available = self.setting.training_availability(stage, lengths, self.generator)
            # The batch loss is a mean over all its tokens (per modality in stage 1): each chunk
            # adds its share, so the summed gradient is the batch's, computed in less memory.
            counts = {"fused": sum(lengths)} if stage == 2 else \
                {m: int(available[:, i].sum()) for i, m in enumerate(MODALITIES)}
            counts["batch"] = sum(lengths)
            self.optimizer.zero_grad(set_to_none=True)
            for first, last in _chunks(lengths, config.chunk_utterances):
                chunk = slice(sum(lengths[:first]), sum(lengths[:last]))
                self._train_step(*self._assemble(conversations[first:last], available[chunk]),
                                 stage, collected, counts)
            self.optimizer.step()
        return collected.metrics(self.regression)

    def _train_step(self, batch: Batch, layout: TokenLayout, stage: int, collected: Collector,
                    counts: dict[str, int]) -> None:
        """Forward and backward of one chunk; on a GPU it never waits for the device."""
        with autocast(self.device, self.config.amp):
            output = self.model(batch.packed_features(), layout, stage)
        collected.add(output, batch, self.regression, counts).backward()

    def probe_step(self) -> None:
        """One stage-2 training step on the largest chunk of the longest training conversations,
        complete data: what a run's peak memory is measured by before several runs share a GPU
        (`MoMKE/experiments/pool.py`)."""
        train, lengths = self.splits["train"], self.builder.lengths
        conversations = [train[i] for i in largest_chunk(
            lengths[train].tolist(), self.config.batch_size, self.config.chunk_utterances)]
        utterances = int(lengths[conversations].sum())
        available = torch.ones(utterances, len(MODALITIES), dtype=torch.bool)
        self.model.train()
        self._train_step(*self._assemble(conversations, available), 2, Collector(2),
                         {"fused": utterances, "batch": utterances})
        self.optimizer.step()

    def _assemble(self, conversations: list[int], available: torch.Tensor
                  ) -> tuple[Batch, TokenLayout]:
        return assemble(self.builder, conversations, available, self.device)

    def _evaluate(self, split: str, stage: int) -> tuple[dict, dict[str, np.ndarray]]:
        """Metrics of `split` under the run's setting (for the unified model in stage 2, a dict
        of such metrics keyed by every condition and rate it is evaluated on), and the fused
        predictions per evaluated setting, in the split's utterance order. With `--select-from
        all`, a stage-1 pass also runs the fused head (untrained) on the stage-1 masks, as the
        official code's test pass does, under the key "fused" (`MoMKE/evaluation.py`)."""
        fused_too = stage == 1 and self.config.select_from == "all"
        results, predictions = {}, {}
        for setting in self.setting.evaluation_settings(stage):
            results[setting.name], found = self.evaluator.evaluate(
                self.model, split, stage, setting, fused_too=fused_too)
            if found is not None:
                predictions[setting.name] = found
        if self.setting.protocol == "unified" and stage == 2:
            return results, predictions
        return next(iter(results.values())), {VIEW: p for p in predictions.values()}

    # ------------------------------------------------------------------ stage-1 reuse

    def _snapshot(self, records: list[dict], handover: dict | None) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "rng_torch": torch.get_rng_state(), "rng_data": self.generator.get_state(),
                "rng_cuda": (torch.cuda.get_rng_state(self.device)
                             if self.device.type == "cuda" else torch.empty(0, dtype=torch.uint8)),
                "records": records, "handover": handover, "selected": self.selected.state(),
                "checkpoint": self._checkpoint, "best_val": float(self._best_val)}

    def _restore(self, cached: dict) -> None:
        self.model.load_state_dict(cached["model"])
        self.optimizer.load_state_dict(cached["optimizer"])
        self.selected.load_state(cached["selected"])
        # With --select-from all a stage-1 epoch may be the best on validation so far.
        self._best_val, self._checkpoint = cached["best_val"], cached["checkpoint"]
        if self._checkpoint is not None:
            self._checkpoint["state"] = {name: value.to(self.device)
                                         for name, value in self._checkpoint["state"].items()}
        torch.set_rng_state(cached["rng_torch"])
        self.generator.set_state(cached["rng_data"])
        if self.device.type == "cuda":
            torch.cuda.set_rng_state(cached["rng_cuda"], self.device)


def _non_finite(value: object, path: str = "") -> str | None:
    """The name of the first NaN or infinite number in a record (e.g. 'test loss'), or None."""
    if isinstance(value, dict):
        for key, item in value.items():
            found = _non_finite(item, f"{path} {key}".strip())
            if found:
                return found
    elif isinstance(value, (list, tuple)):
        for item in value:
            if found := _non_finite(item, path):
                return found
    elif isinstance(value, float) and not math.isfinite(value):
        return path
    return None


def _chunks(lengths: list[int], budget: int) -> list[tuple[int, int]]:
    """Consecutive conversation ranges of at most `budget` utterances (at least one each);
    budget 0: the whole batch at once."""
    if budget == 0:
        return [(0, len(lengths))]
    ranges, first, total = [], 0, 0
    for i, n in enumerate(lengths):
        if i > first and total + n > budget:
            ranges.append((first, i))
            first, total = i, 0
        total += n
    ranges.append((first, len(lengths)))
    return ranges


def largest_chunk(lengths: Sequence[int], batch_size: int, budget: int) -> list[int]:
    """Positions in `lengths` of the largest chunk a run computes at once: the first chunk of a
    batch of the longest conversations (one longer than `budget` is a chunk alone)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])[:batch_size]
    first, last = _chunks([lengths[i] for i in order], budget)[0]
    return order[first:last]
