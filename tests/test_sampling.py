"""Sampling arithmetic on hand-made logits, and generation end to end on a random tiny model."""

import math

import pytest
import torch

from slmforge.config import load_config
from slmforge.infer import (
    SamplingParams,
    apply_repetition_penalty,
    generate,
    generate_ids,
    sample_next,
    top_k_filter,
    top_p_filter,
)
from slmforge.infer.engine import Engine, Request
from slmforge.model import Transformer
from slmforge.tokenizer import byte_tokenizer

NEG_INF = float("-inf")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    # A byte-sized vocabulary, so every id the model can emit is one the byte tokenizer can decode.
    cfg = load_config("tiny", ["model.vocab_size=258", "model.sliding_window=8", "model.init_std=0.1"])
    return Transformer(cfg.model).eval()


@pytest.fixture(scope="module")
def tokenizer():
    return byte_tokenizer()


def random_prompts(lengths, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (n,), generator=gen).tolist() for n in lengths]


def force_text(tokenizer, text: str):
    """A logits processor that makes every sequence spell `text`, whatever the model thinks."""
    target = tokenizer.encode(text)

    def processor(logits, generated):
        forced = torch.full_like(logits, NEG_INF)
        forced[target[min(len(generated), len(target) - 1)]] = 0.0
        return forced

    return processor


# ---------------------------------------------------------------------------------------------
# pure functions on logits


def test_top_p_keeps_the_smallest_set_with_enough_mass():
    logits = torch.tensor([[0.1, 0.4, 0.05, 0.3, 0.15]]).log()  # by mass: 1, 3, 4, 0, 2
    for p, kept in ((0.3, {1}), (0.5, {1, 3}), (0.8, {1, 3, 4}), (0.9, {1, 3, 4, 0}), (0.97, {0, 1, 2, 3, 4}),
                    (1.0, {0, 1, 2, 3, 4})):
        filtered = top_p_filter(logits, p)
        assert set(torch.nonzero(filtered[0] > NEG_INF).flatten().tolist()) == kept, p
        assert torch.equal(filtered[0, list(kept)], logits[0, list(kept)])  # kept logits are untouched
    # Mass exactly p is enough (four tokens of exactly 0.25 each: two reach 0.5).
    assert (top_p_filter(torch.zeros(1, 4), 0.5) > NEG_INF).sum() == 2


def test_top_k_keeps_the_k_largest():
    logits = torch.tensor([[0.1, 3.0, -2.0, 2.0, 1.0]])
    assert top_k_filter(logits, 2).tolist() == [[NEG_INF, 3.0, NEG_INF, 2.0, NEG_INF]]
    assert torch.equal(top_k_filter(logits, 0), logits)
    assert torch.equal(top_k_filter(logits, 5), logits)


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits():
    logits = torch.tensor([[2.0, -1.0, 0.5, -3.0, 0.0]])
    seen = torch.tensor([[True, True, False, False, True]])
    assert apply_repetition_penalty(logits, seen, 2.0).tolist() == [[1.0, -2.0, 0.5, -3.0, 0.0]]
    # Through sample_next: the seen token 0 (2.0 -> 1.0) loses to the unseen token 1 (1.5).
    params = SamplingParams(temperature=0, repetition_penalty=2.0)
    assert sample_next(torch.tensor([[2.0, 1.5]]), torch.tensor([[True, False]]), params).tolist() == [1]
    assert sample_next(torch.tensor([[2.0, 1.5]]), torch.tensor([[False, False]]), params).tolist() == [0]


def test_temperature_is_applied_before_top_p():
    logits = torch.tensor([0.5, 0.25, 0.125, 0.0625, 0.0625]).log().expand(2000, 5)
    gen = torch.Generator().manual_seed(0)
    # At temperature 1, p = 0.7 keeps tokens {0, 1}; at 0.5 token 0 alone has 0.74 of the mass.
    hot = sample_next(logits, None, SamplingParams(top_p=0.7), gen)
    cold = sample_next(logits, None, SamplingParams(temperature=0.5, top_p=0.7), gen)
    assert set(hot.tolist()) == {0, 1}
    assert set(cold.tolist()) == {0}


