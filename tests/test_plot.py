"""`slmforge plot` (slmforge/plot.py) on synthetic metrics, and the final figures of a real run's report.json."""

import json
import math
import struct
import sys
from pathlib import Path

import pytest
from helpers import make_dataset, sentences

from slmforge import cli
from slmforge.cli.training import train_summary
from slmforge.config import load_config
from slmforge.plot import (
    DPI,
    PANEL_INCHES,
    grid_shape,
    load_run,
    panels_for,
    phase_boundaries,
    plot_runs,
    run_names,
    x_values,
)
from slmforge.train import train

ALL_PANELS = ["training loss", "validation loss", "MTP loss", "expert load imbalance", "balance loss", "z-loss",
              "learning rate"]


@pytest.fixture
def mpl():
    return pytest.importorskip("matplotlib", reason="slmforge plot needs matplotlib (pip install 'slmforge[plot]')")


def write_metrics(folder: Path, lines: list[dict]) -> Path:
    folder.mkdir(parents=True)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return folder


def moe_mtp_run(folder: Path, steps: int = 40) -> Path:
    """One phase of a MoE + MTP model with z-loss; one step's loss is non-finite (written as "nan")."""
    lines = [{"step": 0, "phase": "main", "tokens": 0, "val_loss": 6.3, "val_ppl": 545.0, "val_bpb": 9.1}]
    for s in range(1, steps + 1):
        loss = "nan" if s == 7 else 6.0 - 0.05 * s
        lines.append({"step": s, "phase": "main", "tokens": 256 * s, "loss": loss, "ce_loss": loss, "z_loss": 1e-3,
                      "mtp_loss": 0.3 * (6.0 - 0.05 * s), "mtp_ce_1": 6.1 - 0.05 * s, "balance_loss": 1e-4,
                      "moe_load": [[0.3, 0.2, 0.25, 0.25]], "moe_load_cv": 0.14, "moe_load_cv_max": 0.14,
                      "lr": {"muon": 0.02, "adamw_no_decay": 0.001}, "grad_norm": 1.0, "tokens_per_s": 1e4})
        if s % 20 == 0:
            lines.append({"step": s, "phase": "main", "tokens": 256 * s, "val_loss": 6.0 - 0.05 * s,
                          "val_ppl": math.exp(6.0 - 0.05 * s), "val_bpb": 8.0})
    return write_metrics(folder, lines)


def plain_two_phase_run(folder: Path) -> Path:
    """A dense model without z-loss: pretrain (10 steps), then anneal (5 steps), each evaluated at its start."""
    lines, tokens = [], 0
    for phase, steps in (("pretrain", 10), ("anneal", 5)):
        lines.append({"step": 0, "phase": phase, "tokens": tokens, "val_loss": 5.0, "val_ppl": 148.4, "val_bpb": 7.0})
        for s in range(1, steps + 1):
            tokens += 128
            lines.append({"step": s, "phase": phase, "tokens": tokens, "loss": 5.0 - 0.1 * s, "ce_loss": 5.0 - 0.1 * s,
                          "lr": {"adamw_matrices": 1e-3}, "grad_norm": 1.0, "tokens_per_s": 1e4})
        lines.append({"step": steps, "phase": phase, "tokens": tokens, "val_loss": 4.5, "val_ppl": 90.0,
                      "val_bpb": 6.5})
    return write_metrics(folder, lines)


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from a PNG's header, after checking its signature."""
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR", head
    return struct.unpack(">II", head[16:24])


def expected_size(n_panels: int) -> tuple[int, int]:
    rows, columns = grid_shape(n_panels)
    return round(columns * PANEL_INCHES[0] * DPI), round(rows * PANEL_INCHES[1] * DPI)


@pytest.mark.parametrize("which", ["moe", "plain", "both"])
def test_plot_panels_and_png(tmp_path, mpl, which):
    moe, plain = moe_mtp_run(tmp_path / "moe"), plain_two_phase_run(tmp_path / "plain")
    runs = {"moe": [moe], "plain": [plain], "both": [moe, plain]}[which]
    expected = {"moe": ALL_PANELS, "plain": ["training loss", "validation loss", "learning rate"],
                "both": ALL_PANELS}[which]
    panels = panels_for([load_run(r) for r in runs])
    assert panels == expected
    out = plot_runs(runs, tmp_path / "out" / f"{which}.png", log_x=which == "plain")
    assert out == tmp_path / "out" / f"{which}.png"
    assert png_size(out) == expected_size(len(panels))


