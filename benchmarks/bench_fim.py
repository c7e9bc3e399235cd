"""Fill-in-the-middle against left to right: two identical small models trained on the standard library's
functions for the same steps from the same seed, one on data prepared with `--fim-rate 0.5`, measured on
the middles of functions from files neither saw.

  python benchmarks/bench_fim.py            # ~14 min on 2 shared CPU cores (the README's figures)
  python benchmarks/bench_fim.py --quick    # a smoke run of the whole path: a minute, meaningless numbers

Corpus: every top-level function and method (with its decorators, dedented) of the running interpreter's
standard library, one document each, up to MAX_CHARS characters; every HELD_OUT_EVERY-th file is held out.
One byte-level BPE (4096 ids, plus the three FIM tokens) is trained on the training functions and both
datasets are prepared with it, so the two models have the same shape and score the same ids; their
validation splits are the same plain documents.

Measurement, on held-out functions of at most EVAL_TOKENS tokens: a middle of 1 or 2 whole non-blank lines
is cut where separate encoding gives the same ids as encoding the function whole (so the left-to-right model
sees its own tokenization), as prefix | "\\n" + lines | "\\n" + rest. Then
  bits/byte   -log2 p(middle ids) / middle bytes, given the prefix (left to right) or the PSM prompt
              `<fim_prefix> prefix <fim_suffix> suffix <fim_middle>`; the EOS after a FIM middle is not scored;
  exact       greedy decoding (48 new tokens): the first 1 + k "\\n"-separated pieces of the generated text
              equal the middle's, the same rule for every prompt.
The FIM model is also prompted in SPM order (`<fim_prefix> <fim_suffix> suffix <fim_middle> prefix`), where
the middle continues the prefix directly, and left to right, to see what FIM data costs it there.
Both models train and evaluate on one thread: on a machine shared with other work, two OpenMP threads per
process lose to one (README, Training / Threads), and the second core stays free for the other work.
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import random
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from bench_dense import cpu_name

from slmforge.config import load_config
from slmforge.data.fim import find_fim_ids, with_fim_tokens
from slmforge.data.prepare import prepare_dataset
from slmforge.data.sources import SourceStats, default_sources, iter_documents, parse_source
from slmforge.hardware import cpu_count
from slmforge.infer import SamplingParams, generate_ids
from slmforge.infer.load import load_model
from slmforge.tokenizer import train_bpe
from slmforge.train import train

MAX_CHARS = 1500  # longest function kept as a training document
HELD_OUT_EVERY = 10  # every 10th standard-library file: its functions are never trained on
NEW_TOKENS = 48  # greedy tokens generated for a middle
MAX_MIDDLE_TOKENS = 32
SEQ_LEN = 256  # the quickstart preset's training windows
EVAL_TOKENS = SEQ_LEN - NEW_TOKENS  # most ids of a measured function with its 3 markers: prompts and generations
#                                     stay within the positions the models were trained on


def functions(source: str) -> list[str]:
    """The module-level functions and methods of a Python file, dedented, each ending with one newline."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):  # a few test files hold Python 2 or invalid code on purpose
        return []
    lines = source.splitlines()
    found = []
    for parent in [tree, *(n for n in tree.body if isinstance(n, ast.ClassDef))]:
        for node in parent.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                start = min([node.lineno, *(d.lineno for d in node.decorator_list)]) - 1
                text = textwrap.dedent("\n".join(lines[start:node.end_lineno])).rstrip() + "\n"
                if len(text) <= MAX_CHARS:
                    found.append(text)
    return found


def write_corpus(folder: Path) -> tuple[Path, list[str]]:
    """The training functions as a .jsonl file, and the held-out functions."""
    train_rows, held_out = [], []
    for index, text in enumerate(iter_documents(default_sources()[0], SourceStats())):
        (held_out if index % HELD_OUT_EVERY == 0 else train_rows).extend(functions(text))
    path = folder / "functions.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in train_rows))
    return path, held_out


@dataclass
class Example:
    prefix: list[int]
    middle: list[int]
    suffix: list[int]
    middle_text: str
    lines: int


