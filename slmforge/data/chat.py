"""Chat data for supervised fine-tuning: conversations rendered by a chat template into token ids with a
loss mask, written as a dataset folder the trainer packs.

A chat dataset is a prepared dataset (see `prepare`) whose meta.json says `"kind": "chat"`; beside each
source's train.bin / val.bin (the conversations' tokens one after another) it holds

    train.mask / val.mask         uint8 per token: 1 where the token is a target the model learns
    train.offsets / val.offsets   int64: where each conversation starts, and the end

The mask comes from the template itself: messages[:i] rendered with the generation prompt must be the
start of messages[:i+1] rendered, so the text an assistant message adds is exactly what a model serving
this template would generate (its content and end-of-turn marker). Each piece is tokenized on its own, as
the server tokenizes a prompt and the model continues it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from slmforge.data.conversations import RowFormat, read_conversations
from slmforge.data.prepare import FORMAT_VERSION, _is_val, dataset_folder
from slmforge.tokenizer.chat_template import ChatTemplate, TemplateError
from slmforge.tokenizer.tokenizer import Tokenizer

TRAIN_ON = ("assistant", "last", "all")  # every assistant turn, the final one only, every token
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
CHATML_MARKERS = ["<|im_start|>", "<|im_end|>"]


@dataclass
class ChatSource:
    name: str
    path: Path
    weight: float = 1.0


def parse_chat_source(spec: str, flag: str = "--chat") -> ChatSource:
    """[NAME=]FILE.jsonl[@WEIGHT] -> ChatSource (name: the file's stem); errors name `flag`."""
    text, weight = spec, 1.0
    if "@" in spec:
        text, _, number = spec.rpartition("@")
        try:
            weight = float(number)
        except ValueError:
            raise ValueError(f"{flag} {spec!r}: the weight after @ must be a number") from None
    name, sep, path = text.partition("=")
    if not sep:
        name, path = Path(text).stem, text
    if not name or not path:
        raise ValueError(f"{flag} {spec!r}: expected [NAME=]FILE.jsonl[@WEIGHT]")
    return ChatSource(name, Path(path), weight)


def chat_tokenizer(tokenizer: Tokenizer, template: str | None) -> Tokenizer:
    """The tokenizer a chat dataset is written with: `template` (Jinja text, or "chatml") or, by default, its
    own template or ChatML, with ChatML's markers added as special tokens where ChatML is used and missing."""
    if template is None:
        template = tokenizer.chat_template or "chatml"
    if template == "chatml":
        return tokenizer.with_special_tokens(CHATML_MARKERS, CHATML)
    return tokenizer.with_special_tokens([], template)


def render_pieces(template: ChatTemplate, messages: list[dict], train_on: str) -> list[tuple[str, bool]]:
    """The rendered conversation as (text, trained) pieces in order."""
    last_reply = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=-1)
    pieces, done = [], ""

    def extend(text: str, upto: int, trained: bool) -> None:
        nonlocal done
        if not text.startswith(done):
            raise TemplateError(f"the chat template changes the text of earlier messages as the conversation grows "
                                f"(at messages[:{upto}]), so the assistant's tokens cannot be told apart")
        if text != done:
            pieces.append((text[len(done):], trained))
        done = text

    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        extend(template.render(messages[:i], add_generation_prompt=True), i, train_on == "all")
        extend(template.render(messages[:i + 1], add_generation_prompt=False), i + 1,
               train_on == "all" or train_on == "assistant" or i == last_reply)
    extend(template.render(messages, add_generation_prompt=False), len(messages), train_on == "all")
    return pieces


def encode_conversation(template: ChatTemplate, messages: list[dict], train_on: str) -> tuple[list[int], list[int]]:
    """(token ids, mask) of a conversation; mask[i] = 1 where token i is learned."""
    ids, mask = [], []
    for text, trained in render_pieces(template, messages, train_on):
        piece = template.encode(text)
        ids += piece
        mask += [int(trained)] * len(piece)
    return ids, mask


