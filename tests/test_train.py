"""The training loop: loss, overfitting, metrics, guards, dtype choice, exact resume (also across phases)."""

import json
import math
from pathlib import Path

import pytest
import torch
from helpers import crash_then_resume, make_dataset, sentences
from safetensors.torch import load_file

import slmforge.train.trainer as trainer_module
from slmforge.data.batch import Batch
from slmforge.train.objective import LanguageModeling
from slmforge import hardware
from slmforge.config import ConfigError, load_config
from slmforge.eval.heldout import evaluate
from slmforge.train import TrainingError, train
from slmforge.train.loss import lm_loss


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("data"), sentences())


def tiny(data: Path, *overrides: str):
    return load_config("tiny", [f"data.path={data}", *overrides])


def step_lines(run: Path) -> list[dict]:
    return [line for line in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in line]


def val_lines(run: Path) -> list[dict]:
    return [line for line in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "val_loss" in line]


# ----------------------------------------------------------------------------------------------
# loss and evaluation


def test_loss_parts():
    torch.manual_seed(0)
    logits, targets = torch.randn(2, 5, 11), torch.randint(0, 11, (2, 5))
    aux = {"balance_loss": torch.tensor(0.25), "router_entropy": torch.tensor(9.0)}
    total, parts = lm_loss(logits, targets, aux, z_loss=1e-2)
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, 11), targets.reshape(-1))
    z = 1e-2 * torch.logsumexp(logits, -1).square().mean()
    assert set(parts) == {"ce_loss", "z_loss", "balance_loss"}  # only *_loss aux entries count
    torch.testing.assert_close(parts["ce_loss"], ce)
    torch.testing.assert_close(parts["z_loss"], z)
    torch.testing.assert_close(total, ce + z + 0.25)
    _, parts = lm_loss(logits.bfloat16(), targets, {}, z_loss=0.0)
    assert set(parts) == {"ce_loss"} and parts["ce_loss"].dtype == torch.float32


def test_evaluate_bits_per_byte():
    class Fixed(torch.nn.Module):  # the same logits for every position
        def __init__(self):
            super().__init__()
            self.logits = torch.nn.Parameter(torch.linspace(-1, 1, 6))

        def forward(self, x):
            return self.logits.expand(*x.shape, 6), {}

    byte_lengths = [1, 2, 3, 0, 1, 1]
    batches = [Batch(torch.zeros(2, 3, dtype=torch.long), torch.tensor([[0, 1, 2], [3, 4, 5]]))]
    result = evaluate(Fixed(), batches, byte_lengths)
    nll = -torch.log_softmax(torch.linspace(-1, 1, 6), -1)
    assert result["loss"] == pytest.approx(nll.mean().item(), rel=1e-6)
    assert result["ppl"] == pytest.approx(math.exp(result["loss"]), rel=1e-6)
    assert result["bpb"] == pytest.approx(nll.sum().item() / (math.log(2) * sum(byte_lengths)), rel=1e-6)


