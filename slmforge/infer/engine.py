"""The decoding engine: continuous batching over a slot-addressed cache, for every model family.

Requests wait in a bounded queue and join a free cache slot between steps; each step then
- prefills the prompts of newly joined requests in chunks (`prefill_chunk` tokens of work per step at most,
  so a long prompt delays the running streams by one chunk per step, not by its whole length), and
- decodes one token for every running request in one forward,
and a request that finishes or is cancelled leaves its slot at once. Forwards run on views of the
contiguous slot ranges they need (`DecodingCache.slots`), so idle slots cost nothing; new requests take the
lowest free slot, which keeps the running ones together.

Each request has its own sampling settings and random generator, so its tokens do not depend on what else
runs beside it (greedy output alone and among others is the same), and a callback that receives its text
and tokens as they come (`Delta`). The engine is driven by `step()` (synchronous use, tests), or by `run()`
on a thread given over to it (the server's main thread; `start()` makes one); `submit` and `cancel` may be
called from any thread.
"""

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from slmforge.infer.sampling import SamplingParams, sample_rows, top_logprobs
from slmforge.infer.text import TextStream

# (logits [V] of one sequence, the ids it generated so far) -> logits; runs before sampling at every step
LogitsProcessor = Callable[[torch.Tensor, list[int]], torch.Tensor]


class QueueFull(Exception):
    """The engine's queue holds `max_queue` requests already; try again later."""


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float  # under the model's own distribution (raw logits), whatever the sampling settings
    top: list[tuple[int, float]]  # the most likely tokens at this position and theirs, best first


@dataclass
class Delta:
    """What a request gained in one step: text safe to show, tokens, and on the last one why it ended."""

    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob]
    finish_reason: str | None = None  # "stop" (EOS, stop token or string), "length", "cancelled", "error"


@dataclass(eq=False)  # identity, not field values: requests are tracked in queues
class Request:
    prompt_ids: list[int]
    params: SamplingParams
    on_delta: Callable[[Delta], None] | None = None
    logits_processor: LogitsProcessor | None = None
    # results, filled in by the engine
    output_ids: list[int] = field(default_factory=list)  # every generated token, a final EOS included
    text: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob | None] = field(default_factory=list)  # None for the first token
    finish_reason: str | None = None
    error: str | None = None
    submitted_at: float = 0.0
    first_token_at: float | None = None
    finished_at: float | None = None

    def __post_init__(self):
        self.done = threading.Event()
        self.cancelled = False
        self.slot: int | None = None
        self.prefilled = 0  # prompt tokens already in the cache
        self.stream: TextStream | None = None
        self.generator: torch.Generator | None = None
        self.ending_ids: torch.Tensor | None = None  # EOS and stop tokens, held back before min_new_tokens


