"""What every evaluation task returns and where it is kept: `RUN/eval/<task>.json` holds the task's
metrics, the settings it ran with, the checkpoint it scored, the number of examples and one record per
example, so a model card (or a person) can read what was measured and how."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from slmforge.checkpoint.integrity import write_json_atomic


@dataclass
class TaskResult:
    task: str  # the name `slmforge eval --task` takes, and the file's stem
    metrics: dict[str, float]  # e.g. {"exact_match": 0.12}; the headline metric first
    n_examples: int
    settings: dict  # every knob that changes the numbers (shots, temperature, samples per problem, sources...)
    records: list[dict] = field(default_factory=list)  # one per example: its input, output and score
    checkpoint: str = ""
    seconds: float = 0.0
    finished_at: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S%z"))


def eval_folder(run: str | Path) -> Path:
    """`RUN/eval/`: beside the checkpoints of the run (or inside the checkpoint folder) the user named."""
    return Path(run) / "eval"


def save_result(folder: Path, result: TaskResult) -> Path:
    """Write `folder/<task>.json` whole or not at all."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{result.task}.json"
    write_json_atomic(path, asdict(result))
    return path


def read_jsonl(path: str | Path) -> list[tuple[str, object]]:
    """(where, row) for each non-empty line of a .jsonl file, `where` being "FILE:LINE" for messages; a line
    that is not JSON is a ValueError naming it, and so is a file without rows."""
    import json

    try:
        lines = Path(path).read_bytes().splitlines()
    except IsADirectoryError:
        raise ValueError(f"{path} is a folder: give the .jsonl file") from None
    rows = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append((f"{path}:{lineno}", json.loads(line.decode("utf-8"))))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}:{lineno}: not a JSON line ({e})") from None
    if not rows:
        raise ValueError(f"{path} holds no question")
    return rows


def load_results(folder: Path) -> list[dict]:
    """Every result saved in an eval folder, by task name."""
    import json

    return [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))] if folder.is_dir() else []


def format_table(results: list[TaskResult]) -> str:
    """The results as a plain text table: task, examples, then each metric."""
    lines = [f"{'task':<12} {'examples':>8}  metrics"]
    for r in results:
        metrics = ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in r.metrics.items())
        lines.append(f"{r.task:<12} {r.n_examples:>8}  {metrics}")
    return "\n".join(lines)
