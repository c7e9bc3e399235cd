"""Batch-1 greedy decoding against the memory-bandwidth bound and against llama.cpp, for each way of holding
the weights, side by side in one run on one machine.

  python benchmarks/bench_decode.py                      # shard-40m's shape, random weights
  python benchmarks/bench_decode.py --loss runs/quickstart/train   # + the validation loss of each format

A decoding step reads every weight the token passes through once, so tokens/s can be no more than
(bytes/s the machine reads) / (bytes of those weights). The bandwidth is measured here as the best of
several sums over a 1 GiB float32 tensor with the same threads. slmforge decodes through its engine
(`generate_ids` on a model from `load_for_decoding`): fp32, bf16, f16 (the whole model in that dtype) and
int8 (W8A8, `slmforge.infer.kernels`), plus fp32 without `prepare_for_decoding` (plain forwards). llama.cpp
decodes GGUF exports of the same weights (f32, f16, q8_0) with an argmax loop over `Llama.eval`. The model
is shard-40m's shape in llama form (global attention, no logit cap: what llama.cpp runs), 8192-token
vocabulary. tokens/s counts new tokens over the wall time after the prompt; runners take turns, medians.
With `--loss RUN`, each format's validation loss on RUN's own validation split (its trained checkpoint)
shows what the smaller formats cost in quality.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from bench_dense import cpu_name
from bench_gguf import build, theirs

from slmforge.export.gguf_export import export_gguf
from slmforge.hardware import keep_freed_memory
from slmforge.infer import SamplingParams, generate_ids
from slmforge.infer.load import DECODE_WEIGHTS, load_for_decoding, load_model

LLAMA_FORM = ["model.attention_pattern=[global]", "model.final_logit_softcap=null", "model.vocab_size=8192"]


def bandwidth(threads: int) -> float:
    """Bytes per second the machine reads: the best of 5 runs each of a sum, a max and a dot product over
    1 GiB of random float32 (far beyond the caches) on `threads` threads."""
    torch.set_num_threads(threads)
    data = torch.randn(256 * 1024 * 1024)
    best = float("inf")
    for reduce in (torch.sum, torch.max, lambda x: torch.dot(x, x)):
        for _ in range(5):
            t0 = time.perf_counter()
            reduce(data)
            best = min(best, time.perf_counter() - t0)
    return data.numel() * 4 / best


def bytes_per_token(model) -> int:
    """Bytes of the weights one decoding step reads: every matrix but the embedding table (one row of it),
    the head included (the tied embedding when tied)."""
    total = sum(p.numel() * p.element_size() for name, p in model.named_parameters() if not name.startswith("embed"))
    head = model.head_weight()
    return total + (head.numel() * head.element_size() if model.lm_head is None else 0)


def ours(model, prompt: list[int], n: int) -> tuple[float, list[int]]:
    params = SamplingParams(max_new_tokens=n, min_new_tokens=n, temperature=0.0)
    t0 = time.perf_counter()
    generate_ids(model, [prompt], SamplingParams(max_new_tokens=1, temperature=0.0))
    prefill = time.perf_counter() - t0
    t0 = time.perf_counter()
    tokens = generate_ids(model, [prompt], params)[0].token_ids
    return (n - 1) / max(time.perf_counter() - t0 - prefill, 1e-9), tokens


def validation_loss(run: str, weights: str, batches: int) -> float:
    """RUN's validation loss with its weights held as `weights`, through the decoding forward (a cache)."""
    from slmforge.data.loader import TokenDataset, val_batches

    loaded = load_for_decoding(run, device="cpu", weights=weights)
    phase = loaded.config.run_phases()[-1]
    data = val_batches(TokenDataset(phase.data.path), phase.data.seq_len, phase.data.batch_size, batches)
    nats = count = 0.0
    with torch.inference_mode():
        for x, y in data:
            cache = loaded.model.new_cache(x.shape[0], x.shape[1])
            logits, _ = loaded.model(x, cache=cache)
            nats += torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum").item()
            count += y.numel()
    return nats / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--loss", metavar="RUN", help="also measure each format's validation loss on RUN")
    parser.add_argument("--loss-batches", type=int, default=20)
    parser.add_argument("--out", default="benchmarks/results/decode.json")
    args = parser.parse_args()
    import llama_cpp

    keep_freed_memory()
    read_per_s = bandwidth(args.threads)
    torch.set_num_threads(args.threads)
    prompt = torch.randint(0, 256, (16,), generator=torch.Generator().manual_seed(1)).tolist()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        source = build("shard-40m", LLAMA_FORM, Path(tmp))
        models = {f"slmforge {w}": load_for_decoding(source, device="cpu", weights=w).model for w in DECODE_WEIGHTS}
        models["slmforge fp32, not prepared"] = load_model(source, device="cpu").model
        fp32_bytes = bytes_per_token(models["slmforge fp32, not prepared"])  # no fused views to count twice
        runners = {name: (lambda m=m: ours(m, prompt, args.tokens)) for name, m in models.items()}
        for dtype in ("f32", "f16", "q8_0"):
            path = export_gguf(source, Path(tmp) / f"model-{dtype}.gguf", dtype=dtype)
            llm = llama_cpp.Llama(model_path=str(path), n_ctx=len(prompt) + args.tokens + 8, n_batch=64,
                                  n_threads=args.threads, logits_all=True, verbose=False)
            runners[f"llama.cpp {dtype}"] = lambda llm=llm: theirs(llm, prompt, args.tokens)[1:]
        speeds = {name: [] for name in runners}
        tokens = {}
        for _ in range(args.repeats):
            for name, run in runners.items():
                speed, tokens[name] = run()
                speeds[name].append(speed)
    bound = read_per_s / fp32_bytes
    for name, values in speeds.items():
        row = {"runner": name, "decode_tokens_per_s": statistics.median(values),
               "same_tokens_as_llama_f32": tokens[name][:args.tokens - 1] == tokens["llama.cpp f32"][:args.tokens - 1]}
        if args.loss and name.startswith("slmforge") and "not prepared" not in name:
            row["val_loss"] = validation_loss(args.loss, name.split()[1], args.loss_batches)
        rows.append(row)
        print(json.dumps(row), file=sys.stderr)
    print(f"{cpu_name()}, {args.threads} threads; bandwidth {read_per_s / 1e9:.1f} GB/s; shard-40m (llama form) "
          f"reads {fp32_bytes / 1e6:.0f} MB of fp32 weights per token: bound {bound:.0f} tokens/s at fp32; "
          f"batch 1, {args.tokens} new tokens, medians of {args.repeats}\n")
    loss_head = " | val loss (change vs fp32)" if args.loss else ""
    fp32_loss = next((r.get("val_loss") for r in rows if r["runner"] == "slmforge fp32"), None)
    print(f"| runner | decode tokens/s | of the fp32 bound | vs llama.cpp f32 | greedy = llama.cpp f32{loss_head} |")
    print("|---|---:|---:|---:|---|" + ("---:|" if args.loss else ""))
    base = next(r for r in rows if r["runner"] == "llama.cpp f32")["decode_tokens_per_s"]
    for r in rows:
        loss = (f" | {r['val_loss']:.5f} ({r['val_loss'] - fp32_loss:+.5f})" if "val_loss" in r
                else (" | " if args.loss else ""))
        print(f"| {r['runner']} | {r['decode_tokens_per_s']:,.1f} | {r['decode_tokens_per_s'] / bound:.0%} | "
              f"{r['decode_tokens_per_s'] / base:.2f}x | {'yes' if r['same_tokens_as_llama_f32'] else 'no'}{loss} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"cpu": cpu_name(), "threads": args.threads, "bandwidth_gb_s": read_per_s / 1e9,
                                          "fp32_bytes_per_token": fp32_bytes, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
