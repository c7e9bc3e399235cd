"""Where training text comes from: named, weighted sources of documents, read as a stream.

A source is a file, a folder (searched recursively) or a glob pattern (`**` allowed). A `.jsonl` file
gives one document per line, the chosen fields joined by a blank line; any other file is one document.
In a folder only files with a text suffix (TEXT_SUFFIXES) are read; symlinked folders are followed,
each real folder once. A glob reads whatever it matches, but its `**` does not enter symlinked folders.
Both skip hidden names, `__pycache__` and the source's `exclude` folder names below their starting
folder. Files come in sorted order, so a source always gives the same documents in the same order.

Files that cannot be read or are not UTF-8, and jsonl lines that are not JSON objects with the fields,
are skipped and counted in a SourceStats, never fatal. Only one file is in memory at a time.
"""

from __future__ import annotations

import json
import math
import os
import re
import sysconfig
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

TEXT_SUFFIXES = frozenset(
    ".txt .md .rst .tex .py .pyi .c .h .cc .cpp .hpp .rs .go .java .js .ts .sh .sql "
    ".json .jsonl .yaml .yml .toml .ini .cfg .csv .html .xml .css".split()
)
STDLIB = "<stdlib>"  # the path of a source spec that names the standard library
_GLOB_CHARS = re.compile(r"[*?\[]")
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")  # a source name is a folder name in a dataset


@dataclass
class Source:
    """A named stream of documents; `weight` is its share of the training mixture (relative)."""

    name: str
    paths: str  # a file, a folder, or a glob pattern
    fields: list[str] = field(default_factory=lambda: ["text"])  # .jsonl fields joined by "\n\n"
    weight: float = 1.0
    exclude: list[str] = field(default_factory=list)  # folder names skipped anywhere under `paths`

    def __post_init__(self):
        if not _NAME.fullmatch(self.name):
            raise ValueError(f"source name {self.name!r} must be letters, digits, '_', '.' or '-'")
        if not self.paths:
            raise ValueError(f"source {self.name!r} has an empty path")
        if not self.fields or not all(self.fields):
            raise ValueError(f"source {self.name!r} has an empty field name in {self.fields}")
        if not (math.isfinite(self.weight) and self.weight >= 0):
            raise ValueError(f"source {self.name!r} has weight {self.weight}; weights must be >= 0")


@dataclass
class SourceStats:
    """What reading a source gave: documents and UTF-8 bytes yielded, and what was skipped and why."""

    documents: int = 0
    bytes: int = 0
    skipped_files: int = 0
    skipped_lines: int = 0
    reasons: Counter = field(default_factory=Counter)  # reason -> count, over files and lines
    examples: list[str] = field(default_factory=list)  # the first few "path: reason", for messages

    def skip(self, where: str, reason: str, line: bool = False) -> None:
        if line:
            self.skipped_lines += 1
        else:
            self.skipped_files += 1
        self.reasons[reason] += 1
        if len(self.examples) < 5:
            self.examples.append(f"{where}: {reason}")


def parse_source(spec: str) -> Source:
    """Parse the CLI syntax `[NAME=]PATH[::FIELD[+FIELD...]][@WEIGHT]`.

    Examples: `math=../shared/data/gsm8k/train.jsonl::question+answer@0.15`, `code=/src/**/*.py@0.6`,
    `notes.txt`, `code=<stdlib>` (the running interpreter's standard library, as `default_sources`).
    NAME defaults to the stem of the file or folder (the last folder before any glob).
    """
    rest, weight = spec, 1.0
    head, at, tail = spec.rpartition("@")
    if at and "/" not in tail:  # an "@" inside a folder name is part of the path
        try:
            weight = float(tail)
        except ValueError:
            raise ValueError(f"source {spec!r}: weight {tail!r} is not a number") from None
        rest = head
    name = None
    head, eq, tail = rest.partition("=")
    if eq and _NAME.fullmatch(head):
        name, rest = head, tail
    path, sep, fields = rest.partition("::")
    if not path:
        raise ValueError(f"source {spec!r} has an empty path")
    field_names = fields.split("+") if sep else ["text"]
    name = name or _default_name(path)
    if name is None:
        raise ValueError(f"source {spec!r}: cannot name it from its path; write NAME={rest}")
    exclude = []
    if path == STDLIB:
        path, exclude = _stdlib_glob(), ["site-packages"]
    try:
        return Source(name, path, field_names, weight, exclude)
    except ValueError as e:
        raise ValueError(f"source {spec!r}: {e}") from None


def _fixed_parts(path: str) -> tuple[str, ...]:
    """The leading path components before the first one with a glob character."""
    parts = Path(path).parts
    for i, part in enumerate(parts):
        if _GLOB_CHARS.search(part):
            return parts[:i]
    return parts


def _default_name(path: str) -> str | None:
    parts = _fixed_parts(path)
    stem = Path(*parts).stem if parts else ""
    return stem if _NAME.fullmatch(stem) else None


def _stdlib_glob() -> str:
    return os.path.join(sysconfig.get_paths()["stdlib"], "**", "*.py")


