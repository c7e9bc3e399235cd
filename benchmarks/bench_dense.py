"""Dense-model speed, side by side with transformers' LlamaForCausalLM in one run on one machine.

  python benchmarks/bench_dense.py              # shard-40m, seq 512: training tokens/s + MFU, greedy decode
  python benchmarks/bench_dense.py --compile    # adds torch.compile rows for both (compile time reported)
  python benchmarks/bench_dense.py --quick      # tiny shapes, seconds (a smoke test)

Training: forward + backward + an AdamW step (same optimizer settings for both, so the model code is what
is compared), the same cross-entropy computed outside both models on their fp32 logits; the median of
interleaved repetitions. transformers' Llama has no logit soft-cap, so the head-to-head row runs shard-40m
with `final_logit_softcap=null` (the same math on both sides); the preset as configured (cap 30) is an
extra row. MFU is against a matmul peak measured here in the same dtype (an n x n x n matmul, n = 2048).
FLOPs per token = 6 * N_matmul + 12 * L * H * d_head * T (nanoGPT / PaLM appendix B), N_matmul = every
weight matrix that multiplies activations, the tied head included, the embedding lookup not.

Decode: greedy, batch 1, KV cache on both sides, the same weights; tokens/s = new tokens / wall time of
the whole call (prefill included). slmforge runs `slmforge.infer.generate_ids`, and a bare loop over
`model(token, cache=cache, last_only=True)` to show what the generation wrapper costs. A one-token step
streams every weight from memory once, so the bound is (weight bytes) / (memory bandwidth, measured here).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from slmforge.config import load_config
from slmforge.export.names import to_hf
from slmforge.hardware import choose_dtype, keep_freed_memory
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


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(dtype: torch.dtype, n: int, device: torch.device, seconds: float) -> float:
    """FLOP/s of an n x n x n matmul in `dtype`: the best of several timed bursts."""
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    a @ b
    best = 0.0
    deadline = time.perf_counter() + seconds
    while True:
        sync(device)
        start = time.perf_counter()
        a @ b
        sync(device)
        best = max(best, 2 * n**3 / (time.perf_counter() - start))
        if time.perf_counter() > deadline:
            return best


def memory_bandwidth(device: torch.device, mbytes: int, seconds: float) -> float:
    """Bytes/s of reading a buffer far larger than the caches (a sum over it): the best of several."""
    x = torch.ones(mbytes * (1 << 20) // 4, device=device)
    best, deadline = 0.0, time.perf_counter() + seconds
    while True:
        sync(device)
        start = time.perf_counter()
        x.sum()
        sync(device)
        best = max(best, x.numel() * 4 / (time.perf_counter() - start))
        if time.perf_counter() > deadline:
            return best


# ----------------------------------------------------------------------------------------------
# the transformers twin


def hf_llama(model: Transformer):
    """transformers' LlamaForCausalLM of the same shape, holding copies of the same weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    c = model.cfg
    hf = LlamaForCausalLM(LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.d_model, intermediate_size=c.d_ff, num_hidden_layers=c.n_layers,
        num_attention_heads=c.n_heads, num_key_value_heads=c.n_kv_heads, head_dim=c.head_dim,
        max_position_embeddings=c.max_seq_len, rms_norm_eps=c.norm_eps, tie_word_embeddings=c.tie_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": c.rope_base}, attention_bias=c.bias,
        mlp_bias=c.bias, attn_implementation="sdpa"))
    params = dict(hf.named_parameters(remove_duplicate=False))
    with torch.no_grad():
        for name, p in to_hf(model.state_dict(), "llama").items():
            params[name].copy_(p)
    return hf.to(model.embed.weight.device)


# ----------------------------------------------------------------------------------------------
# training


def train_step(model, optimizer, tokens, targets, amp, ours: bool, device):
    def step():
        with amp:
            logits = model(tokens)[0] if ours else model(input_ids=tokens, use_cache=False).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(device)
    return step


