"""What the model asks of the machine and what the machine gives: model FLOPs per step (counted
and from the layout) and the measured matmul throughput at the model's shapes, for the
benchmark's utilisation and floor figures (`MoMKE/experiments/bench.py`)."""
from __future__ import annotations

import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from MoMKE.model import MODALITIES, ModelConfig, MoMKE, TokenLayout
from MoMKE.trainer import FoldTrainer


# ----------------------------------------------------------------------------- FLOP counting

def model_flops(layout: TokenLayout, model: ModelConfig, stage: int) -> float:
    """Forward FLOPs (2 per multiply-add) of the real-token computation of one batch."""
    D, Dh, E = model.hidden, int(model.hidden * model.mlp_ratio), len(MODALITIES)
    counts = {m: layout.count(m) for m in MODALITIES}
    active = [m for m in MODALITIES if counts[m]]
    flops = sum(2 * counts[m] * d * D for m, d in zip(MODALITIES, model.input_dims))
    streams = [(m, m) for m in active] if stage == 1 or model.experts == "self" else \
        [(e, m) for e in MODALITIES for m in active]
    per_token = 2 * (3 * D * D + 2 * D * Dh)  # q, k, v and the MLP
    for _, m in streams:
        # utterances of m per conversation: attention costs their square (q k^T and a v); from
        # the layout's host counts, so that metering a GPU run never waits for the GPU
        squares = sum(n * n for n in layout.segments[m]) if layout.segments \
            else float(torch.bincount(layout.observed[m] // layout.length).double().square().sum())
        attention = 2 * 2 * D * squares
        flops += model.depth * (counts[m] * per_token + attention)
    if stage == 1:
        return flops + sum(2 * counts[m] * D * model.num_outputs for m in active)
    tokens = layout.valid.shape[0]
    if model.experts == "all":
        flops += sum(2 * counts[m] * (D * D + D * E) for m in active)  # routers
        flops += sum(2 * counts[m] * E * D for m in active)  # the mixture
    flops += 2 * tokens * (E * D) * (E * D) + 2 * tokens * E * D * model.num_outputs
    return flops


def counted_flops(model: MoMKE, features: dict[str, torch.Tensor], layout: TokenLayout,
                  stage: int) -> int:
    """Forward FLOPs of one model call as torch counts them (`FlopCounterMode`): the check on
    `model_flops`."""
    with FlopCounterMode(display=False) as counter:
        model(features, layout, stage)
    return counter.get_total_flops()


# ----------------------------------------------------------------------------- operations

# Allocations without arithmetic: not compute (nor are views, `OpOverload.is_view`).
_ALLOCATIONS = frozenset({"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided"})


class _OperationCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view and func.overloadpacket.__name__ not in _ALLOCATIONS:
            self.count += 1
        return func(*args, **(kwargs or {}))


def step_operations(fold: FoldTrainer) -> int:
    """ATen compute operations of one stage-2 training step (forward, backward, Adam) as
    `FoldTrainer.probe_step` runs it: the longest training conversations, complete data, the
    largest chunk (a whole batch on a GPU). On a GPU each is at least one kernel launch, which
    at MoMKE's sizes costs more than its arithmetic. Counted on the second step, the first
    having made Adam's state."""
    fold.probe_step()
    with _OperationCounter() as counter:
        fold.probe_step()
    return counter.count


# ----------------------------------------------------------------------------- measurements

def matmul_throughput(device: torch.device, hidden: int, tokens: int,
                      dtype: torch.dtype = torch.float32) -> float:
    """GFLOP/s of the model's main matmul shape in `dtype`, forward and backward:
    (3, T, D) x (3, D, 3D)."""
    x = torch.randn(3, tokens, hidden, device=device, dtype=dtype, requires_grad=True)
    w = torch.randn(3, hidden, 3 * hidden, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn(3, tokens, 3 * hidden, device=device, dtype=dtype)

    def step() -> None:
        torch.bmm(x, w).backward(grad)

    for _ in range(3):
        step()
    sync(device)
    repeats, started = 10, time.perf_counter()
    for _ in range(repeats):
        step()
    sync(device)
    seconds = (time.perf_counter() - started) / repeats
    return 3 * 2 * 3 * tokens * hidden * 3 * hidden / seconds / 1e9


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
