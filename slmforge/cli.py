"""`slmforge` command line: info, tokenizer train, data prepare, train, eval, sample, serve, export, import, plot."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from slmforge.config import ConfigError
from slmforge.hardware import keep_freed_memory


class Parser(argparse.ArgumentParser):
    """argparse, with a usage mistake reported in one line like every other error."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def number(kind: type, low: float | None = None, high: float | None = None, low_open: bool = False,
           high_open: bool = False):
    """An argparse type: a finite `kind` within [low, high] (an end excluded when it is open)."""
    import math

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}")
        if not math.isfinite(value) or (low is not None and (value < low or low_open and value == low)) or (
                high is not None and (value > high or high_open and value == high)):
            lo = "-inf" if low is None else f"{low:g}"
            hi = "inf" if high is None else f"{high:g}"
            bounds = f"{'(' if low_open or low is None else '['}{lo}, {hi}{')' if high_open or high is None else ']'}"
            raise argparse.ArgumentTypeError(f"must lie in {bounds}, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


POSITIVE_INT = number(int, 1)
COUNT = number(int, 0)


def _add_sources(p: argparse.ArgumentParser) -> None:
    p.add_argument("--source", action="append", default=[], metavar="SPEC",
                   help="[NAME=]PATH[::FIELD[+FIELD]][@WEIGHT]: a file, folder, glob or .jsonl; repeatable "
                        "(default: the Python standard library of this interpreter)")


def _sources(specs: list[str]):
    from slmforge.data.sources import default_sources, parse_source

    return [parse_source(s) for s in specs] if specs else default_sources()


def cmd_info(args) -> None:
    from slmforge.config import load_config
    from slmforge.model.stats import format_stats, model_stats
    from slmforge.checkpoint import find_checkpoint, read_config

    target = args.target
    if target is None:
        print(presets_table())
        return
    if args.targets:
        from slmforge.export.targets import format_targets, model_of

        print(format_targets(*model_of(target)))
        return
    if Path(target).is_dir():
        from slmforge.config import apply_overrides, from_dict

        checkpoint = find_checkpoint(target)
        cfg = from_dict(apply_overrides(read_config(checkpoint).to_dict(), args.set))
        name = str(checkpoint)
    else:
        cfg, name = load_config(target, args.set), target
    print(format_stats(name, model_stats(cfg.model, args.context)))


def presets_table() -> str:
    """One line per shipped preset: total and active parameters, KV cache per token."""
    from slmforge.config import list_presets, load_config
    from slmforge.model.stats import model_stats

    rows = [("preset", "parameters", "active/token", "KV bytes/token (bf16)")]
    for name in list_presets():
        s = model_stats(load_config(name).model)
        rows.append((name, f"{s['total_params']:,}", f"{s['active_params_per_token']:,}",
                     f"{s['kv_bytes_per_token_bf16']:,}"))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
                     for r in rows)


def cmd_tokenizer_train(args) -> None:
    from slmforge.tokenizer import byte_tokenizer, train_bpe

    if args.byte:
        tokenizer = byte_tokenizer()
    else:
        tokenizer = train_bpe(_sources(args.source), args.vocab_size, max_chars=args.max_chars)
    tokenizer.save(args.out)
    print(f"tokenizer with {tokenizer.vocab_size} tokens written to {args.out}/tokenizer.json")


def cmd_data_prepare(args) -> None:
    from slmforge.data.prepare import prepare_dataset
    from slmforge.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(args.tokenizer)
    from slmforge.data.sources import parse_source

    prepare_dataset(_sources(args.source), tokenizer, args.out, val_fraction=args.val_fraction,
                    max_tokens_per_source=args.max_tokens_per_source,
                    val_sources=[parse_source(s) for s in args.val_source])


def _recipe_card(run: Path) -> None:
    """A recipe's run ends with its model card, RUN/README.md, refreshed on each run; a README.md the user
    wrote there is left alone."""
    from slmforge.card import write_card
    from slmforge.train.run_folder import is_generated_card

    readme = run / "README.md"
    if readme.exists() and not is_generated_card(readme):
        print(f"{readme} is not a card slmforge wrote: left as it is (slmforge card {run} --out FILE writes one)")
        return
    card, _ = write_card(run, force=True)
    print(f"model card: {card}")


