"""Checkpoints: round trip, strict loading, no pickle, atomic writes, pruning, finding the latest one."""

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from helpers import word_dataset

import slmforge.checkpoint.folder as checkpoint_module
from slmforge.config import ConfigError, load_config
from slmforge.model import Transformer
from slmforge.tokenizer import byte_tokenizer
from slmforge.checkpoint import CheckpointError
from slmforge.infer.load import load_model
from slmforge.train import train
from slmforge.checkpoint.folder import load_weights, save_checkpoint
from slmforge.checkpoint.integrity import write_checksums


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return word_dataset(tmp_path_factory.mktemp("data"))


def tiny(*overrides: str):
    return load_config("tiny", list(overrides))


def save_model(folder: Path, model: torch.nn.Module, cfg, state_dict=None) -> Path:
    return save_checkpoint(folder, cfg=cfg, model_state=state_dict or model.state_dict(), tokenizer=byte_tokenizer(),
                           optimizer_tensors={}, state={"step": 0}, keep_last=3)


def test_round_trip_gives_identical_logits(tmp_path):
    cfg = tiny()
    torch.manual_seed(0)
    model = Transformer(cfg.model).eval()
    folder = save_model(tmp_path / "main" / "step_7", model, cfg)
    result = load_model(folder)
    loaded, loaded_cfg, tokenizer = result.model, result.config, result.tokenizer
    x = torch.randint(0, 258, (2, 16))
    with torch.no_grad():
        assert torch.equal(loaded(x)[0], model(x)[0])
    assert loaded_cfg == cfg and tokenizer.vocab_size == 258 and not loaded.training
    names = set(load_file(folder / "model.safetensors"))
    assert "embed.weight" in names and "lm_head.weight" not in names  # tied: stored once
    for path in (tmp_path, tmp_path / "main"):  # a run folder or a phase folder: the latest checkpoint
        assert torch.equal(load_model(path).model.embed.weight, model.embed.weight)


def test_untied_head_is_saved(tmp_path):
    cfg = tiny("model.tie_embeddings=false")
    model = Transformer(cfg.model)
    folder = save_model(tmp_path / "step_1", model, cfg)
    assert "lm_head.weight" in load_file(folder / "model.safetensors")
    assert torch.equal(load_model(folder).model.lm_head.weight, model.lm_head.weight)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit, imported by torch.compile
def test_compile_prefix_is_stripped(tmp_path):
    cfg = tiny()
    model = Transformer(cfg.model)
    compiled = torch.compile(model)  # compiles lazily: state_dict alone costs nothing
    state = compiled.state_dict()
    assert all(k.startswith("_orig_mod.") for k in state)
    folder = save_model(tmp_path / "step_1", model, cfg, state_dict=state)
    assert torch.equal(load_model(folder).model.embed.weight, model.embed.weight)


def test_mismatched_weights_are_listed():
    model = Transformer(tiny().model)
    state = dict(model.state_dict())
    del state["layers.1.ffn.up_proj.weight"]
    state["layers.9.attn.q_proj.weight"] = torch.zeros(1)
    state["norm.weight"] = torch.zeros(3)
    with pytest.raises(CheckpointError) as err:
        load_weights(model, state, "a checkpoint")
    message = str(err.value)
    assert "missing weights: ['layers.1.ffn.up_proj.weight']" in message
    assert "unexpected weights: ['layers.9.attn.q_proj.weight']" in message
    assert "norm.weight: checkpoint (3,), model (64,)" in message


def test_missing_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_model(tmp_path)
    with pytest.raises(CheckpointError, match="no such"):
        load_model(tmp_path / "nope")