def test_sampling_follows_the_distribution():
    probs = torch.tensor([0.5, 0.25, 0.125, 0.125])
    draws = sample_next(probs.log().expand(20000, 4), None, SamplingParams(), torch.Generator().manual_seed(1))
    freq = torch.bincount(draws, minlength=4).float() / 20000
    torch.testing.assert_close(freq, probs, atol=0.015, rtol=0)


def test_suppressed_ids_are_never_chosen():
    logits = torch.tensor([[5.0, 0.0, -1.0]])
    eos = torch.tensor([0])
    assert sample_next(logits, None, SamplingParams(temperature=0), suppress_ids=eos).tolist() == [1]
    draws = sample_next(logits.expand(500, 3), None, SamplingParams(), torch.Generator().manual_seed(0), eos)
    assert 0 not in draws.tolist()


@pytest.mark.parametrize("field,value", [
    ("max_new_tokens", 0), ("min_new_tokens", -1), ("min_new_tokens", 300), ("temperature", -0.1),
    ("temperature", math.nan), ("top_k", -1), ("top_p", 0.0), ("top_p", 1.5), ("repetition_penalty", 0.0),
    ("stop", [""]), ("seed", 1.5),
])
def test_invalid_params_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_a_single_stop_string_is_accepted():
    assert SamplingParams(stop="\n\n").stop == ["\n\n"]


# ---------------------------------------------------------------------------------------------
# generation


def test_greedy_equals_argmax_of_full_recomputation(model):
    prompt = random_prompts([7])[0]
    out = generate_ids(model, [prompt], SamplingParams(max_new_tokens=12, temperature=0))[0]
    sequence = list(prompt)
    with torch.inference_mode():
        for _ in range(12):  # no cache: the whole sequence again for every token
            logits, _ = model(torch.tensor([sequence]))
            sequence.append(int(logits[0, -1].argmax()))
    assert out.token_ids == sequence[len(prompt):]
    assert out.finish_reason == "length" and out.n_generated == 12 and out.n_prompt_tokens == 7


def test_several_prompts_at_once_equal_one_by_one(model):
    prompts = random_prompts([3, 9, 17, 1], seed=1)
    params = SamplingParams(max_new_tokens=10, temperature=0)
    together = generate_ids(model, prompts, params)
    alone = [generate_ids(model, [p], params)[0] for p in prompts]
    assert [c.token_ids for c in together] == [c.token_ids for c in alone]


def test_a_finished_sequence_does_not_disturb_the_others(model):
    prompts = random_prompts([4, 12], seed=2)
    eos = 257

    def eos_at_step_2(logits, generated):
        if len(generated) == 2:
            logits = logits.clone()
            logits[eos] = 1e4
        return logits

    params = SamplingParams(max_new_tokens=8, temperature=0)
    engine = Engine(model, eos_id=eos, max_batch=2)
    together = engine.generate([Request(prompts[0], params, logits_processor=eos_at_step_2),
                                Request(prompts[1], params)])
    alone = generate_ids(model, prompts[1:], params, eos_id=eos)[0]
    assert together[0].output_ids[-1] == eos and len(together[0].output_ids) == 3
    assert together[0].finish_reason == "stop"
    assert together[1].output_ids == alone.token_ids and together[1].finish_reason == alone.finish_reason


def test_seeded_sampling_is_reproducible(model):
    prompts = random_prompts([5, 8], seed=3)
    runs = [generate_ids(model, prompts, SamplingParams(max_new_tokens=20, seed=seed)) for seed in (7, 7, 8)]
    ids = [[c.token_ids for c in run] for run in runs]
    assert ids[0] == ids[1]
    assert ids[0] != ids[2]


def test_top_k_1_equals_greedy(model):
    prompts = random_prompts([6, 2], seed=4)
    greedy = generate_ids(model, prompts, SamplingParams(max_new_tokens=15, temperature=0))
    top1 = generate_ids(model, prompts, SamplingParams(max_new_tokens=15, temperature=1.7, top_k=1, seed=3))
    assert [c.token_ids for c in top1] == [c.token_ids for c in greedy]


