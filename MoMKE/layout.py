"""Where the tokens of a batch sit, and how they are laid out in rows for attention.

Method: docs/method.md, Inputs and the token layout (padded and missing utterances contribute
nothing, so only real tokens are computed).
A `TokenLayout` is computed on the host from a batch's masks, where the batch is assembled, and
moved to the batch's device with it: the forward pass then indexes with device tensors only and
never waits for the host (no `.cpu()`, no `nonzero` inside `forward`).

Two packings of a modality's tokens into rows of L slots (`PACKING` in MoMKE/model.py picks one
per device):
    shared  several short conversations share a row (first fit, longest first), each kept to
            itself by the attention mask: fewer empty slots, which is what a CPU pays for
            (the measured figure: README.md, Runtime)
    own     every conversation its own row: the padded (B, L, L) attention, computed without
            the first-fit search
Both give the same attention (a test holds them to the same outputs and gradients).

Rows longer than `LONG_ROW` get no (R, L, L) mask, which grows with L squared: their attention
runs one conversation at a time (`PackedRows.segments`), and nothing here grows faster than L.

Shapes: B conversations, L utterances (padded), M modalities, N unpadded utterances, N_m those
where modality m is observed, R rows, S slots per row (S = L).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

MODALITIES = ("a", "t", "v")
PACKINGS = ("shared", "own")

# Rows longer than this attend one conversation at a time through torch's fused attention kernel
# (MoMKE/model.py, `Attention._per_conversation`), whose memory grows linearly with the
# conversation instead of with its square. Shorter rows keep the explicit softmax: a whole stage-2
# training epoch at GCNet's sizes runs 1.15x (CMU-MOSI) and 1.10x (IEMOCAP-4) longer with every
# row on the fused path, although attention alone is slightly faster there; at 1,000-6,000
# utterances the fused path is the one that fits (docs/precision-and-speed.md, "Long
# conversations", with the commands and dates).
LONG_ROW = 512


def attends_per_conversation(length: int) -> bool:
    """Whether rows of `length` slots attend one conversation at a time (no square mask)."""
    return length > LONG_ROW


@dataclass
class PackedRows:
    """Tokens (N, D) laid out in R rows of S slots for attention: `slots` (N,) is each token's
    slot r * S + j, `attend` (R, S, S) bool who may attend to whom; for rows longer than
    `LONG_ROW` no `attend`, and `segments` the token counts of the conversations in token order
    (each conversation's tokens are contiguous): attention then runs per conversation."""

    slots: Tensor
    attend: Tensor | None
    segments: tuple[int, ...] = ()

    @property
    def per_conversation(self) -> bool:
        return self.attend is None

    def pack(self, x: Tensor) -> Tensor:
        """(N, d) -> (R, S, d), zero in empty slots."""
        R, S, _ = self.attend.shape
        return x.new_zeros(R * S, x.shape[-1]).index_copy(0, self.slots, x).view(R, S, -1)

    def unpack(self, grid: Tensor) -> Tensor:
        """(R, S, d) -> (N, d)."""
        return grid.reshape(-1, grid.shape[-1]).index_select(0, self.slots)


@dataclass
class TokenLayout:
    """Where the tokens of a (B, L) batch sit, and how they are packed for attention.

    `observed[m]` (N_m,) are the flat positions b * L + l of the unpadded utterances where m is
    observed, `valid` (N,) those of all unpadded utterances, and `valid_position[m]` (N_m,) the
    place of each token of m inside `valid`. For the experts, the tokens of m fill `row_counts[m]` rows
    of L slots, each conversation's tokens contiguous and in order (see the module docstring for
    the two packings); `slots[m]` (N_m,) is each token's slot r * L + j and `attend[m]`
    (R_m, L, L) says which slots may attend to which (same conversation, real key), None where
    L > `LONG_ROW`; `segments[m]` are the token counts of the conversations where m is observed.
    """

    conversations: int  # B
    length: int  # L
    observed: dict[str, Tensor]
    valid: Tensor
    valid_position: dict[str, Tensor]
    row_counts: dict[str, int]
    slots: dict[str, Tensor]
    attend: dict[str, Tensor | None]
    segments: dict[str, tuple[int, ...]] = field(default_factory=dict)
    _stacked: dict[tuple[str, ...], PackedRows] = field(default_factory=dict, repr=False)

    @classmethod
    def from_masks(cls, available: Tensor, padding: Tensor, packing: str = "shared"
                   ) -> TokenLayout:
        """`available` (B, L, M) bool, True = observed; `padding` (B, L) bool, True = padded;
        both on the host (the packing is planned with host integers). Move the result to the
        batch's device with `to`."""
        if available.device.type != "cpu" or padding.device.type != "cpu":
            raise ValueError("TokenLayout.from_masks takes host masks: compute the layout where "
                             "the batch is assembled, then move it with .to(device).")
        if packing not in PACKINGS:
            raise ValueError(f"packing {packing!r}: use one of {', '.join(PACKINGS)}.")
        length = padding.shape[1]
        valid = (~padding).reshape(-1).nonzero().squeeze(1)
        observed, row_counts, slots, attend, segments = {}, {}, {}, {}, {}
        packings: dict[tuple[int, ...], tuple[int, Tensor, Tensor]] = {}
        for i, m in enumerate(MODALITIES):
            present = available[..., i] & ~padding  # (B, L)
            observed[m] = present.reshape(-1).nonzero().squeeze(1)
            per_conversation = present.sum(dim=1)  # (B,)
            counts = tuple(per_conversation.tolist())
            if counts not in packings:  # fixed conditions: every modality packs alike
                packings[counts] = _pack_rows(counts, length, shared=packing == "shared",
                                              mask=not attends_per_conversation(length))
            row_counts[m], start, attend[m] = packings[counts]
            segments[m] = tuple(n for n in counts if n)
            conversation = observed[m] // length
            first = per_conversation.cumsum(0) - per_conversation  # (B,) first token of each
            rank = torch.arange(len(observed[m])) - first[conversation]  # place in its conversation
            slots[m] = start[conversation] + rank
        valid_position = {m: torch.searchsorted(valid, t) for m, t in observed.items()}
        return cls(padding.shape[0], length, observed, valid, valid_position, row_counts, slots, attend,
                   segments)

    def to(self, device: torch.device) -> TokenLayout:
        """This layout on `device`; to a GPU through pinned memory, without waiting for it."""
        if device.type == "cpu":
            return self
        move = lambda t: t.pin_memory().to(device, non_blocking=True)  # noqa: E731
        moved = lambda d: {m: None if t is None else move(t) for m, t in d.items()}  # noqa: E731
        return TokenLayout(self.conversations, self.length, moved(self.observed), move(self.valid),
                           moved(self.valid_position), dict(self.row_counts), moved(self.slots),
                           moved(self.attend), dict(self.segments))

    def count(self, m: str) -> int:
        return int(self.observed[m].shape[0])

    def gather(self, m: str, x) -> Tensor:
        """The tokens of m, (N_m, d): rows of a padded (B, L, d) tensor, or what a function of
        the flat positions returns (it can read them straight from a feature table)."""
        if callable(x) and not isinstance(x, Tensor):
            return x(self.observed[m])
        return x.reshape(-1, x.shape[-1]).index_select(0, self.observed[m])

    def packed_rows(self, modalities: list[str]) -> PackedRows:
        """The packed rows of `modalities`, stacked in that order, for their tokens concatenated
        in the same order (built once per layout and tuple of modalities)."""
        key = tuple(modalities)
        if key not in self._stacked:
            offsets = [0]
            for m in modalities:
                offsets.append(offsets[-1] + self.row_counts[m])
            slots = torch.cat([self.slots[m] + offsets[k] * self.length
                               for k, m in enumerate(modalities)])
            masks = [self.attend[m] for m in modalities]
            self._stacked[key] = PackedRows(
                slots, None if masks[0] is None else torch.cat(masks),
                sum((self.segments[m] for m in modalities), ()))
        return self._stacked[key]

    def scatter(self, m: str, x: Tensor) -> Tensor:
        """Tokens of m (N_m, D) placed among all unpadded utterances: (N, D), zero where m is
        missing."""
        return x.new_zeros(self.valid.shape[0], x.shape[-1]).index_copy(
            0, self.valid_position[m], x)


def _pack_rows(counts: tuple[int, ...], capacity: int, *, shared: bool, mask: bool
               ) -> tuple[int, Tensor, Tensor | None]:
    """Place sequences of `counts` tokens in rows of `capacity` slots: `shared` first fit,
    longest first, else one row per non-empty sequence, in order. Returns (rows, first slot of
    each sequence (B,), (rows, capacity, capacity) who may attend to whom, or None without
    `mask`)."""
    start = [0] * len(counts)
    used: list[int] = []  # filled slots per row
    order = sorted(range(len(counts)), key=lambda i: -counts[i]) if shared else range(len(counts))
    for i in order:
        if counts[i] == 0:
            continue
        row = next((r for r, u in enumerate(used) if u + counts[i] <= capacity), len(used)) \
            if shared else len(used)
        if row == len(used):
            used.append(0)
        start[i] = row * capacity + used[row]
        used[row] += counts[i]
    owner = torch.full((len(used) * capacity,), -1, dtype=torch.long)  # conversation of each slot
    for i, n in enumerate(counts):
        owner[start[i]:start[i] + n] = i
    owner = owner.view(len(used), capacity)
    if not mask:  # attention per conversation: no square mask
        return len(used), torch.tensor(start, dtype=torch.long), None
    attend = (owner[:, :, None] == owner[:, None, :]) & (owner[:, None, :] >= 0)
    return len(used), torch.tensor(start, dtype=torch.long), attend
