"""Outputs that cannot be written: the real CLI ends with one line naming the path and the cause, and leaves
nothing half-written; a prepare removes the temporary folders of killed runs, never those of live ones."""

import json
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from slmforge.tokenizer import byte_tokenizer

LEFTOVER_MARKS = (".partial-", ".old-", ".tmp-")  # the temporary names of prepare, tokenizer save and plot


@pytest.fixture
def workspace(tmp_path):
    """Three small text files, a byte tokenizer, a run with a few metrics lines and a plain file `blocker`."""
    (tmp_path / "src").mkdir()
    for i in range(3):  # ~3,900 bytes each: a train shard of ~16,000 bytes (uint16), above the tokenizer's files
        (tmp_path / "src" / f"doc{i}.txt").write_text(" ".join(f"word{j % 97} item{i + j % 13}" for j in range(300)))
    byte_tokenizer().save(tmp_path / "tok")
    (tmp_path / "run").mkdir()
    lines = [{"step": s, "phase": "main", "tokens": 64 * s, "loss": 5.0 - 0.1 * s} for s in range(1, 6)]
    (tmp_path / "run" / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    (tmp_path / "blocker").write_text("a file, not a folder\n")
    return tmp_path


def commands(out: str) -> dict[str, list[str]]:
    """Each command that writes an output, writing it to `out`."""
    return {
        "byte tokenizer": ["tokenizer", "train", "--byte", "--out", out],
        "bpe tokenizer": ["tokenizer", "train", "--source", "src", "--vocab-size", "300", "--out", out],
        "prepare": ["data", "prepare", "--source", "src", "--tokenizer", "tok", "--out", out],
        "plot": ["plot", "run", "--out", out],
    }


def run_cli(cwd: Path, args: list[str], max_file_bytes: int | None = None) -> subprocess.CompletedProcess:
    def limit_file_size():
        # Writes past max_file_bytes fail with EFBIG ("File too large"), as on a full disk, without root;
        # ignoring SIGXFSZ makes the write fail instead of killing the process.
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_file_bytes, max_file_bytes))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)

    return subprocess.run(
        [sys.executable, "-m", "slmforge.cli", *args], cwd=cwd, capture_output=True, text=True, timeout=120,
        preexec_fn=limit_file_size if max_file_bytes else None,
    )


def assert_one_line_error(result: subprocess.CompletedProcess, *names: str) -> str:
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("slmforge: error:"), result.stderr
    for name in names:
        assert name in last, last
    return last


def leftovers(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if any(m in p.name for m in LEFTOVER_MARKS))


@pytest.mark.parametrize("command", ["byte tokenizer", "prepare", "plot"])
def test_output_under_a_file(workspace, command):
    out = "blocker/out.png" if command == "plot" else "blocker/out"
    result = run_cli(workspace, commands(out)[command])
    assert_one_line_error(result, out)
    assert (workspace / "blocker").read_text() == "a file, not a folder\n"
    assert leftovers(workspace) == []


def test_tokenizer_out_that_is_a_file_is_refused(workspace):
    last = assert_one_line_error(run_cli(workspace, commands("blocker")["byte tokenizer"]), "blocker", "is a file")
    assert "give a folder" in last
    assert (workspace / "blocker").read_text() == "a file, not a folder\n"


@pytest.mark.parametrize("command", ["byte tokenizer", "bpe tokenizer", "prepare", "plot"])
def test_full_disk(workspace, command):
    # 8,000 bytes: more than the tokenizer's files need (a prepare then fails on its token shards),
    # less than the shards or the PNG.
    out = workspace / ("out.png" if command == "plot" else "out")
    if "tokenizer" in command:  # a previous tokenizer there is kept whole, not half overwritten
        out.mkdir()
        (out / "tokenizer.json").write_text("previous")
        result = run_cli(workspace, commands("out")[command], max_file_bytes=1000)
        assert (out / "tokenizer.json").read_text() == "previous"
    else:
        result = run_cli(workspace, commands(out.name)[command], max_file_bytes=8000)
        assert not out.exists()
    assert_one_line_error(result, out.name, "File too large")
    assert leftovers(workspace) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders: permission bits do not bind it")
@pytest.mark.parametrize(("command", "out"), [
    ("byte tokenizer", "locked"),  # into the read-only folder itself
    ("prepare", "locked/out"),  # beside which its temporary folder would go
    ("plot", "locked/out.png"),
])
def test_read_only_folder(workspace, command, out):
    locked = workspace / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        result = run_cli(workspace, commands(out)[command])
        assert list(locked.iterdir()) == []
    finally:
        locked.chmod(0o755)
    assert_one_line_error(result, out, "Permission denied")


def test_prepare_removes_leftovers_of_dead_runs_only(workspace):
    finished = subprocess.Popen([sys.executable, "-c", "pass"])
    finished.wait()  # its pid now names no process
    dead, live = finished.pid, os.getpid()  # this test's own process plays a prepare still running
    names = [f".ds.{kind}-{pid}" for kind in ("partial", "old") for pid in (dead, live)]
    names.append(f".other.partial-{dead}")  # another output's leftover: not this prepare's business
    for name in names:
        (workspace / name).mkdir()
        (workspace / name / "train.bin").write_bytes(b"\0\0")
    result = run_cli(workspace, commands("ds")["prepare"])
    assert result.returncode == 0, result.stderr
    assert leftovers(workspace) == sorted([f".ds.old-{live}", f".ds.partial-{live}", f".other.partial-{dead}"])
    assert (workspace / "ds" / "meta.json").is_file()


@pytest.fixture
def prepared(workspace) -> Path:
    from slmforge.data.prepare import prepare_dataset
    from slmforge.data.sources import Source

    prepare_dataset([Source("text", str(workspace / "src"))], byte_tokenizer(), workspace / "data", 0.25,
                    progress=False)
    return workspace


def train_args(out: str) -> list[str]:
    return ["train", "--preset", "tiny", "--data", "data", "--out", out, "--set", "train.steps=4",
            "--set", "train.save_every=2"]


def test_train_on_a_full_disk(prepared):
    # 100,000 bytes: the metrics and config fit, the first checkpoint's 427 KB of weights do not
    result = run_cli(prepared, train_args("run2"), max_file_bytes=100_000)
    assert_one_line_error(result, "run2/main/.tmp-step_2/model.safetensors", "File too large")
    assert leftovers(prepared / "run2") == [] and not (prepared / "run2" / "main" / "step_2").exists()
    # the disk has room again: the same command starts over (no checkpoint to resume) into a clean folder
    result = run_cli(prepared, [*train_args("run2"), "--fresh"])
    assert result.returncode == 0, result.stderr[-2000:]
    assert sorted(p.name for p in (prepared / "run2" / "main").iterdir()) == ["step_2", "step_4"]


def test_train_out_under_a_file(prepared):
    assert_one_line_error(run_cli(prepared, train_args("blocker/run")), "blocker/run")
    assert (prepared / "blocker").read_text() == "a file, not a folder\n"
