"""`slmforge export RUN --to gguf OUT.gguf [--dtype f32|f16|bf16|q8_0]`: a GGUF file llama.cpp decodes like
slmforge, written with the `gguf` package (llama.cpp's converter script rejects newly trained tokenizers).

The writer covers llama.cpp's `llama` architecture (dense, global attention), its `qwen2moe` and `qwen3moe`
architectures (softmax-routed experts in every layer; qwen2moe with a gated shared expert, qwen3moe with
QK-norm and renormalised weights) and `deepseek2` (MLA in DeepSeek's form with split latent up-projections,
softmax or sigmoid routing with the balancing bias, whole shared experts, leading dense layers). Whatever
llama.cpp would compute differently is refused with one line per field, never approximated. q/k rows are
reordered where the architecture rotates other channel pairs than the model's `rope_layout` (llama and
deepseek2: adjacent pairs; the qwen architectures: halves). The tokenizer goes in as llama.cpp's "gpt2" model:
tokens spelled in GPT-2's byte alphabet, merges, control tokens, the GPT-2 pre-tokenizer, the chat template;
the 258-token byte tokenizer gets one unreachable merge (llama.cpp requires at least one).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from slmforge.config import ModelConfig
from slmforge.export.folder import ExportError, gguf_package, refuse_existing
from slmforge.export.names import GGUF_LAYER, GGUF_TOP, gguf_permute, gguf_unpermute, relayout_qk
from slmforge.infer.load import load_model

DTYPES = {"f32": "F32", "f16": "F16", "bf16": "BF16", "q8_0": "Q8_0"}
FILE_TYPES = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0"}
NORMAL, CONTROL, UNUSED = 1, 3, 5  # llama.cpp's token types


def gguf_arch(m: ModelConfig) -> str:
    """The llama.cpp architecture a model is written as: llama (dense), qwen2moe or qwen3moe (experts),
    deepseek2 (MLA)."""
    if m.attention == "mla":
        return "deepseek2"
    if m.ffn == "moe":
        return "qwen3moe" if m.qk_norm else "qwen2moe"
    return "llama"


def gguf_blockers(m: ModelConfig, state: dict[str, torch.Tensor] | None = None) -> list[str]:
    """One line per field llama.cpp does not compute as slmforge does (`state`, when given: the routing
    biases must be zero, as neither qwen architecture has them)."""
    arch, reasons = gguf_arch(m), []
    if m.arch != "decoder":
        reasons.append(f"model.arch={m.arch}: llama.cpp has no multi-scale byte model")
    for key in ("final_logit_softcap", "attn_logit_softcap"):
        if getattr(m, key) is not None:
            reasons.append(f"model.{key}={getattr(m, key)}: llama.cpp caps logits only in gemma2, whose blocks "
                           "differ from ours")
    if m.residual != "add":
        reasons.append(f"model.residual={m.residual}: llama.cpp has no attention residuals")
    if m.mtp_depth:
        reasons.append(f"model.mtp_depth={m.mtp_depth}: llama.cpp's {arch} architecture has no MTP modules")
    if any(w is not None for w in m.layer_windows()):
        reasons.append(f"model.attention_pattern={m.attention_pattern}: llama.cpp's {arch} architecture attends "
                       "globally in every layer")
    if m.qk_norm and arch == "llama":
        reasons.append("model.qk_norm=true: llama.cpp's llama architecture has no QK-norm")
    if arch == "deepseek2":
        reasons += _deepseek2_blockers(m)
    elif arch != "llama":
        reasons += _moe_blockers(m, arch, state)
    if m.rope_scaling.kind not in ("none", "linear"):
        reasons.append(f"model.rope_scaling.kind={m.rope_scaling.kind}: written only for plain and linear RoPE")
    return reasons


def _moe_blockers(m: ModelConfig, arch: str, state: dict | None) -> list[str]:
    e, reasons = m.moe, []
    if e.score != "softmax" or e.route_scale != 1.0:
        reasons.append(f"model.moe.score={e.score}, route_scale={e.route_scale}: llama.cpp's {arch} routes by "
                       "softmax, unscaled")
    if e.first_dense_layers:
        reasons.append(f"model.moe.first_dense_layers={e.first_dense_layers}: every layer of {arch} is MoE")
    if e.norm_topk != (arch == "qwen3moe"):
        reasons.append(f"model.moe.norm_topk={e.norm_topk}: {arch} {'renormalises' if arch == 'qwen3moe' else 'keeps'}"
                       " the top-k weights")
    if arch == "qwen2moe" and (not e.shared_d_ff or not e.shared_gate):
        reasons.append("model.moe.shared_d_ff / shared_gate: qwen2moe has a sigmoid-gated shared expert")
    if arch == "qwen3moe" and e.shared_d_ff:
        reasons.append(f"model.moe.shared_d_ff={e.shared_d_ff}: qwen3moe has no shared expert")
    if arch == "qwen2moe" and m.tie_embeddings:
        reasons.append("model.tie_embeddings=true: llama.cpp's qwen2moe needs its own output matrix")
    if m.bias:
        reasons.append(f"model.bias=true: {arch} has no biases on every projection")
    if state is not None and any(k.endswith("balance_bias") and torch.count_nonzero(v) for k, v in state.items()):
        reasons.append(f"model.moe.bias_update_rate={e.bias_update_rate}: the trained routing biases are not zero, "
                       f"and {arch} has none")
    return reasons


def _deepseek2_blockers(m: ModelConfig) -> list[str]:
    a, e, reasons = m.mla, m.moe, []
    if a.rope_mode != "decoupled" or not a.latent_norm:
        reasons.append(f"model.mla.rope_mode={a.rope_mode}, latent_norm={a.latent_norm}: deepseek2 rotates a "
                       "separate RoPE key and normalises its latents")
    if m.n_kv_heads != m.n_heads:
        reasons.append(f"model.n_kv_heads={m.n_kv_heads}: deepseek2 up-projects one key/value head per query head")
    if m.rope_layout != "pairs":
        reasons.append("model.rope_layout=half: the deepseek2 writer takes adjacent-pairs RoPE (DeepSeek's own)")
    if m.ffn != "moe":
        reasons.append("model.ffn=dense: deepseek2 has routed experts")
    elif e.shared_gate or not e.shared_d_ff or e.shared_d_ff % e.expert_d_ff:
        reasons.append(f"model.moe.shared_d_ff={e.shared_d_ff}, shared_gate={e.shared_gate}: deepseek2's shared "
                       f"experts are whole, ungated experts of {e.expert_d_ff}")
    if m.rope_scaling.kind != "none":
        reasons.append(f"model.rope_scaling.kind={m.rope_scaling.kind}: deepseek2 also rescales its softmax "
                       "under RoPE scaling")
    if m.qk_norm or m.bias:
        reasons.append("model.qk_norm / model.bias: deepseek2 has neither")
    return reasons


def _tokenizer(writer, tokenizer, vocab_size: int) -> None:
    """The tokenizer as llama.cpp's gpt2 model, padded with unused tokens to the embedding's `vocab_size`
    rows (llama.cpp sizes the vocabulary from the token list)."""
    spec = json.loads(tokenizer.hf.to_str())
    vocab = {**spec["model"]["vocab"], **{t["content"]: t["id"] for t in spec["added_tokens"]}}
    tokens = [f"<|unused_{i}|>" for i in range(vocab_size)]
    for token, index in vocab.items():
        tokens[index] = token
    specials = set(tokenizer.special_tokens.values())
    kinds = [CONTROL if i in specials else NORMAL if i < tokenizer.vocab_size else UNUSED for i in range(vocab_size)]
    merges = [" ".join(m) if isinstance(m, list) else m for m in spec["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types(kinds)
    writer.add_token_merges(merges or ["Ā ā"])  # the byte tokenizer: one merge no text can reach
    writer.add_bos_token_id(tokenizer.bos_id)
    writer.add_eos_token_id(tokenizer.eos_id)
    writer.add_pad_token_id(tokenizer.pad_id)
    writer.add_add_bos_token(False)  # slmforge adds nothing to a prompt
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


def _tensors(state: dict[str, torch.Tensor], m: ModelConfig, arch: str) -> dict[str, np.ndarray]:
    """GGUF names -> float32 arrays. llama and deepseek2 rotate adjacent pairs, the qwen architectures
    rotate halves (NEOX): q/k rows (and QK-norm gains) are reordered where slmforge's layout differs."""
    inverse_top = {v: k for k, v in GGUF_TOP.items()}
    inverse_layer = {v: k for k, v in GGUF_LAYER.items()}
    reorder = gguf_permute if arch == "llama" and m.rope_layout == "half" else (
        gguf_unpermute if arch in ("qwen2moe", "qwen3moe") and m.rope_layout == "pairs" else None)
    if reorder is not None:
        state = relayout_qk(state, m.n_heads, m.n_kv_heads, reorder)
    out = {}
    for name, tensor in state.items():
        if name.endswith("balance_bias") and arch != "deepseek2":
            continue  # zero (checked): the qwen architectures have no routing bias
        if name in inverse_top:
            out[inverse_top[name]] = tensor.detach().to(torch.float32).numpy()
            continue
        _, index, rest = name.split(".", 2)
        stem, leaf = (rest, "weight") if rest.startswith("ffn.experts.") else rest.rsplit(".", 1)
        if stem == "ffn.shared_gate":
            tensor = tensor.reshape(-1)  # llama.cpp keeps the shared expert's gate as one vector
        if stem == "attn.kv_b_proj":  # per head [k_nope; v] x latent -> k_b [H, latent, nope], v_b [H, v, latent]
            a = m.mla
            w = tensor.detach().to(torch.float32).view(m.n_heads, a.qk_head_dim + a.v_head_dim, a.kv_lora_rank)
            out[f"blk.{index}.attn_k_b.weight"] = w[:, :a.qk_head_dim].transpose(1, 2).contiguous().numpy()
            out[f"blk.{index}.attn_v_b.weight"] = w[:, a.qk_head_dim:].contiguous().numpy()
            continue
        if stem == "ffn.router" and leaf == "balance_bias":
            out[f"blk.{index}.exp_probs_b.bias"] = tensor.detach().to(torch.float32).numpy()
            continue
        out[f"blk.{index}.{inverse_layer[stem]}.{leaf}"] = tensor.detach().to(torch.float32).numpy()
    if arch == "qwen2moe":  # llama.cpp requires q/k/v biases there: zero ones change nothing
        for i in range(m.n_layers):
            for part, width in (("attn_q", m.n_heads), ("attn_k", m.n_kv_heads), ("attn_v", m.n_kv_heads)):
                out.setdefault(f"blk.{i}.{part}.bias", np.zeros(width * m.head_dim, dtype=np.float32))
    return out


