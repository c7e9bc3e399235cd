"""Optimizers: who gets Muon and who gets AdamW / Lion / SGD, lr scheduling, the rank sentinel, state I/O.

cfg.name picks the layout: "muon" gives Muon the hidden matrices and cfg.others (adamw, lion or sgd) the
rest; "adamw", "lion" or "sgd" alone optimizes every parameter with that one optimizer. Groups, decided
per parameter by name and shape (<opt> is the optimizer beside or instead of Muon):
  muon            hidden weight matrices, ndim 2 or 3 (3-D: stacked experts, orthogonalised per expert)
  <opt>_matrices  embeddings and the LM head (Muon is for hidden layers: their rows are looked up or
                  read out one token at a time), and "matrices" with a dimension of 1 (a [1, d] gate is a
                  vector); weight decay cfg.weight_decay
                  The MoE router too: its logits' scale decides how peaked the routing is, and Muon's
                  fixed-size orthogonal steps would move that scale at the hidden matrices' pace.
                  And LoRA's factors (lora_A, lora_B): B starts at zero, and an orthogonalised step would
                  give the low-rank update B A a full-size norm from the first step.
  <opt>_no_decay  1-D and 0-D tensors: norm gains, biases, per-layer vectors; never decayed. Also the
                  attention-residual queries (`residual.*`, stored as [n_layers, d] rows of independent
                  vectors, not a matrix): zero-initialised, so decay would only pull them back to uniform
                  averaging.
Without Muon its group folds into <opt>_matrices (e.g. adamw_matrices, lion_matrices, sgd_matrices).
The <opt> groups all use cfg.lr: AdamW with cfg.betas / cfg.eps, Lion with cfg.lion_betas, SGD with
cfg.sgd_momentum / cfg.sgd_nesterov. AdamW and Lion decay decoupled (θ ← θ·(1 − lr·λ)); SGD's decay is
torch's coupled L2 (λθ added to the gradient before the momentum). Frozen parameters and buffers are not
optimized: the MoE routing biases are buffers, moved by the trainer's balancing rule, never by a gradient.
Every group carries "name", "base_lr" and "param_names".
"""

from __future__ import annotations

import torch
from torch import nn

from slmforge.config import OptimConfig
from slmforge.optim.lion import Lion
from slmforge.optim.muon import Muon
from slmforge.optim.schedule import lr_factor
from slmforge.optim.state import load_optimizer_state, optimizer_state_tensors

__all__ = [
    "Lion",
    "Muon",
    "build_optimizers",
    "load_optimizer_state",
    "lr_factor",
    "optimizer_state_tensors",
    "param_groups_summary",
    "set_lr",
    "smallest_singular_ratios",
]

OTHERS = ("adamw", "lion", "sgd")  # optimizers that take any parameter, alone or beside Muon
EMBEDDING_NAMES = ("embed", "lm_head")  # module names whose weights are token embeddings / the output head
# names (of modules, or of LoRA's factors) of matrices kept out of Muon (see the module docstring)
NON_MUON_MATRIX_NAMES = ("router", "lora_A", "lora_B")
VECTOR_NAMES = ("residual",)  # module names whose parameters are stacks of vectors


def _group_kind(name: str, p: torch.Tensor, use_muon: bool, is_embedding: bool) -> str:
    """Group kind: "muon", "matrices" or "no_decay" (the last two get the other optimizer's name as a prefix)."""
    # a name component match also covers wrapped models ("module.embed.weight", "_orig_mod.lm_head.weight")
    parts = name.split(".")
    if p.ndim < 2 or any(part in VECTOR_NAMES for part in parts):
        return "no_decay"
    is_embedding = is_embedding or any(part in EMBEDDING_NAMES for part in parts)
    is_matrix = min(p.shape[-2:]) > 1 and not any(part in NON_MUON_MATRIX_NAMES for part in parts)
    if use_muon and is_matrix and not is_embedding:
        return "muon"
    return "matrices"


def _other_optimizer(kind: str, groups: list[dict], cfg: OptimConfig) -> torch.optim.Optimizer:
    """The AdamW, Lion or SGD instance for `groups` (each with its own lr and weight decay)."""
    if kind == "adamw":
        on_cuda = all(p.is_cuda for g in groups for _, p in g["params"])
        return torch.optim.AdamW(groups, betas=tuple(cfg.betas), eps=cfg.eps, fused=True if on_cuda else None)
    if kind == "lion":
        return Lion(groups, betas=tuple(cfg.lion_betas))
    # torch rejects Nesterov without momentum; with momentum 0 both are plain SGD anyway
    return torch.optim.SGD(groups, momentum=cfg.sgd_momentum, nesterov=cfg.sgd_nesterov and cfg.sgd_momentum > 0)


def build_optimizers(model: nn.Module, cfg: OptimConfig) -> list[torch.optim.Optimizer]:
    """[Muon, <cfg.others>] for cfg.name == "muon", [<cfg.name>] for adamw, lion or sgd alone; build after
    moving the model to its device. An optimizer left without parameters is not built.

    Pass the unwrapped model (not DDP's `.module` wrapper) so parameter names, which key the saved
    optimizer state, stay the same across DDP / single-process runs.
    """
    if cfg.name not in ("muon", *OTHERS):
        raise ValueError(f"optim.name must be 'muon' or one of {OTHERS}, got {cfg.name!r}")
    other = cfg.others if cfg.name == "muon" else cfg.name
    if other not in OTHERS:
        raise ValueError(f"optim.others must be one of {OTHERS}, got {other!r}")
    embedding_ids = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    named: dict[str, list] = {"muon": [], "matrices": [], "no_decay": []}
    for name, p in model.named_parameters():  # tied weights appear once, under their first name
        if p.requires_grad:
            named[_group_kind(name, p, cfg.name == "muon", id(p) in embedding_ids)].append((name, p))

    def group(kind: str, lr: float, weight_decay: float) -> dict:
        label = kind if kind == "muon" else f"{other}_{kind}"
        return {"params": named[kind], "name": label, "lr": lr, "base_lr": lr, "weight_decay": weight_decay}

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
    other_groups = [group("matrices", cfg.lr, cfg.weight_decay), group("no_decay", cfg.lr, 0.0)]
    other_groups = [g for g in other_groups if g["params"]]
    if other_groups:
        optimizers.append(_other_optimizer(other, other_groups, cfg))
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