def test_run_names_and_phase_steps(tmp_path):
    a, b = plain_two_phase_run(tmp_path / "a" / "run"), moe_mtp_run(tmp_path / "b" / "run")
    assert run_names([a, b]) == ["a/run", "b/run"]
    assert run_names([a, a]) == ["run", "run (2)"]
    records = load_run(a)
    steps = x_values(records, "step")
    assert steps[:2] == [0, 1] and steps[11:14] == [10, 10, 11]  # anneal's step-0 evaluation: at pretrain's end
    tokens = x_values(records, "tokens")
    assert steps[-1] == 15 and tokens[-1] == 15 * 128
    assert phase_boundaries(records, tokens) == [(10 * 128, "anneal")]
    assert phase_boundaries(load_run(b), x_values(load_run(b), "tokens")) == []


def test_missing_and_partial_metrics(tmp_path, mpl, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty/metrics\.jsonl"):
        plot_runs([empty], tmp_path / "x.png")
    assert cli.main(["plot", str(empty), "--out", str(tmp_path / "x.png")]) == 2
    assert "empty/metrics.jsonl" in capsys.readouterr().err
    # a run still training: its last line is cut short and is left out
    run = plain_two_phase_run(tmp_path / "live")
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "phase": "anneal", "tok')
    assert len(load_run(run)) == 19
    (run / "metrics.jsonl").write_text('{"step": 1, "phase"\n{"step": 1, "phase": "main", "loss": 1.0}\n')
    with pytest.raises(ValueError, match=r"live/metrics\.jsonl, line 1"):
        load_run(run)
    assert cli.main(["plot", str(run), "--out", str(tmp_path / "x.png")]) == 2
    assert not (tmp_path / "x.png").exists()


def test_cli_plot(tmp_path, mpl, capsys):
    run = moe_mtp_run(tmp_path / "moe")
    out = tmp_path / "curves.png"
    assert cli.main(["plot", str(run), "--out", str(out), "--log-x", "--x", "step"]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert png_size(out) == expected_size(len(ALL_PANELS))


def test_without_matplotlib(tmp_path, monkeypatch):
    run = plain_two_phase_run(tmp_path / "run")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    with pytest.raises(ValueError, match=r"pip install 'slmforge\[plot\]'"):
        plot_runs([run], tmp_path / "x.png")


@pytest.fixture(scope="module")
def real_run(tmp_path_factory) -> tuple[Path, dict]:
    """A 4-step run of the tiny preset on a byte dataset: (run folder, the report train() returned)."""
    tmp = tmp_path_factory.mktemp("real")
    data = make_dataset(tmp, sentences())
    cfg = load_config("tiny", [f"data.path={data}", "train.steps=4", "train.eval_every=2"])
    return tmp / "run", train(cfg, tmp / "run")


def test_report_has_final_figures(real_run):
    """report.json holds the final validation figures (overall and per phase) and the training throughput."""
    run, report = real_run
    saved = json.loads((run / "report.json").read_text())
    phase = saved["phases"][0]
    assert saved["val_loss"] == pytest.approx(phase["val_loss"]) and 0 < saved["val_bpb"] == phase["val_bpb"]
    assert saved["val_ppl"] == pytest.approx(math.exp(saved["val_loss"])) == pytest.approx(phase["val_ppl"])
    assert 0 < saved["train_s"] == pytest.approx(phase["train_s"]) and saved["train_s"] < saved["elapsed_s"]
    assert saved["tokens"] == 4 * 4 * 64
    assert saved["tokens_per_s"] == pytest.approx(saved["tokens"] / saved["train_s"])
    assert phase["tokens_per_s"] == pytest.approx(saved["tokens_per_s"])
    line = train_summary(report)
    assert f"perplexity {report['val_ppl']:.2f}" in line and "tokens/s training" in line


def test_plot_real_run(tmp_path, mpl, real_run):
    run, _ = real_run
    panels = panels_for([load_run(run)])
    assert panels == ["training loss", "validation loss", "z-loss", "learning rate"]
    assert png_size(plot_runs([run], tmp_path / "run.png")) == expected_size(len(panels))
