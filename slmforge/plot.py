"""Training curves of one or more runs, drawn from their RUN/metrics.jsonl into one PNG (`slmforge plot`).

metrics.jsonl holds a line per optimizer step and per evaluation (see slmforge/train/trainer.py); a grid of
panels answers "is it still learning, did the anneal help, are the experts balanced" faster than the
numbers do. Each panel is drawn only when some run logged its metric, every run keeps one color on every
panel, and a faint vertical line marks where a run moved to its next phase.

matplotlib is optional (`pip install 'slmforge[plot]'`) and imported only when a figure is drawn, always
through the Agg canvas: no display, no pyplot state.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

INSTALL_HINT = "plotting needs matplotlib: pip install 'slmforge[plot]'"
PANEL_INCHES = (6.0, 3.6)  # one panel; the figure is a grid of them
DPI = 100
X_LABELS = {"tokens": "tokens seen", "step": "optimizer steps (all phases)"}
STYLE = {  # a quiet look: light grid, no top/right frame
    "axes.spines.top": False, "axes.spines.right": False, "axes.grid": True, "grid.alpha": 0.3,
    "grid.linewidth": 0.6, "axes.titlesize": 11, "axes.titleweight": "bold", "font.size": 9,
    "legend.frameon": False,
}


def _number(value) -> float | None:
    """A metric as a float: metrics.jsonl writes NaN/inf as strings; None or a non-number is absent."""
    if value is None or isinstance(value, bool):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _learning_rate(line: dict) -> float | None:
    """The Muon group's learning rate, else the first group's (lr is {group name: lr})."""
    groups = line.get("lr")
    if isinstance(groups, dict) and groups:
        return _number(groups.get("muon", next(iter(groups.values()))))
    return _number(groups)


@dataclass(frozen=True)
class Panel:
    """One chart of the grid: its title, y-axis label and the value it reads from a metrics line."""

    title: str
    ylabel: str
    value: Callable[[dict], float | None]
    evals: bool = False  # read evaluation lines (drawn as markers) instead of training lines
    smooth: bool = True  # noisy per-step values: a light raw line under a smoothed one


PANELS = [
    Panel("training loss", "loss (nats/token)", lambda r: _number(r.get("ce_loss", r.get("loss")))),
    Panel("validation loss", "loss (nats/token)", lambda r: _number(r.get("val_loss")), evals=True),
    Panel("MTP loss", "weighted MTP loss (nats/token)", lambda r: _number(r.get("mtp_loss"))),
    Panel("expert load imbalance", "load CV (std / mean; 0 = even)", lambda r: _number(r.get("moe_load_cv"))),
    Panel("balance loss", "weighted balance loss", lambda r: _number(r.get("balance_loss"))),
    Panel("z-loss", "weighted z-loss", lambda r: _number(r.get("z_loss"))),
    Panel("learning rate", "lr (muon group, else the first)", _learning_rate, smooth=False),
]


# ----------------------------------------------------------------------------------------------
# reading runs


def metrics_file(run: Path) -> Path:
    """RUN/metrics.jsonl for a run folder; a path to the file itself is taken as it is."""
    return run if run.is_file() else run / "metrics.jsonl"


def load_run(run: Path) -> list[dict]:
    """The lines of a run's metrics.jsonl, in order. A last line cut short (a run still writing it) is
    dropped; a missing file, a damaged line elsewhere or a file with no lines is an error naming the file."""
    file = metrics_file(Path(run))
    if not file.is_file():
        raise FileNotFoundError(f"{file}: no such file (is {run} a run folder written by `slmforge train`?)")
    text = file.read_text()
    lines = text.splitlines()
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            if number == len(lines) and not text.endswith("\n"):
                break
            raise ValueError(f"{file}, line {number}: not valid JSON ({e.msg})") from None
        if isinstance(record, dict):
            records.append(record)
    if not any(_is_step(r) or _is_eval(r) for r in records):
        raise ValueError(f"{file} has no training or evaluation lines yet")
    return records


def _is_step(record: dict) -> bool:
    return "loss" in record or "ce_loss" in record


def _is_eval(record: dict) -> bool:
    return "val_loss" in record


def run_names(runs: list[Path]) -> list[str]:
    """Legend names: each run's folder name, with as many parent folders as it takes to tell apart runs
    that share a name (a/run, b/run); the same folder given twice is numbered."""
    parts = [(r.parent if r.is_file() else r).resolve().parts for r in map(Path, runs)]
    for depth in range(1, max(len(p) for p in parts) + 1):
        names = ["/".join(p[-depth:]) for p in parts]
        if len(set(names)) == len(names):
            return names
    seen: Counter = Counter()
    named = []
    for p in parts:
        seen[p[-1]] += 1
        named.append(p[-1] if seen[p[-1]] == 1 else f"{p[-1]} ({seen[p[-1]]})")
    return named


def x_values(records: list[dict], x: str) -> list[float | None]:
    """Each line's position on the x axis: tokens seen, or optimizer steps counted across phases
    (a phase's step counter restarts at 0, so earlier phases' steps are added)."""
    if x == "tokens":
        return [_number(r.get("tokens")) for r in records]
    xs, offset, phase, last_step = [], 0, None, 0
    for r in records:
        if phase is not None and r.get("phase") != phase:
            offset += last_step
        phase = r.get("phase")
        step = _number(r.get("step"))
        last_step = step if step is not None else last_step
        xs.append(None if step is None else offset + step)
    return xs


def phase_boundaries(records: list[dict], xs: list[float | None]) -> list[tuple[float, str]]:
    """(x where the previous phase ended, name of the phase that starts there) for each phase change."""
    bounds, previous = [], None
    for i, r in enumerate(records):
        if previous is not None and r.get("phase") != records[previous].get("phase") and xs[previous] is not None:
            bounds.append((xs[previous], str(r.get("phase"))))
        previous = i
    return bounds


def _panel_lines(panel: Panel, records: list[dict]) -> list[dict]:
    """The lines a panel reads: evaluations or training steps."""
    return [r for r in records if (_is_eval if panel.evals else _is_step)(r)]


def _panels(runs: list[list[dict]]) -> list[Panel]:
    return [p for p in PANELS if any(p.value(r) is not None for records in runs for r in _panel_lines(p, records))]


def panels_for(runs: list[list[dict]]) -> list[str]:
    """Titles of the panels `plot_runs` draws for runs with these metrics lines: those some run has."""
    return [p.title for p in _panels(runs)]


def grid_shape(n_panels: int) -> tuple[int, int]:
    """(rows, columns) of the panel grid: one column for a single panel, else two."""
    columns = 1 if n_panels == 1 else 2
    return math.ceil(n_panels / columns), columns


def smooth(values: list[float]) -> list[float]:
    """Debiased exponential moving average with a span of about 2.5% of the points (1 to 200 points).
    Non-finite values (skipped steps) are passed over, so one bad step does not break the curve."""
    span = min(200, max(1, len(values) // 40))
    alpha = 2 / (span + 1)
    average, weight, out = 0.0, 0.0, []
    for v in values:
        if math.isfinite(v):
            average = (1 - alpha) * average + alpha * v
            weight = (1 - alpha) * weight + alpha
        out.append(average / weight if weight else math.nan)
    return out


# ----------------------------------------------------------------------------------------------
# drawing


def _matplotlib():
    """matplotlib's pieces, or a ValueError that says how to install it (the CLI reports ValueErrors)."""
    try:
        import matplotlib
        from matplotlib import ticker, transforms
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.lines import Line2D
    except ImportError as e:
        raise ValueError(INSTALL_HINT) from e
    return matplotlib, ticker, transforms, FigureCanvasAgg, Figure, Line2D