def default_sources() -> list[Source]:
    """The running interpreter's standard library (*.py, without site-packages): always there, no download."""
    return [parse_source(f"stdlib={STDLIB}")]


def iter_documents(source: Source, stats: SourceStats) -> Iterator[str]:
    """Yield the documents of `source` in a fixed order, counting what was read or skipped in `stats`."""
    for path in _list_files(source, stats):
        if not os.path.isfile(path):  # a broken link, or a fifo/device that open() could block on
            stats.skip(path, "unreadable (not a file)")
            continue
        if path.endswith(".jsonl"):
            yield from _jsonl_documents(path, source.fields, stats)
            continue
        try:
            with open(path, "rb") as f:
                data = f.read()
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            stats.skip(path, "not UTF-8")
            continue
        except OSError as e:
            stats.skip(path, f"unreadable ({e.strerror or type(e).__name__})")
            continue
        if not text:
            stats.skip(path, "empty")
            continue
        stats.documents += 1
        stats.bytes += len(data)
        yield text


def _jsonl_documents(path: str, fields: list[str], stats: SourceStats) -> Iterator[str]:
    try:
        f = open(path, "rb")
    except OSError as e:
        stats.skip(path, f"unreadable ({e.strerror or type(e).__name__})")
        return
    with f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                record = json.loads(line.decode("utf-8"))
            except UnicodeDecodeError:
                stats.skip(where, "not UTF-8", line=True)
                continue
            except json.JSONDecodeError:
                stats.skip(where, "invalid JSON", line=True)
                continue
            if not isinstance(record, dict):
                stats.skip(where, "not a JSON object", line=True)
                continue
            missing = [k for k in fields if not isinstance(record.get(k), str)]
            if missing:
                stats.skip(where, f"missing text field {missing[0]!r}", line=True)
                continue
            text = "\n\n".join(record[k] for k in fields)
            if not text:
                stats.skip(where, "empty", line=True)
                continue
            stats.documents += 1
            stats.bytes += len(text.encode("utf-8"))
            yield text


def check_sources(sources: list[Source]) -> None:
    """Raise FileNotFoundError naming every source whose path is missing or whose glob matches no file, so
    a typo in the last source is reported before the first one is read (tokenizing may take hours)."""
    missing = [reason for reason in map(_missing_reason, sources) if reason]
    if missing:
        raise FileNotFoundError("; ".join(missing))


def _missing_reason(source: Source) -> str | None:
    """Why `source` has no file at all (a missing path, a glob matching nothing), or None when it has some."""
    pattern = os.path.expanduser(source.paths)
    if _GLOB_CHARS.search(pattern):
        if next(_glob_files(pattern, _skipped_dirs(source)), None) is None:
            return f"source {source.name!r}: no file matches {source.paths!r}"
    elif not os.path.lexists(pattern):
        return f"source {source.name!r}: {source.paths!r} does not exist"
    return None


def _list_files(source: Source, stats: SourceStats) -> list[str]:
    """The files of a source, sorted; raises FileNotFoundError when its path matches nothing."""
    pattern = os.path.expanduser(source.paths)
    skipped_dirs = _skipped_dirs(source)
    if _GLOB_CHARS.search(pattern):
        files = sorted(_glob_files(pattern, skipped_dirs))
        if files:
            return files
    elif os.path.isdir(pattern):
        return _walk(pattern, skipped_dirs, stats)
    elif os.path.lexists(pattern):
        return [pattern]  # a broken link is listed so that reading it counts it as unreadable
    raise FileNotFoundError(_missing_reason(source))


def _skipped_dirs(source: Source) -> set[str]:
    return set(source.exclude) | {"__pycache__"}


def _glob_files(pattern: str, skipped_dirs: set[str]) -> Iterator[str]:
    """The files a glob matches, in the order found, without hidden names or skipped folders below its
    fixed start."""
    fixed = _fixed_parts(pattern)
    root = Path(*fixed) if fixed else Path(".")
    # pathlib's `**` does not enter symlinked folders, so a link loop cannot make it run away.
    for match in root.glob(str(Path(*Path(pattern).parts[len(fixed) :]))):
        below = match.relative_to(root).parts
        if match.is_dir() or any(p.startswith(".") for p in below) or skipped_dirs.intersection(below[:-1]):
            continue
        yield str(match)


def _walk(root: str, skipped_dirs: set[str], stats: SourceStats) -> list[str]:
    """Text files under `root`; symlinked folders are followed, each real folder once (no loops)."""
    files = []
    seen = set()

    def unreadable(error: OSError) -> None:
        stats.skip(error.filename, "unreadable folder")

    for folder, dirs, names in os.walk(root, followlinks=True, onerror=unreadable):
        real = os.path.realpath(folder)
        if real in seen:
            stats.skip(folder, "folder already read (symlink)")
            dirs.clear()
            continue
        seen.add(real)
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d not in skipped_dirs)
        for name in names:
            if not name.startswith(".") and os.path.splitext(name)[1].lower() in TEXT_SUFFIXES:
                files.append(os.path.join(folder, name))
    return sorted(files)
