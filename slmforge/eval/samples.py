"""`slmforge eval RUN --task samples`: a table of continuations of a list of prompts, for eyes rather than
numbers (the Shard card's table: its six prompts at temperature 0.7, top-p 0.9 by default).

`generate_all` (the decoding engine over a list of prompts, a few at a time) and `fit_to_context` serve
the `gsm8k` task too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from slmforge.eval.task import TaskResult

# The prompts of the Shard card's sample table (seed card 001), used when no prompt is given.
DEFAULT_PROMPTS = [
    "The capital of France is",
    "To compute 12 plus 7, we can",
    "Question: What is 23 + 19? Answer:",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "Solve: 17 * 23 = ?",
]
DEFAULTS = {"temperature": 0.7, "top_p": 0.9, "max_new_tokens": 64, "seed": 0}


def fit_to_context(prompt_ids: list[int], max_new_tokens: int, context: int) -> tuple[list[int], int, int]:
    """(prompt ids, max_new_tokens, prompt tokens cut) such that prompt + new tokens fit `context`: when they
    do not, the generation keeps at least half the context (or what it asked for, if less) and the prompt
    loses its oldest tokens."""
    if len(prompt_ids) + max_new_tokens <= context:
        return prompt_ids, max_new_tokens, 0
    budget = max(context - len(prompt_ids), min(max_new_tokens, context // 2))
    keep = max(1, context - budget)
    return prompt_ids[-keep:], context - keep, max(0, len(prompt_ids) - keep)


def generate_all(loaded, prompt_ids: list[list[int]], params: list, max_batch: int = 8,
                 progress: bool = False, desc: str = "generate") -> list:
    """Run every prompt (token ids, with its own SamplingParams) through the decoding engine, `max_batch` at
    a time; the finished `Request`s in the prompts' order. A request the engine failed raises RuntimeError."""
    from tqdm import tqdm

    from slmforge.infer.engine import Engine, Request

    if not prompt_ids:
        return []
    tokenizer = loaded.tokenizer
    engine = Engine(loaded.model, tokenizer.eos_id, tokenizer.decode, max_batch=min(max_batch, len(prompt_ids)),
                    max_queue=len(prompt_ids))
    bar = tqdm(total=len(prompt_ids), desc=desc, unit=" prompts", disable=not progress)

    def on_delta(delta):
        if delta.finish_reason is not None:
            bar.update(1)

    requests = [Request(list(ids), p, on_delta=on_delta) for ids, p in zip(prompt_ids, params)]
    try:
        engine.generate(requests)
    finally:
        bar.close()
    for request in requests:
        if request.finish_reason == "error":
            raise RuntimeError(f"generation failed: {request.error}")
    return requests


@dataclass
class SamplesPlan:
    prompts: list[str] = field(default_factory=list)
    temperature: float = DEFAULTS["temperature"]
    top_p: float = DEFAULTS["top_p"]
    max_new_tokens: int = DEFAULTS["max_new_tokens"]
    seed: int = DEFAULTS["seed"]
    prompts_from: str = "default"
    batch_size: int = 8
    progress: bool = False


def read_prompts(path: str) -> list[str]:
    """One prompt per line of a UTF-8 file (blank lines skipped)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"--prompts {path} is not UTF-8 text") from None
    prompts = [line for line in text.splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"--prompts {path} holds no prompt (one per line)")
    return prompts


def prepare(options) -> SamplesPlan:
    prompts, origin = list(options.prompts), "--prompt"
    if options.prompts_file is not None:
        prompts, origin = prompts + read_prompts(options.prompts_file), options.prompts_file
    if not prompts:
        prompts, origin = list(DEFAULT_PROMPTS), "default (the Shard card's table)"
    if any(p == "" for p in prompts):
        raise ValueError("--prompt: an empty prompt gives the model nothing to continue")
    plan = SamplesPlan(prompts=prompts, prompts_from=origin, batch_size=options.batch_size, progress=options.progress)
    for name in DEFAULTS:
        if getattr(options, name) is not None:
            setattr(plan, name, getattr(options, name))
    return plan


def run(loaded, plan: SamplesPlan) -> TaskResult:
    from slmforge.infer.sampling import SamplingParams

    tokenizer, context = loaded.tokenizer, loaded.model.cfg.max_seq_len
    prompt_ids, params, cut = [], [], []
    for i, prompt in enumerate(plan.prompts):
        ids, budget, dropped = fit_to_context(tokenizer.encode(prompt), plan.max_new_tokens, context)
        prompt_ids.append(ids)
        cut.append(dropped)
        # one seed per prompt (seed + i), so equal prompts still show different samples
        params.append(SamplingParams(max_new_tokens=budget, temperature=plan.temperature, top_p=plan.top_p,
                                     seed=plan.seed + i))
    requests = generate_all(loaded, prompt_ids, params, plan.batch_size, plan.progress, desc="samples")
    records = [{"prompt": prompt, "continuation": r.text, "finish_reason": r.finish_reason,
                "new_tokens": len(r.output_ids), "prompt_tokens_cut": c}
               for prompt, r, c in zip(plan.prompts, requests, cut)]
    return TaskResult(
        task="samples", metrics={}, n_examples=len(records),
        settings={"temperature": plan.temperature, "top_p": plan.top_p, "max_new_tokens": plan.max_new_tokens,
                  "seed": plan.seed, "prompts": plan.prompts_from},
        records=records,
    )


def _cell(text: str, width: int | None = None) -> str:
    text = text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", "\\n").replace("\r", "\\r")
    if width is not None and len(text) > width:
        text = text[:width - 1] + "…"
    return text


def _code(text: str) -> str:
    """Inline code in Markdown: fenced with two backticks when the text holds one."""
    if "`" in text:
        return f"`` {text} ``"
    return f"`{text}`" if text else "(nothing)"


def format_samples(result: TaskResult | dict, width: int | None = None) -> str:
    """The continuations as a Markdown table (prompt | continuation), newlines shown as \\n, as the cards
    show them; `width` cuts long cells."""
    records = result.records if isinstance(result, TaskResult) else result["records"]
    settings = result.settings if isinstance(result, TaskResult) else result["settings"]
    lines = [f"Sampled at temperature {settings['temperature']}, top_p {settings['top_p']} "
             f"(seed {settings['seed']}, up to {settings['max_new_tokens']} new tokens):",
             "| Prompt | Output |", "|---|---|"]
    for r in records:
        lines.append(f"| {_code(_cell(r['prompt'], width))} | {_code(_cell(r['continuation'], width))} |")
    return "\n".join(lines)
