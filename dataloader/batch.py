"""Named, batch-first batches of conversations, and where their tokens sit.

From: STYLE §4. A `Batch` keeps the three modalities apart and carries its masks by name; its
`TokenLayout` lists, per modality, the flat (b * L + l) positions of the observed, unpadded
utterances, computed on the host when the batch is built so the GPU never waits on it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from dataloader.datasets import MODALITIES
from dataloader.gcnet import MultimodalDataset


@dataclass
class TokenLayout:
    """Where the tokens of a (B, L) batch sit, computed once on the host when the batch is built.

    `observed[m]` are the flat positions b * L + l of the unpadded utterances where modality m is
    observed; `valid` those of all unpadded utterances; `valid_position[m]` locates each observed
    token of m inside `valid`. For attention, the observed utterances of m are packed into
    `rows[m]` rows of L slots (each conversation's utterances of m contiguous and in order; several
    short conversations share a row, first-fit, longest first), so attention runs on real
    tokens and a few holes instead of B padded rows: `slots[m]` is each token's position
    r * L + j in that grid, and `attend[m]` (R_m, L, L) says which slots may attend to each other
    (the same conversation, a real key).
    """

    batch: int
    length: int
    observed: dict[str, Tensor]  # m -> (N_m,) long, sorted
    valid: Tensor  # (N,) long, sorted
    valid_position: dict[str, Tensor]  # m -> (N_m,) long
    rows: dict[str, int]  # m -> R_m
    slots: dict[str, Tensor]  # m -> (N_m,) long, positions in m's packed (R_m, L) grid
    attend: dict[str, Tensor]  # m -> (R_m, L, L) bool

    @classmethod
    def from_masks(cls, available: Tensor, padding: Tensor) -> TokenLayout:
        """`available` (B, L, M) bool, True = observed; `padding` (B, L) bool, True = padded slot."""
        batch, length = padding.shape
        flat_real = (~padding).reshape(-1)
        valid = flat_real.nonzero().squeeze(1)
        observed, rows, slots, attend = {}, {}, {}, {}
        packings: dict[tuple[int, ...], tuple] = {}
        for i, m in enumerate(MODALITIES):
            present = available[..., i] & ~padding  # (B, L)
            observed[m] = present.reshape(-1).nonzero().squeeze(1)
            counts = tuple(present.sum(dim=1).tolist())
            if counts not in packings:  # fixed conditions: every modality packs alike
                packings[counts] = _packed_grid(counts, length)
            rows[m], start, attend[m] = packings[counts]
            conversation = observed[m] // length
            rank = torch.cumsum(present.reshape(-1).long(), 0)[observed[m]] - 1 \
                - present.sum(dim=1).cumsum(0).sub(present.sum(dim=1))[conversation]
            slots[m] = start[conversation] + rank  # (N_m,) position within m's grid
        return cls(batch, length, observed, valid,
                   {m: torch.searchsorted(valid, idx) for m, idx in observed.items()},
                   rows, slots, attend)

    def to(self, device: torch.device | str) -> TokenLayout:
        move = lambda t: t.to(device, non_blocking=True)  # noqa: E731
        return TokenLayout(self.batch, self.length,
                           {m: move(t) for m, t in self.observed.items()}, move(self.valid),
                           {m: move(t) for m, t in self.valid_position.items()}, self.rows,
                           {m: move(t) for m, t in self.slots.items()},
                           {m: move(t) for m, t in self.attend.items()})

    def count(self, m: str) -> int:
        return int(self.observed[m].shape[0])


def _packed_grid(counts: tuple[int, ...], capacity: int) -> tuple[int, Tensor, Tensor]:
    """Pack sequences of `counts` utterances into rows of `capacity` slots (first-fit,
    longest first): (rows, start slot of each sequence, (rows, L, L) who-may-attend-whom)."""
    start = [0] * len(counts)
    used: list[int] = []
    for i in sorted(range(len(counts)), key=lambda i: -counts[i]):
        if counts[i] == 0:
            continue
        row = next((r for r, u in enumerate(used) if u + counts[i] <= capacity), len(used))
        if row == len(used):
            used.append(0)
        start[i] = row * capacity + used[row]
        used[row] += counts[i]
    rows = len(used)
    segment = torch.full((rows * capacity,), -1, dtype=torch.long)
    for i, n in enumerate(counts):
        segment[start[i]:start[i] + n] = i
    segment = segment.view(rows, capacity)
    attend = (segment[:, :, None] == segment[:, None, :]) & (segment[:, None, :] >= 0)
    return rows, torch.tensor(start, dtype=torch.long), attend


@dataclass
class Batch:
    """Named, batch-first views of B conversations. Features are gathered from the dataset's
    tables when read, so a cached evaluation batch holds indices, not copies of the features."""

    rows: Tensor  # (B, L) long: dataset row of each slot; padded slots point at a zero row
    available: Tensor  # (B, L, M) bool, True = the modality is observed
    padding: Tensor  # (B, L) bool, True = a padded slot, not an utterance
    labels: Tensor  # (B, L) float32 (regression) or int64 (classes); 0 at padded slots
    conversations: list[int]  # indices into the dataset's conversations
    layout: TokenLayout
    tables: dict[str, Tensor]  # modality -> (N + 1, d) features of the whole dataset

    @property
    def audio(self) -> Tensor:  # (B, L, d_a)
        return self.tables["a"][self.rows]

    @property
    def text(self) -> Tensor:  # (B, L, d_t)
        return self.tables["t"][self.rows]

    @property
    def visual(self) -> Tensor:  # (B, L, d_v)
        return self.tables["v"][self.rows]

    @property
    def features(self) -> dict[str, Tensor]:
        return {"a": self.audio, "t": self.text, "v": self.visual}

    def packed_features(self) -> dict[str, Callable[[Tensor], Tensor]]:
        """Per modality, a function from flat positions (N,) to their feature rows (N, d_m),
        gathered straight from the dataset tables (no padded (B, L, d_m) copy is made)."""
        flat = self.rows.reshape(-1)
        return {m: (lambda index, table=table: table.index_select(0, flat.index_select(0, index)))
                for m, table in self.tables.items()}

    def targets(self, index: Tensor) -> Tensor:
        """Labels at the flat positions `index` (packed like the model's predictions)."""
        return self.labels.reshape(-1).index_select(0, index)


class BatchBuilder:
    """Builds batches of whole conversations from a dataset held on `device` once."""

    def __init__(self, data: MultimodalDataset, device: torch.device) -> None:
        self.device = device
        self.offsets = torch.from_numpy(data.offsets)
        self.lengths = torch.from_numpy(np.diff(data.offsets))
        # One zero row at the end: padded slots index it.
        self.features = {m: torch.cat([torch.from_numpy(x), torch.zeros(1, x.shape[1])]).to(device)
                         for m, x in data.features.items()}
        labels = torch.from_numpy(data.labels)
        self.labels = torch.cat([labels, labels.new_zeros(1)]).to(device)
        self.padding_row = data.num_utterances

    def build(self, conversations: Sequence[int], available: Tensor) -> Batch:
        """`available` (n, M) bool for the utterances of `conversations`, concatenated in order."""
        conversations = list(conversations)
        lengths = self.lengths[conversations]
        length = int(lengths.max())
        steps = torch.arange(length)
        real = steps[None, :] < lengths[:, None]  # (B, L)
        rows = torch.where(real, self.offsets[conversations][:, None] + steps[None, :],
                           self.padding_row)
        padded_available = torch.zeros(*real.shape, len(MODALITIES), dtype=torch.bool)
        padded_available[real] = available
        padding = ~real
        layout = TokenLayout.from_masks(padded_available, padding)
        rows = rows.to(self.device, non_blocking=True)
        return Batch(rows=rows, available=padded_available.to(self.device, non_blocking=True),
                     padding=padding.to(self.device, non_blocking=True),
                     labels=self.labels[rows], conversations=conversations,
                     layout=layout.to(self.device), tables=self.features)
