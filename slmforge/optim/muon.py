"""Muon: momentum, then Newton–Schulz orthogonalisation of the update (Keller Jordan, 2024).

Same math as torch.optim.Muon (torch 2.13): EMA momentum via lerp, optional Nesterov, Frobenius
normalisation, quintic Newton–Schulz on the wide orientation, decoupled weight decay with the unadjusted
lr, and the "original" / "match_rms_adamw" lr adjustment. Two additions: 3-D parameters are a batch of
independent matrices (stacked MoE experts [n_experts, out, in], each orthogonalised on its own), and
Newton–Schulz runs in bf16 only where bf16 matmuls are fast (CUDA, or a CPU with AVX512-BF16/AMX);
elsewhere it runs in fp32, which is both faster and more accurate there.

No communication happens here: under DDP the gradients are already averaged, every rank computes the
same update. State is one plain tensor per parameter ("momentum_buffer").
"""

from __future__ import annotations

import math

import torch

from slmforge.hardware import cpu_has_fast_bf16

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
ADJUST_LR_FNS = ("original", "match_rms_adamw")


def default_ns_dtype(device: torch.device) -> torch.dtype:
    """bf16 where its matmuls are fast; fp32 otherwise (bf16 is ~100x slower on CPUs without BF16 units)."""
    if device.type == "cuda" or (device.type == "cpu" and cpu_has_fast_bf16()):
        return torch.bfloat16
    return torch.float32


def zeropower_via_newtonschulz(
    G: torch.Tensor,
    steps: int = 5,
    coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
    eps: float = 1e-7,
    dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """Approximately U·Vᵀ of G = U·S·Vᵀ for a matrix or a batch of matrices [..., rows, cols].

    The coefficients push singular values into roughly [0.5, 1.5] rather than exactly 1, which trains
    as well and needs only 5 steps. Returned in `dtype`.
    """
    a, b, c = coefficients
    X = G.to(dtype)
    tall = G.size(-2) > G.size(-1)
    if tall:  # iterate on the wide orientation: the Gram matrix X·Xᵀ is then the smaller one
        X = X.mT
    X = X / X.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)  # spectral norm <= Frobenius norm <= 1
    addmm = torch.addmm if X.ndim == 2 else torch.baddbmm  # fused b·A + c·A·A, as torch.optim.Muon
    for _ in range(steps):
        A = X @ X.mT
        B = addmm(A, A, A, beta=b, alpha=c)
        X = addmm(X, B, X, beta=a)
    return X.mT if tall else X


def adjusted_lr(lr: float, adjust_lr_fn: str, shape: torch.Size) -> float:
    """Scale lr by the matrix shape (rows, cols = the last two dims, i.e. per expert for 3-D)."""
    rows, cols = shape[-2:]
    if adjust_lr_fn == "original":  # Keller Jordan: equal update RMS for tall matrices
        return lr * math.sqrt(max(1.0, rows / cols))
    if adjust_lr_fn == "match_rms_adamw":  # Moonlight: update RMS 0.2 like AdamW, so AdamW's lr/wd carry over
        return lr * 0.2 * math.sqrt(max(rows, cols))
    raise ValueError(f"adjust_lr_fn must be one of {ADJUST_LR_FNS}, got {adjust_lr_fn!r}")


class Muon(torch.optim.Optimizer):
    """Muon for 2-D weight matrices and 3-D stacks of them; everything else belongs to AdamW.

    ns_dtype: dtype of the Newton–Schulz iteration; None picks `default_ns_dtype` per parameter device.
    It is a compute choice, not state, so it is not part of the param groups or the state dict.
    """

    def __init__(
        self,
        params,
        lr: float = 0.02,
        weight_decay: float = 0.0,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_steps: int = 5,
        ns_coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
        eps: float = 1e-7,
        adjust_lr_fn: str = "original",
        ns_dtype: torch.dtype | None = None,
    ):
        if lr < 0 or weight_decay < 0 or momentum < 0:
            raise ValueError(f"Muon: lr, weight_decay and momentum must be >= 0 (got {lr}, {weight_decay}, {momentum})")
        if adjust_lr_fn not in ADJUST_LR_FNS:
            raise ValueError(f"Muon: adjust_lr_fn must be one of {ADJUST_LR_FNS}, got {adjust_lr_fn!r}")
        defaults = dict(
            lr=lr,
            weight_decay=weight_decay,
            momentum=momentum,
            nesterov=nesterov,
            ns_steps=ns_steps,
            ns_coefficients=tuple(ns_coefficients),
            eps=eps,
            adjust_lr_fn=adjust_lr_fn,
        )
        super().__init__(params, defaults)
        self.ns_dtype = ns_dtype
        for group in self.param_groups:
            names = group.get("param_names", [None] * len(group["params"]))
            for name, p in zip(names, group["params"]):
                if p.ndim not in (2, 3):
                    raise ValueError(f"Muon takes 2-D or 3-D parameters; {name or 'a parameter'} is {tuple(p.shape)}")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, wd, momentum = group["lr"], group["weight_decay"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(grad)
                buf = state["momentum_buffer"]
                buf.lerp_(grad, 1 - momentum)  # EMA form of momentum; NS removes the scale anyway
                update = grad.lerp(buf, momentum) if group["nesterov"] else buf
                dtype = self.ns_dtype or default_ns_dtype(p.device)
                update = zeropower_via_newtonschulz(
                    update, group["ns_steps"], group["ns_coefficients"], group["eps"], dtype
                )
                p.mul_(1 - lr * wd)  # decoupled decay uses the unadjusted lr, as torch.optim.Muon
                p.add_(update, alpha=-adjusted_lr(lr, group["adjust_lr_fn"], p.shape))
        return loss
