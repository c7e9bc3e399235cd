"""`slmforge serve` through the official `openai` client and plain HTTP: completions and chat, streamed and
not, n and seeds, stop strings, logprobs (equal to a full forward's), usage, fill in the middle, the API key,
/tokenize and /detokenize, /metrics, a client that goes away, and the CLI itself."""

import json
import os
import re
import subprocess
import sys

import pytest

pytest.importorskip("fastapi", reason="the server needs fastapi (pip install slmforge[serve])")
pytest.importorskip("uvicorn", reason="the server needs uvicorn (pip install slmforge[serve])")
pytest.importorskip("jinja2", reason="chat templates need jinja2 (pip install slmforge[serve])")
openai = pytest.importorskip("openai", reason="the reference client is the openai package")

import httpx  # noqa: E402  (openai depends on it)
import torch  # noqa: E402

from slmforge.infer import SamplingParams, generate, generate_ids  # noqa: E402
from slmforge.infer.engine import Engine, Request  # noqa: E402
from slmforge.serve.app import INDEX_PAGE  # noqa: E402

from serve_helpers import RunningServer, chat_checkpoint, plain_checkpoint  # noqa: E402


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    with RunningServer(plain_checkpoint(tmp_path_factory.mktemp("plain"))) as server:
        yield server


@pytest.fixture(scope="module")
def chat(tmp_path_factory):
    with RunningServer(chat_checkpoint(tmp_path_factory.mktemp("chat")), name="chat") as server:
        yield server


def client(server, api_key: str = "unused") -> "openai.OpenAI":
    base_url = server if isinstance(server, str) else server.base_url
    return openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=0)


def token_texts(server, ids):
    return [server.tokenizer.decode([t], skip_special=False) for t in ids]


def metrics(server) -> dict[str, float]:
    text = httpx.get(f"{server.url}/metrics").text
    return {m.group(1): float(m.group(2)) for m in re.finditer(r"^(slmforge_\w+) (\S+)$", text, re.M)}


# ---------------------------------------------------------------------------------------------
# completions


def test_models_lists_the_served_model(plain):
    models = client(plain).models.list()
    assert [m.id for m in models.data] == ["tiny"]


def test_greedy_completion_equals_library_generate_token_for_token(plain):
    prompts = ["hello", "The quick brown fox"]
    expected = generate(plain.model, plain.tokenizer, prompts, SamplingParams(max_new_tokens=12, temperature=0))
    response = client(plain).completions.create(model="tiny", prompt=prompts, max_tokens=12, temperature=0,
                                                logprobs=0)
    assert [c.index for c in response.choices] == [0, 1]
    for choice, completion in zip(response.choices, expected):
        assert choice.text == completion.text
        assert choice.logprobs.tokens == token_texts(plain, completion.token_ids)
        assert choice.finish_reason == completion.finish_reason
    assert response.usage.completion_tokens == sum(c.n_generated for c in expected)


def test_usage_counts_are_the_tokenizers(plain):
    prompt = "usage counts tokens"
    response = client(plain).completions.create(model="tiny", prompt=prompt, max_tokens=5, temperature=0,
                                                logprobs=0, extra_body={"min_tokens": 5})
    assert response.usage.prompt_tokens == len(plain.tokenizer.encode(prompt))
    assert response.usage.completion_tokens == len(response.choices[0].logprobs.tokens) == 5
    assert response.usage.total_tokens == response.usage.prompt_tokens + 5
    assert response.choices[0].finish_reason == "length"


def test_streaming_gives_the_same_text_then_a_usage_chunk_and_done(plain):
    body = {"model": "tiny", "prompt": "stream me", "max_tokens": 10, "temperature": 0, "min_tokens": 10}
    whole = httpx.post(f"{plain.base_url}/completions", json=body).json()
    with httpx.stream("POST", f"{plain.base_url}/completions",
                      json={**body, "stream": True, "stream_options": {"include_usage": True}}) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = response.read().decode()
    events = raw.split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""]
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
    assert all(e.startswith("data: ") for e in events[:-2])
    assert "".join(c["choices"][0]["text"] for c in chunks[:-1]) == whole["choices"][0]["text"]
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-2])
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole["usage"]


def test_n_choices_and_seeds_are_reproducible(plain):
    api = client(plain)
    ask = dict(model="tiny", prompt="seeded", max_tokens=8, temperature=1.0, logprobs=0, extra_body={"min_tokens": 8})
    first = api.completions.create(n=3, seed=5, **ask)
    again = api.completions.create(n=3, seed=5, **ask)
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert [c.logprobs.tokens for c in first.choices] == [c.logprobs.tokens for c in again.choices]
    # the i-th of n samples with seed + i, as one request with that seed does
    third = api.completions.create(n=1, seed=7, **ask)
    assert third.choices[0].logprobs.tokens == first.choices[2].logprobs.tokens
    assert len({tuple(c.logprobs.tokens) for c in first.choices}) == 3
    assert first.usage.completion_tokens == 24


