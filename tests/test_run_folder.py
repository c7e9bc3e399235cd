"""Run folders lose nothing: --fresh deletes only a run folder, resuming a finished run keeps its report,
--resume refuses changed settings, a run that fails before its first step leaves nothing, Ctrl-C stops
cleanly and says where to resume."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import ctrl_c_reaches_child, word_dataset

from slmforge.cli import main
from slmforge.config import load_config
from slmforge.train import TrainingError, train
from slmforge.train import trainer as trainer_module
from slmforge.train.run_folder import config_changes


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return word_dataset(tmp_path_factory.mktemp("data"))


def tiny(data: Path, *overrides: str):
    return load_config("tiny", [f"data.path={data}", "train.steps=4", "train.save_every=2", *overrides])


def train_cli(data: Path, out: Path, *extra: str) -> int:
    return main(["train", "--preset", "tiny", "--data", str(data), "--out", str(out), "--set", "train.steps=2", *extra])


def test_fresh_refuses_a_folder_of_source_files(tmp_path, data, capsys):
    project = tmp_path / "project"
    (project / "pkg").mkdir(parents=True)
    (project / "pkg" / "main.py").write_text("print('mine')\n")
    (project / "config.json").write_text('{"name": "my app"}')
    assert train_cli(data, project, "--fresh") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("slmforge: error: --fresh refuses to delete") and "pkg/" in err and "config.json" in err
    assert (project / "pkg" / "main.py").read_text() == "print('mine')\n" and len(list(project.rglob("*"))) == 3

    run = tmp_path / "run"
    assert train_cli(data, run) == 0
    (run / "notes.txt").write_text("my notes")  # a run folder with a file of the user's in it is no run folder
    assert train_cli(data, run, "--fresh") == 2 and (run / "notes.txt").exists()
    (run / "notes.txt").unlink()
    assert train_cli(data, run, "--fresh", "--set", "train.seed=3") == 0  # a run folder: replaced


def test_resuming_a_finished_run_keeps_its_report(tmp_path, data, capsys):
    run = tmp_path / "run"
    report = train(tiny(data), run)
    before = (run / "report.json").read_bytes()
    assert json.loads(before)["val_loss"] == pytest.approx(report["val_loss"])
    again = train(tiny(data), run, resume=True)
    assert (run / "report.json").read_bytes() == before and again["val_loss"] == pytest.approx(report["val_loss"])
    assert "the run is complete" in capsys.readouterr().err

    (run / "report.json").unlink()  # killed after its last checkpoint, before the report: rebuilt from metrics
    rebuilt = train(tiny(data), run, resume=True)
    for key in ("val_loss", "val_bpb", "tokens"):
        assert rebuilt[key] == pytest.approx(report[key])
    assert rebuilt["phases"][0]["start_val_loss"] == pytest.approx(report["phases"][0]["start_val_loss"])


def test_resume_refuses_changed_settings(tmp_path, data):
    run = tmp_path / "run"
    train(tiny(data, "train.steps=2"), run)
    with pytest.raises(TrainingError, match=r"train.seed: 1337 -> 7; train.steps: 2 -> 4.*--allow-changes"):
        train(tiny(data, "train.seed=7"), run, resume=True)
    report = train(tiny(data, "train.seed=7", "train.log_every=1"), run, resume=True, allow_changes=True)
    assert report["tokens"] == 4 * 4 * 64
    train(tiny(data, "train.seed=7", "train.steps=6", "train.eval_every=3"), run, resume=True, allow_changes=True)
    # bookkeeping alone (how often to log, evaluate, save) may change without asking
    train(tiny(data, "train.seed=7", "train.steps=6", "train.keep_last=1", "train.log_every=2"), run, resume=True)


def test_a_batch_split_over_more_processes_is_no_change(data):
    one, two = tiny(data, "data.batch_size=8"), tiny(data, "data.batch_size=4")
    assert config_changes(one, 1, two, 2) == []
    assert config_changes(one, 1, two, 1) == ["data.batch_size x processes: 8 x 1 -> 4 x 1"]
    moved = dataclasses.replace(two, data=dataclasses.replace(two.data, path=str(data) + "/"))
    assert config_changes(one, 1, moved, 2) == []  # the same dataset under another spelling


def test_a_run_that_fails_before_its_first_step_leaves_nothing(tmp_path, data, monkeypatch):
    def broken(*args):
        raise ValueError("no optimizer today")

    monkeypatch.setattr(trainer_module, "build_optimizers", broken)
    with pytest.raises(ValueError):
        train(tiny(data), tmp_path / "run")
    assert not (tmp_path / "run").exists()
    (tmp_path / "empty").mkdir()  # a folder the user made is kept
    with pytest.raises(ValueError):
        train(tiny(data), tmp_path / "empty")
    assert (tmp_path / "empty").is_dir()


@pytest.mark.slow
def test_ctrl_c_stops_cleanly_and_says_where_to_resume(tmp_path, data):
    out = tmp_path / "run"
    command = [sys.executable, "-m", "slmforge.cli", "train", "--preset", "tiny", "--data", str(data),
               "--out", str(out), "--set", "train.steps=100000", "--set", "train.save_every=2",
               "--set", "train.eval_every=100000"]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                               preexec_fn=ctrl_c_reaches_child)
    deadline = time.monotonic() + 60
    while not (out / "main" / "step_4").is_dir() and time.monotonic() < deadline:
        time.sleep(0.1)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130, err[-2000:]
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("slmforge: interrupted; the same command with --resume continues from ")
    assert Path(last.rsplit(" ", 1)[-1]).parent == out / "main"
