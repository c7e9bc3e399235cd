"""The sparse seed presets as whole models: parameter counts, MTP loss, optimizer grouping, cache
equivalence, self-speculative decoding and exact resume with routing biases."""

import json

import pytest
import torch
from helpers import crash_then_resume, make_dataset, sentences
from safetensors.torch import load_file

from slmforge.config import load_config
from slmforge.infer import SamplingParams, generate_ids
from slmforge.infer.speculative import speculative_greedy
from slmforge.model import Transformer
from slmforge.model.stats import model_stats
from slmforge.optim import build_optimizers
from slmforge.train import train
from slmforge.train.loss import lm_loss


def test_nekomind_counts():
    stats = model_stats(load_config("nekomind-1.5").model)
    assert stats["total_params"] == 1_354_563_072
    assert stats["active_params_per_token"] == 297_598_464  # the card's 297.6M
    assert stats["mtp_params"] == 0


def test_axion_count():
    assert model_stats(load_config("axion1-350k").model)["total_params"] == 343_616


def test_codemind_counts_and_latent_cache():
    stats = model_stats(load_config("codemind-1b").model)
    d, layers, experts, width = 1024, 16, 16, 1024
    # one key/value head (n_kv_heads=1): the kv up-projection is 512 x (64 + 64), as in CodeMind's code
    attention = (d * 512 + 512 + 512 * 16 * 96 + d * (512 + 32) + 512 + 512 * 1 * 128 + 16 * 64 * d)
    moe = (experts + 1) * 3 * d * width + experts * d
    layer = attention + moe + 2 * d
    residual = stats["total_params"] - (100352 * d + d + layers * layer + stats["mtp_params"])
    mtp = 2 * d + 2 * d * d + layer + d
    assert stats["mtp_params"] == mtp
    assert residual == layers * d  # CodeMind's attention residuals: one query per layer
    assert stats["total_params"] == 1_065_016_320  # counted from CodeMind's own code for this configuration
    assert stats["active_params_per_token"] == 1_065_016_320 - mtp - layers * (experts - 2) * 3 * d * width
    assert stats["active_params_per_token"] == 301_794_304
    # the cache keeps the 512-wide latent and the 32-wide RoPE key; expanded, the one key/value head would
    # take 96 + 64 numbers
    assert stats["kv_bytes_per_token_bf16"] == layers * (512 + 32) * 2
    assert stats["kv_bytes_per_token_expanded_bf16"] == layers * 1 * (96 + 64) * 2


def test_mtp_logits_and_loss():
    torch.manual_seed(0)
    model = Transformer(load_config("codemind-tiny").model).train()
    tokens = torch.randint(0, 512, (2, 16))
    targets = torch.randint(0, 512, (2, 16))
    logits, aux = model(tokens)
    (mtp,) = aux["mtp_logits"]
    assert mtp.shape == (2, 15, 512)
    assert aux["expert_load"].shape == (5, 4)  # 4 layers + the MTP block, 4 experts each
    assert aux["expert_load"].sum(dim=1).tolist() == [2 * 16 * 2] * 4 + [2 * 15 * 2]
    total, parts = lm_loss(logits, targets, aux, z_loss=0.0, mtp_weight=0.3)
    expected_mtp = torch.nn.functional.cross_entropy(mtp.reshape(-1, 512), targets[:, 1:].reshape(-1))
    assert parts["mtp_ce_1"].item() == pytest.approx(expected_mtp.item(), rel=1e-6)
    assert parts["mtp_loss"].item() == pytest.approx(0.3 * expected_mtp.item(), rel=1e-6)
    assert total.item() == pytest.approx(parts["ce_loss"].item() + parts["mtp_loss"].item(), rel=1e-6)
    model.eval()
    assert "mtp_logits" not in model(tokens)[1]  # evaluation and generation skip the MTP modules


@pytest.mark.parametrize("p", [3, 8, 14])
def test_mtp_logits_see_no_later_token(p):
    """MTP depth 1 at position i reads tokens <= i + 1: changing token p moves nothing before p - 1."""
    torch.manual_seed(5)
    model = Transformer(load_config("codemind-tiny", ["model.residual=attnres_full"]).model).train()
    with torch.no_grad():
        for param in model.residual.parameters():
            param.normal_(0.0, 0.5)
    tokens = torch.randint(0, 512, (1, 16))
    changed = tokens.clone()
    changed[0, p] = (changed[0, p] + 1) % 512
    with torch.no_grad():
        (before,), (after,) = model(tokens)[1]["mtp_logits"], model(changed)[1]["mtp_logits"]
    # equal up to float noise: a changed token routes differently, which changes the experts' matmul sizes
    torch.testing.assert_close(before[:, :p - 1], after[:, :p - 1], atol=1e-5, rtol=0)
    assert not torch.allclose(before[:, p - 1], after[:, p - 1])  # position p - 1 reads token p


def test_optimizer_groups_for_sparse_parts():
    model = Transformer(load_config("codemind-tiny").model)
    groups = {g["name"]: set(g["param_names"]) for opt in build_optimizers(model, load_config("codemind-tiny").optim)
              for g in opt.param_groups}
    named = dict(model.named_parameters())
    assert set().union(*groups.values()) == set(named) and sum(map(len, groups.values())) == len(named)
    assert "layers.0.ffn.experts.gate_proj" in groups["muon"]  # 3-D: orthogonalised per expert
    assert "layers.0.attn.kv_b_proj.weight" in groups["muon"] and "mtp.0.proj.weight" in groups["muon"]
    assert "layers.0.ffn.router.weight" in groups["adamw_matrices"]
    assert {n for n in named if n.startswith("residual.")} <= groups["adamw_no_decay"]
    assert "layers.0.ffn.router.balance_bias" not in named  # a buffer, moved by the balancing rule
    assert "layers.0.ffn.router.balance_bias" in model.state_dict()


