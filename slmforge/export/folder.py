"""Export folders are written whole or not at all: filled under a temporary name beside the target, then
renamed into place, replacing an existing one only once the new one is complete."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path


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
