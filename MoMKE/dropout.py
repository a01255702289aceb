"""Dropout that is cheap on the CPU, with the same distribution as `nn.Dropout`.

On the CPU, `torch.nn.functional.dropout` draws one Bernoulli value per element through a slow
path (about 10x the cost of the matmuls it follows in MoMKE's experts). Here a keep-mask comes from
random bits instead: at p = 0.5 (the paper's rate) one random byte gives eight independent fair
coins; at other rates a uniform draw is compared with p. Either way each element is kept with
probability 1 - p and scaled by 1 / (1 - p), exactly as `nn.Dropout`; only the random stream
differs. On CUDA, PyTorch's fused dropout is used unchanged.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_BIT_SHIFTS = torch.arange(8, dtype=torch.uint8)


def dropout(x: Tensor, p: float, training: bool) -> Tensor:
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu":
        return F.dropout(x, p, training=True)
    if p == 0.5:
        count = x.numel()
        coins = torch.empty((count + 7) // 8, dtype=torch.uint8).random_()
        keep = ((coins.unsqueeze(1) >> _BIT_SHIFTS) & 1).view(-1)[:count].view(x.shape)
    else:
        keep = (torch.rand(x.shape, dtype=torch.float32) >= p).view(torch.uint8)
    return _KeepScale.apply(x, keep, 1.0 / (1.0 - p))


class _KeepScale(torch.autograd.Function):
    """x * keep * scale, saving only the one-byte mask for the backward pass."""

    @staticmethod
    def forward(ctx, x: Tensor, keep: Tensor, scale: float) -> Tensor:
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return torch.mul(x, keep).mul_(scale)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        (keep,) = ctx.saved_tensors
        return torch.mul(grad, keep).mul_(ctx.scale), None, None


class Dropout(nn.Module):
    """Drop-in for `nn.Dropout` (module form), using `dropout` above."""

    def __init__(self, p: float) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability {p} must be in [0, 1)")
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        return dropout(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"
