"""Low-rank adapters (LoRA, Hu et al. 2021) on a model's projections, as weight parametrizations.

Each targeted nn.Linear's weight reads as W + (alpha / rank) · B A, with W frozen, A [rank, in] drawn like
a linear layer's weight and B [out, rank] zero, so training starts from the base model exactly. A
parametrization rather than a wrapped forward: the attention reads q/k/v as one concatenated weight, and
every such read sees the adapted weight. Merging is computing W + (alpha / rank) · B A once.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.utils import parametrize

ADAPTED = ".parametrizations.weight."  # in the names of an adapted module's tensors


class LoRA(nn.Module):
    def __init__(self, out_features: int, in_features: int, rank: int, alpha: float):
        super().__init__()
        self.scale = alpha / rank
        self.lora_A = nn.Parameter(torch.empty(rank, in_features))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + (self.lora_B @ self.lora_A).to(weight.dtype) * self.scale


def _matches(name: str, targets: list[str]) -> bool:
    return any(name == t or name.endswith("." + t) for t in targets)


def add_lora(model: nn.Module, rank: int, alpha: float, targets: list[str]) -> list[str]:
    """Adapt every nn.Linear whose name ends in one of `targets`, freeze every other parameter, and return
    the adapted modules' names. Raises ValueError when no module matches."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and _matches(n, targets)]
    if not names:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise ValueError(f"match no nn.Linear of the model; its projections are named {', '.join(linear)}")
    model.requires_grad_(False)
    for name in names:
        module = model.get_submodule(name)
        lora = LoRA(module.out_features, module.in_features, rank, alpha).to(module.weight.device)
        parametrize.register_parametrization(module, "weight", lora)
    return names


def adapted_modules(model: nn.Module) -> dict[str, LoRA]:
    """{module name: its LoRA} of an adapted model."""
    return {name: m.parametrizations.weight[0] for name, m in model.named_modules()
            if parametrize.is_parametrized(m, "weight") and isinstance(m.parametrizations.weight[0], LoRA)}


def adapter_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters alone: "<module>.lora_A" [rank, in] and "<module>.lora_B" [out, rank]."""
    out = {}
    for name, lora in adapted_modules(model).items():
        out[f"{name}.lora_A"], out[f"{name}.lora_B"] = lora.lora_A.detach(), lora.lora_B.detach()
    return out


def load_adapters(model: nn.Module, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Put saved adapters back into an adapted model; every adapter accounted for, shapes checked."""
    loras = adapted_modules(model)
    expected = {f"{n}.lora_{x}" for n in loras for x in "AB"}
    if set(tensors) != expected:
        missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
        raise ValueError(f"{source}: the adapters do not fit this model (missing {missing[:3]}, unexpected "
                         f"{unexpected[:3]})")
    with torch.no_grad():
        for name, lora in loras.items():
            for part in ("lora_A", "lora_B"):
                value, target = tensors[f"{name}.{part}"], getattr(lora, part)
                if value.shape != target.shape:
                    raise ValueError(f"{source}: {name}.{part} has shape {list(value.shape)}, the model's "
                                     f"{list(target.shape)}")
                target.copy_(value)


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict of the model with its adapters merged into the weights, under the plain names a model
    without adapters has: what any reader of the checkpoint loads."""
    out = {}
    for name, tensor in model.state_dict().items():
        if ADAPTED not in name:
            out[name] = tensor
        elif name.endswith(".parametrizations.weight.original"):
            module = name.removesuffix(".parametrizations.weight.original")
            with torch.no_grad():
                out[f"{module}.weight"] = model.get_submodule(module).weight.detach()
    return out
