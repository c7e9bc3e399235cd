"""Multi-head latent attention: cached decoding (absorbed and expanded) reproduces the full forward, the
cache holds only the latents, sliding windows and left padding behave as in GQA, and the Axion1 layer has
the card's parameter count."""

import copy

import pytest
import torch

from slmforge.config import MLAConfig, ModelConfig, validate_model
from slmforge.infer.kernels import prepare_for_decoding
from slmforge.model.cache import KVCache
from slmforge.model.mla import MLAttention
from slmforge.model.rope import RotaryEmbedding

B, T, MARGIN = 2, 16, 2
VARIANTS = {
    "decoupled": {"q_lora_rank": 12},
    "decoupled_no_q_lora_no_norm": {"q_lora_rank": 0, "latent_norm": False},
    "decoupled_bias_half": {"q_lora_rank": 12, "bias": True, "rope_layout": "half"},
    "decoupled_one_kv_head_bias": {"q_lora_rank": 12, "bias": True, "n_kv_heads": 1},  # CodeMind's form
    "decoupled_two_kv_heads": {"q_lora_rank": 0, "n_kv_heads": 2},
    "whole_head": {"q_lora_rank": 12, "rope_mode": "whole_head", "rope_head_dim": 0, "latent_norm": False},
    "whole_head_two_kv_heads": {"q_lora_rank": 12, "rope_mode": "whole_head", "rope_head_dim": 0,
                                "latent_norm": False, "n_kv_heads": 2},
    "whole_head_no_q_lora": {"q_lora_rank": 0, "rope_mode": "whole_head", "rope_head_dim": 0, "latent_norm": False},
}
DECOUPLED = [v for v in VARIANTS if v.startswith("decoupled")]


def make(variant: str, window: int | None = None, seed: int = 0):
    """(layer, rotary tables) for a tiny MLA layer; v_head_dim differs from the qk dims on purpose."""
    options = dict(VARIANTS[variant])
    model_keys = {k: options.pop(k) for k in ("bias", "rope_layout", "n_kv_heads") if k in options}
    mla = MLAConfig(**{"kv_lora_rank": 10, "qk_head_dim": 8, "rope_head_dim": 4, "v_head_dim": 6, **options})
    cfg = ModelConfig(vocab_size=32, d_model=32, n_layers=1, n_heads=4, d_ff=64, max_seq_len=64,
                      attention="mla", mla=mla, **{"rope_layout": "pairs", **model_keys})
    validate_model(cfg)
    torch.manual_seed(seed)
    attn = MLAttention(cfg, window).eval()
    if cfg.bias:
        with torch.no_grad():
            for name, p in attn.named_parameters():
                if name.endswith("bias"):
                    p.normal_(0.0, 0.5)
    return attn, RotaryEmbedding(cfg.rope_dim(), cfg.max_seq_len, cfg.rope_base, cfg.rope_layout)


def inputs(batch: int = B, length: int = T, seed: int = 1) -> torch.Tensor:
    return 2.0 * torch.randn(batch, length, 32, generator=torch.Generator().manual_seed(seed))


def full(attn, rot, x):
    return attn(x, rot.full_tables(None, x.shape[1]), masks={})


def decode(attn, rot, x, chunks, window=None, positions=None):
    """Outputs for x [B, T, d] through a cache, fed in pieces of the sizes in `chunks`; `positions` of the
    first piece may be given (padding)."""
    cache = KVCache([(window, attn.cache_shapes())], x.shape[0], x.shape[1], rollback_margin=MARGIN)
    outs, start = [], 0
    for i, n in enumerate(chunks):
        pos = positions if i == 0 and positions is not None else cache.next_positions(n)
        cache.begin(pos)
        outs.append(attn(x[:, start:start + n], rot.full_tables(pos, n), kv=cache.layers[0], masks={}))
        start += n
    assert start == x.shape[1]
    return torch.cat(outs, dim=1), cache


SCHEDULES = {"prefill+singles": [5] + [1] * 11, "prefill+chunks3": [4, 3, 3, 3, 3], "singles": [1] * 16}


@pytest.mark.parametrize("variant", VARIANTS)
@torch.inference_mode()
def test_cached_decoding_matches_full_forward(variant):
    attn, rot = make(variant)
    x = inputs()
    reference = full(attn, rot, x)
    for name, chunks in SCHEDULES.items():
        for decoding in (False, True):  # True: the fused input projection and split matmuls of decoding
            module = prepare_for_decoding(copy.deepcopy(attn)) if decoding else attn
            cached, _ = decode(module, rot, x, chunks)
            torch.testing.assert_close(cached, reference, atol=1e-4, rtol=0, msg=f"{name} decoding={decoding}")


@pytest.mark.parametrize("variant", DECOUPLED)
@torch.inference_mode()
def test_absorbed_decoding_matches_expanded_and_never_expands_keys(variant):
    attn, rot = make(variant)
    x = inputs()
    expansions = []
    attn.kv_b_proj.register_forward_hook(lambda *args: expansions.append(1))
    for chunks in SCHEDULES.values():
        attn.absorb = True
        absorbed, _ = decode(attn, rot, x, chunks)
        assert not expansions, "the absorbed path must not up-project the cached latents"
        attn.absorb = False
        expanded, _ = decode(attn, rot, x, chunks)
        assert expansions
        expansions.clear()
        torch.testing.assert_close(absorbed, expanded, atol=1e-4, rtol=0)


