"""The evaluation tasks `slmforge eval RUN --task T` runs, and `run_tasks`, which runs several on one model.

Each task is a module (or an object in one) with `prepare(options) -> plan`, which reads and checks its
files and options before the model is loaded (so a mistake costs nothing and writes nothing), and
`run(loaded, plan) -> TaskResult`. A task's module is imported only when the task is asked for, so one
whose module (or optional package) is missing fails alone, in one line.

`run_tasks` checks every task first, loads the model once, runs the scoring tasks (`ppl`, `choice`) in
the checkpoint's compute dtype, then prepares the same model for decoding (fp32 weights, as
`load_for_decoding`) and runs the generating ones (`gsm8k`, `humaneval`, `samples`); each result is
written to `RUN/eval/<task>.json` as soon as it is ready (whole or not at all), and the table of all of
them printed at the end.
"""

from __future__ import annotations

import importlib
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from slmforge.eval.task import TaskResult, eval_folder, format_table, save_result


@dataclass
class TaskOptions:
    """Every knob of `slmforge eval --task`; None: the task's default."""

    limit: int | None = None  # the first N examples (documents for ppl on --source, problems for humaneval)
    data: str | None = None  # the task's data file (ppl: a prepared dataset for the validation split)
    sources: list[str] = field(default_factory=list)  # ppl: texts to score, `data prepare` syntax
    shots: int | None = None  # gsm8k: worked examples before the question
    chat: bool = False  # gsm8k: through the model's chat template
    prompts: list[str] = field(default_factory=list)  # samples
    prompts_file: str | None = None  # samples: one prompt per line
    temperature: float | None = None  # samples, humaneval
    top_p: float | None = None  # samples, humaneval
    max_new_tokens: int | None = None  # gsm8k, samples, humaneval
    seed: int | None = None  # samples, humaneval
    samples: int | None = None  # humaneval: samples per problem (n of pass@k)
    k: list[int] = field(default_factory=list)  # humaneval: the k of pass@k
    stride: int | None = None  # ppl on --source: new tokens scored per window
    seq_len: int | None = None  # ppl: window (on --source) or sequence length (validation split)
    batches: int | None = None  # ppl on the validation split
    batch_size: int = 8  # sequences decoded at once
    device: str = "cpu"
    progress: bool = False  # progress bars on stderr


@dataclass(frozen=True)
class Task:
    name: str
    summary: str
    module: str  # "package.module" (or "package.module:Object") holding its prepare() and run()
    decodes: bool  # generates text (runs on the model prepared for decoding)
    options: frozenset[str]  # the TaskOptions fields it reads (beyond batch_size, device and progress)


TASKS: dict[str, Task] = {t.name: t for t in [
    Task("ppl", "loss, perplexity and bits per byte of --source texts (default: the validation split)",
         "slmforge.eval.perplexity", False,
         frozenset({"limit", "data", "sources", "stride", "seq_len", "batches"})),
    Task("gsm8k", "GSM8K exact match, k-shot, greedy", "slmforge.eval.gsm8k", True,
         frozenset({"limit", "data", "shots", "max_new_tokens", "chat"})),
    Task("humaneval", "HumanEval pass@k, generated code run sandboxed", "slmforge.eval.tasks:HumanEvalTask", True,
         frozenset({"limit", "data", "temperature", "top_p", "max_new_tokens", "samples", "k", "seed"})),
    Task("choice", "multiple choice by log-likelihood (acc, acc_norm) from --data FILE.jsonl",
         "slmforge.eval.choice", False, frozenset({"limit", "data"})),
    Task("samples", "a table of continuations of prompts", "slmforge.eval.samples", True,
         frozenset({"prompts", "prompts_file", "temperature", "top_p", "max_new_tokens", "seed"})),
]}

FLAGS = {"limit": "--limit", "data": "--data", "sources": "--source", "shots": "--shots", "chat": "--chat",
         "prompts": "--prompt", "prompts_file": "--prompts", "temperature": "--temperature", "top_p": "--top-p",
         "max_new_tokens": "--max-new-tokens", "seed": "--seed", "samples": "--samples", "k": "--k",
         "stride": "--stride", "seq_len": "--seq-len", "batches": "--batches"}


# ---- humaneval: another module's runner (slmforge.eval.humaneval.run_humaneval), adapted here ----

@dataclass
class HumanEvalPlan:
    kwargs: dict


def _run_humaneval_fn():
    try:
        module = importlib.import_module("slmforge.eval.humaneval")
    except ModuleNotFoundError as e:
        if e.name != "slmforge.eval.humaneval":
            raise ValueError(f"the humaneval task needs the package {e.name!r}: {e}") from None
        raise ValueError("the humaneval task is not available in this slmforge "
                         "(no slmforge/eval/humaneval.py)") from None
    return module.run_humaneval


def _prepare_humaneval(options: TaskOptions) -> HumanEvalPlan:
    """humaneval's checks here; its own module checks the rest when it runs."""
    n = options.samples
    if options.k and n is not None and max(options.k) > n:
        raise ValueError(f"--k {max(options.k)} exceeds --samples {n}: pass@k needs n >= k samples per problem")
    if options.k and n is None and max(options.k) > 1:
        raise ValueError(f"--k {max(options.k)} needs --samples N >= {max(options.k)} (samples per problem)")
    if n is not None and n > 1 and not options.temperature:
        raise ValueError(f"--samples {n} needs --temperature > 0: greedy decoding repeats one completion")
    if options.data is not None and not Path(options.data).exists():
        raise FileNotFoundError(f"--data {options.data} does not exist")
    _run_humaneval_fn()
    kwargs = {"n": n, "temperature": options.temperature, "top_p": options.top_p,
              "k": tuple(options.k) if options.k else None, "limit": options.limit,
              "max_new_tokens": options.max_new_tokens, "data": options.data, "seed": options.seed,
              "max_batch": options.batch_size}
    return HumanEvalPlan({key: value for key, value in kwargs.items() if value is not None})


