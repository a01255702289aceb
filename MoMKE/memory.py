"""Will a run's largest chunk fit in memory? Estimated before training; refused if it cannot.

A training step holds, for backward, every expert layer's activations of every token it computes.
In stage 2 (the larger) each of the E experts runs over the tokens of all M modalities, so a chunk
of U utterances holds about E * M * U * depth token-layers: linear in U. Attention adds one term
that is not linear: rows no longer than `LONG_ROW` (MoMKE/layout.py) hold their (rows, H, S, S)
scores, and so does the fused per-conversation kernel when attention dropout is on (its dropout
runs on torch's explicit kernel). The estimate is float32 (with `--amp` a run needs less) and for
complete data (missing modalities only lower it). docs/precision-and-speed.md, "Long
conversations", says what to change when a run is refused.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Sequence

import torch

from dataloader.gcnet import MultimodalDataset
from MoMKE.config import TrainConfig
from MoMKE.layout import MODALITIES, attends_per_conversation
from MoMKE.trainer import largest_chunk

FLOAT = 4  # bytes
# Float32 values an expert layer keeps per token for backward, as multiples of the hidden size D
# and of the MLP width: q, k, v, attention output, its residual sums and the MLP's output, then
# the MLP's inner activations; counted from the layer's operations, with slack. With the terms
# below the estimate covered every peak `scripts/long_conversations.py` measured on the fused path
# (one conversation of 600-1,000 utterances, hidden 16-128).
PER_LAYER_HIDDEN, PER_LAYER_INNER = 12, 4
# Per token outside the experts, as multiples of D: projections, routers, the stacked expert
# outputs, fusion and head (their inputs add the feature sizes).
PER_TOKEN_HIDDEN = 40
# Bytes an explicit attention layer keeps per score (softmax output, dropout output and mask,
# with slack) and what one layer's scores and their gradients take while it runs: covers the
# peaks measured where scores are most of it, one conversation of 500 utterances at hidden 64
# and of 1,000 on the explicit path at hidden 16 (1.17 GB over the process's start).
PER_SCORE_KEPT, PER_SCORE_TRANSIENT = 14, 24
# Allocator slack and first-call buffers: what a step of 200 utterances at hidden 16 adds beyond
# its tensors (measured: 60 MB).
WORKSPACE = 64 * 2**20
# Refuse only beyond this share of the free memory: the rest is for the allocator's slack and the
# evaluation batches.
USABLE_SHARE = 0.9


class TooLarge(RuntimeError):
    """A run whose largest chunk would not fit in the device's free memory."""


def chunk_peak_bytes(chunk: Sequence[int], config: TrainConfig,
                     dims: Mapping[str, int]) -> int:
    """Estimated bytes of one stage-2 training step on conversations of `chunk` utterances
    each, all modalities observed, float32."""
    utterances, longest = sum(chunk), max(chunk)
    hidden, inner, heads = config.hidden, int(config.hidden * config.mlp_ratio), config.num_heads
    M = E = len(MODALITIES)
    layers = E * config.depth  # every expert's layers, each over the tokens of M modalities
    per_token = (layers * M * (PER_LAYER_HIDDEN * hidden + PER_LAYER_INNER * inner)
                 + PER_TOKEN_HIDDEN * hidden + sum(dims.values())) * FLOAT
    if not attends_per_conversation(longest):  # explicit scores, a row per conversation at most
        scores = M * len(chunk) * heads * longest ** 2
    elif config.attn_drop_rate > 0:  # the kernel's dropout holds each conversation's scores
        scores = M * heads * sum(n ** 2 for n in chunk)
    else:
        scores = 0
    parameters = 4 * FLOAT * _parameter_count(config, dims)  # weights, gradients, Adam's two
    return (utterances * per_token + scores * (layers * PER_SCORE_KEPT + PER_SCORE_TRANSIENT)
            + parameters + WORKSPACE)


def _parameter_count(config: TrainConfig, dims: Mapping[str, int]) -> int:
    D, inner, M = config.hidden, int(config.hidden * config.mlp_ratio), len(MODALITIES)
    layer = D * 3 * D + 3 * D + 2 * D * inner + inner + D
    return (sum(d * D + D for d in dims.values()) + M * config.depth * layer
            + M * (D * D + D + D * M + M) + (M * D) ** 2 + M * D + 2 * M * D * 3)


def free_bytes(device: torch.device) -> int:
    """Memory a run can still take: the GPU's free memory, or the host's available memory
    (MemAvailable, which counts reclaimable caches; the free pages where it is not reported)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_fits(config: TrainConfig, chunk: Sequence[int], dims: Mapping[str, int],
               device: torch.device) -> None:
    """Raise TooLarge, naming the estimate and the flags to change, when the largest chunk
    (`chunk`: its conversations' utterances) would not fit in `device`'s free memory."""
    need, free = chunk_peak_bytes(chunk, config, dims), free_bytes(device)
    if need <= USABLE_SHARE * free:
        return
    flags = ["--chunk-utterances"] if len(chunk) > 1 else []
    if config.attn_drop_rate and attends_per_conversation(max(chunk)):
        flags.append("--attn-drop-rate (to 0)")
    flags = ", ".join(flags + ["--hidden"]) + " or --depth"
    raise TooLarge(
        f"{config.dataset}: one training step on the largest chunk ({len(chunk)} conversation"
        f"{'s' if len(chunk) > 1 else ''}, {sum(chunk):,} utterances, the longest {max(chunk):,}) "
        f"needs about {need / 2**30:,.1f} GiB and {device.type} has {free / 2**30:,.1f} GiB free; "
        f"lower {flags} (now --hidden {config.hidden}, --depth {config.depth}"
        f"{f', --chunk-utterances {config.chunk_utterances}' if len(chunk) > 1 else ''}"
        f"{f', --attn-drop-rate {config.attn_drop_rate:g}' if config.attn_drop_rate else ''}), "
        f"or split the longest conversations.")


def check_run_fits(config: TrainConfig, data: MultimodalDataset, device: torch.device) -> None:
    """`check_fits` for the largest training chunk among the folds the run trains."""
    lengths = data.lengths()
    folds = [k - 1 for k in config.folds] if config.folds else range(len(data.folds))
    chunks = []
    for fold in folds:
        train = [int(lengths[c]) for c in data.folds[fold].train]
        if train:
            chunks.append([train[i] for i in largest_chunk(train, config.batch_size,
                                                            config.chunk_utterances)])
    if chunks:
        check_fits(config, max(chunks, key=lambda c: chunk_peak_bytes(c, config, data.dims)),
                   data.dims, device)
