"""The server under load: 64 concurrent streaming clients against 16 cache slots all get their tokens (the
same as the library's greedy decoding), and a tiny queue answers the overflow with 429 and Retry-After."""

import asyncio

import pytest

pytest.importorskip("fastapi", reason="the server needs fastapi (pip install slmforge[serve])")
pytest.importorskip("uvicorn", reason="the server needs uvicorn (pip install slmforge[serve])")
openai = pytest.importorskip("openai", reason="the clients are the openai package's AsyncOpenAI")

import httpx  # noqa: E402

from slmforge.infer import SamplingParams, generate  # noqa: E402

from serve_helpers import RunningServer, plain_checkpoint  # noqa: E402

CLIENTS, TOKENS = 64, 16
TIMEOUT_S = 240  # the whole test; it ends by itself well before


async def stream_one(client: "openai.AsyncOpenAI", prompt: str) -> tuple[str, str | None, int | None]:
    stream = await client.completions.create(model="tiny", prompt=prompt, max_tokens=TOKENS, temperature=0,
                                             stream=True, stream_options={"include_usage": True},
                                             extra_body={"min_tokens": TOKENS})
    text, finish_reason, completion_tokens = "", None, None
    async for chunk in stream:
        for choice in chunk.choices:
            text += choice.text
            finish_reason = choice.finish_reason or finish_reason
        if chunk.usage is not None:
            completion_tokens = chunk.usage.completion_tokens
    return text, finish_reason, completion_tokens


@pytest.mark.slow
def test_64_concurrent_streams_all_complete(tmp_path):
    prompts = [f"client {i}: " + "abcdefg"[: i % 8] for i in range(CLIENTS)]
    with RunningServer(plain_checkpoint(tmp_path), max_batch=16, max_queue=CLIENTS) as server:
        expected = generate(server.model, server.tokenizer, prompts,
                            SamplingParams(max_new_tokens=TOKENS, min_new_tokens=TOKENS, temperature=0))
        peak = 0

        async def watch_slots():
            nonlocal peak
            while True:
                peak = max(peak, server.engine.stats()["running"])
                await asyncio.sleep(0.005)

        async def run():
            watcher = asyncio.create_task(watch_slots())
            async with openai.AsyncOpenAI(base_url=server.base_url, api_key="unused", max_retries=0,
                                          timeout=120) as client:
                results = await asyncio.gather(*(stream_one(client, p) for p in prompts))
            watcher.cancel()
            return results

        results = asyncio.run(asyncio.wait_for(run(), TIMEOUT_S))
        assert server.wait_until_idle() < 5
        assert server.engine.stats()["finished_requests"] == CLIENTS
    assert 1 < peak <= 16
    for (text, finish_reason, completion_tokens), completion in zip(results, expected):
        assert (finish_reason, completion_tokens) == ("length", TOKENS)
        assert text == completion.text


@pytest.mark.slow
def test_a_full_queue_answers_429_with_retry_after(tmp_path):
    with RunningServer(plain_checkpoint(tmp_path), max_batch=1, max_queue=1) as server:
        ask = {"model": "tiny", "max_tokens": 600, "min_tokens": 600, "temperature": 0}

        async def run():
            async with httpx.AsyncClient(base_url=server.base_url, timeout=120) as client:
                return await asyncio.gather(*(client.post("/completions", json={**ask, "prompt": f"request {i}"})
                                              for i in range(8)))

        responses = asyncio.run(asyncio.wait_for(run(), TIMEOUT_S))
        refused = [r for r in responses if r.status_code == 429]
        served = [r for r in responses if r.status_code == 200]
        assert len(refused) + len(served) == 8 and refused and served
        for response in refused:
            assert int(response.headers["retry-after"]) >= 1
            error = response.json()["error"]
            assert error["code"] == "queue_full" and error["type"] == "rate_limit_error" and error["message"]
        assert all(r.json()["usage"]["completion_tokens"] == 600 for r in served)
        assert server.wait_until_idle() < 5
        again = httpx.post(f"{server.base_url}/completions", json={**ask, "prompt": "once it is free"}, timeout=60)
        assert again.status_code == 200
