"""slmforge's Transformer against Hugging Face's LlamaForCausalLM, and the two RoPE layouts against each other.

The HF tests pin that a global-attention slmforge model with rope_layout "half" *is* a Llama: the same
weights (mapped by name) give the same logits. The "pairs" test pins what the other layout means, which
is what exporters (GGUF & co.) depend on: a "pairs" model equals a "half" model whose q/k weight rows are
permuted with llama.cpp's `permute` (the one `convert_hf_to_gguf.py` applies to HF Llama weights).
"""

import pytest
import torch

from slmforge.config import ModelConfig, validate_model
from slmforge.export.names import from_hf, gguf_permute, gguf_unpermute, relayout_qk, to_hf
from slmforge.model import Transformer


def _cfg(**over) -> ModelConfig:
    base = dict(vocab_size=256, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, d_ff=96,
                max_seq_len=64, norm_eps=1e-5, rope_base=5000.0, rope_layout="half", qk_norm=False,
                tie_embeddings=True, attention_pattern=["global"], final_logit_softcap=None,
                attn_logit_softcap=None)
    base.update(over)
    cfg = ModelConfig(**base)
    validate_model(cfg)
    return cfg


def _random_model(cfg: ModelConfig, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(cfg).eval()
    with torch.no_grad():  # non-trivial norm weights, so a swapped or missing norm shows
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 0.08)
    return model


def _hf_llama(cfg: ModelConfig, model: Transformer):
    transformers = pytest.importorskip(
        "transformers", reason="transformers is not installed (pip install -e '.[test]'): no HF parity check")
    hf_cfg = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.d_ff,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
        head_dim=cfg.head_dim, max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_base},
        tie_word_embeddings=cfg.tie_embeddings, attention_bias=False, mlp_bias=False, hidden_act="silu")
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    # Both spellings of the rope base, for transformers 4.x (rope_theta) and 5.x (rope_parameters).
    rope_theta = (getattr(hf.config, "rope_parameters", None) or {}).get("rope_theta",
                                                                         getattr(hf.config, "rope_theta", None))
    assert rope_theta == cfg.rope_base and hf.config.head_dim == cfg.head_dim
    hf_params = dict(hf.named_parameters(remove_duplicate=False))
    copied = set()
    with torch.no_grad():
        for name, p in to_hf(model.state_dict(), "llama").items():
            target = hf_params[name]
            assert target.shape == p.shape, name
            target.copy_(p)
            copied.add(name)
    if cfg.tie_embeddings:
        assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
        copied.add("lm_head.weight")
    assert copied == set(hf_params), set(hf_params) ^ copied
    back = from_hf(to_hf(model.state_dict(), "llama"), "llama")  # the table read both ways
    assert back.keys() == model.state_dict().keys()
    return hf


@pytest.mark.parametrize("over", [
    {},  # GQA 4 q heads / 2 kv heads, tied embeddings
    {"tie_embeddings": False},
    {"n_kv_heads": 4, "head_dim": None, "tie_embeddings": False},  # MHA, head_dim = d_model / n_heads
    {"n_kv_heads": 1, "head_dim": 32},  # MQA, head_dim * n_heads != d_model
], ids=["gqa-tied", "gqa-untied", "mha-untied", "mqa-wide-heads"])
def test_logits_match_llama(over):
    cfg = _cfg(**over)
    model = _random_model(cfg)
    hf = _hf_llama(cfg, model)
    torch.manual_seed(1)
    tokens = torch.randint(0, cfg.vocab_size, (2, 48))
    with torch.no_grad():
        ours, _ = model(tokens)
        theirs = hf(input_ids=tokens, use_cache=False).logits
    assert ours.shape == theirs.shape
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


def test_cached_decode_matches_llama_generate():
    """Greedy continuation with our KV cache equals HF's greedy generate (same weights)."""
    cfg = _cfg()
    model = _random_model(cfg)
    hf = _hf_llama(cfg, model)
    prompt = torch.randint(0, cfg.vocab_size, (1, 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        theirs = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=20,
                             min_new_tokens=20, do_sample=False, use_cache=True, pad_token_id=0)[0, 7:].tolist()
        cache = model.new_cache(1, 27)
        logits, _ = model(prompt, cache=cache, last_only=True)
        ours = []
        for _ in range(20):
            ours.append(int(logits[0, -1].argmax()))
            logits, _ = model(torch.tensor([[ours[-1]]]), cache=cache, last_only=True)
    assert ours == theirs


def _half_to_pairs_state(model: Transformer, cfg: ModelConfig, permute) -> dict:
    """The package's own relayout (the one the exporters apply), as the tests prove it."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    return relayout_qk(state, cfg.n_heads, cfg.n_kv_heads, permute)


@pytest.mark.parametrize("qk_norm", [False, True])
def test_pairs_layout_is_gguf_permuted_half(qk_norm):
    half_cfg = _cfg(qk_norm=qk_norm, attention_pattern=["sliding", "global"], sliding_window=8,
                    attn_logit_softcap=50.0, final_logit_softcap=30.0)
    pairs_cfg = _cfg(qk_norm=qk_norm, attention_pattern=["sliding", "global"], sliding_window=8,
                     attn_logit_softcap=50.0, final_logit_softcap=30.0, rope_layout="pairs")
    half = _random_model(half_cfg)
    torch.manual_seed(3)
    tokens = torch.randint(0, half_cfg.vocab_size, (2, 40))
    with torch.no_grad():
        ref, _ = half(tokens)
        pairs = Transformer(pairs_cfg).eval()
        pairs.load_state_dict(_half_to_pairs_state(half, half_cfg, gguf_permute))
        out, _ = pairs(tokens)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
        # The direction matters: the inverse permutation gives a different model.
        pairs.load_state_dict(_half_to_pairs_state(half, half_cfg, gguf_unpermute))
        wrong, _ = pairs(tokens)
        assert (wrong - ref).abs().max() > 1e-2
    # and the two are inverses of each other
    w = torch.randn(4 * 16, 8)
    assert torch.equal(gguf_unpermute(gguf_permute(w, 4), 4), w)