def test_trained_checkpoint_layout_without_pickle(tmp_path, data):
    train(tiny(f"data.path={data}", "train.steps=6", "train.save_every=1", "train.keep_last=2"), tmp_path / "run")
    phase = tmp_path / "run" / "main"
    assert sorted(p.name for p in phase.iterdir()) == ["step_5", "step_6"]  # keep_last=2
    folder = phase / "step_6"
    files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    assert files == ["checksums.sha256", "config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                     "trainer_state/optimizer.safetensors", "trainer_state/rng.safetensors", "trainer_state/state.json"]
    for path in folder.rglob("*.json"):
        json.loads(path.read_text())
    recorded = dict(reversed(line.split("  ")) for line in (folder / "checksums.sha256").read_text().splitlines())
    assert sorted(recorded) == files[1:]  # every file but the checksums themselves
    assert all(recorded[name] == hashlib.sha256((folder / name).read_bytes()).hexdigest() for name in recorded)
    for path in folder.rglob("*.safetensors"):
        assert path.read_bytes()[:1] != b"\x80"  # not a pickle (protocol 2+ starts with 0x80)
        load_file(path)
    state = json.loads((folder / "trainer_state" / "state.json").read_text())
    assert (state["step"], state["phase"], state["data_position"], state["tokens"]) == (6, "main", 6, 6 * 4 * 64)
    optimizer = load_file(folder / "trainer_state" / "optimizer.safetensors")
    assert "layers.0.attn.q_proj.weight/momentum_buffer" in optimizer and "embed.weight/exp_avg" in optimizer
    assert json.loads((folder / "config.json").read_text())["format_version"] == 1


def test_crash_mid_save_leaves_previous_checkpoint(tmp_path, data, monkeypatch):
    cfg = tiny(f"data.path={data}", "train.steps=4", "train.save_every=2")
    real_fsync = checkpoint_module._fsync_tree

    def crash_on_step_4(folder):
        if folder.name == ".tmp-step_4":  # all files written, not yet renamed: the worst moment
            raise KeyboardInterrupt
        real_fsync(folder)

    monkeypatch.setattr(checkpoint_module, "_fsync_tree", crash_on_step_4)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "run")
    phase = tmp_path / "run" / "main"
    assert not (phase / "step_4").exists()
    assert load_model(tmp_path / "run").model is not None  # step_2 is whole
    assert json.loads((phase / "step_2" / "trainer_state" / "state.json").read_text())["step"] == 2

    monkeypatch.setattr(checkpoint_module, "_fsync_tree", real_fsync)
    train(cfg, tmp_path / "run", resume=True)
    assert sorted(p.name for p in phase.iterdir()) == ["step_2", "step_4"]  # the stale .tmp-step_4 is gone


def test_resume_refuses_another_model(tmp_path, data):
    train(tiny(f"data.path={data}", "train.steps=2"), tmp_path / "run")
    with pytest.raises(ConfigError, match="model.d_model: checkpoint 64, config 32"):
        train(tiny(f"data.path={data}", "train.steps=4", "model.d_model=32"), tmp_path / "run", resume=True)


def test_latest_checkpoint_is_in_the_last_phase(tmp_path):
    cfg = tiny()
    model = Transformer(cfg.model)
    for phase, index, step in [("pretrain", 0, 40), ("anneal", 1, 10), ("pretrain", 0, 50)]:
        save_checkpoint(tmp_path / phase / f"step_{step}", cfg=cfg, model_state=model.state_dict(),
                        tokenizer=byte_tokenizer(), optimizer_tensors={}, state={"phase_index": index}, keep_last=3)
    assert checkpoint_module.find_checkpoint(tmp_path) == tmp_path / "anneal" / "step_10"
    assert checkpoint_module.find_checkpoint(tmp_path / "pretrain") == tmp_path / "pretrain" / "step_50"


def test_extra_weights_in_file_raise(tmp_path):
    cfg = tiny()
    model = Transformer(cfg.model)
    folder = save_model(tmp_path / "step_1", model, cfg)
    tensors = load_file(folder / "model.safetensors")
    tensors["lm_head.weight"] = torch.zeros(cfg.model.vocab_size, cfg.model.d_model)
    save_file(tensors, folder / "model.safetensors")
    write_checksums(folder)  # a well-formed checkpoint whose weights do not fit its config
    with pytest.raises(CheckpointError, match=r"unexpected weights: \['lm_head.weight'\]"):
        load_model(folder)


def test_loading_a_model_never_imports_the_trainer(tmp_path):
    """eval, sample, export and a server load models through slmforge.infer.load, which stands apart from
    the training code (checked in a fresh interpreter, where nothing else has imported it)."""
    cfg = tiny()
    save_model(tmp_path / "step_1", Transformer(cfg.model), cfg)
    code = ("import sys; from slmforge.infer.load import load_model; from slmforge.eval import evaluate_checkpoint; "
            f"loaded = load_model({str(tmp_path / 'step_1')!r}, device='cpu'); "
            "print(sorted(m for m in sys.modules if m.startswith(('slmforge.train', 'slmforge.optim'))), "
            "loaded.device, loaded.model.training)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.split() == ["[]", "cpu", "False"], done.stderr[-2000:]
