"""Every config field is checked for type, finiteness and range before anything is written, and every
problem is one ConfigError line naming the key (or, for file problems, the file)."""

import dataclasses
import re
import typing

import pytest

from slmforge.config import ConfigError, from_dict, load_config, load_raw
from slmforge.config import tree
from slmforge.config.checks import RULES


def _raises(message: str, call, *args):
    with pytest.raises(ConfigError, match=re.escape(message)) as info:
        call(*args)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("overrides, message", [
    # non-finite floats: `.nan`/`.inf` are YAML floats, "nan"/"inf" strings are read as floats too
    (["optim.lr=.nan"], "optim.lr must be a finite number, got nan"),
    (["optim.lr=inf"], "optim.lr must be a finite number, got inf"),
    (["optim.muon_lr=-.inf"], "optim.muon_lr must be a finite number, got -inf"),
    (["train.z_loss=nan"], "train.z_loss must be a finite number"),
    (["model.rope_base=.inf"], "model.rope_base must be a finite number"),
    (["model.final_logit_softcap=.nan"], "model.final_logit_softcap must be a finite number"),
    (["data.weights={code: .nan}"], "data.weights.code must be a finite number"),
    (["optim.betas=[.nan, 0.9]"], "optim.betas.0 must be a finite number"),
    # ranges
    (["optim.lr=0"], "optim.lr must be positive, got 0"),
    (["optim.grad_clip=-1"], "optim.grad_clip must be >= 0, got -1"),
    (["optim.weight_decay=-1"], "optim.weight_decay must be >= 0, got -1"),
    (["optim.muon_weight_decay=-0.1"], "optim.muon_weight_decay must be >= 0"),
    (["optim.eps=-1"], "optim.eps must be positive, got -1"),
    (["optim.betas=[0.9, 1.5]"], "optim.betas.1 must lie in [0, 1), got 1.5"),
    (["optim.betas=[-0.1, 0.9]"], "optim.betas.0 must lie in [0, 1)"),
    (["optim.betas=[0.9]"], "optim.betas must hold two numbers"),
    (["optim.lion_betas=[0.9, 1.0]"], "optim.lion_betas.1 must lie in [0, 1), got 1.0"),
    (["optim.muon_momentum=1"], "optim.muon_momentum must lie in [0, 1), got 1"),
    (["optim.sgd_momentum=-0.5"], "optim.sgd_momentum must lie in [0, 1)"),
    (["optim.muon_ns_steps=0"], "optim.muon_ns_steps must be >= 1, got 0"),
    (["optim.muon_adjust_lr=rms"], "optim.muon_adjust_lr must be one of 'original', 'match_rms_adamw'"),
    (["schedule.min_lr_ratio=1.5"], "schedule.min_lr_ratio must lie in [0, 1], got 1.5"),
    (["schedule.warmup_steps=-1"], "schedule.warmup_steps must be >= 0, got -1"),
    (["schedule.decay_shape=cos"], "schedule.decay_shape must be one of"),
    (["model.init_std=-1"], "model.init_std must be positive, got -1"),
    (["model.norm_eps=0"], "model.norm_eps must be positive"),
    (["model.rope_base=-10000"], "model.rope_base must be positive"),
    (["model.head_dim=-2"], "model.head_dim must be positive"),
    (["model.n_kv_heads=0"], "model.n_kv_heads must be positive"),
    (["model.attn_logit_softcap=0"], "model.attn_logit_softcap must be positive"),
    (["model.sliding_window=0"], "model.sliding_window must be positive"),
    (["model.residual_blocks=0"], "model.residual_blocks must be positive"),
    (["model.mla.q_lora_rank=-1"], "model.mla.q_lora_rank must be >= 0"),
    (["model.mla.rope_mode=rotary"], "model.mla.rope_mode must be one of 'decoupled', 'whole_head'"),
    (["model.moe.route_scale=0"], "model.moe.route_scale must be positive"),
    (["model.moe.bias_update_rate=-1"], "model.moe.bias_update_rate must be >= 0"),
    (["model.multiscale.scales=[1, 0]"], "model.multiscale.scales.1 must be positive"),
    (["model.multiscale.cross_layers=-1"], "model.multiscale.cross_layers must be >= 0"),
    (["data.weights={code: -1}"], "data.weights.code must be >= 0, got -1"),
    (["data.batch_size=0"], "data.batch_size must be positive"),
    (["train.threads=-1"], "train.threads must be >= 0, got -1"),
    (["train.seed=-1"], "train.seed must lie in [0, 4294967296), got -1"),
    (["train.rank_check_every=-1"], "train.rank_check_every must be >= 0"),
    (["train.rank_warn_ratio=0"], "train.rank_warn_ratio must lie in (0, 1], got 0"),
    (["train.mtp_weight=-1"], "train.mtp_weight must be >= 0"),
    (["train.steps=0"], "train.steps must be positive, got 0"),
    # types: a scalar for a list, a bool for an int, a fraction for an int, a null for a section
    (["model.attention_pattern=global"], "model.attention_pattern: expected a list, got 'global'"),
    (["optim.betas=0.9"], "optim.betas: expected a list, got 0.9"),
    (["train.steps=true"], "train.steps: expected int, got true"),
    (["model.n_kv_heads=false"], "model.n_kv_heads: expected int, got false"),
    (["model.n_layers=2.5"], "model.n_layers: expected int, got 2.5"),
    (["optim.lr=yes"], "optim.lr: expected float, got true"),
    (["optim.lr=fast"], "optim.lr: expected float, got 'fast'"),
    (["data.weights=[1, 2]"], "data.weights: expected a mapping, got [1, 2]"),
    (["model=null"], "model: expected a mapping, got null"),
    (["model.moe=null"], "model.moe: expected a mapping, got null"),
    # overrides through a value that is not a mapping
    (["model.d_model.x=1"], "override 'model.d_model.x=1': model.d_model is 64, not a mapping"),
    (["model.attention_pattern.0.x=1"], "model.attention_pattern.0 is 'sliding', not a mapping"),
])
def test_bad_values_name_the_key(overrides, message):
    _raises(message, load_config, "tiny", overrides)


