import json
import math

import pytest
import torch
from safetensors.torch import load, save
from tiny_models import TinyModel, group_table, train_tiny
from torch import nn

from slmforge.config import OptimConfig, ScheduleConfig
from slmforge.optim import (
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


def test_grouping_muon():
    cfg = OptimConfig(name="muon", lr=1e-3, weight_decay=0.1, muon_lr=0.02, muon_weight_decay=0.01)
    opts = build_optimizers(TinyModel(), cfg)
    assert [type(o) for o in opts] == [Muon, torch.optim.AdamW]
    groups = group_table(opts)
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
    groups = group_table(opts)
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


def test_state_round_trip_is_exact():
    cfg = OptimConfig(weight_decay=0.1, muon_weight_decay=0.01)
    torch.manual_seed(0)
    model = TinyModel()
    opts = build_optimizers(model, cfg)
    set_lr(opts, 0.7)
    train_tiny(model, opts, 3, seed=1)

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

    train_tiny(model, opts, 2, seed=2)
    train_tiny(restored, restored_opts, 2, seed=2)
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
