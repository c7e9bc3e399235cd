"""`slmforge eval RUN --task ppl`: loss, perplexity and bits per byte of a model on any text.

With `--source` (the syntax of `slmforge data prepare`: files, folders, globs, .jsonl fields) every
document is tokenized and scored on its own: the document follows one "document start" token (see
`document_start_id`), so its first token is scored too, and documents never see each other. A document
longer than the model's context is scored in windows of `window` tokens: the first window scores its
whole length, each later one scores the next `stride` tokens with the `window - stride` tokens before them
as context, so every token is scored exactly once with at least `window - stride` tokens of context (or
all the tokens before it). The window is the model's context by default, shortened for a large vocabulary
so that one window's logits stay near 256 MB (`default_window`); `--seq-len` sets it, `--stride` the step
(default: half the window).

Sums over all documents: nats of the scored tokens, the tokens, and the UTF-8 bytes of the texts
themselves; loss = nats / tokens, perplexity = exp(loss), bits per byte = nats / (ln 2 · bytes), which does
not depend on the tokenizer, so byte and BPE models are compared on it.

Without `--source`: the run's own validation split (or the prepared dataset given as `--data`), scored
exactly as `slmforge eval` without a task does.

The scoring helpers (`token_logprobs`, `document_start_id`) serve the `choice` task too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from slmforge.eval.task import TaskResult

LOGITS_BUDGET = 1 << 26  # logits elements (float32) per scoring forward: about 256 MB


def document_start_id(tokenizer) -> int:
    """The token a document follows when it is scored: slmforge's datasets put one EOS after every document
    (so a trained model sees a document begin after an EOS), while imported models (their tokenizers do not
    name slmforge's BOS) begin text with their BOS token, as lm-evaluation-harness does."""
    from slmforge.tokenizer.tokenizer import BOS

    if tokenizer.hf.id_to_token(tokenizer.bos_id) == BOS:
        return tokenizer.eos_id
    return tokenizer.bos_id


@torch.no_grad()
def token_logprobs(model, sequences: list[list[int]], autocast_ctx=None) -> list[torch.Tensor]:
    """For each token sequence t (2 tokens or more, at most the model's context + 1): float64 [len(t) - 1],
    log p(t[j+1] | t[:j+1]) under `model`. Sequences of the same length run together (no padding, so the
    numbers are exactly those of each sequence alone); rows per forward are capped so the logits stay
    within LOGITS_BUDGET elements."""
    import contextlib

    device = next(model.parameters()).device
    vocab = model.cfg.vocab_size
    out: list[torch.Tensor | None] = [None] * len(sequences)
    by_length: dict[int, list[int]] = {}
    for i, seq in enumerate(sequences):
        if len(seq) < 2:
            raise ValueError("a scored sequence needs at least 2 tokens (a context token and a target)")
        if len(seq) - 1 > model.cfg.max_seq_len:
            raise ValueError(f"a scored window of {len(seq) - 1} tokens exceeds the context of {model.cfg.max_seq_len}")
        by_length.setdefault(len(seq), []).append(i)
    for length, members in by_length.items():
        rows = max(1, LOGITS_BUDGET // ((length - 1) * vocab))
        for start in range(0, len(members), rows):
            chunk = members[start:start + rows]
            batch = torch.tensor([sequences[i] for i in chunk], dtype=torch.long, device=device)
            x, y = batch[:, :-1], batch[:, 1:]
            with autocast_ctx or contextlib.nullcontext():
                logits, _ = model(x)
            nats = F.cross_entropy(logits.float().flatten(0, -2), y.reshape(-1), reduction="none")
            logp = (-nats).double().view(len(chunk), length - 1).cpu()
            for row, i in enumerate(chunk):
                out[i] = logp[row]
    return out  # type: ignore[return-value]


def default_window(cfg) -> int:
    """The model's context, or fewer tokens where one window's logits would pass LOGITS_BUDGET elements (a
    large vocabulary with a long context: SmolLM2's 49,152 x 8,192 would be 1.6 GB), but 256 at least."""
    return min(cfg.max_seq_len, max(256, LOGITS_BUDGET // cfg.vocab_size))


def windows(n: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """How to score the n tokens after a start token, t[1..n] of t[0..n]: (begin, end, first) per window,
    each feeding t[begin:end - 1] (at most `window` tokens) and scoring targets t[first:end]. The first
    window scores up to `window` tokens, each later one the next `stride`, with the tokens before them as
    context; together they score t[1..n] once each."""
    if window < 1 or not 1 <= stride <= window:
        raise ValueError(f"need 1 <= stride <= window, got stride {stride}, window {window}")
    out, first = [], 1
    while first <= n:
        end = min(first + (window if first == 1 else stride), n + 1)
        out.append((max(0, end - 1 - window), end, first))
        first = end
    return out


@dataclass
class PplPlan:
    sources: list = field(default_factory=list)  # parsed Source objects; empty: the validation split
    specs: list[str] = field(default_factory=list)
    limit: int | None = None  # documents, over all sources in order
    window: int | None = None  # tokens per window (default: the model's context)
    stride: int | None = None  # (default: half the window)
    data: str | None = None  # the prepared dataset for the validation split
    batches: int | None = None
    seq_len: int | None = None
    progress: bool = False


def prepare(options) -> PplPlan:
    """Check the options before the model is loaded: sources parse and exist, or the dataset folder does."""
    from slmforge.data.sources import check_sources, parse_source

    if options.sources:
        if options.batches is not None:
            raise ValueError("--batches counts validation batches: with --source, ppl scores every document "
                             "(--limit caps the documents)")
        sources = [parse_source(s) for s in options.sources]
        check_sources(sources)
        if options.stride is not None and options.seq_len is not None and options.stride > options.seq_len:
            raise ValueError(f"--stride {options.stride} exceeds the window --seq-len {options.seq_len}")
        return PplPlan(sources, list(options.sources), options.limit, options.seq_len, options.stride,
                       progress=options.progress)
    for flag, value in (("--limit", options.limit), ("--stride", options.stride)):
        if value is not None:
            raise ValueError(f"{flag} applies to ppl on --source texts; on the run's validation split use "
                             f"--batches and --seq-len")
    if options.data is not None and not (Path(options.data) / "meta.json").is_file():
        raise FileNotFoundError(f"--data {options.data} is not a prepared dataset (no meta.json): ppl reads a "
                                f"dataset's validation split, or text given as --source")
    return PplPlan(data=options.data, batches=options.batches, seq_len=options.seq_len, progress=options.progress)


def run(loaded, plan: PplPlan) -> TaskResult:
    return score_sources(loaded, plan) if plan.sources else score_validation(loaded, plan)


def score_validation(loaded, plan: PplPlan) -> TaskResult:
    """The figures `slmforge eval` prints without a task, from the validation split."""
    from slmforge.eval import evaluate_validation

    figures, batches, data, seq_len = evaluate_validation(loaded, plan.data, plan.batches, plan.seq_len)
    batch_size = loaded.config.run_phases()[-1].data.batch_size
    tokens = sum(b.scored for b in batches)
    return TaskResult(
        task="ppl",
        metrics={"bpb": figures["bpb"], "loss": figures["loss"], "ppl": figures["ppl"], "tokens": tokens},
        n_examples=sum(len(b) for b in batches),
        settings={"data": data, "split": "val", "seq_len": seq_len, "batches": len(batches),
                  "batch_size": batch_size, "dtype": str(loaded.dtype).removeprefix("torch.")},
    )


def score_sources(loaded, plan: PplPlan) -> TaskResult:
    """Every document of the sources scored on its own, in windows (see the module docstring)."""
    from tqdm import tqdm

    from slmforge.data.sources import SourceStats, iter_documents

    model, tokenizer = loaded.model, loaded.tokenizer
    context = model.cfg.max_seq_len
    window = plan.window or default_window(model.cfg)
    if window > context:
        raise ValueError(f"--seq-len {window} exceeds the model's context of {context} tokens")
    stride = plan.stride or max(1, window // 2)
    if stride > window:
        raise ValueError(f"--stride {stride} exceeds the window of {window} tokens")
    start = document_start_id(tokenizer)
    records: list[dict] = []
    pending: list[tuple[int, list[int], int]] = []  # (record index, sequence, targets scored at its end)
    skipped = {}

    def flush():
        scores = token_logprobs(model, [seq for _, seq, _ in pending], loaded.autocast())
        for (index, _, scored), logp in zip(pending, scores):
            records[index]["nats"] -= float(logp[-scored:].sum())
        pending.clear()

    bar = tqdm(desc="ppl", unit=" docs", disable=not plan.progress)
    for source in plan.sources:
        stats = SourceStats()
        index = 0
        for text in iter_documents(source, stats):
            if plan.limit is not None and len(records) >= plan.limit:
                break
            ids = tokenizer.encode(text)
            records.append({"source": source.name, "document": index, "tokens": len(ids),
                            "bytes": len(text.encode("utf-8")), "nats": 0.0})
            index += 1
            seq = [start, *ids]
            for begin, end, first in windows(len(ids), window, stride):
                pending.append((len(records) - 1, seq[begin:end], end - first))
                if len(pending) >= 64:
                    flush()
            bar.update(1)
        if stats.skipped_files or stats.skipped_lines:
            skipped[source.name] = dict(stats.reasons)
    if pending:
        flush()
    bar.close()
    if not records:
        raise ValueError(f"the sources {plan.specs} hold no document to score"
                         + (f" (skipped: {skipped})" if skipped else ""))
    nats = math.fsum(r["nats"] for r in records)
    tokens = sum(r["tokens"] for r in records)
    n_bytes = sum(r["bytes"] for r in records)
    for r in records:
        r["bpb"] = r["nats"] / (math.log(2) * r["bytes"]) if r["bytes"] else float("nan")
    loss = nats / tokens if tokens else float("nan")
    return TaskResult(
        task="ppl",
        metrics={"bpb": nats / (math.log(2) * n_bytes), "loss": loss, "ppl": math.exp(min(loss, 700.0)),
                 "tokens": tokens, "bytes": n_bytes},
        n_examples=len(records),
        settings={"sources": plan.specs, "window": window, "stride": stride, "limit": plan.limit,
                  "document_start_token": start, "skipped": skipped,
                  "dtype": str(loaded.dtype).removeprefix("torch.")},
        records=records,
    )


