"""The OpenAI-compatible HTTP API over the decoding engine, as vLLM and llama.cpp's server expose it:

    GET  /v1/models              the model served
    POST /v1/completions         text or token-id prompts; echo, legacy logprobs, suffix (fill in the middle)
    POST /v1/chat/completions    the checkpoint's chat template; logprobs and top_logprobs
    POST /tokenize, /detokenize  vLLM's: text or a chat -> token ids, and back
    GET  /health, /metrics       liveness (never behind the API key); the engine's numbers for Prometheus
    GET  /                       the web page in static/index.html

`n`, `seed` (seed + i for the i-th of n), `stop`, `max_tokens` (by default what the context leaves),
temperature, top_p, top_k, min_tokens, repetition_penalty; `stream` as server-sent events. The engine runs
on its own thread from the app's startup to its shutdown.
"""

from __future__ import annotations

import hmac
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import APIRouter, Depends, FastAPI, Request as HTTPRequest
from fastapi.responses import FileResponse, PlainTextResponse, StreamingResponse

from slmforge.data.fim import find_fim_ids, missing_fim_tokens
from slmforge.infer.engine import Delta, Engine, Request
from slmforge.infer.sampling import SamplingParams
from slmforge.serve.errors import APIError, install_error_handlers
from slmforge.serve.generation import Choice, Generation, failure
from slmforge.serve.protocol import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    DetokenizeRequest,
    SamplingFields,
    TokenizeRequest,
)
from slmforge.serve.responses import LegacyLogprobs, chat_logprobs, envelope, new_id, usage
from slmforge.tokenizer import Tokenizer
from slmforge.tokenizer.chat_template import ChatTemplate, TemplateError

INDEX_PAGE = Path(__file__).parent / "static" / "index.html"