def _deepseek2_keys(writer, m: ModelConfig, gguf) -> None:
    """deepseek2's MLA and MoE keys, in the MLA form (one latent key/value head, split up-projections)."""
    a, e = m.mla, m.moe
    writer.add_head_count_kv(1)
    writer.add_key_length(a.kv_lora_rank + a.rope_head_dim)
    writer.add_value_length(a.kv_lora_rank)
    writer.add_key_length_mla(a.qk_head_dim + a.rope_head_dim)
    writer.add_value_length_mla(a.v_head_dim)
    writer.add_rope_dimension_count(a.rope_head_dim)
    writer.add_q_lora_rank(a.q_lora_rank)  # 0: no query latent (the key must be there: llama.cpp requires it)
    writer.add_kv_lora_rank(a.kv_lora_rank)
    writer.add_leading_dense_block_count(e.first_dense_layers)
    writer.add_expert_count(e.n_experts)
    writer.add_expert_used_count(e.top_k)
    writer.add_expert_feed_forward_length(e.expert_d_ff)
    writer.add_expert_shared_count(e.shared_d_ff // e.expert_d_ff)
    writer.add_expert_weights_scale(e.route_scale)
    writer.add_expert_weights_norm(e.norm_topk)
    writer.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID if e.score == "sigmoid"
                                  else gguf.ExpertGatingFuncType.SOFTMAX)


