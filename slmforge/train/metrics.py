"""RUN/metrics.jsonl (one JSON object per optimizer step and per evaluation) and messages for the user."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

from tqdm import tqdm


def json_safe(value):
    """JSON has no NaN/inf: write them as strings ("nan", "inf") so every line stays valid JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_safe(v) for v in value]
    return value


class MetricsLog:
    """The run's metrics lines, in memory on every rank and appended to `path` when `enabled` (rank 0)."""

    def __init__(self, path: Path, enabled: bool):
        self.path = path
        self.enabled = enabled
        self.lines: list[dict] = []
        self._file = None

    def resume(self, keep) -> None:
        """Take up the file's lines for which keep(line) is true (on resume: those up to the checkpoint,
        as the steps after it are about to be redone) and rewrite the file with them alone."""
        self.close()
        self.lines = [line for line in read_metrics(self.path, warn=lambda m: log(m, self.enabled)) if keep(line)]
        if self.enabled and self.path.exists():
            tmp = self.path.with_name(f".{self.path.name}.tmp")
            tmp.write_text("".join(json.dumps(line) + "\n" for line in self.lines))
            os.replace(tmp, self.path)  # other ranks may be reading the old file: replace it whole

    def write(self, **fields) -> None:
        line = json_safe(fields)
        self.lines.append(line)
        if not self.enabled:
            return
        if self._file is None:
            self._file = open(self.path, "a")
        self._file.write(json.dumps(line) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def read_metrics(path: str | Path, warn=None) -> list[dict]:
    """The JSON lines of a metrics file. A line that is not JSON (the last one, torn by a killed run) is
    dropped, and `warn` told which."""
    path = Path(path)
    if not path.is_file():
        return []
    lines, bad = [], []
    for number, text in enumerate(path.read_text(errors="replace").splitlines(), 1):
        if not text.strip():
            continue
        try:
            lines.append(json.loads(text))
        except json.JSONDecodeError:
            bad.append(number)
    if bad and warn is not None:
        warn(f"{path}: dropped line(s) {', '.join(map(str, bad))}, which are not complete JSON "
             "(cut short when a run was killed); training rewrites them from the checkpoint")
    return [line for line in lines if isinstance(line, dict)]


def log(message: str, enabled: bool = True) -> None:
    """A line for the user on stderr that does not break the progress bar."""
    if enabled:
        tqdm.write(message, file=sys.stderr)


def load_metrics(expert_load) -> dict:
    """Router statistics of one step from the tokens each expert received, [n_moe_layers, n_experts]:
    each layer's load as fractions, and its coefficient of variation (std / mean; 0 is perfectly even),
    averaged over layers and at the worst layer."""
    load = expert_load.double()
    fractions = load / load.sum(dim=-1, keepdim=True).clamp(min=1.0)
    cv = load.std(dim=-1, unbiased=False) / load.mean(dim=-1).clamp(min=1e-12)
    return {
        "moe_load": [[round(f, 4) for f in row] for row in fractions.tolist()],
        "moe_load_cv": cv.mean().item(),
        "moe_load_cv_max": cv.max().item(),
    }
