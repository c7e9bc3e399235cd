"""`slmforge import FILE.gguf OUT`: a GGUF model (llama.cpp's format) as an slmforge checkpoint folder.

The llama architecture is read (llama.cpp names SmolLM, Llama and Mistral-style dense models so), with
tensors in f32, f16, bf16, q8_0, q4_0 or q4_1, dequantised to fp32 with the `gguf` package. GGUF keeps
llama's q/k rows in adjacent-pairs order, which is slmforge's `rope_layout: pairs`: the weights come in
unpermuted. The tokenizer is rebuilt from the file (a GPT-2-style byte-level BPE: tokens, merges, control
tokens, the pre-tokenizer llama.cpp names, the chat template). What slmforge cannot compute exactly
(another architecture, RoPE over part of a head, another RoPE scaling, another tokenizer model) is refused
by name.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from slmforge.export.hf import ExportError
from slmforge.export.names import GGUF_LLAMA_LAYER, GGUF_LLAMA_TOP

QUANT_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1")
CONTROL, UNUSED = 3, 5  # llama.cpp's token types of special (control) tokens and of padding rows
# llama.cpp's pre-tokenizer names whose splitting the tokenizers library reproduces: steps before ByteLevel
PRE_TOKENIZERS = {"gpt-2": [], "default": [], "smollm": ["digits"]}


def _gguf():
    try:
        import gguf
    except ImportError:
        raise ExportError("reading GGUF files needs the gguf package: pip install 'slmforge[gguf]'") from None
    return gguf


def open_gguf(path: Path):
    """A GGUFReader of `path`; an ExportError names a file that is missing, truncated or not GGUF."""
    gguf = _gguf()
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


def model_section(reader) -> dict:
    """The slmforge `model` mapping of a llama-architecture GGUF (raises ExportError naming the key)."""
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ExportError(f"GGUF general.architecture={arch!r}: slmforge imports the llama architecture")
    d, heads = _field(reader, "llama.embedding_length"), _field(reader, "llama.attention.head_count")
    head_dim = _field(reader, "llama.attention.key_length", d // heads)
    rope_dims = _field(reader, "llama.rope.dimension_count", head_dim)
    if rope_dims != head_dim:
        raise ExportError(f"GGUF llama.rope.dimension_count={rope_dims}: RoPE over part of a head "
                          f"({head_dim} channels) is not computed by slmforge")
    scaling = _field(reader, "llama.rope.scaling.type", "none")
    if scaling not in ("none", "linear"):
        raise ExportError(f"GGUF llama.rope.scaling.type={scaling!r}: slmforge imports plain and linear RoPE from GGUF")
    names = {t.name for t in reader.tensors}
    embedding = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if embedding is None:
        raise ExportError("GGUF tensor token_embd.weight is missing")
    section = {"vocab_size": int(embedding.shape[1]), "d_model": d,
               "n_layers": _field(reader, "llama.block_count"), "n_heads": heads,
               "n_kv_heads": _field(reader, "llama.attention.head_count_kv", heads), "head_dim": head_dim,
               "d_ff": _field(reader, "llama.feed_forward_length"), "max_seq_len": _field(reader, "llama.context_length"),
               "norm_eps": _field(reader, "llama.attention.layer_norm_rms_epsilon"),
               "rope_base": _field(reader, "llama.rope.freq_base", 10000.0), "rope_layout": "pairs",
               "tie_embeddings": "output.weight" not in names, "attention_pattern": ["global"],
               "final_logit_softcap": None, "attn_logit_softcap": None, "qk_norm": False,
               "bias": "blk.0.attn_output.bias" in names, "qkv_bias": "blk.0.attn_q.bias" in names}
    if scaling == "linear":
        section["rope_scaling"] = {"kind": "linear", "factor": _field(reader, "llama.rope.scaling.factor")}
    return section


def read_tensors(reader, path: Path) -> dict[str, torch.Tensor]:
    """Every tensor dequantised to fp32 under slmforge's names."""
    from gguf.quants import dequantize

    out = {}
    for tensor in reader.tensors:
        kind = tensor.tensor_type.name
        if kind not in QUANT_TYPES:
            raise ExportError(f"{path}: tensor {tensor.name} is {kind}; slmforge reads {', '.join(QUANT_TYPES)}")
        values = np.array(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)  # a copy: the file is mapped
        out[_our_name(tensor.name)] = torch.from_numpy(values)
    return out


def _our_name(name: str) -> str:
    if name in GGUF_LLAMA_TOP:
        return GGUF_LLAMA_TOP[name]
    parts = name.split(".", 2)
    if parts[0] != "blk" or len(parts) < 3:
        return name  # unknown: the strict load names it
    stem, _, leaf = parts[2].rpartition(".")
    return f"layers.{parts[1]}.{GGUF_LLAMA_LAYER.get(stem, stem)}.{leaf}"


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
    vocab = {t: i for i, (t, kind) in enumerate(zip(tokens, types)) if kind != UNUSED}  # padding rows: no text
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges")]
    # a merge whose result is no token can never apply (a byte vocabulary carries one: GGUF needs a merge)
    merges = [m for m in merges if len(m) == 2 and m[0] + m[1] in vocab]
    hf = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges))
    steps = [pre_tokenizers.Digits(individual_digits=True)] if "digits" in PRE_TOKENIZERS[pre] else []
    hf.pre_tokenizer = pre_tokenizers.Sequence([*steps, pre_tokenizers.ByteLevel(add_prefix_space=False)])
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens([AddedToken(t, special=True, normalized=False)
                           for t, kind in zip(tokens, types) if kind == CONTROL])
    bos = tokens[_field(reader, "tokenizer.ggml.bos_token_id")]
    eos = tokens[_field(reader, "tokenizer.ggml.eos_token_id")]
    pad_id = _field(reader, "tokenizer.ggml.padding_token_id", -1)
    template = reader.fields.get("tokenizer.chat_template")
    return Tokenizer(hf, bos=bos, eos=eos, pad=tokens[pad_id] if pad_id >= 0 else None,
                     chat_template=template.contents() if template is not None else None)


def import_gguf(src: str | Path, out: str | Path, force: bool = False) -> Path:
    """Write the checkpoint folder `out` from the GGUF file `src`; returns `out`."""
    from slmforge.export.hf_import import refuse_existing, save_imported

    src, out = Path(src), Path(out)
    refuse_existing(out, force)
    reader = open_gguf(src)
    try:
        model, tokenizer = model_section(reader), tokenizer_of(reader, src)
    except ExportError as e:
        raise ExportError(str(e) if str(src) in str(e) else f"{src}: {e}") from None
    return save_imported(model, read_tensors(reader, src), tokenizer, src, out)
