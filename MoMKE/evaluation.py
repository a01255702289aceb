"""One evaluation pass of a model over a split, under a missing-modality setting.

The trainer evaluates every epoch with it, and `python -m MoMKE.evaluate` and `python -m
MoMKE.predict` evaluate saved checkpoints with it, so a checkpoint evaluated on its own run's
setting computes what the run computed at that epoch, to the last digit on the same device: the
same batches of conversations, the same evaluation masks (drawn from seed, fold, split and rate
alone, `MoMKE/protocols.py`), the same autocast and packing.

`Collector` gathers the losses, predictions and router weights of a pass and turns them into
metrics once (`MoMKE/metrics.py`); training passes use it too.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from dataloader.batch import Batch, BatchBuilder
from dataloader.gcnet import MultimodalDataset
from MoMKE.layout import TokenLayout
from MoMKE.metrics import task_metrics
from MoMKE.model import PACKING, MoMKE, MoMKEOutput
from MoMKE.protocols import MissingSetting
from MoMKE.runtime import autocast


def task_loss(predictions: Tensor, targets: Tensor, *, regression: bool,
              reduction: str = "mean") -> Tensor:
    """Mean squared error (CMU) or cross-entropy (IEMOCAP) of packed predictions (N, C) against
    targets (N,), `mean` or `sum` over the N tokens; zero (with a graph) when N = 0. Packed rows
    are exactly the unpadded, observed positions: these are the masked means of the reference
    code."""
    if predictions.shape[0] == 0:
        return predictions.sum() * 0.0  # no token of this kind in the batch: contributes nothing
    if regression:
        return F.mse_loss(predictions.squeeze(-1), targets, reduction=reduction)
    return F.cross_entropy(predictions, targets, reduction=reduction)


def assemble(builder: BatchBuilder, conversations: list[int], available: Tensor,
             device: torch.device) -> tuple[Batch, TokenLayout]:
    """The batch of `conversations` with its token layout, planned on the host and moved to the
    device with the batch (MoMKE/layout.py)."""
    batch = builder.build(conversations, available)
    layout = TokenLayout.from_masks(batch.available, batch.padding,
                                    PACKING.get(device.type, "shared"))
    return batch, layout.to(device)


class Evaluator:
    """The evaluation batches of one fold's splits, built once per (split, setting, stage), and
    the passes of a model over them. Batches hold `batch_size` conversations on the CPU, as in
    training, and a whole split on a GPU."""

    def __init__(self, data: MultimodalDataset, fold: int, builder: BatchBuilder, *, seed: int,
                 batch_size: int, amp: bool, device: torch.device,
                 splits: dict[str, list[int]] | None = None) -> None:
        self.data, self.fold, self.builder = data, fold, builder
        self.seed, self.batch_size, self.amp, self.device = seed, batch_size, amp, device
        self.regression = data.spec.is_regression
        self.splits = splits if splits is not None else {
            "train": list(data.folds[fold].train), "val": list(data.folds[fold].val),
            "test": list(data.folds[fold].test)}
        self._batches: dict[tuple[str, str, int], list[tuple[Batch, TokenLayout]]] = {}

    def batches(self, split: str, stage: int, setting: MissingSetting
                ) -> list[tuple[Batch, TokenLayout]]:
        """Built once per split, setting and stage: evaluation masks stay fixed across epochs."""
        kind = stage if setting.protocol == "fixed" else 0  # random: the same masks both stages
        key = (split, setting.name, kind)
        if key not in self._batches:
            conversations = self.splits[split]
            lengths = self.data.lengths()[conversations]
            available = setting.evaluation_availability(
                stage, int(lengths.sum()), seed=self.seed, fold=self.fold, split=split)
            bounds = np.concatenate([[0], np.cumsum(lengths)])
            # A GPU evaluates a split in one pass: its memory holds it, and fewer, larger
            # batches launch fewer kernels. The CPU keeps batches of --batch-size.
            batches = []
            size = max(1, len(conversations)) if self.device.type == "cuda" else self.batch_size
            for start in range(0, len(conversations), size):
                stop = min(start + size, len(conversations))
                batches.append(assemble(self.builder, conversations[start:stop],
                                        available[bounds[start]:bounds[stop]], self.device))
            self._batches[key] = batches
        return self._batches[key]

    @torch.inference_mode()
    def outputs(self, model: MoMKE, split: str, stage: int, setting: MissingSetting
                ) -> list[tuple[Batch, MoMKEOutput]]:
        """The model's outputs on every batch of `split` (eval mode), in the split's order."""
        model.eval()
        found = []
        for batch, layout in self.batches(split, stage, setting):
            with autocast(self.device, self.amp):
                found.append((batch, model(batch.packed_features(), layout, stage)))
        return found

    @torch.inference_mode()
    def evaluate(self, model: MoMKE, split: str, stage: int, setting: MissingSetting, *,
                 fused_too: bool = False) -> tuple[dict, np.ndarray | None]:
        """The metrics of `split` under `setting`, and the fused predictions in the split's
        utterance order (None in stage 1 without `fused_too`). With `fused_too`, a stage-1 pass
        also runs the fused head (untrained) on the stage-1 masks, as the official code's test
        pass does, under the key "fused"."""
        model.eval()
        collected = Collector(stage)
        fused = Collector(2) if fused_too else None
        for batch, layout in self.batches(split, stage, setting):
            with autocast(self.device, self.amp):
                output = model(batch.packed_features(), layout, stage)
                collected.add(output, batch, self.regression)
                if fused is not None:
                    fused.add(model(batch.packed_features(), layout, 2), batch, self.regression)
        metrics = collected.metrics(self.regression)
        if fused is not None:
            metrics["fused"] = fused.metrics(self.regression)
        source = fused if fused is not None else collected if stage == 2 else None
        return metrics, None if source is None else source.predictions(self.regression)


class Collector:
    """Losses, detached predictions and router weights of one pass, turned into metrics once."""

    def __init__(self, stage: int) -> None:
        self.stage = stage
        self.outputs: dict[str, list[torch.Tensor]] = {}
        self.targets: dict[str, list[torch.Tensor]] = {}
        self.router_sums: dict[str, torch.Tensor] = {}
        self.router_counts: dict[str, int] = {}
        self.loss_sum: torch.Tensor | float = 0.0
        self.tokens = 0

    def add(self, output: MoMKEOutput, batch: Batch, regression: bool,
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
