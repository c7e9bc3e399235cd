"""The multi-scale byte transformer (AXL-Code): causality at every scale, the preset's size, cached
decoding against the whole-sequence forward, training on one batch, and its wiring."""

import pytest
import torch
import torch.nn.functional as F

from slmforge.config import ConfigError, load_config
from slmforge.infer import SamplingParams, generate_ids
from slmforge.model import MultiScaleTransformer, Transformer, build_model
from slmforge.model.stats import model_stats

AXL_1B_PARAMS = 313_348_096  # the arithmetic is in presets/axl-code-1b.yaml
SCALES = [1, 2, 4]


def tiny_model(seed: int = 0, overrides: list[str] | None = None) -> MultiScaleTransformer:
    """axl-code-tiny with larger initial weights, so every path visibly moves the logits."""
    torch.manual_seed(seed)
    cfg = load_config("axl-code-tiny", ["model.init_std=0.2", *(overrides or [])])
    return build_model(cfg.model).eval()


def random_bytes(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (batch, length), generator=torch.Generator().manual_seed(seed))


def largest_change(before: torch.Tensor, after: torch.Tensor) -> float:
    return float((after - before).abs().max()) if before.numel() else 0.0


@pytest.fixture(scope="module")
def model():
    return tiny_model()


# ---------------------------------------------------------------------------------------------
# causality


@pytest.mark.parametrize("p", [0, 1, 3, 4, 5, 6, 13, 30, 47])
@torch.no_grad()
def test_changing_byte_p_leaves_every_earlier_output_unchanged(model, p):
    """Byte p may reach outputs at positions >= p only: fused logits and every scale's output as the bytes
    read it (the stack's states upsampled); and it does reach them, so the check is not vacuous."""
    tokens = random_bytes(2, 48)
    changed = tokens.clone()
    changed[:, p] = (changed[:, p] + 101) % 256
    logits, aux = model(tokens, return_hidden=True)
    logits2, aux2 = model(changed, return_hidden=True)
    assert largest_change(logits[:, :p], logits2[:, :p]) <= 1e-6
    assert largest_change(logits[:, p], logits2[:, p]) > 1e-3  # the prediction of byte p + 1 reads byte p
    assert len(aux["scale_hidden"]) == len(SCALES)
    for s, before, after in zip(SCALES, aux["scale_hidden"], aux2["scale_hidden"]):
        assert largest_change(before[:, :p], after[:, :p]) <= 1e-6, f"scale {s} leaks byte {p}"
        # the first byte reading a position of scale s that covers byte p: s * ceil(p / s)
        first = -(-p // s) * s
        if first < tokens.shape[1]:
            assert largest_change(before[:, first], after[:, first]) > 1e-4, f"scale {s} ignores byte {p}"


@torch.no_grad()
def test_a_coarse_scale_reads_a_byte_only_once_its_group_is_complete(model):
    """Scale 4 pools bytes 4j - 3 .. 4j: byte 5 reaches it first at byte 8, unchanged at 5, 6 and 7."""
    tokens = random_bytes(1, 16, seed=1)
    changed = tokens.clone()
    changed[0, 5] += 1
    scale4 = model(tokens, return_hidden=True)[1]["scale_hidden"][2]
    scale4_changed = model(changed, return_hidden=True)[1]["scale_hidden"][2]
    moved = (scale4_changed - scale4).abs().amax(dim=-1)[0]
    assert moved[:8].max() == 0
    assert (moved[8:] > 1e-4).all()


# ---------------------------------------------------------------------------------------------
# size and wiring


def test_axl_code_1b_has_318m_parameters():
    stats = model_stats(load_config("axl-code-1b").model)
    assert stats["total_params"] == AXL_1B_PARAMS
    assert abs(stats["total_params"] / 318e6 - 1) <= 0.02
    assert stats["embedding_params"] == 258 * 1024
    # built for real (on the meta device), the model holds the same parameters
    with torch.device("meta"):
        model = build_model(load_config("axl-code-1b").model)
    assert sum(p.numel() for p in model.parameters()) == AXL_1B_PARAMS
    assert model.cross_after == [2, 4, 6]


def test_tiny_preset_is_of_the_same_family_and_tiny():
    cfg = load_config("axl-code-tiny").model
    assert cfg.arch == "multiscale" and cfg.vocab_size == 258 and cfg.multiscale.scales == SCALES
    assert model_stats(cfg)["total_params"] == 144_896


def test_build_model_picks_the_class_of_the_arch():
    assert type(build_model(load_config("axl-code-tiny").model)) is MultiScaleTransformer
    assert type(build_model(load_config("tiny").model)) is Transformer


def test_tied_head_is_the_embedding(model):
    assert model.lm_head is None
    untied = build_model(load_config("axl-code-tiny", ["model.tie_embeddings=false"]).model)
    assert untied.lm_head is not None
    n_tied = sum(p.numel() for p in model.parameters())
    assert sum(p.numel() for p in untied.parameters()) == n_tied + 258 * 32


@pytest.mark.parametrize("key, value", [("ffn", "moe"), ("attention", "mla")])
def test_multiscale_rejects_parts_it_does_not_have(key, value):
    with pytest.raises(ConfigError, match=f"model.{key}"):
        load_config("axl-code-tiny", [f"model.{key}={value}"])


# ---------------------------------------------------------------------------------------------
# decoding


@torch.no_grad()
def test_cached_decoding_matches_the_whole_sequence(model):
    """Prefill in uneven chunks, then byte by byte: the same logits as one forward over everything."""
    tokens = random_bytes(2, 41, seed=2)
    full, _ = model(tokens)
    cache = model.new_cache(2, 64)
    pieces = [model(tokens[:, :7], cache=cache)[0], model(tokens[:, 7:18], cache=cache)[0]]
    pieces += [model(tokens[:, i:i + 1], cache=cache)[0] for i in range(18, 41)]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-4, rtol=0)  # |logits| < 5


