"""MoMKE: projections, modality experts, soft routers and the fusion head, in one readable file.

Paper: Leveraging Knowledge of Modality Experts for Incomplete Multimodal Learning (ACM MM 2024).
Method: docs/method.md. Stage 1 trains expert m on modality m alone; stage 2 passes every
modality through all experts and mixes their outputs with a per-modality soft router.

Notation
    B  conversations in a batch          L  utterances per conversation (padded to the longest)
    D  hidden size                       M  modalities (a, t, v)      E  experts (one per modality)
    H  attention heads                   C  outputs (classes, or 1 for regression)
    N  unpadded utterances of the batch  N_m  those where modality m is observed (its tokens)
    R  rows of the packed grid           S  slots per row (S = L)

Layout. Padded and missing utterances contribute nothing to the method, so the model computes only
real tokens: each modality's tokens are gathered from the (B, L) batch, and for the experts they
are laid out in rows of L slots with an attention mask that keeps every conversation to itself
(`TokenLayout` in MoMKE/layout.py, the one place that knows where tokens sit; it is computed on the
host where the batch is assembled). An expert takes its tokens (N, D); only its attention lays
them out in those rows (`PackedRows`), so every linear layer computes real tokens only. Rows
longer than `LONG_ROW` (long conversations) have no such mask, which grows with L squared: their
attention runs one conversation at a time, in memory linear in L (`Attention._per_conversation`).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Mapping, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from MoMKE.layout import MODALITIES, PackedRows, TokenLayout

Features = Union[Tensor, Callable[[Tensor], Tensor]]  # (B, L, d), or flat positions (N,) -> (N, d)

# How attention lays out tokens, by device (MoMKE/layout.py). CPU: short conversations share rows,
# so attention computes far fewer empty slots, which a CPU pays for (measured: README, Runtime).
# GPU: every conversation its own row, the dense padded (B, L, L) attention: a GPU has the
# arithmetic to spare, and the layout needs no first-fit search on the host. Both compute the same
# attention (tests/test_model.py holds them to the same outputs and gradients).
PACKING = {"cpu": "shared", "cuda": "own"}


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


# ----------------------------------------------------------------------------- building blocks

class BitDropout(nn.Dropout):
    """`nn.Dropout` whose CPU keep-mask comes from random bits: at p = 0.5 one random byte gives
    eight fair coins, otherwise a uniform draw is compared with p. Each element is kept with
    probability 1 - p and scaled by 1 / (1 - p), as in `nn.Dropout`; only the random stream
    differs. On the CPU `F.dropout` draws through a path several times slower. Under
    `torch.compile` the mask is drawn by the same code, behind an opaque operator, so compiled and
    eager training draw the same masks; elsewhere (GPU) it is `nn.Dropout`."""

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0 or x.device.type != "cpu":
            return super().forward(x)
        draw = torch.ops.momke.keep_mask if torch.compiler.is_compiling() else _keep_mask
        return x.mul(draw(x, self.p)).mul_(1.0 / (1.0 - self.p))  # autograd keeps the byte mask


_SHIFTS = torch.arange(8, dtype=torch.uint8)


def _keep_mask(x: Tensor, p: float) -> Tensor:
    """A uint8 mask of x's shape, 1 with probability 1 - p, from the global CPU generator."""
    if p == 0.5:
        coins = torch.empty((x.numel() + 7) // 8, dtype=torch.uint8).random_()
        return ((coins[:, None] >> _SHIFTS) & 1).view(-1)[:x.numel()].view(x.shape)
    return (torch.rand(x.shape) >= p).view(torch.uint8)


# The compiler would otherwise draw dropout with its own per-element generator, which on a CPU
# made compiled epochs slower than eager ones (docs/precision-and-speed.md, "Where the time
# goes"). A CPU kernel only: on a GPU `BitDropout` is `nn.Dropout`. The fake mask sits on x's
# device.
torch.library.custom_op("momke::keep_mask", _keep_mask, mutates_args=(), device_types="cpu")
torch.library.register_fake("momke::keep_mask")(
    lambda x, p: x.new_empty(x.shape, dtype=torch.uint8))


def _dropout(p: float, config: ModelConfig) -> nn.Dropout:
    return BitDropout(p) if config.bit_dropout else nn.Dropout(p)


class Attention(nn.Module):
    """Multi-head self-attention within each conversation, masked, with no output projection
    (docs/method.md, The experts)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.scale = (config.hidden // config.num_heads) ** -0.5
        self.qkv = nn.Linear(config.hidden, 3 * config.hidden)  # [q, k, v] = x W_qkv + b
        self.attn_drop = nn.Dropout(config.attn_drop_rate)

    def forward(self, x: Tensor, packed: PackedRows) -> Tensor:
        """x (N, D) tokens -> z (N, D). Each token attends to the keys its row's mask allows
        (`packed.attend`, (R, S, S) bool); z = 0 for a query with no valid key."""
        qkv = self.qkv(x)  # (N, 3D)
        if packed.per_conversation:  # rows longer than LONG_ROW (MoMKE/layout.py): no square mask
            return self._per_conversation(qkv, packed)
        return self._in_rows(qkv, packed)

    def _in_rows(self, qkv: Tensor, packed: PackedRows) -> Tensor:
        """softmax(q k^T / sqrt(D/H)) v in the packed rows, the (R, H, S, S) scores explicit."""
        attend, D = packed.attend, qkv.shape[-1] // 3
        R, S, _ = attend.shape
        q, k, v = packed.pack(qkv).view(R, S, 3, self.num_heads, D // self.num_heads).permute(
            2, 0, 3, 1, 4)  # (R, H, S, D/H) each
        scores = (q @ k.transpose(-2, -1)).float() * self.scale  # (R, H, S, S)
        # The softmax runs in float32 under bf16 autocast too. A finite fill keeps rows without
        # a valid key finite; they are zeroed below.
        scores = scores.masked_fill(~attend[:, None], torch.finfo(torch.float32).min)
        weights = self.attn_drop(scores.softmax(dim=-1)).to(v.dtype)
        z = (weights @ v).transpose(1, 2).reshape(R, S, D)  # heads concatenated
        return packed.unpack(z * attend.any(dim=-1, keepdim=True))

    @torch.compiler.disable  # eager under --compile: conversation sizes change every batch
    def _per_conversation(self, qkv: Tensor, packed: PackedRows) -> Tensor:
        """The same attention, one conversation at a time through torch's fused kernel, which
        never holds the scores (float32 accumulation under bf16 too). A conversation's tokens
        are all valid keys of each other, so no mask is needed, and no query lacks a key.
        Attention dropout is the kernel's own (same rate, another random stream; it makes the
        kernel hold the scores of each conversation again: docs/precision-and-speed.md)."""
        N, D = qkv.shape[0], qkv.shape[-1] // 3
        q, k, v = qkv.view(N, 3, self.num_heads, D // self.num_heads).permute(1, 2, 0, 3)
        p = self.attn_drop.p if self.training else 0.0
        z = [F.scaled_dot_product_attention(qc[None], kc[None], vc[None], dropout_p=p,
                                            scale=self.scale)[0]  # (H, n, D/H)
             for qc, kc, vc in zip(*(t.split(packed.segments, dim=1) for t in (q, k, v)))]
        return torch.cat(z, dim=1).transpose(0, 1).reshape(N, D)  # heads concatenated


class ExpertLayer(nn.Module):
    """One expert layer: z = Attention(x); z + MLP(z), no LayerNorm (docs/method.md,
    The experts)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        inner = int(config.hidden * config.mlp_ratio)
        self.attention = Attention(config)
        self.fc1 = nn.Linear(config.hidden, inner)
        self.fc2 = nn.Linear(inner, config.hidden)
        self.drop = _dropout(config.drop_rate, config)

    def forward(self, x: Tensor, packed: PackedRows) -> Tensor:
        """x (N, D) tokens -> (N, D); attention within the `packed` rows, the MLP per token."""
        z = self.attention(x, packed)
        return z + self.drop(self.fc2(self.drop(F.gelu(self.fc1(z)))))  # z + MLP(z)


