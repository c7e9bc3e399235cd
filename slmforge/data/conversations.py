"""Chat rows from .jsonl files, as the field writes them, turned into checked lists of messages.

Three row shapes are read (per row, or forced with `format`):

    messages   {"messages": [{"role": "user", "content": "..."}, ...]}           (OpenAI, transformers)
    sharegpt   {"conversations": [{"from": "human", "value": "..."}, ...]}       (ShareGPT; gpt, human)
    alpaca     {"instruction": "...", "input": "...", "output": "...", "system"?}  (Alpaca)

Roles are system, user and assistant; `role_map` renames others (`bot=assistant`), `fields` names the
keys a file uses instead (`instruction=question`, `output=answer` reads GSM8K's rows as Alpaca's). A row
that cannot be read is one `BadRow` naming the file, the line and the field.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")
ROLES = ("system", "user", "assistant")
FORMATS = ("auto", "messages", "sharegpt", "alpaca")
FIELDS = ("messages", "role", "content", "conversations", "from", "value", "instruction", "input", "output", "system")
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system", "user": "user", "assistant": "assistant"}


class BadRow(ValueError):
    """A row that is not a conversation; `reason` is a short key for counting skipped rows."""

    def __init__(self, where: str, message: str, reason: str):
        super().__init__(f"{where}: {message}")
        self.reason = reason


@dataclass
class RowFormat:
    format: str = "auto"
    role_map: dict[str, str] = field(default_factory=dict)  # extra role names -> system/user/assistant
    fields: dict[str, str] = field(default_factory=dict)  # FIELDS name -> the key the rows use

    def key(self, name: str) -> str:
        return self.fields.get(name, name)

    def __post_init__(self):
        unknown = sorted(set(self.fields) - set(FIELDS))
        if unknown:
            raise ValueError(f"--field {unknown[0]}=...: the fields are {', '.join(FIELDS)}")
        if self.format not in FORMATS:
            raise ValueError(f"chat format must be one of {', '.join(FORMATS)}, got {self.format!r}")
        bad = {k: v for k, v in self.role_map.items() if v not in ROLES}
        if bad:
            raise ValueError(f"--role-map must map to one of {', '.join(ROLES)}, got {bad}")


def parse_pairs(specs: list[str], flag: str, example: str) -> dict[str, str]:
    """['bot=assistant', ...] -> {'bot': 'assistant'}."""
    out = {}
    for spec in specs:
        name, sep, value = spec.partition("=")
        if not sep or not name or not value:
            raise ValueError(f"{flag} {spec!r}: expected NAME=VALUE, e.g. {example}")
        out[name] = value
    return out


def _shape(row: dict, where: str, fmt: RowFormat) -> str:
    if fmt.format != "auto":
        return fmt.format
    for shape, name in (("messages", "messages"), ("sharegpt", "conversations")):
        if fmt.key(name) in row:
            return shape
    if fmt.key("instruction") in row or fmt.key("output") in row:
        return "alpaca"
    raise BadRow(where, f"no conversation in this row (keys {sorted(row)[:6]}): expected `{fmt.key('messages')}`, "
                 f"`{fmt.key('conversations')}` (ShareGPT) or `{fmt.key('instruction')}`/`{fmt.key('output')}` "
                 "(Alpaca; other names with --field)", "no conversation")


def _text(value, where: str, name: str) -> str:
    if value is None:
        raise BadRow(where, f"{name} is missing", "missing content")
    if not isinstance(value, str):
        raise BadRow(where, f"{name} is {type(value).__name__}, not text", "content not text")
    if not value.strip():
        raise BadRow(where, f"{name} is empty", "empty content")
    return value


def to_messages(row, where: str, fmt: RowFormat) -> list[dict]:
    """The row's messages as [{"role", "content"}], checked; raises BadRow."""
    if not isinstance(row, dict):
        raise BadRow(where, f"a row must be a JSON object, got {type(row).__name__}", "not an object")
    shape = _shape(row, where, fmt)
    if shape == "alpaca":
        k = fmt.key
        prompt = _text(row.get(k("instruction")), where, k("instruction"))
        if isinstance(row.get(k("input")), str) and row[k("input")].strip():
            prompt += "\n\n" + row[k("input")]
        system = row.get(k("system"))
        messages = [{"role": "system", "content": _text(system, where, k("system"))}] if system else []
        return messages + [{"role": "user", "content": prompt},
                           {"role": "assistant", "content": _text(row.get(k("output")), where, k("output"))}]
    key, role_key, content_key = map(fmt.key, ("messages", "role", "content") if shape == "messages"
                                     else ("conversations", "from", "value"))
    turns = row.get(key)
    if not isinstance(turns, list) or not turns:
        raise BadRow(where, f"{key} must be a non-empty list of messages", "no messages")
    names = {**(SHAREGPT_ROLES if shape == "sharegpt" else {r: r for r in ROLES}), **fmt.role_map}
    messages = []
    for i, turn in enumerate(turns):
        at = f"{key}[{i}]"
        if not isinstance(turn, dict):
            raise BadRow(where, f"{at} must be an object with {role_key} and {content_key}", "bad message")
        role = names.get(turn.get(role_key))
        if role is None:
            raise BadRow(where, f"{at}.{role_key} {turn.get(role_key)!r} is not one of {', '.join(sorted(names))} "
                         f"(map it with --role-map {turn.get(role_key)}=assistant or =user)", "unknown role")
        messages.append({"role": role, "content": _text(turn.get(content_key), where, f"{at}.{content_key}")})
    return messages


def read_rows(path: Path, parse: Callable[[object, str], T], skip_bad: bool,
              skipped: dict[str, int]) -> Iterator[tuple[str, T]]:
    """(where, parse(row, where)) for each row of a .jsonl file. A bad row (parse raises BadRow) stops the
    reading, or with `skip_bad` is counted in `skipped` by reason and left out."""
    try:
        with open(path, encoding="utf-8") as file:
            for number, line in enumerate(file, start=1):
                if not line.strip():
                    continue
                where = f"{path} line {number}"
                try:
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise BadRow(where, f"not valid JSON ({e.msg})", "not JSON") from None
                    yield where, parse(row, where)
                except BadRow as e:
                    if not skip_bad:
                        raise
                    skipped[e.reason] = skipped.get(e.reason, 0) + 1
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def read_conversations(path: Path, fmt: RowFormat, skip_bad: bool,
                       skipped: dict[str, int]) -> Iterator[tuple[str, list[dict]]]:
    """(where, messages) for each row of a chat .jsonl file (see `read_rows`)."""
    return read_rows(path, lambda row, where: to_messages(row, where, fmt), skip_bad, skipped)
