"""MoMKE: projections, modality experts, soft routers and the fusion head, in one readable file.

Paper: Leveraging Knowledge of Modality Experts for Incomplete Multimodal Learning (ACM MM 2024).
From: SPEC §4. Stage 1 trains expert m on modality m alone; stage 2 passes every modality through
all experts and mixes their outputs with a per-modality soft router.

Notation
    B  conversations in a batch          L  utterances per conversation (padded to the longest)
    D  hidden size                       M  modalities (a, t, v)      E  experts (one per modality)
    H  attention heads                   C  outputs (classes, or 1 for regression)
    N  tokens: the observed, unpadded utterances of one modality in a batch, packed

How it runs. Compute follows real tokens: the experts' linear layers see only the observed,
unpadded utterances, so padding and missing modalities (whose representations the SPEC zeroes
anyway) cost nothing, and the experts of a layer run as one batched matmul over their stacked
weights. For attention each modality's utterances are packed into rows of L slots (several short
conversations share a row; `TokenLayout`) and attention runs as a batch of L x L blocks
restricted to each conversation. `MoMKE/reference.py` computes the same function
the literal, padded way; tests hold the two equal, gradients included.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dataloader.batch import TokenLayout
from dataloader.datasets import MODALITIES
from MoMKE.dropout import Dropout


@dataclass(frozen=True)
class ModelConfig:
    input_dims: tuple[int, int, int]  # audio, text, visual feature sizes
    num_outputs: int  # classes, or 1 for regression
    hidden: int = 256
    depth: int = 4
    num_heads: int = 2
    mlp_ratio: float = 1.0
    drop_rate: float = 0.5
    attn_drop_rate: float = 0.0
    router: str = "soft"  # "soft" (the paper) or "uniform" (ablation: equal weights, nothing learnt)
    experts: str = "all"  # "all" (the paper) or "self" (ablation: modality m uses expert m only)

    def __post_init__(self) -> None:
        if self.hidden % self.num_heads:
            raise ValueError(f"--hidden {self.hidden} must be divisible by --num-heads "
                             f"{self.num_heads}; change one of them.")
        if self.router not in ("soft", "uniform") or self.experts not in ("all", "self"):
            raise ValueError(f"router {self.router!r} / experts {self.experts!r}: use soft|uniform "
                             f"and all|self.")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class MoMKEOutput:
    """Packed predictions. Stage 1: `unimodal[m]` (N_m, C) at `layout.observed[m]`.
    Stage 2: `fused` (N, C) at `layout.valid` and `router_weights[m]` (N_m, E)."""

    unimodal: dict[str, Tensor]
    fused: Tensor | None
    router_weights: dict[str, Tensor]


def _rows_of(features: Tensor | Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
    if callable(features) and not isinstance(features, Tensor):
        return features
    return lambda index: features.reshape(-1, features.shape[-1]).index_select(0, index)


def _linear_init(weight: Tensor, bias: Tensor, fan_in: int) -> None:
    bound = 1.0 / math.sqrt(fan_in)  # nn.Linear's default initialisation
    nn.init.uniform_(weight, -bound, bound)
    nn.init.uniform_(bias, -bound, bound)


class ExpertLayer(nn.Module):
    """The weights of one layer of one expert: multi-head self-attention over a conversation's
    utterances with q, k, v fused into one (D, 3D) weight (no output projection), then an MLP.
    The computation lives in `Experts.forward`, which runs the same layer of several experts as
    one batched matmul over their stacked weights."""

    def __init__(self, *, hidden: int, mlp_ratio: float) -> None:
        super().__init__()
        inner = int(hidden * mlp_ratio)
        self.qkv_weight = nn.Parameter(torch.empty(hidden, 3 * hidden))
        self.qkv_bias = nn.Parameter(torch.empty(1, 3 * hidden))
        self.fc1_weight = nn.Parameter(torch.empty(hidden, inner))
        self.fc1_bias = nn.Parameter(torch.empty(1, inner))
        self.fc2_weight = nn.Parameter(torch.empty(inner, hidden))
        self.fc2_bias = nn.Parameter(torch.empty(1, hidden))
        for weight, bias, fan_in in ((self.qkv_weight, self.qkv_bias, hidden),
                                     (self.fc1_weight, self.fc1_bias, hidden),
                                     (self.fc2_weight, self.fc2_bias, inner)):
            _linear_init(weight, bias, fan_in)

    def weights(self) -> tuple[Tensor, ...]:
        return (self.qkv_weight, self.qkv_bias, self.fc1_weight, self.fc1_bias,
                self.fc2_weight, self.fc2_bias)


class Expert(nn.Module):
    """One modality expert: `depth` layers, x <- x + layer(x), no LayerNorm (SPEC §4.2)."""

    def __init__(self, *, depth: int, hidden: int, mlp_ratio: float) -> None:
        super().__init__()
        self.layers = nn.ModuleList(ExpertLayer(hidden=hidden, mlp_ratio=mlp_ratio)
                                    for _ in range(depth))


class Experts(nn.Module):
    """The E modality experts, run together: layer l of every expert in use is one batched matmul
    over the experts' stacked weights, applied to the real tokens only (E', T, D). Attention alone
    needs the conversations laid out: q, k, v are placed in the packed grid (`TokenLayout`), where
    it runs as a batch of L x L blocks restricted to each conversation, and its output is read back
    at the tokens' slots. Only the experts in use are stacked, so an expert that sees no token gets
    no gradient (and Adam leaves it alone), as with separate modules."""

    def __init__(self, *, depth: int, hidden: int, num_heads: int, mlp_ratio: float,
                 drop_rate: float, attn_drop_rate: float) -> None:
        super().__init__()
        self.experts = nn.ModuleDict({m: Expert(depth=depth, hidden=hidden, mlp_ratio=mlp_ratio)
                                      for m in MODALITIES})
        self.depth, self.num_heads = depth, num_heads
        self.attn_drop = Dropout(attn_drop_rate)
        self.drop = Dropout(drop_rate)

    def forward(self, x: Tensor, place: Tensor, attend: Tensor, experts: list[str]) -> Tensor:
        """x (E', T, D): the tokens of `experts`, in that order; `place` (E' * T,): each token's
        position in the flattened grids (E' * G slots, G = R * L); `attend` (E' * R, 1, L, L)."""
        for depth in range(self.depth):
            layers = [self.experts[e].layers[depth] for e in experts]
            weights = [torch.stack(w) for w in zip(*(layer.weights() for layer in layers))]
            x = x + self._layer(x, place, attend, *weights)
        return x

    def _layer(self, x: Tensor, place: Tensor, attend: Tensor, qkv_w: Tensor, qkv_b: Tensor,
               fc1_w: Tensor, fc1_b: Tensor, fc2_w: Tensor, fc2_b: Tensor) -> Tensor:
        experts, tokens, hidden = x.shape  # (E', T, D)
        length = attend.shape[-1]
        slots = attend.shape[0] * length  # E' * G
        heads, head_dim = self.num_heads, hidden // self.num_heads
        qkv = torch.baddbmm(qkv_b, x, qkv_w).view(-1, 3 * hidden)  # (E' T, 3D)
        # Empty grid slots hold zero keys and values that no real query attends to.
        grid = qkv.new_zeros(slots, 3 * hidden).index_copy(0, place, qkv)
        q, k, v = grid.view(-1, length, 3, heads, head_dim).permute(2, 0, 3, 1, 4)  # (E'R, H, L, hd)
        logits = torch.matmul(q, k.transpose(-2, -1)).mul_(head_dim ** -0.5)  # (E'R, H, L, L)
        logits.masked_fill_(~attend, torch.finfo(logits.dtype).min)
        attention = self.attn_drop(logits.softmax(dim=-1))
        # Every real query is itself a valid key, so no real row is empty; rows of empty slots
        # stay finite and are never read out. (reference.py zeroes empty rows explicitly.)
        z = (attention @ v).transpose(1, 2).reshape(slots, hidden)  # (E' G, D)
        z = z.index_select(0, place).view(experts, tokens, hidden)  # (E', T, D)
        h = self.drop(F.gelu(torch.baddbmm(fc1_b, z, fc1_w)))
        return self.drop(torch.baddbmm(fc2_b, h, fc2_w)).add_(z)  # z + MLP(z)


class SoftRouter(nn.Module):
    """Per-utterance weights over the E experts: Linear, GELU, Dropout, Linear, Dropout, softmax."""

    def __init__(self, hidden: int, experts: int, drop_rate: float) -> None:
        super().__init__()
        self.fc1 = nn.Linear(hidden, hidden)
        self.fc2 = nn.Linear(hidden, experts)
        self.drop = Dropout(drop_rate)

    def forward(self, h: Tensor) -> Tensor:
        logits = self.drop(self.fc2(self.drop(F.gelu(self.fc1(h)))))
        return logits.softmax(dim=-1)  # (N, E)


class MoMKE(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        D, C, E = config.hidden, config.num_outputs, len(MODALITIES)
        self.projections = nn.ModuleDict({m: nn.Linear(d, D)
                                          for m, d in zip(MODALITIES, config.input_dims)})
        self.input_drop = Dropout(config.drop_rate)
        self.experts = Experts(depth=config.depth, hidden=D, num_heads=config.num_heads,
                               mlp_ratio=config.mlp_ratio, drop_rate=config.drop_rate,
                               attn_drop_rate=config.attn_drop_rate)
        self.unimodal_heads = nn.ModuleDict({m: nn.Linear(D, C) for m in MODALITIES})
        self.routers = nn.ModuleDict({m: SoftRouter(D, E, config.drop_rate) for m in MODALITIES})
        self.fusion = nn.Linear(E * D, E * D)
        self.fusion_drop = Dropout(config.drop_rate)
        self.head = nn.Linear(E * D, C)

    def forward(self, features: Mapping[str, Tensor | Callable[[Tensor], Tensor]],
                layout: TokenLayout, stage: int) -> MoMKEOutput:
        """`features[m]`: a padded (B, L, d_m) tensor, or a function from flat positions (N,) to
        their rows (N, d_m) (how `Batch.packed_features` avoids building padded inputs);
        `layout` from `TokenLayout.from_masks`; `stage` 1 or 2."""
        features = {m: _rows_of(x) for m, x in features.items()}
        D = self.config.hidden
        active = [m for m in MODALITIES if layout.count(m) > 0]
        projected = {m: self.input_drop(self.projections[m](features[m](layout.observed[m])))
                     for m in active}  # m -> (N_m, D)
        if stage == 1 or self.config.experts == "self":
            routes = {m: [m] for m in active}  # expert m sees modality m only
        else:
            routes = {e: active for e in MODALITIES}
        outputs = self._run_experts(projected, routes, layout)  # (expert, modality) -> (N_m, D)
        if stage == 1:
            return MoMKEOutput({m: self.unimodal_heads[m](outputs[m, m]) for m in active}, None, {})

        mixed, weights = {}, {}
        for m in active:
            if self.config.experts == "self":
                weights[m] = F.one_hot(torch.tensor(MODALITIES.index(m), device=projected[m].device),
                                       len(MODALITIES)).to(projected[m].dtype).expand(
                                           projected[m].shape[0], -1)
                mixed[m] = outputs[m, m]
                continue
            if self.config.router == "uniform":
                weights[m] = projected[m].new_full((projected[m].shape[0], len(MODALITIES)),
                                                   1.0 / len(MODALITIES))
            else:
                weights[m] = self.routers[m](projected[m])  # (N_m, E)
            stacked = torch.stack([outputs[e, m] for e in MODALITIES], dim=1)  # (N_m, E, D)
            mixed[m] = (weights[m].unsqueeze(-1) * stacked).sum(dim=1)  # (N_m, D)
        zeros = next(iter(mixed.values())).new_zeros(layout.valid.shape[0], D)
        blocks = [zeros.index_copy(0, layout.valid_position[m], mixed[m]) if m in mixed else zeros
                  for m in MODALITIES]  # z = [z_a, z_t, z_v], zero where a modality is missing
        fused = torch.cat(blocks, dim=1)  # (N, M * D)
        # Blocks of modalities missing from the whole batch are zero: skip their weight columns.
        columns = torch.cat([torch.arange(i * D, (i + 1) * D) for i, m in enumerate(MODALITIES)
                             if m in mixed]).to(fused.device) if len(mixed) < len(MODALITIES) else None
        if columns is None:
            update = self.fusion(fused)
        else:
            update = F.linear(torch.cat([blocks[MODALITIES.index(m)] for m in MODALITIES
                                         if m in mixed], dim=1),
                              self.fusion.weight.index_select(1, columns), self.fusion.bias)
        hidden = fused + self.fusion_drop(F.relu(update))
        return MoMKEOutput({}, self.head(hidden), weights)

    def _run_experts(self, projected: dict[str, Tensor], routes: dict[str, list[str]],
                     layout: TokenLayout) -> dict[tuple[str, str], Tensor]:
        """Run every expert e over the tokens of the modalities `routes[e]`, all experts at once.

        Expert e's tokens are its modalities' tokens back to back, and its attention grid stacks
        those modalities' packed rows. Experts with fewer tokens get zero tokens at the end,
        placed in spare grid rows that attend to nothing."""
        L, D = layout.length, self.config.hidden
        experts = list(routes)
        counts = [sum(layout.count(m) for m in routes[e]) for e in experts]
        tokens = max(counts)
        used_rows = [sum(layout.rows[m] for m in routes[e]) for e in experts]
        rows = max(used_rows) + -(-(tokens - min(counts)) // L)  # spare rows for filler tokens
        starts: dict[tuple[str, str], int] = {}  # (e, m) -> first token of m in e's tokens

        def lay_out(k: int, e: str) -> tuple[Tensor, Tensor, Tensor]:
            xs, places, row, token = [], [], 0, 0
            attend = layout.attend[routes[e][0]].new_zeros(rows, L, L)
            for m in routes[e]:
                starts[e, m] = token
                xs.append(projected[m])
                places.append(row * L + layout.slots[m])
                attend[row:row + layout.rows[m]] = layout.attend[m]
                row, token = row + layout.rows[m], token + layout.count(m)
            if token < tokens:  # filler tokens in the spare rows
                xs.append(projected[routes[e][0]].new_zeros(tokens - token, D))
                places.append(torch.arange(used_rows[k] * L, used_rows[k] * L + tokens - token,
                                           device=attend.device))
            return torch.cat(xs), torch.cat(places) + k * rows * L, attend

        if all(routes[e] == routes[experts[0]] for e in experts):  # stage 2: the same tokens
            x, place, attend = lay_out(0, experts[0])
            for e in experts[1:]:
                starts.update({(e, m): starts[experts[0], m] for m in routes[e]})
            x = x.expand(len(experts), -1, -1)
            place = torch.cat([place + k * rows * L for k in range(len(experts))])
            attend = attend.repeat(len(experts), 1, 1)
        else:
            laid = [lay_out(k, e) for k, e in enumerate(experts)]
            x = torch.stack([part[0] for part in laid])
            place = torch.cat([part[1] for part in laid])
            attend = torch.cat([part[2] for part in laid])
        out = self.experts(x, place, attend.unsqueeze(1), experts)  # (E', T, D)
        return {(e, m): out[k, starts[e, m]:starts[e, m] + layout.count(m)]
                for k, e in enumerate(experts) for m in routes[e]}

    # ------------------------------------------------------------------ stage-1 -> stage-2 hand-over

    def modality_state(self, m: str) -> dict[str, Tensor]:
        """A real copy of modality m's projection and of expert m."""
        return {name: value.detach().clone() for name, value in self.state_dict().items()
                if name.startswith((f"projections.{m}.", f"experts.experts.{m}."))}

    def load_modality_state(self, m: str, state: Mapping[str, Tensor]) -> None:
        """Set modality m's projection and expert m to `state` through `load_state_dict`."""
        full = {k: v.clone() for k, v in self.state_dict().items()}
        full.update({name: value.clone() for name, value in state.items()})
        self.load_state_dict(full)

    def expert_parameters(self) -> list[nn.Parameter]:
        return list(self.experts.parameters())