def interleaved(fns: dict, repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds per call of each function, measured in turns so machine noise hits all alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def flops_per_token(cfg, seq_len: int) -> int:
    d, hd = cfg.d_model, cfg.head_dim
    per_layer = d * hd * (cfg.n_heads + 2 * cfg.n_kv_heads) + cfg.n_heads * hd * d + 3 * d * cfg.d_ff
    n_matmul = cfg.n_layers * per_layer + cfg.vocab_size * d
    return 6 * n_matmul + 12 * cfg.n_layers * cfg.n_heads * hd * seq_len


def bench_training(cfg, capped_cfg, batch, seq_len, repeats, device, dtype, compile_: bool, log) -> dict:
    amp = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()
    torch.manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq_len), device=device)
    targets = torch.randint(0, cfg.vocab_size, (batch, seq_len), device=device)
    ours = Transformer(cfg).to(device).train()
    models = {"slmforge": (ours, True), "transformers": (hf_llama(ours).train(), False)}
    if capped_cfg is not None:
        capped = Transformer(capped_cfg).to(device).train()
        capped.load_state_dict(ours.state_dict())
        caps = [f"{what} soft-cap {value:g}" for what, value in (("logit", capped_cfg.final_logit_softcap),
                                                                 ("attention", capped_cfg.attn_logit_softcap)) if value]
        models[f"slmforge as configured ({', '.join(caps)})"] = (capped, True)
    fns = {}
    for name, (model, is_ours) in models.items():
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
        fns[name] = train_step(model, opt, tokens, targets, amp, is_ours, device)
    compile_s = {}
    if compile_:
        for name in ("slmforge", "transformers"):
            model, is_ours = models[name]
            twin = Transformer(cfg).to(device).train() if is_ours else hf_llama(ours).train()
            if is_ours:
                twin.load_state_dict(ours.state_dict())
            opt = torch.optim.AdamW(twin.parameters(), lr=1e-4, foreach=True)
            fn = train_step(torch.compile(twin), opt, tokens, targets, amp, is_ours, device)
            log(f"compiling {name} ...")
            start = time.perf_counter()
            fn()  # compiles forward and backward
            compile_s[f"{name} + torch.compile"] = time.perf_counter() - start
            fns[f"{name} + torch.compile"] = fn
    log(f"training: {len(fns)} variants x {repeats} interleaved steps of {batch}x{seq_len} tokens ...")
    times = interleaved(fns, repeats)
    fpt = flops_per_token(cfg, seq_len)
    out = {}
    for name, t in times.items():
        s = statistics.median(t)
        out[name] = {"step_s": s, "step_s_all": t, "tokens_per_s": batch * seq_len / s, "flops_per_token": fpt}
        if name in compile_s:  # first call minus a steady step ~ compile time
            out[name]["compile_s"] = compile_s[name] - s
    return out


# ----------------------------------------------------------------------------------------------
# decoding


def bench_decode(cfg, prompt_len, new_tokens, repeats, device, dtype, log) -> dict:
    torch.manual_seed(0)
    ours = Transformer(cfg).to(device).eval()
    with torch.no_grad():  # larger weights than the init, so greedy tokens vary and a comparison means something
        for name, p in ours.named_parameters():
            if not name.endswith("norm.weight"):
                p.normal_(0.0, 0.08)
    theirs = hf_llama(ours).eval()
    if dtype != torch.float32:
        ours, theirs = ours.to(dtype), theirs.to(dtype)
    prompt = torch.randint(0, cfg.vocab_size, (1, prompt_len), device=device)
    params = SamplingParams(max_new_tokens=new_tokens, min_new_tokens=new_tokens, temperature=0.0)
    tokens = {}

    def run_generate_ids():
        tokens["slmforge generate_ids"] = generate_ids(ours, prompt.tolist(), params)[0].token_ids
        sync(device)

    @torch.inference_mode()
    def run_loop():
        cache = ours.new_cache(1, prompt_len + new_tokens)
        logits, _ = ours(prompt, cache=cache, last_only=True)
        out = []
        for _ in range(new_tokens):
            next_id = logits[:, -1].argmax(-1, keepdim=True)
            out.append(next_id)
            logits, _ = ours(next_id, cache=cache, last_only=True)
        tokens["slmforge bare loop"] = torch.cat(out, 1)[0].tolist()
        sync(device)

    @torch.inference_mode()
    def run_hf():
        out = theirs.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                              min_new_tokens=new_tokens, do_sample=False, use_cache=True, pad_token_id=0)
        tokens["transformers generate"] = out[0, prompt_len:].tolist()
        sync(device)

    log(f"decode: 3 variants x {repeats} runs of {new_tokens} tokens ...")
    times = interleaved({"slmforge generate_ids": run_generate_ids, "slmforge bare loop": run_loop,
                         "transformers generate": run_hf}, repeats)
    reference = tokens["transformers generate"]
    out = {}
    for name, t in times.items():
        s = statistics.median(t)
        same = sum(a == b for a, b in zip(tokens[name], reference))
        out[name] = {"tokens_per_s": new_tokens / s, "ms_per_token": 1000 * s / new_tokens, "run_s_all": t,
                     "same_tokens_as_transformers": f"{same}/{new_tokens}"}
    out["weight_bytes"] = sum(p.numel() * p.element_size() for p in ours.parameters())
    return out


