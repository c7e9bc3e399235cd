"""Data parallelism: 2 processes with batch B train exactly like 1 process with batch 2B (CPU, gloo), on text
and on preference pairs (DPO)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import random_checkpoint
from slmforge.config import load_config
from slmforge.data.chat import ChatSource, prepare_chat_dataset
from slmforge.data.preference import prepare_preference_dataset
from slmforge.data.prepare import prepare_dataset
from slmforge.data.sources import Source
from slmforge.tokenizer import byte_tokenizer
from slmforge.train import train

WORKER = """
import sys, torch
import slmforge.optim.muon
from slmforge.config import load_config
from slmforge.train import train
torch.set_num_threads(1)
slmforge.optim.muon.cpu_has_fast_bf16 = lambda: False  # see the test
train(load_config(sys.argv[1]), sys.argv[2])
"""


def _config(tmp: Path, data: Path, batch_size: int) -> Path:
    raw = {"base": "tiny", "data": {"path": str(data), "batch_size": batch_size},
           # grad_accum=2 exercises DDP's no_sync on the first micro-step; fp32 so that 1e-5 is a fair bound
           # on machines where auto would choose bf16
           "train": {"steps": 4, "grad_accum": 2, "eval_every": 2, "save_every": 4, "dtype": "fp32"}}
    path = tmp / f"b{batch_size}.json"
    path.write_text(json.dumps(raw))
    return path


def _lines(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _torchrun(tmp: Path, config: Path, out: Path) -> None:
    (tmp / "worker.py").write_text(WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(tmp / "worker.py"), str(config), str(out)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]


def _same_lines(ddp: list[dict], one: list[dict], keys: tuple[str, ...]) -> None:
    assert [(l["step"], "val_loss" in l) for l in ddp] == [(l["step"], "val_loss" in l) for l in one]
    for a, b in zip(ddp, one):
        for key in keys:
            if key in b:
                assert a[key] == pytest.approx(b[key], abs=1e-5), (key, a, b)
        assert a["tokens"] == b["tokens"]  # tokens count all processes


@pytest.mark.slow
def test_two_processes_match_one_with_twice_the_batch(tmp_path, monkeypatch):
    # fp32 throughout: Muon's bf16 Newton-Schulz (chosen where bf16 is fast) would magnify the all-reduce's
    # different summation order to ~1e-3 in the weights, hiding what this test is about
    monkeypatch.setattr("slmforge.optim.muon.cpu_has_fast_bf16", lambda: False)
    (tmp_path / "src").mkdir()
    for d in range(12):
        (tmp_path / "src" / f"doc{d}.txt").write_text(" ".join(f"word{(d * 5 + i * i) % 17}" for i in range(80)))
    data = tmp_path / "data"
    prepare_dataset([Source("text", str(tmp_path / "src"))], byte_tokenizer(), data, 0.25, progress=False)

    _torchrun(tmp_path, _config(tmp_path, data, 2), tmp_path / "ddp")
    single = train(load_config(str(_config(tmp_path, data, 4))), tmp_path / "single")
    _same_lines(_lines(tmp_path / "ddp"), _lines(tmp_path / "single"),
                ("loss", "ce_loss", "z_loss", "grad_norm", "val_loss", "val_bpb"))
    report = json.loads((tmp_path / "ddp" / "report.json").read_text())
    assert report["world_size"] == 2 and single["world_size"] == 1
    weights_ddp = load_file(tmp_path / "ddp" / "main" / "step_4" / "model.safetensors")
    weights_one = load_file(tmp_path / "single" / "main" / "step_4" / "model.safetensors")
    for name, tensor in weights_one.items():
        torch.testing.assert_close(weights_ddp[name], tensor, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_dpo_two_processes_match_one_with_twice_the_pairs(tmp_path):
    """Each process takes its share of the pairs, both rows of each, in training and in validation."""
    rows = [{"prompt": f"{'sky' if i % 2 else 'fire'} {i}: colour?", "chosen": "blue" if i % 2 else "red",
             "rejected": "red" if i % 2 else "blue"} for i in range(24)]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    prepare_preference_dataset([ChatSource("pairs", tmp_path / "pairs.jsonl")], byte_tokenizer(), tmp_path / "data",
                               val_fraction=0.25, progress=False)
    init = random_checkpoint(tmp_path / "init", [])
    configs = []
    for pairs in (2, 4):
        raw = {"base": "tiny", "data": {"path": str(tmp_path / "data"), "batch_size": pairs, "seq_len": 48},
               "optim": {"name": "adamw", "lr": 1e-3},
               "train": {"steps": 4, "init": str(init), "eval_every": 2, "eval_batches": 2, "save_every": 4,
                         "dtype": "fp32"}}
        configs.append(tmp_path / f"pairs{pairs}.json")
        configs[-1].write_text(json.dumps(raw))
    _torchrun(tmp_path, configs[0], tmp_path / "ddp")
    train(load_config(str(configs[1])), tmp_path / "single")
    ddp, one = _lines(tmp_path / "ddp"), _lines(tmp_path / "single")
    _same_lines(ddp, one, ("loss", "reward_margin", "grad_norm", "val_loss", "val_dpo_loss", "val_reward_margin"))
    assert one[-1]["val_reward_margin"] != 0.0


@pytest.mark.slow
def test_sft_two_processes_match_one_with_twice_the_rows(tmp_path, monkeypatch):
    """Packed conversations (positions, documents and the loss mask) split across processes as rows, and the
    step's loss is the mean over all its learned tokens, however many each process and micro-batch holds."""
    monkeypatch.setattr("slmforge.optim.muon.cpu_has_fast_bf16", lambda: False)  # as in the test above
    rows = [{"messages": [{"role": "user", "content": f"q{i % 7} q{i % 3}"},
                          {"role": "assistant", "content": f"a{(i * 3) % 5} a{i % 4}"}]} for i in range(40)]
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    prepare_chat_dataset([ChatSource("chat", tmp_path / "chat.jsonl")], byte_tokenizer(), tmp_path / "data",
                         val_fraction=0.2, progress=False)
    configs = []
    for batch in (2, 4):
        raw = {"base": "tiny", "data": {"path": str(tmp_path / "data"), "batch_size": batch, "seq_len": 96},
               "train": {"steps": 4, "grad_accum": 2, "eval_every": 2, "eval_batches": 2, "save_every": 4,
                         "dtype": "fp32"}}
        configs.append(tmp_path / f"rows{batch}.json")
        configs[-1].write_text(json.dumps(raw))
    _torchrun(tmp_path, configs[0], tmp_path / "ddp")
    train(load_config(str(configs[1])), tmp_path / "single")
    _same_lines(_lines(tmp_path / "ddp"), _lines(tmp_path / "single"), ("loss", "grad_norm", "val_loss", "val_bpb"))
