import json

import pytest

from slmforge.config import (
    ConfigError,
    RunConfig,
    check_vocab,
    from_dict,
    list_presets,
    load_config,
)


def test_presets_load_and_round_trip():
    assert {"shard-40m", "tiny", "quickstart"} <= set(list_presets())
    for name in list_presets():
        cfg = load_config(name)
        again = from_dict(json.loads(json.dumps(cfg.to_dict())))
        assert again == cfg


def test_derived_fields_are_resolved_explicitly():
    cfg = load_config("tiny", ["model.n_kv_heads=null", "model.head_dim=null"])
    assert cfg.model.n_kv_heads == cfg.model.n_heads == 4
    assert cfg.model.head_dim == 16
    assert cfg.to_dict()["format_version"] == 1


def test_overrides_parse_values():
    cfg = load_config("tiny", ["model.n_layers=4", "model.final_logit_softcap=null", "optim.betas=[0.8, 0.9]",
                               "model.attention_pattern=[global]"])
    assert cfg.model.n_layers == 4 and cfg.model.final_logit_softcap is None
    assert cfg.optim.betas == [0.8, 0.9]
    assert cfg.model.layer_windows() == [None] * 4


@pytest.mark.parametrize("override, key", [
    (["model.n_layer=4"], "model.n_layer"),
    (["trian.steps=4"], "trian"),
    (["model.n_heads=5"], "model.n_heads"),
    (["model.n_kv_heads=3"], "model.n_kv_heads"),
    (["model.sliding_window=4096"], "model.sliding_window"),
    (["model.d_model=sixty"], "model.d_model"),
    (["model.rope_layout=interleaved"], "model.rope_layout"),
    (["data.seq_len=1024"], "data.seq_len"),
    (["schedule.decay_fraction=1.5"], "schedule.decay_fraction"),
    (["optim.name=adam"], "optim.name"),
    (["optim.others=muon"], "optim.others"),
    (["model.attention_pattern=[local]"], "model.attention_pattern.0"),
    (["model.attention=mha"], "model.attention"),
    (["model.ffn=moe", "model.moe.top_k=9"], "model.moe.top_k"),
    (["model.ffn=moe", "model.moe.score=relu"], "model.moe.score"),
    (["model.ffn=moe", "model.moe.shared_gate=true"], "model.moe.shared_gate"),
    (["model.ffn=moe", "model.moe.n_expert=4"], "model.moe.n_expert"),
    (["model.residual=attnres"], "model.residual"),
    (["model.residual=attnres_block", "model.residual_blocks=3"], "model.residual_blocks"),
    (["model.mtp_depth=-1"], "model.mtp_depth"),
])
def test_bad_configs_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config("tiny", override)


@pytest.mark.parametrize("override, key", [
    (["model.mla.rope_head_dim=8"], "model.mla.rope_head_dim"),  # whole_head takes no separate RoPE key
    (["model.mla.rope_mode=decoupled"], "model.mla.rope_head_dim"),
    (["model.mla.kv_lora_rank=0"], "model.mla.kv_lora_rank"),
    (["model.moe.first_dense_layers=9"], "model.moe.first_dense_layers"),
    (["model.attn_logit_softcap=50"], "model.attn_logit_softcap"),
])
def test_bad_sparse_configs_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config("axion1-350k", override)


def test_unknown_key_suggests_the_right_one():
    with pytest.raises(ConfigError, match="did you mean 'n_layers'"):
        load_config("tiny", ["model.n_layer=4"])


def test_vocab_too_small_for_tokenizer():
    cfg = load_config("tiny")
    check_vocab(cfg.model, 512)
    with pytest.raises(ConfigError, match="model.vocab_size=512"):
        check_vocab(cfg.model, 513)


def test_unknown_preset_lists_presets():
    with pytest.raises(ConfigError, match="shard-40m"):
        load_config("shard-41m")


def test_phases_inherit_top_level_and_override():
    cfg = load_config("shard-40m", ["schedule.warmup_steps=7", "data.path=/data/x"])
    pretrain, anneal = cfg.run_phases()
    assert (pretrain.name, pretrain.steps, anneal.name, anneal.steps) == ("pretrain", 100000, "anneal", 20000)
    assert pretrain.schedule.warmup_steps == 7 and anneal.schedule.warmup_steps == 0
    assert anneal.schedule.decay_fraction == 1.0 and anneal.schedule.decay_shape == "sqrt"
    assert anneal.data.path == "/data/x"
    cfg = load_config("shard-40m", ["phases.1.steps=50"])
    assert cfg.run_phases()[1].steps == 50
    with pytest.raises(ConfigError, match="phases.1.steps"):
        load_config("shard-40m", ["phases.1.steps=0"])


def test_single_phase_run():
    cfg = load_config("tiny", ["train.steps=12"])
    (phase,) = cfg.run_phases()
    assert phase.name == "main" and phase.steps == 12 and phase.data == cfg.data


def test_config_file(tmp_path):
    path = tmp_path / "my.yaml"
    path.write_text("base: tiny\nmodel:\n  n_layers: 3\n")
    assert load_config(str(path)).model.n_layers == 3
    path.write_text("model: [1, 2]\n")
    with pytest.raises(ConfigError, match="model"):
        load_config(str(path))
    assert RunConfig().format_version == 1
