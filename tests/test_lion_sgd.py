"""Lion and SGD: the update formulas, grouping alone or beside Muon, exact state round trips."""

import json

import pytest
import torch
from safetensors.torch import load, save
from tiny_models import TinyModel, group_table, train_tiny
from torch import nn

from slmforge.config import OptimConfig
from slmforge.optim import (
    Lion,
    Muon,
    build_optimizers,
    load_optimizer_state,
    optimizer_state_tensors,
)

# ----------------------------------------------------------------------------------------------
# Lion and SGD


def test_lion_matches_formula():
    """Several steps with weight decay against c = β1·m + (1−β1)·g; θ ← θ − lr·(sign(c) + λθ); m ← β2·m + (1−β2)·g."""
    torch.manual_seed(0)
    lr, wd, (b1, b2) = 0.01, 0.3, (0.9, 0.99)
    theta, m = torch.randn(5, 7), torch.zeros(5, 7)
    p = nn.Parameter(theta.clone())
    opt = Lion([p], lr=lr, betas=(b1, b2), weight_decay=wd)
    for _ in range(4):
        g = torch.randn(5, 7)
        p.grad = g.clone()
        opt.step()
        c = b1 * m + (1 - b1) * g
        theta = theta - lr * (torch.sign(c) + wd * theta)
        m = b2 * m + (1 - b2) * g
        torch.testing.assert_close(p.detach(), theta, rtol=0, atol=1e-6)
        torch.testing.assert_close(opt.state[p]["exp_avg"], m, rtol=0, atol=1e-7)
    assert opt.state[p]["exp_avg"].dtype == torch.float32


def test_lion_interpolates_with_beta1_and_stores_with_beta2():
    """A scalar whose second step flips sign only under the right betas: c with β1, momentum with β2."""
    p = nn.Parameter(torch.zeros(1))
    opt = Lion([p], lr=0.1, betas=(0.9, 0.99))
    p.grad = torch.ones(1)
    opt.step()  # c = 0.1 > 0: θ = −0.1; m = 0.01
    assert p.item() == pytest.approx(-0.1) and opt.state[p]["exp_avg"].item() == pytest.approx(0.01)
    p.grad = torch.full((1,), -0.5)
    opt.step()
    # c = 0.9·0.01 + 0.1·(−0.5) = −0.041 < 0, so θ goes back up to 0. Interpolating with β2 would give
    # c = +0.0049, and a momentum stored with β1 (m = 0.1) c = +0.04: both would push θ further down.
    assert p.item() == pytest.approx(0.0, abs=1e-7)
    assert opt.state[p]["exp_avg"].item() == pytest.approx(0.99 * 0.01 + 0.01 * -0.5)


def test_sgd_nesterov_matches_hand_computation():
    """build_optimizers' SGD: g' = g + λθ, b = μb + g' (b = g' at first), θ ← θ − lr·(g' + μb)."""
    torch.manual_seed(0)
    lr, wd, mu = 0.1, 0.05, 0.9
    model = nn.Linear(3, 2)  # weight: decayed; bias: not
    (opt,) = build_optimizers(model, OptimConfig(name="sgd", lr=lr, weight_decay=wd, sgd_momentum=mu))
    assert isinstance(opt, torch.optim.SGD) and opt.param_groups[0]["nesterov"]
    expected = {n: (p.detach().clone(), wd if p.ndim == 2 else 0.0, None) for n, p in model.named_parameters()}
    for _ in range(2):
        grads = {n: torch.randn_like(p) for n, p in model.named_parameters()}
        for n, p in model.named_parameters():
            p.grad = grads[n].clone()
        opt.step()
        for n, (theta, decay, buf) in expected.items():
            g = grads[n] + decay * theta
            buf = g if buf is None else mu * buf + g
            expected[n] = (theta - lr * (g + mu * buf), decay, buf)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), expected[n][0], rtol=0, atol=1e-7)


def _trainable_once(model, opts):
    names = [n for o in opts for g in o.param_groups for n in g["param_names"]]
    ids = [id(p) for o in opts for g in o.param_groups for p in g["params"]]
    assert sorted(names) == sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert len(set(ids)) == len(ids)


@pytest.mark.parametrize("name, cls", [("adamw", torch.optim.AdamW), ("lion", Lion), ("sgd", torch.optim.SGD)])
def test_grouping_single_optimizer(name, cls):
    model = TinyModel()
    cfg = OptimConfig(name=name, lr=3e-4, weight_decay=0.3, lion_betas=[0.95, 0.98], sgd_momentum=0.8)
    opts = build_optimizers(model, cfg)
    assert [type(o) for o in opts] == [cls]
    groups = group_table(opts)
    assert set(groups) == {f"{name}_matrices", f"{name}_no_decay"}
    assert groups[f"{name}_matrices"][1:] == (0.3, 3e-4) and groups[f"{name}_no_decay"][1:] == (0.0, 3e-4)
    # every matrix, hidden ones and the 3-D expert stack included, is in the decayed group
    by_name = dict(model.named_parameters())
    assert all(by_name[n].ndim >= 2 for n in groups[f"{name}_matrices"][0])
    assert all(by_name[n].ndim < 2 for n in groups[f"{name}_no_decay"][0])
    assert "layers.1.ffn.up_proj" in groups[f"{name}_matrices"][0]
    _trainable_once(model, opts)
    if name == "lion":
        assert opts[0].param_groups[0]["betas"] == (0.95, 0.98)
    if name == "sgd":
        assert opts[0].param_groups[0]["momentum"] == 0.8 and opts[0].param_groups[0]["nesterov"]