def test_stop_strings_cut_the_text(plain):
    api = client(plain)
    free = api.completions.create(model="tiny", prompt="stop here", max_tokens=24, temperature=0).choices[0].text
    start = next(i for i in range(2, len(free) - 2) if "\ufffd" not in free[i:i + 2])
    stop = free[start:start + 2]
    cut = api.completions.create(model="tiny", prompt="stop here", max_tokens=24, temperature=0, stop=stop)
    assert cut.choices[0].text == free[:free.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    listed = api.completions.create(model="tiny", prompt="stop here", max_tokens=24, temperature=0,
                                    stop=["never in it", stop])
    assert listed.choices[0].text == cut.choices[0].text


def test_completion_logprobs_hold_the_chosen_token_among_the_top(plain):
    response = client(plain).completions.create(model="tiny", prompt="alternatives", max_tokens=6, temperature=0,
                                                logprobs=3)
    logprobs = response.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == 6
    for token, value, top in zip(logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs):
        assert top[token] == value and value <= 0
        assert value == max(top.values())  # greedy: the chosen token is the most likely
        assert 1 <= len(top) <= 4
    assert logprobs.text_offset == sorted(logprobs.text_offset) and logprobs.text_offset[0] == 0


@pytest.mark.parametrize("max_tokens", [1, 0])
def test_echo_logprobs_equal_a_full_forward(plain, max_tokens):
    """What lm-eval's local-completions sends to score a prompt: token ids, echo, logprobs 1, max_tokens 1."""
    ids = plain.tokenizer.encode("log-likelihood of every prompt token")
    response = httpx.post(f"{plain.base_url}/completions", json={
        "model": "tiny", "prompt": ids, "echo": True, "logprobs": 1, "max_tokens": max_tokens, "temperature": 0,
    }).json()
    choice = response["choices"][0]
    logprobs = choice["logprobs"]
    n = len(ids)
    assert len(logprobs["tokens"]) == n + max_tokens
    assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
    with torch.no_grad():
        logits, _ = plain.model(torch.tensor([ids]))
    expected = torch.log_softmax(logits[0].float(), dim=-1)
    for i in range(1, n):
        assert logprobs["token_logprobs"][i] == pytest.approx(expected[i - 1, ids[i]].item(), abs=1e-4)
        assert max(logprobs["top_logprobs"][i].values()) == pytest.approx(expected[i - 1].max().item(), abs=1e-4)
    assert logprobs["tokens"][:n] == token_texts(plain, ids)
    assert choice["text"].startswith(plain.tokenizer.decode(ids, skip_special=False))
    if max_tokens:
        greedy = int(expected[n - 1].argmax())
        assert logprobs["tokens"][n] == token_texts(plain, [greedy])[0]
        assert logprobs["token_logprobs"][n] == pytest.approx(expected[n - 1, greedy].item(), abs=1e-4)
    assert response["usage"] == {"prompt_tokens": n, "completion_tokens": max_tokens, "total_tokens": n + max_tokens}
    assert choice["finish_reason"] == "length"


def test_max_tokens_defaults_to_what_the_context_leaves(chat):
    ids = chat.tokenizer.encode("the quick brown fox")
    room = chat.engine.max_len - len(ids)
    response = client(chat).completions.create(model="chat", prompt=ids, temperature=0,
                                               extra_body={"min_tokens": room})
    assert response.usage.completion_tokens == room and response.choices[0].finish_reason == "length"


def test_suffix_fills_in_the_middle(chat):
    fim = [chat.tokenizer.special_tokens[t] for t in ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>")]
    prefix, suffix = "def add(a, b):\n    return ", "\n\nprint(add(1, 2))\n"
    ids = [fim[0], *chat.tokenizer.encode(prefix), fim[1], *chat.tokenizer.encode(suffix), fim[2]]
    expected = generate_ids(chat.model, [ids], SamplingParams(max_new_tokens=6, temperature=0),
                            chat.tokenizer.eos_id, chat.tokenizer.decode)[0]
    response = client(chat).completions.create(model="chat", prompt=prefix, suffix=suffix, max_tokens=6,
                                               temperature=0)
    assert response.choices[0].text == expected.text
    assert response.usage.prompt_tokens == len(ids)


# ---------------------------------------------------------------------------------------------
# chat


MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "the quick brown fox"}]


def chat_ids(server, messages=MESSAGES) -> list[int]:
    return httpx.post(f"{server.url}/tokenize", json={"messages": messages}).json()["tokens"]


