import json
import math

import pytest
import torch
from safetensors.torch import load, save
from torch import nn

from slmforge.config import OptimConfig, ScheduleConfig
from slmforge.optim import (
    Lion,
    Muon,
    build_optimizers,
    load_optimizer_state,
    lr_factor,
    optimizer_state_tensors,
    param_groups_summary,
    set_lr,
    smallest_singular_ratios,
)
from slmforge.optim.muon import zeropower_via_newtonschulz

# ----------------------------------------------------------------------------------------------
# Muon


@pytest.mark.skipif(not hasattr(torch.optim, "Muon"), reason="torch.optim.Muon needs torch >= 2.9")
@pytest.mark.parametrize("shape", [(24, 40), (40, 24)])
@pytest.mark.parametrize("adjust", ["original", "match_rms_adamw"])
@pytest.mark.parametrize("nesterov", [True, False])
def test_muon_matches_torch(shape, adjust, nesterov):
    # torch.optim.Muon always runs Newton-Schulz in bf16; ask for the same to compare like with like
    torch.manual_seed(0)
    w0 = torch.randn(shape)
    ref, ours = nn.Parameter(w0.clone()), nn.Parameter(w0.clone())
    kw = dict(lr=0.02, weight_decay=0.1, momentum=0.95, nesterov=nesterov, ns_steps=5, adjust_lr_fn=adjust)
    opt_ref = torch.optim.Muon([ref], **kw)
    opt_ours = Muon([ours], **kw, ns_dtype=torch.bfloat16)
    for _ in range(3):
        g = torch.randn(shape)
        ref.grad, ours.grad = g.clone(), g.clone()
        opt_ref.step()
        opt_ours.step()
    assert not torch.equal(ours, w0)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)


def test_muon_fp32_close_to_bf16():
    torch.manual_seed(0)
    g = torch.randn(32, 48)
    o32 = zeropower_via_newtonschulz(g, dtype=torch.float32)
    o16 = zeropower_via_newtonschulz(g, dtype=torch.bfloat16).float()
    assert o32.dtype == torch.float32
    assert (o32 - o16).norm() / o32.norm() < 0.02


@pytest.mark.parametrize("shape", [(64, 32), (32, 64), (48, 48)])
def test_newtonschulz_singular_values_in_band(shape):
    torch.manual_seed(0)
    g = torch.randn(shape) * 3.0
    s = torch.linalg.svdvals(zeropower_via_newtonschulz(g, dtype=torch.float32))
    assert s.min() > 0.5 and s.max() < 1.5, s


def test_muon_3d_equals_per_slice():
    torch.manual_seed(0)
    experts = torch.randn(4, 24, 16)
    stacked = nn.Parameter(experts.clone())
    slices = [nn.Parameter(experts[e].clone()) for e in range(4)]
    kw = dict(lr=0.02, weight_decay=0.1, adjust_lr_fn="match_rms_adamw", ns_dtype=torch.float32)
    opt_stacked, opt_slices = Muon([stacked], **kw), Muon(slices, **kw)
    for _ in range(3):
        g = torch.randn(4, 24, 16)
        stacked.grad = g.clone()
        for e, p in enumerate(slices):
            p.grad = g[e].clone()
        opt_stacked.step()
        opt_slices.step()
    for e, p in enumerate(slices):
        torch.testing.assert_close(stacked[e], p, rtol=0, atol=1e-6)


def test_muon_rejects_vectors():
    with pytest.raises(ValueError, match="2-D or 3-D"):
        Muon([("norm.weight", nn.Parameter(torch.ones(8)))])


# ----------------------------------------------------------------------------------------------
# grouping