def test_dtype_choice(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(hardware, "cpu_has_fast_bf16", lambda: False)
    dtype, why = hardware.choose_dtype("auto", cpu)
    assert dtype == torch.float32 and "no fast bf16" in why
    assert hardware.choose_dtype("bf16", cpu)[0] == torch.bfloat16
    assert hardware.choose_dtype("fp32", cpu)[0] == torch.float32
    monkeypatch.setattr(hardware, "cpu_has_fast_bf16", lambda: True)
    assert hardware.choose_dtype("auto", cpu)[0] == torch.bfloat16


# ----------------------------------------------------------------------------------------------
# training runs


def test_overfits_one_batch(tmp_path):
    # The train split is exactly one window of seq_len+1 tokens, so every row of every batch is the same.
    one = "The quick brown fox jumps over the lazy dog; 0123456789, pack my box."[:64]  # + eos: 65 tokens
    val = "Sphinx of black quartz, judge my vow. How vexingly quick daft zebras jump!"
    data = make_dataset(tmp_path, [one, val], val_fraction=0.5)
    cfg = tiny(data, "train.steps=30", "schedule.name=constant", "optim.lr=0.01", "train.eval_every=1000")
    report = train(cfg, tmp_path / "run")
    losses = [line["loss"] for line in step_lines(tmp_path / "run")]
    assert losses[0] > 5.0  # ~ln(512) at init
    assert losses[-1] < 0.3, losses  # measured: 0.05 after 30 steps
    assert report["phases"][0]["final_loss"] == pytest.approx(losses[-1])


def test_metrics_and_report(tmp_path, data):
    cfg = tiny(data, "train.steps=4", "train.grad_accum=2", "train.eval_every=2", "train.save_every=2",
               "train.rank_check_every=2", "train.rank_warn_ratio=1.0")
    report = train(cfg, tmp_path / "run")
    steps, vals = step_lines(tmp_path / "run"), val_lines(tmp_path / "run")
    assert [s["step"] for s in steps] == [1, 2, 3, 4]
    tokens_per_step = 2 * 4 * 64  # grad_accum x batch_size x seq_len
    for line in steps:
        fields = {"phase", "loss", "ce_loss", "z_loss", "lr", "grad_norm", "tokens", "tokens_per_s", "dt", "skipped"}
        assert fields <= set(line)
        assert line["phase"] == "main" and line["skipped"] is False
        assert line["tokens"] == line["step"] * tokens_per_step
        assert line["loss"] == pytest.approx(line["ce_loss"] + line["z_loss"], rel=1e-5)
        assert set(line["lr"]) == {"muon", "adamw_matrices", "adamw_no_decay"}
        assert line["grad_norm"] > 0 and line["tokens_per_s"] > 0
    # rank_warn_ratio=1.0 flags every matrix: the sentinel ran on steps 2 and 4 and reported them
    assert [("rank_warnings" in s, "min_singular_ratio" in s) for s in steps] == [(False, False), (True, True)] * 2
    assert "layers.0.attn.q_proj.weight" in steps[1]["rank_warnings"]
    assert [v["step"] for v in vals] == [0, 2, 4] and all(v["val_bpb"] > 0 for v in vals)
    chosen = hardware.choose_dtype("auto", torch.device("cpu"))[0]
    assert report["tokens"] == 4 * tokens_per_step and report["dtype"] == str(chosen).removeprefix("torch.")
    assert report["phases"][0]["val_loss"] == pytest.approx(vals[-1]["val_loss"])
    assert json.loads((tmp_path / "run" / "report.json").read_text())["tokens"] == report["tokens"]
    assert (tmp_path / "run" / "config.json").is_file()


def test_checks_before_training(tmp_path, data):
    with pytest.raises(ConfigError, match="model.vocab_size=200"):
        train(tiny(data, "model.vocab_size=200"), tmp_path / "run")
    with pytest.raises(ConfigError, match="data.path is not set"):
        train(load_config("tiny"), tmp_path / "run")
    with pytest.raises(ConfigError, match="no such folder"):
        train(tiny(tmp_path / "nowhere"), tmp_path / "run")
    assert not (tmp_path / "run").exists()  # nothing was written


def test_occupied_run_folder(tmp_path, data):
    run = tmp_path / "run"
    run.mkdir()
    (run / "old.txt").write_text("x")
    with pytest.raises(TrainingError, match="--resume.*--fresh"):
        train(tiny(data, "train.steps=1"), run)
    (run / "old.txt").unlink()
    train(tiny(data, "train.steps=1"), run)
    train(tiny(data, "train.steps=2"), run, fresh=True)  # a run folder: --fresh replaces it
    assert not (run / "main" / "step_1").exists() and (run / "main" / "step_2").is_dir()


def _poison_loss(monkeypatch, bad_steps):
    """Make the loss NaN on the given (0-based) steps, counted over calls to the loss."""
    calls = iter(range(10**6))
    real = LanguageModeling.__call__

    def poisoned(self, model, batch):
        total, parts, aux = real(self, model, batch)
        return (total * math.nan if next(calls) in bad_steps else total), parts, aux

    monkeypatch.setattr(LanguageModeling, "__call__", poisoned)


def test_nonfinite_step_is_skipped(tmp_path, data, monkeypatch):
    _poison_loss(monkeypatch, {1})
    report = train(tiny(data, "train.steps=4", "train.save_every=100"), tmp_path / "run")
    steps = step_lines(tmp_path / "run")
    assert [s["skipped"] for s in steps] == [False, True, False, False]
    assert steps[1]["loss"] == "nan"  # JSON has no NaN: written as a string
    assert report["skipped_steps"] == 1


def test_repeated_nonfinite_steps_stop_the_run(tmp_path, data, monkeypatch):
    _poison_loss(monkeypatch, set(range(100)))
    with pytest.raises(TrainingError, match=r"3 optimizer steps in a row.*optim\.lr"):
        train(tiny(data, "train.steps=10", "train.max_bad_steps=3"), tmp_path / "run")
    assert [s["skipped"] for s in step_lines(tmp_path / "run")] == [True] * 3


# ----------------------------------------------------------------------------------------------
# exact resume


def _two_phases(data: Path, cfg_dir: Path):
    """A run of two phases (4 + 5 steps), checkpoints every 3 steps, schedules of their own."""
    raw = {
        "base": "tiny",
        "data": {"path": str(data)},
        "train": {"save_every": 3, "eval_every": 2, "keep_last": 5},
        "phases": [{"name": "pretrain", "steps": 4},
                   {"name": "anneal", "steps": 5, "optim": {"lr": 0.001},
                    "schedule": {"warmup_steps": 0, "decay_fraction": 1.0}}],
    }
    (cfg_dir / "two.json").write_text(json.dumps(raw))
    return load_config(str(cfg_dir / "two.json"))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, data) -> Path:
    tmp = tmp_path_factory.mktemp("uninterrupted")
    train(_two_phases(data, tmp), tmp / "run")
    return tmp / "run"


def _comparable(lines: list[dict]) -> list[tuple]:
    return [(l["phase"], l["step"], l.get("loss"), l.get("val_loss"), l.get("tokens")) for l in lines]


