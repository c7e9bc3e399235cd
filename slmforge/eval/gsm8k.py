"""`slmforge eval RUN --task gsm8k`: exact match on GSM8K's test split, k-shot, greedy.

The prompt is k worked examples from the train split, always the same ones (drawn with a fixed seed), then
the question, in the format lm-evaluation-harness's `gsm8k` task uses:

    Question: <question>\\nAnswer: <worked answer ending in "#### n">\\n\\n   (k times)
    Question: <question>\\nAnswer:

The model continues greedily until "Question:" (it starts another example), EOS or `max_new_tokens`
(256). Its answer is the number after "####" if it wrote one, else the last number in its text, and it
scores when it equals the reference's "#### n" once both are normalised (commas, "$", trailing ".0").
A prompt longer than the model's context loses its first examples (down to none; then the question's
head) so that at least half the context, or the asked tokens, remains for the answer; each record says
how many examples it kept.

With `chat` (for chat models, `--chat`), the question is a user message rendered by the model's chat
template with the generation prompt, the examples (0 by default) earlier user/assistant turns, and the
answer ends at the template's end-of-turn marker; it is scored the same way.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path

from slmforge.eval.task import TaskResult, read_jsonl

DEFAULT_SHOTS = 5  # as lm-evaluation-harness's gsm8k task (and the Open LLM Leaderboard)
MAX_NEW_TOKENS = 256
SHOT_SEED = 1234
STOP = ["\n\nQuestion:", "Question:"]
_NUMBER = r"-?\$?(?:\d[\d,]*(?:\.\d+)?|\.\d+)"
_FINAL = re.compile(r"####\s*(" + _NUMBER + ")")
_ANY = re.compile(_NUMBER)


def _shared_split(name: str) -> Path:
    """`../shared/data/gsm8k/<name>.jsonl` from the working folder (as the recipes name it), else beside
    this checkout."""
    relative = Path("../shared/data/gsm8k") / name
    if relative.is_file():
        return relative
    return Path(__file__).resolve().parents[2] / relative


def normalise(number: str) -> str:
    """A number as compared: no commas or "$", no trailing ".0"; "1,000.50" -> "1000.5", "-3.0" -> "-3"."""
    text = number.replace(",", "").replace("$", "").strip().rstrip(".")
    try:
        value = Decimal(text)
    except InvalidOperation:
        return text
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def extract_answer(text: str) -> str | None:
    """The final number of a worked answer, normalised: the one after "####" if there is one, else the last
    number in the text; None when the text holds no number."""
    final = _FINAL.search(text)
    if final:
        return normalise(final.group(1))
    numbers = _ANY.findall(text)
    return normalise(numbers[-1]) if numbers else None


def read_rows(path: str | Path) -> list[dict]:
    """The {question, answer} rows of a GSM8K-style .jsonl; a malformed line is an error naming it."""
    rows = []
    for where, row in read_jsonl(path):
        if not isinstance(row, dict) or not all(isinstance(row.get(k), str) for k in ("question", "answer")):
            raise ValueError(f"{where}: expected an object with string fields question and answer")
        rows.append({"question": row["question"], "answer": row["answer"]})
    return rows


def prompt(shots: list[dict], question: str) -> str:
    examples = "".join(f"Question: {s['question']}\nAnswer: {s['answer']}\n\n" for s in shots)
    return f"{examples}Question: {question}\nAnswer:"


@dataclass
class Gsm8kPlan:
    data: str
    rows: list[dict]
    shots: list[dict] = field(default_factory=list)
    shots_from: str | None = None
    max_new_tokens: int = MAX_NEW_TOKENS
    limit: int | None = None
    batch_size: int = 8
    progress: bool = False
    chat: bool = False


def prepare(options) -> Gsm8kPlan:
    data = Path(options.data) if options.data is not None else _shared_split("test.jsonl")
    if not data.is_file() and not data.is_dir():
        raise FileNotFoundError(f"GSM8K test file {data} does not exist (give one with --data)")
    rows = read_rows(data)
    if options.limit is not None:
        rows = rows[:options.limit]
    k = (0 if options.chat else DEFAULT_SHOTS) if options.shots is None else options.shots
    shots, shots_from = [], None
    if k:
        beside = data.parent / "train.jsonl"  # a GSM8K copy of the user's: its own train split
        use_beside = options.data is not None and beside.is_file() and beside.resolve() != data.resolve()
        train_file = beside if use_beside else _shared_split("train.jsonl")
        if not train_file.is_file():
            raise FileNotFoundError(f"GSM8K train file {train_file} (for the {k}-shot examples) does not exist; "
                                    f"put a train.jsonl beside --data or pass --shots 0")
        train = read_rows(train_file)
        if k > len(train):
            raise ValueError(f"--shots {k}: {train_file} has only {len(train)} examples")
        shots = [train[i] for i in random.Random(SHOT_SEED).sample(range(len(train)), k)]
        shots_from = str(train_file)
    return Gsm8kPlan(str(data), rows, shots, shots_from, options.max_new_tokens or MAX_NEW_TOKENS, options.limit,
                     options.batch_size, options.progress, options.chat)


def chat_messages(shots: list[dict], question: str) -> list[dict]:
    turns = [[{"role": "user", "content": s["question"]}, {"role": "assistant", "content": s["answer"]}]
             for s in shots]
    return [m for turn in turns for m in turn] + [{"role": "user", "content": question}]


def build_prompt_ids(encode_prompt, shots: list[dict], question: str, max_new_tokens: int,
                     context: int) -> tuple[list[int], int, int, int]:
    """(prompt ids, new tokens allowed, examples kept, question tokens cut) for one question: as many of the
    examples as leave min(max_new_tokens, context // 2) tokens to generate, dropping the first ones.
    `encode_prompt(shots, question)` gives the ids of a prompt."""
    from slmforge.eval.samples import fit_to_context

    need = min(max_new_tokens, context // 2)
    for kept in range(len(shots), -1, -1):
        ids = encode_prompt(shots[len(shots) - kept:], question)
        if len(ids) + need <= context:
            return ids, min(max_new_tokens, context - len(ids)), kept, 0
    ids, budget, cut = fit_to_context(ids, max_new_tokens, context)
    return ids, budget, 0, cut


def run(loaded, plan: Gsm8kPlan) -> TaskResult:
    from slmforge.eval.perplexity import document_start_id
    from slmforge.eval.samples import generate_all
    from slmforge.infer.sampling import SamplingParams

    tokenizer, context = loaded.tokenizer, loaded.model.cfg.max_seq_len
    if plan.chat:
        from slmforge.tokenizer.chat_template import ChatTemplate

        if not tokenizer.chat_template:
            raise ValueError(f"--chat: {loaded.checkpoint} has no chat template (chat_template in "
                             "tokenizer_config.json)")
        template = ChatTemplate(tokenizer.chat_template, tokenizer)
        stop, stop_ids = [], template.end_of_turn_ids

        def encode_prompt(shots, question):
            return template.encode(template.render(chat_messages(shots, question), add_generation_prompt=True))
    else:
        start, stop, stop_ids = document_start_id(tokenizer), list(STOP), []

        def encode_prompt(shots, question):
            return [start, *tokenizer.encode(prompt(shots, question))]
    prompts, params, kept, cut = [], [], [], []
    for row in plan.rows:
        ids, budget, k, c = build_prompt_ids(encode_prompt, plan.shots, row["question"], plan.max_new_tokens,
                                             context)
        prompts.append(ids)
        kept.append(k)
        cut.append(c)
        params.append(SamplingParams(max_new_tokens=budget, temperature=0.0, stop=stop, stop_token_ids=stop_ids))
    requests = generate_all(loaded, prompts, params, plan.batch_size, plan.progress, desc="gsm8k")
    records = []
    for row, request, k, c in zip(plan.rows, requests, kept, cut):
        gold, predicted = extract_answer(row["answer"]), extract_answer(request.text)
        records.append({"question": row["question"], "gold": gold, "completion": request.text,
                        "predicted": predicted, "correct": predicted is not None and predicted == gold,
                        "shots": k, "question_tokens_cut": c, "finish_reason": request.finish_reason})
    correct = sum(r["correct"] for r in records)
    return TaskResult(
        task="gsm8k",
        metrics={"exact_match": correct / len(records), "correct": correct},
        n_examples=len(records),
        settings={"data": plan.data, "shots": len(plan.shots), "shots_from": plan.shots_from,
                  "shot_seed": SHOT_SEED, "greedy": True, "chat": plan.chat,
                  "stop": "the chat template's end of turn" if plan.chat else STOP,
                  "max_new_tokens": plan.max_new_tokens,
                  "limit": plan.limit, "context": context,
                  "fewer_shots": sum(k < len(plan.shots) for k in kept)},
        records=records,
    )
