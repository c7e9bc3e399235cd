"""Weight-name tables between slmforge and other formats, as data, with the few transforms they need.

slmforge names its weights one readable way (`layers.3.attn.q_proj.weight`,
`layers.3.ffn.experts.gate_proj` stacked [E, f, d]); every other format is a table from those names plus:
  - stacked experts: transformers 5 packs each layer's gate and up projections into one
    `experts.gate_up_proj` [E, 2f, d] (gate rows first) beside `experts.down_proj`;
  - a tied head: stored once, as the embedding (no `lm_head.weight` on either side);
  - the RoPE layout: llama.cpp's `permute` turns the q/k rows of a "half" (rotate-half) model into the
    "pairs" order GGUF's llama architecture expects;
  - weights only one side has (the balancing bias, which Qwen2-MoE lacks: it must be zero to export).
The parity tests load these tables' output into transformers' own classes, so the tables they prove are the
tables the exporter and importer use.
"""

from __future__ import annotations

import torch

HF_TOP = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
          "lm_head.weight": "lm_head.weight"}
HF_LAYER = (("attn_norm.", "input_layernorm."), ("ffn_norm.", "post_attention_layernorm."),
            ("attn.", "self_attn."), ("ffn.", "mlp."))
# Renames inside a layer, applied after HF_LAYER, per transformers model family.
HF_FAMILY = {
    "llama": (),
    "qwen2_moe": (("mlp.router.weight", "mlp.gate.weight"), ("mlp.shared_gate.", "mlp.shared_expert_gate.")),
    "deepseek_v3": (("mlp.router.weight", "mlp.gate.weight"),
                    ("mlp.router.balance_bias", "mlp.gate.e_score_correction_bias"),
                    ("mlp.shared_expert.", "mlp.shared_experts."),
                    ("self_attn.q_a_norm.", "self_attn.q_a_layernorm."),
                    ("self_attn.kv_a_norm.", "self_attn.kv_a_layernorm."),
                    ("self_attn.kv_a_proj.", "self_attn.kv_a_proj_with_mqa.")),
}
# Ours only, per family: (suffix inside a layer, what the other side assumes it is).
HF_OURS_ONLY = {"qwen2_moe": (("ffn.router.balance_bias", "zero"),)}
GATE, UP, GATE_UP = "experts.gate_proj", "experts.up_proj", "experts.gate_up_proj"

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
    _, index, rest = name.split(".", 2)
    for ours, theirs in (*HF_LAYER, *renames):
        if rest.startswith(ours):
            rest = theirs + rest.removeprefix(ours)
    return f"model.layers.{index}.{rest}"


def _ours_only(name: str, family: str) -> bool:
    return any(name.endswith(suffix) for suffix, _ in HF_OURS_ONLY.get(family, ()))


def to_hf(state: dict[str, torch.Tensor], family: str) -> dict[str, torch.Tensor]:
    """Our state dict -> transformers tensors for `family`; raises ValueError for a weight the family cannot
    hold (a non-zero balancing bias in Qwen2-MoE)."""
    out = {}
    for name, tensor in state.items():
        if _ours_only(name, family):
            if torch.count_nonzero(tensor):
                raise ValueError(f"{name} is not zero, and {family} has no such weight")
            continue
        if name.endswith(UP):
            continue  # packed with its gate below
        if name.endswith(GATE):
            up = state[name.removesuffix(GATE) + UP]
            out[hf_name(name, family).removesuffix(GATE) + GATE_UP] = torch.cat((tensor, up), dim=1)
            continue
        out[hf_name(name, family)] = tensor
    return out


def from_hf(tensors: dict[str, torch.Tensor], family: str) -> dict[str, torch.Tensor]:
    """transformers tensors of `family` -> our names (the inverse of to_hf; ours-only weights are absent)."""
    theirs = {}
    for name, tensor in tensors.items():
        if name.endswith(GATE_UP):
            gate, up = tensor.chunk(2, dim=1)
            theirs[name.removesuffix(GATE_UP) + GATE] = gate
            theirs[name.removesuffix(GATE_UP) + UP] = up
        else:
            theirs[name] = tensor
    inverse = {}
    for name, tensor in theirs.items():
        ours = _our_name(name, family)
        if ours is None:
            raise ValueError(f"{name}: no slmforge weight has this name in the {family} table")
        inverse[ours] = tensor
    return inverse


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
