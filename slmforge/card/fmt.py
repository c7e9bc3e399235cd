"""Numbers, times and tables as a model card writes them."""

from __future__ import annotations

import math
import os
import re
import site
import sysconfig
from pathlib import Path


def count(n: float) -> str:
    """1311872 -> '1,311,872'."""
    return f"{round(n):,}"


def human(n: float) -> str:
    """1311872 -> '1.31M'; 950 -> '950'."""
    for suffix in ("", "K", "M", "B", "T"):
        if abs(n) < 1000:
            return f"{n:.0f}" if not suffix else f"{n:.3g}{suffix}"
        n /= 1000
    return f"{n:.3g}P"


def count_human(n: float) -> str:
    """'1,311,872 (1.31M)', or the plain count below a thousand."""
    return count(n) if abs(n) < 1000 else f"{count(n)} ({human(n)})"


def mib(n_bytes: float) -> str:
    return f"{n_bytes / 2**20:.1f} MiB" if n_bytes >= 2**20 / 10 else f"{n_bytes / 1024:.1f} KiB"


def duration(seconds: float) -> str:
    """216.0 -> '3 min 36 s'; 1.6 -> '1.6 s'; 7260 -> '2 h 1 min'."""
    if seconds < 60:
        return f"{seconds:.1f} s" if seconds < 10 else f"{seconds:.0f} s"
    minutes, s = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {s} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min"


def number(value: float, digits: int = 4) -> str:
    """A measured figure to `digits` decimals (non-finite ones as they are)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if not math.isfinite(value):
        return str(value)
    return f"{value:.{digits}f}"


def significant(value: float, digits: int = 3) -> str:
    """A derived estimate to `digits` significant figures, never in e-notation: 0.00391, 1.56, 1,234."""
    if value == 0 or not math.isfinite(value):
        return f"{value:g}"
    magnitude = math.floor(math.log10(abs(value)))
    decimals = max(digits - 1 - magnitude, 0)
    return f"{round(value, decimals):,.{decimals}f}"


def percent(rate: float) -> str:
    return f"{100 * rate:.1f}%"


def _one_line(value, limit: int) -> str:
    text = str(value)
    if limit and len(text) > limit:
        text = text[:limit].rstrip() + "…"
    return text.replace("|", "\\|").replace("\r", "").replace("\n", "⏎")


def cell(value, limit: int = 0) -> str:
    """Text fit for one cell of a Markdown table: pipes escaped, newlines shown as ⏎, cut at `limit`,
    backticks made quotes (so no code span starts)."""
    return _one_line(str(value).replace("\\", "\\\\").replace("`", "'"), limit)


def code(value, limit: int = 0) -> str:
    """Text as a code span in a table cell, shown as it is: pipes escaped (GFM reads them inside code spans
    too), newlines as ⏎, fenced by more backticks than it holds in a row."""
    text = _one_line(value, limit)
    fence = "`" * (max((len(run) for run in re.findall("`+", text)), default=0) + 1)
    pad = " " if text.startswith("`") or text.endswith("`") or not text.strip() else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def table(header: list[str], rows: list[list[str]], align: str = "") -> str:
    """A Markdown table; `align` holds one of 'l'/'r' per column (default: left)."""
    marks = [("---:" if a == "r" else "---") for a in (align or "l" * len(header)).ljust(len(header), "l")]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(marks) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def properties(rows: list[tuple[str, str]]) -> str:
    """A two-column property | value table."""
    return table(["Property", "Value"], [[k, v] for k, v in rows])


def _local_prefixes() -> list[tuple[str, str]]:
    """Absolute folders of this machine and how a card names them, the most specific first."""
    named = [(p, "<site-packages>") for p in {*site.getsitepackages(), sysconfig.get_paths()["purelib"]}]
    named += [(sysconfig.get_paths()["stdlib"], "<python-stdlib>")]
    cache = os.environ.get("SLMFORGE_CACHE")
    if cache:
        named.append((cache, "$SLMFORGE_CACHE"))
    named += [(os.getcwd(), "."), (str(Path.home()), "~")]
    resolved = [(str(Path(p).resolve()), name) for p, name in named] + named
    return sorted({(p.rstrip("/"), n) for p, n in resolved if len(p.rstrip("/")) > 1}, key=lambda x: -len(x[0]))


def public_paths(text: str) -> str:
    """`text` with this machine's absolute folders named as a reader elsewhere can read them: the
    working folder as relative paths, site-packages, the Python standard library, the home folder as ~."""
    for prefix, name in _local_prefixes():
        if name == ".":
            text = re.sub(re.escape(prefix) + "/", "", text)
        text = re.sub(re.escape(prefix) + r"(?![\w.-])", name, text)
    return text