HUMANEVAL_MAX_NEW_TOKENS = 384  # run_humaneval's default


def _run_humaneval(loaded, plan: HumanEvalPlan) -> TaskResult:
    kwargs = dict(plan.kwargs)
    context = loaded.model.cfg.max_seq_len
    if "max_new_tokens" not in kwargs and HUMANEVAL_MAX_NEW_TOKENS >= context // 2:
        kwargs["max_new_tokens"] = context // 2  # a short context (a byte model's 256): half for the prompt
    return _run_humaneval_fn()(loaded, **kwargs)


class HumanEvalTask:
    """The humaneval entry of TASKS: a task module's two functions."""

    prepare = staticmethod(_prepare_humaneval)
    run = staticmethod(_run_humaneval)


# ---- running tasks ----

def _module(task: Task):
    """The task's module (or, for "module:name", that object in it): its prepare() and run()."""
    module, _, name = task.module.partition(":")
    found = importlib.import_module(module)
    return getattr(found, name) if name else found


def check_options(names: list[str], options: TaskOptions) -> None:
    """Refuse an unknown task, an option no chosen task reads, and --data shared by two tasks that read it."""
    unknown = [n for n in names if n not in TASKS]
    if unknown:
        raise ValueError(f"unknown task {unknown[0]!r}; tasks: {', '.join(TASKS)}")
    if not names:
        raise ValueError("no task given")
    defaults = TaskOptions()
    for name, flag in FLAGS.items():
        if getattr(options, name) == getattr(defaults, name):
            continue
        readers = [n for n in names if name in TASKS[n].options
                   and not (n == "ppl" and name == "data" and options.sources)]  # --source replaces ppl's --data
        if not readers and name == "data" and "ppl" in names:
            raise ValueError("--data with ppl names a prepared dataset for its validation split: with --source "
                             "it reads the sources instead")
        if not readers:
            users = [t.name for t in TASKS.values() if name in t.options]
            raise ValueError(f"{flag} applies to the task{'s' if len(users) > 1 else ''} {', '.join(users)}, "
                             f"not to {', '.join(names)}")
        if name == "data" and len(readers) > 1:
            raise ValueError(f"--data names one file, but {' and '.join(readers)} each read their own: "
                             f"run them in separate commands")


def _prepare_for_decoding(loaded, max_batch: int) -> None:
    """What `load_for_decoding(weights="fp32")` does, on a model already loaded."""
    import torch

    from slmforge.infer.kernels import prepare_for_decoding

    loaded.model.to(torch.float32)
    prepare_for_decoding(loaded.model, "float", batch_rows=max_batch)
    loaded.dtype, loaded.dtype_reason = torch.float32, "weights=fp32"


def _decoding_threads(loaded, batch_size: int, quiet: bool) -> None:
    """Threads for decoding on a CPU, chosen as the trainer chooses them, by the work of one step (a full batch
    of one token each): a small model's many small steps lose far more to threads that wait for each other
    than they gain, above all on a machine doing other work."""
    from slmforge.hardware import choose_threads
    from slmforge.model.stats import model_stats

    if loaded.device.type != "cpu":
        return
    step_flops = 2 * model_stats(loaded.config.model)["active_params_per_token"] * batch_size
    n, why = choose_threads(0, step_flops, "a decoding step", "OMP_NUM_THREADS")
    torch.set_num_threads(n)
    if not quiet:
        print(f"decoding with {why}", file=sys.stderr)


def _run_task(run, name: str, loaded, plan, quiet: bool, save: bool) -> TaskResult:
    t0 = time.perf_counter()
    result = _module(TASKS[name]).run(loaded, plan)
    result.seconds = time.perf_counter() - t0
    result.checkpoint = str(loaded.checkpoint)
    result.settings = {**result.settings, "device": str(loaded.device)}
    if save:
        path = save_result(eval_folder(run), result)
        if not quiet:
            print(f"{name}: {result.n_examples} examples in {result.seconds:.1f} s -> {path}", file=sys.stderr)
    return result


def run_tasks(run: str | Path, names: list[str], options: TaskOptions | None = None,
              quiet: bool = False, save: bool = True) -> list[TaskResult]:
    """Run the tasks `names` on the model of `run` (a run or checkpoint folder), loaded once; each result is
    saved to `run/eval/<task>.json` (unless `save` is False) and, unless `quiet`, the table printed."""
    from slmforge.infer.load import load_model

    options = options or TaskOptions()
    names = list(dict.fromkeys(names))  # a task named twice runs once
    check_options(names, options)
    plans = {name: _module(TASKS[name]).prepare(options) for name in names}  # every check before the model loads
    loaded = load_model(run, device=options.device)
    order = [n for n in names if not TASKS[n].decodes] + [n for n in names if TASKS[n].decodes]
    results: dict[str, TaskResult] = {}
    decoding = False
    threads = torch.get_num_threads()
    try:
        for name in order:
            if TASKS[name].decodes and not decoding:
                _prepare_for_decoding(loaded, options.batch_size)
                _decoding_threads(loaded, options.batch_size, quiet)
                decoding = True
            results[name] = _run_task(run, name, loaded, plans[name], quiet, save)
    finally:
        torch.set_num_threads(threads)
    ordered = [results[n] for n in names]
    if not quiet:
        print(f"{loaded.checkpoint}")
        print(format_table(ordered))
        from slmforge.eval.samples import format_samples

        for result in ordered:
            if result.task == "samples":
                print()
                print(format_samples(result))
    return ordered