@pytest.mark.parametrize("others, cls", [("lion", Lion), ("sgd", torch.optim.SGD)])
def test_grouping_muon_with_others(others, cls):
    model = TinyModel()
    opts = build_optimizers(model, OptimConfig(name="muon", others=others, lr=1e-4, weight_decay=0.2))
    assert [type(o) for o in opts] == [Muon, cls]
    groups = group_table(opts)
    reference = group_table(build_optimizers(TinyModel(), OptimConfig(name="muon")))  # others: adamw
    assert set(groups) == {"muon", f"{others}_matrices", f"{others}_no_decay"}
    assert groups["muon"] == reference["muon"]
    assert groups[f"{others}_matrices"][0] == reference["adamw_matrices"][0]
    assert groups[f"{others}_no_decay"][0] == reference["adamw_no_decay"][0]
    assert groups[f"{others}_matrices"][1:] == (0.2, 1e-4)
    _trainable_once(model, opts)


def test_sgd_without_momentum_drops_nesterov():
    (opt,) = build_optimizers(TinyModel(), OptimConfig(name="sgd", sgd_momentum=0.0, sgd_nesterov=True))
    assert opt.param_groups[0]["momentum"] == 0.0 and not opt.param_groups[0]["nesterov"]


def test_unknown_optimizer_is_rejected():
    with pytest.raises(ValueError, match="optim.name"):
        build_optimizers(TinyModel(), OptimConfig(name="adagrad"))
    with pytest.raises(ValueError, match="optim.others"):
        build_optimizers(TinyModel(), OptimConfig(name="muon", others="muon"))


@pytest.mark.parametrize(
    "cfg",
    [
        OptimConfig(name="lion", lr=3e-4, weight_decay=0.3),
        OptimConfig(name="sgd", lr=0.05, weight_decay=0.01),
        OptimConfig(name="sgd", lr=0.05, sgd_momentum=0.0),  # no state at all
        OptimConfig(name="muon", others="lion", lr=3e-4, weight_decay=0.3),
        OptimConfig(name="muon", others="sgd", lr=0.05, sgd_nesterov=False),
    ],
    ids=["lion", "sgd", "sgd-no-momentum", "muon+lion", "muon+sgd"],
)
def test_new_optimizers_state_round_trip_is_exact(cfg):
    torch.manual_seed(0)
    model = TinyModel()
    opts = build_optimizers(model, cfg)
    train_tiny(model, opts, 3, seed=1)
    tensors, meta = optimizer_state_tensors(opts)
    if "lion" in (cfg.name, cfg.others):  # others is "lion" only beside Muon here
        assert tensors["embed.weight/exp_avg"].dtype == torch.float32
    if "sgd" in (cfg.name, cfg.others) and cfg.sgd_momentum > 0:
        assert "norm.weight/momentum_buffer" in tensors
    blob, meta_text = save(tensors), json.dumps(meta)
    restored = TinyModel()
    restored.load_state_dict(model.state_dict())
    restored_opts = build_optimizers(restored, cfg)
    load_optimizer_state(restored_opts, load(blob), json.loads(meta_text))

    train_tiny(model, opts, 2, seed=2)
    train_tiny(restored, restored_opts, 2, seed=2)
    for (name, a), b in zip(model.named_parameters(), restored.parameters()):
        assert torch.equal(a, b), name


def test_sgd_none_momentum_buffer_is_left_out():
    """Some torch versions keep momentum_buffer = None (momentum 0, or before a parameter's first step)."""
    model = nn.Linear(3, 2)
    (opt,) = build_optimizers(model, OptimConfig(name="sgd"))
    opt.state[model.weight]["momentum_buffer"] = None
    tensors, meta = optimizer_state_tensors([opt])
    assert tensors == {}
    (fresh,) = build_optimizers(nn.Linear(3, 2), OptimConfig(name="sgd"))
    load_optimizer_state([fresh], tensors, json.loads(json.dumps(meta)))
    assert not fresh.state


def test_lion_state_stays_fp32_for_bf16_parameters():
    torch.manual_seed(0)
    p = nn.Parameter(torch.randn(4, 4, dtype=torch.bfloat16))
    opt = Lion([("w", p)], lr=1e-3, weight_decay=0.1)
    p.grad = torch.randn(4, 4, dtype=torch.bfloat16)
    opt.step()
    tensors, meta = optimizer_state_tensors([opt])
    assert tensors["w/exp_avg"].dtype == torch.float32
    q = nn.Parameter(p.detach().clone())
    restored = Lion([("w", q)])
    load_optimizer_state([restored], load(save(tensors)), json.loads(json.dumps(meta)))
    assert torch.equal(restored.state[q]["exp_avg"], opt.state[p]["exp_avg"])
    assert restored.state[q]["exp_avg"].dtype == torch.float32
