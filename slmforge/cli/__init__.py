"""`slmforge` command line: info, tokenizer train, data prepare, train, eval, sample, chat, serve, export, import, plot, card.

One module per group of commands; each registers its subcommands and their `cmd_*` functions, which import
what they need when they run (so `--help` loads no torch)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from slmforge.cli import chat, convert, data, evaluation, generation, models, training
from slmforge.config import ConfigError
from slmforge.hardware import keep_freed_memory


class Parser(argparse.ArgumentParser):
    """argparse, with a usage mistake reported in one line like every other error."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="slmforge", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for group in (models, data, training, evaluation, generation, chat, convert):
        group.register(sub)
    return parser


def describe_error(e: BaseException) -> str:
    """One line for the user: the path and the cause of an OSError, else the exception's own message."""
    if isinstance(e, OSError) and e.filename is not None:
        target = f"{e.filename} -> {e.filename2}" if e.filename2 is not None else str(e.filename)
        return f"{target}: {e.strerror or e}"
    return str(e) or type(e).__name__


def where_to_resume(args) -> str:
    """For an interrupted `train`: the checkpoint `--resume` would continue from."""
    if getattr(args, "command", None) != "train":
        return ""
    from slmforge.checkpoint import latest_checkpoint

    checkpoint = latest_checkpoint(Path(args.out))
    if checkpoint is None:
        return "; no checkpoint was written, so the run starts again from scratch"
    return f"; the same command with --resume continues from {checkpoint}"


def close_progress_bars() -> None:
    """End every open progress bar, so a message that follows starts on a line of its own."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", [])):
        bar.close()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    keep_freed_memory()
    from slmforge.checkpoint import CheckpointError
    from slmforge.train.errors import TrainingError

    try:
        args.func(args)
    except KeyboardInterrupt:
        close_progress_bars()
        print(f"slmforge: interrupted{where_to_resume(args)}", file=sys.stderr)
        return 130
    except (ConfigError, CheckpointError, TrainingError, OSError, ValueError) as e:
        close_progress_bars()
        print(f"slmforge: error: {describe_error(e)}", file=sys.stderr)
        return 2
    return 0

