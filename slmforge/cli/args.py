"""argparse types and the --source option the commands share."""

from __future__ import annotations

import argparse
import math


def number(kind: type, low: float | None = None, high: float | None = None, low_open: bool = False,
           high_open: bool = False):
    """An argparse type: a finite `kind` within [low, high] (an end excluded when it is open)."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}")
        if not math.isfinite(value) or (low is not None and (value < low or low_open and value == low)) or (
                high is not None and (value > high or high_open and value == high)):
            lo = "-inf" if low is None else f"{low:g}"
            hi = "inf" if high is None else f"{high:g}"
            bounds = f"{'(' if low_open or low is None else '['}{lo}, {hi}{')' if high_open or high is None else ']'}"
            raise argparse.ArgumentTypeError(f"must lie in {bounds}, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


POSITIVE_INT = number(int, 1)


COUNT = number(int, 0)


def add_sources(p: argparse.ArgumentParser) -> None:
    p.add_argument("--source", action="append", default=[], metavar="SPEC",
                   help="[NAME=]PATH[::FIELD[+FIELD]][@WEIGHT]: a file, folder, glob or .jsonl; repeatable "
                        "(default: the Python standard library of this interpreter)")


def sources(specs: list[str]):
    from slmforge.data.sources import default_sources, parse_source

    return [parse_source(s) for s in specs] if specs else default_sources()