class ServedModel:
    """The model behind the API and what the routes check requests against."""

    def __init__(self, engine: Engine, tokenizer: Tokenizer, name: str):
        self.engine, self.tokenizer, self.name = engine, tokenizer, name
        self.max_len, self.vocab_size = engine.max_len, engine.model.cfg.vocab_size
        self.chat = ChatTemplate(tokenizer.chat_template, tokenizer) if tokenizer.chat_template else None
        self.fim = find_fim_ids(tokenizer)
        self.token_texts: dict[int, str] = {}

    def token_text(self, token_id: int) -> str:
        if token_id not in self.token_texts:
            self.token_texts[token_id] = self.tokenizer.decode([token_id], skip_special=False)
        return self.token_texts[token_id]

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.name:
            raise APIError(404, f"the model `{name}` does not exist: this server serves `{self.name}`",
                           param="model", code="model_not_found")

    def check_ids(self, ids: list[int], param: str) -> None:
        outside = next((t for t in ids if not 0 <= t < self.vocab_size), None)
        if outside is not None:
            raise APIError(400, f"{param}: token id {outside} is outside the vocabulary [0, {self.vocab_size})",
                           param=param, code="invalid_value")

    def chat_ids(self, messages: list[ChatMessage], add_generation_prompt: bool = True) -> list[int]:
        if self.chat is None:
            raise APIError(400, f"the model `{self.name}` has no chat template (no chat_template in its "
                           "tokenizer_config.json): use /v1/completions", param="messages", code="no_chat_template")
        try:
            text = self.chat.render([m.for_template() for m in messages], add_generation_prompt)
        except TemplateError as e:
            raise APIError(400, str(e), param="messages", code="invalid_value") from None
        return self.chat.encode(text)

    def prompt_ids(self, prompt: str | list[int], suffix: str | None, param: str) -> list[int]:
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        self.check_ids(ids, param)
        if suffix is None:
            return ids
        if self.fim is None:
            raise APIError(400, f"suffix: the model `{self.name}` cannot fill in the middle: "
                           f"{missing_fim_tokens(self.tokenizer)}", param="suffix", code="invalid_value")
        return self.fim.psm_prompt(ids, self.tokenizer.encode(suffix))

    def budget(self, n_prompt: int, body: SamplingFields, param: str) -> int:
        """The most tokens a completion after `n_prompt` prompt tokens may have: max_tokens, within the context."""
        requested = body.requested_tokens
        if n_prompt >= self.max_len:
            raise APIError(400, f"This model's maximum context length is {self.max_len} tokens. However, your "
                           f"prompt is {n_prompt} tokens, which leaves no room for the completion. Please shorten "
                           "the prompt.", param=param, code="context_length_exceeded")
        if requested is not None and n_prompt + requested > self.max_len:
            raise APIError(400, f"This model's maximum context length is {self.max_len} tokens. However, you "
                           f"requested {n_prompt + requested} tokens ({n_prompt} in the prompt, {requested} for the "
                           "completion). Please reduce the length of the prompt or the completion.",
                           param="max_tokens", code="context_length_exceeded")
        most = self.max_len - n_prompt if requested is None else requested
        if body.min_tokens > most:
            raise APIError(400, f"min_tokens={body.min_tokens} is more than the {most} tokens the completion may "
                           "have", param="min_tokens", code="invalid_value")
        return most

    def choices(self, body: SamplingFields, prompts: list[list[int]], echo: list[str] | None, logprobs: int | None,
                prompt_logprobs: int | None, stop_token_ids: list[int], param: str) -> list[Choice]:
        """n choices per prompt, choice p * n + i the i-th of prompt p."""
        self.check_ids(body.stop_token_ids, "stop_token_ids")
        if len(prompts) * body.n > self.engine.max_queue:
            raise APIError(400, f"n: {len(prompts) * body.n} sequences are more than the server queues at once "
                           f"({self.engine.max_queue})", param="n", code="invalid_value")
        choices = []
        for p, ids in enumerate(prompts):
            most = self.budget(len(ids), body, param)
            for i in range(body.n):
                params = SamplingParams(
                    max_new_tokens=max(most, 1), min_new_tokens=body.min_tokens, temperature=body.temperature,
                    top_k=max(body.top_k, 0), top_p=body.top_p, repetition_penalty=body.repetition_penalty,
                    stop=body.stop, stop_token_ids=stop_token_ids, logprobs=logprobs, prompt_logprobs=prompt_logprobs,
                    seed=None if body.seed is None else body.seed + i)
                choices.append(Choice(p * body.n + i, Request(ids, params), ids if echo is not None else [],
                                      echo[p] if echo is not None else "", hidden=most == 0))
        return choices


