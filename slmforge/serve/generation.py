"""Between an HTTP request and the engine: its sequences (a prompt times n) submitted together, their
deltas carried from the engine's thread onto the event loop, and all of them cancelled the moment the
client goes away, so an abandoned request frees its cache slots at once instead of decoding to the end.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from functools import partial

from fastapi import Request as HTTPRequest

from slmforge.infer.engine import Delta, Engine, QueueFull, Request, TokenLogprob
from slmforge.serve.errors import APIError


@dataclass
class Choice:
    """One sequence the client asked for, and what of it the answer shows."""

    index: int
    request: Request
    echo_ids: list[int]  # the prompt's tokens, shown before the completion (echo), else []
    echo_text: str
    # max_tokens=0: the engine generates at least one token (the prompt's log-probabilities come with it);
    # that token is not shown
    hidden: bool = False

    @property
    def token_ids(self) -> list[int]:
        return [] if self.hidden else self.request.output_ids

    @property
    def logprobs(self) -> list[TokenLogprob]:
        return [] if self.hidden else self.request.logprobs

    @property
    def text(self) -> str:
        return "" if self.hidden else self.request.text

    @property
    def finish_reason(self) -> str | None:
        return "length" if self.hidden else self.request.finish_reason


class Generation:
    def __init__(self, engine: Engine, choices: list[Choice]):
        self.engine, self.choices = engine, choices
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[tuple[Choice, Delta]] = asyncio.Queue()
        for choice in choices:
            choice.request.on_delta = partial(self._arrive, choice)
        for k, choice in enumerate(choices):
            try:
                engine.submit(choice.request)
            except (QueueFull, ValueError) as e:
                for earlier in choices[:k]:
                    engine.cancel(earlier.request)
                if isinstance(e, QueueFull):
                    raise APIError(429, f"the server is busy ({e}); retry in a moment", code="queue_full",
                                   headers={"Retry-After": "1"}) from None
                raise APIError(400, str(e), code="invalid_value") from None

    def _arrive(self, choice: Choice, delta: Delta) -> None:
        """Called on the engine's thread."""
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (choice, delta))
        except RuntimeError:  # the event loop has closed (the server stopped): nobody waits for this any more
            pass

    def cancel(self) -> None:
        for choice in self.choices:
            if not choice.request.done.is_set():
                self.engine.cancel(choice.request)

    async def deltas(self, http: HTTPRequest) -> AsyncIterator[tuple[Choice, Delta]]:
        """Each choice's deltas as they come, until every choice has ended. Leaving early (a stream whose
        client went away) cancels what is still running."""
        watcher = asyncio.create_task(self._cancel_on_disconnect(http))
        try:
            running = len(self.choices)
            while running:
                choice, delta = await self.queue.get()
                running -= delta.finish_reason is not None
                yield choice, delta
        finally:
            watcher.cancel()
            self.cancel()

    async def _cancel_on_disconnect(self, http: HTTPRequest) -> None:
        while (await http.receive())["type"] != "http.disconnect":
            pass
        self.cancel()

    async def wait(self, http: HTTPRequest) -> None:
        """Until every choice has ended; a failed one is raised."""
        async for _ in self.deltas(http):
            pass
        for choice in self.choices:
            error = failure(choice.request)
            if error is not None:
                raise error


def failure(request: Request) -> APIError | None:
    """What a request that did not complete answers: 500 when the engine failed on it, 503 when it was
    cancelled by the server stopping."""
    if request.finish_reason == "error":
        return APIError(500, f"generation failed: {request.error}", code="engine_error")
    if request.finish_reason == "cancelled":
        return APIError(503, "the request was cancelled: the server is stopping", code="cancelled")
    return None