def test_repetition_penalty_avoids_tokens_of_prompt_and_continuation(model):
    prompt = random_prompts([10], seed=5)[0]
    plain = generate_ids(model, [prompt], SamplingParams(max_new_tokens=30, temperature=0))[0].token_ids
    assert len(set(plain)) < 30 or set(plain) & set(prompt)  # the random model does repeat itself
    params = SamplingParams(max_new_tokens=30, temperature=0, repetition_penalty=1e6)
    penalized = generate_ids(model, [prompt], params)[0].token_ids
    assert len(set(penalized)) == 30 and not set(penalized) & set(prompt)


def test_min_new_tokens_holds_back_eos(model, tokenizer):
    def eos_first(logits, generated):
        logits = logits.clone()
        logits[tokenizer.eos_id] = 1e4
        return logits

    eager = generate(model, tokenizer, ["ab"], SamplingParams(max_new_tokens=10, temperature=0),
                     logits_processor=eos_first)[0]
    assert eager.token_ids == [tokenizer.eos_id] and eager.finish_reason == "stop" and eager.text == ""
    params = SamplingParams(max_new_tokens=10, min_new_tokens=4, temperature=0.8, seed=0)
    held = generate(model, tokenizer, ["ab", "xyz"], params, logits_processor=eos_first)
    for c in held:
        assert c.n_generated == 5 and c.token_ids[-1] == tokenizer.eos_id
        assert tokenizer.eos_id not in c.token_ids[:4] and c.finish_reason == "stop"


def test_stop_string_cuts_the_text_and_ends_generation(model, tokenizer):
    forced = force_text(tokenizer, "hello STOP world")
    out = generate(model, tokenizer, ["Say:"], SamplingParams(max_new_tokens=40, stop=["STOP"]),
                   logits_processor=forced)[0]
    assert out.text == "hello " and out.finish_reason == "stop"
    assert out.token_ids == tokenizer.encode("hello STOP")  # stopped on the token completing the string
    # The first stop string in the text wins, whichever order they are listed in.
    out = generate(model, tokenizer, ["Say:"], SamplingParams(max_new_tokens=40, stop=["world", "lo S"]),
                   logits_processor=forced)[0]
    assert out.text == "hel" and out.n_generated == len("hello S")
    # Stop strings are matched on text, also across a multi-byte character split over tokens.
    out = generate(model, tokenizer, ["x"], SamplingParams(max_new_tokens=40, stop=["é!"]),
                   logits_processor=force_text(tokenizer, "un café! deux"))[0]
    assert out.text == "un caf" and out.finish_reason == "stop"


def test_stop_strings_in_the_prompt_do_not_count(model, tokenizer):
    out = generate(model, tokenizer, ["STOP STOP"], SamplingParams(max_new_tokens=3, stop=["STOP"]),
                   logits_processor=force_text(tokenizer, "abc"))[0]
    assert out.text == "abc" and out.finish_reason == "length" and out.n_prompt_tokens == 9


def test_max_new_tokens_gives_length(model, tokenizer):
    def no_eos(logits, generated):
        return logits.index_fill(-1, torch.tensor([tokenizer.eos_id]), NEG_INF)

    outs = generate(model, tokenizer, ["one", "two three"], SamplingParams(max_new_tokens=9, seed=1),
                    logits_processor=no_eos)
    for out in outs:
        assert out.finish_reason == "length" and out.n_generated == 9
        assert out.text == tokenizer.decode(out.token_ids)
    assert [o.n_prompt_tokens for o in outs] == [3, 9]


def test_add_bos_prepends_the_bos_token(model, tokenizer):
    params = SamplingParams(max_new_tokens=4, temperature=0)
    with_bos = generate(model, tokenizer, ["hi"], params, add_bos=True)[0]
    by_ids = generate_ids(model, [[tokenizer.bos_id, *tokenizer.encode("hi")]], params, eos_id=tokenizer.eos_id)[0]
    assert with_bos.n_prompt_tokens == 3 and with_bos.token_ids == by_ids.token_ids


def test_bad_requests_are_refused(model, tokenizer):
    with pytest.raises(ValueError, match="max_seq_len"):
        generate_ids(model, [[1, 2, 3]], SamplingParams(max_new_tokens=model.cfg.max_seq_len))
    with pytest.raises(ValueError, match="empty"):
        generate_ids(model, [[1], []], SamplingParams(max_new_tokens=2))
    with pytest.raises(ValueError, match="decode"):
        generate_ids(model, [[1]], SamplingParams(max_new_tokens=2, stop=["x"]))