def create_app(engine: Engine, tokenizer: Tokenizer, model_name: str, api_key: str | None = None,
               run_engine: bool = True) -> FastAPI:
    """The app serving `engine`'s model. With `run_engine`, it starts the engine on a thread at startup and
    stops it at shutdown; without, the caller runs it (`slmforge serve`: on the main thread).
    With `api_key`, every route but /health and / wants `Authorization: Bearer <api_key>`."""
    served = ServedModel(engine, tokenizer, model_name)
    started = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if run_engine:
            engine.start()
        try:
            yield
        finally:
            if run_engine:
                engine.stop()

    async def authorized(http: HTTPRequest) -> None:
        if not api_key:
            return
        scheme, _, key = http.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), api_key.encode()):
            raise APIError(401, "a missing or wrong API key: send Authorization: Bearer <the server's --api-key>",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    app = FastAPI(title="slmforge", lifespan=lifespan)
    install_error_handlers(app)
    api = APIRouter(dependencies=[Depends(authorized)])

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        if not INDEX_PAGE.is_file():
            raise APIError(404, f"no web page: {INDEX_PAGE} is missing; the API is under /v1", code="not_found")
        return FileResponse(INDEX_PAGE)

    @api.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": served.name, "object": "model", "created": started,
                                            "owned_by": "slmforge", "max_model_len": served.max_len}]}

    @api.post("/v1/completions")
    async def completions(body: CompletionRequest, http: HTTPRequest):
        served.check_model(body.model)
        prompts = [served.prompt_ids(p, body.suffix, "prompt") for p in body.prompt]
        echo = None
        if body.echo:
            echo = [p if isinstance(p, str) else tokenizer.decode(p, skip_special=False) for p in body.prompt]
        choices = served.choices(body, prompts, echo, body.logprobs,
                                 body.logprobs if body.echo else None, body.stop_token_ids, "prompt")
        generation = Generation(engine, choices)
        prompt_tokens = sum(map(len, prompts))
        if body.stream:
            return event_stream(completion_events(served, body, generation, http, prompt_tokens))
        await generation.wait(http)
        answers = []
        for choice in choices:
            logprobs = None
            if body.logprobs is not None:
                prompt_part = choice.request.prompt_logprobs if body.echo else []
                logprobs = LegacyLogprobs(served.token_text).entries([*prompt_part, *choice.logprobs],
                                                                     [*choice.echo_ids, *choice.token_ids])
            answers.append({"index": choice.index, "text": choice.echo_text + choice.text, "logprobs": logprobs,
                            "finish_reason": choice.finish_reason})
        completion_tokens = sum(len(c.token_ids) for c in choices)
        return envelope("text_completion", new_id("cmpl"), served.name, answers,
                        usage=usage(prompt_tokens, completion_tokens))

    @api.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, http: HTTPRequest):
        served.check_model(body.model)
        ids = served.chat_ids(body.messages)
        top = (body.top_logprobs or 0) if body.logprobs else None
        choices = served.choices(body, [ids], None, top, None, [*served.chat.end_of_turn_ids, *body.stop_token_ids],
                                 "messages")
        generation = Generation(engine, choices)
        if body.stream:
            return event_stream(chat_events(served, body, generation, http, len(ids)))
        await generation.wait(http)
        answers = [{"index": c.index, "message": {"role": "assistant", "content": c.text},
                    "logprobs": chat_logprobs(c.logprobs, served.token_text) if body.logprobs else None,
                    "finish_reason": c.finish_reason} for c in choices]
        completion_tokens = sum(len(c.token_ids) for c in choices)
        return envelope("chat.completion", new_id("chatcmpl"), served.name, answers,
                        usage=usage(len(ids), completion_tokens))

    @api.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> dict:
        served.check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "give either prompt (text) or messages (a chat), not both or neither",
                           param="prompt", code="invalid_value")
        if body.prompt is not None:
            ids = tokenizer.encode(body.prompt)
        else:
            ids = served.chat_ids(body.messages, body.add_generation_prompt)
        return {"tokens": ids, "count": len(ids), "max_model_len": served.max_len}

    @api.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> dict:
        served.check_model(body.model)
        served.check_ids(body.tokens, "tokens")
        return {"prompt": tokenizer.decode(body.tokens, skip_special=False)}

    @api.get("/metrics")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(prometheus_text(engine.stats()), media_type="text/plain; version=0.0.4")

    app.include_router(api)
    return app


METRICS = (  # (name, Prometheus type, engine.stats() key, help)
    ("slmforge_requests_waiting", "gauge", "waiting", "Requests in the engine's queue, not yet decoding."),
    ("slmforge_requests_running", "gauge", "running", "Requests holding a cache slot."),
    ("slmforge_max_batch", "gauge", "max_batch", "Cache slots: requests that can decode at once."),
    ("slmforge_generation_tokens_per_second", "gauge", "tokens_per_s", "Tokens generated per second, last 10 s."),
    ("slmforge_generation_tokens_total", "counter", "generated_tokens", "Tokens generated since the start."),
    ("slmforge_prompt_tokens_total", "counter", "prompt_tokens", "Prompt tokens prefilled since the start."),
    ("slmforge_requests_finished_total", "counter", "finished_requests", "Requests ended, for any reason."),
)


