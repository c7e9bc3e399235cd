"""Preference data for DPO: `{"prompt", "chosen", "rejected"}` rows rendered by a chat template, as chat
data is, into a dataset of pairs.

A preference dataset is a chat dataset (see `slmforge.data.chat`: tokens, mask and offsets per split and
source) whose meta.json says `"kind": "preference"` and whose conversations come in pairs: prompt + chosen
at each even index, prompt + rejected right after it. Only the final reply (and its end-of-turn marker) is
in the mask, so a sequence's log-probability is the reply's given the prompt.

    prompt     "text" (one user message) or [{"role", "content"}, ...] ending in a user message
    chosen     "text" (the assistant's reply), {"role": "assistant", "content"}, or a list of messages
    rejected   ending in the assistant's reply (turns between the prompt and the reply)
"""

from __future__ import annotations

from pathlib import Path

from slmforge.data.chat import (
    ChatSource,
    encode_conversation,
    format_rendered_report,
    write_rendered_dataset,
    write_rendered_source,
)
from slmforge.data.conversations import BadRow, RowFormat, read_rows, to_messages
from slmforge.tokenizer.chat_template import ChatTemplate
from slmforge.tokenizer.tokenizer import Tokenizer


def _messages(value, where: str, name: str, role: str) -> list[dict]:
    """A prompt or reply field as checked messages: text is one message of `role`, a dict one message, a
    list several; the last must be `role`'s."""
    if value is None:
        raise BadRow(where, f"{name} is missing", "missing field")
    if isinstance(value, str):
        if not value.strip():
            raise BadRow(where, f"{name} is empty", "empty field")
        return [{"role": role, "content": value}]
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        raise BadRow(where, f"{name} is {type(value).__name__}, not text, a message or a list of messages",
                     "bad field")
    messages = to_messages({name: value}, where, RowFormat("messages", fields={"messages": name}))
    if messages[-1]["role"] != role:
        raise BadRow(where, f"{name} must end with the {role}'s message, not the {messages[-1]['role']}'s",
                     "bad field")
    return messages


def to_pair(row, where: str) -> tuple[list[dict], list[dict]]:
    """(prompt + chosen, prompt + rejected) messages of a preference row; raises BadRow."""
    if not isinstance(row, dict):
        raise BadRow(where, f"a row must be a JSON object, got {type(row).__name__}", "not an object")
    prompt = _messages(row.get("prompt"), where, "prompt", "user")
    chosen = _messages(row.get("chosen"), where, "chosen", "assistant")
    rejected = _messages(row.get("rejected"), where, "rejected", "assistant")
    if chosen == rejected:
        raise BadRow(where, "chosen and rejected are the same reply: the pair prefers nothing", "same reply")
    return prompt + chosen, prompt + rejected


def _write_pair_source(source: ChatSource, val_source: ChatSource | None, template: ChatTemplate, folder: Path,
                       dtype, val_fraction: float, skip_bad: bool, progress: bool) -> dict:
    """A pair is two neighbouring conversations, chosen then rejected, always in the same split."""
    entry, splits = write_rendered_source(
        source, val_source, template, folder, dtype, val_fraction,
        lambda path, skipped: read_rows(path, to_pair, skip_bad, skipped),
        lambda pair: [encode_conversation(template, messages, "last") for messages in pair], "pair", skip_bad,
        progress)
    return {**entry, "train_pairs": len(splits["train"].lengths) // 2, "val_pairs": len(splits["val"].lengths) // 2}


def prepare_preference_dataset(sources: list[ChatSource], tokenizer: Tokenizer, out_dir: str | Path,
                               template: str | None = None, val_fraction: float = 0.01,
                               val_sources: list[ChatSource] | None = None, skip_bad: bool = False,
                               progress: bool = True) -> dict:
    """Render preference .jsonl `sources` into a preference dataset folder at `out_dir`; return its
    meta.json content. `template`: as `chat_tokenizer` takes it. Written whole or not at all."""
    def write(source, val_source, template, folder, dtype):
        return _write_pair_source(source, val_source, template, folder, dtype, val_fraction, skip_bad, progress)

    return write_rendered_dataset("preference", "--preference", "pair", sources, tokenizer, out_dir, template,
                                  val_sources, write, {"train_on": "last", "val_fraction": val_fraction},
                                  ("documents", "train_pairs", "val_pairs", "train_tokens", "val_tokens",
                                   "trained_tokens", "bytes", "skipped_files", "skipped_lines"))


def format_preference_report(meta: dict) -> str:
    return format_rendered_report(meta, "pairs", "pairs", "learned: the share of training tokens in the replies the "
                                  "loss compares; sequences longer than a run's data.seq_len + 1 tokens are cut to it")
