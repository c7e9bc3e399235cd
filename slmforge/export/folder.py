"""What every export and import output shares: the error it raises, the refusal to overwrite without
`--force`, and folders written whole or not at all (filled under a temporary name beside the target, then
renamed into place, replacing an existing one only once the new one is complete)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path


class ExportError(ValueError):
    """A model that cannot be exported or imported as asked, or an output that cannot be written; the
    message names why."""


def refuse_existing(out: Path, force: bool) -> None:
    """An existing output is replaced only when the user asks (`--force`)."""
    if out.exists() and not force:
        raise ExportError(f"{out} already exists: pass --force to replace it")


def gguf_package():
    """The `gguf` package (an optional dependency), or an ExportError saying how to install it."""
    try:
        import gguf
    except ImportError:
        raise ExportError("GGUF files need the gguf package: pip install 'slmforge[gguf]'") from None
    return gguf


def write_folder(out: Path, fill: Callable[[Path], None]) -> Path:
    """Create `out` by calling `fill` on an empty temporary folder beside it; returns `out`."""
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        fill(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