class Expert(nn.Module):
    """One modality expert: `depth` layers added residually, x <- x + layer(x) (docs/method.md,
    The experts)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(ExpertLayer(config) for _ in range(config.depth))

    def forward(self, x: Tensor, packed: PackedRows) -> Tensor:
        """x (N, D) tokens, laid out for attention in the `packed` rows -> r (N, D)."""
        for layer in self.layers:
            x = x + layer(x, packed)
        return x


class SoftRouter(nn.Module):
    """Per-token weights over the experts: w = softmax(Dropout(fc2(Dropout(GELU(fc1(h)))))),
    the softmax in float32 under bfloat16 autocast too (docs/method.md, The router)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(config.hidden, config.hidden)
        self.fc2 = nn.Linear(config.hidden, len(MODALITIES))
        self.drop = _dropout(config.drop_rate, config)

    def forward(self, h: Tensor) -> Tensor:
        """h (N_m, D) -> router_weights (N_m, E), rows summing to 1."""
        return self.drop(self.fc2(self.drop(F.gelu(self.fc1(h))))).float().softmax(dim=-1)


class Fusion(nn.Module):
    """h = z + Dropout(ReLU(Linear(3D, 3D)(z))) (docs/method.md, Mixing, fusion and the heads)."""

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

    def forward(self, features: Mapping[str, Features], layout: TokenLayout,
                stage: int) -> MoMKEOutput:
        """`features[m]` (B, L, d_m), or a function from flat positions b * L + l (N,) to their
        rows (N, d_m) (`Batch.packed_features`: no padded copy); `layout` where the tokens sit,
        `TokenLayout.from_masks(available, padding)` with `available` (B, L, M) bool, True =
        observed, and `padding` (B, L) bool, True = padded; `stage` 1 (unimodal heads) or 2
        (mixture and fusion)."""
        active = [m for m in MODALITIES if layout.count(m) > 0]
        h = {m: self.input_drop(self.projections[m](layout.gather(m, features[m])))
             for m in active}  # m -> (N_m, D)
        if stage == 1 or self.config.experts == "self":
            r = {m: self._expert(m, {m: h[m]}, layout)[m] for m in active}  # r_m = Expert_m(h_m)
        if stage == 1:
            return MoMKEOutput({m: self.unimodal_heads[m](r[m]) for m in active}, None, {}, layout)

        E = len(MODALITIES)
        if self.config.experts == "self":
            weights = {m: h[m].new_zeros(len(h[m]), E) for m in active}
            for m in active:
                weights[m][:, MODALITIES.index(m)] = 1.0  # each token on its own expert
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
        r = self.experts[e](torch.cat(list(tokens.values())), layout.packed_rows(modalities))
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