def test_chat_prompt_is_the_template_as_transformers_renders_it(chat):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(chat.loaded.checkpoint))
    expected = hf.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True, return_dict=True)
    assert chat_ids(chat) == list(expected["input_ids"])


def test_greedy_chat_equals_library_generate(chat):
    ids = chat_ids(chat)
    im_end = chat.tokenizer.special_tokens["<|im_end|>"]
    expected = generate_ids(chat.model, [ids], SamplingParams(max_new_tokens=10, temperature=0,
                                                              stop_token_ids=[im_end]),
                            chat.tokenizer.eos_id, chat.tokenizer.decode)[0]
    response = client(chat).chat.completions.create(model="chat", messages=MESSAGES, max_tokens=10, temperature=0,
                                                    logprobs=True, top_logprobs=2)
    choice = response.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == expected.text
    assert [t.token for t in choice.logprobs.content] == token_texts(chat, expected.token_ids)
    for entry in choice.logprobs.content:
        assert len(entry.top_logprobs) == 2 and entry.top_logprobs[0].token == entry.token
        assert entry.bytes == list(entry.token.encode())
    assert response.usage.prompt_tokens == len(ids)
    assert response.usage.completion_tokens == expected.n_generated


def test_end_of_turn_token_ends_the_reply(chat):
    """A seed whose sample reaches <|im_end|> (found with the library's engine): the server stops there too,
    and the reply holds the text before it."""
    ids = chat_ids(chat)
    im_end = chat.tokenizer.special_tokens["<|im_end|>"]

    def params(seed):
        return SamplingParams(max_new_tokens=48, temperature=1.0, seed=seed, stop_token_ids=[im_end])

    engine = Engine(chat.model, chat.tokenizer.eos_id, chat.tokenizer.decode, max_batch=32, max_queue=32)
    runs = engine.generate([Request(list(ids), params(seed)) for seed in range(32)])
    ending = [seed for seed, run in enumerate(runs) if run.output_ids[-1] == im_end]
    assert ending, "no seed of 32 reached <|im_end|> in 48 tokens"
    seed = ending[0]
    expected = generate_ids(chat.model, [ids], params(seed), chat.tokenizer.eos_id, chat.tokenizer.decode)[0]
    assert expected.token_ids[-1] == im_end
    response = client(chat).chat.completions.create(model="chat", messages=MESSAGES, max_tokens=48, seed=seed,
                                                    temperature=1.0)
    assert response.choices[0].finish_reason == "stop"
    assert response.choices[0].message.content == expected.text
    assert response.usage.completion_tokens == expected.n_generated


