"""Batched text generation with the KV cache.

Prompts of different lengths are left-padded (pads get position -1, so the cache never stores them) and
prefilled in one forward; then each step feeds one token per sequence, and attends over the cache, so a
step costs O(context). A finished sequence stays in the batch with its tokens ignored until all finish:
simple, and exactly right for the common case of one prompt.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch

from slmforge.infer.sampling import SamplingParams, sample_next

# (logits [B, V], ids generated so far per sequence) -> logits; runs before sampling at every step.
LogitsProcessor = Callable[[torch.Tensor, list[list[int]]], torch.Tensor]


@dataclass
class Completion:
    text: str  # the decoded continuation, cut before the first stop string ("" without a decoder)
    token_ids: list[int]  # every generated token, the EOS or the one completing a stop string included
    finish_reason: str  # "stop": EOS or a stop string; "length": max_new_tokens reached
    n_prompt_tokens: int

    @property
    def n_generated(self) -> int:
        return len(self.token_ids)


class StopStrings:
    """Finds stop strings in a growing continuation by decoding only its last few tokens each step."""

    def __init__(self, stop: list[str], decode: Callable[[list[int]], str]):
        self.stop, self.decode = stop, decode
        # A token decodes to at least one byte, so a stop string of n bytes lies within the last n tokens;
        # one more keeps decoders that treat the first token specially (leading spaces) from missing it.
        self.tail_tokens = max(len(s.encode()) for s in stop) + 1 if stop else 0

    def found_in(self, ids: list[int]) -> bool:
        if not self.stop:
            return False
        tail = self.decode(ids[-self.tail_tokens:])
        return any(s in tail for s in self.stop)

    def cut(self, text: str) -> tuple[str, bool]:
        """The text before the first stop string, and whether there was one."""
        hits = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        return (text[:min(hits)], True) if hits else (text, False)


def left_pad(prompt_ids: list[list[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
    """tokens [B, T] and positions [B, T] (-1 on the padding) of prompts aligned on their last token."""
    width = max(len(ids) for ids in prompt_ids)
    tokens = torch.zeros(len(prompt_ids), width, dtype=torch.long)
    positions = torch.full((len(prompt_ids), width), -1, dtype=torch.long)
    for row, ids in enumerate(prompt_ids):
        tokens[row, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
        positions[row, width - len(ids):] = torch.arange(len(ids))
    return tokens.to(device), positions.to(device)


@torch.inference_mode()
def generate_ids(model, prompt_ids: list[list[int]], params: SamplingParams, eos_id: int | None = None,
                 decode: Callable[[list[int]], str] | None = None,
                 logits_processor: LogitsProcessor | None = None) -> list[Completion]:
    """Continue every prompt (token ids) in one batch; `decode` turns ids into text for stop strings
    and `Completion.text`. The model is used in whatever dtype and device it is in."""
    if params.stop and decode is None:
        raise ValueError("stop strings need a decode function (or use generate() with a tokenizer)")
    for i, ids in enumerate(prompt_ids):
        if len(ids) == 0:
            raise ValueError(f"prompt {i} is empty: a model needs at least one token to continue")
    if not prompt_ids:
        return []
    batch = len(prompt_ids)
    max_len = max(len(ids) for ids in prompt_ids) + params.max_new_tokens
    if max_len > model.cfg.max_seq_len:
        raise ValueError(f"the longest prompt plus max_new_tokens={params.max_new_tokens} is {max_len} tokens, "
                         f"more than the model's max_seq_len={model.cfg.max_seq_len}")
    device = model.embed.weight.device

    generator = torch.Generator(device=device)
    if params.seed is None:
        generator.seed()
    else:
        generator.manual_seed(params.seed)
    seen = None  # [B, V] tokens already in each sequence, for the repetition penalty
    if params.repetition_penalty != 1.0:
        seen = torch.zeros(batch, model.cfg.vocab_size, dtype=torch.bool, device=device)
        for row, ids in enumerate(prompt_ids):
            seen[row, torch.tensor(ids, device=device)] = True
    no_eos = torch.tensor([eos_id], device=device) if eos_id is not None else None
    stop_strings = StopStrings(params.stop, decode)
    generated: list[list[int]] = [[] for _ in range(batch)]
    finish_reason: list[str | None] = [None] * batch

    cache = model.new_cache(batch, max_len)
    tokens, positions = left_pad(prompt_ids, device)
    logits, _ = model(tokens, positions, cache=cache, last_only=True)
    for step in range(params.max_new_tokens):
        step_logits = logits[:, -1]
        if logits_processor is not None:
            step_logits = logits_processor(step_logits, generated)
        suppress = no_eos if step < params.min_new_tokens else None
        next_ids = sample_next(step_logits, seen, params, generator, suppress)
        for row, token in enumerate(next_ids.tolist()):
            if finish_reason[row] is not None:
                continue
            generated[row].append(token)
            if token == eos_id or stop_strings.found_in(generated[row]):
                finish_reason[row] = "stop"
            elif step + 1 == params.max_new_tokens:
                finish_reason[row] = "length"
        if all(reason is not None for reason in finish_reason):
            break
        if seen is not None:
            seen.scatter_(1, next_ids[:, None], True)
        logits, _ = model(next_ids[:, None], cache=cache, last_only=True)

    completions = []
    for ids, reason, prompt in zip(generated, finish_reason, prompt_ids):
        text = ""
        if decode is not None:
            text, stopped = stop_strings.cut(decode(ids))
            reason = "stop" if stopped else reason
        completions.append(Completion(text, ids, reason, len(prompt)))
    return completions


def generate(model, tokenizer, prompts: list[str], params: SamplingParams, add_bos: bool = False,
             logits_processor: LogitsProcessor | None = None) -> list[Completion]:
    """Continue every text prompt in one batch. `add_bos` prepends the tokenizer's BOS token, for models
    trained with it (slmforge's data pipeline separates documents with EOS, so the default is off)."""
    if add_bos and tokenizer.bos_id is None:
        raise ValueError("add_bos=True, but the tokenizer has no BOS token")
    bos = [tokenizer.bos_id] if add_bos else []
    prompt_ids = [bos + tokenizer.encode(prompt) for prompt in prompts]
    return generate_ids(model, prompt_ids, params, eos_id=tokenizer.eos_id, decode=tokenizer.decode,
                        logits_processor=logits_processor)