def export_gguf(run: str | Path, out: str | Path, dtype: str = "f32", force: bool = False) -> Path:
    """Write the model of `run` to the GGUF file `out` (whole or not at all; an existing file is replaced
    only with `force`); returns `out`."""
    gguf = gguf_package()
    out = Path(out)
    if dtype not in DTYPES:
        raise ExportError(f"--dtype {dtype}: GGUF export writes {', '.join(DTYPES)}")
    refuse_existing(out, force)
    loaded = load_model(run, device="cpu")
    m = loaded.config.model
    arch = gguf_arch(m)
    reasons = gguf_blockers(m, loaded.model.state_dict())
    if reasons:
        raise ExportError(f"{loaded.checkpoint}: llama.cpp cannot compute this model as slmforge does:\n  "
                          + "\n  ".join(reasons))
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    try:
        writer = gguf.GGUFWriter(str(tmp), arch)
        writer.add_name(loaded.checkpoint.parent.parent.name or "slmforge model")
        writer.add_context_length(m.max_seq_len)
        writer.add_embedding_length(m.d_model)
        writer.add_block_count(m.n_layers)
        writer.add_feed_forward_length(m.d_ff)
        writer.add_head_count(m.n_heads)
        if arch != "deepseek2":
            writer.add_head_count_kv(m.n_kv_heads)
            writer.add_key_length(m.head_dim)
            writer.add_value_length(m.head_dim)
            writer.add_rope_dimension_count(m.head_dim)
        writer.add_rope_freq_base(m.rope_base)
        if m.rope_scaling.kind == "linear":
            writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(m.rope_scaling.factor)
        writer.add_layer_norm_rms_eps(m.norm_eps)
        if arch == "deepseek2":
            _deepseek2_keys(writer, m, gguf)
        elif arch != "llama":
            writer.add_expert_count(m.moe.n_experts)
            writer.add_expert_used_count(m.moe.top_k)
            writer.add_expert_feed_forward_length(m.moe.expert_d_ff)
            if m.moe.shared_d_ff:
                writer.add_expert_shared_feed_forward_length(m.moe.shared_d_ff)
        writer.add_vocab_size(m.vocab_size)
        writer.add_file_type(getattr(gguf.LlamaFileType, FILE_TYPES[dtype]))
        _tokenizer(writer, loaded.tokenizer, m.vocab_size)
        qtype = getattr(gguf.GGMLQuantizationType, DTYPES[dtype])
        for name, array in _tensors(loaded.model.state_dict(), m, arch).items():
            # matrices in the chosen type (q8_0 needs rows of whole 32-value blocks); norms and biases in f32
            kind = qtype if array.ndim >= 2 and array.shape[-1] % 32 == 0 else gguf.GGMLQuantizationType.F32
            if kind == gguf.GGMLQuantizationType.F32:
                writer.add_tensor(name, array)
            else:
                writer.add_tensor(name, gguf.quants.quantize(array, kind), raw_dtype=kind)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out
