"""`slmforge eval RUN --task choice --data FILE`: multiple choice by log-likelihood, ARC- or HellaSwag-style.

FILE is a .jsonl, one question per line: `question` (or `ctx`, `context`, `query`), `choices` (or
`endings`, `options`: a list of strings, or ARC's {"text": [...], "label": [...]}), and the right one as
`answer` (or `label`, `gold`): its index (0-based, an int or a string of one), or its label ("A", "B", ...
or one of ARC's labels).

Each choice is scored as a continuation " " + choice after the question, as lm-evaluation-harness does:
its log-likelihood is the sum of the log-probabilities of its tokens given the question (and the tokens
before them); the whole text is tokenized once and split where the question's tokens end. `acc` takes
the choice of highest log-likelihood, `acc_norm` the highest log-likelihood per UTF-8 byte of the
continuation (lm-eval's length normalisation), which does not favour short choices.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from slmforge.eval.task import TaskResult, read_jsonl

QUESTION_KEYS = ("question", "ctx", "context", "query")
CHOICES_KEYS = ("choices", "endings", "options")
ANSWER_KEYS = ("answer", "label", "gold")


def _first(row: dict, keys: tuple[str, ...]):
    for key in keys:
        if key in row:
            return row[key]
    return None


def parse_row(row, where: str) -> dict:
    """{question, choices, answer index} of one line; ValueError naming `where` when it is malformed."""
    if not isinstance(row, dict):
        raise ValueError(f"{where}: not a JSON object")
    question, choices, answer = (_first(row, keys) for keys in (QUESTION_KEYS, CHOICES_KEYS, ANSWER_KEYS))
    if not isinstance(question, str):
        raise ValueError(f"{where}: no question (a string field {' / '.join(QUESTION_KEYS)})")
    labels = None
    if isinstance(choices, dict) and isinstance(choices.get("text"), list):  # ARC: {"text": [...], "label": [...]}
        labels = choices.get("label")
        choices = choices["text"]
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
        raise ValueError(f"{where}: choices must be a list of 2 or more non-empty strings "
                         f"({' / '.join(CHOICES_KEYS)})")
    index = _answer_index(answer, len(choices), labels)
    if index is None:
        raise ValueError(f"{where}: answer {answer!r} names none of the {len(choices)} choices "
                         f"(give its index from 0, or its label; fields {' / '.join(ANSWER_KEYS)})")
    return {"question": question, "choices": choices, "answer": index}


def _answer_index(answer, n: int, labels) -> int | None:
    if isinstance(labels, list) and answer in labels:
        return labels.index(answer)
    if isinstance(answer, bool):
        return None
    if isinstance(answer, int):
        return answer if 0 <= answer < n else None
    if isinstance(answer, str):
        text = answer.strip()
        if text.isdigit():
            return int(text) if int(text) < n else None
        if len(text) == 1 and text.isalpha() and text.upper() < chr(ord("A") + n):
            return ord(text.upper()) - ord("A")
    return None


def read_questions(path: str | Path) -> list[dict]:
    return [parse_row(row, where) for where, row in read_jsonl(path)]


@dataclass
class ChoicePlan:
    data: str
    questions: list[dict]
    limit: int | None = None
    progress: bool = False


def prepare(options) -> ChoicePlan:
    if options.data is None:
        raise ValueError("the choice task reads its questions from --data FILE.jsonl (question, choices, answer)")
    if not Path(options.data).exists():
        raise FileNotFoundError(f"--data {options.data} does not exist")
    questions = read_questions(options.data)
    if options.limit is not None:
        questions = questions[:options.limit]
    return ChoicePlan(str(options.data), questions, options.limit, options.progress)


def continuation_tokens(tokenizer, start: int, context: str, continuation: str) -> tuple[list[int], int]:
    """(tokens of start + context + continuation, how many of them are the continuation's), splitting the
    whole text's tokens where the context's own tokens end (lm-evaluation-harness's way)."""
    whole = tokenizer.encode(context + continuation)
    n_context = len(tokenizer.encode(context))
    n_cont = len(whole) - n_context
    if n_cont < 1:  # the tokenizer merged the continuation into the context's last token
        n_cont = 1
    return [start, *whole], n_cont


def loglikelihoods(loaded, question: str, choices: list[str], start: int) -> list[float]:
    """log p(" " + choice | question) for each choice, in nats."""
    from slmforge.eval.perplexity import token_logprobs

    context = loaded.model.cfg.max_seq_len
    sequences, counts = [], []
    for choice in choices:
        ids, n_cont = continuation_tokens(loaded.tokenizer, start, question.rstrip(" "), " " + choice)
        if n_cont > context:
            raise ValueError(f"the choice {choice[:40]!r}... is {n_cont} tokens, more than the model's context "
                             f"of {context}")
        sequences.append(ids[-(context + 1):])  # the question loses its head when the whole does not fit
        counts.append(n_cont)
    scores = token_logprobs(loaded.model, sequences, loaded.autocast())
    return [float(s[-n:].sum()) for s, n in zip(scores, counts)]


def run(loaded, plan: ChoicePlan) -> TaskResult:
    from tqdm import tqdm

    from slmforge.eval.perplexity import document_start_id

    start = document_start_id(loaded.tokenizer)
    records = []
    for q in tqdm(plan.questions, desc="choice", unit=" questions", disable=not plan.progress):
        lls = loglikelihoods(loaded, q["question"], q["choices"], start)
        per_byte = [ll / len((" " + c).encode("utf-8")) for ll, c in zip(lls, q["choices"])]
        pred = max(range(len(lls)), key=lls.__getitem__)
        pred_norm = max(range(len(per_byte)), key=per_byte.__getitem__)
        records.append({"question": q["question"], "choices": q["choices"], "answer": q["answer"],
                        "loglikelihoods": lls, "predicted": pred, "predicted_norm": pred_norm,
                        "correct": pred == q["answer"], "correct_norm": pred_norm == q["answer"]})
    n = len(records)
    chance = math.fsum(1 / len(q["choices"]) for q in plan.questions) / n
    return TaskResult(
        task="choice",
        metrics={"acc": sum(r["correct"] for r in records) / n,
                 "acc_norm": sum(r["correct_norm"] for r in records) / n,
                 "chance": chance},
        n_examples=n,
        settings={"data": plan.data, "limit": plan.limit, "continuation": "' ' + choice",
                  "acc_norm": "log-likelihood per UTF-8 byte of the continuation",
                  "document_start_token": start},
        records=records,
    )
