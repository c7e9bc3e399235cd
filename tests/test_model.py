import pytest
import torch

from slmforge.config import load_config
from slmforge.model import Transformer
from slmforge.model.stats import model_stats


def test_shard_40m_has_exactly_the_cards_parameter_count():
    stats = model_stats(load_config("shard-40m").model)
    assert stats["total_params"] == 54_538_752 == 8192 * 512 + 12 * (4 * 512**2 + 3 * 512 * 2048 + 2 * 512) + 512
    assert stats["weights_bytes_bf16"] == 2 * 54_538_752


def test_stats_figures_for_shard():
    stats = model_stats(load_config("shard-40m").model, context=8192)
    assert stats["kv_bytes_per_token_bf16"] == 2 * 8 * 64 * 12 * 2
    # 6 global layers hold 8192 positions, 6 sliding layers a window of 1024.
    assert stats["kv_cache_bytes_full_context_bf16"] == (6 * 8192 + 6 * 1024) * 2 * 8 * 64 * 2
    matmul = 54_538_752  # tied head counts as a matmul, the embedding lookup does not
    attention = 4 * 8 * 64 * (6 * 8192 + 6 * 1024)
    assert stats["forward_flops_per_token"] == 2 * matmul + attention


def test_untied_head_adds_parameters_and_bias_option():
    tied = model_stats(load_config("tiny").model)["total_params"]
    untied = model_stats(load_config("tiny", ["model.tie_embeddings=false"]).model)["total_params"]
    assert untied - tied == 512 * 64
    names = {n for n, _ in Transformer(load_config("tiny", ["model.bias=true"]).model).named_parameters()}
    assert "layers.0.attn.q_proj.bias" in names and "layers.1.ffn.down_proj.bias" in names


def test_parameter_names_are_readable():
    model = Transformer(load_config("tiny", ["model.qk_norm=true"]).model)
    names = set(model.state_dict())
    for expected in ["embed.weight", "norm.weight", "layers.0.attn_norm.weight", "layers.0.ffn_norm.weight",
                     "layers.1.attn.q_proj.weight", "layers.1.attn.k_norm.weight", "layers.1.ffn.up_proj.weight"]:
        assert expected in names
    assert not any("rope" in n or "lm_head" in n for n in names)


def test_final_logit_softcap_bounds_logits():
    cfg = load_config("tiny", ["model.final_logit_softcap=5.0"])
    model = Transformer(cfg.model).eval()
    with torch.no_grad():
        model.embed.weight.mul_(300.0)
        logits, _ = model(torch.randint(0, 512, (2, 16)))
    assert logits.abs().max() <= 5.0 + 1e-5
    assert logits.abs().max() > 4.9  # the cap is reached, so the bound is what limits it


def test_attention_softcap_bounds_and_limits_to_plain_attention():
    torch.manual_seed(0)
    tokens = torch.randint(0, 512, (2, 24))
    plain = Transformer(load_config("tiny", ["model.attn_logit_softcap=null"]).model).eval()
    huge = Transformer(load_config("tiny", ["model.attn_logit_softcap=1.0e6"]).model).eval()
    small = Transformer(load_config("tiny", ["model.attn_logit_softcap=0.01"]).model).eval()
    huge.load_state_dict(plain.state_dict())
    small.load_state_dict(plain.state_dict())
    with torch.no_grad():
        a, b, c = plain(tokens)[0], huge(tokens)[0], small(tokens)[0]
    assert torch.allclose(a, b, atol=1e-5)  # a cap far above every logit changes nothing
    assert (a - c).abs().max() > 1e-3  # a tight cap does


@pytest.mark.parametrize("n_kv_heads", [4, 2, 1])
def test_mha_gqa_mqa_shapes(n_kv_heads):
    model = Transformer(load_config("tiny", [f"model.n_kv_heads={n_kv_heads}"]).model)
    assert model.layers[0].attn.k_proj.weight.shape == (n_kv_heads * 16, 64)
    logits, aux = model(torch.randint(0, 512, (3, 10)))
    assert logits.shape == (3, 10, 512) and aux == {}


def test_causality():
    model = Transformer(load_config("tiny").model).eval()
    tokens = torch.randint(0, 512, (1, 32))
    changed = tokens.clone()
    changed[0, 20] = (changed[0, 20] + 1) % 512
    with torch.no_grad():
        a, b = model(tokens)[0], model(changed)[0]
    assert torch.equal(a[:, :20], b[:, :20])
    assert (a[:, 20:] - b[:, 20:]).abs().max() > 1e-4


def test_too_long_sequence_is_a_clear_error():
    model = Transformer(load_config("tiny").model)
    with pytest.raises(ValueError, match="max_seq_len=128"):
        model(torch.zeros(1, 129, dtype=torch.long))
