"""Train one fold: stage 1 (unimodal experts), expert hand-over and stage 2 (mixing).

From: SPEC §4.3-4.6, §5-7. `FoldTrainer` trains one fold of one run; `MoMKE/runner.py` runs it
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
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from dataloader.batch import Batch, BatchBuilder
from dataloader.gcnet import MultimodalDataset
from MoMKE import stage1_cache
from MoMKE.config import TrainConfig, has_stage1, model_options
from MoMKE.layout import TokenLayout
from MoMKE.metrics import task_metrics
from MoMKE.model import MODALITIES, PACKING, ModelConfig, MoMKE
from MoMKE.protocols import CONDITIONS, MissingSetting
from MoMKE.runtime import HeapTrimmer, autocast, compile_experts, peak_memory
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
        self._eval_batches: dict[tuple[str, str, int], list[tuple[Batch, TokenLayout]]] = {}
        self.heap = HeapTrimmer()
        fold_seed = config.seed + 1000 * fold
        torch.manual_seed(fold_seed)  # initialisation and dropout
        self.generator = torch.Generator().manual_seed(fold_seed + 1)  # data order, train masks
        self.model = MoMKE(model_config_for(config, data)).to(device)
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
        """Give each modality's projection and expert the weights of its best stage-1 epoch."""
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
        collected = _Collector(stage)
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
                rows = slice(sum(lengths[:first]), sum(lengths[:last]))
                self._train_step(*self._assemble(conversations[first:last], available[rows]),
                                 stage, collected, counts)
            self.optimizer.step()
        return collected.metrics(self.regression)

    def _train_step(self, batch: Batch, layout: TokenLayout, stage: int, collected: _Collector,
                    counts: dict[str, int]) -> None:
        """Forward and backward of one chunk; on a GPU it never waits for the device."""
        with autocast(self.device, self.config.amp):
            output = self.model(batch.packed_features(), layout, stage)
        collected.add(output, batch, self.regression, counts).backward()

    def probe_step(self) -> None:
        """One stage-2 training step on the largest chunk of the longest training conversations,
        complete data: what a run's peak memory is measured by before several runs share a GPU
        (`MoMKE/experiments/pool.py`)."""
        lengths = self.builder.lengths
        conversations = sorted(self.splits["train"], key=lambda c: -int(lengths[c]))
        conversations = conversations[:self.config.batch_size]
        first, last = _chunks(lengths[conversations].tolist(), self.config.chunk_utterances)[0]
        conversations = conversations[first:last]  # the largest chunk a run computes at once
        utterances = int(lengths[conversations].sum())
        available = torch.ones(utterances, len(MODALITIES), dtype=torch.bool)
        self.model.train()
        self._train_step(*self._assemble(conversations, available), 2, _Collector(2),
                         {"fused": utterances, "batch": utterances})
        self.optimizer.step()

    def _assemble(self, conversations: list[int], available: torch.Tensor
                  ) -> tuple[Batch, TokenLayout]:
        """The batch of `conversations` with its token layout, planned on the host and moved to
        the device with the batch (MoMKE/layout.py)."""
        batch = self.builder.build(conversations, available)
        layout = TokenLayout.from_masks(batch.available, batch.padding,
                                        PACKING.get(self.device.type, "shared"))
        return batch, layout.to(self.device)

    @torch.inference_mode()
    def _evaluate(self, split: str, stage: int) -> tuple[dict, dict[str, np.ndarray]]:
        """Metrics of `split` under the run's setting (for the unified model in stage 2, a dict
        of such metrics keyed by every condition and rate it is evaluated on), and the fused
        predictions per evaluated setting, in the split's utterance order. With `--select-from
        all`, a stage-1 pass also runs the fused head (untrained) on the stage-1 masks, as the
        official code's test pass does, under the key "fused"."""
        self.model.eval()
        results, predictions = {}, {}
        fused_too = stage == 1 and self.config.select_from == "all"
        for setting in self.setting.evaluation_settings(stage):
            collected = _Collector(stage)
            fused = _Collector(2) if fused_too else None
            for batch, layout in self._evaluation_batches(split, stage, setting):
                with autocast(self.device, self.config.amp):
                    output = self.model(batch.packed_features(), layout, stage)
                    collected.add(output, batch, self.regression)
                    if fused is not None:
                        fused.add(self.model(batch.packed_features(), layout, 2), batch,
                                  self.regression)
            results[setting.name] = collected.metrics(self.regression)
            if fused is not None:
                results[setting.name]["fused"] = fused.metrics(self.regression)
            source = fused if fused is not None else collected if stage == 2 else None
            if source is not None:
                predictions[setting.name] = source.predictions(self.regression)
        if self.setting.protocol == "unified" and stage == 2:
            return results, predictions
        return next(iter(results.values())), {VIEW: p for p in predictions.values()}

    def _evaluation_batches(self, split: str, stage: int, setting: MissingSetting
                            ) -> list[tuple[Batch, TokenLayout]]:
        """Built once per split, setting and stage: evaluation masks stay fixed across epochs."""
        kind = stage if setting.protocol == "fixed" else 0  # random: the same masks both stages
        key = (split, setting.name, kind)
        if key not in self._eval_batches:
            conversations = self.splits[split]
            lengths = self.data.lengths()[conversations]
            available = setting.evaluation_availability(
                stage, int(lengths.sum()), seed=self.config.seed, fold=self.fold, split=split)
            bounds = np.concatenate([[0], np.cumsum(lengths)])
            batches, size = [], self.config.batch_size
            for start in range(0, len(conversations), size):
                stop = min(start + size, len(conversations))
                batches.append(self._assemble(conversations[start:stop],
                                              available[bounds[start]:bounds[stop]]))
            self._eval_batches[key] = batches
        return self._eval_batches[key]

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


