"""Dense-model speed, side by side with transformers' LlamaForCausalLM in one run on one machine.

  python benchmarks/bench_dense.py            # shard-40m, seq 512: training tokens/s + MFU, greedy decode
  python benchmarks/bench_dense.py --quick    # tiny shapes, seconds (a smoke test)

Training: forward + backward + an AdamW step for both models (same optimizer, so the model code is what
is compared), median over interleaved repetitions. MFU is against a measured matmul peak of the chosen
dtype. FLOPs per token = 6 * (matmul parameters, tied head included) + 12 * layers * heads * head_dim * T
(nanoGPT's convention). Decode: greedy, batch 1, KV cache on both sides, the same weights.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from slmforge.config import load_config
from slmforge.hardware import cpu_has_fast_bf16, keep_freed_memory
from slmforge.infer import SamplingParams, generate_ids
from slmforge.model import Transformer


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def matmul_peak(dtype: torch.dtype, n: int, seconds: float = 2.0) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
    return 2 * n**3 * count / (time.perf_counter() - start)


def hf_llama(model: Transformer):
    """transformers' LlamaForCausalLM of the same shape, holding the same weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    c = model.cfg
    hf = LlamaForCausalLM(LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.d_model, intermediate_size=c.d_ff, num_hidden_layers=c.n_layers,
        num_attention_heads=c.n_heads, num_key_value_heads=c.n_kv_heads, head_dim=c.head_dim,
        max_position_embeddings=c.max_seq_len, rms_norm_eps=c.norm_eps, tie_word_embeddings=c.tie_embeddings,
        rope_theta=c.rope_base, attention_bias=False, mlp_bias=False, attn_implementation="sdpa"))
    renames = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm", "attn.": "self_attn.",
               "ffn.": "mlp."}
    state = {}
    for name, tensor in model.state_dict().items():
        if name == "embed.weight":
            state["model.embed_tokens.weight"] = tensor
            continue
        for ours, theirs in renames.items():
            name = name.replace(ours, theirs)
        state[name if name.startswith("lm_head") else f"model.{name}"] = tensor
    if c.tie_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    hf.load_state_dict(state, strict=True)
    return hf


def train_step_fn(model, optimizer, tokens, autocast, ours: bool):
    def step():
        with autocast:
            if ours:
                logits, _ = model(tokens[:, :-1])
                loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())
            else:
                loss = model(input_ids=tokens[:, :-1], labels=tokens[:, :-1]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def interleaved(fns: dict, repeats: int, warmup: int = 2) -> dict[str, float]:
    """Median seconds per call of each function, measured in turns so machine noise hits all alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def bench_training(cfg, batch, seq_len, repeats, dtype, autocast) -> dict:
    torch.manual_seed(0)
    ours = Transformer(cfg).train()
    theirs = hf_llama(ours).train()
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq_len + 1))
    fns = {name: train_step_fn(m, torch.optim.AdamW(m.parameters(), lr=1e-4), tokens, autocast, name == "slmforge")
           for name, m in (("slmforge", ours), ("transformers", theirs))}
    seconds = interleaved(fns, repeats)
    matmul_params = sum(p.numel() for p in ours.parameters()) - cfg.vocab_size * cfg.d_model * (not cfg.tie_embeddings)
    flops_per_token = 6 * matmul_params + 12 * cfg.n_layers * cfg.n_heads * cfg.head_dim * seq_len
    return {name: {"tokens_per_s": batch * seq_len / s, "flops_per_token": flops_per_token}
            for name, s in seconds.items()}


def bench_decode(cfg, prompt_len, new_tokens, repeats) -> dict:
    torch.manual_seed(0)
    ours = Transformer(cfg).eval()
    theirs = hf_llama(ours).eval()
    prompt = torch.randint(0, cfg.vocab_size, (1, prompt_len))
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0.0)
    results = {}

    def run_ours():
        results["slmforge"] = generate_ids(ours, prompt.tolist(), params)[0].token_ids

    def run_theirs():
        with torch.inference_mode():
            out = theirs.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                  use_cache=True, pad_token_id=0)
        results["transformers"] = out[0, prompt_len:].tolist()

    seconds = interleaved({"slmforge": run_ours, "transformers": run_theirs}, repeats, warmup=1)
    same = results["slmforge"][:new_tokens] == results["transformers"][:new_tokens]
    return {name: {"tokens_per_s": new_tokens / s, "same_tokens": same} for name, s in seconds.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny shapes: a smoke run of seconds")
    parser.add_argument("--dtype", choices=("auto", "bf16", "fp32"), default="auto")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="benchmarks/results/dense.json")
    args = parser.parse_args()
    keep_freed_memory()

    fast_bf16 = cpu_has_fast_bf16()
    use_bf16 = args.dtype == "bf16" or (args.dtype == "auto" and fast_bf16)
    dtype = torch.bfloat16 if use_bf16 else torch.float32
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_bf16)
    preset, seq_len, new_tokens, repeats = ("tiny", 64, 16, 2) if args.quick else ("shard-40m", 512, 256, args.repeats)
    overrides = ["model.final_logit_softcap=null"]  # transformers' Llama has no soft-cap: compare like with like
    cfg = load_config(preset, overrides).model

    machine = {"cpu": cpu_name(), "cores": os.cpu_count(), "torch": torch.__version__,
               "threads": torch.get_num_threads(), "fast_bf16": fast_bf16, "dtype": str(dtype).removeprefix("torch.")}
    peak = matmul_peak(dtype, 256 if args.quick else 2048, 0.5 if args.quick else 2.0)
    train = bench_training(cfg, 2 if args.quick else args.batch, seq_len, repeats, dtype, autocast)
    decode = bench_decode(cfg, 8 if args.quick else 32, new_tokens, repeats)
    for row in train.values():
        row["mfu"] = row["tokens_per_s"] * row["flops_per_token"] / peak
    result = {"machine": machine, "preset": preset, "seq_len": seq_len, "matmul_peak_flops": peak,
              "train": train, "decode": decode,
              "train_ratio": train["slmforge"]["tokens_per_s"] / train["transformers"]["tokens_per_s"],
              "decode_ratio": decode["slmforge"]["tokens_per_s"] / decode["transformers"]["tokens_per_s"]}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")

    print(f"{machine['cpu']}, {machine['cores']} cores, torch {machine['torch']}, {machine['threads']} threads, "
          f"{machine['dtype']} (fast bf16: {fast_bf16}); measured {machine['dtype']} matmul peak {peak / 1e9:.0f} GFLOP/s")
    print(f"\n| {preset} | slmforge | transformers | ratio |\n|---|---|---|---|")
    t, d = train, decode
    print(f"| training tokens/s (seq {seq_len}, batch {2 if args.quick else args.batch}, fwd+bwd+AdamW) | "
          f"{t['slmforge']['tokens_per_s']:,.0f} | {t['transformers']['tokens_per_s']:,.0f} | {result['train_ratio']:.2f}x |")
    print(f"| training MFU | {t['slmforge']['mfu']:.1%} | {t['transformers']['mfu']:.1%} | |")
    print(f"| greedy decode tokens/s (batch 1, {new_tokens} new, KV cache) | {d['slmforge']['tokens_per_s']:,.1f} | "
          f"{d['transformers']['tokens_per_s']:,.1f} | {result['decode_ratio']:.2f}x |")
    print(f"\nsame greedy tokens: {d['slmforge']['same_tokens']}; JSON: {args.out}")


if __name__ == "__main__":
    main()
