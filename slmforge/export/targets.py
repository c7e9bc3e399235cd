"""Which export targets a model (a run, a checkpoint, a preset or a config file) can reach, and why not:
`slmforge export --list-targets X`."""

from __future__ import annotations

from pathlib import Path

from slmforge.config import ModelConfig, load_config
from slmforge.export.gguf_export import gguf_blockers
from slmforge.export.hf import native_family


def model_of(target: str) -> tuple[str, ModelConfig]:
    """(a name to show, the model config) of a run or checkpoint folder, a preset or a config file."""
    if Path(target).is_dir():
        from slmforge.checkpoint import find_checkpoint, read_config

        checkpoint = find_checkpoint(target)
        return str(checkpoint), read_config(checkpoint).model
    return target, load_config(target).model


def reachable(m: ModelConfig) -> list[tuple[str, str, list[str]]]:
    """(target, what it becomes, reasons it cannot) for every export target."""
    family, native_reasons = native_family(m)
    gguf_reasons = gguf_blockers(m)
    return [
        ("hf-native", f"{family} (trust_remote_code=False)" if family else "", native_reasons),
        ("hf-remote", "slmforge's own model code beside the weights (trust_remote_code=True)", []),
        ("gguf", "llama.cpp's llama architecture" if not gguf_reasons else "", gguf_reasons),
        ("ollama", "a GGUF and a Modelfile" if not gguf_reasons else "", gguf_reasons),
    ]


def format_targets(name: str, m: ModelConfig) -> str:
    lines = [f"{name}:"]
    for target, becomes, reasons in reachable(m):
        lines.append(f"  {target:<10} {'yes: ' + becomes if not reasons else 'no'}")
        lines.extend(f"  {'':<10}   {reason}" for reason in reasons)
    return "\n".join(lines)