def plot_runs(runs: list[Path], out: Path, x: str = "tokens", log_x: bool = False) -> Path:
    """Draw the training curves of `runs` (run folders) into the PNG `out`; return `out`.

    x: "tokens" (tokens seen) or "step" (optimizer steps across phases); log_x: logarithmic x axis
    (points at x = 0, such as the step-0 evaluation, are left out there).
    """
    if x not in X_LABELS:
        raise ValueError(f"x={x!r}: choose one of {', '.join(X_LABELS)}")
    if not runs:
        raise ValueError("no runs to plot")
    matplotlib, ticker, transforms, FigureCanvasAgg, Figure, Line2D = _matplotlib()
    runs, out = [Path(r) for r in runs], Path(out)
    all_records = [load_run(r) for r in runs]
    names = run_names(runs)
    panels = _panels(all_records)
    rows, columns = grid_shape(len(panels))
    colors = [matplotlib.colormaps["tab10"](i % 10) for i in range(len(runs))]

    with matplotlib.rc_context(STYLE):
        fig = Figure(figsize=(columns * PANEL_INCHES[0], rows * PANEL_INCHES[1]), dpi=DPI, layout="constrained")
        FigureCanvasAgg(fig)
        axes = fig.subplots(rows, columns, squeeze=False).ravel()
        for ax in axes[len(panels):]:
            ax.remove()
        for ax in axes[1:len(panels)]:
            ax.sharex(axes[0])  # one x range on every panel, so a moment lines up across them
        for records, color in zip(all_records, colors):
            xs = x_values(records, x)
            bounds = phase_boundaries(records, xs)
            for i, (panel, ax) in enumerate(zip(panels, axes)):
                _draw_panel(ax, panel, records, xs, color)
                for bx, phase in bounds:
                    ax.axvline(bx, color=color, alpha=0.35, linestyle=":", linewidth=1)
                    if i == 0:  # name the phase once, at the top of the first panel
                        ax.text(bx, 0.98, f" {phase}", transform=transforms.blended_transform_factory(
                            ax.transData, ax.transAxes), va="top", ha="left", fontsize=7, color=color)
        for panel, ax in zip(panels, axes):
            ax.set_title(panel.title)
            ax.set_ylabel(panel.ylabel)
            ax.set_xlabel(X_LABELS[x])
            if log_x:
                ax.set_xscale("log", nonpositive="mask")
            ax.xaxis.set_major_formatter(ticker.EngFormatter(sep=""))  # 500k, 2M rather than 2e6
        handles = [Line2D([], [], color=c, linewidth=2) for c in colors]
        fig.legend(handles, names, loc="outside upper center", ncols=min(len(names), 4))
        _save_png(fig, out)
    return out


