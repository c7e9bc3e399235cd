"""The weights a fine-tuning run starts from (train.init): loaded with rows for new token ids, and, with
LoRA, frozen under adapters."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from torch import nn

from slmforge.checkpoint.folder import load_weights, read_config
from slmforge.checkpoint.integrity import read_tensors
from slmforge.config import ConfigError, LoraConfig
from slmforge.model.lora import add_lora
from slmforge.model.vocab import grow_vocab_rows


def load_init_weights(model: nn.Module, checkpoint: Path, log: Callable[[str], None]) -> None:
    """The checkpoint's weights into `model`, with rows for the ids its tokenizer lacks (see setup.fit_vocab)."""
    weights = checkpoint / "model.safetensors"
    tensors, old_vocab = read_tensors(weights), read_config(checkpoint).model.vocab_size
    vocab = model.cfg.vocab_size
    grown = []
    if old_vocab < vocab:
        tensors, grown = grow_vocab_rows(tensors, model.state_dict(), old_vocab)
    load_weights(model, tensors, str(weights))
    log(f"weights from {checkpoint} (train.init)" + (
        f"; ids {old_vocab}..{vocab - 1} are new: their rows of {', '.join(grown)} start as the mean of the others"
        if grown else ""))


def add_adapters(model: nn.Module, lora: LoraConfig, log: Callable[[str], None]) -> list[str]:
    """LoRA adapters on the targeted projections, everything else frozen; the adapted modules' names."""
    try:
        adapted = add_lora(model, lora.rank, lora.alpha, lora.targets)
    except ValueError as e:
        raise ConfigError(f"lora.targets={lora.targets}: {e}") from None
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log(f"LoRA rank {lora.rank}, alpha {lora.alpha:g} on {len(adapted)} projections: {trainable:,} trainable "
        f"parameters ({trainable / total:.2%} of {total:,}); the rest frozen")
    return adapted
