"""`slmforge import --from codemind`: a checkpoint in CodeMind's layout (names, per-expert matrices, the MTP
projection's [hidden; embedding] order, torch.compile's prefix, the tied head stored under three extra
names) comes in with every tensor in place; their config translates to the model their code builds."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from slmforge.cli import main
from slmforge.config import from_dict, load_config
from slmforge.export.codemind import DEFAULTS, model_section
from slmforge.infer.load import load_model
from slmforge.model import build_model
from slmforge.model.stats import model_stats

CONFIG = {"max_seq_len": 64, "vocab_size": 300, "dim": 64, "n_layers": 4, "n_heads": 4, "q_lora_rank": 32,
          "kv_lora_rank": 24, "head_dim": 16, "rope_head_dim": 8, "window_size": 8, "moe_inter_dim": 32,
          "n_routed_experts": 6, "n_activated_experts": 2, "n_blocks": 2, "n_mtp_layers": 1, "rope_factor": 40.0,
          "original_seq_len": 4096, "max_batch_size": 2, "dtype": "bfloat16"}
THEIR_ATTENTION = {"q_a_proj": "wq_a", "q_a_norm": "q_norm", "q_b_proj": "wq_b", "kv_a_proj": "wkv_a",
                   "kv_a_norm": "kv_norm", "kv_b_proj": "wkv_b", "o_proj": "wo"}
THEIR_EXPERT = {"gate_proj": "w_gate", "up_proj": "w_up", "down_proj": "w_down"}


def their_block(rest: str, tensor: torch.Tensor) -> dict:
    """One of our block tensors under CodeMind's block names (written from reading their model code)."""
    part, _, tail = rest.partition(".")
    if part == "attn":
        module, _, leaf = tail.partition(".")
        return {f"attn.{THEIR_ATTENTION[module]}.{leaf}": tensor}
    if rest == "ffn.router.weight":
        return {"ffn.gate.router.weight": tensor}
    if rest == "ffn.router.balance_bias":
        return {"ffn.gate.expert_bias": tensor}
    if rest.startswith("ffn.experts."):
        name = THEIR_EXPERT[rest.removeprefix("ffn.experts.")]
        return {f"ffn.routed_experts.{e}.{name}.weight": tensor[e] for e in range(tensor.shape[0])}
    if rest.startswith("ffn.shared_expert."):
        module, _, leaf = rest.removeprefix("ffn.shared_expert.").partition(".")
        return {f"ffn.shared_expert.{THEIR_EXPERT[module]}.{leaf}": tensor}
    return {rest: tensor}


