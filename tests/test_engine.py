"""The decoding engine: continuous batching gives every request the tokens it gets alone, for every model
family; requests join and leave between steps; long prompts prefill in chunks without stalling running
streams; cancelling frees a slot at once; logprobs equal a full forward's; the cache views, resets and
roll-backs the engine relies on are exact."""

import copy

import pytest
import torch

from slmforge.config import load_config
from slmforge.infer import SamplingParams, generate_ids
from slmforge.infer.engine import Engine, QueueFull, Request
from slmforge.infer.kernels import prepare_for_decoding
from slmforge.model import build_model
from slmforge.tokenizer import byte_tokenizer

FAMILIES = ["tiny", "nekomind-tiny", "axion1-tiny", "codemind-tiny", "axl-code-tiny"]


def family_model(preset: str, seed: int = 0):
    # init_std 0.2: peaked logits, so greedy choices are not decided by rounding
    cfg = load_config(preset, ["model.init_std=0.2"]).model
    torch.manual_seed(seed)
    return build_model(cfg).eval()


def prompts(n: int, vocab: int, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 40, (n,), generator=gen).tolist()
    return [torch.randint(0, min(vocab, 256), (k,), generator=gen).tolist() for k in lengths]


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, temperature=0)


@pytest.mark.parametrize("preset", FAMILIES)
@pytest.mark.parametrize("prepared", [False, True])
def test_greedy_alone_equals_among_fifteen_others(preset, prepared):
    model = family_model(preset)
    if prepared:
        model = prepare_for_decoding(copy.deepcopy(model))
    batch = prompts(16, model.cfg.vocab_size, seed=1)
    alone = [generate_ids(model, [p], greedy(12))[0].token_ids for p in batch]
    # 16 requests in 16 slots, prefilled 8 tokens of work at a time, arriving while others decode
    engine = Engine(model, max_batch=16, max_len=64, prefill_chunk=8)
    requests = [Request(p, greedy(12)) for p in batch]
    for i, request in enumerate(requests):
        engine.submit(request)
        if i % 3 == 0:
            engine.step()
    while not all(r.done.is_set() for r in requests):
        engine.step()
    assert [r.output_ids for r in requests] == alone


def test_seeded_sampling_alone_equals_in_a_batch():
    model = family_model("tiny")
    batch = prompts(6, model.cfg.vocab_size, seed=2)
    params = [SamplingParams(max_new_tokens=10, temperature=0.9, top_p=0.9, top_k=20 * i, seed=i) for i in range(6)]
    alone = [Engine(model, max_batch=1).generate([Request(p, q)])[0].output_ids for p, q in zip(batch, params)]
    together = Engine(model, max_batch=6).generate([Request(p, q) for p, q in zip(batch, params)])
    assert [r.output_ids for r in together] == alone


def test_requests_join_and_leave_between_steps():
    model = family_model("tiny")
    batch = prompts(5, model.cfg.vocab_size, seed=3)
    lengths = [3, 9, 5, 12, 4]
    expected = [generate_ids(model, [p], greedy(n))[0].token_ids for p, n in zip(batch, lengths)]
    engine = Engine(model, max_batch=2)
    requests = [engine.submit(Request(p, greedy(n))) for p, n in zip(batch, lengths)]
    running_per_step = []
    while not all(r.done.is_set() for r in requests):
        engine.step()
        running_per_step.append(engine.stats()["running"])
    assert [r.output_ids for r in requests] == expected
    assert max(running_per_step) == 2 and running_per_step[-1] == 0
    # a finished request's slot is taken by the next one in the step after it finished: no slot idles
    # while requests wait, so the whole run takes about sum(lengths) / 2 decoding steps
    assert len(running_per_step) <= sum(lengths) // 2 + len(lengths) + 1


def test_a_long_prompt_does_not_stall_running_streams():
    model = family_model("tiny")
    engine = Engine(model, max_batch=2, max_len=128, prefill_chunk=16)
    running = engine.submit(Request([5, 6, 7], greedy(30)))
    engine.step()
    engine.step()
    long_prompt = torch.randint(0, 256, (96,), generator=torch.Generator().manual_seed(4)).tolist()
    waiting = engine.submit(Request(long_prompt, greedy(2)))
    before = len(running.output_ids)
    steps = 0
    while waiting.prefilled < len(waiting.prompt_ids):
        engine.step()
        steps += 1
    assert steps == 6  # 96 tokens in chunks of 16
    assert len(running.output_ids) - before == steps  # one token per step all along
    while not (running.done.is_set() and waiting.done.is_set()):
        engine.step()
    assert running.output_ids == generate_ids(model, [[5, 6, 7]], greedy(30))[0].token_ids
    assert waiting.output_ids == generate_ids(model, [long_prompt], greedy(2))[0].token_ids


def test_cancel_frees_the_slot_at_once():
    model = family_model("tiny")
    engine = Engine(model, max_batch=1)
    first = engine.submit(Request([1, 2, 3], greedy(50)))
    second = engine.submit(Request([4, 5], greedy(3)))
    engine.step()
    engine.cancel(first)
    engine.step()
    assert first.finish_reason == "cancelled" and len(first.output_ids) < 50
    assert engine.slots[0] is second
    while not second.done.is_set():
        engine.step()
    assert second.output_ids == generate_ids(model, [[4, 5]], greedy(3))[0].token_ids


