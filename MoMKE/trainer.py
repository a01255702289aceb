"""Train one run: every fold's stage 1 (unimodal experts), expert hand-over and stage 2 (mixing).

From: SPEC §4.3-4.6, §5-7. `run` trains one setting (a condition or rate, one seed) on every fold
into its run folder, under the run's lock and through an attempt folder (`MoMKE/runlog.py`), and
writes its result; `FoldTrainer` trains one fold. One Adam optimiser serves both stages, as in the
reference code.
Every epoch's metrics are kept for train (measured on the training pass itself: dropout on, the
batch's training masks), val and test; which epoch is reported is decided afterwards
(`MoMKE/selection.py`), never here.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from dataloader.atomic import CannotWrite
from dataloader.batch import Batch, BatchBuilder
from dataloader.gcnet import MultimodalDataset, read_marker
from MoMKE import stage1_cache
from MoMKE.config import TrainConfig, has_stage1, model_options, variant_name
from MoMKE.metrics import task_metrics
from MoMKE.layout import TokenLayout
from MoMKE.model import MODALITIES, PACKING, ModelConfig, MoMKE
from MoMKE.protocols import CONDITIONS, MissingSetting
from MoMKE.runlog import (VARIANT_FIELDS, RunFolder, RunLock, RunLocked, epoch_line,
                          experiment_hash, identity_hash, log_result, note_attempt_log,
                          read_result, run_folder, run_identity)
from MoMKE.runtime import (HeapTrimmer, amp_active, autocast, code_version, compile_experts,
                           peak_memory, source_version)
from MoMKE.selection import (RULE_LABELS, VIEW, SelectedPredictions, fold_summary, in_pool,
                             mean_over_folds, mean_router, scores_of)

log = logging.getLogger("MoMKE")

# The stage-1 metric that picks each expert's best epoch: the official code's unimodal accuracy.
HANDOVER_METRIC = {"regression": "acc2", "classification": "wa"}


# ----------------------------------------------------------------------------- one run

def run(config: TrainConfig, data: MultimodalDataset, setting: MissingSetting,
        device: torch.device) -> dict:
    """Train every fold of one setting into its run folder; return the result written.

    Under the run's lock: a complete result of the same identity is returned as it is (unless
    `--force`); otherwise the run trains into a fresh attempt folder that replaces the run folder
    only once its result is written. Raises Diverged (no result written; an earlier result stays)
    and RunLocked (another process trains this run)."""
    config = as_run_on(config, device)
    identity = run_identity(config, setting, data.fingerprint)
    folder = RunFolder(run_folder(config, setting, data.fingerprint), data.data_source)
    # Reading is enough to skip a complete run (a read-only output folder included); under the
    # lock it is looked at again, as another process may have completed it meanwhile.
    if (done := _complete(config, folder, identity)) is not None:
        return done
    with RunLock(folder.path):
        if (done := _complete(config, folder, identity)) is not None:
            return done
        header = _data_header(data)
        opened = False
        try:
            folder.open(config, header)
            opened = True
            log.info("run %s %s seed %d -> %s [%s]", config.dataset, setting.name, config.seed,
                     folder.path, header)
            with torch_threads(config.threads):
                result = _train_folds(config, data, setting, device, folder)
            result.update(identity=identity, identity_hash=identity_hash(identity),
                          experiment=experiment_hash(identity),
                          base_experiment=experiment_hash(identity, ignore=VARIANT_FIELDS))
            folder.write_result(result)
            folder.commit()
        except BaseException as error:
            if opened:  # the log a failure report points at: this attempt's, not an earlier one's
                note_attempt_log(error, folder.log_file)
            if isinstance(error, Diverged):
                log.error("%s (log: %s)", error, folder.log_file)
            raise
        finally:
            folder.close()
    log_result(result, data.spec.metrics, data.data_source)
    return result


def _complete(config: TrainConfig, folder: RunFolder, identity: dict) -> dict | None:
    """The result of a complete run of this identity, unless --force retrains it."""
    if config.force or (done := read_result(folder.path, identity)) is None:
        return None
    log.info("%s is complete already; skipping it (use --force to retrain)", folder.path)
    return done


def train_stage1(config: TrainConfig, data: MultimodalDataset, setting: MissingSetting,
                 device: torch.device) -> None:
    """Train (or find cached) the stage 1 of every fold of `setting` without running stage 2:
    what a distributed sweep runs once before the runs that reuse it."""
    config = as_run_on(config, device)
    with torch_threads(config.threads):
        for fold in [k - 1 for k in config.folds] if config.folds else range(len(data.folds)):
            FoldTrainer(config, data, fold, setting, device, BatchBuilder(data, device)).stage1(
                lambda record: None)


def as_run_on(config: TrainConfig, device: torch.device) -> TrainConfig:
    """`config` as it runs on `device`: without --amp where the device has no bfloat16 arithmetic
    (said once in the log), so that a run's identity and result record float32."""
    return dataclasses.replace(config, amp=False) if config.amp and not amp_active(device) \
        else config


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Run the block with `count` torch CPU threads (0: as they are), then restore them. The
    rounding of CPU float sums can depend on the thread count, so runs computed under different
    executors agree to the bit only at the same count."""
    previous = torch.get_num_threads()
    if count:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _train_folds(config: TrainConfig, data: MultimodalDataset, setting: MissingSetting,
                 device: torch.device, folder: RunFolder) -> dict:
    builder = BatchBuilder(data, device)
    folds = [k - 1 for k in config.folds] if config.folds else range(len(data.folds))
    summaries, seconds, handovers, reused, predictions = [], [], [], [], {}
    started, cpu_started = time.perf_counter(), time.process_time()
    for fold in folds:
        name = data.folds[fold].name
        description = f"{data.spec.name} {setting.name} {name} [{data.data_source}]"
        with tqdm(total=config.epochs, desc=description, unit="epoch", leave=False,
                  disable=None) as progress, logging_redirect_tqdm(loggers=[log]):
            trainer = FoldTrainer(config, data, fold, setting, device, builder)
            outcome = trainer.run(lambda record: _on_epoch(record, folder, progress, data),
                                  progress)
        summaries.append({"fold": fold + 1, "name": name,
                          **_summaries(outcome.records, data, setting, config.select_from)})
        predictions.update(_prediction_arrays(data, fold, outcome.predictions))
        seconds.append(outcome.seconds)
        handovers.append(outcome.handover)
        reused.append(outcome.stage1_reused)
        if outcome.checkpoint is not None:
            folder.save_checkpoint(fold + 1, {
                "model_state": outcome.checkpoint["state"],
                "model_config": model_config_for(config, data).to_dict(),
                "epoch": outcome.checkpoint["epoch"], "rule": outcome.checkpoint["rule"],
                "dataset": data.spec.name, "data_source": data.data_source,
                "setting": setting.name, "seed": config.seed})
    folder.save_predictions(predictions)
    return {
        "dataset": data.spec.name, "protocol": setting.protocol, "condition": setting.condition,
        "missing_rate": setting.rate, "seed": config.seed, "setting": setting.name,
        "selection_metric": data.spec.selection_metric, "units": "fraction (0.8123 = 81.23 %)",
        "rules": RULE_LABELS, "selection_pool": config.select_from,
        "expert_handover": config.expert_handover, **_aggregate(summaries, setting),
        "handover": handovers, "stage1_reused": reused,
        "seconds": {"total": time.perf_counter() - started,
                    "stage1": sum(s["stage1"] for s in seconds),
                    "stage2": sum(s["stage2"] for s in seconds),
                    "cpu": time.process_time() - cpu_started},  # this process, all threads
        "data": {"root": str(data.root), "features": data.feature_names, "dims": data.dims,
                 "conversations": len(data.conversation_ids),
                 "utterances": data.num_utterances, "empty_faces": data.empty_faces,
                 "synthetic": read_marker(data.root)},
        "device": str(device), "config": config.to_dict(),
        "variant": variant_name(config.to_dict()),
        "source_version": source_version(), "code_version": code_version(),
        "predictions": "predictions.npz",
    }


def _prediction_arrays(data: MultimodalDataset, fold: int,
                       selected: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """One fold's entries of `predictions.npz`: the test utterances (ids, conversation index
    within the test split, labels, in the order of the predictions) and the predictions of the
    epochs each rule selected, '<view>__<rule>' ('run' is the run's own evaluation)."""
    conversations = list(data.folds[fold].test)
    rows = np.concatenate([np.arange(data.offsets[c], data.offsets[c + 1]) for c in conversations])
    lengths = data.lengths()[conversations]
    prefix = f"fold{fold + 1}__"
    return {prefix + "ids": data.utterance_ids[rows],
            prefix + "conversation": np.repeat(np.arange(len(conversations)), lengths),
            prefix + "labels": data.labels[rows],
            **{prefix + key: values for key, values in selected.items()}}


def _summaries(records: list[dict], data: MultimodalDataset, setting: MissingSetting,
               pool: str) -> dict:
    """One fold's selected epochs; for the unified model, per condition and rate evaluated."""
    metric = data.spec.selection_metric
    if setting.protocol != "unified":
        return fold_summary(records, metric, pool=pool)
    views = [s.name for s in setting.evaluation_settings(stage=2)]
    return {"evaluations": {view: fold_summary(records, metric, view) for view in views}}


def _aggregate(folds: list[dict], setting: MissingSetting) -> dict:
    """Means over folds; the unified model's `test` is the mean over the seven conditions."""
    if setting.protocol != "unified":
        return {"test": mean_over_folds(folds), "router": mean_router(folds), "folds": folds}
    views = list(folds[0]["evaluations"])
    evaluations = {}
    for view in views:
        per_fold = [f["evaluations"][view] for f in folds]
        evaluations[view] = {"test": mean_over_folds(per_fold), "router": mean_router(per_fold)}
    conditions = [evaluations[f"fixed-{c}"]["test"] for c in CONDITIONS]
    test = {rule: None if any(c[rule] is None for c in conditions) else
            {k: float(np.mean([c[rule][k] for c in conditions])) for k in conditions[0][rule]}
            for rule in RULE_LABELS}
    return {"test": test, "test_scope": "mean over the seven fixed conditions",
            "evaluations": evaluations, "folds": folds}


def _on_epoch(record: dict, folder: RunFolder, progress: tqdm, data: MultimodalDataset) -> None:
    folder.append_epoch(record)
    line = epoch_line(record, data.spec.selection_metric, data.data_source)
    log.info("%s", line)
    progress.set_postfix_str(line.split("| ", 2)[-1][:60], refresh=False)


def _data_header(data: MultimodalDataset) -> str:
    if data.data_source == "synthetic":
        return f"SYNTHETIC data from {data.root} (generated; not comparable with the paper)"
    return f"real data from {data.root}"


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


# A run's failures that are one sentence for the user (no traceback): what went wrong and what
# to do (a full disk and a read-only output are CannotWrite). Executors list them and go on.
STATED_FAILURES = (Diverged, RunLocked, CannotWrite)


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
        (`MoMKE/pool.py`)."""
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
                "records": records, "handover": handover, "selected": self.selected.state()}

    def _restore(self, cached: dict) -> None:
        self.model.load_state_dict(cached["model"])
        self.optimizer.load_state_dict(cached["optimizer"])
        self.selected.load_state(cached["selected"])
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