def their_state(ours: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {"token_emb.weight": ours["embed.weight"], "lm_head.weight": ours["embed.weight"].clone(),
           "mtp_heads.0.lm_head.weight": ours["embed.weight"].clone(),
           "mtp_heads.0.token_emb.weight": ours["embed.weight"].clone(), "final_norm.weight": ours["norm.weight"]}
    for name, tensor in ours.items():
        if name.startswith("layers."):
            _, i, rest = name.split(".", 2)
            out.update({f"layers.{i}.{k}": v for k, v in their_block(rest, tensor).items()})
        elif name.startswith("residual.queries."):
            out[f"attn_res_operators.{name.rsplit('.', 1)[1]}.pseudo_query"] = tensor
        elif name.startswith("mtp.0.block."):
            out.update({f"mtp_heads.0.layer.{k}": v for k, v in their_block(name.removeprefix("mtp.0.block."),
                                                                               tensor).items()})
        elif name == "mtp.0.proj.weight":  # theirs reads [hidden; embedding]
            embedding, hidden = tensor.chunk(2, dim=1)
            out["mtp_heads.0.proj.weight"] = torch.cat((hidden, embedding), dim=1)
        elif name.startswith("mtp.0."):
            leaf = name.removeprefix("mtp.0.")
            out["mtp_heads.0." + {"embed_norm.weight": "enorm.weight", "hidden_norm.weight": "hnorm.weight"}.get(
                leaf, leaf)] = tensor
    return {f"_orig_mod.{k}": v.contiguous() for k, v in out.items()}  # as torch.compile saved it


def test_their_commented_configuration_has_their_parameter_count():
    """Their 1024/16/16 cloud configuration (commented in their config file) is the codemind-1b preset, and
    has the parameter count their own code gives it."""
    values = {**DEFAULTS, "dim": 1024, "n_heads": 16, "moe_inter_dim": 1024, "n_routed_experts": 16,
              "max_seq_len": 2048}
    section = model_section(values)
    assert model_stats(from_dict({"model": section, "data": {"seq_len": 512}}).model)["total_params"] == 1_065_016_320
    preset = load_config("codemind-1b").model
    for key in ("n_kv_heads", "mla", "moe", "rope_scaling", "rope_layout", "residual_blocks", "mtp_depth"):
        ours, theirs = getattr(preset, key), getattr(from_dict({"model": section}).model, key)
        if key == "moe":  # training-time settings of the bias (their rule differs), not the function
            theirs.bias_update_rate = ours.bias_update_rate
        assert ours == theirs, key


def test_import_puts_every_tensor_in_place(tmp_path, capsys):
    cfg = from_dict({"model": model_section({**DEFAULTS, **CONFIG}), "data": {"seq_len": 64}})
    assert cfg.model.rope_scaling.kind == "yarn" and cfg.model.rope_scaling.attention_factor == 1.0
    assert cfg.model.layer_windows() == [8, 8, 8, 8] and cfg.model.moe.norm_topk and cfg.model.n_kv_heads == 1
    torch.manual_seed(0)
    model = build_model(cfg.model)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.1)
        for name, b in model.named_buffers():
            if name.endswith("balance_bias"):
                b.normal_(0.0, 0.05)
    ours = model.state_dict()
    (tmp_path / "step_000100").mkdir()
    save_file(their_state(ours), tmp_path / "step_000100" / "model.safetensors")
    (tmp_path / "codemind.json").write_text(json.dumps(CONFIG))
    args = ["import", str(tmp_path / "step_000100"), str(tmp_path / "ours"), "--from", "codemind",
            "--codemind-config", str(tmp_path / "codemind.json")]
    assert main(args) == 0
    assert "byte tokenizer" in capsys.readouterr().err
    back = load_model(tmp_path / "ours", device="cpu").model.state_dict()
    assert set(back) == set(ours)
    for name, tensor in ours.items():
        assert torch.equal(back[name], tensor), name


@pytest.mark.parametrize(("change", "message"), [
    (lambda state, cfg: state.pop("_orig_mod.layers.1.attn.wkv_b.weight"),
     "missing weights: ['layers.1.attn.kv_b_proj"),
    (lambda state, cfg: state.update({"_orig_mod.extra.weight": torch.zeros(2)}),
     "unexpected weights: ['extra.weight']"),
    (lambda state, cfg: state.update({"_orig_mod.lm_head.weight": torch.zeros(300, 64)}), "lm_head.weight differs"),
    (lambda state, cfg: cfg.update(score_func="sigmoid"), "routes by softmax"),
    (lambda state, cfg: cfg.update(n_layer=3), "unknown CodeMindConfig fields ['n_layer']"),
])
def test_import_refusals(change, message, tmp_path, capsys):
    cfg = from_dict({"model": model_section({**DEFAULTS, **CONFIG}), "data": {"seq_len": 64}})
    state = their_state(build_model(cfg.model).state_dict())
    values = dict(CONFIG)
    change(state, values)
    save_file(state, tmp_path / "model.safetensors")
    (tmp_path / "codemind.json").write_text(json.dumps(values))
    args = ["import", str(tmp_path / "model.safetensors"), str(tmp_path / "ours"), "--from", "codemind",
            "--codemind-config", str(tmp_path / "codemind.json")]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("slmforge: error:") and message in err, err
    assert not (tmp_path / "ours").exists() and not list(Path(tmp_path).glob(".tmp-*"))
