"""Weight-name tables between slmforge and other formats, as data, with the few transforms they need.

slmforge names its weights one readable way (`layers.3.attn.q_proj.weight`,
`layers.3.ffn.experts.gate_proj` stacked [E, f, d]); every other format is a table from those names plus:
  - stacked experts: Hugging Face checkpoints name each expert's matrices apart
    (`mlp.experts.7.gate_proj.weight`; transformers 5 fuses them in memory when it loads them);
  - a tied head: stored once, as the embedding (no `lm_head.weight` on either side);
  - the RoPE layout: llama.cpp's `permute` turns the q/k rows of a "half" (rotate-half) model into the
    "pairs" order GGUF's llama architecture expects;
  - weights only one side has (the balancing bias, which Qwen2-MoE lacks: it must be zero to export).
The parity tests load these tables' output into transformers' own classes, so the tables they prove are the
tables the exporter and importer use.
"""

from __future__ import annotations

import re

import torch

HF_TOP = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
          "lm_head.weight": "lm_head.weight"}
HF_LAYER = (("attn_norm.", "input_layernorm."), ("ffn_norm.", "post_attention_layernorm."),
            ("attn.", "self_attn."), ("ffn.", "mlp."))
# Renames inside a layer, applied after HF_LAYER, per transformers model family.
HF_FAMILY = {
    "llama": (),
    "qwen2": (),  # Llama's names, with q/k/v biases
    "qwen3": (),  # Llama's names, with self_attn.q_norm / k_norm
    "qwen3_moe": (("mlp.router.weight", "mlp.gate.weight"),),
    "qwen2_moe": (("mlp.router.weight", "mlp.gate.weight"), ("mlp.shared_gate.", "mlp.shared_expert_gate.")),
    "deepseek_v3": (("mlp.router.weight", "mlp.gate.weight"),
                    ("mlp.router.balance_bias", "mlp.gate.e_score_correction_bias"),
                    ("mlp.shared_expert.", "mlp.shared_experts."),
                    ("self_attn.q_a_norm.", "self_attn.q_a_layernorm."),
                    ("self_attn.kv_a_norm.", "self_attn.kv_a_layernorm."),
                    ("self_attn.kv_a_proj.", "self_attn.kv_a_proj_with_mqa.")),
}
# Ours only, per family: weights the family has no place for (exported only when zero, imported as zero).
HF_OURS_ONLY = {family: ("ffn.router.balance_bias",) for family in ("qwen2_moe", "qwen3_moe")}
STACKED = ("gate_proj", "up_proj", "down_proj")  # ours: experts.<p> [E, out, in]; theirs: experts.<e>.<p>.weight
PER_EXPERT = re.compile(r"^(.*\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")

# llama.cpp's names (GGUF) -> ours: whole names, and a block's module names (blk.N.<name>.weight / .bias)
GGUF_TOP = {"token_embd.weight": "embed.weight", "output_norm.weight": "norm.weight",
            "output.weight": "lm_head.weight"}
GGUF_LAYER = {
    # llama
    "attn_norm": "attn_norm", "attn_q": "attn.q_proj", "attn_k": "attn.k_proj", "attn_v": "attn.v_proj",
    "attn_output": "attn.o_proj", "ffn_norm": "ffn_norm", "ffn_gate": "ffn.gate_proj", "ffn_up": "ffn.up_proj",
    "ffn_down": "ffn.down_proj",
    # qwen2moe / qwen3moe (experts stacked as [E, out, in], as ours are)
    "attn_q_norm": "attn.q_norm", "attn_k_norm": "attn.k_norm", "ffn_gate_inp": "ffn.router",
    "ffn_gate_exps": "ffn.experts.gate_proj", "ffn_up_exps": "ffn.experts.up_proj",
    "ffn_down_exps": "ffn.experts.down_proj", "ffn_gate_shexp": "ffn.shared_expert.gate_proj",
    "ffn_up_shexp": "ffn.shared_expert.up_proj", "ffn_down_shexp": "ffn.shared_expert.down_proj",
    "ffn_gate_inp_shexp": "ffn.shared_gate",
    # deepseek2 (MLA; kv_b_proj is split into attn_k_b / attn_v_b by the writer, joined by the reader)
    "attn_q_a": "attn.q_a_proj", "attn_q_a_norm": "attn.q_a_norm", "attn_q_b": "attn.q_b_proj",
    "attn_kv_a_mqa": "attn.kv_a_proj", "attn_kv_a_norm": "attn.kv_a_norm",
}

# CodeMind's released checkpoints (attn_res_operators.*) for model.residual=attnres_codemind.
CODEMIND_RESIDUAL = ("attn_res_operators.{i}.pseudo_query", "residual.queries.{i}")