@torch.no_grad()
def test_left_padded_positions_match_each_sequence_alone(model):
    lengths = [5, 12, 9]
    tokens = torch.zeros(3, 12, dtype=torch.long)
    positions = torch.full((3, 12), -1)
    rows = []
    for row, n in enumerate(lengths):
        ids = random_bytes(1, n, seed=10 + row)
        tokens[row, 12 - n:], positions[row, 12 - n:] = ids[0], torch.arange(n)
        rows.append(model(ids)[0][0, -1])
    logits, _ = model(tokens, positions, last_only=True)
    torch.testing.assert_close(logits[:, -1], torch.stack(rows), atol=1e-4, rtol=0)


@torch.no_grad()
def test_generation_matches_greedy_recomputation_from_scratch(model):
    prompts = [random_bytes(1, n, seed=20 + n)[0].tolist() for n in (3, 10, 6)]
    params = SamplingParams(max_new_tokens=25, temperature=0.0)
    completions = generate_ids(model, prompts, params)
    for prompt, completion in zip(prompts, completions):
        ids = list(prompt)
        for _ in range(params.max_new_tokens):
            ids.append(int(model(torch.tensor([ids]))[0][0, -1].argmax()))
        assert completion.token_ids == ids[len(prompt):]
    assert len({tuple(c.token_ids) for c in completions}) > 1  # the prompts lead to different text


# ---------------------------------------------------------------------------------------------
# training


def test_tiny_model_overfits_one_batch():
    model = tiny_model(overrides=["model.init_std=0.02"]).train()
    text = b"def add(a, b):\n    return a + b\n\nclass Point:\n    def __init__(self, x, y):\n        self.x = x\n" * 2
    batch = torch.tensor(list(text[:130])).view(2, 65)
    x, y = batch[:, :-1], batch[:, 1:]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(60):
        logits, _ = model(x)
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[0] > 5.0  # ln 258 = 5.55 at the start
    assert losses[-1] < 0.5
