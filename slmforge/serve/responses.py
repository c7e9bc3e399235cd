"""The JSON the server answers with: completions, chat completions, their streamed chunks, usage and
log-probabilities, in the formats OpenAI's clients parse.

Log-probabilities come in two formats. Completions use the legacy one (`tokens`, `token_logprobs`,
`top_logprobs` as {token text: logprob}, `text_offset`), which lm-eval's `local-completions` reads to score
prompts (with echo, the prompt's tokens come first, the first of them with null since nothing predicts
it); chat uses the newer one (a list of {token, logprob, bytes, top_logprobs}). A token's text is its own
decoding with special tokens shown, so "<|im_end|>" appears as itself and a byte of an unfinished UTF-8
character as U+FFFD.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable

from slmforge.infer.engine import TokenLogprob

TokenText = Callable[[int], str]


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def envelope(kind: str, response_id: str, model: str, choices: list[dict], created: int | None = None,
             **extra) -> dict:
    """A response, or one chunk of a stream (whose chunks share `created`)."""
    return {"id": response_id, "object": kind, "created": int(time.time()) if created is None else created,
            "model": model, "choices": choices, **extra}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


class LegacyLogprobs:
    """The completions format, built up as tokens come; `text_offset` counts characters of the choice's
    text (the echoed prompt included) from 0."""

    def __init__(self, token_text: TokenText):
        self.token_text = token_text
        self.offset = 0

    def entries(self, logprobs: list[TokenLogprob | None], token_ids: list[int]) -> dict:
        """`logprobs[i]` for token `token_ids[i]`; None where nothing predicts the token (a prompt's first)."""
        out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for token_id, logprob in zip(token_ids, logprobs):
            text = self.token_text(token_id)
            out["tokens"].append(text)
            out["text_offset"].append(self.offset)
            self.offset += len(text)
            if logprob is None:
                out["token_logprobs"].append(None)
                out["top_logprobs"].append(None)
                continue
            out["token_logprobs"].append(logprob.logprob)
            top: dict[str, float] = {}
            for alternative, value in [*logprob.top, (logprob.token_id, logprob.logprob)]:  # best first, as vLLM:
                top.setdefault(self.token_text(alternative), value)  # the chosen token always among them
            out["top_logprobs"].append(top)
        return out


def chat_logprobs(logprobs: list[TokenLogprob], token_text: TokenText) -> dict:
    def entry(token_id: int, value: float) -> dict:
        text = token_text(token_id)
        return {"token": text, "logprob": value, "bytes": list(text.encode("utf-8"))}

    return {"content": [{**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]}
                        for lp in logprobs]}
