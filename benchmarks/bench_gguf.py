"""Greedy decoding and prefill of slmforge against llama.cpp (llama-cpp-python) on the same exported model,
side by side in one run on one machine: the decode anchor of the README.

  python benchmarks/bench_gguf.py            # shard-40m's shape and the quickstart's, ~25 s on 2 cores
  python benchmarks/bench_gguf.py --quick    # the quickstart's shape only, fewer tokens

Each shape is built with random weights (std 0.02, as initialised) in llama.cpp's llama form: shard-40m
without its logit cap and with global attention in every layer (the llama architecture has neither cap nor
sliding window), the quickstart likewise. It is exported to GGUF at f32, f16 and q8_0. slmforge decodes from
its own fp32 weights with its KV cache (`generate_ids`, batch 1); llama.cpp decodes each GGUF with an
argmax loop over `Llama.eval`. tokens/s = new tokens / wall time after the prompt; prefill = prompt tokens
/ wall time of the prompt's forward. Both sides use the same number of threads; variants run in
interleaved turns, medians of `--repeats`. At f32 the greedy tokens of both are checked to be identical.
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

from slmforge.checkpoint import save_checkpoint
from slmforge.config import load_config
from slmforge.export.gguf_export import export_gguf
from slmforge.hardware import keep_freed_memory
from slmforge.infer import SamplingParams, generate_ids
from slmforge.model import build_model
from slmforge.tokenizer import byte_tokenizer

LLAMA_FORM = ["model.attention_pattern=[global]", "model.final_logit_softcap=null", "model.vocab_size=8192"]
SHAPES = {"shard-40m": ("shard-40m", LLAMA_FORM),
          "quickstart": ("quickstart", [*LLAMA_FORM[:2], "model.vocab_size=4096"])}


def build(preset: str, overrides: list[str], folder: Path) -> Path:
    cfg = load_config(preset, overrides)
    torch.manual_seed(0)
    model = build_model(cfg.model)
    return save_checkpoint(folder / "step_0", cfg=cfg, model_state=model.state_dict(), tokenizer=byte_tokenizer(),
                           optimizer_tensors={}, state={"step": 0}, keep_last=1)


def ours(model, prompt: list[int], n: int) -> tuple[float, float, list[int]]:
    """(prefill tokens/s, decode tokens/s, tokens) of slmforge."""
    with torch.no_grad():
        t0 = time.perf_counter()
        cache = model.new_cache(1, len(prompt) + n + 1)
        model(torch.tensor([prompt]), cache=cache, last_only=True)
        prefill = time.perf_counter() - t0
    params = SamplingParams(max_new_tokens=n, min_new_tokens=n, temperature=0.0)
    t0 = time.perf_counter()
    tokens = generate_ids(model, [prompt], params)[0].token_ids
    total = time.perf_counter() - t0
    return len(prompt) / prefill, n / max(total - prefill, 1e-9), tokens


def theirs(llm, prompt: list[int], n: int) -> tuple[float, float, list[int]]:
    """(prefill tokens/s, decode tokens/s, tokens) of llama.cpp."""
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(prompt)
    prefill = time.perf_counter() - t0
    out = []
    t0 = time.perf_counter()
    for _ in range(n):
        out.append(int(llm.scores[llm.n_tokens - 1].argmax()))
        llm.eval([out[-1]])
    return len(prompt) / prefill, n / (time.perf_counter() - t0), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results/gguf.json")
    args = parser.parse_args()
    import llama_cpp

    keep_freed_memory()
    torch.set_num_threads(args.threads)
    new_tokens, prompt_len = (32, 128) if args.quick else (128, 512)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for shape, (preset, overrides) in SHAPES.items():
            if args.quick and shape != "quickstart":
                continue
            folder = Path(tmp) / shape
            source = build(preset, overrides, folder)
            from slmforge.infer.load import load_model

            model = load_model(source, device="cpu").model
            length = min(prompt_len, model.cfg.max_seq_len - new_tokens - 8)  # the quickstart's context is 512
            prompt = torch.randint(0, 256, (length,), generator=torch.Generator().manual_seed(1)).tolist()
            runners = {"slmforge fp32": lambda: ours(model, prompt, new_tokens)}
            for dtype in ("f32", "f16", "q8_0"):
                path = export_gguf(source, folder / f"model-{dtype}.gguf", dtype=dtype)
                llm = llama_cpp.Llama(model_path=str(path), n_ctx=length + new_tokens + 8, n_batch=length,
                                      n_threads=args.threads, logits_all=True, verbose=False)
                runners[f"llama.cpp {dtype}"] = lambda llm=llm: theirs(llm, prompt, new_tokens)
            results = {name: [] for name in runners}
            tokens = {}
            for _ in range(args.repeats):
                for name, run in runners.items():
                    prefill, decode, tokens[name] = run()
                    results[name].append((prefill, decode))
            same = tokens["slmforge fp32"] == tokens["llama.cpp f32"]
            for name, values in results.items():
                rows.append({"shape": shape, "runner": name, "same_tokens_as_f32": same, "prompt_tokens": length,
                             "prefill_tokens_per_s": statistics.median(v[0] for v in values),
                             "decode_tokens_per_s": statistics.median(v[1] for v in values)})
                print(json.dumps(rows[-1]), file=sys.stderr)
    print(f"{cpu_name()}, {args.threads} threads, batch 1, {new_tokens} new tokens, medians of {args.repeats}\n")
    print("| shape | runner | decode tokens/s | vs llama.cpp f32 | prefill tokens/s (prompt) |")
    print("|---|---|---:|---:|---:|")
    for r in rows:
        base = next(x for x in rows if x["shape"] == r["shape"] and x["runner"] == "llama.cpp f32")
        print(f"| {r['shape']} | {r['runner']} | {r['decode_tokens_per_s']:,.1f} | "
              f"{r['decode_tokens_per_s'] / base['decode_tokens_per_s']:.2f}x | "
              f"{r['prefill_tokens_per_s']:,.0f} ({r['prompt_tokens']}) |")
    print(f"\ngreedy tokens identical at f32: {all(r['same_tokens_as_f32'] for r in rows)}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
