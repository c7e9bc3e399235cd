"""Everything a model card may say, read from a run folder (or a bare checkpoint folder) and nothing else:
the checkpoint's config and tokenizer, report.json, metrics.jsonl, RUN/eval/*.json, and the manifest
(meta.json) of the data folder the run names. A folder that cannot be read as a run is a CheckpointError
in one line."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from slmforge.checkpoint import find_checkpoint, read_config
from slmforge.checkpoint.folder import is_checkpoint
from slmforge.checkpoint.integrity import CheckpointError, read_json
from slmforge.config import RunConfig
from slmforge.eval.task import eval_folder
from slmforge.train.metrics import read_metrics


@dataclass
class Dataset:
    """A prepared data folder a phase trained on: its meta.json, or why it is not known here."""

    path: str
    meta: dict | None
    where: str  # where the manifest was read, or why it could not be


@dataclass
class RunFacts:
    folder: Path  # as the user named it
    checkpoint: Path
    config: RunConfig
    tokenizer: dict  # the checkpoint's tokenizer.json
    report: dict | None  # RUN/report.json; None for a checkpoint with no training record (imported)
    metrics: list[dict]
    evals: list[dict]
    datasets: dict[str, Dataset] = field(default_factory=dict)  # by data.path
    routing_biases: dict = field(default_factory=dict)  # the trained balance_bias tensors (MoE)

    @property
    def run_folder(self) -> Path | None:
        """The folder holding report.json and metrics.jsonl, if any."""
        return self.folder if (self.folder / "report.json").is_file() else None


def _step_id(path: str | Path) -> tuple[str, str]:
    """(phase folder, step folder) of a checkpoint path: how report.json and a found checkpoint are compared
    (the run folder may have moved since the report was written)."""
    p = Path(path)
    return p.parent.name, p.name


def _checkpoint(folder: Path) -> Path:
    """The checkpoint the card describes, verified; a damaged one is named in the error."""
    messages: list[str] = []
    try:
        checkpoint = find_checkpoint(folder, warn=messages.append)
    except CheckpointError as e:
        detail = f" ({messages[0]})" if messages else ""
        raise CheckpointError(f"{e}{detail}".replace(" (see the messages above)", "")) from None
    return checkpoint


def _report(folder: Path, checkpoint: Path) -> dict | None:
    path = folder / "report.json"
    if not path.exists():
        if not is_checkpoint(folder) and (folder / "config.json").is_file():
            raise CheckpointError(f"{folder} has no report.json: the run has not finished (resume it with "
                                  "`slmforge train ... --resume`), so there are no final figures to publish")
        return None
    report = read_json(path)
    for key in ("checkpoint", "phases", "tokens"):
        if key not in report:
            raise CheckpointError(f"{path} is damaged: it has no {key!r}")
    if _step_id(report["checkpoint"]) != _step_id(checkpoint):
        raise CheckpointError(f"{path} ends at {'/'.join(_step_id(report['checkpoint']))}, but the checkpoint "
                              f"found is {checkpoint} (the final one is missing or damaged): the card would "
                              "describe other weights than the report's figures")
    return report


def _evals(folder: Path) -> list[dict]:
    results = []
    for path in sorted(eval_folder(folder).glob("*.json")):
        result = read_json(path)
        if not isinstance(result.get("task"), str) or not isinstance(result.get("metrics"), dict):
            raise CheckpointError(f"{path} is not an evaluation result (no task name or metrics)")
        results.append(result)
    return results


def _datasets(folder: Path, cfg: RunConfig) -> dict[str, Dataset]:
    """The manifest of every data folder a phase names: RUN/data-meta.json (a recipe's copy) when the run
    holds one, else DATA/meta.json when that folder is on this machine."""
    copied = folder / "data-meta.json"
    found = {}
    for phase in cfg.run_phases():
        path = phase.data.path
        if not path or path in found:
            continue
        if copied.is_file():
            found[path] = Dataset(path, read_json(copied), f"{copied.name} in the run folder (a copy of its "
                                                            "meta.json)")
            continue
        try:
            found[path] = Dataset(path, read_json(Path(path) / "meta.json"), f"`{Path(path) / 'meta.json'}`")
        except CheckpointError as e:
            found[path] = Dataset(path, None, f"its manifest could not be read here ({e})")
    return found


def _routing_biases(checkpoint: Path, cfg: RunConfig) -> dict:
    """The trained routing biases (they decide whether a native or GGUF form computes the same routing)."""
    if cfg.model.ffn != "moe":
        return {}
    from safetensors import safe_open

    with safe_open(checkpoint / "model.safetensors", framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys() if k.endswith("balance_bias")}


def read_run(folder: str | Path) -> RunFacts:
    """The facts of run folder `folder` (its final checkpoint) or of a checkpoint folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: no such run folder")
    for run in (folder.parent, folder.parent.parent):  # a phase or checkpoint folder inside a finished run
        if not (folder / "report.json").exists() and (run / "report.json").is_file() and \
                (run / "config.json").is_file():
            raise CheckpointError(f"{folder} is part of the run {run}: a card describes a whole run, so name the "
                                  "run folder")
    checkpoint = _checkpoint(folder)
    config = read_config(checkpoint)
    report = _report(folder, checkpoint)
    metrics = read_metrics(folder / "metrics.jsonl") if report is not None else []
    return RunFacts(
        folder=folder, checkpoint=checkpoint, config=config, tokenizer=read_json(checkpoint / "tokenizer.json"),
        report=report, metrics=metrics, evals=_evals(folder),
        datasets=_datasets(folder, config) if report is not None else {},
        routing_biases=_routing_biases(checkpoint, config),
    )


def phase_tokens(facts: RunFacts) -> dict[str, int]:
    """Tokens each phase trained on: from metrics.jsonl (cumulative counts), else steps x tokens per step."""
    tokens, before = {}, 0
    world = (facts.report or {}).get("world_size", 1)
    for phase in facts.config.run_phases():
        seen = [line["tokens"] for line in facts.metrics if line.get("phase") == phase.name
                and isinstance(line.get("tokens"), (int, float)) and "val_loss" not in line]
        if seen:
            tokens[phase.name] = int(max(seen)) - before
            before = int(max(seen))
        else:
            tokens[phase.name] = phase.steps * phase.data.seq_len * phase.data.batch_size * \
                facts.config.train.grad_accum * world
            before += tokens[phase.name]
    return tokens
