"""The MoMKE forward pass computed literally from SPEC §4: padded, one expert and one head at a time.

It reads the parameters of a `MoMKE` model and computes every utterance slot of the (B, L) grid,
padding and missing modalities included, masking as the SPEC describes. It is slow on purpose: it is
the yardstick for the optimised `MoMKE.forward` (parity tests) and for the benchmark's speed-up.
Outputs are padded (B, L, C) tensors; slots that are padded (or, in stage 1, missing) are zero.
"""
from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from MoMKE.model import MODALITIES, MoMKE


def reference_forward(model: MoMKE, features: Mapping[str, Tensor], available: Tensor,
                      padding: Tensor, stage: int) -> dict[str, Tensor]:
    """Stage 1: {"a", "t", "v"} unimodal predictions; stage 2: {"fused"} and {"router_<m>"}."""
    config = model.config
    observed = available & ~padding[..., None]  # (B, L, M)
    projected = {}
    for i, m in enumerate(MODALITIES):
        x = features[m] * observed[..., i, None]  # missing inputs are zeros
        projected[m] = model.input_drop(model.projections[m](x))  # (B, L, D)

    if stage == 1:
        out = {}
        for i, m in enumerate(MODALITIES):
            r = _expert(model, i, projected[m], observed[..., i])
            out[m] = model.unimodal_heads[m](r) * observed[..., i, None]
        return out

    mixed, out = [], {}
    for i, m in enumerate(MODALITIES):
        if config.experts == "self":
            z = _expert(model, i, projected[m], observed[..., i])
            weights = F.one_hot(torch.tensor(i), len(MODALITIES)).to(z.dtype).expand(
                *z.shape[:2], -1)
        else:
            per_expert = torch.stack([_expert(model, e, projected[m], observed[..., i])
                                      for e in range(len(MODALITIES))], dim=2)  # (B, L, E, D)
            if config.router == "uniform":
                weights = per_expert.new_full(per_expert.shape[:3], 1.0 / len(MODALITIES))
            else:
                weights = model.routers[m](projected[m])  # (B, L, E)
            z = (weights.unsqueeze(-1) * per_expert).sum(dim=2)
        mixed.append(z * observed[..., i, None])  # zero where m is missing or padded
        out[f"router_{m}"] = weights
    fused = torch.cat(mixed, dim=-1)  # (B, L, M * D)
    hidden = fused + model.fusion_drop(F.relu(model.fusion(fused)))
    out["fused"] = model.head(hidden) * (~padding)[..., None]
    return out


def _expert(model: MoMKE, e: int, x: Tensor, key_mask: Tensor) -> Tensor:
    """Expert e over a padded (B, L, D) sequence whose valid keys are `key_mask` (B, L)."""
    for layer in model.experts.experts[MODALITIES[e]].layers:
        x = x + _layer(model, layer, x, key_mask)
    return x


def _layer(model: MoMKE, layer, x: Tensor, key_mask: Tensor) -> Tensor:
    batch, length, hidden = x.shape
    heads = model.experts.num_heads
    head_dim = hidden // heads
    w, b = layer.qkv_weight, layer.qkv_bias[0]
    q, k, v = (x @ w[:, j * hidden:(j + 1) * hidden] + b[j * hidden:(j + 1) * hidden]
               for j in range(3))  # separate q, k, v projections, (B, L, D) each
    split = lambda t: t.view(batch, length, heads, head_dim).transpose(1, 2)  # noqa: E731
    q, k, v = split(q), split(k), split(v)  # (B, H, L, hd)
    logits = (q @ k.transpose(-2, -1)) * head_dim ** -0.5
    keys = key_mask[:, None, None, :]  # (B, 1, 1, L)
    logits = logits.masked_fill(~keys, torch.finfo(logits.dtype).min)
    attention = model.experts.attn_drop(logits.softmax(dim=-1))
    attention = attention * keys.any(dim=-1, keepdim=True)  # a query with no valid key gives zeros
    z = (attention @ v).transpose(1, 2).reshape(batch, length, hidden)
    h = F.gelu(z @ layer.fc1_weight + layer.fc1_bias[0])
    h = model.experts.drop(h) @ layer.fc2_weight + layer.fc2_bias[0]
    return z + model.experts.drop(h)
