"""KV cache addressed by sequence slot.

Each of the B slots holds one sequence with its own length, so sequences of different lengths decode
together, k > 1 tokens can be appended at once (prefill, speculative verification) and rejected tokens
rolled back. Every stored entry carries its absolute position (-1 = empty), and the attention mask is
built from positions, so padding and rollback need no special casing in the model.

`slots(start, stop)` is a view of a contiguous range of slots that a forward can run on alone (what a
continuous-batching engine does with the slots that prefill or decode), and `reset` empties slots for new
sequences.

A global layer stores entry p at slot p. A sliding-window layer keeps a ring of W + margin slots
(entry p at slot p mod capacity): the margin lets the last `margin` tokens be rolled back and a chunk of
up to margin + 1 tokens be written before it is attended to.
"""

from dataclasses import dataclass, field

import torch


@dataclass
class CacheStep:
    positions: torch.Tensor  # [B, T] absolute positions of the tokens being added, -1 = padding
    len_before: int  # longest sequence before the step
    len_after: int  # longest sequence after it
    write_indices: dict = field(default_factory=dict)  # capacity -> (rows, slots, scratch used): for all layers

    def write_index(self, capacity: int) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """Where the step's entries go in a store of `capacity` slots: (rows, slots), both [B, T], and whether
        any goes to the scratch slot `capacity` (padding, entries a ring cannot keep)."""
        if capacity not in self.write_indices:
            positions = self.positions
            last = positions.max(dim=1, keepdim=True).values
            keep = (positions >= 0) & (positions > last - capacity)
            slot = torch.where(keep, positions % capacity, capacity)
            rows = torch.arange(positions.shape[0], device=positions.device)[:, None].expand_as(positions)
            self.write_indices[capacity] = rows, slot, not bool(keep.all())
        return self.write_indices[capacity]


class LayerKV:
    """One attention layer's entries: one tensor [B, heads, slots, dim] per kind of stored value (keys and
    values for GQA; the latent and the RoPE key for MLA), all addressed by the same slots."""

    def __init__(self, cache: "KVCache", capacity: int, window: int | None, shapes: list[tuple[int, int]],
                 dtype: torch.dtype, device):
        self.cache, self.capacity, self.window = cache, capacity, window
        batch = cache.batch_size
        # One extra scratch slot receives writes that must not land (padding, tokens beyond the ring).
        self.stores = [torch.zeros(batch, heads, capacity + 1, dim, dtype=dtype, device=device)
                       for heads, dim in shapes]
        self.pos = torch.full((batch, capacity + 1), -1, dtype=torch.long, device=device)

    def update(self, *new: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Store the current step's tensors [B, heads, T, dim] (one per store); return every store's entries
        to attend to, then their positions [B, S]."""
        step = self.cache.step
        n_new = new[0].shape[2]
        fits = self.window is None or n_new <= self.capacity - self.window + 1
        if fits:  # write first, then attend over the used slots (no copy of the cache)
            self._write(new, step)
            used = min(self.capacity, step.len_after)
            return (*(s[:, :, :used] for s in self.stores), self.pos[:, :used])
        # A long chunk would overwrite ring entries its own first queries still need: attend over a copy.
        used = min(self.capacity, step.len_before)
        out = [torch.cat((s[:, :, :used], t), dim=2) for s, t in zip(self.stores, new)]
        key_pos = torch.cat((self.pos[:, :used], step.positions), dim=1)
        self._write(new, step)
        return (*out, key_pos)

    def _write(self, new: tuple[torch.Tensor, ...], step: CacheStep) -> None:
        rows, slot, scratch = step.write_index(self.capacity)
        for store, t in zip(self.stores, new):
            store[rows, :, slot] = t.transpose(1, 2) if t.dtype == store.dtype else t.transpose(1, 2).to(store.dtype)
        self.pos[rows, slot] = step.positions
        if scratch:
            self.pos[:, self.capacity] = -1

    def truncate(self, lengths: torch.Tensor) -> None:
        self.pos.masked_fill_(self.pos >= lengths[:, None], -1)

    def view(self, cache: "KVCache", start: int, stop: int) -> "LayerKV":
        """The same entries of sequences start..stop-1, for a view of the cache."""
        view = LayerKV.__new__(LayerKV)
        view.cache, view.capacity, view.window = cache, self.capacity, self.window
        view.stores = [s[start:stop] for s in self.stores]
        view.pos = self.pos[start:stop]
        return view


class KVCache:
    """Cache for a model's attention layers. `layers[i]` is (window or None, store shapes) of layer i: each
    store shape is (heads, dim) of one kind of entry the layer keeps per token."""

    def __init__(self, layers: list[tuple[int | None, list[tuple[int, int]]]], batch_size: int, max_len: int,
                 dtype=torch.float32, device=None, rollback_margin: int = 16):
        self.batch_size, self.max_len, self.rollback_margin = batch_size, max_len, rollback_margin
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.step: CacheStep | None = None
        self.layers = [
            LayerKV(self, max_len if w is None else min(max_len, w + rollback_margin), w, shapes, dtype, device)
            for w, shapes in layers
        ]

    def next_positions(self, n_tokens: int) -> torch.Tensor:
        """Positions [B, n_tokens] that continue every sequence."""
        return self.lengths[:, None] + torch.arange(n_tokens, device=self.lengths.device)

    def begin(self, positions: torch.Tensor) -> None:
        """Called by the model once per forward, before its layers read or write the cache."""
        if positions.shape[0] != self.batch_size:
            raise ValueError(f"cache holds {self.batch_size} sequences, got a batch of {positions.shape[0]}")
        new_lengths = torch.maximum(self.lengths, positions.max(dim=1).values + 1)
        len_after = int(new_lengths.max())
        if len_after > self.max_len:
            raise ValueError(f"cache is full: {len_after} positions requested, capacity {self.max_len}")
        self.step = CacheStep(positions, int(self.lengths.max()), len_after)
        self.lengths.copy_(new_lengths)

    def truncate(self, lengths: torch.Tensor | list[int]) -> None:
        """Roll sequences back to `lengths` (0 frees a slot for a new sequence)."""
        lengths = torch.as_tensor(lengths, dtype=torch.long, device=self.lengths.device)
        if bool((lengths > self.lengths).any()):
            raise ValueError("truncate can only shorten sequences")
        dropped = int((self.lengths - lengths)[lengths > 0].max()) if bool((lengths > 0).any()) else 0
        if dropped > self.rollback_margin and any(layer.window is not None for layer in self.layers):
            raise ValueError(f"cannot roll back {dropped} tokens: sliding-window rings keep {self.rollback_margin}")
        for layer in self.layers:
            layer.truncate(lengths)
        self.lengths.copy_(lengths)

    def reset(self, slots: int | list[int]) -> None:
        """Empty the given slots (sequence indices) for new sequences."""
        lengths = self.lengths.clone()
        lengths[slots] = 0
        self.truncate(lengths)

    def slots(self, start: int, stop: int) -> "KVCache":
        """A view of sequences start..stop-1 (shared memory): a forward on it reads and writes only them."""
        if not 0 <= start < stop <= self.batch_size:
            raise ValueError(f"slots {start}..{stop - 1} are not within the cache's {self.batch_size}")
        view = KVCache.__new__(KVCache)
        view.batch_size, view.max_len, view.rollback_margin = stop - start, self.max_len, self.rollback_margin
        view.lengths, view.step = self.lengths[start:stop], None
        view.layers = [layer.view(view, start, stop) for layer in self.layers]
        return view

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for layer in self.layers for t in layer.stores)
