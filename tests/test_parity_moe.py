"""The sparse parts against transformers' reference models: the same weights loaded into both give the
same logits. DeepseekV3ForCausalLM covers MLA (query latent, latent norms, decoupled RoPE key), sigmoid
routing with `e_score_correction_bias`, a shared expert and first-k dense layers; Qwen2MoeForCausalLM
covers softmax top-k routing and the sigmoid-gated shared expert. The name tables are the package's own
(slmforge/export/names.py), which the exporter and importer use."""

import pytest
import torch
from safetensors.torch import save_file

from slmforge.config import MLAConfig, ModelConfig, MoEConfig, validate_model
from slmforge.export.names import from_hf, to_hf
from slmforge.model import Transformer

transformers = pytest.importorskip(
    "transformers", reason="transformers is not installed (pip install -e '.[test]'): no HF parity check")

COMMON = dict(vocab_size=256, d_model=64, n_layers=3, n_heads=4, d_ff=96, max_seq_len=64, norm_eps=1e-6,
              rope_base=10000.0, tie_embeddings=False, attention_pattern=["global"])


def _random(cfg: ModelConfig, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(cfg).eval()
    with torch.no_grad():  # non-trivial norms and biases, so a swapped or missing part shows
        for name, p in model.named_parameters():
            p.uniform_(0.5, 1.5) if name.endswith("norm.weight") else p.normal_(0.0, 0.1)
        for moe in model.moe_layers():
            moe.router.balance_bias.normal_(0.0, 0.2)
    return model


def _load_into(hf_cfg, tensors: dict[str, torch.Tensor], folder):
    """transformers' model of `hf_cfg` loaded from a checkpoint folder holding `tensors` (HF's on-disk
    names, per-expert matrices), with every parameter and buffer of the model covered."""
    hf_cfg.save_pretrained(folder)
    save_file({k: v.contiguous() for k, v in tensors.items()}, folder / "model.safetensors")
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
    assert not any(info.values()), info  # nothing missing, unexpected or mismatched
    return hf.eval()


def assert_round_trip(model: Transformer, family: str) -> None:
    """Our names -> transformers' -> ours gives every tensor back (ours-only weights aside)."""
    state = model.state_dict()
    back = from_hf(to_hf(state, family), family)
    assert set(back) == {k for k in state if not k.endswith("balance_bias") or family != "qwen2_moe"}
    for name, tensor in back.items():
        assert torch.equal(tensor, state[name]), name


def test_deepseek_v3_parity(tmp_path):
    cfg = ModelConfig(**COMMON, rope_layout="pairs", attention="mla",
                      mla=MLAConfig(q_lora_rank=24, kv_lora_rank=16, qk_head_dim=16, rope_head_dim=8, v_head_dim=12),
                      ffn="moe", moe=MoEConfig(n_experts=6, top_k=2, expert_d_ff=32, shared_d_ff=32, score="sigmoid",
                                              norm_topk=True, route_scale=2.5, first_dense_layers=1))
    validate_model(cfg)
    model = _random(cfg)
    hf_cfg = transformers.DeepseekV3Config(
        vocab_size=256, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1, n_routed_experts=6, routed_scaling_factor=2.5,
        kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8, v_head_dim=12, qk_nope_head_dim=16, n_group=1,
        topk_group=1, num_experts_per_tok=2, first_k_dense_replace=1, norm_topk_prob=True, max_position_embeddings=64,
        rms_norm_eps=1e-6, tie_word_embeddings=False, rope_interleave=True, attention_bias=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0})

    hf = _load_into(hf_cfg, to_hf(model.state_dict(), "deepseek_v3"), tmp_path)
    assert type(hf).__name__ == "DeepseekV3ForCausalLM"
    assert_round_trip(model, "deepseek_v3")
    tokens = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours = model(tokens)[0]
        theirs = hf(tokens).logits
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


def test_qwen2_moe_parity(tmp_path):
    cfg = ModelConfig(**COMMON, n_kv_heads=2, head_dim=16, rope_layout="half", ffn="moe",
                      moe=MoEConfig(n_experts=8, top_k=3, expert_d_ff=32, shared_d_ff=48, shared_gate=True,
                                    score="softmax", norm_topk=False, first_dense_layers=1, bias_update_rate=0.0))
    validate_model(cfg)
    model = _random(cfg)
    with torch.no_grad():
        for moe in model.moe_layers():  # Qwen2-MoE has no balancing bias
            moe.router.balance_bias.zero_()
    hf_cfg = transformers.Qwen2MoeConfig(
        vocab_size=256, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
        shared_expert_intermediate_size=48, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
        num_experts=8, num_experts_per_tok=3, norm_topk_prob=False, decoder_sparse_step=1, mlp_only_layers=[0],
        max_position_embeddings=64, rms_norm_eps=1e-6, tie_word_embeddings=False, qkv_bias=False,
        use_sliding_window=False, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})

    hf = _load_into(hf_cfg, to_hf(model.state_dict(), "qwen2_moe"), tmp_path)
    assert hf.model.layers[0].self_attn.q_proj.bias is None
    assert_round_trip(model, "qwen2_moe")
    tokens = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ours = model(tokens)[0]
        theirs = hf(tokens).logits
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)
