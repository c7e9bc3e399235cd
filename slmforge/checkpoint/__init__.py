"""Checkpoint folders (`folder`) and the checksums and strict readers that guard them (`integrity`): what the
trainer writes and every other command (eval, sample, export, import, serve) reads, with no training code."""

from slmforge.checkpoint.folder import (
    find_checkpoint,
    latest_checkpoint,
    load_weights,
    read_config,
    read_tokenizer,
    save_checkpoint,
)
from slmforge.checkpoint.integrity import CheckpointError, read_tensors

__all__ = ["CheckpointError", "find_checkpoint", "latest_checkpoint", "load_weights", "read_config",
           "read_tensors", "read_tokenizer", "save_checkpoint"]