@pytest.mark.parametrize("overrides, message", [
    (["phases.1.optim.betas=[0.9, 1.0]"], "phases.1.optim.betas.1 must lie in [0, 1), got 1.0"),
    (["phases.0.optim.lr=.nan"], "phases.0.optim.lr must be a finite number"),
    (["phases.1.schedule.min_lr_ratio=-1"], "phases.1.schedule.min_lr_ratio must lie in [0, 1]"),
    (["phases.0.data.weights={math: -2}"], "phases.0.data.weights.math must be >= 0"),
    (["phases.1.optim=null"], "phases.1.optim: expected a mapping, got null"),
    (["phases.0.steps=-5"], "phases.0.steps must be positive"),
    (["phases.1.name=a/b"], "phases.1.name must be a folder name"),
    (["phases.1.name=''"], "phases.1.name must be a folder name"),
    (["phases=3"], "phases: expected a list of phases, got 3"),
    # a top-level value the phases inherit is named at the top level
    (["optim.grad_clip=-1"], "optim.grad_clip must be >= 0"),
])
def test_bad_phase_values_name_the_key(overrides, message):
    _raises(message, load_config, "shard-40m", overrides)


@pytest.mark.parametrize("overrides", [
    ["optim.grad_clip=0", "optim.weight_decay=0", "optim.muon_weight_decay=0"],
    ["optim.lion_betas=[0, 0.999]", "optim.betas=[0, 0.999]", "schedule.min_lr_ratio=1"],
    ["train.threads=4", "train.z_loss=0", "train.rank_warn_ratio=1"],
    ["optim.lr=1e-4", "optim.eps=1"],  # PyYAML reads 1e-4 as a string
    ["data.weights={code: 0, math: 0}"],  # the folder's other sources keep their weights
])
def test_edge_values_are_accepted(overrides):
    load_config("tiny", overrides)


def test_threads_default_and_round_trip():
    cfg = load_config("tiny", ["train.threads=3"])
    assert cfg.train.threads == 3 and load_config("tiny").train.threads == 0
    assert from_dict(cfg.to_dict()) == cfg


def test_every_field_has_a_rule():
    """A new non-bool field must say what values it takes (None in RULES: any value of its type)."""
    for cls in (tree.ModelConfig, tree.MLAConfig, tree.MoEConfig, tree.MultiScaleConfig, tree.DataConfig,
                tree.OptimConfig, tree.ScheduleConfig, tree.TrainConfig, tree.PhaseConfig):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if hints[f.name] is not bool and not dataclasses.is_dataclass(hints[f.name]):
                assert f.name in RULES[cls], f"{cls.__name__}.{f.name} has no rule in checks.RULES"


def test_from_dict_refuses_a_non_mapping():
    _raises("config: expected a mapping, got [1]", from_dict, [1])


@pytest.mark.parametrize("text, message", [
    ("model:\n  n_layers: 2\n  n_layers: 3\n", "line 3, column 3: duplicate key 'n_layers'"),
    ("optim: {lr: 1.0, lr: 2.0}\n", "line 1, column 18: duplicate key 'lr'"),
    ("base: tiny\nmodel: null\n", "model: expected a mapping, got null"),
    ("base: tiny\noptim:\n", "optim: expected a mapping, got null"),
    ("base: shard-40m\nphases:\n  - {name: a, data: null}\n", "phases.0.data: expected a mapping, got null"),
    ("base: 5\n", "base: expected a preset name or a file path, got 5"),
    ("model:\n  n_layers: [2\n", "not valid YAML"),
    ("- 1\n- 2\n", "expected a mapping at the top level"),
])
def test_bad_yaml_files(tmp_path, text, message):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=re.escape(message)) as info:
        load_config(str(path))
    assert "\n" not in str(info.value)
    if "expected a mapping, got null" not in message:
        assert str(path) in str(info.value)


def test_duplicate_json_key(tmp_path):
    path = tmp_path / "run.json"
    path.write_text('{"train": {"steps": 3, "steps": 4}}')
    _raises(f"{path}: duplicate key 'steps'", load_raw, str(path))


def test_base_cycles_name_the_files(tmp_path):
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text(f"base: {a}\n")
    _raises(f"base: cycle {a} -> {a}", load_raw, str(a))
    a.write_text(f"base: {b}\n")
    b.write_text(f"base: {a}\ntrain: {{steps: 3}}\n")
    _raises(f"base: cycle {a} -> {b} -> {a}", load_raw, str(a))
    b.write_text("base: tiny\ntrain: {steps: 3}\n")
    assert load_config(str(a)).train.steps == 3


def test_unreadable_config_files(tmp_path):
    binary = tmp_path / "model.bin"
    binary.write_bytes(b"\x80\xff\x00\x01" * 10)
    _raises(f"config file {binary} is not UTF-8 text", load_config, str(binary))
    _raises(f"config file {tmp_path / 'gone.yaml'}: no such file", load_config, str(tmp_path / "gone.yaml"))
    _raises("config file missing.yml: no such file", load_config, "missing.yml")
    _raises("config file runs/cfg: no such file", load_config, "runs/cfg")
    _raises(f"config file {tmp_path} is a folder, not a file", load_config, str(tmp_path))
    _raises("unknown preset 'shard-41m' (presets: ", load_config, "shard-41m")