def make_examples(held_out: list[str], tokenizer, n: int, seed: int) -> tuple[list[Example], dict]:
    """Up to `n` middles of held-out functions (one per function, in a seeded order); and what was left out."""
    rng = random.Random(seed)
    order = list(range(len(held_out)))
    rng.shuffle(order)
    examples, skipped = [], {"too long": 0, "under 4 lines": 0, "no clean cut": 0}
    for i in order:
        if len(examples) == n:
            break
        text = held_out[i]
        whole = tokenizer.encode(text)
        if len(whole) + 3 > EVAL_TOKENS:
            skipped["too long"] += 1
            continue
        if text.count("\n") < 4:
            skipped["under 4 lines"] += 1
            continue
        example = cut_middle(text, whole, tokenizer, rng)
        if example is None:
            skipped["no clean cut"] += 1
        else:
            examples.append(example)
    return examples, skipped


def cut_middle(text: str, whole: list[int], tokenizer, rng: random.Random) -> Example | None:
    lines = text.rstrip("\n").split("\n")
    k = rng.choice([1, 2])
    starts = [s for s in range(1, len(lines) - k) if all(line.strip() for line in lines[s:s + k])]
    rng.shuffle(starts)
    for s in starts:
        prefix = "\n".join(lines[:s])
        middle = "\n" + "\n".join(lines[s:s + k])
        suffix = "\n" + "\n".join(lines[s + k:]) + "\n"
        ids = [tokenizer.encode(part) for part in (prefix, middle, suffix)]
        if ids[0] + ids[1] + ids[2] == whole and len(ids[1]) <= MAX_MIDDLE_TOKENS:
            return Example(ids[0], ids[1], ids[2], middle, k)
    return None


@torch.no_grad()
def middle_bits(model, prompt: list[int], middle: list[int]) -> float:
    """-log2 p(middle | prompt), summed over the middle's ids."""
    tokens = torch.tensor([prompt + middle])
    logits, _ = model(tokens)
    logp = torch.log_softmax(logits[0, len(prompt) - 1:-1].float(), dim=-1)
    return -logp.gather(1, torch.tensor(middle)[:, None]).sum().item() / math.log(2)


def matches(generated: str, example: Example) -> bool:
    return generated.split("\n")[:1 + example.lines] == example.middle_text.split("\n")


def measure(run: Path, examples: list[Example], tokenizer, order: str) -> dict:
    """Middle bits/byte and exact matches of the model of `run`, prompted left to right ("L2R": the prefix
    alone), "PSM" or "SPM"."""
    model = load_model(run, device="cpu", dtype="fp32").model
    fim = find_fim_ids(tokenizer)
    prompt = {"L2R": lambda e: e.prefix, "PSM": lambda e: fim.psm_prompt(e.prefix, e.suffix),
              "SPM": lambda e: fim.spm_prompt(e.prefix, e.suffix)}[order]
    prompts = [prompt(e) for e in examples]
    bits = sum(middle_bits(model, p, e.middle) for p, e in zip(prompts, examples))
    nbytes = sum(len(e.middle_text.encode()) for e in examples)
    params = SamplingParams(max_new_tokens=NEW_TOKENS, temperature=0.0, stop_token_ids=list(fim.ends))
    completions = generate_ids(model, prompts, params, eos_id=tokenizer.eos_id, decode=tokenizer.decode)
    exact = [matches(c.text, e) for c, e in zip(completions, examples)]
    by_lines = {k: [x for x, e in zip(exact, examples) if e.lines == k] for k in (1, 2)}
    return {"bits_per_byte": bits / nbytes, "exact": sum(exact), "of": len(exact),
            "exact_by_lines": {k: [sum(v), len(v)] for k, v in by_lines.items()},
            "examples": [{"middle": e.middle_text, "generated": c.text, "exact": x}
                         for e, c, x in zip(examples[:5], completions, exact)]}


