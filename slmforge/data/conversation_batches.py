"""Batches of whole conversations from a chat dataset (slmforge.data.chat), packed or padded.

Packed: conversations are laid side by side in rows of seq_len + 1 tokens, in a shuffled order, each
starting a new row when it no longer fits; every token carries its conversation's index in the row and its
position in it, and the model attends only within a conversation. Padded: one conversation per row (the
multi-scale model cannot pack). A conversation longer than seq_len + 1 tokens keeps its first seq_len + 1.
The targets are the next tokens where the mask says they are learned, IGNORE elsewhere (and across
conversations).

Stateless like `TrainBatches`: epoch e's order and rows are a function of (seed, e); global row
g = ((step * grad_accum + micro) * world_size + rank) * batch_size + i walks through epoch after epoch, so
resuming needs only the step and N processes see the rows one process with N times the batch would.
A source's weight repeats its conversations per epoch: 2 takes each twice, 0.5 a seeded half.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Sequence

import numpy as np
import torch

from slmforge.data.batch import IGNORE, Batch
from slmforge.data.loader import mixture_weights


class Conversations:
    """The conversations of one split of a chat dataset: (source, start, length) of each, lengths cut."""

    def __init__(self, dataset, split: str, cut: int, weights: dict[str, float] | None):
        self.tokens, self.masks, self.pad_id = [], [], dataset.pad_id
        starts, lengths, sources, repeats = [], [], [], []
        arrays = dataset.train if split == "train" else dataset.val
        for name, weight in mixture_weights(dataset, weights).items():
            offsets = dataset.offsets[split][name]
            if weight == 0 or len(offsets) < 2:
                continue
            index = len(self.tokens)
            self.tokens.append(arrays[name])
            self.masks.append(dataset.masks[split][name])
            starts.append(offsets[:-1])
            lengths.append(np.diff(offsets))
            sources.append(np.full(len(offsets) - 1, index))
            repeats.append(np.full(len(offsets) - 1, weight))
        if not starts:
            raise ValueError(f"the {split} split of {dataset.path} has no conversation in a source of non-zero weight")
        self.start, self.full_length = np.concatenate(starts), np.concatenate(lengths)
        self.source, self.weight = np.concatenate(sources), np.concatenate(repeats)
        self.length = np.minimum(self.full_length, cut)

    def __len__(self) -> int:
        return len(self.start)

    def truncation(self) -> tuple[int, int, int]:
        """(conversations cut, learned tokens cut off, learned tokens in all)."""
        cut, lost, total = 0, 0, 0
        for i in np.flatnonzero(self.full_length > self.length):
            mask = self.masks[self.source[i]][self.start[i]:self.start[i] + self.full_length[i]]
            cut, lost = cut + 1, lost + int(mask[self.length[i]:].sum())
        total = sum(int(np.asarray(m).sum()) for m in self.masks)
        return cut, lost, total

    def row(self, members: np.ndarray, width: int) -> tuple[np.ndarray, ...]:
        """(tokens, targets, positions, documents) of length width - 1 for the conversations `members`."""
        tokens = np.full(width, self.pad_id, dtype=np.int64)
        learned = np.zeros(width, dtype=bool)
        documents = np.full(width, -1, dtype=np.int64)
        positions = np.zeros(width, dtype=np.int64)
        at = 0
        for d, c in enumerate(members):
            s, n, src = self.start[c], self.length[c], self.source[c]
            tokens[at:at + n] = self.tokens[src][s:s + n]
            learned[at:at + n] = self.masks[src][s:s + n] != 0
            documents[at:at + n] = d
            positions[at:at + n] = np.arange(n)
            at += n
        targets = np.where(learned[1:] & (documents[1:] == documents[:-1]) & (documents[1:] >= 0), tokens[1:], IGNORE)
        return tokens[:-1], targets, positions[:-1], documents[:-1]


def _rows(lengths: np.ndarray, order: np.ndarray, width: int, pack: bool) -> list[np.ndarray]:
    """Conversations `order` laid into rows of `width` tokens, in order (padded: one per row)."""
    if not pack:
        return [order[i:i + 1] for i in range(len(order))]
    rows, current, used = [], [], 0
    for c in order:
        n = int(lengths[c])
        if used + n > width and current:
            rows.append(np.array(current))
            current, used = [], 0
        current.append(c)
        used += n
    if current:
        rows.append(np.array(current))
    return rows


def _to_batch(rows: list[tuple[np.ndarray, ...]], pack: bool) -> Batch:
    tokens, targets, positions, documents = (torch.from_numpy(np.stack(parts)) for parts in zip(*rows))
    return Batch(tokens, targets, positions, documents) if pack else Batch(tokens, targets)


def weighted_members(weight: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Item indices for one epoch, each repeated by its weight: 2 twice, 0.5 in a seeded half of epochs."""
    whole = np.floor(weight).astype(np.int64)
    extra = rng.random(len(weight)) < weight - whole  # the fractional part of a weight, drawn per epoch
    return np.repeat(np.arange(len(weight)), whole + extra)