@dataclass
class RenderedSplit:
    """One split's rendered conversations, in order, until written: token ids, masks, lengths, and the
    UTF-8 bytes their tokens spell (`byte_lengths`: bytes per token id, 0 for special tokens)."""

    byte_lengths: np.ndarray
    tokens: list = field(default_factory=list)
    masks: list = field(default_factory=list)
    lengths: list = field(default_factory=list)
    bytes: int = 0

    def add(self, ids: list[int], mask: list[int]) -> None:
        self.tokens.append(np.asarray(ids, dtype=np.uint32))
        self.masks.append(np.asarray(mask, dtype=np.uint8))
        self.lengths.append(len(ids))
        self.bytes += int(self.byte_lengths[self.tokens[-1]].sum())

    def write(self, folder: Path, split: str, dtype) -> None:
        cat = lambda parts, t: np.concatenate(parts).astype(t) if parts else np.zeros(0, dtype=t)  # noqa: E731
        with open(folder / f"{split}.bin", "wb") as f:
            f.write(cat(self.tokens, dtype))
        with open(folder / f"{split}.mask", "wb") as f:
            f.write(cat(self.masks, np.uint8))
        with open(folder / f"{split}.offsets", "wb") as f:
            f.write(np.concatenate(([0], np.cumsum(self.lengths, dtype=np.int64))).astype(np.int64))


def write_rendered_source(source: ChatSource, val_source: ChatSource | None, template: ChatTemplate, folder: Path,
                          dtype, val_fraction: float, read: Callable, encode: Callable, unit: str, skip_bad: bool,
                          progress: bool) -> tuple[dict, dict[str, RenderedSplit]]:
    """Render one source's rows into `folder`: `read(path)` yields (where, row), `encode(row)` gives the
    row's conversations as (ids, mask) kept together in one split (a pair: chosen, then rejected). Rows the
    template refuses or that hold nothing to learn stop the run, or with `skip_bad` are counted. Returns
    (its meta.json entry, the splits)."""
    folder.mkdir()
    byte_lengths = template.tokenizer.token_byte_lengths()
    splits, skipped = {"train": RenderedSplit(byte_lengths), "val": RenderedSplit(byte_lengths)}, {}
    stream = [(source.path, None)] + ([(val_source.path, "val")] if val_source else [])
    index = 0
    bar = tqdm(desc=f"{source.name:>12}", unit=f" {unit}s", disable=not progress)
    for path, forced in stream:
        for where, row in read(path, skipped):
            try:
                conversations = encode(row)
            except TemplateError as e:
                if not skip_bad:
                    raise ValueError(f"{where}: {e}") from None
                skipped["template failed"] = skipped.get("template failed", 0) + 1
                continue
            if not all(any(mask) for _, mask in conversations):
                skipped["nothing to learn"] = skipped.get("nothing to learn", 0) + 1
                continue
            split = forced or ("train" if val_source else ("val" if _is_val(index, val_fraction) else "train"))
            for ids, mask in conversations:
                splits[split].add(ids, mask)
            index += 1
            bar.update()
    bar.close()
    return write_splits(source, val_source, splits, skipped, folder, dtype), splits


def _write_chat_source(source: ChatSource, val_source: ChatSource | None, template: ChatTemplate, folder: Path,
                       dtype, val_fraction: float, train_on: str, fmt: RowFormat, skip_bad: bool,
                       progress: bool) -> dict:
    entry, splits = write_rendered_source(
        source, val_source, template, folder, dtype, val_fraction,
        lambda path, skipped: read_conversations(path, fmt, skip_bad, skipped),
        lambda messages: [encode_conversation(template, messages, train_on)], "conversation", skip_bad, progress)
    return {**entry, "train_conversations": len(splits["train"].lengths),
            "val_conversations": len(splits["val"].lengths)}


def write_splits(source: ChatSource, val_source: ChatSource | None, splits: dict[str, RenderedSplit],
                 skipped: dict[str, int], folder: Path, dtype) -> dict:
    """Write a source's rendered splits into `folder`; its meta.json entry (counts, lengths, skips)."""
    for split, data in splits.items():
        data.write(folder, split, dtype)
    lengths = splits["train"].lengths + splits["val"].lengths
    return {
        "paths": str(source.path), "val_paths": str(val_source.path) if val_source else None, "fields": None,
        "weight": source.weight, "documents": len(lengths),
        "train_tokens": int(sum(splits["train"].lengths)), "val_tokens": int(sum(splits["val"].lengths)),
        "trained_tokens": int(sum(int(m.sum()) for m in splits["train"].masks)),
        "longest": max(lengths, default=0), "median_length": int(np.median(lengths)) if lengths else 0,
        "bytes": splits["train"].bytes + splits["val"].bytes, "skipped_files": 0,
        "skipped_lines": sum(skipped.values()), "skip_reasons": skipped,
    }


