"""`slmforge eval`, `slmforge card` and `slmforge plot`."""

from __future__ import annotations

import sys
from pathlib import Path

from slmforge.cli.args import COUNT, POSITIVE_INT, number


# `slmforge eval --task` names (slmforge.eval.tasks.TASKS, listed here so that parsing imports no torch)
EVAL_TASKS = {
    "ppl": "loss, perplexity and bits per byte of --source texts (default: the validation split)",
    "gsm8k": "GSM8K exact match, k-shot, greedy",
    "humaneval": "HumanEval pass@k, generated code run sandboxed",
    "choice": "multiple choice by log-likelihood (acc, acc_norm) from --data FILE.jsonl",
    "samples": "a table of continuations of prompts",
}


def cmd_eval(args) -> None:
    from slmforge.eval.tasks import FLAGS, TaskOptions, run_tasks

    options = TaskOptions(
        limit=args.limit, data=args.data, sources=args.source, shots=args.shots, chat=args.chat, prompts=args.prompt,
        prompts_file=args.prompts, temperature=args.temperature, top_p=args.top_p,
        max_new_tokens=args.max_new_tokens, seed=args.seed, samples=args.samples, k=args.k, stride=args.stride,
        seq_len=args.seq_len, batches=args.batches, batch_size=args.batch_size, device=args.device,
        progress=sys.stderr.isatty(),
    )
    if not args.task:  # as before the tasks came: the validation split's figures, printed, nothing written
        defaults = TaskOptions()
        extra = [flag for name, flag in FLAGS.items()
                 if name not in ("data", "batches", "seq_len") and getattr(options, name) != getattr(defaults, name)]
        extra += ["--batch-size"] * (args.batch_size != defaults.batch_size) + ["--device"] * (args.device != "cpu")
        if extra:
            raise ValueError(f"{extra[0]} needs --task (e.g. --task ppl); without a task, eval reports the "
                             f"validation split's loss")
        from slmforge.eval import evaluate_checkpoint

        evaluate_checkpoint(args.run, data=args.data, max_batches=args.batches, seq_len=args.seq_len)
        return
    run_tasks(args.run, args.task, options)


def cmd_plot(args) -> None:
    from slmforge.plot import plot_runs

    print(plot_runs([Path(r) for r in args.runs], Path(args.out), x=args.x, log_x=args.log_x))


def cmd_card(args) -> None:
    from slmforge.card import CardOptions, write_card

    options = CardOptions(license=args.license, name=args.name, datasets=args.dataset,
                          power_watts=args.power_watts, carbon_intensity=args.carbon_intensity)
    card, png = write_card(args.run, args.out, force=args.force, options=options)
    print(f"{card}: model card" + (f", loss curves in {png}" if png else ""))


