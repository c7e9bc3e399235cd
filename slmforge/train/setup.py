"""What is checked and decided before a run takes its first step, before any tensor exists: the model an
init checkpoint brings, each phase's data against the model's vocabulary, the work of one micro-step."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from slmforge.checkpoint.folder import find_checkpoint, read_config, read_tokenizer
from slmforge.checkpoint.integrity import CheckpointError
from slmforge.config import ConfigError, RunConfig, check_vocab, from_dict
from slmforge.data.loader import TokenDataset
from slmforge.model import packs_rows as model_packs_rows
from slmforge.model.stats import model_stats
from slmforge.tokenizer import Tokenizer, load_tokenizer
from slmforge.train.metrics import log


def phase_key(cfg: RunConfig, i: int, key: str) -> str:
    """The config key of phase i's `key` (`phases.1.data.path`, or `data.path` for a run without phases)."""
    return f"phases.{i}.{key}" if cfg.phases else key


def open_data(cfg: RunConfig) -> tuple[RunConfig, list[TokenDataset], Tokenizer]:
    """(the config with the model's vocabulary fitted to the data, each phase's dataset, the run's tokenizer).

    Phases may use one tokenizer, or tokenizers that extend it with special tokens (pretraining on text, then
    SFT on chat data whose tokenizer gained the chat markers and a template): the run's tokenizer is then the
    largest, the last phase's among equals, and every phase's ids mean the same in it."""
    datasets, tokenizers = [], []
    for i, phase in enumerate(cfg.run_phases()):
        key = phase_key(cfg, i, "data.path")
        if not phase.data.path:
            raise ConfigError(f"{key} is not set: pass --data DIR (a folder written by `slmforge data prepare`)")
        if not Path(phase.data.path).is_dir():
            raise ConfigError(f"{key}={phase.data.path}: no such folder (prepare one with `slmforge data prepare`)")
        datasets.append(TokenDataset(phase.data.path))
        packs_rows(cfg, i)
        tokenizers.append(load_tokenizer(phase.data.path))
    phases = cfg.run_phases()
    index = max(range(len(phases)), key=lambda i: (tokenizers[i].vocab_size, i))
    tokenizer = tokenizers[index]
    where = f"{phase_key(cfg, index, 'data.path')}={phases[index].data.path}"
    for i, phase_tokenizer in enumerate(tokenizers):
        if not tokenizer.extends(phase_tokenizer):
            raise ConfigError(f"{phase_key(cfg, i, 'data.path')}={phases[i].data.path} was tokenized with another "
                              f"tokenizer than {where} ({phase_tokenizer.vocab_size} and {tokenizer.vocab_size} "
                              "tokens, different ids): prepare every phase's data with one --tokenizer")
    cfg = fit_vocab(cfg, tokenizer, where)
    check_teacher(cfg, tokenizer)
    return cfg, datasets, tokenizer


def check_teacher(cfg: RunConfig, tokenizer: Tokenizer) -> None:
    """A distillation teacher must score the student's tokens: the same tokenizer and vocabulary size (and,
    where the student's rows are packed, a model that can pack them too)."""
    teacher = cfg.distill.teacher
    if not teacher:
        return
    try:
        checkpoint = find_checkpoint(teacher, warn=log)
        model, teacher_tokenizer = read_config(checkpoint).model, read_tokenizer(checkpoint)
    except CheckpointError as e:
        raise ConfigError(f"distill.teacher={teacher}: {e}") from None
    if model.vocab_size != cfg.model.vocab_size or teacher_tokenizer.hf.get_vocab() != tokenizer.hf.get_vocab():
        raise ConfigError(f"distill.teacher={teacher}: its vocabulary has {model.vocab_size} tokens, the student's "
                          f"{cfg.model.vocab_size}{' (other ids)' if model.vocab_size == cfg.model.vocab_size else ''}"
                          f": distillation compares the two distributions token by token, so both must use one "
                          f"tokenizer (prepare the student's data with --tokenizer {teacher})")
    for i in range(len(cfg.run_phases())):
        if packs_rows(cfg, i) and not model_packs_rows("auto", model):
            raise ConfigError(f"distill.teacher={teacher}: the {model.arch} teacher cannot read packed rows; set "
                              f"{phase_key(cfg, i, 'data.packing')}=pad")


def fit_vocab(cfg: RunConfig, tokenizer: Tokenizer, where: str) -> RunConfig:
    """`cfg` once its model has a row for every id of the data's tokenizer. From an init checkpoint the
    data must be tokenized by the checkpoint's tokenizer, or by it with special tokens added after its last
    id (chat markers, FIM): then the model grows by those rows (the trainer initialises them). `where`: the
    data the tokenizer came from, as the messages name it (`data.path=DIR`)."""
    if cfg.train.init:
        init_tokenizer = read_tokenizer(Path(cfg.train.init))
        if not tokenizer.extends(init_tokenizer):
            raise ConfigError(f"{where} was not tokenized with the tokenizer of train.init={cfg.train.init} "
                              f"({tokenizer.vocab_size} and {init_tokenizer.vocab_size} tokens, different ids): "
                              f"prepare it with --tokenizer {cfg.train.init}")
        if tokenizer.vocab_size > cfg.model.vocab_size:
            raw = cfg.to_dict()
            raw["model"]["vocab_size"] = tokenizer.vocab_size
            return from_dict(raw)
    check_vocab(cfg.model, tokenizer.vocab_size, f"the tokenizer of {where}")
    return cfg


def micro_step_flops(cfg: RunConfig) -> float:
    """Forward + backward FLOPs of the largest micro-batch of the run."""
    return max(model_stats(cfg.model, p.data.seq_len)["train_flops_per_token"] * p.data.batch_size * p.data.seq_len
               for p in cfg.run_phases())


def with_init_model(cfg: RunConfig) -> RunConfig:
    """With train.init set, the run's model is the init checkpoint's (validated again with the run's data
    settings), and train.init names that checkpoint folder itself, verified here once (a run folder resolves
    to its newest intact checkpoint); without it, `cfg` as it is."""
    if not cfg.train.init:
        if cfg.lora.rank:
            raise ConfigError(f"lora.rank={cfg.lora.rank} needs train.init (--init CHECKPOINT): adapters tune a "
                              "trained model, whose weights stay frozen")
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


def packs_rows(cfg: RunConfig, index: int) -> bool:
    """Whether phase `index` packs conversations of chat data side by side (data.packing)."""
    try:
        return model_packs_rows(cfg.run_phases()[index].data.packing, cfg.model)
    except ValueError as e:
        raise ConfigError(f"{phase_key(cfg, index, 'data.packing')}{e}") from None
