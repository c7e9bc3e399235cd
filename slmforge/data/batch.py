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
    attention never crosses from one document to another."""

    tokens: torch.Tensor
    targets: torch.Tensor
    positions: torch.Tensor | None = None
    documents: torch.Tensor | None = None

    def to(self, device, non_blocking: bool = False) -> Batch:
        move = lambda t: None if t is None else t.to(device, non_blocking=non_blocking)  # noqa: E731
        return Batch(move(self.tokens), move(self.targets), move(self.positions), move(self.documents))

    def rows(self, start: int, stop: int) -> Batch:
        """Rows start..stop-1 (a process's share of a global batch)."""
        cut = lambda t: None if t is None else t[start:stop]  # noqa: E731
        return replace(self, tokens=self.tokens[start:stop], targets=self.targets[start:stop],
                       positions=cut(self.positions), documents=cut(self.documents))

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