def _family(family: str) -> tuple:
    if family not in HF_FAMILY:
        raise ValueError(f"no name table for the transformers family {family!r} (tables: {', '.join(HF_FAMILY)})")
    return HF_FAMILY[family]


def hf_name(name: str, family: str) -> str:
    """The transformers name of our weight `name` in `family` (stacked experts keep their own suffix)."""
    renames = _family(family)
    if name in HF_TOP:
        return HF_TOP[name]
    if not name.startswith("layers."):
        raise ValueError(f"{name}: no {family} weight holds this (it is slmforge's own)")
    _, index, rest = name.split(".", 2)
    for ours, theirs in (*HF_LAYER, *renames):
        if rest.startswith(ours):
            rest = theirs + rest.removeprefix(ours)
    return f"model.layers.{index}.{rest}"


def _ours_only(name: str, family: str) -> bool:
    return name.endswith(HF_OURS_ONLY.get(family, ()))


def to_hf(state: dict[str, torch.Tensor], family: str) -> dict[str, torch.Tensor]:
    """Our state dict -> the tensors of a Hugging Face checkpoint of `family`; raises ValueError for a weight
    the family cannot hold (a non-zero balancing bias in Qwen2-MoE)."""
    out = {}
    for name, tensor in state.items():
        if _ours_only(name, family):
            if torch.count_nonzero(tensor):
                raise ValueError(f"{name} is not zero, and {family} has no such weight")
            continue
        stem, _, last = name.rpartition(".")
        if stem.endswith(".experts") and last in STACKED:
            theirs = hf_name(name, family).rpartition(".")[0]
            out.update({f"{theirs}.{e}.{last}.weight": tensor[e] for e in range(tensor.shape[0])})
            continue
        out[hf_name(name, family)] = tensor
    return out


def from_hf(tensors: dict[str, torch.Tensor], family: str) -> dict[str, torch.Tensor]:
    """The tensors of a Hugging Face checkpoint of `family` -> our names, experts stacked (the inverse of
    to_hf; ours-only weights are absent). A layer's experts must be numbered 0..E-1 without gaps."""
    experts: dict[tuple[str, str], dict[int, torch.Tensor]] = {}
    ours = {}
    for name, tensor in tensors.items():
        match = PER_EXPERT.match(name)
        if match:
            experts.setdefault((match[1], match[3]), {})[int(match[2])] = tensor
            continue
        mapped = _our_name(name, family)
        if mapped is None:
            raise ValueError(f"{name}: no slmforge weight has this name in the {family} table")
        ours[mapped] = tensor
    for (stem, part), by_index in experts.items():
        if sorted(by_index) != list(range(len(by_index))):
            raise ValueError(f"{stem}: experts {sorted(by_index)} are not numbered 0..{len(by_index) - 1}")
        ours[f"{_our_name(stem, family)}.{part}"] = torch.stack([by_index[e] for e in range(len(by_index))])
    return ours


def _our_name(name: str, family: str) -> str | None:
    top = {v: k for k, v in HF_TOP.items()}
    if name in top:
        return top[name]
    if not name.startswith("model.layers."):
        return None
    _, _, index, rest = name.split(".", 3)
    for ours, theirs in reversed((*HF_LAYER, *_family(family))):
        if rest.startswith(theirs):
            rest = ours + rest.removeprefix(theirs)
    return f"layers.{index}.{rest}"


def relayout_qk(state: dict[str, torch.Tensor], n_heads: int, n_kv_heads: int, reorder) -> dict[str, torch.Tensor]:
    """`state` with the rows RoPE rotates put through `reorder` head by head (gguf_permute: rotate-half ->
    adjacent pairs; gguf_unpermute: back): the q/k projections and their biases, and the QK-norm gains."""
    heads = {"attn.q_proj": n_heads, "attn.k_proj": n_kv_heads, "attn.q_norm": 1, "attn.k_norm": 1}
    out = {}
    for name, tensor in state.items():
        module = name.rsplit(".", 1)[0].split(".", 2)[-1] if name.startswith("layers.") else None
        out[name] = reorder(tensor, heads[module]) if module in heads else tensor
    return out


def gguf_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's `permute` (convert_hf_to_gguf.py): within each head, row j*hd/2 + i moves to 2i + j, which
    turns a rotate-half ("half") q/k projection into the adjacent-pairs order."""
    hd = w.shape[0] // n_head
    return w.reshape(n_head, 2, hd // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """The inverse of gguf_permute: adjacent pairs back to rotate-half order."""
    hd = w.shape[0] // n_head
    return w.reshape(n_head, hd // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def codemind_names(n_layers: int) -> dict[str, str]:
    """CodeMind checkpoint name -> ours, for the attnres_codemind parameters."""
    theirs, ours = CODEMIND_RESIDUAL
    return {theirs.format(i=i): ours.format(i=i) for i in range(n_layers)}
