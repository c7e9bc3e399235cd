"""The request bodies the server accepts: OpenAI's fields, vLLM's extras (top_k, min_tokens,
repetition_penalty, stop_token_ids) and vLLM's /tokenize and /detokenize.

Validation is strict (JSON types as written: "5" is not a number, true is not 1, NaN is refused), so a
client's mistake is named in a 400 instead of being guessed at; a field sent as null means its default,
as in OpenAI's API. Unknown fields are ignored, as vLLM does. What needs the model (vocabulary, context
length) is checked later, where the model is known.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from slmforge.infer.sampling import MAX_LOGPROBS

INT64 = 2**63


class Body(BaseModel):
    """A JSON object validated strictly, its null fields taking their defaults."""

    model_config = ConfigDict(strict=True, allow_inf_nan=False, extra="ignore")

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data):
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data


class StreamOptions(Body):
    include_usage: bool = False


class SamplingFields(Body):
    """What completions and chat completions share."""

    model: str | None = None
    max_tokens: int | None = Field(None, ge=0)  # None: what the context leaves
    temperature: float = Field(1.0, ge=0)  # 0: greedy
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=-1)  # 0 or -1 (vLLM's "off"): off
    min_tokens: int = Field(0, ge=0)
    repetition_penalty: float = Field(1.0, gt=0)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    n: int = Field(1, ge=1)
    seed: int | None = Field(None, ge=-INT64, lt=INT64)
    stop: list[str] = []
    stop_token_ids: list[int] = []
    stream: bool = False
    stream_options: StreamOptions | None = None

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_strings(cls, value):
        value = [value] if isinstance(value, str) else value
        if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
            raise ValueError("stop must be a string or a list of strings")
        if not all(value):
            raise ValueError("stop strings must not be empty")
        return value

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _unsupported_penalty(cls, value, info):
        if value != 0:
            raise ValueError(f"{info.field_name} is not supported (use repetition_penalty)")
        return value

    @field_validator("stream_options")
    @classmethod
    def _only_when_streaming(cls, value, info):
        if not info.data.get("stream"):
            raise ValueError("stream_options is only allowed with stream: true")
        return value

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    @property
    def requested_tokens(self) -> int | None:
        return self.max_tokens


class CompletionRequest(SamplingFields):
    prompt: list[str | list[int]]  # one prompt per item, each text or token ids
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    suffix: str | None = None  # fill in the middle: the text after the completion

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompts(cls, value):
        """A string, a list of strings, a list of token ids, or a list of lists of token ids."""
        def ids(x) -> bool:
            return isinstance(x, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in x)

        if isinstance(value, str) or (ids(value) and value):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(p, str) or ids(p) for p in value):
            raise ValueError("prompt must be a string, a list of strings, a list of token ids or a list of lists "
                             "of token ids")
        if not value or not all(value):
            raise ValueError("prompt is empty: a model needs at least one token to continue")
        return value


class ChatMessage(Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str
    name: str | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _text_of_parts(cls, value):
        """OpenAI's list of content parts, joined: this server reads text only."""
        if not isinstance(value, list):
            return value
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in value):
            raise ValueError('content must be a string or a list of {"type": "text", "text": ...} parts '
                             '(this server reads text only)')
        return "".join(p["text"] for p in value)

    def for_template(self) -> dict:
        return self.model_dump(exclude_none=True)


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    max_completion_tokens: int | None = Field(None, ge=0)  # OpenAI's newer name for max_tokens

    @field_validator("top_logprobs")
    @classmethod
    def _logprobs_asked(cls, value, info):
        if not info.data.get("logprobs"):
            raise ValueError("top_logprobs needs logprobs: true")
        return value

    @property
    def requested_tokens(self) -> int | None:
        return self.max_tokens if self.max_completion_tokens is None else self.max_completion_tokens


class TokenizeRequest(Body):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_generation_prompt: bool = True


class DetokenizeRequest(Body):
    model: str | None = None
    tokens: list[int]
