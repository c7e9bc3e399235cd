"""Fill-in-the-middle (FIM): a left-to-right model taught to write a span given the text on both sides of it.

Training data (Bavarian et al. 2022, as StarCoder and SantaCoder prepare it): a document is cut at two uniform
random character positions into prefix, middle and suffix, each piece is encoded on its own, and the pieces
are moved so that the middle comes last, behind marker tokens:

    PSM   <fim_prefix> prefix <fim_suffix> suffix <fim_middle> middle <eos>
    SPM   <fim_prefix> <fim_suffix> suffix <fim_middle> prefix middle <eos>

Every token is trained on as usual, so the model learns to write the middle after <fim_middle> (SPM: after
the prefix) and to end it with EOS. Generation gives one of these prompts without the middle and decodes it.

The markers are ids, never text: `Tokenizer.encode` spells a literal "<fim_prefix>" as its characters, so
the pieces are encoded apart and joined with the marker ids here. Data preparation, `slmforge sample
--prefix/--suffix` and the server's `suffix` all build their ids through this module.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the tokenizer package imports slmforge.data; a runtime import here would be circular
    from slmforge.tokenizer import Tokenizer

# Marker names in (prefix, suffix, middle) order. StarCoder's are the ones slmforge adds to a tokenizer;
# Qwen's are recognised too, for imported models that carry them.
FIM_TOKENS = ("<fim_prefix>", "<fim_suffix>", "<fim_middle>")
QWEN_FIM_TOKENS = ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>")
# Tokens that end a generated middle besides EOS, where a tokenizer has them: a marker (the model starting
# another FIM example), StarCoder's and Qwen's padding and file separators.
MIDDLE_ENDS = (*FIM_TOKENS, *QWEN_FIM_TOKENS, "<fim_pad>", "<|fim_pad|>", "<file_sep>", "<|file_sep|>")


@dataclass(frozen=True)
class FimIds:
    """A tokenizer's marker ids, and the ids besides EOS that end a generated middle."""

    prefix: int
    suffix: int
    middle: int
    ends: tuple[int, ...]

    def psm_prompt(self, prefix: Sequence[int], suffix: Sequence[int]) -> list[int]:
        """The ids a model continues with the middle, in prefix-suffix-middle order."""
        return [self.prefix, *prefix, self.suffix, *suffix, self.middle]

    def spm_prompt(self, prefix: Sequence[int], suffix: Sequence[int]) -> list[int]:
        """The same in suffix-prefix-middle order: the middle continues the prefix directly."""
        return [self.prefix, self.suffix, *suffix, self.middle, *prefix]

    def arrange(self, prefix: Sequence[int], middle: Sequence[int], suffix: Sequence[int], spm: bool) -> list[int]:
        """A training example: the three pieces in PSM or SPM order, the middle last."""
        return [*(self.spm_prompt if spm else self.psm_prompt)(prefix, suffix), *middle]


def find_fim_ids(tokenizer: Tokenizer) -> FimIds | None:
    """The marker ids of `tokenizer` (StarCoder's names, else Qwen's), or None when it has neither set."""
    for names in (FIM_TOKENS, QWEN_FIM_TOKENS):
        ids = [tokenizer.hf.token_to_id(name) for name in names]
        if None not in ids:
            ends = (tokenizer.hf.token_to_id(name) for name in MIDDLE_ENDS)
            return FimIds(*ids, ends=tuple(dict.fromkeys(i for i in ends if i is not None)))
    return None


def missing_fim_tokens(tokenizer: Tokenizer) -> str:
    """Why `tokenizer` cannot fill in the middle, in words: the markers it lacks."""
    missing = [name for name in FIM_TOKENS if tokenizer.hf.token_to_id(name) is None]
    return (f"its tokenizer lacks the fill-in-the-middle tokens {', '.join(missing)} (nor has Qwen's "
            f"{', '.join(QWEN_FIM_TOKENS)}); `slmforge data prepare --fim-rate R` adds them for training")


def with_fim_tokens(tokenizer: Tokenizer) -> Tokenizer:
    """`tokenizer` itself when it has a set of markers; else a copy with StarCoder's added after its last id."""
    return tokenizer if find_fim_ids(tokenizer) else tokenizer.with_special_tokens(list(FIM_TOKENS))


def check_rate(name: str, value: float) -> None:
    if not 0 <= value <= 1:
        raise ValueError(f"{name} must lie in [0, 1], got {value}")


@dataclass(frozen=True)
class FimCut:
    """Where a document is cut (character offsets, start <= end) and in which order its pieces go."""

    start: int
    end: int
    spm: bool

    def pieces(self, text: str) -> tuple[str, str, str]:
        """prefix, middle, suffix"""
        return text[:self.start], text[self.start:self.end], text[self.end:]


def draw_cut(text: str, key: str, rate: float, spm_rate: float, seed: int) -> FimCut | None:
    """The cut of the document named `key` (e.g. its source and index), or None when it stays plain.

    It depends on (seed, key, len(text)) only, so a preparation is reproducible and independent of batching.
    The draws are always made in the same order, so `rate` alone decides which documents are transformed.
    """
    rng = random.Random(f"{seed}/{key}")  # a str seed is hashed with SHA-512: the same in every process
    transformed = rng.random() < rate
    start, end = sorted((rng.randint(0, len(text)), rng.randint(0, len(text))))
    spm = rng.random() < spm_rate
    return FimCut(start, end, spm) if transformed else None


@dataclass(frozen=True)
class FimTransform:
    """Applies FIM to documents as data preparation encodes them: a document is transformed with probability
    `rate`, in SPM order with probability `spm_rate` (else PSM), deterministically given `seed`."""

    ids: FimIds
    rate: float
    spm_rate: float = 0.5
    seed: int = 0

    def __post_init__(self):
        check_rate("fim rate", self.rate)
        check_rate("fim spm rate", self.spm_rate)

    def cuts(self, texts: list[str], keys: list[str | None]) -> list[FimCut | None]:
        """The cut of each text; a None key (a validation document) stays plain."""
        return [None if key is None else draw_cut(text, key, self.rate, self.spm_rate, self.seed)
                for text, key in zip(texts, keys)]

    def encode_batch(self, tokenizer: Tokenizer, texts: list[str], cuts: list[FimCut | None]) -> list[list[int]]:
        """Token ids of each text (without EOS), FIM-arranged where it has a cut; one call to the batch
        encoder for all the pieces."""
        pieces = [piece for text, cut in zip(texts, cuts) for piece in (cut.pieces(text) if cut else (text,))]
        encoded = iter(tokenizer.encode_batch(pieces))
        return [next(encoded) if cut is None else self.ids.arrange(next(encoded), next(encoded), next(encoded), cut.spm)
                for cut in cuts]

    def settings(self) -> dict:
        """What meta.json records."""
        return {"rate": self.rate, "spm_rate": self.spm_rate, "seed": self.seed, "split": "train",
                "marker_ids": {"prefix": self.ids.prefix, "suffix": self.ids.suffix, "middle": self.ids.middle}}
