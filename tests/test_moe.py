"""The routed-expert feed-forward against a per-token loop written here, its gradients and buffers, the
auxiliary-loss-free bias update and the sequence-wise balance loss."""

import math

import pytest
import torch
import torch.nn.functional as F

from slmforge.config import ModelConfig, MoEConfig, validate_model
from slmforge.model.moe import MoE

# d_model and expert width: two shapes, so a layout assumption tied to one shape shows
PATHS = {"even": (8, 12), "odd": (6, 10)}


def make(d=8, f=12, seed=0, **moe) -> MoE:
    cfg = ModelConfig(d_model=d, n_heads=1, ffn="moe", moe=MoEConfig(**{"n_experts": 4, "top_k": 2, "expert_d_ff": f,
                                                                         **moe}))
    validate_model(cfg)
    torch.manual_seed(seed)
    layer = MoE(cfg)
    with torch.no_grad():  # large enough weights that the router's scores are far from ties
        for p in layer.parameters():
            p.normal_(0.0, 0.5)
    return layer


def naive(layer: MoE, x: torch.Tensor) -> torch.Tensor:
    """Token by token in float64: scores, top-k on scores + bias, weights from the plain scores."""
    m = layer.moe
    p = {name: t.detach().double() for name, t in layer.named_parameters()}
    bias = layer.router.balance_bias.double()
    out = torch.zeros(x.shape, dtype=torch.float64)
    for b in range(x.shape[0]):
        for t in range(x.shape[1]):
            v = x[b, t].double()
            logits = p["router.weight"] @ v
            s = logits.softmax(-1) if m.score == "softmax" else logits.sigmoid()
            chosen = sorted(range(m.n_experts), key=lambda i: -(s[i] + bias[i]).item())[:m.top_k]
            w = s[chosen]
            if m.norm_topk:
                w = w / w.sum()
            for weight, e in zip(w * m.route_scale, chosen):
                h = F.silu(p["experts.gate_proj"][e] @ v) * (p["experts.up_proj"][e] @ v)
                out[b, t] += weight * (p["experts.down_proj"][e] @ h)
            if m.shared_d_ff:
                h = F.silu(p["shared_expert.gate_proj.weight"] @ v) * (p["shared_expert.up_proj.weight"] @ v)
                shared = p["shared_expert.down_proj.weight"] @ h
                if m.shared_gate:
                    shared = shared * torch.sigmoid(p["shared_gate.weight"] @ v)
                out[b, t] += shared
    return out


ROUTINGS = [
    {"score": "softmax"},
    {"score": "softmax", "norm_topk": True, "shared_d_ff": 12, "shared_gate": True},
    {"score": "sigmoid", "norm_topk": True, "route_scale": 2.5, "shared_d_ff": 8},
    {"score": "sigmoid", "route_scale": 0.7, "shared_d_ff": 12, "shared_gate": True},
]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("routing", ROUTINGS)
def test_matches_per_token_reference(path, routing):
    d, f = PATHS[path]
    layer = make(d, f, **routing)
    x = torch.randn(2, 7, d)
    y, aux = layer(x)
    assert y.shape == x.shape and aux["load"].sum() == 2 * 7 * layer.moe.top_k and aux["dropped"] == 0
    torch.testing.assert_close(y.double(), naive(layer, x), atol=1e-5, rtol=0)


@pytest.mark.parametrize("path", PATHS)
def test_balance_bias_changes_choice_not_weights(path):
    d, f = PATHS[path]
    layer = make(d, f, score="sigmoid", norm_topk=True, route_scale=1.5, shared_d_ff=8)
    x = torch.randn(3, 5, d)
    before = layer.router(x.reshape(-1, d))[1]
    with torch.no_grad():
        layer.router.balance_bias.copy_(torch.tensor([0.0, 0.0, 0.0, 2.0]))  # expert 3 always chosen
    scores, chosen, weights = layer.router(x.reshape(-1, d))
    assert (chosen == 3).any(dim=-1).all() and not (before == 3).any(dim=-1).all()
    plain = scores.gather(1, chosen)
    torch.testing.assert_close(weights, 1.5 * plain / plain.sum(-1, keepdim=True))
    torch.testing.assert_close(layer(x)[0].double(), naive(layer, x), atol=1e-5, rtol=0)


@pytest.mark.parametrize("path", PATHS)
def test_gradients_reach_only_routed_experts(path):
    d, f = PATHS[path]
    layer = make(d, f, score="softmax", shared_d_ff=8)
    with torch.no_grad():
        layer.router.balance_bias[2] = -100.0  # expert 2 never chosen
    y, aux = layer(torch.randn(2, 6, d))
    y.pow(2).sum().backward()
    assert aux["load"][2] == 0 and (aux["load"][[0, 1, 3]] > 0).all()
    assert layer.router.weight.grad.abs().sum() > 0
    for name in ("gate_proj", "up_proj", "down_proj"):
        grad = getattr(layer.experts, name).grad
        per_expert = grad.abs().flatten(1).sum(1)
        assert per_expert[2] == 0 and (per_expert[[0, 1, 3]] > 0).all(), (name, per_expert)

    # one token: exactly its top-k experts get a gradient
    layer.zero_grad()
    x = torch.randn(1, 1, d)
    chosen = layer.router(x.reshape(1, d))[1][0]
    layer(x)[0].sum().backward()
    touched = layer.experts.gate_proj.grad.abs().flatten(1).sum(1) > 0
    assert touched.nonzero().flatten().tolist() == sorted(chosen.tolist())