def write_rendered_dataset(kind: str, flag: str, unit: str, sources: list[ChatSource], tokenizer: Tokenizer,
                           out_dir: str | Path, template: str | None, val_sources: list[ChatSource] | None,
                           write_source: Callable, meta: dict, totals: tuple[str, ...]) -> dict:
    """The frame chat and preference datasets share: the sources checked, the chat tokenizer saved, each
    source written by `write_source(source, its validation source or None, template, folder, dtype) -> its
    meta.json entry` (whose `train_<unit>s` must not be 0), whole or not at all (`dataset_folder`), so a bad
    row leaves nothing behind. Returns the meta.json content."""
    if not sources:
        raise ValueError(f"{flag} needs at least one .jsonl file")
    names = [s.name for s in sources]
    if len(set(names)) != len(names):
        raise ValueError(f"{flag} source names must be unique, got {names}")
    held_out = {s.name: s for s in val_sources or []}
    for s in [*sources, *held_out.values()]:
        if not s.path.is_file():
            raise FileNotFoundError(f"{s.path}: no such file")
    if set(held_out) - set(names):
        raise ValueError(f"validation files name no {flag} source: {sorted(set(held_out) - set(names))}")
    tokenizer = chat_tokenizer(tokenizer, template)
    chat_template = ChatTemplate(tokenizer.chat_template, tokenizer)
    dtype = np.dtype(np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32)
    with dataset_folder(Path(out_dir)) as partial:
        tokenizer.save(partial)
        per_source = {s.name: write_source(s, held_out.get(s.name), chat_template, partial / s.name, dtype)
                      for s in sources}
        empty = [n for n, m in per_source.items() if not m[f"train_{unit}s"]]
        if empty:
            raise ValueError(f"no {unit} to train on in {empty}: "
                             + "; ".join(f"{n}: skipped {per_source[n]['skip_reasons'] or 'nothing'}" for n in empty))
        meta = {"format_version": FORMAT_VERSION, "kind": kind, "dtype": dtype.name,
                "vocab_size": tokenizer.vocab_size, "eos_id": tokenizer.eos_id, "bos_id": tokenizer.bos_id,
                "pad_id": tokenizer.pad_id, **meta, "sources": per_source,
                "total": {k: sum(m[k] for m in per_source.values()) for k in totals}}
        (partial / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def prepare_chat_dataset(sources: list[ChatSource], tokenizer: Tokenizer, out_dir: str | Path,
                         template: str | None = None, train_on: str = "assistant", val_fraction: float = 0.01,
                         val_sources: list[ChatSource] | None = None, fmt: RowFormat | None = None,
                         skip_bad: bool = False, progress: bool = True) -> dict:
    """Render chat .jsonl `sources` into a chat dataset folder at `out_dir`; return its meta.json content
    (`format_chat_report` prints it). Written whole or not at all. `progress`: a progress bar on stderr."""
    if train_on not in TRAIN_ON:
        raise ValueError(f"--train-on must be one of {', '.join(TRAIN_ON)}, got {train_on!r}")

    def write(source, val_source, template, folder, dtype):
        return _write_chat_source(source, val_source, template, folder, dtype, val_fraction, train_on,
                                  fmt or RowFormat(), skip_bad, progress)

    return write_rendered_dataset("chat", "--chat", "conversation", sources, tokenizer, out_dir, template,
                                  val_sources, write, {"train_on": train_on, "val_fraction": val_fraction},
                                  ("documents", "train_tokens", "val_tokens", "trained_tokens", "bytes",
                                   "skipped_files", "skipped_lines"))


def format_rendered_report(meta: dict, unit: str, label: str, footnote: str) -> str:
    """The table `data prepare` prints for a chat or preference dataset: per source its training and
    validation `unit`s (meta keys train_<unit>, val_<unit>; `label` in the header), tokens, the share of
    training tokens learned, the median and longest sequence, and the rows skipped by reason."""
    rows = [f"{'source':<16}{'train ' + label:>12}{'val ' + label:>10}{'tokens':>12}{'learned':>10}{'median':>8}"
            f"{'longest':>9}  skipped"]
    for name, m in meta["sources"].items():
        tokens = m["train_tokens"] + m["val_tokens"]
        reasons = ", ".join(f"{k}: {v:,}" for k, v in m["skip_reasons"].items()) or "none"
        rows.append(f"{name:<16}{m['train_' + unit]:>12,}{m['val_' + unit]:>10,}{tokens:>12,}"
                    f"{m['trained_tokens'] / max(m['train_tokens'], 1):>10.1%}{m['median_length']:>8,}"
                    f"{m['longest']:>9,}  {reasons}")
    return "\n".join(rows) + "\n" + footnote


def format_chat_report(meta: dict) -> str:
    return format_rendered_report(meta, "conversations", "conv",
                                  f"learned: the share of training tokens in the loss (--train-on {meta['train_on']});"
                                  " conversations longer than a run's data.seq_len + 1 tokens are cut to it when packed")

