"""Small builders shared by the training tests."""

import signal
from collections.abc import Callable
from pathlib import Path

import pytest

from slmforge.data.prepare import prepare_dataset
from slmforge.data.sources import Source
from slmforge.tokenizer import byte_tokenizer
from slmforge.train import train
from slmforge.train.trainer import Trainer

WORDS = "the a quick brown fox dog jumps over lazy river stone light green small tall tree".split()


def make_dataset(folder: Path, texts: list[str], val_fraction: float = 0.25) -> Path:
    """A prepared byte-tokenizer dataset with one document per text."""
    src = folder / "src"
    src.mkdir(parents=True)
    for i, text in enumerate(texts):
        (src / f"doc{i:03d}.txt").write_text(text)
    prepare_dataset([Source("text", str(src))], byte_tokenizer(), folder / "data", val_fraction, progress=False)
    return folder / "data"


def word_dataset(folder: Path) -> Path:
    """12 documents of 80 words from a 17-word vocabulary, byte-tokenized: small runs that resume and load."""
    return make_dataset(folder, [" ".join(f"word{(d * 5 + i * i) % 17}" for i in range(80)) for d in range(12)])


def sentences(n_docs: int = 24, words: int = 120) -> list[str]:
    return [" ".join(WORDS[(7 * d + 3 * i + i * i) % len(WORDS)] for i in range(words)) + "." for d in range(n_docs)]


def ctrl_c_reaches_child() -> None:
    """`preexec_fn` of a child process a test interrupts with SIGINT: a shell without job control starts
    background commands with SIGINT ignored, an ignored signal stays ignored across exec, and Python then
    installs no KeyboardInterrupt handler, so a test run in the background would never reach the child."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Crash(Exception):
    """Raised inside a training step to simulate a run that dies."""


def crash_then_resume(cfg, out: Path, crashes: Callable[[str, int], bool], monkeypatch,
                      before_resume: Callable[[], None] | None = None) -> dict:
    """Train `cfg` into `out` until `crashes(phase name, step)` says so, then resume it; the resumed
    run's report. `before_resume` runs in between (with the real training step back in place)."""
    real_step = Trainer.train_step

    def crashing_step(self, phase, optimizers, batches, step):
        if crashes(phase.name, step):
            raise Crash
        return real_step(self, phase, optimizers, batches, step)

    monkeypatch.setattr(Trainer, "train_step", crashing_step)
    with pytest.raises(Crash):
        train(cfg, out)
    monkeypatch.setattr(Trainer, "train_step", real_step)
    if before_resume is not None:
        before_resume()
    return train(cfg, out, resume=True)


def random_checkpoint(folder: Path, overrides: list[str], seed: int = 0, preset: str = "tiny") -> Path:
    """A checkpoint of random weights (norm gains around 1, routing biases not zero where the balancing rule
    is on), so that a swapped, missing or mis-mapped part of an export shows in its logits."""
    import torch

    from slmforge.checkpoint import save_checkpoint
    from slmforge.config import load_config
    from slmforge.model import build_model

    cfg = load_config(preset, overrides)
    torch.manual_seed(seed)
    model = build_model(cfg.model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.uniform_(0.5, 1.5) if name.endswith("norm.weight") else p.normal_(0.0, 0.1)
        for name, b in model.named_buffers():
            if name.endswith("balance_bias") and cfg.model.moe.bias_update_rate:
                b.normal_(0.0, 0.2)
    return save_checkpoint(folder / "step_1", cfg=cfg, model_state=model.state_dict(), tokenizer=byte_tokenizer(),
                           optimizer_tensors={}, state={"step": 1}, keep_last=1)