@pytest.mark.parametrize("crash_at", [("pretrain", 2), ("anneal", 1), ("anneal", 4)])
def test_resume_is_exact(tmp_path, data, uninterrupted, monkeypatch, crash_at):
    """Crash before step crash_at (inside a phase, right after a phase's end), resume, compare every loss."""
    cfg = _two_phases(data, tmp_path)

    def refuses_without_resume():
        with pytest.raises(TrainingError, match="--resume"):
            train(cfg, tmp_path / "run")

    report = crash_then_resume(cfg, tmp_path / "run", lambda phase, step: (phase, step) == crash_at, monkeypatch,
                               refuses_without_resume)

    expected = [json.loads(l) for l in (uninterrupted / "metrics.jsonl").read_text().splitlines()]
    got = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(got) == len(expected)
    for e, g in zip(_comparable(expected), _comparable(got)):
        assert e[:2] == g[:2] and e[4] == g[4]
        for a, b in zip(e[2:4], g[2:4]):
            assert (a is None and b is None) or abs(a - b) <= 1e-6, (e, g)
    final_a = load_file(uninterrupted / "anneal" / "step_5" / "model.safetensors")
    final_b = load_file(tmp_path / "run" / "anneal" / "step_5" / "model.safetensors")
    for name, tensor in final_a.items():
        torch.testing.assert_close(final_b[name], tensor, atol=1e-6, rtol=0)
    assert report["tokens"] == 9 * 4 * 64
    state = json.loads((tmp_path / "run" / "anneal" / "step_5" / "trainer_state" / "state.json").read_text())
    assert state["phase"] == "anneal" and state["step"] == 5 and state["tokens"] == 9 * 4 * 64


def test_phases_continue_with_their_own_settings(uninterrupted):
    lines = step_lines(uninterrupted)
    pretrain = [l for l in lines if l["phase"] == "pretrain"]
    anneal = [l for l in lines if l["phase"] == "anneal"]
    assert [l["step"] for l in anneal] == [1, 2, 3, 4, 5] and anneal[0]["tokens"] == pretrain[-1]["tokens"] + 4 * 64
    # anneal's own optim.lr=0.001 and schedule: no warmup, a 1-sqrt decay over all 5 steps (tiny's decay_shape)
    assert anneal[0]["lr"]["adamw_matrices"] == pytest.approx(0.001 * (1 - math.sqrt(1 / 5)))
    assert anneal[-1]["lr"]["adamw_matrices"] == 0.0
    assert anneal[0]["loss"] < pretrain[0]["loss"] - 0.3  # it starts from pretrain's weights, not from scratch
    files = ["anneal", "config.json", "metrics.jsonl", "pretrain", "report.json"]
    assert sorted(p.name for p in uninterrupted.iterdir()) == files


@pytest.mark.parametrize("overrides", [("optim.name=lion", "optim.lr=3e-4", "optim.weight_decay=0.3"),
                                       ("optim.name=sgd", "optim.lr=0.05", "optim.weight_decay=0.01")],
                         ids=["lion", "sgd"])
def test_lion_and_sgd_resume_exactly(tmp_path, data, monkeypatch, overrides):
    """4 steps straight vs a crash before step 3 and a resume from the step-2 checkpoint: the same losses."""
    cfg = tiny(data, *overrides, "train.steps=4", "train.save_every=2", "train.eval_every=100")
    train(cfg, tmp_path / "straight")
    crash_then_resume(cfg, tmp_path / "run", lambda phase, step: step == 2, monkeypatch)

    expected, got = step_lines(tmp_path / "straight"), step_lines(tmp_path / "run")
    assert [l["step"] for l in got] == [1, 2, 3, 4]
    assert all(abs(e["loss"] - g["loss"]) <= 1e-6 for e, g in zip(expected, got)), (expected, got)
    name = overrides[0].split("=")[1]
    assert set(got[-1]["lr"]) == {f"{name}_matrices", f"{name}_no_decay"}


def test_thread_choice(monkeypatch, data, tmp_path):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(hardware, "cpu_count", lambda: 6)
    assert hardware.choose_threads(3, 1e12)[0] == 3  # the user's setting wins
    assert hardware.choose_threads(0, hardware.ONE_THREAD_BELOW_FLOPS / 2)[0] == 1
    assert hardware.choose_threads(0, hardware.ONE_THREAD_BELOW_FLOPS * 2)[0] == 6
    monkeypatch.setenv("OMP_NUM_THREADS", "4")
    assert hardware.choose_threads(0, 1e12) == (4, "4 threads: OMP_NUM_THREADS=4")
    monkeypatch.delenv("OMP_NUM_THREADS")
    # the tiny model's micro-step is far below the threshold; the caller's thread count is restored after
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        report = train(tiny(data, "train.steps=1"), tmp_path / "run")
        assert report["threads"] == 1 and torch.get_num_threads() == 2
        assert train(tiny(data, "train.steps=1", "train.threads=2"), tmp_path / "run2")["threads"] == 2
    finally:
        torch.set_num_threads(previous)
