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
    token of m inside `valid`. For attention, conversations are packed into R rows of L slots
    (first-fit, longest first; several short conversations share a row), so attention work follows
    the real utterances instead of B padded rows: `slots[m]` are the tokens' positions r * L + j in
    that packed grid and `same_conversation` (R, L, L) says which slots may attend to each other.
    """

    batch: int
    length: int
    rows: int
    observed: dict[str, Tensor]  # m -> (N_m,) long, sorted
    valid: Tensor  # (N,) long, sorted
    valid_position: dict[str, Tensor]  # m -> (N_m,) long
    slots: dict[str, Tensor]  # m -> (N_m,) long, positions in the packed (R, L) grid
    same_conversation: Tensor  # (R, L, L) bool

    @classmethod
    def from_masks(cls, available: Tensor, padding: Tensor) -> TokenLayout:
        """`available` (B, L, M) bool, True = observed; `padding` (B, L) bool, True = padded slot."""
        batch, length = padding.shape
        real = ~padding
        row_of, start_of, rows = _pack_rows((real.sum(dim=1)).tolist(), length)
        packed = (torch.tensor(row_of)[:, None] * length + torch.tensor(start_of)[:, None]
                  + torch.arange(length)[None, :]).reshape(-1)  # (B * L,), junk where padded
        flat_real = real.reshape(-1)
        valid = flat_real.nonzero().squeeze(1)
        observed = {m: (available[..., i].reshape(-1) & flat_real).nonzero().squeeze(1)
                    for i, m in enumerate(MODALITIES)}
        segment = torch.full((rows * length,), -1, dtype=torch.long)
        segment[packed[valid]] = valid // length  # which conversation fills each packed slot
        segment = segment.view(rows, length)
        same = (segment[:, :, None] == segment[:, None, :]) & (segment[:, :, None] >= 0)
        return cls(batch, length, rows, observed, valid,
                   {m: torch.searchsorted(valid, idx) for m, idx in observed.items()},
                   {m: packed[idx] for m, idx in observed.items()}, same)

    def to(self, device: torch.device | str) -> TokenLayout:
        move = lambda t: t.to(device, non_blocking=True)  # noqa: E731
        return TokenLayout(self.batch, self.length, self.rows,
                           {m: move(t) for m, t in self.observed.items()}, move(self.valid),
                           {m: move(t) for m, t in self.valid_position.items()},
                           {m: move(t) for m, t in self.slots.items()},
                           move(self.same_conversation))

    def count(self, m: str) -> int:
        return int(self.observed[m].shape[0])


def _pack_rows(lengths: list[int], capacity: int) -> tuple[list[int], list[int], int]:
    """First-fit decreasing: (row, start) of every sequence in rows of `capacity` slots."""
    row_of, start_of = [0] * len(lengths), [0] * len(lengths)
    used: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        row = next((r for r, u in enumerate(used) if u + lengths[i] <= capacity), len(used))
        if row == len(used):
            used.append(0)
        row_of[i], start_of[i] = row, used[row]
        used[row] += lengths[i]
    return row_of, start_of, len(used)


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

    def utterance_count(self, conversations: Sequence[int]) -> int:
        return int(self.lengths[list(conversations)].sum())

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
