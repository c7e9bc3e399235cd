"""Lion: the sign of an interpolated momentum as the update (Chen et al. 2023, "Symbolic Discovery of
Optimization Algorithms").

Per parameter, with gradient g and momentum m:
    c = β1·m + (1−β1)·g
    θ ← θ·(1 − lr·λ) − lr·sign(c)        (= θ − lr·(sign(c) + λθ): decay decoupled, scaled by lr)
    m ← β2·m + (1−β2)·g
The update interpolates with β1 while the stored momentum decays with β2 (0.9 and 0.99 by default), so
the step reacts to the current gradient faster than the momentum forgets old ones. Every coordinate moves
by exactly ±lr, a larger step than AdamW's typical one: Lion wants an lr 3–10× smaller and a weight decay
3–10× larger than AdamW's.

State is one fp32 tensor per parameter ("exp_avg"), half of AdamW's, and stays fp32 across
`load_state_dict` even for low-precision parameters (torch would cast it to the parameter's dtype).
"""

from __future__ import annotations

import itertools

import torch


class Lion(torch.optim.Optimizer):
    """Lion over any parameters (matrices, vectors, scalars); element-wise, so no shape rules."""

    def __init__(self, params, lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.99), weight_decay: float = 0.0):
        if lr < 0 or weight_decay < 0:
            raise ValueError(f"Lion: lr and weight_decay must be >= 0 (got {lr}, {weight_decay})")
        if not all(0.0 <= b < 1.0 for b in betas) or len(betas) != 2:
            raise ValueError(f"Lion: betas must be two numbers in [0, 1), got {betas}")
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, wd = group["lr"], group["weight_decay"]
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("Lion does not support sparse gradients")
                grad = p.grad.float()  # no copy for fp32 gradients
                state = self.state[p]
                if "exp_avg" not in state:
                    state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.preserve_format)
                exp_avg = state["exp_avg"]
                update = exp_avg.lerp(grad, 1 - beta1).sign_()  # sign(β1·m + (1−β1)·g)
                p.mul_(1 - lr * wd)
                p.add_(update, alpha=-lr)
                exp_avg.lerp_(grad, 1 - beta2)  # m ← β2·m + (1−β2)·g
        return loss

    def load_state_dict(self, state_dict: dict) -> None:
        """torch's loader, then the saved momenta put back in fp32 (torch casts them to the parameter dtype)."""
        super().load_state_dict(state_dict)
        # state_dict numbers parameters in group order, exactly as the live groups list them
        saved_ids = itertools.chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        live = itertools.chain.from_iterable(g["params"] for g in self.param_groups)
        for idx, p in zip(saved_ids, live):
            saved = state_dict["state"].get(idx, {}).get("exp_avg")
            if saved is not None and self.state[p]["exp_avg"].dtype != torch.float32:
                self.state[p]["exp_avg"] = saved.to(device=p.device, dtype=torch.float32)
