"""One batch of training or evaluation rows, as every batch source hands it to the trainer."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

IGNORE = -100  # a target that is not trained on or scored (cross_entropy's ignore_index)


@dataclass
class Batch:
    """tokens and targets int64 [B, T]; targets are the next tokens, IGNORE where nothing is learned (a
    user's turn, padding, the first token of a packed document). Packed rows also carry positions (each
    document counts from 0) and documents (the index of each token's document in its row; -1 for padding):
    attention never crosses from one document to another. A paired batch (preference data) holds B chosen
    sequences, then their B rejected ones: pair i is rows i and B + i."""

    tokens: torch.Tensor
    targets: torch.Tensor
    positions: torch.Tensor | None = None
    documents: torch.Tensor | None = None
    paired: bool = False

    def to(self, device, non_blocking: bool = False) -> Batch:
        move = lambda t: None if t is None else t.to(device, non_blocking=non_blocking)  # noqa: E731
        return replace(self, tokens=move(self.tokens), targets=move(self.targets), positions=move(self.positions),
                       documents=move(self.documents))

    @property
    def examples(self) -> int:
        """Rows, or pairs of a paired batch."""
        return len(self) // 2 if self.paired else len(self)

    def share(self, start: int, stop: int) -> Batch:
        """Examples start..stop-1 (a process's share of a global batch): rows, or both rows of each pair."""
        index = torch.arange(start, min(stop, self.examples))
        if self.paired:
            index = torch.cat([index, index + self.examples])
        cut = lambda t: None if t is None else t[index]  # noqa: E731
        return replace(self, tokens=cut(self.tokens), targets=cut(self.targets), positions=cut(self.positions),
                       documents=cut(self.documents))

    def __len__(self) -> int:
        return self.tokens.shape[0]

    @property
    def scored(self) -> int:
        """Targets that count (not IGNORE)."""
        return int((self.targets != IGNORE).sum())

    def model_inputs(self) -> dict:
        """Keyword arguments of a model forward: positions and documents only where the rows are packed."""
        if self.documents is None:
            return {}
        return {"positions": self.positions, "documents": self.documents}