def cmd_train(args) -> None:
    from slmforge.config import load_config
    from slmforge.train import train

    overrides = list(args.set)
    if args.data:
        overrides.insert(0, f"data.path={Path(args.data).resolve()}")  # eval/sample may run elsewhere
    if args.init:
        overrides.insert(0, f"train.init={Path(args.init).resolve()}")
    if args.recipe:
        from slmforge.recipes import run_recipe

        report = run_recipe(args.recipe, args.out, overrides, full=args.full, resume=args.resume, fresh=args.fresh,
                            allow_changes=args.allow_changes)
        _recipe_card(Path(args.out))
    else:
        cfg = load_config(args.config or args.preset, overrides)
        report = train(cfg, args.out, resume=args.resume, fresh=args.fresh, allow_changes=args.allow_changes)
    for phase in report["phases"]:
        if phase.get("val_loss") is None:  # no evaluation recorded at the phase's end
            continue
        start = f"{phase['start_val_loss']:.4f} -> " if phase.get("start_val_loss") is not None else ""
        print(f"phase {phase['name']}: val loss {start}{phase['val_loss']:.4f} (bits per byte {phase['val_bpb']:.4f})")
    print(train_summary(report))


def train_summary(report: dict) -> str:
    """The one line `train` ends with: final validation figures, tokens, wall time, training throughput."""
    val = ""
    if report.get("val_loss") is not None:
        val = (f"val loss {report['val_loss']:.4f}, perplexity {report['val_ppl']:.2f}, "
               f"bits per byte {report['val_bpb']:.4f}; ")
    speed = f", {report['tokens_per_s']:,.0f} tokens/s training" if report.get("tokens_per_s") else ""
    return (f"final: {val}{report['tokens']:,} tokens seen in {report['elapsed_s']:.0f} s{speed}; "
            f"checkpoint {report['checkpoint']}")


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
        limit=args.limit, data=args.data, sources=args.source, shots=args.shots, prompts=args.prompt,
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


def cmd_sample(args) -> None:
    from slmforge.infer import SamplingParams, generate
    from slmforge.infer.load import load_for_decoding

    loaded = load_for_decoding(args.run, device="cpu", max_batch=len(args.prompt))
    model, tokenizer = loaded.model, loaded.tokenizer
    params = SamplingParams(
        max_new_tokens=args.max_new_tokens, min_new_tokens=args.min_new_tokens,
        temperature=0.0 if args.greedy else args.temperature, top_k=args.top_k, top_p=args.top_p,
        repetition_penalty=args.repetition_penalty, stop=args.stop, seed=args.seed,
    )
    if args.speculative:
        _sample_speculative(model, tokenizer, args.prompt, params)
        return
    for prompt, completion in zip(args.prompt, generate(model, tokenizer, args.prompt, params)):
        print(f"--- {prompt!r} ({completion.finish_reason})")
        print(prompt + completion.text)


def _sample_speculative(model, tokenizer, prompts: list[str], params) -> None:
    """Greedy decoding drafted by the MTP module, timed beside plain greedy decoding of the same prompt."""
    import time

    from slmforge.infer import generate_ids
    from slmforge.infer.speculative import speculative_greedy

    if params.temperature != 0 or params.repetition_penalty != 1.0 or params.stop:
        raise ValueError("--speculative decodes greedily: use it with --greedy, without --repetition-penalty "
                         "or --stop")
    for prompt in prompts:
        ids = tokenizer.encode(prompt)
        t0 = time.perf_counter()
        plain = generate_ids(model, [ids], params, eos_id=tokenizer.eos_id)[0]
        plain_s = time.perf_counter() - t0
        spec = speculative_greedy(model, ids, params.max_new_tokens, tokenizer.eos_id, params.min_new_tokens)
        print(f"--- {prompt!r} ({spec.finish_reason})")
        print(prompt + tokenizer.decode(spec.token_ids))
        same = "identical to" if spec.token_ids == plain.token_ids else "DIFFERENT from"
        print(f"speculative: {len(spec.token_ids)} tokens, {same} plain greedy; drafts accepted "
              f"{spec.accepted}/{spec.drafted} ({spec.acceptance_rate:.0%}); "
              f"{len(spec.token_ids) / spec.seconds:.1f} vs {plain.n_generated / plain_s:.1f} tokens/s plain "
              f"(x{plain_s / spec.seconds * len(spec.token_ids) / max(plain.n_generated, 1):.2f})")


