"""What is checked and decided before a run takes its first step, before any tensor exists: the model an
init checkpoint brings, each phase's data against the model's vocabulary, the work of one micro-step."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from slmforge.checkpoint.folder import find_checkpoint, read_config
from slmforge.checkpoint.integrity import CheckpointError
from slmforge.config import ConfigError, RunConfig, check_vocab, from_dict
from slmforge.data.loader import TokenDataset
from slmforge.model.stats import model_stats
from slmforge.tokenizer import Tokenizer, load_tokenizer
from slmforge.train.metrics import log


def phase_key(cfg: RunConfig, i: int, key: str) -> str:
    """The config key of phase i's `key` (`phases.1.data.path`, or `data.path` for a run without phases)."""
    return f"phases.{i}.{key}" if cfg.phases else key


def open_data(cfg: RunConfig) -> tuple[list[TokenDataset], Tokenizer]:
    """Each phase's dataset and the tokenizer they share, checked against the model's vocabulary."""
    datasets, tokenizer = [], None
    for i, phase in enumerate(cfg.run_phases()):
        key = phase_key(cfg, i, "data.path")
        if not phase.data.path:
            raise ConfigError(f"{key} is not set: pass --data DIR (a folder written by `slmforge data prepare`)")
        if not Path(phase.data.path).is_dir():
            raise ConfigError(f"{key}={phase.data.path}: no such folder (prepare one with `slmforge data prepare`)")
        datasets.append(TokenDataset(phase.data.path))
        phase_tokenizer = load_tokenizer(phase.data.path)
        check_vocab(cfg.model, phase_tokenizer.vocab_size, f"the tokenizer of {key}={phase.data.path}")
        if tokenizer is not None and phase_tokenizer.hf.to_str() != tokenizer.hf.to_str():
            raise ConfigError(f"{key}={phase.data.path} was tokenized with a different tokenizer than phase 0's data")
        tokenizer = tokenizer or phase_tokenizer
    return datasets, tokenizer


def micro_step_flops(cfg: RunConfig) -> float:
    """Forward + backward FLOPs of the largest micro-batch of the run."""
    return max(model_stats(cfg.model, p.data.seq_len)["train_flops_per_token"] * p.data.batch_size * p.data.seq_len
               for p in cfg.run_phases())


def with_init_model(cfg: RunConfig) -> RunConfig:
    """With train.init set, the run's model is the init checkpoint's (validated again with the run's data
    settings), and train.init names that checkpoint folder itself, verified here once (a run folder resolves
    to its newest intact checkpoint); without it, `cfg` as it is."""
    if not cfg.train.init:
        return cfg
    try:
        checkpoint = find_checkpoint(cfg.train.init, warn=log)
        model = dataclasses.asdict(read_config(checkpoint).model)
    except CheckpointError as e:
        raise ConfigError(f"train.init={cfg.train.init}: {e}") from None
    raw = cfg.to_dict()
    raw["train"]["init"] = str(checkpoint)
    try:
        return from_dict({**raw, "model": model})
    except ConfigError as e:
        raise ConfigError(f"train.init={cfg.train.init}: the run's settings do not fit its model: {e}") from None
