"""Optimizer state as a flat dict of tensors (for safetensors) plus JSON-able metadata, and back.

Tensors are keyed "<param name>/<state key>" (e.g. "layers.0.attn.q_proj.weight/momentum_buffer",
"embed.weight/exp_avg", "embed.weight/step"); a parameter lives in exactly one optimizer, so the keys are
unique. A state entry that is None (torch's SGD may hold a None "momentum_buffer") is left out: on load
it is simply absent, which torch's optimizers read the same way. The metadata holds each optimizer's
class and param groups (hyperparameters, lr, base_lr, names).
Loading goes through torch's own `load_state_dict`, so a restored optimizer continues bit-identically.
No pickle: everything is tensors, numbers, strings and lists.
"""

from __future__ import annotations

import torch


def _param_names(group: dict) -> list[str]:
    if "param_names" not in group:
        raise ValueError("optimizer state I/O needs named parameters (build the optimizers with build_optimizers)")
    return group["param_names"]


def optimizer_state_tensors(optimizers: list[torch.optim.Optimizer]) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, meta). The tensors are the live state, not copies: write them out before the next step."""
    tensors: dict[str, torch.Tensor] = {}
    meta: dict = {"optimizers": []}
    for opt in optimizers:
        sd = opt.state_dict()
        # state_dict numbers parameters 0, 1, ... in group order, so the flat name list maps ids to names
        names = [n for g in sd["param_groups"] for n in _param_names(g)]
        for idx, param_state in sd["state"].items():
            for key, value in param_state.items():
                if value is None:  # SGD's "momentum_buffer" when it has none yet: absent reads the same
                    continue
                if not isinstance(value, torch.Tensor):
                    raise TypeError(f"{type(opt).__name__} state {names[idx]}/{key} is not a tensor: {value!r}")
                tensors[f"{names[idx]}/{key}"] = value
        groups = [{k: v for k, v in g.items() if k != "params"} for g in sd["param_groups"]]
        meta["optimizers"].append({"type": type(opt).__name__, "param_groups": groups})
    return tensors, meta


def load_optimizer_state(optimizers: list[torch.optim.Optimizer], tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Restore what `optimizer_state_tensors` produced into freshly built optimizers of the same layout.

    The saved hyperparameters (lr, betas, weight decay, ...) replace the live ones, as torch does. Tensors
    already of the parameter's dtype and device are adopted, not copied (pass freshly loaded ones).
    """
    saved = meta["optimizers"]
    if [s["type"] for s in saved] != [type(o).__name__ for o in optimizers]:
        raise ValueError(
            f"checkpoint optimizers {[s['type'] for s in saved]} do not match {[type(o).__name__ for o in optimizers]}"
        )
    by_param: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        name, _, state_key = key.rpartition("/")
        by_param.setdefault(name, {})[state_key] = value

    for opt, entry in zip(optimizers, saved):
        live_groups, groups = opt.param_groups, []
        if len(entry["param_groups"]) != len(live_groups):
            n_saved = len(entry["param_groups"])
            raise ValueError(f"{entry['type']}: checkpoint has {n_saved} param groups, this run {len(live_groups)}")
        state, start = {}, 0
        for live, group in zip(live_groups, entry["param_groups"]):
            names = _param_names(group)
            if names != _param_names(live):
                missing = sorted(set(_param_names(live)) - set(names))
                extra = sorted(set(names) - set(_param_names(live)))
                raise ValueError(
                    f"{entry['type']} group '{group.get('name')}': parameters differ from the checkpoint "
                    f"(not in checkpoint: {missing}, only in checkpoint: {extra}, or a different order)"
                )
            # JSON turns tuples (betas, ns_coefficients) into lists; give them back their live type
            group = {k: tuple(v) if isinstance(live.get(k), tuple) else v for k, v in group.items()}
            group["params"] = list(range(start, start + len(names)))
            for idx, name in enumerate(names, start):
                if name in by_param:
                    state[idx] = by_param.pop(name)
            start += len(names)
            groups.append(group)
        opt.load_state_dict({"state": state, "param_groups": groups})
    if by_param:
        raise ValueError(f"checkpoint has optimizer state for parameters no optimizer holds: {sorted(by_param)}")
