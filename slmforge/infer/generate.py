"""Generation for a known list of prompts: every prompt continued by the decoding engine
(`slmforge.infer.engine`), run on the calling thread, with one cache slot per prompt."""

from collections.abc import Callable
from dataclasses import dataclass

from slmforge.infer.engine import Engine, LogitsProcessor, Request
from slmforge.infer.sampling import SamplingParams


@dataclass
class Completion:
    text: str  # the decoded continuation, cut before the first stop string ("" without a decoder)
    token_ids: list[int]  # every generated token, the EOS or the one completing a stop string included
    finish_reason: str  # "stop": EOS or a stop string; "length": max_new_tokens reached
    n_prompt_tokens: int

    @property
    def n_generated(self) -> int:
        return len(self.token_ids)


def generate_ids(model, prompt_ids: list[list[int]], params: SamplingParams, eos_id: int | None = None,
                 decode: Callable[[list[int]], str] | None = None,
                 logits_processor: LogitsProcessor | None = None) -> list[Completion]:
    """Continue every prompt (token ids); `decode` turns ids into text for stop strings and
    `Completion.text`; `logits_processor` runs on each sequence's logits before sampling. The model is used
    in whatever dtype and device it is in."""
    if params.stop and decode is None:
        raise ValueError("stop strings need a decode function (or use generate() with a tokenizer)")
    for i, ids in enumerate(prompt_ids):
        if len(ids) == 0:
            raise ValueError(f"prompt {i} is empty: a model needs at least one token to continue")
    if not prompt_ids:
        return []
    max_len = max(len(ids) for ids in prompt_ids) + params.max_new_tokens
    if max_len > model.cfg.max_seq_len:
        raise ValueError(f"the longest prompt plus max_new_tokens={params.max_new_tokens} is {max_len} tokens, "
                         f"more than the model's max_seq_len={model.cfg.max_seq_len}")
    engine = Engine(model, eos_id, decode, max_batch=len(prompt_ids), max_len=max_len, max_queue=len(prompt_ids))
    requests = engine.generate([Request(list(ids), params, logits_processor=logits_processor) for ids in prompt_ids])
    for request in requests:
        if request.finish_reason == "error":
            raise RuntimeError(f"generation failed: {request.error}")
    return [Completion(r.text, r.output_ids, r.finish_reason, len(r.prompt_ids)) for r in requests]


def generate(model, tokenizer, prompts: list[str], params: SamplingParams, add_bos: bool = False,
             logits_processor: LogitsProcessor | None = None) -> list[Completion]:
    """Continue every text prompt. `add_bos` prepends the tokenizer's BOS token, for models trained with it
    (slmforge's data pipeline separates documents with EOS, so the default is off)."""
    if add_bos and tokenizer.bos_id is None:
        raise ValueError("add_bos=True, but the tokenizer has no BOS token")
    bos = [tokenizer.bos_id] if add_bos else []
    prompt_ids = [bos + tokenizer.encode(prompt) for prompt in prompts]
    return generate_ids(model, prompt_ids, params, eos_id=tokenizer.eos_id, decode=tokenizer.decode,
                        logits_processor=logits_processor)