# ----------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny shapes: a smoke run of seconds")
    parser.add_argument("--preset", default="shard-40m")
    parser.add_argument("--dtype", choices=("auto", "bf16", "fp32"), default="auto",
                        help="auto: bf16 autocast where the CPU/GPU has fast bf16, else fp32")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3, help="timed training steps / decode runs per variant")
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--compile", action="store_true", help="add torch.compile rows for both models")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--out", default="benchmarks/results/dense.json")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    keep_freed_memory()  # as `slmforge train` does
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype, why = choose_dtype(args.dtype, device)
    if args.quick:
        preset, overrides = "tiny", ["model.attention_pattern=[global]"]
        batch, seq_len, repeats, new_tokens, prompt_len, n_peak, mbytes = 2, 64, 2, 16, 8, 256, 64
    else:
        preset, overrides = args.preset, []
        batch, seq_len, repeats, new_tokens, prompt_len, n_peak, mbytes = (
            args.batch, args.seq_len, args.repeats, args.new_tokens, args.prompt_len, 2048, 512)
    configured = load_config(preset, overrides).model
    cfg = load_config(preset, overrides + ["model.final_logit_softcap=null", "model.attn_logit_softcap=null"]).model
    has_cap = configured.final_logit_softcap is not None or configured.attn_logit_softcap is not None

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    machine = {"cpu": cpu_name(), "cores": os.cpu_count(), "torch": torch.__version__,
               "threads": torch.get_num_threads(), "device": str(device),
               "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None}
    try:
        import transformers
        machine["transformers"] = transformers.__version__
    except ImportError:
        sys.exit("bench_dense.py compares against transformers: pip install -e '.[bench]'")
    if args.compile:  # report cold compile times, not those of kernels cached on disk by an earlier run
        from torch._inductor import config as inductor_config
        inductor_config.force_disable_caches = True

    def machine_limits():
        return (matmul_peak(dtype, n_peak, device, 0.5 if args.quick else 2.0),
                memory_bandwidth(device, mbytes, 0.3 if args.quick else 1.0))

    # Measured before and after the runs, the best of both: a burst of load from another process on a
    # shared machine lowers a peak measurement, and a low peak inflates MFU.
    log(f"measuring the {dtype} matmul peak and memory bandwidth ...")
    limits = [machine_limits()]
    train = bench_training(cfg, configured if has_cap else None, batch, seq_len, repeats, device, dtype,
                           args.compile, log)
    decode = bench_decode(cfg, prompt_len, new_tokens, repeats, device, dtype, log)
    log("measuring the peak and bandwidth again ...")
    limits.append(machine_limits())
    peak, bandwidth = max(p for p, _ in limits), max(b for _, b in limits)
    for row in train.values():
        row["mfu"] = row["tokens_per_s"] * row["flops_per_token"] / peak
    decode["bandwidth_bound_tokens_per_s"] = bandwidth / decode["weight_bytes"]
    result = {
        "machine": machine, "dtype": str(dtype).removeprefix("torch."), "dtype_reason": why,
        "preset": preset, "batch": batch, "seq_len": seq_len, "repeats": repeats,
        "matmul_peak_flops": peak, "memory_bandwidth_bytes_per_s": bandwidth,
        "flops_per_token_formula": "6 * N_matmul + 12 * n_layers * n_heads * head_dim * seq_len",
        "train": train, "decode": decode,
        "train_ratio": train["slmforge"]["tokens_per_s"] / train["transformers"]["tokens_per_s"],
        "decode_ratio": (decode["slmforge generate_ids"]["tokens_per_s"]
                         / decode["transformers generate"]["tokens_per_s"]),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(report(result, new_tokens, prompt_len))
    print(f"\nJSON: {args.out}")
    return result


def report(r: dict, new_tokens: int, prompt_len: int) -> str:
    m = r["machine"]
    lines = [
        f"{m['cpu']} ({m['cores']} cores){', ' + m['gpu'] if m['gpu'] else ''}; torch {m['torch']}, "
        f"transformers {m['transformers']}, {m['threads']} threads",
        f"dtype: {r['dtype_reason']}",
        f"measured {r['dtype']} matmul peak {r['matmul_peak_flops'] / 1e9:,.0f} GFLOP/s; "
        f"memory bandwidth {r['memory_bandwidth_bytes_per_s'] / 1e9:,.1f} GB/s",
        "",
        f"Training, {r['preset']}, batch {r['batch']} x seq {r['seq_len']}, forward + backward + AdamW, "
        f"median of {r['repeats']} (FLOPs/token = {r['flops_per_token_formula']})",
        "",
        "| model | tokens/s | step s | MFU | vs transformers eager |",
        "|---|---:|---:|---:|---:|",
    ]
    base = r["train"]["transformers"]["tokens_per_s"]
    for name, row in r["train"].items():
        extra = f" (compile {row['compile_s']:.0f} s)" if "compile_s" in row else ""
        lines.append(f"| {name}{extra} | {row['tokens_per_s']:,.0f} | {row['step_s']:.2f} | {row['mfu']:.1%} | "
                     f"{row['tokens_per_s'] / base:.2f}x |")
    d = r["decode"]
    lines += [
        "",
        f"Greedy decode, batch 1, prompt {prompt_len}, {new_tokens} new tokens, KV cache; bandwidth bound "
        f"{d['bandwidth_bound_tokens_per_s']:,.0f} tokens/s ({d['weight_bytes'] / 1e6:,.1f} MB of weights per step)",
        "",
        "| decoder | tokens/s | ms/token | vs transformers | same tokens |",
        "|---|---:|---:|---:|---:|",
    ]
    base = d["transformers generate"]["tokens_per_s"]
    for name in ("slmforge generate_ids", "slmforge bare loop", "transformers generate"):
        row = d[name]
        lines.append(f"| {name} | {row['tokens_per_s']:,.1f} | {row['ms_per_token']:.2f} | "
                     f"{row['tokens_per_s'] / base:.2f}x | {row['same_tokens_as_transformers']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
