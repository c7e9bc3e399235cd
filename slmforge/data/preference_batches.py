"""Batches of preference pairs (slmforge.data.preference) for DPO.

A batch of B pairs is a Batch of 2B padded rows: the B chosen sequences first, then the B rejected ones in
the same order, so pair i is rows i and B + i. One sequence per row, never packed: DPO needs each reply's
log-probability, which in a row of its own is the row's sum over its targets, and the two replies of a
pair share their prompt, so packing would mostly fill rows with the same prompt twice. A sequence longer
than seq_len + 1 tokens keeps its first seq_len + 1 (the end of its reply is lost; `describe` counts it).

Stateless like ConversationBatches: epoch e's order of pairs is a function of (seed, e); global pair
g = ((step * grad_accum + micro) * world_size + rank) * batch_size + i walks through epoch after epoch, so
resuming needs only the step and N processes see the pairs one process with N times the batch would.
A source's weight repeats its pairs per epoch: 2 takes each twice, 0.5 a seeded half.
"""

from __future__ import annotations

import numpy as np
import torch

from slmforge.data.batch import Batch
from slmforge.data.conversation_batches import (
    Conversations,
    EpochOrder,
    epoch_rng,
    global_items,
    weighted_members,
)


def _batch(conversations: Conversations, pairs: list[int], width: int) -> Batch:
    """Rows of the chosen sequences of `pairs`, then of their rejected ones (2p and 2p + 1)."""
    members = [2 * p for p in pairs] + [2 * p + 1 for p in pairs]
    rows = [conversations.row(np.array([c]), width)[:2] for c in members]
    tokens, targets = (torch.from_numpy(np.stack(parts)) for parts in zip(*rows))
    return Batch(tokens, targets, paired=True)


class PairBatches:
    """`get(step, micro)`: this rank's Batch of 2 * batch_size rows, batch_size pairs."""

    def __init__(self, dataset, seq_len: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 weights: dict[str, float] | None = None, grad_accum: int = 1):
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
        self.rank, self.world_size, self.grad_accum = rank, world_size, grad_accum
        self.conversations = Conversations(dataset, "train", seq_len + 1, weights)
        self.pair_weight = self.conversations.weight[0::2]  # a pair's two sequences share their source's weight
        self.order = EpochOrder(self._pairs_of_epoch)

    def _pairs_of_epoch(self, e: int) -> np.ndarray:
        rng = epoch_rng(self.seed, e)
        return rng.permutation(weighted_members(self.pair_weight, rng))

    def __len__(self) -> int:
        return len(self.pair_weight)

    def epoch(self, e: int) -> np.ndarray:
        """The pairs of epoch e, in order."""
        return self.order.epoch(e)

    def get(self, step: int, micro: int = 0) -> Batch:
        items = global_items(step, micro, self.batch_size, self.grad_accum, self.world_size, self.rank)
        return _batch(self.conversations, [int(self.order[g]) for g in items], self.seq_len + 1)

    def describe(self) -> str:
        """One line on what the rows hold, for the run's log: the count and cost of cut sequences."""
        c = self.conversations
        text = (f"{len(self):,} preference pairs, one sequence per row: a batch of {self.batch_size} pairs is "
                f"{2 * self.batch_size} rows of {self.seq_len + 1} tokens (the chosen replies, then the rejected "
                f"ones), {len(self.epoch(0)):,} pairs per epoch")
        cut, lost, total = c.truncation()
        if cut:
            text += (f"; {cut:,} sequences are longer than seq_len + 1 = {self.seq_len + 1} and keep their first "
                     f"{self.seq_len + 1} tokens, losing {lost:,} of the {total:,} reply tokens ({lost / total:.2%})")
        return text


def preference_val_batches(dataset, seq_len: int, batch_size: int, max_batches: int,
                           weights: dict[str, float] | None = None) -> list[Batch]:
    """A fixed validation set: the val pairs in their order, up to `max_batches` paired batches of
    `batch_size` pairs (the last may be short). The DPO objective scores held-out reward accuracy and
    margins on them, and the preferred replies' cross-entropy as val_loss."""
    c = Conversations(dataset, "val", seq_len + 1, weights)
    pairs = list(range(len(c) // 2))[:max_batches * batch_size]
    return [_batch(c, pairs[i:i + batch_size], seq_len + 1) for i in range(0, len(pairs), batch_size)]
