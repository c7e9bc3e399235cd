"""`slmforge import FILE.gguf OUT`: a GGUF model (llama.cpp's format) as an slmforge checkpoint folder.

The architectures slmforge writes are read: llama (SmolLM, Llama and Mistral-style dense models), qwen2moe,
qwen3moe and deepseek2 (in its MLA form), with tensors in f32, f16, bf16, q8_0, q4_0 or q4_1, dequantised to
fp32 with the `gguf` package. Each architecture's RoPE order is kept as slmforge's `rope_layout` (pairs for
llama and deepseek2, half for the qwen architectures): the weights come in unpermuted. The tokenizer is
rebuilt from the file (a GPT-2-style byte-level BPE: tokens, merges, control tokens, the pre-tokenizer
llama.cpp names, the chat template). What slmforge cannot compute exactly (another architecture, RoPE over
part of a head, another RoPE scaling, another tokenizer model) is refused by name.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from slmforge.export.folder import ExportError, gguf_package, refuse_existing
from slmforge.export.hf_import import save_imported
from slmforge.export.names import GGUF_LAYER, GGUF_TOP

QUANT_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1")
CONTROL, UNUSED = 3, 5  # llama.cpp's token types of special (control) tokens and of padding rows
# llama.cpp's pre-tokenizer names whose splitting the tokenizers library reproduces: steps before ByteLevel
PRE_TOKENIZERS = {"gpt-2": [], "default": [], "smollm": ["digits"]}


def open_gguf(path: Path):
    """A GGUFReader of `path`; an ExportError names a file that is missing, truncated or not GGUF."""
    gguf = gguf_package()
    if not path.is_file():
        raise ExportError(f"{path}: no such file")
    try:
        return gguf.GGUFReader(path)
    except (ValueError, OSError, IndexError, KeyError) as e:
        raise ExportError(f"{path} is not a readable GGUF file ({e})") from None


def _field(reader, key: str, default=None):
    field = reader.fields.get(key)
    if field is None:
        if default is None:
            raise ExportError(f"GGUF key {key} is missing")
        return default
    return field.contents()


ARCHITECTURES = ("llama", "qwen2moe", "qwen3moe", "deepseek2")


def model_section(reader) -> dict:
    """The slmforge `model` mapping of a GGUF of one of ARCHITECTURES (raises ExportError naming the key)."""
    arch = _field(reader, "general.architecture")
    if arch not in ARCHITECTURES:
        raise ExportError(f"GGUF general.architecture={arch!r}: slmforge imports {', '.join(ARCHITECTURES)}")
    key = lambda name, default=None: _field(reader, f"{arch}.{name}", default)  # noqa: E731
    d, heads = key("embedding_length"), key("attention.head_count")
    head_dim = key("attention.key_length", d // heads)
    if arch != "deepseek2" and key("rope.dimension_count", head_dim) != head_dim:
        raise ExportError(f"GGUF {arch}.rope.dimension_count={key('rope.dimension_count')}: RoPE over part of a "
                          f"head ({head_dim} channels) is not computed by slmforge")
    scaling = key("rope.scaling.type", "none")
    if scaling not in ("none", "linear") or (scaling != "none" and arch == "deepseek2"):
        raise ExportError(f"GGUF {arch}.rope.scaling.type={scaling!r}: slmforge imports plain and linear RoPE "
                          "from GGUF (plain for deepseek2)")
    names = {t.name for t in reader.tensors}
    embedding = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if embedding is None:
        raise ExportError("GGUF tensor token_embd.weight is missing")
    section = {"vocab_size": int(embedding.shape[1]), "d_model": d, "n_layers": key("block_count"),
               "n_heads": heads, "n_kv_heads": key("attention.head_count_kv", heads), "head_dim": head_dim,
               "d_ff": key("feed_forward_length"), "max_seq_len": key("context_length"),
               "norm_eps": key("attention.layer_norm_rms_epsilon"), "rope_base": key("rope.freq_base", 10000.0),
               # llama and deepseek2 rotate adjacent pairs; the qwen architectures rotate halves (NEOX)
               "rope_layout": "half" if arch.startswith("qwen") else "pairs",
               "tie_embeddings": "output.weight" not in names, "attention_pattern": ["global"],
               "final_logit_softcap": None, "attn_logit_softcap": None, "qk_norm": "blk.0.attn_q_norm.weight" in names,
               "bias": "blk.0.attn_output.bias" in names, "qkv_bias": "blk.0.attn_q.bias" in names}
    if scaling == "linear":
        section["rope_scaling"] = {"kind": "linear", "factor": key("rope.scaling.factor")}
    if arch != "llama":
        section["ffn"] = "moe"
        section["moe"] = {"n_experts": key("expert_count"), "top_k": key("expert_used_count"),
                          "expert_d_ff": key("expert_feed_forward_length"), "bias_update_rate": 0.0,
                          "shared_d_ff": key("expert_shared_feed_forward_length", 0), "score": "softmax",
                          "norm_topk": arch == "qwen3moe", "route_scale": 1.0, "first_dense_layers": 0}
        section["moe"]["shared_gate"] = section["moe"]["shared_d_ff"] > 0
    if arch == "deepseek2":
        section.update(_deepseek2(key, heads))
    return section


def _deepseek2(key, heads: int) -> dict:
    """deepseek2's MLA and routing keys as slmforge's model fields (the MLA form: split latent up-projections)."""
    if key("attention.key_length_mla", 0) == 0:
        raise ExportError("GGUF deepseek2.attention.key_length_mla is missing: a legacy deepseek2 file with an "
                          "unsplit attn_kv_b, which slmforge does not read")
    rope = key("rope.dimension_count")
    gating = key("expert_gating_func", 1)
    expert = key("expert_feed_forward_length")
    return {"attention": "mla", "n_kv_heads": heads, "head_dim": None,
            "mla": {"q_lora_rank": key("attention.q_lora_rank", 0), "kv_lora_rank": key("attention.kv_lora_rank"),
                    "qk_head_dim": key("attention.key_length_mla") - rope, "rope_head_dim": rope,
                    "v_head_dim": key("attention.value_length_mla"), "latent_norm": True, "rope_mode": "decoupled"},
            "moe": {"n_experts": key("expert_count"), "top_k": key("expert_used_count"), "expert_d_ff": expert,
                    "shared_d_ff": key("expert_shared_count") * expert, "shared_gate": False,
                    "score": "sigmoid" if gating == 2 else "softmax",
                    "norm_topk": bool(key("expert_weights_norm", False)),
                    "route_scale": key("expert_weights_scale", 1.0), "bias_update_rate": 0.0,
                    "first_dense_layers": key("leading_dense_block_count", 0)}}


def read_tensors(reader, path: Path) -> dict[str, torch.Tensor]:
    """Every tensor dequantised to fp32 under slmforge's names (deepseek2's split latent up-projections
    joined again into kv_b_proj)."""
    from gguf.quants import dequantize

    out, split = {}, {}
    for tensor in reader.tensors:
        kind = tensor.tensor_type.name
        if kind not in QUANT_TYPES:
            raise ExportError(f"{path}: tensor {tensor.name} is {kind}; slmforge reads {', '.join(QUANT_TYPES)}")
        values = torch.from_numpy(np.array(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32))
        if tensor.name.endswith((".attn_k_b.weight", ".attn_v_b.weight")):
            split[tensor.name] = values  # a copy above: the file is mapped read-only
            continue
        name = _our_name(tensor.name)
        out[name] = values.reshape(1, -1) if name.endswith("ffn.shared_gate.weight") else values
    for name, k_b in split.items():
        if name.endswith(".attn_k_b.weight"):  # [H, latent, nope] and v_b [H, v, latent] -> [H (nope + v), latent]
            v_b = split[name.replace("attn_k_b", "attn_v_b")]
            index = name.split(".")[1]
            joined = torch.cat((k_b.transpose(1, 2), v_b), dim=1)
            out[f"layers.{index}.attn.kv_b_proj.weight"] = joined.reshape(-1, joined.shape[-1])
    return out


def _our_name(name: str) -> str:
    if name in GGUF_TOP:
        return GGUF_TOP[name]
    parts = name.split(".", 2)
    if parts[0] != "blk" or len(parts) < 3:
        return name  # unknown: the strict load names it
    stem, _, leaf = parts[2].rpartition(".")
    if stem == "exp_probs_b":
        return f"layers.{parts[1]}.ffn.router.balance_bias"
    if stem.endswith("_exps"):
        return f"layers.{parts[1]}.{GGUF_LAYER[stem]}"  # stacked experts carry no ".weight"
    return f"layers.{parts[1]}.{GGUF_LAYER.get(stem, stem)}.{leaf}"


def tokenizer_of(reader, path: Path):
    """The file's tokenizer as slmforge's Tokenizer (a byte-level BPE with its control tokens)."""
    import tokenizers
    from tokenizers import AddedToken, decoders, models, pre_tokenizers

    from slmforge.tokenizer import Tokenizer

    if "tokenizer.ggml.model" not in reader.fields or "tokenizer.ggml.tokens" not in reader.fields:
        raise ExportError("the file has no tokenizer (GGUF keys tokenizer.ggml.model and tokenizer.ggml.tokens)")
    kind = _field(reader, "tokenizer.ggml.model")
    pre = _field(reader, "tokenizer.ggml.pre", "default")
    if kind != "gpt2" or pre not in PRE_TOKENIZERS:
        raise ExportError(f"{path}: tokenizer {kind!r} with pre-tokenizer {pre!r}; slmforge reads the gpt2 model "
                          f"with the pre-tokenizers {', '.join(PRE_TOKENIZERS)}")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    types = _field(reader, "tokenizer.ggml.token_type", [1] * len(tokens))
    vocab = {t: i for i, (t, token_type) in enumerate(zip(tokens, types)) if token_type != UNUSED}  # padding: no text
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges")]
    # a merge whose result is no token can never apply (a byte vocabulary carries one: GGUF needs a merge)
    merges = [m for m in merges if len(m) == 2 and m[0] + m[1] in vocab]
    hf = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges))
    steps = [pre_tokenizers.Digits(individual_digits=True)] if "digits" in PRE_TOKENIZERS[pre] else []
    hf.pre_tokenizer = pre_tokenizers.Sequence([*steps, pre_tokenizers.ByteLevel(add_prefix_space=False)])
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens([AddedToken(t, special=True, normalized=False)
                           for t, token_type in zip(tokens, types) if token_type == CONTROL])
    bos = tokens[_field(reader, "tokenizer.ggml.bos_token_id")]
    eos = tokens[_field(reader, "tokenizer.ggml.eos_token_id")]
    pad_id = _field(reader, "tokenizer.ggml.padding_token_id", -1)
    template = reader.fields.get("tokenizer.chat_template")
    return Tokenizer(hf, bos=bos, eos=eos, pad=tokens[pad_id] if pad_id >= 0 else None,
                     chat_template=template.contents() if template is not None else None)


def import_gguf(src: str | Path, out: str | Path, force: bool = False) -> Path:
    """Write the checkpoint folder `out` from the GGUF file `src`; returns `out`."""
    src, out = Path(src), Path(out)
    refuse_existing(out, force)
    reader = open_gguf(src)
    try:
        model, tokenizer = model_section(reader), tokenizer_of(reader, src)
    except ExportError as e:
        raise ExportError(str(e) if str(src) in str(e) else f"{src}: {e}") from None
    return save_imported(model, read_tensors(reader, src), tokenizer, src, out)
