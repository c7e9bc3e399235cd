"""`slmforge export RUN --to gguf OUT.gguf [--dtype f32|f16|bf16|q8_0]`: a GGUF file llama.cpp decodes like
slmforge, written with the `gguf` package (llama.cpp's converter script rejects newly trained tokenizers).

This first writer covers llama.cpp's `llama` architecture: dense, global attention, optional QK-free biases.
Whatever llama.cpp would compute differently is refused with one line per field, never approximated. The
q/k rows of a rotate-half ("half") model are permuted into the adjacent-pairs order llama.cpp rotates
(`names.gguf_permute`); a "pairs" model is already in that order. The tokenizer goes in as llama.cpp's
"gpt2" model: tokens spelled in GPT-2's byte alphabet, merges, control tokens, the GPT-2 pre-tokenizer, the
chat template; the 258-token byte tokenizer gets one unreachable merge (llama.cpp requires at least one).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from slmforge.config import ModelConfig
from slmforge.export.hf import ExportError
from slmforge.export.names import GGUF_LLAMA_LAYER, GGUF_LLAMA_TOP, gguf_permute
from slmforge.infer.load import load_model

DTYPES = {"f32": "F32", "f16": "F16", "bf16": "BF16", "q8_0": "Q8_0"}
FILE_TYPES = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0"}
NORMAL, CONTROL, UNUSED = 1, 3, 5  # llama.cpp's token types


def gguf_blockers(m: ModelConfig) -> list[str]:
    """One line per field llama.cpp's llama architecture does not compute as slmforge does."""
    reasons = []
    if m.arch != "decoder":
        reasons.append(f"model.arch={m.arch}: llama.cpp has no multi-scale byte model")
    for key in ("final_logit_softcap", "attn_logit_softcap"):
        if getattr(m, key) is not None:
            reasons.append(f"model.{key}={getattr(m, key)}: llama.cpp caps logits only in gemma2, whose blocks "
                           "differ from ours")
    if m.residual != "add":
        reasons.append(f"model.residual={m.residual}: llama.cpp has no attention residuals")
    if m.mtp_depth:
        reasons.append(f"model.mtp_depth={m.mtp_depth}: the llama architecture has no MTP modules")
    if any(w is not None for w in m.layer_windows()):
        reasons.append(f"model.attention_pattern={m.attention_pattern}: llama.cpp's llama architecture attends "
                       "globally in every layer")
    if m.qk_norm:
        reasons.append("model.qk_norm=true: llama.cpp's llama architecture has no QK-norm")
    if m.attention != "gqa":
        reasons.append("model.attention=mla: not in the llama architecture (deepseek2 export is not written yet)")
    if m.ffn == "moe":
        reasons.append("model.ffn=moe: not in the llama architecture (qwen2moe/qwen3moe/deepseek2 export is not "
                       "written yet)")
    if m.rope_scaling.kind not in ("none", "linear"):
        reasons.append(f"model.rope_scaling.kind={m.rope_scaling.kind}: written only for plain and linear RoPE")
    return reasons


def _gguf():
    try:
        import gguf
    except ImportError:
        raise ExportError("writing GGUF files needs the gguf package: pip install 'slmforge[gguf]'") from None
    return gguf


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


def _tensors(state: dict[str, torch.Tensor], m: ModelConfig) -> dict[str, np.ndarray]:
    """GGUF names -> float32 arrays, q/k rows in llama.cpp's adjacent-pairs order."""
    inverse_top = {v: k for k, v in GGUF_LLAMA_TOP.items()}
    inverse_layer = {v: k for k, v in GGUF_LLAMA_LAYER.items()}
    out = {}
    for name, tensor in state.items():
        if name in inverse_top:
            gguf_name = inverse_top[name]
        else:
            _, index, rest = name.split(".", 2)
            stem, _, leaf = rest.rpartition(".")
            gguf_name = f"blk.{index}.{inverse_layer[stem]}.{leaf}"
        if m.rope_layout == "half" and name.endswith(("attn.q_proj.weight", "attn.q_proj.bias")):
            tensor = gguf_permute(tensor, m.n_heads)
        elif m.rope_layout == "half" and name.endswith(("attn.k_proj.weight", "attn.k_proj.bias")):
            tensor = gguf_permute(tensor, m.n_kv_heads)
        out[gguf_name] = tensor.detach().to(torch.float32).numpy()
    return out


def export_gguf(run: str | Path, out: str | Path, dtype: str = "f32", force: bool = False) -> Path:
    """Write the model of `run` to the GGUF file `out` (whole or not at all; an existing file is replaced
    only with `force`); returns `out`."""
    gguf = _gguf()
    out = Path(out)
    if dtype not in DTYPES:
        raise ExportError(f"--dtype {dtype}: GGUF export writes {', '.join(DTYPES)}")
    if out.exists() and not force:
        raise ExportError(f"{out} already exists: pass --force to replace it")
    loaded = load_model(run, device="cpu")
    m = loaded.config.model
    reasons = gguf_blockers(m)
    if reasons:
        raise ExportError(f"{loaded.checkpoint}: llama.cpp cannot compute this model as slmforge does:\n  "
                          + "\n  ".join(reasons))
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    try:
        writer = gguf.GGUFWriter(str(tmp), "llama")
        writer.add_name(loaded.checkpoint.parent.parent.name or "slmforge model")
        writer.add_context_length(m.max_seq_len)
        writer.add_embedding_length(m.d_model)
        writer.add_block_count(m.n_layers)
        writer.add_feed_forward_length(m.d_ff)
        writer.add_head_count(m.n_heads)
        writer.add_head_count_kv(m.n_kv_heads)
        writer.add_key_length(m.head_dim)
        writer.add_value_length(m.head_dim)
        writer.add_rope_dimension_count(m.head_dim)
        writer.add_rope_freq_base(m.rope_base)
        if m.rope_scaling.kind == "linear":
            writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(m.rope_scaling.factor)
        writer.add_layer_norm_rms_eps(m.norm_eps)
        writer.add_vocab_size(m.vocab_size)
        writer.add_file_type(getattr(gguf.LlamaFileType, FILE_TYPES[dtype]))
        _tokenizer(writer, loaded.tokenizer, m.vocab_size)
        qtype = getattr(gguf.GGMLQuantizationType, DTYPES[dtype])
        for name, array in _tensors(loaded.model.state_dict(), m).items():
            # matrices in the chosen type (q8_0 needs rows of whole 32-value blocks); norms and biases in f32
            kind = qtype if array.ndim == 2 and array.shape[1] % 32 == 0 else gguf.GGMLQuantizationType.F32
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
