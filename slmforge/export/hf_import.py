"""`slmforge import SRC OUT`: a Hugging Face model folder as an slmforge checkpoint folder, which `eval`,
`sample`, `export` and `train --init` use like any other.

The config is translated field by field (the inverse of hf.py's); a field slmforge cannot compute exactly
(another RoPE scaling, another activation, grouped routing, ...) is refused by name, never approximated.
Weights are read from safetensors only (one file or an index of shards: pickled .bin files are refused),
renamed through `names.py` and loaded strictly: a missing, unexpected or mis-shaped tensor is named.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from slmforge.checkpoint import CheckpointError, load_weights, read_tensors, save_checkpoint
from slmforge.config import ConfigError, check_vocab, from_dict
from slmforge.export.folder import ExportError, refuse_existing
from slmforge.export.names import from_hf
from slmforge.model import build_model
from slmforge.tokenizer import Tokenizer, load_tokenizer

SUPPORTED = ("llama", "qwen2", "qwen3", "qwen2_moe", "qwen3_moe", "deepseek_v3")


def _rope(hf: dict) -> dict:
    """rope_base and rope_scaling of the model section from transformers' rope_parameters (or rope_scaling)."""
    rope = {**(hf.get("rope_scaling") or {}), **(hf.get("rope_parameters") or {})}
    kind = rope.get("rope_type", rope.get("type", "default"))
    base = float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))
    if kind == "default":
        return {"rope_base": base}
    if kind not in ("linear", "yarn") or (kind == "yarn" and (rope.get("mscale") or not rope.get("truncate", True))):
        raise ExportError(f"config.json rope type {kind!r} with {sorted(rope)}: slmforge computes plain, linear and "
                          "YaRN RoPE (truncated range, no mscale)")
    if hf.get("model_type") == "deepseek_v3":
        raise ExportError(f"config.json rope type {kind!r}: DeepseekV3 also rescales its softmax under RoPE scaling, "
                          "which slmforge's MLA does not")
    scaling = {"kind": kind, "factor": rope["factor"]}
    if kind == "yarn":
        scaling.update(original_max_len=rope["original_max_position_embeddings"],
                       beta_fast=rope.get("beta_fast") or 32.0, beta_slow=rope.get("beta_slow") or 1.0,
                       attention_factor=rope.get("attention_factor"))
    return {"rope_base": base, "rope_scaling": scaling}


def model_section(hf: dict) -> dict:
    """The slmforge `model` mapping of a transformers config.json (raises ExportError naming the field)."""
    family = hf.get("model_type")
    if family not in SUPPORTED:
        raise ExportError(f"config.json model_type {family!r}: slmforge imports {', '.join(SUPPORTED)}")
    if hf.get("hidden_act", "silu") != "silu":
        raise ExportError(f"config.json hidden_act {hf['hidden_act']!r}: slmforge's feed-forward is SwiGLU (silu)")
    if hf.get("mlp_bias", False) != hf.get("attention_bias", False):
        raise ExportError("config.json attention_bias and mlp_bias differ: slmforge biases all projections or none")
    heads = hf["num_attention_heads"]
    m = {"vocab_size": hf["vocab_size"], "d_model": hf["hidden_size"], "n_layers": hf["num_hidden_layers"],
         "n_heads": heads, "n_kv_heads": hf.get("num_key_value_heads") or heads,
         "head_dim": hf.get("head_dim") or hf["hidden_size"] // heads, "d_ff": hf["intermediate_size"],
         "max_seq_len": hf["max_position_embeddings"], "norm_eps": hf["rms_norm_eps"], **_rope(hf),
         "rope_layout": "half", "qk_norm": family in ("qwen3", "qwen3_moe"),
         "tie_embeddings": hf.get("tie_word_embeddings", False), "bias": bool(hf.get("attention_bias", False)),
         "qkv_bias": family == "qwen2" or (family == "qwen2_moe" and bool(hf.get("qkv_bias", False))),
         "attention_pattern": ["global"], "last_layer_global": False, "final_logit_softcap": None,
         "attn_logit_softcap": None}
    layer_types = hf.get("layer_types") if hf.get("use_sliding_window") else None
    if layer_types and "sliding_attention" in layer_types:
        m.update(attention_pattern=["sliding" if t == "sliding_attention" else "global" for t in layer_types],
                 sliding_window=hf["sliding_window"])
    if family in ("qwen2_moe", "qwen3_moe"):
        m.update(_qwen_moe(hf, family))
    if family == "deepseek_v3":
        m.update(_deepseek(hf))
    return m


def _first_dense(layers: list[int], key: str) -> int:
    if layers != list(range(len(layers))):
        raise ExportError(f"config.json {key}={layers}: slmforge's dense layers come first (0..k-1)")
    return len(layers)