def train_model(data: Path, out: Path, steps: int, quick: bool, vocab_size: int) -> dict:
    overrides = [f"data.path={data}", f"data.seq_len={SEQ_LEN}", f"model.vocab_size={vocab_size}",
                 f"train.steps={steps}", "train.threads=1", f"train.eval_every={steps}", f"train.save_every={steps}",
                 f"train.log_every={max(steps // 10, 1)}", "train.rank_check_every=0"]
    if quick:
        overrides += ["model.n_layers=1", "data.batch_size=4", "train.eval_batches=2", "schedule.warmup_steps=2"]
    t0 = time.perf_counter()
    report = train(load_config("quickstart", overrides), out, fresh=True)
    return {"val_loss": report["val_loss"], "val_bpb": report["val_bpb"], "tokens": report["tokens"],
            "wall_s": time.perf_counter() - t0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--examples", type=int, default=300)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--work", default="runs/bench_fim", help="folder for the corpus, datasets and runs")
    parser.add_argument("--out", default="benchmarks/results/fim.json")
    args = parser.parse_args()
    steps, n_examples = (30, 40) if args.quick else (args.steps, args.examples)
    torch.set_num_threads(1)
    start = time.perf_counter()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    corpus, held_out = write_corpus(work)
    source = parse_source(f"functions={corpus}::text")
    tokenizer = with_fim_tokens(train_bpe([source], 4096, max_chars=2_000_000 if args.quick else 20_000_000,
                                          progress=False))
    prepared = {}
    for name, rate in (("plain", 0.0), ("fim", 0.5)):
        prepared[name] = prepare_dataset([source], tokenizer, work / f"data-{name}", val_fraction=0.01,
                                         progress=False, fim_rate=rate,
                                         max_tokens_per_source=200_000 if args.quick else None)
    prepare_s = time.perf_counter() - start
    runs = {name: train_model(work / f"data-{name}", work / f"run-{name}", steps, args.quick, tokenizer.vocab_size)
            for name in prepared}
    examples, skipped = make_examples(held_out, tokenizer, n_examples, seed=0)
    rows = {
        "plain data, left to right": measure(work / "run-plain", examples, tokenizer, "L2R"),
        "FIM data, left to right": measure(work / "run-fim", examples, tokenizer, "L2R"),
        "FIM data, PSM prompt": measure(work / "run-fim", examples, tokenizer, "PSM"),
        "FIM data, SPM prompt": measure(work / "run-fim", examples, tokenizer, "SPM"),
    }
    wall_s = time.perf_counter() - start
    result = {"machine": f"{cpu_name()} ({cpu_count()} cores), {torch.get_num_threads()} torch thread",
              "torch": torch.__version__, "python": sys.version.split()[0], "date": time.strftime("%Y-%m-%d"),
              "steps": steps, "corpus": {"train_documents": prepared["plain"]["total"]["documents"],
                                         "train_tokens": prepared["plain"]["total"]["train_tokens"],
                                         "fim_documents": prepared["fim"]["fim"]["documents"]["functions"],
                                         "held_out_functions": len(held_out)},
              "examples": len(examples), "skipped": skipped, "runs": runs, "rows": rows,
              "prepare_s": prepare_s, "wall_s": wall_s}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))


def table(result: dict) -> str:
    runs = {"plain data": result["runs"]["plain"], "FIM data": result["runs"]["fim"]}
    lines = [f"{result['machine']}, torch {result['torch']}, {result['date']}; {result['steps']} steps each; "
             f"{result['examples']} held-out middles ({result['skipped']} functions skipped); "
             f"wall time {result['wall_s'] / 60:.1f} min",
             "",
             "| data, prompt | middle bits/byte | exact | exact, 1 line | exact, 2 lines | val loss | training |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, row in result["rows"].items():
        run = runs[name.split(",")[0]]
        one, two = row["exact_by_lines"][1], row["exact_by_lines"][2]
        lines.append(f"| {name} | {row['bits_per_byte']:.3f} | {row['exact']}/{row['of']} | {one[0]}/{one[1]} | "
                     f"{two[0]}/{two[1]} | {run['val_loss']:.3f} | {run['wall_s']:.0f} s |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