def task_loss(predictions: Tensor, targets: Tensor, *, regression: bool,
              reduction: str = "mean") -> Tensor:
    """SPEC §4.6: mean squared error (CMU) or cross-entropy (IEMOCAP) of packed predictions
    (N, C) against targets (N,), `mean` or `sum` over the N tokens; zero (with a graph) when
    N = 0. Packed rows are exactly the unpadded, observed positions: these are the masked means
    of the reference code."""
    if predictions.shape[0] == 0:
        return predictions.sum() * 0.0  # no token of this kind in the batch: contributes nothing
    if regression:
        return F.mse_loss(predictions.squeeze(-1), targets, reduction=reduction)
    return F.cross_entropy(predictions, targets, reduction=reduction)


def _chunks(lengths: list[int], budget: int) -> list[tuple[int, int]]:
    """Consecutive conversation ranges of at most `budget` utterances (at least one each)."""
    ranges, first, total = [], 0, 0
    for i, n in enumerate(lengths):
        if i > first and total + n > budget:
            ranges.append((first, i))
            first, total = i, 0
        total += n
    ranges.append((first, len(lengths)))
    return ranges


class _Collector:
    """Losses, detached predictions and router weights of one pass, turned into metrics once."""

    def __init__(self, stage: int) -> None:
        self.stage = stage
        self.outputs: dict[str, list[torch.Tensor]] = {}
        self.targets: dict[str, list[torch.Tensor]] = {}
        self.router_sums: dict[str, torch.Tensor] = {}
        self.router_counts: dict[str, int] = {}
        self.loss_sum: torch.Tensor | float = 0.0
        self.tokens = 0

    def add(self, output, batch: Batch, regression: bool,
            counts: dict[str, int] | None = None) -> torch.Tensor:
        """The loss of this batch's predictions: per prediction kind (fused, or each unimodal
        head) the sum of token losses divided by `counts[kind]` (the whole batch's token count
        when this is one chunk of it), or by this batch's own count when `counts` is None.
        The logged loss is the mean of batch losses weighted by their utterances."""
        if self.stage == 1:
            pairs = {m: (output.unimodal[m], batch.targets(output.layout.observed[m]))
                     for m in output.unimodal}
        else:
            pairs = {"fused": (output.fused, batch.targets(output.layout.valid))}
        loss = sum(task_loss(p.float(), t, regression=regression, reduction="sum")
                   / max(counts[name] if counts else p.shape[0], 1)
                   for name, (p, t) in pairs.items())
        tokens = output.layout.valid.shape[0]
        whole = counts.get("batch", tokens) if counts else tokens  # utterances of the whole batch
        self.loss_sum = self.loss_sum + loss.detach() * whole
        self.tokens += tokens
        for name, (prediction, target) in pairs.items():
            self.outputs.setdefault(name, []).append(prediction.detach())
            self.targets.setdefault(name, []).append(target)
        for m, weights in output.router_weights.items():  # (N_m, E): which expert m leans on
            total = weights.detach().float().sum(dim=0)
            self.router_sums[m] = self.router_sums[m] + total if m in self.router_sums else total
            self.router_counts[m] = self.router_counts.get(m, 0) + weights.shape[0]
        return loss

    def predictions(self, regression: bool) -> np.ndarray:
        """The fused head's predictions (N,): scores for regression, classes otherwise."""
        outputs = torch.cat(self.outputs["fused"]).float().cpu().numpy()
        return outputs.reshape(-1) if regression else outputs.argmax(axis=1).astype(np.int16)

    def metrics(self, regression: bool) -> dict:
        result = {}
        for name in self.outputs:
            outputs = torch.cat(self.outputs[name]).float().cpu().numpy()
            targets = torch.cat(self.targets[name]).cpu().numpy()
            result[name] = task_metrics(outputs, targets, regression=regression)
        result = result.pop("fused") if self.stage == 2 else result
        result["loss"] = float(self.loss_sum) / max(self.tokens, 1)
        if self.router_sums:  # mean router weight per modality over its observed utterances
            result["router"] = {m: (total / self.router_counts[m]).tolist()
                                for m, total in self.router_sums.items()}
        return result
