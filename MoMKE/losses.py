"""Task losses over packed predictions: every row counts (padding and missing tokens are absent).

From: SPEC §4.6. Mean squared error for CMU-MOSI/MOSEI, cross-entropy for IEMOCAP; both are the
masked means of the reference code, because the packed rows are exactly its unmasked positions.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def task_loss(predictions: Tensor, targets: Tensor, *, regression: bool,
              reduction: str = "mean") -> Tensor:
    """Loss of `predictions` (N, C) against `targets` (N,), `mean` or `sum` over the N tokens;
    zero (with a graph) when N = 0."""
    if predictions.shape[0] == 0:
        return predictions.sum() * 0.0  # no token of this kind in the batch: contributes nothing
    if regression:
        return F.mse_loss(predictions.squeeze(-1), targets, reduction=reduction)
    return F.cross_entropy(predictions, targets, reduction=reduction)
