"""CodeMind checkpoints (the code behind seed card 000) as slmforge checkpoints, computing what their code
computes: `slmforge import their_model.safetensors OUT --from codemind [--codemind-config cfg.json]`.

Their model, read from their code: MLA whose key/value up-projection makes one key/value head shared by all
query heads (`model.n_kv_heads: 1`), YaRN RoPE at every length with no attention factor, a sliding window of
`window_size` in every layer, softmax routing whose top-k (chosen with the balancing bias added to the
probabilities) is renormalised, one ungated shared expert as wide as a routed one, block attention
residuals with one query per layer, and MTP modules that concatenate [hidden; embedding] where slmforge's
take [embedding; hidden] (the halves of `proj` are swapped on the way in). Their checkpoints may carry
torch.compile's `_orig_mod.` prefix and the tied head (and the MTP modules' references to the embedding
and head) under extra names: those must equal the embedding, and anything else unaccounted for is refused.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from slmforge.checkpoint import read_tensors
from slmforge.export.folder import ExportError, refuse_existing
from slmforge.export.hf_import import save_imported
from slmforge.export.names import codemind_names
from slmforge.tokenizer import byte_tokenizer, load_tokenizer

# Their CodeMindConfig's defaults (config/model_config.py), used for any key a config file leaves out.
DEFAULTS = {"max_seq_len": 1024, "vocab_size": 100352, "dim": 768, "n_layers": 16, "n_heads": 12,
            "q_lora_rank": 512, "kv_lora_rank": 512, "head_dim": 64, "rope_head_dim": 32, "window_size": 4096,
            "rope_theta": 10000.0, "rope_factor": 40.0, "beta_fast": 32, "beta_slow": 1, "original_seq_len": 4096,
            "moe_inter_dim": 512, "n_routed_experts": 10, "n_activated_experts": 2, "n_shared_experts": 1,
            "score_func": "softmax", "route_scale": 1.0, "attn_res_mode": "block", "n_blocks": 4,
            "n_mtp_layers": 1, "norm_eps": 1e-6}
# Keys their model code never reads (training settings, or options its forward ignores).
IGNORED = {"max_batch_size", "dtype", "compress_rope_theta", "hc_mult"}

ATTENTION = {"wq_a": "q_a_proj", "q_norm": "q_a_norm", "wq_b": "q_b_proj", "wkv_a": "kv_a_proj",
             "kv_norm": "kv_a_norm", "wkv_b": "kv_b_proj", "wo": "o_proj"}
EXPERT = {"w_gate": "gate_proj", "w_up": "up_proj", "w_down": "down_proj"}
ROUTED = re.compile(r"^(.*)\.ffn\.routed_experts\.(\d+)\.(w_gate|w_up|w_down)\.weight$")
ALIASES = ("lm_head.weight", "mtp_heads.{k}.lm_head.weight", "mtp_heads.{k}.token_emb.weight")


def codemind_config(path: str | Path | None) -> dict:
    """Their config values: a JSON file of CodeMindConfig fields over their defaults."""
    values = dict(DEFAULTS)
    if path is None:
        return values
    try:
        given = json.loads(Path(path).read_text())
    except OSError as e:
        raise ExportError(f"--codemind-config {path}: {e.strerror}") from None
    except ValueError as e:
        raise ExportError(f"--codemind-config {path}: not a JSON file ({e})") from None
    if not isinstance(given, dict):
        raise ExportError(f"--codemind-config {path}: expected a JSON object of CodeMindConfig fields")
    unknown = sorted(set(given) - set(DEFAULTS) - IGNORED)
    if unknown:
        raise ExportError(f"--codemind-config {path}: unknown CodeMindConfig fields {unknown}")
    values.update({k: v for k, v in given.items() if k in DEFAULTS})
    return values


def model_section(c: dict) -> dict:
    """The slmforge `model` mapping that computes what their model of config `c` computes."""
    if c["score_func"] != "softmax" or c["n_shared_experts"] != 1 or c["attn_res_mode"] != "block":
        raise ExportError("their model code routes by softmax with one shared expert and block attention residuals "
                          f"whatever score_func, n_shared_experts and attn_res_mode say; got {c['score_func']}, "
                          f"{c['n_shared_experts']}, {c['attn_res_mode']}: set them to softmax, 1, block")
    sliding = c["window_size"] < c["max_seq_len"]
    yarn = {"kind": "yarn", "factor": c["rope_factor"], "original_max_len": c["original_seq_len"],
            "beta_fast": c["beta_fast"], "beta_slow": c["beta_slow"], "attention_factor": 1.0}
    return {
        "vocab_size": c["vocab_size"], "d_model": c["dim"], "n_layers": c["n_layers"], "n_heads": c["n_heads"],
        "n_kv_heads": 1, "d_ff": c["moe_inter_dim"], "max_seq_len": c["max_seq_len"], "norm_eps": c["norm_eps"],
        "rope_base": c["rope_theta"], "rope_layout": "pairs",
        "rope_scaling": yarn if c["original_seq_len"] > 0 else {"kind": "none"},
        "tie_embeddings": True, "attention_pattern": ["sliding" if sliding else "global"],
        "sliding_window": c["window_size"] if sliding else c["max_seq_len"], "last_layer_global": False,
        "final_logit_softcap": None, "attn_logit_softcap": None, "attention": "mla",
        "mla": {"q_lora_rank": c["q_lora_rank"], "kv_lora_rank": c["kv_lora_rank"], "qk_head_dim": c["head_dim"],
                "rope_head_dim": c["rope_head_dim"], "v_head_dim": c["head_dim"], "latent_norm": True,
                "rope_mode": "decoupled"},
        "ffn": "moe",
        "moe": {"n_experts": c["n_routed_experts"], "top_k": c["n_activated_experts"],
                "expert_d_ff": c["moe_inter_dim"], "shared_d_ff": c["moe_inter_dim"], "shared_gate": False,
                "score": "softmax", "norm_topk": True, "route_scale": 1.0, "first_dense_layers": 0},
        "residual": "attnres_codemind", "residual_blocks": c["n_blocks"], "mtp_depth": c["n_mtp_layers"],
    }


def _block_name(rest: str) -> str:
    """Their name inside a transformer block -> ours (attention, norms, router, shared expert)."""
    part, _, tail = rest.partition(".")
    if part == "attn":
        module, _, leaf = tail.partition(".")
        return f"attn.{ATTENTION.get(module, module)}.{leaf}"
    if rest.startswith("ffn.gate.router."):
        return "ffn.router." + rest.removeprefix("ffn.gate.router.")
    if rest == "ffn.gate.expert_bias":
        return "ffn.router.balance_bias"
    if rest.startswith("ffn.shared_expert."):
        module, _, leaf = rest.removeprefix("ffn.shared_expert.").partition(".")
        return f"ffn.shared_expert.{EXPERT.get(module, module)}.{leaf}"
    return rest


def from_codemind(tensors: dict[str, torch.Tensor], c: dict) -> dict[str, torch.Tensor]:
    """Their state dict -> ours: names, stacked experts, the MTP projection's halves in our order."""
    tensors = {k.replace("_orig_mod.", ""): v for k, v in tensors.items()}
    embedding = tensors.get("token_emb.weight")
    for k in range(c["n_mtp_layers"]):
        for alias in ALIASES:
            name = alias.format(k=k)
            if name in tensors and embedding is not None and not torch.equal(tensors.pop(name), embedding):
                raise ExportError(f"{name} differs from token_emb.weight: their model ties them")
    residual = codemind_names(c["n_layers"])
    ours: dict[str, torch.Tensor] = {}
    experts: dict[tuple[str, str], dict[int, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        match = ROUTED.match(name)
        if match:
            experts.setdefault((match[1], EXPERT[match[3]]), {})[int(match[2])] = tensor
        elif name == "token_emb.weight":
            ours["embed.weight"] = tensor
        elif name == "final_norm.weight":
            ours["norm.weight"] = tensor
        elif name in residual:
            ours[residual[name]] = tensor
        elif name.startswith("layers."):
            _, index, rest = name.split(".", 2)
            ours[f"layers.{index}.{_block_name(rest)}"] = tensor
        elif name.startswith("mtp_heads."):
            _, k, rest = name.split(".", 2)
            ours[f"mtp.{k}.{_mtp_name(rest)}"] = _mtp_tensor(rest, tensor)
        else:
            ours[name] = tensor  # named as it is: the strict load reports it
    for (stem, part), by_index in experts.items():
        target = ("mtp." + stem.removeprefix("mtp_heads.").replace(".layer", ".block", 1)
                  if stem.startswith("mtp_heads.") else stem)
        ours[f"{target}.ffn.experts.{part}"] = torch.stack([by_index[e] for e in sorted(by_index)])
    return ours


def _mtp_name(rest: str) -> str:
    if rest.startswith("layer."):
        return "block." + _block_name(rest.removeprefix("layer."))
    return {"enorm.weight": "embed_norm.weight", "hnorm.weight": "hidden_norm.weight"}.get(rest, rest)


def _mtp_tensor(rest: str, tensor: torch.Tensor) -> torch.Tensor:
    """Their MTP projection reads [hidden; embedding], ours [embedding; hidden]: swap the column halves."""
    if rest != "proj.weight":
        return tensor
    hidden, embedding = tensor.chunk(2, dim=1)
    return torch.cat((embedding, hidden), dim=1).contiguous()


def import_codemind(src: str | Path, out: str | Path, config: str | Path | None = None,
                    tokenizer: str | Path | None = None, force: bool = False, warn=print) -> Path:
    """Write the checkpoint folder `out` from their `model.safetensors` (or a folder holding it), with their
    config values from `config` (JSON; their defaults otherwise) and `tokenizer` (a tokenizer.json or a
    folder; otherwise the byte tokenizer, and `warn` says so: their cl100k tokenizer is not a file)."""
    src, out = Path(src), Path(out)
    weights = src / "model.safetensors" if src.is_dir() else src
    if not weights.is_file():
        raise ExportError(f"{src}: no model.safetensors (their checkpoints are step_N/model.safetensors)")
    refuse_existing(out, force)
    values = codemind_config(config)
    if tokenizer is None:
        warn("no --tokenizer: the checkpoint gets the byte tokenizer, so its token ids are not CodeMind's text")
    tok = load_tokenizer(tokenizer) if tokenizer else byte_tokenizer()
    return save_imported(model_section(values), from_codemind(read_tensors(weights), values), tok, weights, out)
