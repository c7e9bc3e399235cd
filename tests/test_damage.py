"""Damaged checkpoints: found by their checksums, named, and passed over for the newest intact one, from
which --resume continues exactly; bad weights (wrong dtype, NaN) refused with the tensor named."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from helpers import word_dataset

from slmforge.cli import main
from slmforge.config import load_config
from slmforge.eval import evaluate_checkpoint
from slmforge.checkpoint import CheckpointError
from slmforge.infer.load import load_model
from slmforge.train import train
from slmforge.checkpoint.folder import find_checkpoint
from slmforge.checkpoint.integrity import write_checksums


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return word_dataset(tmp_path_factory.mktemp("data"))


def tiny(data: Path, *overrides: str):
    return load_config("tiny", [f"data.path={data}", "train.steps=6", "train.save_every=2", "train.eval_every=2",
                                "train.keep_last=3", "train.dtype=fp32", *overrides])


@pytest.fixture(scope="module")
def finished(tmp_path_factory, data) -> Path:
    """A run of 6 steps with checkpoints after steps 2, 4 and 6."""
    run = tmp_path_factory.mktemp("finished") / "run"
    train(tiny(data), run)
    return run


@pytest.fixture
def run(tmp_path, finished) -> Path:
    """A copy of the finished run, free to damage."""
    shutil.copytree(finished, tmp_path / "run")
    return tmp_path / "run"


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def flip_byte(path: Path) -> None:
    """Flip one bit near the end of the file: inside tensor data, where the file still parses."""
    raw = bytearray(path.read_bytes())
    raw[-7] ^= 0x10
    path.write_bytes(bytes(raw))


def lines(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_truncated_latest_checkpoint_falls_back_and_resumes_exactly(run, finished, data, capsys):
    truncate(run / "main" / "step_6" / "model.safetensors")
    warnings = []
    assert find_checkpoint(run, warn=warnings.append) == run / "main" / "step_4"
    assert "step_6/model.safetensors is damaged" in warnings[0] and "step_4" in warnings[1]

    # eval and sample take the older checkpoint and say why
    assert evaluate_checkpoint(run, quiet=True)["checkpoint"] == str(run / "main" / "step_4")
    assert main(["sample", str(run), "--prompt", "the", "--max-new-tokens", "3", "--greedy"]) == 0
    assert "step_6/model.safetensors is damaged" in capsys.readouterr().err

    train(tiny(data), run, resume=True)  # steps 5 and 6 again, from step_4
    for name, tensor in load_file(finished / "main" / "step_6" / "model.safetensors").items():
        torch.testing.assert_close(load_file(run / "main" / "step_6" / "model.safetensors")[name], tensor,
                                   atol=1e-6, rtol=0)
    got, expected = lines(run), lines(finished)
    assert [l["step"] for l in got] == [l["step"] for l in expected]
    for a, b in zip(got, expected):
        for key in ("loss", "val_loss"):
            assert a.get(key) == pytest.approx(b.get(key), abs=1e-6)


def test_flipped_bit_is_found(run, data):
    flip_byte(run / "main" / "step_6" / "model.safetensors")
    load_file(run / "main" / "step_6" / "model.safetensors")  # the file itself still parses
    with pytest.raises(CheckpointError, match=r"step_6/model.safetensors is damaged"):
        load_model(run / "main" / "step_6")  # a checkpoint named by the user: no fallback
    assert evaluate_checkpoint(run, quiet=True)["checkpoint"] == str(run / "main" / "step_4")

    # resuming also needs the optimizer state: a flipped bit there sends --resume one checkpoint further back
    flip_byte(run / "main" / "step_4" / "trainer_state" / "optimizer.safetensors")
    assert find_checkpoint(run) == run / "main" / "step_4"  # enough for eval and sample
    assert find_checkpoint(run, trainer_state=True, warn=lambda m: None) == run / "main" / "step_2"
    report = train(tiny(data), run, resume=True)
    assert report["tokens"] == 6 * 4 * 64 and sorted(p.name for p in (run / "main").iterdir()) == [
        "step_2", "step_4", "step_6"]


def test_every_checkpoint_damaged(run, capsys):
    for step in (2, 4, 6):
        truncate(run / "main" / f"step_{step}" / "model.safetensors")
    assert main(["eval", str(run)]) == 2
    err = capsys.readouterr().err
    assert "none of its 3 checkpoints is intact" in err.splitlines()[-1] and "Traceback" not in err


@pytest.mark.parametrize("name", ["config.json", "trainer_state/state.json", "tokenizer.json"])
def test_damaged_json_is_named(run, data, name):
    path = run / "main" / "step_6" / name
    path.write_text("{")
    with pytest.raises(CheckpointError, match=f"step_6/{name} is damaged"):
        find_checkpoint(run / "main" / "step_6", trainer_state=True)
    # recorded as it is now (the checksums agree), the reader itself names the file
    write_checksums(run / "main" / "step_6")
    with pytest.raises(CheckpointError, match=f"step_6/{name}"):
        if name == "trainer_state/state.json":
            train(tiny(data, "train.steps=8"), run, resume=True, allow_changes=True)
        else:
            load_model(run / "main" / "step_6")


def test_unfinished_checkpoint_is_passed_over(run):
    (run / "main" / "step_6" / "checksums.sha256").unlink()
    warnings = []
    assert find_checkpoint(run, warn=warnings.append) == run / "main" / "step_4"
    assert "never finished" in warnings[0]


def test_wrong_dtype_and_non_finite_weights_are_refused(run):
    folder = run / "main" / "step_6"
    tensors = load_file(folder / "model.safetensors")
    good = dict(tensors)
    tensors["embed.weight"] = tensors["embed.weight"].to(torch.int64)
    save_file(tensors, folder / "model.safetensors")
    write_checksums(folder)
    with pytest.raises(CheckpointError, match=r"dtype mismatches: \['embed.weight: checkpoint int64, model float32'\]"):
        load_model(folder)

    good["layers.1.attn.q_proj.weight"][3, 5] = float("nan")
    good["norm.weight"][:] = float("inf")
    save_file(good, folder / "model.safetensors")
    write_checksums(folder)
    with pytest.raises(CheckpointError, match=r"NaN or inf in layers.1.attn.q_proj.weight \(1 of [\d,]+ values\), "
                                              r"norm.weight \(every value\)"):
        load_model(folder)


def test_torn_metrics_line_is_dropped(run, finished, data, capsys):
    shutil.rmtree(run / "main" / "step_6")  # killed while writing the line of step 6
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "phase": "ma')
    train(tiny(data), run, resume=True)
    assert "dropped line(s) 11" in capsys.readouterr().err
    assert [l["step"] for l in lines(run)] == [l["step"] for l in lines(finished)]


def test_leftover_temporary_checkpoint_is_removed(run, data):
    (run / "main" / ".tmp-step_8" / "trainer_state").mkdir(parents=True)
    train(tiny(data), run, resume=True)
    assert not (run / "main" / ".tmp-step_8").exists()