def test_chat_streaming_starts_with_the_role_and_ends_with_usage(chat):
    api = client(chat)
    whole = api.chat.completions.create(model="chat", messages=MESSAGES, max_tokens=8, temperature=0, n=2)
    chunks = list(api.chat.completions.create(model="chat", messages=MESSAGES, max_tokens=8, temperature=0, n=2,
                                              stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    for index in (0, 1):
        mine = [c.choices[0] for c in chunks if c.choices and c.choices[0].index == index]
        assert mine[0].delta.role == "assistant"
        assert "".join(c.delta.content or "" for c in mine) == whole.choices[index].message.content
        assert [c.finish_reason for c in mine if c.finish_reason] == [whole.choices[index].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_chat_seeds_and_sampling_settings(chat):
    api = client(chat)
    ask = dict(model="chat", messages=MESSAGES, max_tokens=8, temperature=0.9, top_p=0.9,
               extra_body={"top_k": 20, "repetition_penalty": 1.2, "min_tokens": 8})
    one = api.chat.completions.create(seed=11, **ask)
    two = api.chat.completions.create(seed=11, **ask)
    assert one.choices[0].message.content == two.choices[0].message.content
    assert one.usage.completion_tokens == 8
    # a top_k beyond the vocabulary keeps every token (vLLM's -1 too)
    for top_k in (10**6, -1):
        wide = api.chat.completions.create(model="chat", messages=MESSAGES, max_tokens=4, seed=3,
                                           extra_body={"top_k": top_k, "min_tokens": 4})
        assert wide.usage.completion_tokens == 4


# ---------------------------------------------------------------------------------------------
# the rest of the API


def test_api_key_is_enforced(tmp_path):
    with RunningServer(plain_checkpoint(tmp_path), api_key="sesame") as server:
        with pytest.raises(openai.AuthenticationError):
            client(server, api_key="wrong").models.list()
        bare = httpx.post(f"{server.base_url}/completions", json={"prompt": "x", "max_tokens": 1})
        assert bare.status_code == 401 and bare.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(f"{server.url}/metrics").status_code == 401
        assert httpx.get(f"{server.url}/health").status_code == 200
        done = client(server, api_key="sesame").completions.create(model="tiny", prompt="x", max_tokens=2)
        assert done.usage.completion_tokens >= 1


def test_tokenize_and_detokenize_round_trip(plain, chat):
    text = "Round trip: héllo wörld"
    tokens = httpx.post(f"{plain.url}/tokenize", json={"prompt": text}).json()
    assert tokens["tokens"] == plain.tokenizer.encode(text)
    assert tokens["count"] == len(tokens["tokens"]) and tokens["max_model_len"] == 2048
    back = httpx.post(f"{plain.url}/detokenize", json={"tokens": tokens["tokens"]}).json()
    assert back == {"prompt": text}
    ids = chat_ids(chat)
    rendered = httpx.post(f"{chat.url}/detokenize", json={"tokens": ids}).json()["prompt"]
    assert rendered.startswith("<|im_start|>system\nYou are terse.<|im_end|>")
    assert rendered.endswith("<|im_start|>assistant\n")


def test_metrics_move_with_the_work_done(plain):
    before = metrics(plain)
    client(plain).completions.create(model="tiny", prompt="count me", max_tokens=7, temperature=0,
                                     extra_body={"min_tokens": 7})
    after = metrics(plain)
    assert after["slmforge_generation_tokens_total"] == before["slmforge_generation_tokens_total"] + 7
    assert after["slmforge_prompt_tokens_total"] == before["slmforge_prompt_tokens_total"] + len("count me")
    assert after["slmforge_requests_finished_total"] == before["slmforge_requests_finished_total"] + 1
    assert after["slmforge_requests_running"] == 0 and after["slmforge_max_batch"] == 4
    assert after["slmforge_generation_tokens_per_second"] > 0


def test_a_client_that_goes_away_frees_its_slot_at_once(plain):
    """2000 tokens take seconds; a stream closed after two chunks, and a plain request whose client times
    out, are cancelled long before their end. Counted in tokens, not seconds: on a loaded machine the
    engine's steps and the server's notice of the closed connection slow down together."""
    ask = {"model": "tiny", "prompt": "a long story", "max_tokens": 2000, "min_tokens": 2000, "temperature": 0}
    before = plain.engine.stats()["generated_tokens"]
    with httpx.stream("POST", f"{plain.base_url}/completions", json={**ask, "stream": True}) as response:
        events = 0
        for line in response.iter_lines():
            events += line.startswith("data: ")
            if events == 2:
                break
        assert plain.engine.stats()["running"] == 1
    plain.wait_until_idle(timeout=30)
    assert plain.engine.stats()["generated_tokens"] - before < 1000

    before = plain.engine.stats()["generated_tokens"]
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{plain.base_url}/completions", json=ask, timeout=httpx.Timeout(5, read=0.3))
    plain.wait_until_idle(timeout=30)
    assert plain.engine.stats()["generated_tokens"] - before < 1000


def test_health_and_the_page(plain):
    assert httpx.get(f"{plain.url}/health").json() == {"status": "ok"}
    page = httpx.get(f"{plain.url}/")
    if INDEX_PAGE.is_file():
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    else:
        assert page.status_code == 404 and "index.html" in page.json()["error"]["message"]


def test_cli_serves_and_prints_where(tmp_path):
    checkpoint = plain_checkpoint(tmp_path)
    process = subprocess.Popen([sys.executable, "-m", "slmforge.cli", "serve", str(checkpoint), "--port", "0",
                                "--model-name", "cli", "--device", "cpu", "--max-batch", "2"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "SLMFORGE_API_KEY": "from-the-environment"})
    try:
        line = process.stdout.readline()
        url = re.search(r"at (http://127\.0\.0\.1:\d+/v1) \(API key required\)", line)
        assert url, (line, process.stderr.read() if process.poll() is not None else "")
        with pytest.raises(openai.AuthenticationError):
            client(url.group(1)).models.list()
        response = client(url.group(1), api_key="from-the-environment").completions.create(
            model="cli", prompt="over the wire", max_tokens=3, temperature=0)
        assert response.model == "cli" and response.usage.completion_tokens >= 1
    finally:
        process.terminate()
        process.wait(timeout=30)
    assert process.stderr.read() == ""


def test_cli_refuses_a_port_in_use_in_one_line(plain):
    port = plain.url.rsplit(":", 1)[1]
    done = subprocess.run([sys.executable, "-m", "slmforge.cli", "serve", str(plain.loaded.checkpoint),
                           "--port", port, "--device", "cpu"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.startswith("slmforge: error: cannot listen on 127.0.0.1:") and done.stderr.count("\n") == 1