def prometheus_text(stats: dict) -> str:
    lines = []
    for name, kind, key, help_text in METRICS:
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", f"{name} {stats[key]}"]
    return "\n".join(lines) + "\n"


def event_stream(events: AsyncIterator[dict]) -> StreamingResponse:
    """Server-sent events: `data: {json}` per event, then `data: [DONE]`."""
    async def lines():
        async for event in events:
            yield f"data: {json.dumps(event, ensure_ascii=False)}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(lines(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


class StreamFailed(Exception):
    """The engine failed on a streamed choice: the stream ends with `error`'s body."""

    def __init__(self, error: APIError):
        super().__init__(error)
        self.error = error


async def shown_deltas(generation: Generation, http: HTTPRequest) -> AsyncIterator[tuple[Choice, Delta]]:
    """What a stream shows of each choice: a delta per token (its text may be empty while a character's
    bytes are still to come) and the end; of a hidden choice (max_tokens 0) only the end."""
    async for choice, delta in generation.deltas(http):
        error = failure(choice.request) if delta.finish_reason else None
        if error is not None:
            raise StreamFailed(error)
        if choice.hidden:
            if delta.finish_reason:
                yield choice, Delta("", [], [], choice.finish_reason)
        elif delta.token_ids or delta.text or delta.finish_reason:
            yield choice, delta


async def completion_events(served: ServedModel, body: CompletionRequest, generation: Generation,
                            http: HTTPRequest, prompt_tokens: int) -> AsyncIterator[dict]:
    response_id, created = new_id("cmpl"), int(time.time())
    extra = {"usage": None} if body.include_usage else {}
    logprobs = {c.index: LegacyLogprobs(served.token_text) for c in generation.choices}

    def chunk(index: int, text: str, entries: dict | None = None, finish_reason: str | None = None) -> dict:
        return envelope("text_completion", response_id, served.name,
                        [{"index": index, "text": text, "logprobs": entries, "finish_reason": finish_reason}],
                        created, **extra)

    if body.echo:
        for c in generation.choices:
            entries = (logprobs[c.index].entries(c.request.prompt_logprobs, c.echo_ids)
                       if body.logprobs is not None else None)
            yield chunk(c.index, c.echo_text, entries)
    try:
        async for choice, delta in shown_deltas(generation, http):
            entries = None
            if body.logprobs is not None and delta.token_ids:
                entries = logprobs[choice.index].entries(delta.logprobs, delta.token_ids)
            yield chunk(choice.index, delta.text, entries, delta.finish_reason)
    except StreamFailed as failed:
        yield failed.error.body()
        return
    if body.include_usage:
        completion_tokens = sum(len(c.token_ids) for c in generation.choices)
        yield envelope("text_completion", response_id, served.name, [], created,
                       usage=usage(prompt_tokens, completion_tokens))


async def chat_events(served: ServedModel, body: ChatCompletionRequest, generation: Generation,
                      http: HTTPRequest, prompt_tokens: int) -> AsyncIterator[dict]:
    response_id, created = new_id("chatcmpl"), int(time.time())
    extra = {"usage": None} if body.include_usage else {}

    def chunk(index: int, delta: dict, logprobs: dict | None = None, finish_reason: str | None = None) -> dict:
        return envelope("chat.completion.chunk", response_id, served.name,
                        [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}],
                        created, **extra)

    for c in generation.choices:
        yield chunk(c.index, {"role": "assistant", "content": ""})
    try:
        async for choice, delta in shown_deltas(generation, http):
            logprobs = chat_logprobs(delta.logprobs, served.token_text) if body.logprobs and delta.logprobs else None
            yield chunk(choice.index, {"content": delta.text} if delta.text else {}, logprobs, delta.finish_reason)
    except StreamFailed as failed:
        yield failed.error.body()
        return
    if body.include_usage:
        completion_tokens = sum(len(c.token_ids) for c in generation.choices)
        yield envelope("chat.completion.chunk", response_id, served.name, [], created,
                       usage=usage(prompt_tokens, completion_tokens))