class Attn(nn.Module):
    def __init__(self, d, bias):
        super().__init__()
        self.q_proj, self.k_proj = nn.Linear(d, d, bias=bias), nn.Linear(d, d // 2, bias=bias)
        self.v_proj, self.o_proj = nn.Linear(d, d // 2, bias=bias), nn.Linear(d, d, bias=bias)
        self.q_norm, self.k_norm = nn.RMSNorm(4), nn.RMSNorm(4)


class Experts(nn.Module):
    def __init__(self, d, n):
        super().__init__()
        self.up_proj = nn.Parameter(torch.randn(n, 2 * d, d))
        self.gate = nn.Linear(d, 1, bias=False)  # a [1, d] matrix: a vector in disguise
        self.register_buffer("routing_bias", torch.zeros(n))


class FFN(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(d, 2 * d, bias=False), nn.Linear(d, 2 * d, bias=False)
        self.down_proj = nn.Linear(2 * d, d, bias=False)


class Block(nn.Module):
    def __init__(self, d, moe):
        super().__init__()
        self.attn_norm, self.ffn_norm = nn.RMSNorm(d), nn.RMSNorm(d)
        self.attn = Attn(d, bias=True)
        self.ffn = Experts(d, 3) if moe else FFN(d)


class TinyModel(nn.Module):
    def __init__(self, d=8, vocab=32, tied=False):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList([Block(d, moe=False), Block(d, moe=True)])
        self.norm = nn.RMSNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        if tied:
            self.lm_head.weight = self.embed.weight
        self.layers[0].attn.q_norm.weight.requires_grad_(False)  # frozen: must be left out


def _groups(optimizers):
    return {g["name"]: (g["param_names"], g["weight_decay"], g["lr"]) for o in optimizers for g in o.param_groups}


def test_grouping_muon():
    cfg = OptimConfig(name="muon", lr=1e-3, weight_decay=0.1, muon_lr=0.02, muon_weight_decay=0.01)
    opts = build_optimizers(TinyModel(), cfg)
    assert [type(o) for o in opts] == [Muon, torch.optim.AdamW]
    groups = _groups(opts)
    attn = [f"layers.{i}.attn.{m}.weight" for i in (0, 1) for m in ("q_proj", "k_proj", "v_proj", "o_proj")]
    assert sorted(groups["muon"][0]) == sorted(
        attn + [f"layers.0.ffn.{m}.weight" for m in ("gate_proj", "up_proj", "down_proj")] + ["layers.1.ffn.up_proj"]
    )
    assert groups["muon"][1:] == (0.01, 0.02)
    assert groups["adamw_matrices"] == (["embed.weight", "layers.1.ffn.gate.weight", "lm_head.weight"], 0.1, 1e-3)
    no_decay = groups["adamw_no_decay"]
    assert no_decay[1:] == (0.0, 1e-3)
    assert "layers.0.attn.q_norm.weight" not in no_decay[0]  # frozen
    assert sorted(no_decay[0]) == sorted(
        [f"layers.{i}.{n}.weight" for i in (0, 1) for n in ("attn_norm", "ffn_norm")]
        + [f"layers.{i}.attn.{m}.bias" for i in (0, 1) for m in ("q_proj", "k_proj", "v_proj", "o_proj")]
        + ["layers.0.attn.k_norm.weight", "layers.1.attn.q_norm.weight", "layers.1.attn.k_norm.weight", "norm.weight"]
    )
    summary = {row["group"]: row for row in param_groups_summary(opts)}
    assert summary["adamw_matrices"]["params"] == 32 * 8 + 8 + 8 * 32
    assert summary["muon"]["tensors"] == 12
    # no parameter lost or counted twice (frozen one aside)
    model_total = sum(p.numel() for p in TinyModel().parameters()) - 4
    assert sum(row["params"] for row in summary.values()) == model_total


def test_grouping_adamw_and_tied():
    model = TinyModel(tied=True)
    opts = build_optimizers(model, OptimConfig(name="adamw", weight_decay=0.1))
    assert [type(o) for o in opts] == [torch.optim.AdamW]
    groups = _groups(opts)
    assert set(groups) == {"adamw_matrices", "adamw_no_decay"}
    assert "lm_head.weight" not in groups["adamw_matrices"][0]  # tied: appears once, as embed.weight
    assert all(p.ndim >= 2 for g in opts[0].param_groups if g["name"] == "adamw_matrices" for p in g["params"])
    assert all(p.ndim < 2 for g in opts[0].param_groups if g["name"] == "adamw_no_decay" for p in g["params"])
    assert len(groups["adamw_matrices"][0]) == 8 + 3 + 2 + 1


def test_set_lr():
    opts = build_optimizers(TinyModel(), OptimConfig(lr=1e-3, muon_lr=0.02))
    set_lr(opts, 0.5)
    lrs = {g["name"]: g["lr"] for o in opts for g in o.param_groups}
    assert lrs == {"muon": 0.01, "adamw_matrices": 5e-4, "adamw_no_decay": 5e-4}


def test_smallest_singular_ratios():
    model = TinyModel()
    with torch.no_grad():
        model.layers[0].attn.q_proj.weight.copy_(torch.diag(torch.tensor([4.0, 2, 2, 2, 2, 2, 2, 1])))
        model.layers[1].ffn.up_proj[1].zero_()
        model.layers[1].ffn.up_proj[2, :, 0] = 0.0  # expert 2 loses a column: rank-deficient
    ratios = smallest_singular_ratios(build_optimizers(model, OptimConfig()))
    assert ratios["layers.0.attn.q_proj.weight"] == pytest.approx(0.25)
    assert ratios["layers.1.ffn.up_proj[1]"] == 0.0
    assert ratios["layers.1.ffn.up_proj[2]"] < 1e-6
    assert ratios["layers.1.ffn.up_proj[0]"] > 1e-3
    assert "embed.weight" not in ratios and "layers.1.ffn.up_proj" not in ratios
    assert len(ratios) == 11 + 3


# ----------------------------------------------------------------------------------------------
# save / restore


def _train(model, opts, steps, seed):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randint(0, 32, (2, 5), generator=gen)
        h = model.embed(x)
        for block in model.layers:
            a = block.attn
            h = h + a.o_proj(a.q_proj(block.attn_norm(h)) + a.q_norm.weight.sum() + a.k_norm.weight.sum())
            h = h + a.k_proj(h).sum() + a.v_proj(h).sum()
            if isinstance(block.ffn, FFN):
                f = block.ffn
                h = h + f.down_proj(f.gate_proj(block.ffn_norm(h)) * f.up_proj(h))
            else:
                h = h + torch.einsum("btd,eod->bto", h, block.ffn.up_proj).mean(-1, keepdim=True) + block.ffn.gate(h)
        loss = model.lm_head(model.norm(h)).logsumexp(-1).mean()
        loss.backward()
        for o in opts:
            o.step()
            o.zero_grad(set_to_none=True)


def test_state_round_trip_is_exact():
    cfg = OptimConfig(weight_decay=0.1, muon_weight_decay=0.01)
    torch.manual_seed(0)
    model = TinyModel()
    opts = build_optimizers(model, cfg)
    set_lr(opts, 0.7)
    _train(model, opts, 3, seed=1)

    tensors, meta = optimizer_state_tensors(opts)
    assert "layers.0.attn.q_proj.weight/momentum_buffer" in tensors and "embed.weight/exp_avg_sq" in tensors
    blob, meta_text = save(tensors), json.dumps(meta)  # the on-disk forms: safetensors and JSON
    restored = TinyModel()
    restored.load_state_dict(model.state_dict())
    restored_opts = build_optimizers(restored, OptimConfig())  # different hyperparameters: the checkpoint wins
    load_optimizer_state(restored_opts, load(blob), json.loads(meta_text))
    assert [o.param_groups[0]["lr"] for o in restored_opts] == [o.param_groups[0]["lr"] for o in opts]
    assert restored_opts[0].param_groups[0]["ns_coefficients"] == opts[0].param_groups[0]["ns_coefficients"]
    assert restored_opts[1].param_groups[0]["betas"] == opts[1].param_groups[0]["betas"]

    _train(model, opts, 2, seed=2)
    _train(restored, restored_opts, 2, seed=2)
    for (name, a), b in zip(model.named_parameters(), restored.parameters()):
        assert torch.equal(a, b), name


def test_state_load_rejects_other_model():
    tensors, meta = optimizer_state_tensors(build_optimizers(TinyModel(), OptimConfig()))
    with pytest.raises(ValueError, match="checkpoint optimizers"):
        load_optimizer_state(build_optimizers(TinyModel(), OptimConfig(name="adamw")), tensors, meta)
    other = TinyModel()
    other.layers[0].attn.q_norm.weight.requires_grad_(True)
    with pytest.raises(ValueError, match="parameters differ"):
        load_optimizer_state(build_optimizers(other, OptimConfig()), tensors, meta)


# ----------------------------------------------------------------------------------------------
# schedule


def _factors(cfg, total):
    return [lr_factor(s, total, cfg) for s in range(total)]


def test_schedule_warmup_and_constant():
    cfg = ScheduleConfig(name="constant", warmup_steps=4)
    assert _factors(cfg, 8) == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0, 1.0, 1.0]
    assert _factors(ScheduleConfig(name="constant", warmup_steps=0), 3) == [1.0, 1.0, 1.0]


def test_schedule_wsd_linear():
    cfg = ScheduleConfig(name="wsd", warmup_steps=2, decay_fraction=0.4, decay_shape="linear", min_lr_ratio=0.0)
    # 10 steps: warmup 0-1, stable 2-5, decay over the last 4 steps (6-9), ending at 0 on the last step
    assert _factors(cfg, 10) == pytest.approx([0.5, 1, 1, 1, 1, 1, 0.75, 0.5, 0.25, 0.0])
    cfg.min_lr_ratio = 0.1
    assert _factors(cfg, 10)[5:] == pytest.approx([1.0, 0.775, 0.55, 0.325, 0.1])
    assert lr_factor(10, 10, cfg) == pytest.approx(0.1)  # past the end: stays at the floor


def test_schedule_wsd_sqrt():
    cfg = ScheduleConfig(name="wsd", warmup_steps=0, decay_fraction=0.4, decay_shape="sqrt", min_lr_ratio=0.0)
    expected = [1.0] * 6 + [1 - math.sqrt(k / 4) for k in (1, 2, 3, 4)]
    assert _factors(cfg, 10) == pytest.approx(expected)
    assert _factors(cfg, 10)[-1] == 0.0


def test_schedule_cosine():
    cfg = ScheduleConfig(name="cosine", warmup_steps=2, min_lr_ratio=0.1)
    f = _factors(cfg, 6)  # warmup 0-1, cosine over steps 2-5, progress 1/4 .. 4/4
    cos = [0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * k / 4)) for k in (1, 2, 3, 4)]
    assert f == pytest.approx([0.5, 1.0] + cos)
    assert f[-1] == pytest.approx(0.1) and f[3] == pytest.approx(0.55)


def test_schedule_short_run_overlap():
    # warmup longer than the stable part: ramp up, then the decay takes over and still ends at the floor
    cfg = ScheduleConfig(name="wsd", warmup_steps=8, decay_fraction=0.5, min_lr_ratio=0.0)
    f = _factors(cfg, 10)
    assert f[:5] == pytest.approx([(s + 1) / 8 for s in range(5)])
    assert f[5:] == pytest.approx([0.75, 0.6, 0.4, 0.2, 0.0])  # step 5: warmup 6/8 < decay 4/5
    assert _factors(ScheduleConfig(name="wsd", decay_fraction=0.0, warmup_steps=0), 3) == [1.0, 1.0, 1.0]


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
    groups = _groups(opts)
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
    groups = _groups(opts)
    reference = _groups(build_optimizers(TinyModel(), OptimConfig(name="muon")))  # others: adamw
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
    _train(model, opts, 3, seed=1)
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

    _train(model, opts, 2, seed=2)
    _train(restored, restored_opts, 2, seed=2)
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
