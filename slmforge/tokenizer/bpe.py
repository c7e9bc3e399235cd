"""Build byte-level tokenizers: a BPE trained on the data sources, or the fixed 258-id byte tokenizer.

Both use GPT-2's byte-level scheme (each byte is first mapped to a printable character), so any text,
in any script or with any bytes, round-trips exactly and no token is ever unknown.
"""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Iterator

import tokenizers
from tokenizers import AddedToken, decoders, models, pre_tokenizers, trainers
from tqdm import tqdm

from slmforge.data.sources import Source, SourceStats, check_sources, iter_documents
from slmforge.tokenizer.tokenizer import BOS, EOS, SPECIAL_TOKENS, Tokenizer

_TRAIN_BATCH = 1000  # documents handed to the Rust trainer at a time


def train_bpe(
    sources: list[Source], vocab_size: int, max_chars: int | None = None, progress: bool = True
) -> Tokenizer:
    """Train a byte-level BPE with exactly `vocab_size` ids, the special tokens first (ids 0..7).

    Documents are streamed from `sources`. `max_chars` caps the training text, split between the sources
    by their weights (a weight-0 source then gives nothing); without it all text is used. `progress` shows
    on stderr the documents and characters read (most of the time) and then the trainer's merge steps.
    """
    min_size = 256 + len(SPECIAL_TOKENS)
    if vocab_size <= min_size:
        raise ValueError(
            f"vocab_size={vocab_size} must be > {min_size} (256 bytes + {len(SPECIAL_TOKENS)} special tokens)"
        )
    if not sources:
        raise ValueError("train_bpe needs at least one source")
    budgets = _char_budgets(sources, max_chars)
    check_sources(sources)

    hf = tokenizers.Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)  # GPT-2 regex split
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, seen in training or not
        # The Rust bars draw only on a terminal, but print blank lines to stdout where there is none.
        show_progress=progress and sys.stderr.isatty(),
    )
    stats = [SourceStats() for _ in sources]
    hf.train_from_iterator(_text_batches(sources, budgets, stats, progress), trainer)
    documents = sum(st.documents for st in stats)
    if documents == 0:
        skipped = sum((st.reasons for st in stats), Counter())
        raise ValueError(f"no documents in sources {[s.name for s in sources]} (skipped: {dict(skipped) or 'nothing'})")
    if hf.get_vocab_size() != vocab_size:
        raise ValueError(
            f"the training text ({documents:,} documents from {[s.name for s in sources]}) only supports "
            f"{hf.get_vocab_size()} tokens, fewer than vocab_size={vocab_size}: give more text or a smaller vocab_size"
        )
    return Tokenizer(hf)


def _char_budgets(sources: list[Source], max_chars: int | None) -> list[int | None]:
    if max_chars is None:
        return [None] * len(sources)
    if max_chars <= 0:
        raise ValueError(f"max_chars must be positive, got {max_chars}")
    total = sum(s.weight for s in sources)
    if total <= 0:
        raise ValueError(f"sources {[s.name for s in sources]} all have weight 0; nothing to train on")
    return [int(max_chars * s.weight / total) for s in sources]


def _text_batches(
    sources: list[Source], budgets: list[int | None], stats: list[SourceStats], progress: bool
) -> Iterator[list[str]]:
    """Lists of documents; a source is cut off, mid-document, once its character budget is spent.

    With `progress`, a bar counts the characters read; it ends when the text does, before the trainer's
    own progress (the merges) starts.
    """
    with tqdm(desc="reading text", unit=" chars", unit_scale=True, disable=not progress) as bar:
        for source, budget, source_stats in zip(sources, budgets, stats):
            if budget == 0:
                continue
            bar.set_postfix(source=source.name)
            left = budget
            batch = []
            for doc in iter_documents(source, source_stats):
                if left is not None:
                    doc = doc[:left]
                    left -= len(doc)
                batch.append(doc)
                bar.update(len(doc))
                if len(batch) == _TRAIN_BATCH:
                    yield batch
                    batch = []
                if left == 0:
                    break
            if batch:
                yield batch


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table, the alphabet of the ByteLevel pre-tokenizer."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    shifted = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + shifted)
            shifted += 1
    return table


def byte_tokenizer() -> Tokenizer:
    """Byte b has id b (0..255), `<|bos|>` = 256, `<|eos|>` = 257; 258 ids, pad = eos.

    Stored in the same tokenizer.json format as the BPE: a BPE model with no merges whose vocabulary is
    the 256 byte characters, so exporters and transformers read one kind of file.
    """
    vocab = {char: b for b, char in _bytes_to_unicode().items()}
    hf = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[]))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)  # no merges: no split needed
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in (BOS, EOS)])
    return Tokenizer(hf)