def test_balance_bias_is_a_saved_buffer_without_grad():
    layer = make(score="sigmoid", balance_loss=0.1)
    assert "router.balance_bias" in layer.state_dict()
    assert "router.balance_bias" in dict(layer.named_buffers())
    assert "router.balance_bias" not in dict(layer.named_parameters())
    assert layer.router.balance_bias.dtype == torch.float32
    y, aux = layer(torch.randn(2, 4, 8))
    (y.sum() + aux["balance_loss"]).backward()
    assert layer.router.balance_bias.grad is None and not layer.router.balance_bias.requires_grad
    assert {n for n, _ in layer.named_parameters()} >= {"router.weight", "experts.gate_proj", "experts.up_proj",
                                                         "experts.down_proj"}


def test_update_bias_moves_skewed_load_toward_uniform():
    layer = make(score="sigmoid", bias_update_rate=0.01)
    with torch.no_grad():
        layer.router.weight.normal_(0.0, 0.3)
        layer.router.weight[0, 0] = 4.0  # feature 0 is large and positive: every token prefers expert 0
    x = torch.randn(4, 32, 8)
    x[..., 0] = x[..., 0].abs() + 1.0

    def cv(load):
        return (load.std(unbiased=False) / load.mean()).item()

    with torch.no_grad():
        load = layer(x)[1]["load"]
        assert load[0] == 4 * 32  # all tokens on expert 0 at the start
        start = cv(load)
        layer.update_bias(load)
        torch.testing.assert_close(layer.router.balance_bias, 0.01 * torch.sign(load.mean() - load))
        for _ in range(300):
            load = layer(x)[1]["load"]
            layer.update_bias(load)
        end = cv(layer(x)[1]["load"])
    assert end < 0.3 * start, (start, end)


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_load_counts_every_choice(score):
    layer = make(score=score, top_k=3)
    x = torch.randn(3, 5, 8)
    aux = layer(x)[1]
    load = aux["load"]
    assert load.shape == (4,) and load.dtype == torch.float32 and not load.requires_grad
    assert load.sum().item() == 3 * 5 * 3
    chosen = layer.router(x.reshape(-1, 8))[1]
    assert load.tolist() == torch.bincount(chosen.flatten(), minlength=4).float().tolist()
    assert "balance_loss" not in aux


def test_balance_loss_by_hand():
    """d = E = 2, top-1, identity router: a token [ln 3, 0] scores softmax (3/4, 1/4), [0, ln 3] the mirror.
    Sequence 1 sends both tokens to expert 0: f = 2/(1*2) * (2, 0) = (2, 0), P = (3/4, 1/4), sum 1.5.
    Sequence 2 sends one to each: f = (1, 1), P = (1/2, 1/2), sum 1. Mean 1.25, times alpha 0.1."""
    cfg = ModelConfig(d_model=2, n_heads=1, ffn="moe",
                      moe=MoEConfig(n_experts=2, top_k=1, expert_d_ff=4, balance_loss=0.1))
    validate_model(cfg)
    layer = MoE(cfg)
    with torch.no_grad():
        layer.router.weight.copy_(torch.eye(2))
    a, b = [math.log(3), 0.0], [0.0, math.log(3)]
    x = torch.tensor([[a, a], [a, b]])
    loss = layer(x)[1]["balance_loss"]
    assert loss.item() == pytest.approx(0.125, abs=1e-6)
    loss.backward()
    assert layer.router.weight.grad.abs().sum() > 0


def test_balance_loss_sigmoid_matches_loop():
    layer = make(score="sigmoid", top_k=2, balance_loss=0.3)
    x = torch.randn(3, 6, 8)
    loss = layer(x)[1]["balance_loss"]
    scores, chosen, _ = layer.router(x.reshape(-1, 8))
    scores, chosen = scores.view(3, 6, 4), chosen.view(3, 6, 2)
    total = 0.0
    for b in range(3):
        for i in range(4):
            f_i = 4 / (2 * 6) * sum(int(i in chosen[b, t].tolist()) for t in range(6))
            p_i = sum((scores[b, t, i] / scores[b, t].sum()).item() for t in range(6)) / 6
            total += f_i * p_i
    assert loss.item() == pytest.approx(0.3 * total / 3, rel=1e-5)


@pytest.mark.parametrize("path", PATHS)
def test_decode_one_token(path):
    d, f = PATHS[path]
    layer = make(d, f, score="sigmoid", norm_topk=True, shared_d_ff=8, shared_gate=True)
    for batch in (1, 3):
        x = torch.randn(batch, 1, d)
        with torch.no_grad():
            y, aux = layer(x)
        assert y.shape == (batch, 1, d) and aux["load"].sum().item() == batch * 2
        torch.testing.assert_close(y.double(), naive(layer, x), atol=1e-5, rtol=0)
