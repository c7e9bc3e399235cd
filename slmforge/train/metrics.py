"""RUN/metrics.jsonl (one JSON object per optimizer step and per evaluation) and messages for the user."""

from __future__ import annotations

import json
import math
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
    """Appends lines to `path` (opened at the first line); a no-op when `enabled` is False (ranks other than 0)."""

    def __init__(self, path: Path, enabled: bool):
        self.path = path
        self.enabled = enabled
        self._file = None

    def write(self, **fields) -> None:
        if not self.enabled:
            return
        if self._file is None:
            self._file = open(self.path, "a")
        self._file.write(json.dumps(json_safe(fields)) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def read_metrics(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def truncate_metrics(path: Path, keep) -> None:
    """Keep only the lines for which keep(line) is true: on resume, drop what came after the checkpoint."""
    lines = read_metrics(path)
    if lines:
        path.write_text("".join(json.dumps(line) + "\n" for line in lines if keep(line)))


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
