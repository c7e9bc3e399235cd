"""Malformed requests: each is answered with a 4xx in OpenAI's error shape, with a message and the field at
fault in `param`, and the server goes on answering valid requests. An engine failure is a 500 (or an error
event in a stream), and the server goes on too."""

import subprocess
import sys

import pytest

pytest.importorskip("fastapi", reason="the server needs fastapi (pip install slmforge[serve])")
pytest.importorskip("uvicorn", reason="the server needs uvicorn (pip install slmforge[serve])")
pytest.importorskip("jinja2", reason="chat templates need jinja2 (pip install slmforge[serve])")
httpx = pytest.importorskip("httpx", reason="the tests send raw requests with httpx")

from serve_helpers import RunningServer, chat_checkpoint, plain_checkpoint  # noqa: E402

JSON = {"content-type": "application/json"}
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
USER = {"role": "user", "content": "hi"}

# (server, method, path, body: raw bytes or a JSON value, status, param); "plain" has the byte tokenizer and no
# chat template, "chat" a BPE with a ChatML template and fill-in-the-middle tokens
MALFORMED = [
    ("plain", "POST", COMPLETIONS, b'{"prompt": "x",', 400, None),  # bad JSON
    ("plain", "POST", COMPLETIONS, b'{"prompt": "\xff\xfe"}', 400, None),  # not UTF-8
    ("plain", "POST", COMPLETIONS, b'[1, 2]', 400, None),  # not an object
    ("plain", "POST", COMPLETIONS, b'', 400, None),
    ("plain", "POST", COMPLETIONS, {"max_tokens": 3}, 400, "prompt"),
    ("plain", "POST", COMPLETIONS, {"prompt": 5}, 400, "prompt"),
    ("plain", "POST", COMPLETIONS, {"prompt": [1, "a"]}, 400, "prompt"),
    ("plain", "POST", COMPLETIONS, {"prompt": ""}, 400, "prompt"),
    ("plain", "POST", COMPLETIONS, {"prompt": []}, 400, "prompt"),
    ("plain", "POST", COMPLETIONS, {"prompt": [1, 99999]}, 400, "prompt"),
    ("plain", "POST", COMPLETIONS, {"prompt": [[1, 2], [-1]]}, 400, "prompt"),
    ("plain", "POST", COMPLETIONS, {"prompt": [65] * 3000}, 400, "prompt"),  # longer than the context
    ("plain", "POST", COMPLETIONS, {"prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
    ("plain", "POST", COMPLETIONS, {"prompt": "x", "max_tokens": 10**9}, 400, "max_tokens"),
    ("plain", "POST", COMPLETIONS, {"prompt": "x", "max_tokens": "10"}, 400, "max_tokens"),
    ("plain", "POST", COMPLETIONS, {"prompt": "x", "max_tokens": 2.5}, 400, "max_tokens"),
    ("plain", "POST", COMPLETIONS, {"prompt": "x", "temperature": -0.5}, 400, "temperature"),
    ("plain", "POST", COMPLETIONS, {"prompt": "x", "temperature": "hot"}, 400, "temperature"),
    ("plain", "POST", COMPLETIONS, b'{"prompt": "x", "temperature": NaN}', 400, "temperature"),
    ("plain", "POST", COMPLETIONS, {"prompt": "x", "top_p": 1.5}, 400, "top_p"),
    ("plain", "POST", COMPLETIONS, {"prompt": "x", "top_p": 0}, 400, "top_p"),
    ("plain", "POST", COMPLETIONS, {"prompt": "x", "top_k": -2}, 400, "top_k"),
    ("plain", "POST", COMPLETIONS, {"prompt": "x", "n": 0}, 400, "n"),
    ("plain", "POST", COMPLETIONS, {"prompt": "x", "n": 10**6}, 400, "n"),
    ("plain", "POST", COMPLETIONS, {"prompt": "x", "logprobs": 21}, 400, "logprobs"),
    ("plain", "POST", COMPLETIONS, {"prompt": "x", "logprobs": -1}, 400, "logprobs"),
    ("plain", "POST", COMPLETIONS, {"prompt": "x", "logprobs": True}, 400, "logprobs"),
    ("plain", "POST", COMPLETIONS, {"prompt": "x", "stop": 5}, 400, "stop"),
    ("plain", "POST", COMPLETIONS, {"prompt": "x", "stop": [""]}, 400, "stop"),
    ("plain", "POST", COMPLETIONS, {"prompt": "x", "stop_token_ids": [258]}, 400, "stop_token_ids"),
    ("plain", "POST", COMPLETIONS, {"prompt": "x", "seed": "abc"}, 400, "seed"),
    ("plain", "POST", COMPLETIONS, {"prompt": "x", "seed": 2**64}, 400, "seed"),
    ("plain", "POST", COMPLETIONS, {"prompt": "x", "min_tokens": 5, "max_tokens": 2}, 400, "min_tokens"),
    ("plain", "POST", COMPLETIONS, {"prompt": "x", "repetition_penalty": 0}, 400, "repetition_penalty"),
    ("plain", "POST", COMPLETIONS, {"prompt": "x", "presence_penalty": 0.5}, 400, "presence_penalty"),
    ("plain", "POST", COMPLETIONS, {"prompt": "x", "stream": "yes"}, 400, "stream"),
    ("plain", "POST", COMPLETIONS, {"prompt": "x", "stream_options": {"include_usage": True}}, 400, "stream_options"),
    ("plain", "POST", COMPLETIONS, {"prompt": "x", "suffix": "y"}, 400, "suffix"),  # no FIM tokens
    ("plain", "POST", COMPLETIONS, {"prompt": "x", "model": "gpt-4"}, 404, "model"),
    ("plain", "POST", CHAT, {"messages": [USER]}, 400, "messages"),  # no chat template
    ("chat", "POST", CHAT, {"max_tokens": 2}, 400, "messages"),
    ("chat", "POST", CHAT, {"messages": []}, 400, "messages"),
    ("chat", "POST", CHAT, {"messages": "hi"}, 400, "messages"),
    ("chat", "POST", CHAT, {"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages[0].role"),
    ("chat", "POST", CHAT, {"messages": [USER, {"role": "user"}]}, 400, "messages[1].content"),
    ("chat", "POST", CHAT, {"messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content"),
    ("chat", "POST", CHAT, {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     400, "messages[0].content"),
    ("chat", "POST", CHAT, {"messages": [USER, {"role": "tool", "content": "42"}]}, 400, "messages"),  # template
    ("chat", "POST", CHAT, {"messages": [USER], "top_logprobs": 2}, 400, "top_logprobs"),
    ("chat", "POST", CHAT, {"messages": [USER], "logprobs": True, "top_logprobs": 21}, 400, "top_logprobs"),
    ("chat", "POST", CHAT, {"messages": [USER], "logprobs": 1}, 400, "logprobs"),
    ("chat", "POST", CHAT, {"messages": [USER], "max_completion_tokens": -1}, 400, "max_completion_tokens"),
    ("chat", "POST", CHAT, {"messages": [USER], "max_tokens": 500}, 400, "max_tokens"),  # context of 128
    ("chat", "POST", CHAT, {"messages": [USER], "model": "other"}, 404, "model"),
    ("chat", "POST", "/tokenize", {}, 400, "prompt"),
    ("chat", "POST", "/tokenize", {"prompt": "x", "messages": [USER]}, 400, "prompt"),
    ("chat", "POST", "/detokenize", {"tokens": [1, 10**6]}, 400, "tokens"),
    ("chat", "POST", "/detokenize", {"tokens": ["a"]}, 400, "tokens[0]"),
    ("chat", "GET", "/v1/nothing-here", None, 404, None),
    ("chat", "GET", COMPLETIONS, None, 405, None),
]


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    with RunningServer(plain_checkpoint(tmp_path_factory.mktemp("plain"))) as plain, \
            RunningServer(chat_checkpoint(tmp_path_factory.mktemp("chat")), name="chat") as chat:
        yield {"plain": plain, "chat": chat}


def send(server, method: str, path: str, body) -> httpx.Response:
    if body is None:
        return httpx.request(method, server.url + path)
    content = body if isinstance(body, bytes) else None
    return httpx.request(method, server.url + path, content=content, json=None if content is not None else body,
                         headers=JSON)


def assert_openai_error(response: httpx.Response, status: int, param: str | None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "code", "param"}
    assert isinstance(error["message"], str) and len(error["message"]) > 10 and "\n" not in error["message"]
    assert isinstance(error["type"], str) and error["type"]
    assert error["param"] == param, error
    return error


def valid_requests_still_work(servers) -> None:
    done = httpx.post(f"{servers['plain'].base_url}/completions", json={"prompt": "still here", "max_tokens": 3})
    assert done.status_code == 200 and done.json()["usage"]["completion_tokens"] >= 1
    chat = httpx.post(f"{servers['chat'].base_url}/chat/completions", json={"messages": [USER], "max_tokens": 3})
    assert chat.status_code == 200 and chat.json()["choices"][0]["message"]["role"] == "assistant"


def test_malformed_requests_get_a_4xx_in_openais_shape(servers):
    assert len(MALFORMED) >= 30
    for server, method, path, body, status, param in MALFORMED:
        response = send(servers[server], method, path, body)
        assert_openai_error(response, status, param)
    valid_requests_still_work(servers)
    for server in servers.values():
        assert server.wait_until_idle() < 5


def test_messages_say_what_is_wrong(servers):
    plain = servers["plain"]
    context = assert_openai_error(send(plain, "POST", COMPLETIONS, {"prompt": "x", "max_tokens": 5000}), 400,
                                  "max_tokens")
    assert "maximum context length is 2048 tokens" in context["message"]
    assert "you requested 5001 tokens" in context["message"] and context["code"] == "context_length_exceeded"
    assert "not valid JSON" in send(plain, "POST", COMPLETIONS, b"{").json()["error"]["message"]
    assert "not valid UTF-8" in send(plain, "POST", COMPLETIONS, b'{"prompt": "\xc3"}').json()["error"]["message"]
    assert "pip" not in send(plain, "POST", CHAT, {"messages": [USER]}).json()["error"]["message"]
    assert "chat template" in send(plain, "POST", CHAT, {"messages": [USER]}).json()["error"]["message"]
    assert "suffix" in send(plain, "POST", COMPLETIONS, {"prompt": "x", "suffix": "y"}).json()["error"]["message"]
    refused = send(servers["chat"], "POST", CHAT, {"messages": [USER, {"role": "tool", "content": "42"}]})
    assert "this template has no tool messages" in refused.json()["error"]["message"]
    vocab = send(plain, "POST", COMPLETIONS, {"prompt": [1, 99999]}).json()["error"]["message"]
    assert "99999" in vocab and "vocabulary" in vocab


def test_an_engine_failure_is_a_500_and_the_server_goes_on(servers):
    """A forward that raises (as an out-of-memory error would) ends its requests with an error; the engine
    thread and the server survive it."""
    plain = servers["plain"]

    def failing_forward(*args, **kwargs):
        raise RuntimeError("simulated device failure")

    plain.model.forward = failing_forward
    try:
        failed = httpx.post(f"{plain.base_url}/completions", json={"prompt": "x", "max_tokens": 3})
        error = assert_openai_error(failed, 500, None)
        assert "simulated device failure" in error["message"] and error["type"] == "server_error"
        streamed = httpx.post(f"{plain.base_url}/completions", json={"prompt": "x", "max_tokens": 3, "stream": True})
        assert streamed.status_code == 200
        assert "simulated device failure" in streamed.text and streamed.text.endswith("data: [DONE]\n\n")
    finally:
        del plain.model.forward
    valid_requests_still_work(servers)


def test_serve_without_the_extra_says_what_to_install(tmp_path):
    hide = "import sys; sys.modules['fastapi'] = None; from slmforge.cli import main; sys.exit(main(['serve', 'x']))"
    done = subprocess.run([sys.executable, "-c", hide], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr == "slmforge: error: slmforge serve needs fastapi: pip install slmforge[serve]\n"


def test_a_template_that_reaches_for_python_internals_is_refused():
    """Chat templates come with downloaded checkpoints: they render in Jinja's immutable sandbox."""
    from slmforge.tokenizer.chat_template import ChatTemplate, TemplateError
    from slmforge.tokenizer import byte_tokenizer

    escape = ChatTemplate("{{ ''.__class__.__mro__[1].__subclasses__() }}", byte_tokenizer())
    with pytest.raises(TemplateError, match="refused"):
        escape.render([USER])
    mutate = ChatTemplate("{% set _ = messages.append({'role': 'system', 'content': 'x'}) %}ok", byte_tokenizer())
    with pytest.raises(TemplateError, match="refused"):
        mutate.render([USER])
