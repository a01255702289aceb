"""MoMKE: projections, modality experts, soft routers and the fusion head, in one readable file.

Paper: Leveraging Knowledge of Modality Experts for Incomplete Multimodal Learning (ACM MM 2024).
From: SPEC §4. Stage 1 trains expert m on modality m alone; stage 2 passes every modality through
all experts and mixes their outputs with a per-modality soft router.

Notation
    B  conversations in a batch          L  utterances per conversation (padded to the longest)
    D  hidden size                       M  modalities (a, t, v)      E  experts (one per modality)
    H  attention heads                   C  outputs (classes, or 1 for regression)
    N  unpadded utterances of the batch  N_m  those where modality m is observed (its tokens)
    R  rows of the packed grid           S  slots per row (S = L)

Layout. Padded and missing utterances are zeroed by the SPEC anyway, so the model computes only
real tokens: each modality's tokens are gathered from the (B, L) batch, and for the experts they
are packed into rows of L slots, several short conversations sharing a row, with an attention
mask that keeps every conversation to itself (`TokenLayout`, the one place that knows where tokens
sit). An expert takes its tokens (N, D); only its attention lays them out in those rows
(`PackedRows`), so every linear layer computes real tokens only.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Mapping, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

MODALITIES = ("a", "t", "v")
Features = Union[Tensor, Callable[[Tensor], Tensor]]  # (B, L, d), or flat positions (N,) -> (N, d)


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
    bit_dropout: bool = False  # CPU dropout from random bits (`BitDropout`); same distribution

    def __post_init__(self) -> None:
        if self.hidden % self.num_heads:
            raise ValueError(f"--hidden {self.hidden} must be divisible by --num-heads "
                             f"{self.num_heads}; change one of them.")
        if self.router not in ("soft", "uniform") or self.experts not in ("all", "self"):
            raise ValueError(f"router {self.router!r} / experts {self.experts!r}: use soft|uniform "
                             f"and all|self.")

    def to_dict(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------- where tokens sit

@dataclass
class TokenLayout:
    """Where the tokens of a (B, L) batch sit, and how they are packed for attention.

    `observed[m]` (N_m,) are the flat positions b * L + l of the unpadded utterances where m is
    observed, `valid` (N,) those of all unpadded utterances, and `valid_position[m]` (N_m,) the
    place of each token of m inside `valid`. For the experts, the tokens of m fill `rows[m]` rows
    of L slots: each conversation's tokens contiguous and in order, several short conversations
    per row (first fit, longest first); `slots[m]` (N_m,) is each token's slot r * L + j and
    `attend[m]` (R_m, L, L) says which slots may attend to which (same conversation, real key).
    """

    length: int
    observed: dict[str, Tensor]
    valid: Tensor
    valid_position: dict[str, Tensor]
    rows: dict[str, int]
    slots: dict[str, Tensor]
    attend: dict[str, Tensor]

    @classmethod
    def from_masks(cls, available: Tensor, padding: Tensor) -> TokenLayout:
        """`available` (B, L, M) bool, True = observed; `padding` (B, L) bool, True = padded.
        Computed on the host (it packs with Python loops); the index tensors go to their device."""
        device = padding.device
        available, padding = available.cpu(), padding.cpu()
        length = padding.shape[1]
        valid = (~padding).reshape(-1).nonzero().squeeze(1)
        observed, rows, slots, attend = {}, {}, {}, {}
        packings: dict[tuple[int, ...], tuple[int, Tensor, Tensor]] = {}
        for i, m in enumerate(MODALITIES):
            present = available[..., i] & ~padding  # (B, L)
            observed[m] = present.reshape(-1).nonzero().squeeze(1)
            per_conversation = present.sum(dim=1)  # (B,)
            counts = tuple(per_conversation.tolist())
            if counts not in packings:  # fixed conditions: every modality packs alike
                packings[counts] = _pack_rows(counts, length)
            rows[m], start, attend[m] = packings[counts]
            conversation = observed[m] // length
            first = per_conversation.cumsum(0) - per_conversation  # (B,) first token of each
            rank = torch.arange(len(observed[m])) - first[conversation]  # place in its conversation
            slots[m] = start[conversation] + rank
        move = lambda t: t.to(device, non_blocking=True)  # noqa: E731
        return cls(length, {m: move(t) for m, t in observed.items()}, move(valid),
                   {m: move(torch.searchsorted(valid, t)) for m, t in observed.items()}, rows,
                   {m: move(t) for m, t in slots.items()}, {m: move(t) for m, t in attend.items()})

    def count(self, m: str) -> int:
        return int(self.observed[m].shape[0])

    def gather(self, m: str, x: Features) -> Tensor:
        """The tokens of m, (N_m, d): rows of a padded (B, L, d) tensor, or what a function of
        the flat positions returns (it can read them straight from a feature table)."""
        if callable(x) and not isinstance(x, Tensor):
            return x(self.observed[m])
        return x.reshape(-1, x.shape[-1]).index_select(0, self.observed[m])

    def rows_for(self, modalities: list[str]) -> PackedRows:
        """The packed rows of `modalities`, stacked in that order, for their tokens concatenated
        in the same order."""
        offsets = torch.tensor([0] + [self.rows[m] for m in modalities]).cumsum(0).tolist()
        slots = torch.cat([self.slots[m] + offsets[k] * self.length
                           for k, m in enumerate(modalities)])
        return PackedRows(slots, torch.cat([self.attend[m] for m in modalities]))

    def scatter(self, m: str, x: Tensor) -> Tensor:
        """Tokens of m (N_m, D) placed among all unpadded utterances: (N, D), zero where m is
        missing."""
        return x.new_zeros(self.valid.shape[0], x.shape[-1]).index_copy(
            0, self.valid_position[m], x)


def _pack_rows(counts: tuple[int, ...], capacity: int) -> tuple[int, Tensor, Tensor]:
    """Place sequences of `counts` tokens in rows of `capacity` slots, first fit, longest first:
    (rows, first slot of each sequence (B,), (rows, capacity, capacity) who may attend to whom)."""
    start = [0] * len(counts)
    used: list[int] = []  # filled slots per row
    for i in sorted(range(len(counts)), key=lambda i: -counts[i]):
        if counts[i] == 0:
            continue
        row = next((r for r, u in enumerate(used) if u + counts[i] <= capacity), len(used))
        if row == len(used):
            used.append(0)
        start[i] = row * capacity + used[row]
        used[row] += counts[i]
    owner = torch.full((len(used) * capacity,), -1, dtype=torch.long)  # conversation of each slot
    for i, n in enumerate(counts):
        owner[start[i]:start[i] + n] = i
    owner = owner.view(len(used), capacity)
    attend = (owner[:, :, None] == owner[:, None, :]) & (owner[:, None, :] >= 0)
    return len(used), torch.tensor(start, dtype=torch.long), attend


@dataclass
class PackedRows:
    """Tokens (N, D) laid out in R rows of S slots for attention: `slots` (N,) is each token's
    slot r * S + j, `attend` (R, S, S) bool who may attend to whom."""

    slots: Tensor
    attend: Tensor

    def pack(self, x: Tensor) -> Tensor:
        """(N, d) -> (R, S, d), zero in empty slots."""
        R, S, _ = self.attend.shape
        return x.new_zeros(R * S, x.shape[-1]).index_copy(0, self.slots, x).view(R, S, -1)

    def unpack(self, grid: Tensor) -> Tensor:
        """(R, S, d) -> (N, d)."""
        return grid.reshape(-1, grid.shape[-1]).index_select(0, self.slots)


# ----------------------------------------------------------------------------- building blocks

class BitDropout(nn.Dropout):
    """`nn.Dropout` whose CPU keep-mask comes from random bits: at p = 0.5 one random byte gives
    eight fair coins, otherwise a uniform draw is compared with p. Each element is kept with
    probability 1 - p and scaled by 1 / (1 - p), as in `nn.Dropout`; only the random stream
    differs. On the CPU `F.dropout` draws through a path several times slower; elsewhere, and
    inside `torch.compile` (which fuses its own dropout), it is used as it is."""

    _SHIFTS = torch.arange(8, dtype=torch.uint8)

    def forward(self, x: Tensor) -> Tensor:
        if (not self.training or self.p == 0.0 or x.device.type != "cpu"
                or torch.compiler.is_compiling()):
            return super().forward(x)
        if self.p == 0.5:
            coins = torch.empty((x.numel() + 7) // 8, dtype=torch.uint8).random_()
            keep = ((coins[:, None] >> self._SHIFTS) & 1).view(-1)[:x.numel()].view(x.shape)
        else:
            keep = (torch.rand(x.shape) >= self.p).view(torch.uint8)
        return x.mul(keep).mul_(1.0 / (1.0 - self.p))  # autograd keeps the one-byte mask only


def _dropout(p: float, config: ModelConfig) -> nn.Dropout:
    return BitDropout(p) if config.bit_dropout else nn.Dropout(p)


class Attention(nn.Module):
    """Multi-head self-attention within each row, masked, with no output projection (SPEC §4.2)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.scale = (config.hidden // config.num_heads) ** -0.5
        self.qkv = nn.Linear(config.hidden, 3 * config.hidden)  # [q, k, v] = x W_qkv + b
        self.attn_drop = nn.Dropout(config.attn_drop_rate)

    def forward(self, x: Tensor, rows: PackedRows) -> Tensor:
        """x (N, D) tokens -> z (N, D). Each token attends to the keys its row's mask allows
        (`rows.attend`, (R, S, S) bool); z = 0 for a query with no valid key."""
        attend, D = rows.attend, x.shape[-1]
        R, S, _ = attend.shape
        qkv = rows.pack(self.qkv(x)).view(R, S, 3, self.num_heads, D // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # (R, H, S, D/H) each
        scores = (q @ k.transpose(-2, -1)).float() * self.scale  # (R, H, S, S)
        # The softmax runs in float32 under bf16 autocast too. A finite fill keeps rows without
        # a valid key finite; they are zeroed below.
        scores = scores.masked_fill(~attend[:, None], torch.finfo(torch.float32).min)
        weights = self.attn_drop(scores.softmax(dim=-1)).to(v.dtype)
        z = (weights @ v).transpose(1, 2).reshape(R, S, D)  # heads concatenated
        return rows.unpack(z * attend.any(dim=-1, keepdim=True))


class ExpertLayer(nn.Module):
    """One expert layer: z = Attention(x); z + MLP(z) (SPEC §4.2; no LayerNorm)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        inner = int(config.hidden * config.mlp_ratio)
        self.attention = Attention(config)
        self.fc1 = nn.Linear(config.hidden, inner)
        self.fc2 = nn.Linear(inner, config.hidden)
        self.drop = _dropout(config.drop_rate, config)

    def forward(self, x: Tensor, rows: PackedRows) -> Tensor:
        """x (N, D) tokens -> (N, D); attention within `rows`, the MLP per token."""
        z = self.attention(x, rows)
        return z + self.drop(self.fc2(self.drop(F.gelu(self.fc1(z)))))  # z + MLP(z)


class Expert(nn.Module):
    """One modality expert: `depth` layers added residually, x <- x + layer(x) (SPEC §4.2)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(ExpertLayer(config) for _ in range(config.depth))

    def forward(self, x: Tensor, rows: PackedRows) -> Tensor:
        """x (N, D) tokens, laid out for attention by `rows` -> r (N, D)."""
        for layer in self.layers:
            x = x + layer(x, rows)
        return x


class SoftRouter(nn.Module):
    """Per-token weights over the experts: w = softmax(Dropout(fc2(Dropout(GELU(fc1(h)))))),
    the softmax in float32 under bfloat16 autocast too."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(config.hidden, config.hidden)
        self.fc2 = nn.Linear(config.hidden, len(MODALITIES))
        self.drop = _dropout(config.drop_rate, config)

    def forward(self, h: Tensor) -> Tensor:
        """h (N_m, D) -> router_weights (N_m, E), rows summing to 1."""
        return self.drop(self.fc2(self.drop(F.gelu(self.fc1(h))))).float().softmax(dim=-1)


class Fusion(nn.Module):
    """h = z + Dropout(ReLU(Linear(3D, 3D)(z))) (SPEC §4.5)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        width = len(MODALITIES) * config.hidden
        self.linear = nn.Linear(width, width)
        self.drop = _dropout(config.drop_rate, config)

    def forward(self, z: Tensor) -> Tensor:
        """z (N, M * D) -> fused (N, M * D)."""
        return z + self.drop(F.relu(self.linear(z)))


# ----------------------------------------------------------------------------- the model

@dataclass
class MoMKEOutput:
    """Predictions of the real tokens, located by `layout`. Stage 1: `unimodal[m]` (N_m, C) at
    `layout.observed[m]`. Stage 2: `fused` (N, C) at `layout.valid` and `router_weights[m]`
    (N_m, E). Modalities with no token in the batch have no entry."""

    unimodal: dict[str, Tensor]
    fused: Tensor | None
    router_weights: dict[str, Tensor]
    layout: TokenLayout


class MoMKE(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        D, C = config.hidden, config.num_outputs
        self.projections = nn.ModuleDict({m: nn.Linear(d, D)  # h_m = Dropout(x_m W_m + b_m)
                                          for m, d in zip(MODALITIES, config.input_dims)})
        self.input_drop = _dropout(config.drop_rate, config)
        self.experts = nn.ModuleDict({m: Expert(config) for m in MODALITIES})
        self.unimodal_heads = nn.ModuleDict({m: nn.Linear(D, C)  # stage 1: y_m = r_m W + b
                                             for m in MODALITIES})
        self.routers = nn.ModuleDict({m: SoftRouter(config) for m in MODALITIES})
        self.fusion = Fusion(config)
        self.head = nn.Linear(len(MODALITIES) * D, C)  # stage 2: y = h W + b

    def forward(self, features: Mapping[str, Features], available: Tensor, padding: Tensor,
                stage: int) -> MoMKEOutput:
        """`features[m]` (B, L, d_m), or a function from flat positions b * L + l (N,) to their
        rows (N, d_m) (`Batch.packed_features`: no padded copy); `available` (B, L, M) bool,
        True = observed; `padding` (B, L) bool, True = padded; `stage` 1 (unimodal heads) or 2
        (mixture and fusion)."""
        layout = TokenLayout.from_masks(available, padding)
        active = [m for m in MODALITIES if layout.count(m) > 0]
        h = {m: self.input_drop(self.projections[m](layout.gather(m, features[m])))
             for m in active}  # m -> (N_m, D)
        if stage == 1 or self.config.experts == "self":
            r = {m: self._expert(m, {m: h[m]}, layout)[m] for m in active}  # r_m = Expert_m(h_m)
        if stage == 1:
            return MoMKEOutput({m: self.unimodal_heads[m](r[m]) for m in active}, None, {}, layout)

        E = len(MODALITIES)
        if self.config.experts == "self":
            own = lambda m: F.one_hot(torch.tensor(MODALITIES.index(m)), E)  # noqa: E731
            weights = {m: own(m).to(h[m]).expand(len(h[m]), E) for m in active}
            mixed = r  # z_m = r_(m,m)
        else:
            outputs = {e: self._expert(e, h, layout) for e in MODALITIES}  # r_(m,e) = Expert_e(h_m)
            if self.config.router == "uniform":
                weights = {m: h[m].new_full((len(h[m]), E), 1.0 / E) for m in active}
            else:
                weights = {m: self.routers[m](h[m]) for m in active}  # w_m (N_m, E)
            mixed = {m: torch.einsum("ne,end->nd", weights[m],  # z_m = sum_e w_(m,e) r_(m,e)
                                     torch.stack([outputs[e][m] for e in MODALITIES]))
                     for m in active}
        z = torch.cat([layout.scatter(m, mixed[m]) if m in mixed
                       else h[active[0]].new_zeros(len(layout.valid), self.config.hidden)
                       for m in MODALITIES], dim=-1)  # z = [z_a, z_t, z_v] (N, M * D)
        return MoMKEOutput({}, self.head(self.fusion(z)), weights, layout)

    def _expert(self, e: str, tokens: dict[str, Tensor], layout: TokenLayout) -> dict[str, Tensor]:
        """Expert e over each modality's tokens (m -> (N_m, D)), all in one call."""
        modalities = list(tokens)
        r = self.experts[e](torch.cat(list(tokens.values())), layout.rows_for(modalities))
        return dict(zip(modalities, r.split([len(x) for x in tokens.values()])))

    # ------------------------------------------------------------------ stage-1 -> stage-2 hand-over

    def modality_state(self, m: str) -> dict[str, Tensor]:
        """A real copy of modality m's projection and of expert m."""
        return {name: value.detach().clone() for name, value in self.state_dict().items()
                if name.startswith((f"projections.{m}.", f"experts.{m}."))}

    def load_modality_state(self, m: str, state: Mapping[str, Tensor]) -> None:
        """Set modality m's projection and expert m to `state` through `load_state_dict`."""
        full = {k: v.clone() for k, v in self.state_dict().items()}
        full.update({name: value.clone() for name, value in state.items()})
        self.load_state_dict(full)

    def expert_parameters(self) -> list[nn.Parameter]:
        return list(self.experts.parameters())