class Engine:
    def __init__(self, model, eos_id: int | None = None, decode: Callable[[list[int]], str] | None = None,
                 max_batch: int = 16, max_len: int | None = None, prefill_chunk: int = 256, max_queue: int = 256):
        if max_batch < 1 or prefill_chunk < 1 or max_queue < 1:
            raise ValueError("max_batch, prefill_chunk and max_queue must be at least 1")
        self.model, self.eos_id, self.decode = model, eos_id, decode
        self.max_batch, self.prefill_chunk, self.max_queue = max_batch, prefill_chunk, max_queue
        self.max_len = min(max_len or model.cfg.max_seq_len, model.cfg.max_seq_len)
        self.device = model.embed.weight.device
        self.cache = model.new_cache(max_batch, self.max_len)
        self.slots: list[Request | None] = [None] * max_batch
        self.waiting: deque[Request] = deque()
        self.seen: torch.Tensor | None = None  # [slots, V] tokens in each sequence, for repetition penalties
        self.condition = threading.Condition()
        self.thread: threading.Thread | None = None
        self.stopping = False
        self.generated_tokens = self.prompt_tokens = self.finished_requests = 0
        self.recent: deque[tuple[float, int]] = deque()  # (time, tokens generated in the step) of the last seconds

    # ---- the interface for callers (any thread) ----

    def submit(self, request: Request) -> Request:
        """Queue a request; raises ValueError for one that cannot run, QueueFull when the queue is full."""
        n, params = len(request.prompt_ids), request.params
        if n == 0:
            raise ValueError("the prompt is empty: a model needs at least one token to continue")
        vocab = self.model.cfg.vocab_size
        if any(not 0 <= t < vocab for t in request.prompt_ids):
            raise ValueError(f"the prompt holds token ids outside the vocabulary [0, {vocab})")
        if n + params.max_new_tokens > self.max_len:
            raise ValueError(f"the prompt's {n} tokens plus max_tokens={params.max_new_tokens} exceed the "
                             f"context of {self.max_len} tokens")
        request.submitted_at = time.perf_counter()
        with self.condition:
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"{len(self.waiting)} requests are waiting already")
            self.waiting.append(request)
            self.condition.notify()
        return request

    def cancel(self, request: Request) -> None:
        """Stop a request (a client that went away); its slot is freed before the next step."""
        request.cancelled = True
        with self.condition:
            self.condition.notify()

    def generate(self, requests: list[Request]) -> list[Request]:
        """Run requests to the end on the calling thread (the engine must not run its own thread)."""
        if self.thread is not None:
            raise RuntimeError("the engine runs on its own thread: submit requests and wait on request.done")
        for request in requests:
            self.submit(request)
        while not all(r.done.is_set() for r in requests):
            self.step()
        return requests

    def start(self) -> None:
        """Run the engine on a thread of its own until `stop()`."""
        self.thread = threading.Thread(target=self.run, name="slmforge-engine", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        with self.condition:
            self.stopping = True
            self.condition.notify()
        if self.thread is not None:
            self.thread.join()
            self.thread = None

    def stats(self) -> dict:
        now = time.perf_counter()
        with self.condition:  # the engine's thread appends to `recent` meanwhile
            window = [(t, n) for t, n in self.recent if t > now - 10]
        span = now - window[0][0] if window else 0.0
        return {
            "waiting": len(self.waiting), "running": sum(r is not None for r in self.slots),
            "max_batch": self.max_batch, "generated_tokens": self.generated_tokens,
            "prompt_tokens": self.prompt_tokens, "finished_requests": self.finished_requests,
            "tokens_per_s": sum(n for _, n in window) / span if span > 0 else 0.0,
        }

    # ---- scheduling ----

    def run(self) -> None:
        """Serve submitted requests on the calling thread until `stop()` is called from another one. torch's
        CPU thread pool runs decoding steps measurably faster driven from the main thread than from a
        thread started later (README, Serving), so `slmforge serve` runs the engine here, on its main
        thread, and the HTTP server on another."""
        while True:
            with self.condition:
                while not self.stopping and not self.waiting and all(r is None for r in self.slots):
                    self.condition.wait()
                if self.stopping:
                    break
            self.step()
        for request in [*self.waiting, *(r for r in self.slots if r is not None)]:
            self._finish(request, "cancelled")

    def step(self) -> bool:
        """One round: free cancelled slots, admit waiting requests, prefill a chunk, decode a token."""
        for request in self.slots:
            if request is not None and request.cancelled:
                self._finish(request, "cancelled")
        self._admit()
        with torch.inference_mode():
            worked = self._guarded(self._prefilling(), self._prefill)
            worked |= self._guarded(self._decoding(), self._decode)
        return worked

    def _guarded(self, requests: list[Request], run) -> bool:
        """Run one forward for `requests`; if it fails (out of memory, a model error), they end with
        finish_reason "error" and the engine goes on serving the others."""
        if not requests:
            return False
        try:
            run(requests)
        except Exception as error:  # noqa: BLE001 - one failed forward must not stop the server
            for request in requests:
                request.error = f"{type(error).__name__}: {error}"
                self._finish(request, "error")
        return True

    def _admit(self) -> None:
        with self.condition:
            while self.waiting and None in self.slots:
                request = self.waiting.popleft()
                if request.cancelled:
                    self._finish(request, "cancelled")
                    continue
                slot = self.slots.index(None)
                self.slots[slot], request.slot = request, slot
                self.cache.reset(slot)
                request.stream = TextStream(self.decode, request.params.stop)
                request.generator = torch.Generator(device=self.device)
                if request.params.seed is None:
                    request.generator.seed()
                else:
                    request.generator.manual_seed(request.params.seed)
                if request.params.repetition_penalty != 1.0:
                    self._mark_seen(slot, request.prompt_ids, reset=True)

    def _prefilling(self) -> list[Request]:
        return [r for r in self.slots if r is not None and r.prefilled < len(r.prompt_ids)]

    def _decoding(self) -> list[Request]:
        return [r for r in self.slots if r is not None and r.prefilled == len(r.prompt_ids) and r.output_ids]

    # ---- forwards ----

    def _prefill(self, candidates: list[Request]) -> None:
        """The next chunk of as many waiting prompts as fit `prefill_chunk` (rows x width), one forward."""
        group: list[Request] = []
        width = 0
        for request in candidates:
            wider = max(width, min(len(request.prompt_ids) - request.prefilled, self.prefill_chunk))
            if group and (request.slot - group[0].slot + 1) * wider > self.prefill_chunk:
                break
            group.append(request)
            width = wider
        first, last = group[0].slot, group[-1].slot
        # rows end together at the last column (padding before them, position -1), so the last column's
        # logits are every row's next-token logits
        tokens = torch.zeros(last - first + 1, width, dtype=torch.long)
        positions = torch.full_like(tokens, -1)
        chunk: dict[int, tuple[int, int]] = {}
        for request in group:
            start, n = request.prefilled, min(len(request.prompt_ids) - request.prefilled, width)
            chunk[request.slot] = start, n
            tokens[request.slot - first, width - n:] = torch.tensor(request.prompt_ids[start:start + n])
            positions[request.slot - first, width - n:] = torch.arange(start, start + n)
        want_all = any(r.params.prompt_logprobs is not None for r in group)
        logits, _ = self.model(tokens.to(self.device), positions.to(self.device),
                               cache=self._slots(first, last + 1), last_only=not want_all)
        finished = []
        for request in group:
            start, n = chunk[request.slot]
            row = logits[request.slot - first]
            if request.params.prompt_logprobs is not None:
                self._record_prompt_logprobs(request, row[width - n:], start, n)
            request.prefilled += n
            self.prompt_tokens += n
            if request.prefilled == len(request.prompt_ids):  # the whole prompt is in: choose the first token
                finished.append(request)
        if finished:
            self._advance(finished, torch.stack([logits[r.slot - first, -1] for r in finished]))

    def _decode(self, requests: list[Request]) -> None:
        first, last = requests[0].slot, requests[-1].slot
        tokens, positions = [0] * (last - first + 1), [-1] * (last - first + 1)  # idle slots: padding
        for request in requests:
            tokens[request.slot - first] = request.output_ids[-1]
            positions[request.slot - first] = len(request.prompt_ids) + len(request.output_ids) - 1
        logits, _ = self.model(torch.tensor(tokens, device=self.device)[:, None],
                               torch.tensor(positions, device=self.device)[:, None],
                               cache=self._slots(first, last + 1), last_only=True)
        if len(requests) < len(tokens):
            logits = logits[torch.tensor([r.slot - first for r in requests], device=logits.device)]
        self._advance(requests, logits[:, -1])

    def _slots(self, start: int, stop: int):
        """The cache, or the view of the slots a forward runs on."""
        return self.cache if start == 0 and stop == self.max_batch else self.cache.slots(start, stop)

    def _record_prompt_logprobs(self, request: Request, logits: torch.Tensor, start: int, n: int) -> None:
        """Log-probabilities of prompt tokens start+1 .. start+n (each predicted by the one before it);
        the first prompt token has none."""
        if start == 0:
            request.prompt_logprobs.append(None)
        following = request.prompt_ids[start + 1:start + n + 1]
        if following:
            chosen = torch.tensor(following, device=logits.device)
            picked, top = top_logprobs(logits[:len(following)], chosen, request.params.prompt_logprobs)
            request.prompt_logprobs.extend(TokenLogprob(t, lp, alt) for t, lp, alt in zip(following, picked, top))

    def _advance(self, requests: list[Request], logits: torch.Tensor) -> None:
        """Choose each request's next token from its logits row [len(requests), V] and hand it out."""
        if any(r.logits_processor is not None for r in requests):
            logits = torch.stack([row if r.logits_processor is None else r.logits_processor(row, r.output_ids)
                                  for r, row in zip(requests, logits)])
        seen = None
        if self.seen is not None and any(r.params.repetition_penalty != 1.0 for r in requests):
            seen = self.seen[[r.slot for r in requests]]
        suppress = [self._suppressed(r) for r in requests]
        chosen = sample_rows(logits, [r.params for r in requests], [r.generator for r in requests], seen,
                             suppress if any(s is not None for s in suppress) else None)
        wanted = [r.params.logprobs for r in requests if r.params.logprobs is not None]
        picked = top = None
        if wanted:
            picked, top = top_logprobs(logits, chosen, max(wanted))
        now = time.perf_counter()
        for i, (request, token) in enumerate(zip(requests, chosen.tolist())):
            request.output_ids.append(token)
            if request.first_token_at is None:
                request.first_token_at = now
            if request.params.repetition_penalty != 1.0:
                self._mark_seen(request.slot, [token])
            logprobs = []
            if request.params.logprobs is not None:
                logprobs = [TokenLogprob(token, picked[i], top[i][:request.params.logprobs])]
                request.logprobs.extend(logprobs)
            ended = token == self.eos_id or token in request.params.stop_token_ids
            text = "" if ended else request.stream.add([token])
            if request.stream.stopped or ended:
                reason = "stop"
            elif (len(request.output_ids) == request.params.max_new_tokens
                  or len(request.prompt_ids) + len(request.output_ids) >= self.max_len):
                reason = "length"
            else:
                reason = None
            self._emit(request, Delta(text, [token], logprobs))
            if reason is not None:
                self._finish(request, reason)
        self.generated_tokens += len(requests)
        with self.condition:
            self.recent.append((now, len(requests)))
            while self.recent and self.recent[0][0] < now - 10:
                self.recent.popleft()

    def _suppressed(self, request: Request) -> torch.Tensor | None:
        """EOS (and the stop tokens) while fewer than min_new_tokens were generated."""
        if len(request.output_ids) >= request.params.min_new_tokens:
            return None
        if request.ending_ids is None:  # made once per request, not at every step
            ids = [t for t in [self.eos_id, *request.params.stop_token_ids] if t is not None]
            request.ending_ids = torch.tensor(ids, dtype=torch.long, device=self.device)
        return request.ending_ids if request.ending_ids.numel() else None

    def _mark_seen(self, slot: int, ids: list[int], reset: bool = False) -> None:
        if self.seen is None:
            self.seen = torch.zeros(self.max_batch, self.model.cfg.vocab_size, dtype=torch.bool, device=self.device)
        if reset:
            self.seen[slot] = False
        self.seen[slot, torch.tensor(ids, device=self.device)] = True

    def _emit(self, request: Request, delta: Delta) -> None:
        request.text += delta.text
        if request.on_delta is not None and (delta.text or delta.token_ids or delta.finish_reason):
            request.on_delta(delta)

    def _finish(self, request: Request, reason: str) -> None:
        """End a request: its remaining text goes out with the reason, and its slot is free at once."""
        if request.done.is_set():
            return
        with self.condition:
            if request.slot is not None and self.slots[request.slot] is request:
                self.slots[request.slot] = None
            elif request in self.waiting:
                self.waiting.remove(request)
        rest = request.stream.flush() if request.stream is not None and reason != "cancelled" else ""
        request.finish_reason, request.finished_at = reason, time.perf_counter()
        self.finished_requests += 1
        self._emit(request, Delta(rest, [], [], reason))
        request.done.set()