def test_the_queue_is_bounded_and_bad_requests_are_refused():
    model = family_model("tiny")
    engine = Engine(model, max_batch=1, max_len=32, max_queue=2)
    engine.submit(Request([1], greedy(2)))
    engine.submit(Request([2], greedy(2)))
    with pytest.raises(QueueFull):
        engine.submit(Request([3], greedy(2)))
    with pytest.raises(ValueError, match="context of 32"):
        Engine(model, max_len=32).submit(Request([1] * 30, greedy(3)))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        Engine(model).submit(Request([model.cfg.vocab_size], greedy(3)))
    with pytest.raises(ValueError, match="empty"):
        Engine(model).submit(Request([], greedy(3)))


def test_logprobs_equal_a_full_forward():
    model = family_model("tiny")
    prompt = prompts(1, 256, seed=5)[0][:20]
    params = SamplingParams(max_new_tokens=5, temperature=0, logprobs=3, prompt_logprobs=2)
    engine = Engine(model, max_batch=2, prefill_chunk=7)  # the prompt spans three chunks
    request = engine.generate([Request(prompt, params)])[0]
    sequence = prompt + request.output_ids
    with torch.inference_mode():
        logp = torch.log_softmax(model(torch.tensor([sequence]))[0][0].float(), dim=-1)
    assert request.prompt_logprobs[0] is None and len(request.prompt_logprobs) == len(prompt)
    for i, entry in enumerate(request.prompt_logprobs[1:], start=1):
        assert entry.token_id == prompt[i]
        assert entry.logprob == pytest.approx(logp[i - 1, prompt[i]].item(), abs=1e-4)
        assert [t for t, _ in entry.top] == logp[i - 1].topk(2).indices.tolist()
    for j, entry in enumerate(request.logprobs):
        position = len(prompt) - 1 + j
        assert entry.logprob == pytest.approx(logp[position, sequence[position + 1]].item(), abs=1e-4)
        assert entry.top[0][0] == entry.token_id and len(entry.top) == 3  # greedy: the best is the choice


def test_deltas_stream_the_final_text_and_stop_at_a_stop_string():
    tokenizer = byte_tokenizer()
    cfg = load_config("tiny", ["model.vocab_size=258"]).model
    model = build_model(cfg).eval()
    target = tokenizer.encode("un café, s'il vous plaît STOP encore")

    def spell(logits, generated):  # the model spells `target`, whatever it thinks
        forced = torch.full_like(logits, float("-inf"))
        forced[target[min(len(generated), len(target) - 1)]] = 0.0
        return forced

    deltas = []
    engine = Engine(model, eos_id=tokenizer.eos_id, decode=tokenizer.decode)
    params = SamplingParams(max_new_tokens=60, temperature=0, stop=["STOP", "s'il vous plaît ST"])
    request = engine.generate([Request([104, 105], params, on_delta=deltas.append, logits_processor=spell)])[0]
    assert request.text == "un café, " and request.finish_reason == "stop"
    assert request.output_ids == tokenizer.encode("un café, s'il vous plaît ST")  # ends on the completing token
    assert "".join(d.text for d in deltas) == request.text
    assert all("\ufffd" not in d.text for d in deltas)  # "é" is two bytes: shown once both came
    assert deltas[-1].finish_reason == "stop" and sum(len(d.token_ids) for d in deltas) == len(request.output_ids)


def test_threaded_engine_serves_and_stops():
    model = family_model("tiny")
    engine = Engine(model, max_batch=4)
    engine.start()
    try:
        requests = [engine.submit(Request(p, greedy(6))) for p in prompts(6, 256, seed=6)]
        assert all(r.done.wait(timeout=60) for r in requests)
        assert [r.output_ids for r in requests] == [generate_ids(model, [r.prompt_ids], greedy(6))[0].token_ids
                                                    for r in requests]
    finally:
        engine.stop()
    assert engine.stats()["finished_requests"] == 6


@pytest.mark.parametrize("preset", FAMILIES)
def test_cache_views_resets_and_rollbacks_are_exact(preset):
    """A forward on a view of slots 1..2 of a 4-slot cache equals one on a cache of its own; a reset slot
    starts over; a rolled-back slot continues as if the dropped tokens never came."""
    model = family_model(preset)
    a, b = prompts(2, model.cfg.vocab_size, seed=7)
    with torch.inference_mode():
        own = model.new_cache(1, 64)
        expected, _ = model(torch.tensor([a]), cache=own, last_only=True)
        cache = model.new_cache(4, 64)
        view = cache.slots(1, 3)
        got, _ = model(torch.tensor([a, a]), cache=view, last_only=True)
        torch.testing.assert_close(got[:1], expected, atol=1e-5, rtol=0)
        assert cache.lengths.tolist() == [0, len(a), len(a), 0]
        cache.reset(1)
        assert cache.lengths.tolist() == [0, 0, len(a), 0]
        fresh, _ = model(torch.tensor([b]), cache=cache.slots(1, 2), last_only=True)
        alone, _ = model(torch.tensor([b]), cache=model.new_cache(1, 64), last_only=True)
        torch.testing.assert_close(fresh, alone, atol=1e-5, rtol=0)
        # roll slot 2 back by 3 tokens and feed them again: the same logits as the first time
        row2 = cache.slots(2, 3)
        step, _ = model(torch.tensor([[7]]), cache=row2, last_only=True)
        row2.truncate([len(a)])
        again, _ = model(torch.tensor([[7]]), cache=row2, last_only=True)
        torch.testing.assert_close(again, step, atol=1e-5, rtol=0)