def _save_png(fig, out: Path) -> None:
    """Save `fig` to a temporary file beside `out`, then rename it into place: a failed write (a full
    disk) leaves no half-written PNG, and an earlier plot at `out` as it was."""
    if out.is_dir():
        raise ValueError(f"{out} is a folder; give the name of the PNG file to write")
    if out.parent.exists() and not out.parent.is_dir():
        raise ValueError(f"cannot write {out}: {out.parent} is a file, not a folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    temporary = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        fig.savefig(temporary, format="png")
        os.replace(temporary, out)
    except OSError as e:  # a failed write names no file, or the temporary one: name the PNG asked for
        raise OSError(e.errno, e.strerror, str(out)) from e
    finally:
        temporary.unlink(missing_ok=True)


def _draw_panel(ax, panel: Panel, records: list[dict], xs: list[float | None], color) -> None:
    """One run's curve on one panel: markers for evaluations, a raw + smoothed line for step metrics."""
    kind = _is_eval if panel.evals else _is_step
    points = [(xv, panel.value(r)) for xv, r in zip(xs, records) if xv is not None and kind(r)]
    points = [(xv, v) for xv, v in points if v is not None]
    if not points:
        return
    px, py = zip(*points)
    if panel.evals:
        ax.plot(px, py, color=color, marker="o", markersize=4, linewidth=0.8)
    elif panel.smooth:
        ax.plot(px, py, color=color, alpha=0.25, linewidth=0.8)
        ax.plot(px, smooth(list(py)), color=color, linewidth=1.6)
    else:
        ax.plot(px, py, color=color, linewidth=1.4)