@pytest.mark.parametrize("preset,overrides", [
    ("codemind-tiny", []), ("axion1-tiny", []), ("nekomind-tiny", []),
    ("codemind-tiny", ["model.residual=attnres_full"]), ("nekomind-tiny", ["model.residual=attnres_block", "model.residual_blocks=2"]),
])
@torch.inference_mode()
def test_cached_decoding_equals_recomputation(preset, overrides):
    torch.manual_seed(1)
    model = Transformer(load_config(preset, overrides).model).eval()
    with torch.no_grad():  # attention-residual queries away from their zero init, so they matter
        for p in model.residual.parameters():
            p.normal_(0.0, 0.5)
    tokens = torch.randint(0, 512, (2, 24))
    full, _ = model(tokens)
    cache = model.new_cache(2, 24)
    parts = [model(tokens[:, :10], cache=cache)[0]]
    parts += [model(tokens[:, t:t + 1], cache=cache)[0] for t in range(10, 24)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-4, rtol=0)


@pytest.mark.parametrize("preset,overrides", [("codemind-tiny", []), ("tiny", ["model.mtp_depth=1"]),
                                              ("axion1-tiny", ["model.mtp_depth=1"])])
def test_speculative_equals_plain_greedy(preset, overrides):
    torch.manual_seed(2)
    model = Transformer(load_config(preset, overrides).model).eval()
    prompt = torch.randint(0, 512, (7,)).tolist()
    params = SamplingParams(max_new_tokens=30, temperature=0.0)
    plain = generate_ids(model, [prompt], params)[0].token_ids
    spec = speculative_greedy(model, prompt, 30)
    assert spec.token_ids == plain and spec.drafted > 0

    # A drafter that always knows the answer: every draft is accepted, two tokens per decoder forward.
    real_draft = model.draft

    def oracle(hidden, following, cache, positions=None):
        logits, h = real_draft(hidden, following, cache, positions)
        index = int(cache.lengths[0]) - len(prompt) + 1  # where the drafted token lands in the output
        logits[0, -1] = -1e9
        logits[0, -1, plain[index] if index < len(plain) else 0] = 1e9
        return logits, h

    model.draft = oracle
    spec = speculative_greedy(model, prompt, 30)
    assert spec.token_ids == plain
    # 1 token from the prompt's forward, 14 accepted pairs, then room for a single token
    assert (spec.accepted, spec.drafted) == (14, 15)  # 15 decoder forwards


@pytest.fixture(scope="module")
def byte_data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("sparse-data"), sentences())


def test_moe_mtp_resume_is_exact_and_biases_move(tmp_path, byte_data, monkeypatch):
    overrides = [f"data.path={byte_data}", "train.steps=6", "train.save_every=3", "train.eval_every=3"]
    cfg = load_config("codemind-tiny", overrides)
    train(cfg, tmp_path / "a")
    crash_then_resume(cfg, tmp_path / "b", lambda phase, step: step == 4, monkeypatch)

    lines = {run: [json.loads(x) for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
             for run in "ab"}
    steps = [line for line in lines["a"] if "loss" in line]
    assert len(steps) == 6 and all("mtp_loss" in s and "moe_load_cv" in s for s in steps)
    assert all(s["moe_dropped_tokens"] == 0 for s in steps)
    assert len(steps[0]["moe_load"]) == 5 and sum(steps[0]["moe_load"][0]) == pytest.approx(1.0, abs=1e-3)
    for a, b in zip(lines["a"], lines["b"]):
        for key in ("loss", "mtp_loss", "balance_loss", "val_loss", "moe_load_cv"):
            if key in a:
                assert b[key] == pytest.approx(a[key], abs=1e-6), (key, a, b)
    final_a = load_file(tmp_path / "a" / "main" / "step_6" / "model.safetensors")
    final_b = load_file(tmp_path / "b" / "main" / "step_6" / "model.safetensors")
    assert final_a.keys() == final_b.keys()
    for name, tensor in final_a.items():
        torch.testing.assert_close(final_b[name], tensor, atol=1e-6, rtol=0)
    bias = final_a["layers.0.ffn.router.balance_bias"]
    # six updates of +-0.001 each: the bias moved, by a multiple of the rate
    assert bias.abs().max().item() > 0 and torch.allclose(bias * 1000, (bias * 1000).round(), atol=1e-3)


def test_cli_info_and_speculative_sample(tmp_path, byte_data, capsys):
    from slmforge.cli import main

    assert main(["info"]) == 0
    table = capsys.readouterr().out
    assert "nekomind-1.5   1,354,563,072   297,598,464" in table
    assert main(["info", "codemind-1b"]) == 0
    assert "as per-head keys and values" in capsys.readouterr().out  # the latent cache beside the expanded one
    train(load_config("codemind-tiny", [f"data.path={byte_data}", "train.steps=2"]), tmp_path / "run")
    capsys.readouterr()
    assert main(["sample", str(tmp_path / "run"), "--prompt", "the quick", "--greedy", "--speculative",
                 "--max-new-tokens", "12"]) == 0
    out = capsys.readouterr().out
    assert "identical to plain greedy" in out and "drafts accepted" in out
    assert main(["sample", str(tmp_path / "run"), "--prompt", "a", "--speculative"]) == 2  # not greedy
    assert "--speculative decodes greedily" in capsys.readouterr().err