def epoch_rng(seed: int, e: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, e])))


class EpochOrder:
    """Epoch after epoch of items, addressed by one global index: epoch e is `make(e)`, a function of e (and
    the seed) alone, so any position is found again after a restart. The two newest epochs stay in memory."""

    def __init__(self, make: Callable[[int], Sequence]):
        self.make = make
        self._epochs: dict[int, Sequence] = {}
        self._starts = [0]  # the global index where each epoch counted so far starts

    def epoch(self, e: int) -> Sequence:
        if e not in self._epochs:
            self._epochs[e] = self.make(e)
            for old in [k for k in self._epochs if k < e - 1]:
                del self._epochs[old]
        return self._epochs[e]

    def __getitem__(self, g: int):
        while self._starts[-1] <= g:
            self._starts.append(self._starts[-1] + len(self.epoch(len(self._starts) - 1)))
        e = bisect.bisect_right(self._starts, g) - 1
        return self.epoch(e)[g - self._starts[e]]


def global_items(step: int, micro: int, batch_size: int, grad_accum: int, world_size: int, rank: int) -> range:
    """The global indices of the items one rank takes for micro-batch `micro` of optimizer step `step`."""
    if step < 0 or micro < 0:
        raise ValueError(f"step and micro must be >= 0, got {step} and {micro}")
    first = ((step * grad_accum + micro) * world_size + rank) * batch_size
    return range(first, first + batch_size)


class ConversationBatches:
    """`get(step, micro)`: this rank's Batch of rows of whole conversations."""

    def __init__(self, dataset, seq_len: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 weights: dict[str, float] | None = None, grad_accum: int = 1, pack: bool = True):
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
        self.rank, self.world_size, self.grad_accum, self.pack = rank, world_size, grad_accum, pack
        self.conversations = Conversations(dataset, "train", seq_len + 1, weights)
        self.order = EpochOrder(self._rows_of_epoch)

    def _rows_of_epoch(self, e: int) -> list[np.ndarray]:
        c, rng = self.conversations, epoch_rng(self.seed, e)
        return _rows(c.length, rng.permutation(weighted_members(c.weight, rng)), self.seq_len + 1, self.pack)

    def epoch(self, e: int) -> list[np.ndarray]:
        """The rows of epoch e (conversation indices per row)."""
        return self.order.epoch(e)

    def rows_per_epoch(self) -> int:
        return len(self.epoch(0))

    def get(self, step: int, micro: int = 0) -> Batch:
        items = global_items(step, micro, self.batch_size, self.grad_accum, self.world_size, self.rank)
        return _to_batch([self.conversations.row(self.order[g], self.seq_len + 1) for g in items], self.pack)

    def describe(self) -> str:
        """One line on what the rows hold, for the run's log: the count and cost of cut conversations."""
        c = self.conversations
        rows = self.epoch(0)
        fill = sum(int(c.length[r].sum()) for r in rows) / (len(rows) * (self.seq_len + 1))
        cut, lost, total = c.truncation()
        how = "packed" if self.pack else "padded, one per row"
        text = (f"{len(c):,} conversations, {how}: {len(rows):,} rows of {self.seq_len + 1} tokens per epoch, "
                f"{fill:.0%} filled")
        if cut:
            text += (f"; {cut:,} conversations are longer than seq_len + 1 = {self.seq_len + 1} and keep their first "
                     f"{self.seq_len + 1} tokens, losing {lost:,} of the {total:,} learned tokens ({lost / total:.2%})")
        return text


def conversation_val_batches(dataset, seq_len: int, batch_size: int, max_batches: int,
                             weights: dict[str, float] | None = None, pack: bool = True) -> list[Batch]:
    """A fixed validation set: the val conversations in their order, packed or padded like training rows,
    up to `max_batches` batches of `batch_size` rows (the last may be short)."""
    c = Conversations(dataset, "val", seq_len + 1, weights)
    rows = _rows(c.length, np.arange(len(c)), seq_len + 1, pack)[:max_batches * batch_size]
    built = [c.row(r, seq_len + 1) for r in rows]
    return [_to_batch(built[i:i + batch_size], pack) for i in range(0, len(built), batch_size)]