@pytest.mark.parametrize("variant", ["decoupled", "whole_head"])
@torch.inference_mode()
def test_cache_stores_only_the_latents(variant):
    attn, rot = make(variant)
    x = inputs()
    _, cache = decode(attn, rot, x, [5, 1, 10])
    r, dr = attn.kv_rank, attn.rope_dim
    layer = cache.layers[0]
    capacity = layer.capacity + 1  # + the scratch slot
    expected = [(B, 1, capacity, r)] + ([(B, 1, capacity, dr)] if variant == "decoupled" else [])
    assert [tuple(s.shape) for s in layer.stores] == expected
    assert cache.nbytes() == B * capacity * (r + dr) * 4
    # The latent store holds the (normalised) kv latent, nothing per head.
    c_kv = attn.kv_a_proj(x)[..., :r]
    if attn.kv_a_norm is not None:
        c_kv = attn.kv_a_norm(c_kv)
    torch.testing.assert_close(layer.stores[0][:, 0, :T], c_kv)


@pytest.mark.parametrize("variant", ["decoupled", "whole_head"])
@torch.inference_mode()
def test_sliding_window(variant):
    window = 4
    attn, rot = make(variant, window=window)
    x = inputs()
    reference = full(attn, rot, x)
    changed = x.clone()
    changed[:, 0] += 5.0
    out = full(attn, rot, changed)
    # Query i sees keys i - W < j <= i: token 0 reaches positions 0..W-1 only.
    torch.testing.assert_close(out[:, window:], reference[:, window:], atol=1e-6, rtol=0)
    assert (out[:, window - 1] - reference[:, window - 1]).abs().max() > 1e-3
    # Decoding through the ring of W + margin slots (wrapping several times) gives the windowed forward;
    # the 8-token prefill is longer than margin + 1 and takes the cache's copy path.
    for chunks in ([1] * 16, [8, 3, 3, 1, 1]):
        cached, _ = decode(attn, rot, x, chunks, window=window)
        torch.testing.assert_close(cached, reference, atol=1e-4, rtol=0, msg=str(chunks))


@pytest.mark.parametrize("variant", ["decoupled", "whole_head"])
@pytest.mark.parametrize("absorb", [True, False])
@torch.inference_mode()
def test_left_padding_matches_each_sequence_alone(variant, absorb):
    attn, rot = make(variant)
    attn.absorb = absorb
    long, short = inputs(1, 9, seed=2), inputs(1, 6, seed=3)
    pad = 3
    x = torch.cat((long, torch.cat((inputs(1, pad, seed=4), short), dim=1)))  # garbage in the padding
    positions = torch.tensor([list(range(7)), [-1] * pad + list(range(4))])
    out, _ = decode(attn, rot, x, [7, 1, 1], positions=positions)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[:1], full(attn, rot, long), atol=1e-4, rtol=0)
    torch.testing.assert_close(out[1:, pad:], full(attn, rot, short), atol=1e-4, rtol=0)


def test_axion_layer_parameters_and_names():
    mla = MLAConfig(q_lora_rank=16, kv_lora_rank=8, qk_head_dim=16, rope_head_dim=0, v_head_dim=16,
                    latent_norm=False, rope_mode="whole_head")
    cfg = ModelConfig(vocab_size=1024, d_model=64, n_layers=4, n_heads=4, d_ff=64, max_seq_len=512,
                      attention="mla", mla=mla)
    validate_model(cfg)
    attn = MLAttention(cfg, None)
    assert sum(p.numel() for p in attn.parameters()) == 1024 + 1024 + 512 + 1024 + 4096 == 7680
    # The whole-head key RoPE tables are buffers that are not saved.
    assert set(attn.state_dict()) == {f"{n}.weight" for n in ("q_a_proj", "q_b_proj", "kv_a_proj", "kv_b_proj",
                                                                "o_proj")}
    assert attn.cache_shapes() == [(1, 8)]


def test_deepseek_layout_and_gradients():
    attn, rot = make("decoupled")
    H, r = 4, 10
    shapes = {name: tuple(p.shape) for name, p in attn.named_parameters()}
    assert shapes == {  # DeepseekV3Attention's shapes, names mapped 1:1
        "q_a_proj.weight": (12, 32), "q_a_norm.weight": (12,), "q_b_proj.weight": (H * (8 + 4), 12),
        "kv_a_proj.weight": (r + 4, 32), "kv_a_norm.weight": (r,), "kv_b_proj.weight": (H * (8 + 6), r),
        "o_proj.weight": (32, H * 6),
    }
    assert attn.cache_shapes() == [(1, r), (1, 4)]
    full(attn, rot, inputs()).square().mean().backward()
    for name, p in attn.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_shared_kv_heads_equal_repeated_full_heads():
    """A layer with 2 key/value heads computes what a layer with one per query head computes when each of its
    heads repeats the shared head of its group (the meaning of n_kv_heads)."""
    shared, tables = make("decoupled_two_kv_heads")
    full_cfg = ModelConfig(vocab_size=32, d_model=32, n_layers=1, n_heads=4, d_ff=64, max_seq_len=64, attention="mla",
                           mla=MLAConfig(q_lora_rank=0, kv_lora_rank=10, qk_head_dim=8, rope_head_dim=4, v_head_dim=6),
                           rope_layout="pairs")
    validate_model(full_cfg)
    full = MLAttention(full_cfg, None).eval()
    state = shared.state_dict()
    w = state["kv_b_proj.weight"].view(2, 8 + 6, 10)
    state["kv_b_proj.weight"] = w.repeat_interleave(2, dim=0).reshape(4 * 14, 10)
    full.load_state_dict(state)
    x = torch.randn(B, T, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(shared(x, tables.full_tables(None, T)), full(x, tables.full_tables(None, T)),
                                   atol=1e-5, rtol=0)