def register(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a run or checkpoint: validation loss, perplexity and bits per byte, "
                       "or benchmark tasks (--task), written to RUN/eval/<task>.json")
    p.add_argument("run")
    p.add_argument("--task", action="append", default=[], choices=list(EVAL_TASKS), metavar="TASK",
                   help="repeatable: " + "; ".join(f"{name}: {what}" for name, what in EVAL_TASKS.items())
                   + ". Without --task: the validation split's figures, printed only")
    p.add_argument("--data", help="without --task or with ppl: a prepared dataset (default: the one the run trained "
                   "on); gsm8k: the test .jsonl (default ../shared/data/gsm8k/test.jsonl); choice: the questions "
                   ".jsonl (question, choices, answer); humaneval: the problems file")
    p.add_argument("--batches", type=POSITIVE_INT, default=None,
                   help="validation batches (default: train.eval_batches)")
    p.add_argument("--seq-len", type=POSITIVE_INT, default=None,
                   help="validation sequence length; ppl on --source: the window (default: the model's context, "
                   "shortened to keep a window's logits near 256 MB)")
    p.add_argument("--source", action="append", default=[], metavar="SPEC",
                   help="ppl: text to score, [NAME=]PATH[::FIELD[+FIELD]] as in `data prepare` (files, folders, "
                   "globs, .jsonl fields); repeatable")
    p.add_argument("--stride", type=POSITIVE_INT, default=None,
                   help="ppl on --source: tokens scored per window after the first (default: half the window)")
    p.add_argument("--limit", type=POSITIVE_INT, default=None,
                   help="the first N examples (ppl on --source: documents)")
    p.add_argument("--shots", type=COUNT, default=None, help="gsm8k: worked examples before each question "
                   "(default 5, as lm-evaluation-harness), from the train split")
    p.add_argument("--chat", action="store_true", help="gsm8k: ask each question as a user message through the "
                   "model's chat template (0 examples unless --shots, given as earlier turns)")
    p.add_argument("--prompt", action="append", default=[], help="samples: a prompt, repeatable "
                   "(default: the Shard card's six)")
    p.add_argument("--prompts", metavar="FILE", help="samples: prompts, one per line")
    p.add_argument("--temperature", type=number(float, 0), default=None,
                   help="samples (default 0.7), humaneval (default 0: greedy)")
    p.add_argument("--top-p", type=number(float, 0, 1, low_open=True), default=None,
                   help="samples (default 0.9), humaneval (default 1: off)")
    p.add_argument("--max-new-tokens", type=POSITIVE_INT, default=None,
                   help="gsm8k (default 256), samples (default 64), humaneval (default 384, or half a "
                   "shorter context)")
    p.add_argument("--seed", type=number(int, 0, 2**32 - 1), default=None, help="samples: prompt i samples with "
                   "seed S+i; humaneval: the seed of its samples (default 0)")
    p.add_argument("--samples", type=POSITIVE_INT, default=None, help="humaneval: samples per problem (default 1)")
    p.add_argument("--k", type=POSITIVE_INT, action="append", default=[],
                   help="humaneval: report pass@K (repeatable, K <= --samples; default 1)")
    p.add_argument("--batch-size", type=POSITIVE_INT, default=8, help="sequences decoded at once (default 8)")
    p.add_argument("--device", default="cpu", help="cpu (default), auto (CUDA when there is one), cuda or cuda:N")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("plot", help="training curves of one or more runs as one PNG (needs slmforge[plot])")
    p.add_argument("runs", nargs="+", metavar="RUN", help="run folders (each with a metrics.jsonl)")
    p.add_argument("--out", required=True, help="PNG file to write")
    p.add_argument("--x", choices=["tokens", "step"], default="tokens",
                   help="x axis: tokens seen, or optimizer steps counted across phases")
    p.add_argument("--log-x", action="store_true", help="logarithmic x axis")
    p.set_defaults(func=cmd_plot)

    p = sub.add_parser("card", help="a model card (README.md) generated from what a run folder holds")
    p.add_argument("run", help="run folder (its final checkpoint) or a checkpoint folder of its own (imported)")
    p.add_argument("--out", help="Markdown file to write (default: RUN/README.md); the loss curves go beside it "
                   "as <name>-loss.png")
    p.add_argument("--force", action="store_true", help="replace an existing card and PNG")
    p.add_argument("--license", default="apache-2.0", help="license in the front matter (default: apache-2.0)")
    p.add_argument("--name", help="the card's title (default: the recipe's name, else the folder's)")
    p.add_argument("--dataset", action="append", default=[], metavar="ID",
                   help="a Hugging Face dataset id for the front matter; repeatable")
    p.add_argument("--power-watts", type=number(float, 0, low_open=True), default=None,
                   help="power drawn by the training hardware, for the energy estimate (default: 65 W for a CPU "
                   "run, 300 W per GPU)")
    p.add_argument("--carbon-intensity", type=number(float, 0), default=None, metavar="G_PER_KWH",
                   help="gCO2 per kWh of the electricity used (default: 400, about the world average)")
    p.set_defaults(func=cmd_card)
