"""Named, batch-first batches of conversations.

A `Batch` keeps the three modalities apart and carries its masks by name.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from dataloader.gcnet import MultimodalDataset


@dataclass
class Batch:
    """Named, batch-first views of B conversations. Features are gathered from the dataset's
    tables when read, so a cached evaluation batch holds indices, not copies of the features.
    `utterance_index`, `labels` and the tables are on the batch's device; the masks stay on the
    host, where the model's token layout is planned from them (MoMKE/layout.py)."""

    utterance_index: Tensor  # (B, L) long: each slot's row of the feature tables; padded slots
    # point at a zero row
    available: Tensor  # (B, L, M) bool, True = the modality is observed; on the host
    padding: Tensor  # (B, L) bool, True = a padded slot, not an utterance; on the host
    labels: Tensor  # (B, L) float32 (regression) or int64 (classes); 0 at padded slots
    conversations: list[int]  # indices into the dataset's conversations
    tables: dict[str, Tensor]  # modality -> (N + 1, d) features of the whole dataset

    @property
    def audio(self) -> Tensor:  # (B, L, d_a)
        return self.tables["a"][self.utterance_index]

    @property
    def text(self) -> Tensor:  # (B, L, d_t)
        return self.tables["t"][self.utterance_index]

    @property
    def visual(self) -> Tensor:  # (B, L, d_v)
        return self.tables["v"][self.utterance_index]

    @property
    def features(self) -> dict[str, Tensor]:
        return {"a": self.audio, "t": self.text, "v": self.visual}

    def packed_features(self) -> dict[str, Callable[[Tensor], Tensor]]:
        """Per modality, a function from flat positions (N,) to their feature rows (N, d_m),
        gathered straight from the dataset tables (no padded (B, L, d_m) copy is made)."""
        flat = self.utterance_index.reshape(-1)
        return {m: (lambda index, table=table: table.index_select(0, flat.index_select(0, index)))
                for m, table in self.tables.items()}

    def targets(self, index: Tensor) -> Tensor:
        """Labels at the flat positions `index` (b * L + l), e.g. where the model's packed
        predictions sit."""
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
        """`available` (n, M) bool (host) for the utterances of `conversations`, concatenated in
        order. On a GPU the row indices travel through pinned memory without a wait."""
        conversations = list(conversations)
        lengths = self.lengths[conversations]
        length = int(lengths.max())
        steps = torch.arange(length)
        real = steps[None, :] < lengths[:, None]  # (B, L)
        utterance_index = torch.where(real, self.offsets[conversations][:, None] + steps[None, :],
                                      self.padding_row)
        padded_available = torch.zeros(*real.shape, available.shape[1], dtype=torch.bool)
        padded_available[real] = available
        if self.device.type != "cpu":
            utterance_index = utterance_index.pin_memory().to(self.device, non_blocking=True)
        return Batch(utterance_index=utterance_index, available=padded_available, padding=~real,
                     labels=self.labels[utterance_index], conversations=conversations,
                     tables=self.features)