def _qwen_moe(hf: dict, family: str) -> dict:
    if hf.get("decoder_sparse_step", 1) != 1:
        raise ExportError(f"config.json decoder_sparse_step={hf['decoder_sparse_step']}: every layer after the dense "
                          "ones must be MoE")
    shared = hf.get("shared_expert_intermediate_size", 0) if family == "qwen2_moe" else 0
    return {"ffn": "moe", "moe": {
        "n_experts": hf["num_experts"], "top_k": hf["num_experts_per_tok"], "expert_d_ff": hf["moe_intermediate_size"],
        "shared_d_ff": shared, "shared_gate": bool(shared), "score": "softmax",
        "norm_topk": hf.get("norm_topk_prob", False), "route_scale": 1.0, "bias_update_rate": 0.0,
        "first_dense_layers": _first_dense(hf.get("mlp_only_layers") or [], "mlp_only_layers")}}


def _deepseek(hf: dict) -> dict:
    if hf.get("n_group", 1) != 1 or hf.get("topk_group", 1) != 1:
        raise ExportError(f"config.json n_group={hf.get('n_group')}, topk_group={hf.get('topk_group')}: slmforge "
                          "routes over all experts at once (group-limited routing needs n_group=1)")
    if hf.get("num_nextn_predict_layers"):
        raise ExportError("config.json num_nextn_predict_layers: transformers' DeepseekV3 checkpoints carry no MTP "
                          "weights slmforge could use")
    return {"attention": "mla", "rope_layout": "pairs" if hf.get("rope_interleave", True) else "half",
            "n_kv_heads": hf["num_attention_heads"], "head_dim": None,
            "mla": {"q_lora_rank": hf.get("q_lora_rank") or 0, "kv_lora_rank": hf["kv_lora_rank"],
                    "qk_head_dim": hf["qk_nope_head_dim"], "rope_head_dim": hf["qk_rope_head_dim"],
                    "v_head_dim": hf["v_head_dim"], "latent_norm": True, "rope_mode": "decoupled"},
            "ffn": "moe", "moe": {
                "n_experts": hf["n_routed_experts"], "top_k": hf["num_experts_per_tok"],
                "expert_d_ff": hf["moe_intermediate_size"],
                "shared_d_ff": hf.get("n_shared_experts", 1) * hf["moe_intermediate_size"], "shared_gate": False,
                "score": "sigmoid", "norm_topk": hf.get("norm_topk_prob", True),
                "route_scale": hf.get("routed_scaling_factor", 1.0), "bias_update_rate": 0.0,
                "first_dense_layers": hf.get("first_k_dense_replace", 0)}}


def read_hf_weights(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a Hugging Face folder: model.safetensors, or the shards its index names."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return {k: v for shard in shards for k, v in read_tensors(folder / shard).items()}
    if (folder / "model.safetensors").is_file():
        return read_tensors(folder / "model.safetensors")
    pickled = sorted(p.name for p in folder.glob("*.bin"))
    hint = f" (it has {pickled}: pickles, which slmforge never loads)" if pickled else ""
    raise ExportError(f"{folder}: no model.safetensors or model.safetensors.index.json{hint}")


def import_hf(src: str | Path, out: str | Path, force: bool = False) -> Path:
    """Write the checkpoint folder `out` from the Hugging Face folder `src`; returns `out`."""
    src, out = Path(src), Path(out)
    if not (src / "config.json").is_file():
        raise ExportError(f"{src}: no config.json (expected a Hugging Face model folder)")
    refuse_existing(out, force)
    hf = json.loads((src / "config.json").read_text())
    model = model_section(hf)
    tensors = from_hf(read_hf_weights(src), hf["model_type"])
    return save_imported(model, tensors, load_tokenizer(src), src, out)


def save_imported(model: dict, tensors: dict[str, torch.Tensor], tokenizer: Tokenizer, src: Path, out: Path) -> Path:
    """Build the model of `model` (a config's `model` section), load `tensors` into it strictly and write
    the checkpoint folder `out` (whole or not at all); returns `out`."""
    try:
        cfg = from_dict({"model": model, "data": {"seq_len": min(512, model["max_seq_len"])}})
    except ConfigError as e:
        raise ExportError(f"{src} translates to an invalid slmforge config: {e}") from None
    check_vocab(cfg.model, tokenizer.vocab_size, f"the tokenizer of {src}")
    net = build_model(cfg.model)
    head, embedding = tensors.get("lm_head.weight"), tensors.get("embed.weight")
    if cfg.model.tie_embeddings and head is not None:  # a tied head is the embedding; some checkpoints store both
        if embedding is None or not torch.equal(head, embedding):
            raise ExportError(f"{src}: the config ties the head to the embedding, but lm_head.weight differs from it")
        del tensors["lm_head.weight"]
    for name, value in net.state_dict().items():  # what the format has no place for (Qwen-MoE routing bias)
        if name.endswith("balance_bias"):
            tensors.setdefault(name, torch.zeros_like(value))
    try:
        load_weights(net, tensors, str(src))
    except CheckpointError as e:
        raise ExportError(str(e)) from None
    return save_checkpoint(out, cfg=cfg, model_state=net.state_dict(), tokenizer=tokenizer, optimizer_tensors={},
                           state={"step": 0, "imported_from": str(src.resolve())}, keep_last=None)
