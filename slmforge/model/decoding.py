"""The contract every model family keeps for decoding, so the engine and the speculative decoder treat the
decoder (`Transformer`) and the multi-scale byte model alike.

A model makes a cache of B slots, each holding one sequence with its own length, and runs a forward over
new tokens at their absolute positions (-1 = padding) with that cache. A cache can be narrowed to a
contiguous range of slots (a view sharing its memory) so a forward computes only the sequences it needs,
emptied per slot for a new sequence, and rolled back per slot to a shorter length (rejected drafts).
Kernel choices for decoding (fused projections, weight formats) are not the model's: see
`slmforge.infer.kernels`.
"""

from typing import Protocol

import torch

from slmforge.config import ModelConfig


class DecodingCache(Protocol):
    batch_size: int
    max_len: int
    lengths: torch.Tensor  # [B] tokens held per slot

    def next_positions(self, n_tokens: int) -> torch.Tensor:
        """Positions [B, n_tokens] continuing every slot's sequence."""

    def slots(self, start: int, stop: int) -> "DecodingCache":
        """A view of slots start..stop-1: a forward with it reads and writes only those."""

    def truncate(self, lengths: torch.Tensor | list[int]) -> None:
        """Roll every slot back to `lengths` tokens (never longer than it holds)."""

    def reset(self, slots: int | list[int]) -> None:
        """Empty the given slots for new sequences."""


class DecodingModel(Protocol):
    cfg: ModelConfig

    def new_cache(self, batch_size: int, max_len: int) -> DecodingCache:
        """An empty cache of `batch_size` slots of up to `max_len` tokens, in the model's dtype and device."""

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor | None = None,
                 cache: DecodingCache | None = None, last_only: bool = False,
                 return_hidden: bool = False) -> tuple[torch.Tensor, dict]:
        """tokens [B, T] at positions [B, T] (default: continuing each slot) -> logits [B, T or 1, V], aux."""