def cmd_serve(args) -> None:
    import os

    from slmforge.serve import check_packages

    check_packages()
    from slmforge.serve.server import serve

    api_key = args.api_key or os.environ.get("SLMFORGE_API_KEY") or None
    serve(args.run, host=args.host, port=args.port, api_key=api_key, max_batch=args.max_batch,
          max_queue=args.max_queue, weights=args.weights, device=args.device, model_name=args.model_name)


def cmd_export(args) -> None:
    from slmforge.export.hf import export_hf

    if args.to == "ollama":
        from slmforge.export.ollama import export_ollama

        out = export_ollama(args.run, args.out, dtype=args.dtype, force=args.force)
        print(f"{out}: model.gguf and Modelfile; import it with: ollama create {out.name} -f {out / 'Modelfile'}")
        return
    if args.to == "gguf":
        from slmforge.export.gguf_export import export_gguf

        out = export_gguf(args.run, args.out, dtype=args.dtype, force=args.force)
        print(f"{out}: a GGUF file for llama.cpp ({args.dtype})")
        return
    out, family = export_hf(args.run, args.out, force=args.force, native=args.native)
    how = "trust_remote_code=True (remote code)" if family == "slmforge" else f"its native class ({family})"
    print(f"{out}: loads with transformers' AutoModelForCausalLM.from_pretrained, {how}")


def cmd_import(args) -> None:
    source_format = args.source_format or ("gguf" if str(args.src).endswith(".gguf") else "hf")
    if source_format == "gguf":
        from slmforge.export.gguf_import import import_gguf

        out = import_gguf(args.src, args.out, force=args.force)
    elif source_format == "codemind":
        from slmforge.export.codemind import import_codemind

        out = import_codemind(args.src, args.out, config=args.codemind_config, tokenizer=args.tokenizer,
                              force=args.force, warn=lambda m: print(f"slmforge: {m}", file=sys.stderr))
    else:
        from slmforge.export.hf_import import import_hf

        out = import_hf(args.src, args.out, force=args.force)
    print(f"{out}: an slmforge checkpoint (eval, sample, export, train --init {out})")


def cmd_plot(args) -> None:
    from slmforge.plot import plot_runs

    print(plot_runs([Path(r) for r in args.runs], Path(args.out), x=args.x, log_x=args.log_x))


