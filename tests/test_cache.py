"""KV-cache decoding must reproduce the full forward: token by token, in chunks, after rollback, in
left-padded batches and across sliding-window ring wrap-around."""

import pytest
import torch

from slmforge.config import load_config
from slmforge.model import Transformer

WINDOW = 8
MARGIN = 4  # small, so a 40-token sequence wraps the W + margin = 12-slot ring several times
# init_std 0.1 makes attention peaked and logits spread out, so cache mistakes cannot hide in averages.
BASE = [f"model.sliding_window={WINDOW}", "model.init_std=0.1"]
VARIANTS = {
    "sliding+global": [],
    "attn_softcap": ["model.attn_logit_softcap=5.0"],
    "pairs+qk_norm": ["model.rope_layout=pairs", "model.qk_norm=true"],
    "gqa": ["model.n_kv_heads=2"],
    "mqa": ["model.n_kv_heads=1"],
    "mha_untied_bias": ["model.n_kv_heads=4", "model.tie_embeddings=false", "model.bias=true"],
}



def left_pad(prompt_ids: list[list[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
    """tokens [B, T] and positions [B, T] (-1 on the padding) of prompts aligned on their last token."""
    width = max(len(ids) for ids in prompt_ids)
    tokens = torch.zeros(len(prompt_ids), width, dtype=torch.long)
    positions = torch.full((len(prompt_ids), width), -1, dtype=torch.long)
    for row, ids in enumerate(prompt_ids):
        tokens[row, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
        positions[row, width - len(ids):] = torch.arange(len(ids))
    return tokens.to(device), positions.to(device)

def make_model(overrides: list[str], seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(load_config("tiny", BASE + overrides).model).eval()


def full_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    return model(tokens)[0]


def decode_in_chunks(model, tokens: torch.Tensor, prefill: int, chunk: int) -> torch.Tensor:
    """Logits for every position of `tokens` [B, T], computed with a cache: `prefill` tokens, then chunks."""
    cache = model.new_cache(tokens.shape[0], tokens.shape[1], rollback_margin=MARGIN)
    pieces = [model(tokens[:, :prefill], cache=cache)[0]]
    for start in range(prefill, tokens.shape[1], chunk):
        pieces.append(model(tokens[:, start:start + chunk], cache=cache)[0])
    return torch.cat(pieces, dim=1)


@pytest.mark.parametrize("variant", VARIANTS)
@torch.inference_mode()
def test_cached_decoding_matches_full_forward(variant):
    model = make_model(VARIANTS[variant])
    tokens = torch.randint(0, model.cfg.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    reference = full_logits(model, tokens)
    # prefill 20 > margin + 1 takes the ring's copy path; then 1 token and MARGIN + 1 tokens write in place
    for prefill, chunk in ((5, 1), (5, 3), (20, 1), (1, MARGIN + 1)):
        cached = decode_in_chunks(model, tokens, prefill, chunk)
        torch.testing.assert_close(cached, reference, atol=1e-4, rtol=0, msg=f"prefill={prefill} chunk={chunk}")
        assert torch.equal(cached.argmax(-1), reference.argmax(-1))


@pytest.mark.parametrize("variant", ["sliding+global", "gqa", "mqa"])
@torch.inference_mode()
def test_rollback_equals_recomputation(variant):
    model = make_model(VARIANTS[variant])
    gen = torch.Generator().manual_seed(2)
    prefix = torch.randint(0, model.cfg.vocab_size, (2, 30), generator=gen)
    rejected = torch.randint(0, model.cfg.vocab_size, (2, MARGIN), generator=gen)
    accepted = torch.randint(0, model.cfg.vocab_size, (2, 6), generator=gen)
    cache = model.new_cache(2, 40, rollback_margin=MARGIN)
    model(prefix, cache=cache)
    model(rejected, cache=cache)
    cache.truncate([30, 30])
    cached = model(accepted, cache=cache)[0]
    reference = full_logits(model, torch.cat((prefix, accepted), dim=1))[:, 30:]
    torch.testing.assert_close(cached, reference, atol=1e-4, rtol=0)
    # Different rollbacks per sequence: keep 2 of the rejected tokens in row 0, none in row 1.
    cache = model.new_cache(2, 40, rollback_margin=MARGIN)
    model(torch.cat((prefix, rejected), dim=1), cache=cache)
    cache.truncate([32, 30])
    next_tokens = accepted[:, :1]
    cached = model(next_tokens, cache=cache)[0][:, -1]
    row0 = full_logits(model, torch.cat((prefix[:1], rejected[:1, :2], next_tokens[:1]), dim=1))[:, -1]
    row1 = full_logits(model, torch.cat((prefix[1:], next_tokens[1:]), dim=1))[:, -1]
    torch.testing.assert_close(cached, torch.cat((row0, row1)), atol=1e-4, rtol=0)


def test_rollback_beyond_the_ring_margin_is_refused():
    model = make_model([])
    cache = model.new_cache(1, 40, rollback_margin=MARGIN)
    with torch.inference_mode():
        model(torch.zeros(1, 20, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="roll back"):
        cache.truncate([20 - MARGIN - 1])


@pytest.mark.parametrize("variant", ["sliding+global", "attn_softcap", "mqa"])
@torch.inference_mode()
def test_left_padded_batch_equals_each_prompt_alone(variant):
    model = make_model(VARIANTS[variant])
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, model.cfg.vocab_size, (n,), generator=gen).tolist() for n in (3, 11, 30)]
    continuation = torch.randint(0, model.cfg.vocab_size, (3, 12), generator=gen)
    tokens, positions = left_pad(prompts, "cpu")
    cache = model.new_cache(3, 30 + 12, rollback_margin=MARGIN)
    batched = [model(tokens, positions, cache=cache, last_only=True)[0]]
    for t in range(12):  # one token per step; the short prompts' sliding rings wrap at different times
        batched.append(model(continuation[:, t:t + 1], cache=cache)[0])
    batched = torch.cat(batched, dim=1)
    for row, prompt in enumerate(prompts):
        alone = full_logits(model, torch.cat((torch.tensor([prompt]), continuation[row:row + 1]), dim=1))
        torch.testing.assert_close(batched[row], alone[0, len(prompt) - 1:], atol=1e-4, rtol=0)


@torch.inference_mode()
def test_a_token_beyond_the_window_has_no_influence():
    T = 30
    tokens = torch.randint(1, 512, (1, T), generator=torch.Generator().manual_seed(4))
    changed = tokens.clone()
    changed[0, 0] = 0

    def moved_positions(overrides: list[str]) -> torch.Tensor:
        model = make_model(overrides)
        difference = (full_logits(model, tokens) - full_logits(model, changed)).abs().amax(-1)[0]
        return difference > 1e-6

    sliding_only = ["model.attention_pattern=[sliding]", "model.last_layer_global=false"]
    # One window layer: position p sees tokens p - W + 1 .. p.
    moved = moved_positions(sliding_only + ["model.n_layers=1"])
    assert moved[:WINDOW].all() and not moved[WINDOW:].any()
    # Stacked window layers see further back: n_layers * (W - 1) positions.
    reach = 2 * (WINDOW - 1)
    moved = moved_positions(sliding_only + ["model.n_layers=2"])
    assert moved[:reach + 1].all() and not moved[reach + 1:].any()
    # A global layer lets token 0 reach every position.
    assert moved_positions(["model.n_layers=2"]).all()
    # The cache must agree: decoding token by token past the window gives the same logits.
    model = make_model(sliding_only + ["model.n_layers=1"])
    torch.testing.assert_close(decode_in_chunks(model, changed, 1, 1), full_logits(model, changed), atol=1e-4,
                               rtol=0)


@torch.inference_mode()
def test_ring_never_holds_more_than_window_plus_margin():
    model = make_model([])  # layer 0 sliding, layer 1 global
    max_len = 100
    cache = model.new_cache(2, max_len, rollback_margin=MARGIN)
    ring, full = cache.layers
    assert ring.window == WINDOW and full.window is None
    head = model.cfg.n_kv_heads * model.cfg.head_dim * 4  # bytes of one fp32 key (or value) across heads
    # One scratch slot takes the writes that must not land (padding).
    assert [s.shape[2] for s in ring.stores] == [WINDOW + MARGIN + 1] * 2
    assert [s.shape[2] for s in full.stores] == [max_len + 1] * 2
    assert cache.nbytes() == 2 * 2 * head * ((WINDOW + MARGIN + 1) + (max_len + 1))
    tokens = torch.randint(0, 512, (2, 90), generator=torch.Generator().manual_seed(5))
    model(tokens[:, :30], cache=cache)
    for t in range(30, 90):
        model(tokens[:, t:t + 1], cache=cache)
        assert int((ring.pos >= 0).sum(dim=1).max()) <= WINDOW + MARGIN
        assert ring.stores[0].shape[2] == WINDOW + MARGIN + 1
    assert int((full.pos >= 0).sum(dim=1).min()) == 90
    assert sorted(ring.pos[0, :-1].tolist()) == list(range(90 - WINDOW - MARGIN, 90))
