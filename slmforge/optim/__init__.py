"""Optimizers: who gets Muon and who gets AdamW, lr scheduling, the rank sentinel, state I/O.

Grouping (cfg.name == "muon"), decided per parameter by name and shape:
  muon            hidden weight matrices, ndim 2 or 3 (3-D: stacked experts, orthogonalised per expert)
  adamw_matrices  embeddings and the LM head (Muon is for hidden layers: their rows are looked up or
                  read out one token at a time), and "matrices" with a dimension of 1 (a [1, d] gate is a
                  vector); weight decay cfg.weight_decay
                  The MoE router too: its logits' scale decides how peaked the routing is, and Muon's
                  fixed-size orthogonal steps would move that scale at the hidden matrices' pace.
  adamw_no_decay  1-D and 0-D tensors: norm gains, biases, per-layer vectors; never decayed. Also the
                  attention-residual queries (`residual.*`, stored as [n_layers, d] rows of independent
                  vectors, not a matrix): zero-initialised, so decay would only pull them back to uniform
                  averaging.
With cfg.name == "adamw" the Muon group folds into adamw_matrices. Frozen parameters and buffers are not
optimized: the MoE routing biases are buffers, moved by the trainer's balancing rule, never by a gradient.
Every group carries "name", "base_lr" and "param_names".
"""

from __future__ import annotations

import torch
from torch import nn

from slmforge.config import OptimConfig
from slmforge.optim.muon import Muon
from slmforge.optim.schedule import lr_factor
from slmforge.optim.state import load_optimizer_state, optimizer_state_tensors

__all__ = [
    "Muon",
    "build_optimizers",
    "load_optimizer_state",
    "lr_factor",
    "optimizer_state_tensors",
    "param_groups_summary",
    "set_lr",
    "smallest_singular_ratios",
]

EMBEDDING_NAMES = ("embed", "lm_head")  # module names whose weights are token embeddings / the output head


ADAMW_MATRIX_NAMES = ("router",)  # module names of matrices kept out of Muon (see the module docstring)
VECTOR_NAMES = ("residual",)  # module names whose parameters are stacks of vectors


def _group_name(name: str, p: torch.Tensor, use_muon: bool, is_embedding: bool) -> str:
    # a name component match also covers wrapped models ("module.embed.weight", "_orig_mod.lm_head.weight")
    parts = name.split(".")
    if p.ndim < 2 or any(part in VECTOR_NAMES for part in parts):
        return "adamw_no_decay"
    is_embedding = is_embedding or any(part in EMBEDDING_NAMES for part in parts)
    is_matrix = min(p.shape[-2:]) > 1 and not any(part in ADAMW_MATRIX_NAMES for part in parts)
    if use_muon and is_matrix and not is_embedding:
        return "muon"
    return "adamw_matrices"


def build_optimizers(model: nn.Module, cfg: OptimConfig) -> list[torch.optim.Optimizer]:
    """[Muon, AdamW] for cfg.name == "muon", [AdamW] for "adamw"; build after moving the model to its device.

    Pass the unwrapped model (not DDP's `.module` wrapper) so parameter names, which key the saved
    optimizer state, stay the same across DDP / single-process runs.
    """
    if cfg.name not in ("muon", "adamw"):
        raise ValueError(f"optim.name must be 'muon' or 'adamw', got {cfg.name!r}")
    embedding_ids = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    named: dict[str, list] = {"muon": [], "adamw_matrices": [], "adamw_no_decay": []}
    for name, p in model.named_parameters():  # tied weights appear once, under their first name
        if p.requires_grad:
            named[_group_name(name, p, cfg.name == "muon", id(p) in embedding_ids)].append((name, p))

    def group(kind: str, lr: float, weight_decay: float) -> dict:
        return {"params": named[kind], "name": kind, "lr": lr, "base_lr": lr, "weight_decay": weight_decay}

    optimizers: list[torch.optim.Optimizer] = []
    if named["muon"]:
        optimizers.append(
            Muon(
                [group("muon", cfg.muon_lr, cfg.muon_weight_decay)],
                momentum=cfg.muon_momentum,
                nesterov=cfg.muon_nesterov,
                ns_steps=cfg.muon_ns_steps,
                adjust_lr_fn=cfg.muon_adjust_lr,
            )
        )
    adamw_groups = [group("adamw_matrices", cfg.lr, cfg.weight_decay), group("adamw_no_decay", cfg.lr, 0.0)]
    adamw_groups = [g for g in adamw_groups if g["params"]]
    if adamw_groups:
        on_cuda = all(p.is_cuda for g in adamw_groups for _, p in g["params"])
        optimizers.append(
            torch.optim.AdamW(
                adamw_groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=True if on_cuda else None
            )
        )
    return optimizers


def set_lr(optimizers: list[torch.optim.Optimizer], factor: float) -> None:
    """lr = base_lr * factor in every group (factor from `lr_factor`)."""
    for opt in optimizers:
        for g in opt.param_groups:
            g["lr"] = g["base_lr"] * factor


def param_groups_summary(optimizers: list[torch.optim.Optimizer]) -> list[dict]:
    """One row per group, for logging: optimizer, group, tensors, params, lr, weight_decay."""
    return [
        {
            "optimizer": type(opt).__name__,
            "group": g["name"],
            "tensors": len(g["params"]),
            "params": sum(p.numel() for p in g["params"]),
            "lr": g["lr"],
            "weight_decay": g["weight_decay"],
        }
        for opt in optimizers
        for g in opt.param_groups
    ]


@torch.no_grad()
def smallest_singular_ratios(optimizers: list[torch.optim.Optimizer]) -> dict[str, float]:
    """sigma_min / sigma_max of every Muon matrix ("name[e]" per expert of a 3-D stack); 0 means collapsed.

    Muon's orthogonalised updates keep matrices well conditioned; a ratio falling towards 0 flags a
    matrix losing rank (dead heads or experts). Exact SVD in fp32: meant for every few hundred steps.
    """
    ratios: dict[str, float] = {}
    for opt in optimizers:
        if not isinstance(opt, Muon):
            continue
        for g in opt.param_groups:
            for name, p in zip(g["param_names"], g["params"]):
                s = torch.linalg.svdvals(p.float())  # [..., k], descending
                values = (s[..., -1] / s[..., 0]).nan_to_num(0.0).reshape(-1).tolist()  # all-zero: 0/0 -> 0
                if p.ndim == 2:
                    ratios[name] = values[0]
                else:
                    ratios.update({f"{name}[{e}]": v for e, v in enumerate(values)})
    return ratios