def cmd_card(args) -> None:
    from slmforge.card import CardOptions, write_card

    options = CardOptions(license=args.license, name=args.name, datasets=args.dataset,
                          power_watts=args.power_watts, carbon_intensity=args.carbon_intensity)
    card, png = write_card(args.run, args.out, force=args.force, options=options)
    print(f"{card}: model card" + (f", loss curves in {png}" if png else ""))


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="slmforge", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help="parameters, FLOPs, KV-cache and memory of a preset, config file or run")
    p.add_argument("target", nargs="?", help="preset name, config file, run folder or checkpoint folder "
                   "(none: a table of every preset)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--context", type=POSITIVE_INT, default=None, help="context length for FLOPs/KV figures")
    p.add_argument("--targets", action="store_true", help="the export targets (hf-native, hf-remote, gguf, "
                   "ollama) the model can reach, and why not")
    p.set_defaults(func=cmd_info)

    tok = sub.add_parser("tokenizer", help="tokenizer tools").add_subparsers(dest="tokenizer_command", required=True)
    p = tok.add_parser("train", help="train a byte-level BPE (or write the byte tokenizer)")
    _add_sources(p)
    p.add_argument("--vocab-size", type=POSITIVE_INT, default=8192)
    p.add_argument("--max-chars", type=POSITIVE_INT, default=50_000_000, help="cap on training text, for speed")
    p.add_argument("--byte", action="store_true", help="write the 258-token byte tokenizer instead")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_tokenizer_train)

    data = sub.add_parser("data", help="dataset tools").add_subparsers(dest="data_command", required=True)
    p = data.add_parser("prepare", help="tokenize sources into train/val token shards")
    _add_sources(p)
    p.add_argument("--tokenizer", required=True, help="tokenizer.json or a folder holding it")
    p.add_argument("--out", required=True)
    p.add_argument("--val-fraction", type=number(float, 0, 1, high_open=True), default=0.01)
    p.add_argument("--max-tokens-per-source", type=POSITIVE_INT, default=None)
    p.add_argument("--val-source", action="append", default=[], metavar="NAME=PATH",
                   help="the whole validation set of source NAME (e.g. a test split); repeatable")
    p.set_defaults(func=cmd_data_prepare)

    p = sub.add_parser("train", help="train a model (also under torchrun for DDP)")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--preset", help="a preset name (see `slmforge info`)")
    which.add_argument("--config", help="a YAML/JSON config file")
    which.add_argument("--recipe", help="a seed card's recipe (slmforge/recipes/): prepares its tokenizer and "
                       "data once, then trains")
    p.add_argument("--full", action="store_true", help="with --recipe: the card's full size (for a GPU)")
    p.add_argument("--init", metavar="CHECKPOINT", help="start from these weights (a checkpoint or run folder, e.g. "
                   "one written by `slmforge import`); the run's model is that checkpoint's (sets train.init)")
    p.add_argument("--data", help="a folder written by `slmforge data prepare` (sets data.path)")
    p.add_argument("--out", required=True, help="run folder")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. model.n_layers=4")
    p.add_argument("--resume", action="store_true", help="continue from the run folder's latest checkpoint")
    p.add_argument("--allow-changes", action="store_true",
                   help="with --resume: continue although settings that change training differ from the checkpoint's")
    p.add_argument("--fresh", action="store_true", help="delete an existing run folder first (only a slmforge run "
                   "folder: anything else is refused)")
    p.set_defaults(func=cmd_train)

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

    p = sub.add_parser("sample", help="generate text from a run or checkpoint")
    p.add_argument("run")
    p.add_argument("--prompt", action="append", required=True, help="repeatable: prompts decode together")
    p.add_argument("--max-new-tokens", type=POSITIVE_INT, default=100)
    p.add_argument("--min-new-tokens", type=COUNT, default=0)
    p.add_argument("--greedy", action="store_true")
    p.add_argument("--temperature", type=number(float, 0), default=1.0)
    p.add_argument("--top-k", type=COUNT, default=0, help="0: off")
    p.add_argument("--top-p", type=number(float, 0, 1, low_open=True), default=1.0, help="1: off")
    p.add_argument("--repetition-penalty", type=number(float, 0, low_open=True), default=1.0)
    p.add_argument("--stop", action="append", default=[], help="stop string, repeatable")
    p.add_argument("--seed", type=number(int, 0, 2**32 - 1), default=None)
    p.add_argument("--speculative", action="store_true",
                   help="greedy decoding drafted by the model's MTP module; reports acceptance and speed-up")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("serve", help="an OpenAI-compatible HTTP server for a run or checkpoint (needs slmforge[serve])")
    p.add_argument("run", help="run folder (its newest intact checkpoint) or checkpoint folder")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=number(int, 0, 65535), default=8000, help="0: any free port")
    p.add_argument("--api-key", help="require Authorization: Bearer KEY on every route but /health and / "
                   "(default: the SLMFORGE_API_KEY environment variable, which the process list does not show)")
    p.add_argument("--max-batch", type=POSITIVE_INT, default=16, help="requests decoding at once (cache slots)")
    p.add_argument("--max-queue", type=POSITIVE_INT, default=256,
                   help="requests waiting for a slot; beyond it the server answers 429")
    p.add_argument("--weights", choices=["fp32", "bf16", "f16", "int8"], default="fp32",
                   help="how the weights are held while decoding")
    p.add_argument("--device", default="auto", help="auto (CUDA when there is one), cpu, cuda or cuda:N")
    p.add_argument("--model-name", help="the name clients send as `model` (default: RUN as given)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("export", help="write a run's model in another format: a Hugging Face folder, a GGUF file")
    p.add_argument("run", help="run folder (its newest intact checkpoint) or checkpoint folder "
                   "(`slmforge info RUN --targets` says which targets it can reach)")
    p.add_argument("out", help="the folder (hf, ollama) or file (gguf) to write")
    p.add_argument("--to", choices=["hf", "gguf", "ollama"], required=True,
                   help="hf: a folder transformers loads; gguf: a file llama.cpp runs; ollama: a GGUF and a Modelfile")
    p.add_argument("--dtype", choices=["f32", "f16", "bf16", "q8_0"], default="f32",
                   help="with --to gguf or ollama: the type of the weight matrices")
    p.add_argument("--force", action="store_true", help="replace an existing output (once the new one is complete)")
    p.add_argument("--native", action="store_true", help="demand a native transformers class; without it, a model "
                   "no native class computes is exported as remote code")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("import", help="turn a Hugging Face folder, a GGUF file or CodeMind weights into an slmforge "
                       "checkpoint folder")
    p.add_argument("src", help="a Hugging Face folder (config.json, model.safetensors or shards, tokenizer.json: "
                   "Llama, Qwen2, Qwen3, Qwen2-MoE, Qwen3-MoE or DeepseekV3), a GGUF file (llama, qwen2moe, "
                   "qwen3moe, deepseek2), or with --from codemind their weights")
    p.add_argument("out", help="the checkpoint folder to write")
    p.add_argument("--from", dest="source_format", choices=["hf", "gguf", "codemind"],
                   help="hf: a Hugging Face folder; gguf: a llama.cpp file; codemind: a CodeMind model.safetensors "
                   "(or its step folder). Default: gguf for a .gguf file, else hf")
    p.add_argument("--codemind-config", metavar="JSON", help="with --from codemind: their CodeMindConfig values "
                   "(fields left out take their defaults)")
    p.add_argument("--tokenizer", help="with --from codemind: a tokenizer.json (or folder) for the checkpoint")
    p.add_argument("--force", action="store_true", help="replace an existing output (once the new one is complete)")
    p.set_defaults(func=cmd_import)

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
    return parser


def describe_error(e: BaseException) -> str:
    """One line for the user: the path and the cause of an OSError, else the exception's own message."""
    if isinstance(e, OSError) and e.filename is not None:
        target = f"{e.filename} -> {e.filename2}" if e.filename2 is not None else str(e.filename)
        return f"{target}: {e.strerror or e}"
    return str(e) or type(e).__name__


def where_to_resume(args) -> str:
    """For an interrupted `train`: the checkpoint `--resume` would continue from."""
    if getattr(args, "command", None) != "train":
        return ""
    from slmforge.checkpoint import latest_checkpoint

    checkpoint = latest_checkpoint(Path(args.out))
    if checkpoint is None:
        return "; no checkpoint was written, so the run starts again from scratch"
    return f"; the same command with --resume continues from {checkpoint}"


def close_progress_bars() -> None:
    """End every open progress bar, so a message that follows starts on a line of its own."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", [])):
        bar.close()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    keep_freed_memory()
    from slmforge.checkpoint import CheckpointError
    from slmforge.train.errors import TrainingError

    try:
        args.func(args)
    except KeyboardInterrupt:
        close_progress_bars()
        print(f"slmforge: interrupted{where_to_resume(args)}", file=sys.stderr)
        return 130
    except (ConfigError, CheckpointError, TrainingError, OSError, ValueError) as e:
        close_progress_bars()
        print(f"slmforge: error: {describe_error(e)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
