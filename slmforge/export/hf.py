"""`slmforge export RUN --to hf OUT`: a Hugging Face folder that transformers loads with its own classes.

A model goes to a native class only when that class computes exactly what slmforge computes: the config is
translated field by field, and each field no native class can express is a reason, given in one line
(`model.final_logit_softcap=30.0: ...`). The weights go through the name tables of `names.py`.

    OUT/config.json              the native class's config (architectures, model_type, every shape)
    OUT/model.safetensors        the weights under transformers' names
    OUT/tokenizer.json, tokenizer_config.json, generation_config.json
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from slmforge.config import ModelConfig
from slmforge.export.folder import ExportError, refuse_existing, write_folder
from slmforge.export.names import gguf_unpermute, relayout_qk, to_hf
from slmforge.export.remote import remote_code_files
from slmforge.infer.load import LoadedModel, load_model

ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                 "qwen2_moe": "Qwen2MoeForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM",
                 "deepseek_v3": "DeepseekV3ForCausalLM"}


def _common_blockers(m: ModelConfig) -> list[str]:
    """Fields no native class expresses, whatever the family."""
    reasons = []
    if m.arch != "decoder":
        reasons.append(f"model.arch={m.arch}: no transformers class has the multi-scale byte model")
    if m.final_logit_softcap is not None:
        reasons.append(f"model.final_logit_softcap={m.final_logit_softcap}: of the native classes only Gemma 2 "
                       "caps logits, and its blocks differ from ours (norms, MLP, embedding scale)")
    if m.attn_logit_softcap is not None:
        reasons.append(f"model.attn_logit_softcap={m.attn_logit_softcap}: of the native classes only Gemma 2 "
                       "caps attention logits, and its blocks differ from ours")
    if m.residual != "add":
        reasons.append(f"model.residual={m.residual}: no native class has attention residuals")
    if m.mtp_depth:
        reasons.append(f"model.mtp_depth={m.mtp_depth}: no native class keeps multi-token-prediction modules")
    if m.rope_scaling.kind == "ntk":
        reasons.append("model.rope_scaling.kind=ntk: transformers has no static NTK-scaled RoPE (only 'dynamic', "
                       "which changes with the length)")
    return reasons


def native_family(m: ModelConfig, state: dict[str, torch.Tensor] | None = None) -> tuple[str | None, list[str]]:
    """(the transformers model_type that computes exactly `m`, []) or (None, one reason per blocking field).
    `state`, when given, is checked too (a balancing bias only DeepseekV3 can hold must then be zero)."""
    reasons = _common_blockers(m)
    sliding = any(w is not None for w in m.layer_windows())
    if m.attention == "mla":
        family = "deepseek_v3"
        reasons += _deepseek_blockers(m)
    elif m.ffn == "moe":
        family = "qwen3_moe" if m.qk_norm else "qwen2_moe"
        reasons += _qwen_moe_blockers(m, family, state)
    else:
        family = "qwen3" if m.qk_norm else "qwen2" if m.qkv_bias else "llama"
    if m.qkv_bias and family not in ("qwen2", "qwen2_moe"):
        reasons.append(f"model.qkv_bias=true: {ARCHITECTURES[family]} has no query/key/value-only biases")
    if sliding and family not in ("qwen3", "qwen2"):
        reasons.append(f"model.attention_pattern={m.attention_pattern}: sliding-window layers are native only in "
                       "the dense Qwen3 (QK-norm) and Qwen2 (q/k/v biases) forms")
    if m.bias and family != "llama":
        reasons.append(f"model.bias=true: {ARCHITECTURES[family]} has no biases on every projection")
    return (None, reasons) if reasons else (family, [])


def _qwen_moe_blockers(m: ModelConfig, family: str, state: dict | None) -> list[str]:
    e, reasons = m.moe, []
    if e.score != "softmax":
        reasons.append(f"model.moe.score={e.score}: Qwen-MoE routes by softmax (sigmoid routing is DeepseekV3's, "
                       "which needs MLA)")
    if e.route_scale != 1.0:
        reasons.append(f"model.moe.route_scale={e.route_scale}: Qwen-MoE does not scale the routed output")
    if family == "qwen2_moe" and (e.shared_d_ff == 0 or not e.shared_gate):
        reasons.append("model.moe.shared_d_ff / shared_gate: Qwen2-MoE always has a sigmoid-gated shared expert "
                       "(and Qwen3-MoE, which has none, needs model.qk_norm=true)")
    if family == "qwen3_moe" and e.shared_d_ff:
        reasons.append(f"model.moe.shared_d_ff={e.shared_d_ff}: Qwen3-MoE has no shared expert")
    if state is not None and any(k.endswith("balance_bias") and torch.count_nonzero(v) for k, v in state.items()):
        reasons.append(f"model.moe.bias_update_rate={e.bias_update_rate}: the trained routing biases are not zero, "
                       "and Qwen-MoE routing has none")
    return reasons


def _deepseek_blockers(m: ModelConfig) -> list[str]:
    a, e, reasons = m.mla, m.moe, []
    if m.rope_scaling.kind != "none":
        reasons.append(f"model.rope_scaling.kind={m.rope_scaling.kind}: DeepseekV3 also rescales its softmax under "
                       "RoPE scaling, which slmforge's MLA does not")
    if a.rope_mode != "decoupled":
        reasons.append(f"model.mla.rope_mode={a.rope_mode}: DeepseekV3 rotates a separate RoPE key (decoupled)")
    if m.n_kv_heads != m.n_heads:
        reasons.append(f"model.n_kv_heads={m.n_kv_heads}: DeepseekV3's MLA up-projects one key/value head per query "
                       "head")
    if not a.latent_norm:
        reasons.append("model.mla.latent_norm=false: DeepseekV3 normalises its latents")
    if m.qk_norm:
        reasons.append("model.qk_norm=true: DeepseekV3 has no QK-norm")
    if m.ffn != "moe":
        reasons.append("model.ffn=dense: DeepseekV3 with MLA has routed experts")
        return reasons
    if e.score != "sigmoid":
        reasons.append(f"model.moe.score={e.score}: DeepseekV3 routes by sigmoid with a balancing bias")
    if e.shared_gate:
        reasons.append("model.moe.shared_gate=true: DeepseekV3's shared experts are not gated")
    if e.shared_d_ff % e.expert_d_ff or not e.shared_d_ff:
        reasons.append(f"model.moe.shared_d_ff={e.shared_d_ff}: DeepseekV3's shared experts are whole experts "
                       f"(a positive multiple of model.moe.expert_d_ff={e.expert_d_ff})")
    return reasons


def rope_parameters(m: ModelConfig) -> dict:
    """transformers' rope_parameters for `m`'s RoPE base and scaling."""
    r = m.rope_scaling
    if r.kind == "none":
        return {"rope_type": "default", "rope_theta": m.rope_base}
    params = {"rope_type": r.kind, "rope_theta": m.rope_base, "factor": r.factor}
    if r.kind == "yarn":
        params.update(original_max_position_embeddings=r.original_max_len, beta_fast=r.beta_fast,
                      beta_slow=r.beta_slow, truncate=True)
        if r.attention_factor is not None:
            params["attention_factor"] = r.attention_factor
    return params


def hf_config(m: ModelConfig, family: str, bos_id: int, eos_id: int) -> dict:
    """The transformers config.json of `m` as `family` (native_family must have chosen it)."""
    cfg = {"architectures": [ARCHITECTURES[family]], "model_type": family, "vocab_size": m.vocab_size,
           "hidden_size": m.d_model, "num_hidden_layers": m.n_layers, "num_attention_heads": m.n_heads,
           "num_key_value_heads": m.n_kv_heads, "head_dim": m.head_dim, "intermediate_size": m.d_ff,
           "max_position_embeddings": m.max_seq_len, "rms_norm_eps": m.norm_eps, "hidden_act": "silu",
           "rope_parameters": rope_parameters(m),
           "tie_word_embeddings": m.tie_embeddings, "attention_bias": m.bias, "attention_dropout": 0.0,
           "bos_token_id": bos_id, "eos_token_id": eos_id, "torch_dtype": "float32", "use_cache": True}
    windows = m.layer_windows()
    if family == "llama":
        cfg["mlp_bias"] = m.bias
    if family in ("qwen2", "qwen3"):
        sliding = any(w is not None for w in windows)
        cfg.update(use_sliding_window=sliding, sliding_window=m.sliding_window if sliding else None,
                   layer_types=["sliding_attention" if w else "full_attention" for w in windows], max_window_layers=0)
    if family in ("qwen2_moe", "qwen3_moe"):
        e = m.moe
        cfg.update(num_experts=e.n_experts, num_experts_per_tok=e.top_k, moe_intermediate_size=e.expert_d_ff,
                   norm_topk_prob=e.norm_topk, decoder_sparse_step=1, output_router_logits=False,
                   mlp_only_layers=list(range(e.first_dense_layers)), use_sliding_window=False)
        if family == "qwen2_moe":
            cfg.update(shared_expert_intermediate_size=e.shared_d_ff, qkv_bias=m.qkv_bias)
    if family == "deepseek_v3":
        a, e = m.mla, m.moe
        cfg.update(num_key_value_heads=m.n_heads, q_lora_rank=a.q_lora_rank or None, kv_lora_rank=a.kv_lora_rank,
                   qk_nope_head_dim=a.qk_head_dim, qk_rope_head_dim=a.rope_head_dim, v_head_dim=a.v_head_dim,
                   head_dim=a.rope_head_dim, rope_interleave=m.rope_layout == "pairs",
                   n_routed_experts=e.n_experts, n_shared_experts=e.shared_d_ff // e.expert_d_ff,
                   num_experts_per_tok=e.top_k, moe_intermediate_size=e.expert_d_ff,
                   first_k_dense_replace=e.first_dense_layers, norm_topk_prob=e.norm_topk,
                   routed_scaling_factor=e.route_scale, n_group=1, topk_group=1,
                   scoring_func="sigmoid", topk_method="noaux_tc")
    return cfg


def hf_tensors(loaded: LoadedModel, family: str) -> dict[str, torch.Tensor]:
    """The model's weights under `family`'s names; a "pairs" RoPE model's q/k rows (and QK-norm gains) are
    reordered to the rotate-half layout the GQA classes use (an exact permutation)."""
    m, state = loaded.config.model, loaded.model.state_dict()
    if m.attention == "gqa" and m.rope_layout == "pairs":
        state = relayout_qk(state, m.n_heads, m.n_kv_heads, gguf_unpermute)
    return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in to_hf(state, family).items()}


def export_hf(run: str | Path, out: str | Path, force: bool = False, native: bool = False) -> tuple[Path, str]:
    """Export the model of `run` (a checkpoint or run folder) to the Hugging Face folder `out`: a native class
    where one computes the model exactly, else (unless `native`) a self-contained remote-code folder.
    Returns (out, the model_type written). Written beside `out` under a temporary name and renamed into
    place: an existing `out` is replaced only with `force`, and only once the new folder is complete."""
    out = Path(out)
    refuse_existing(out, force)
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out} exists and is not a folder")
    loaded = load_model(run, device="cpu")
    m, tok = loaded.config.model, loaded.tokenizer
    family, reasons = native_family(m, loaded.model.state_dict())
    if family is None and native:
        raise ExportError(f"{loaded.checkpoint}: no transformers class computes this model exactly:\n  "
                          + "\n  ".join(reasons))
    if family is None:
        config, sources = remote_code_files(dataclasses.asdict(m))
        config.update(bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
        tensors = {f"model.{k}": v.detach().to("cpu", torch.float32).contiguous()
                   for k, v in loaded.model.state_dict().items()}
    else:
        config, sources, tensors = hf_config(m, family, tok.bos_id, tok.eos_id), {}, hf_tensors(loaded, family)

    def fill(folder: Path) -> None:
        (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        for name, text in sources.items():
            (folder / name).write_text(text)
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
        tok.save(folder)
        generation = {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id}
        (folder / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")

    write_folder(out, fill)
    return out, config["model_type"]
