"""A checkpoint's chat template (Jinja, from tokenizer_config.json) turned into prompt token ids, as
transformers' `apply_chat_template` does it: rendered in an immutable sandbox (a template is code that came
with a download) with `trim_blocks`/`lstrip_blocks`, `raise_exception`, a `tojson` that does not escape
HTML, and `bos_token`/`eos_token`; then tokenized with the special tokens the text spells (`<|im_start|>`)
mapped to their ids, which our `Tokenizer.encode` never does for text (a document that quotes a marker
stays text).
"""

from __future__ import annotations

import json
import re
from datetime import datetime

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from slmforge.tokenizer.tokenizer import Tokenizer

# Markers that end an assistant's turn in the common templates (ChatML, Llama 3, Phi, Gemma): generation
# stops at whichever of them the tokenizer has, as it stops at EOS.
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>")


class TemplateError(ValueError):
    """The template refused the conversation (its `raise_exception`) or failed while rendering it."""


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


class ChatTemplate:
    def __init__(self, source: str, tokenizer: Tokenizer):
        environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        environment.filters["tojson"] = _tojson
        environment.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now)
        try:
            self.template = environment.from_string(source)
        except jinja2.exceptions.TemplateSyntaxError as e:
            raise ValueError(f"the tokenizer's chat_template is not valid Jinja (line {e.lineno}): "
                             f"{e.message}") from None
        self.tokenizer = tokenizer
        names = {i: t for t, i in tokenizer.special_tokens.items()}
        self.bos_token, self.eos_token = names[tokenizer.bos_id], names[tokenizer.eos_id]
        self.end_of_turn_ids = [tokenizer.special_tokens[t] for t in END_OF_TURN if t in tokenizer.special_tokens]
        # longest first, so that a marker that is the start of a longer one does not split it
        markers = sorted(tokenizer.special_tokens, key=len, reverse=True)
        self.marker_pattern = re.compile("(" + "|".join(map(re.escape, markers)) + ")")

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        try:
            # tools and documents given as None, as transformers does: templates test them with `is not none`
            return self.template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                        bos_token=self.bos_token, eos_token=self.eos_token, tools=None,
                                        documents=None)
        except jinja2.exceptions.TemplateError as e:  # raise_exception, a sandbox refusal, an undefined name
            raise TemplateError(f"the chat template refused these messages: {e.message or type(e).__name__}") from None
        except (TypeError, ValueError, KeyError) as e:  # e.g. content that is not what the template concatenates
            raise TemplateError(f"the chat template failed on these messages: {e}") from None

    def encode(self, text: str) -> list[int]:
        """Token ids of rendered text: each special token it spells becomes that token's id."""
        ids: list[int] = []
        for i, piece in enumerate(self.marker_pattern.split(text)):
            if i % 2:
                ids.append(self.tokenizer.special_tokens[piece])
            elif piece:
                ids.extend(self.tokenizer.encode(piece))
        return ids
