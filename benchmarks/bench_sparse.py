"""Sparse-model (MLA + MoE) speed and cache size, side by side with transformers in one run on one machine.

  python benchmarks/bench_sparse.py                        # three shapes: training, KV cache, decode
  python benchmarks/bench_sparse.py --checkpoint runs/x    # decode with trained weights (real MTP acceptance)
  python benchmarks/bench_sparse.py --quick                # tiny sizes, 1 repeat: a smoke test of seconds

Everything runs in fp32 with the same thread count; variants are timed in interleaved turns (the median
and the best of `--repeats` after one warm-up), so load from other processes hits them alike.

Training: forward + backward + optimizer step on random tokens, batch x seq tokens per step (seq capped
at the preset's max_seq_len, the batch grown to keep the tokens), for three shapes against a transformers model of the same shape (its own random init, same std):
  axion1-350k    vs DeepseekV3ForCausalLM; HF's MLA has no whole-head RoPE, so its head is split into
                 qk_nope = qk_rope = head_dim / 2 (same q/k width; HF also keeps latent RMSNorms and a
                 RoPE key in the kv latent, which Axion's form has not); n_group = topk_group = 1.
  codemind-tiny  vs DeepseekV3ForCausalLM, which has no MTP and no attention residuals: the head-to-head
                 row runs ours with residual=add, mtp_depth=0; the preset as configured (with its z-loss
                 and MTP loss) is an extra row. HF's router is sigmoid, ours softmax (a [N, 4] op).
  nekomind-tiny  vs Qwen2MoeForCausalLM (gated shared expert, first layer dense through mlp_only_layers),
                 which has no QK-norm and no balance loss by default: the head-to-head row turns both off
                 in ours; the preset as configured is an extra row.
Both sides of a head-to-head row use AdamW and the same cross-entropy on fp32 logits; ours is also run
with the default Muon+AdamW grouping (`build_optimizers`). transformers runs every CPU-capable experts
implementation (eager: a Python loop over experts; batched_mm; grouped_mm), and the table says which one
it picks by default.

KV cache: bytes per token in bf16 of our MLA latent cache against the same attention keeping per-head
keys and values (`model_stats`), checked on allocated models: `KVCache.nbytes()` of our cache against the
tensors in transformers' cache after a prefill.

Decode: batch 1, greedy, KV cache: ours plain (`generate_ids`), ours with MTP self-speculation
(`speculative_greedy`, whose output must equal plain greedy: checked), and transformers' `generate` of the
same-shape DeepseekV3 (no MTP, no attention residuals) as a reference. tokens/s = new tokens / wall time of the call (prefill
included). Random weights give the MTP drafter ~0 acceptance; `--checkpoint` measures a trained one.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from bench_dense import cpu_name, interleaved

from slmforge.config import OptimConfig, load_config
from slmforge.hardware import keep_freed_memory
from slmforge.infer import SamplingParams, generate_ids
from slmforge.infer.speculative import speculative_greedy
from slmforge.model import Transformer
from slmforge.model.cache import KVCache
from slmforge.model.stats import model_stats
from slmforge.optim import build_optimizers
from slmforge.train.loss import lm_loss

# (shape, preset, overrides that make ours compute what transformers computes, what they turn off)
SHAPES = [
    ("axion1-350k", "axion1-350k", [], ""),
    ("codemind-tiny", "codemind-tiny", ["model.residual=add", "model.mtp_depth=0", "model.n_kv_heads=4"],
     "attnres + MTP + one shared key/value head"),
    ("nekomind-tiny", "nekomind-tiny", ["model.qk_norm=false", "model.moe.balance_loss=0"], "QK-norm + balance loss"),
]
QUICK_SHAPES = [("axion1-tiny", "axion1-tiny", [], ""), *SHAPES[1:]]
EXPERT_IMPLS = ("eager", "batched_mm", "grouped_mm")  # transformers' experts implementations that run on CPU
KV_PRESETS = ("codemind-1b", "axion1-350k", "nekomind-1.5", "codemind-tiny", "axion1-tiny", "nekomind-tiny")
DECODE_PRESET = "codemind-tiny"  # the tiny preset with an MTP module


# ----------------------------------------------------------------------------------------------
# the transformers twins


def hf_twin(cfg, experts_implementation: str | None = None):
    """transformers' model of the same shape as `cfg` (MLA -> DeepseekV3, GQA -> Qwen2-MoE), randomly
    initialised with the same std; `experts_implementation` None leaves transformers' default."""
    import transformers

    e = cfg.moe
    common = {
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model, "intermediate_size": cfg.d_ff,
        "moe_intermediate_size": e.expert_d_ff, "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads, "num_experts_per_tok": e.top_k, "norm_topk_prob": e.norm_topk,
        "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
        "tie_word_embeddings": cfg.tie_embeddings, "initializer_range": cfg.init_std,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_base},
        "attn_implementation": "sdpa", "experts_implementation": experts_implementation}
    if cfg.attention == "mla":
        m = cfg.mla
        if e.shared_d_ff not in (0, e.expert_d_ff):
            raise ValueError("DeepseekV3's shared expert is as wide as a routed one")
        # whole_head RoPE has no HF form: half the head's channels become the decoupled RoPE part
        nope, rope = (m.qk_head_dim - m.qk_head_dim // 2, m.qk_head_dim // 2) if m.rope_mode == "whole_head" \
            else (m.qk_head_dim, m.rope_head_dim)
        hf_cfg = transformers.DeepseekV3Config(
            **common, num_key_value_heads=cfg.n_heads, n_shared_experts=int(e.shared_d_ff > 0),
            n_routed_experts=e.n_experts, routed_scaling_factor=e.route_scale, n_group=1, topk_group=1,
            first_k_dense_replace=e.first_dense_layers, q_lora_rank=m.q_lora_rank or None,
            kv_lora_rank=m.kv_lora_rank, qk_nope_head_dim=nope, qk_rope_head_dim=rope, v_head_dim=m.v_head_dim,
            rope_interleave=cfg.rope_layout == "pairs", attention_bias=cfg.bias)
        return transformers.DeepseekV3ForCausalLM(hf_cfg)
    hf_cfg = transformers.Qwen2MoeConfig(
        **common, num_key_value_heads=cfg.n_kv_heads or cfg.n_heads, head_dim=cfg.head_dim,
        num_experts=e.n_experts, shared_expert_intermediate_size=e.shared_d_ff, decoder_sparse_step=1,
        mlp_only_layers=list(range(e.first_dense_layers)), qkv_bias=cfg.bias, use_sliding_window=False)
    return transformers.Qwen2MoeForCausalLM(hf_cfg)


# ----------------------------------------------------------------------------------------------
# training


def train_step(model, optimizers, loss):
    def step():
        loss(model).backward()
        for opt in optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)
    return step


def bench_training(preset, overrides, turned_off, batch, seq_len, repeats, log) -> dict:
    run_cfg = load_config(preset)
    cfg = load_config(preset, overrides).model
    seq = min(seq_len, cfg.max_seq_len)
    batch = batch * seq_len // seq  # the same tokens per step when the preset's context is shorter
    torch.manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq))
    targets = torch.randint(0, cfg.vocab_size, (batch, seq))

    def ours_loss(z_loss=0.0, mtp_weight=0.0):
        def loss(model):
            logits, aux = model(tokens)
            return lm_loss(logits, targets, aux, z_loss, mtp_weight)[0]
        return loss

    def hf_loss(model):
        logits = model(input_ids=tokens, use_cache=False).logits
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())

    def adamw(model):
        return [torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)]

    ours, ours_muon = Transformer(cfg).train(), Transformer(cfg).train()
    fns = {"slmforge": train_step(ours, adamw(ours), ours_loss()),
           "slmforge, Muon+AdamW": train_step(ours_muon, build_optimizers(ours_muon, OptimConfig()), ours_loss())}
    if overrides:
        configured = Transformer(run_cfg.model).train()
        fns[f"slmforge as configured (+ {turned_off}, z-loss)"] = train_step(
            configured, adamw(configured), ours_loss(run_cfg.train.z_loss, run_cfg.train.mtp_weight))
    default_model = hf_twin(cfg).train()
    default_impl = default_model.config._experts_implementation
    hf_names = {}
    for impl in EXPERT_IMPLS:
        model = default_model if impl == default_impl else hf_twin(cfg, impl).train()
        hf_names[impl] = f"transformers {impl}{' (its default)' if impl == default_impl else ''}"
        fns[hf_names[impl]] = train_step(model, adamw(model), hf_loss)
    log(f"training {preset}: {len(fns)} variants x {repeats} interleaved steps of {batch}x{seq} tokens ...")
    times = interleaved(fns, repeats)
    rows = {name: {"step_s": statistics.median(t), "step_s_best": min(t), "step_s_all": t,
                   "tokens_per_s": batch * seq / statistics.median(t)} for name, t in times.items()}
    fastest = max(hf_names.values(), key=lambda name: rows[name]["tokens_per_s"])
    for row in rows.values():
        for ref, key in ((hf_names[default_impl], "vs_hf_default"), (fastest, "vs_hf_fastest")):
            row[key] = rows[ref]["step_s"] / row["step_s"]
            row[key + "_best"] = rows[ref]["step_s_best"] / row["step_s_best"]
    return {"batch": batch, "seq_len": seq, "overrides": overrides, "hf_model": type(default_model).__name__,
            "hf_default_experts": default_impl, "hf_fastest": fastest, "rows": rows,
            "ratio_vs_hf_default": rows["slmforge"]["vs_hf_default"],
            "ratio_vs_hf_fastest": rows["slmforge"]["vs_hf_fastest"]}


# ----------------------------------------------------------------------------------------------
# KV cache


@torch.no_grad()
def measured_kv(cfg, n_tokens: int) -> dict:
    """bf16 bytes per token actually allocated: our cache, and transformers' cache after a prefill."""
    with torch.device("meta"):
        layout = Transformer(cfg).cache_layout()
    ours = KVCache(layout, 1, n_tokens, dtype=torch.bfloat16).nbytes() / (n_tokens + 1)  # + 1 scratch slot
    hf = hf_twin(cfg).eval()
    tokens = torch.randint(0, cfg.vocab_size, (1, n_tokens))
    cache = hf(input_ids=tokens, use_cache=True).cache
    values = sum(t.numel() for layer in cache.layers for t in (layer.keys, layer.values))
    return {"slmforge_bytes_per_token_bf16": ours, "transformers_bytes_per_token_bf16": 2 * values / n_tokens,
            "transformers_model": type(hf).__name__}


def bench_kv(presets, measured: dict) -> dict:
    out = {}
    for name in presets:
        stats = model_stats(load_config(name).model)
        out[name] = {"latent_bytes_per_token_bf16": stats["kv_bytes_per_token_bf16"],
                     "per_head_kv_bytes_per_token_bf16": stats["kv_bytes_per_token_expanded_bf16"]}
        if name in measured:
            out[name]["measured"] = measured_kv(load_config(name, measured[name]).model, 64)
    return out


# ----------------------------------------------------------------------------------------------
# decoding


def bench_decode(model, hf, prompt: list[int], new_tokens: int, repeats: int, log) -> dict:
    params = SamplingParams(max_new_tokens=new_tokens, min_new_tokens=new_tokens, temperature=0.0)
    outputs = {}

    def plain():
        outputs["plain"] = generate_ids(model, [prompt], params)[0].token_ids

    def speculative():
        outputs["speculative"] = speculative_greedy(model, prompt, new_tokens)

    @torch.inference_mode()
    def reference():
        ids = torch.tensor([prompt])
        hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                    do_sample=False, use_cache=True, pad_token_id=0)

    hf_name = f"transformers generate ({type(hf).__name__}, no MTP)"
    fns = {"slmforge greedy, KV cache": plain, "slmforge + MTP self-speculation": speculative, hf_name: reference}
    log(f"decode: {len(fns)} variants x {repeats} runs of {new_tokens} tokens ...")
    times = interleaved(fns, repeats)
    spec = outputs["speculative"]
    median = {name: statistics.median(t) for name, t in times.items()}
    rows = {name: {"tokens_per_s": new_tokens / s, "ms_per_token": 1000 * s / new_tokens, "run_s_all": times[name],
                   "vs_transformers": median[hf_name] / s} for name, s in median.items()}
    return {"new_tokens": new_tokens, "prompt_tokens": len(prompt), "rows": rows,
            "acceptance_rate": spec.acceptance_rate, "drafted": spec.drafted, "accepted": spec.accepted,
            "decoder_forwards": spec.drafted, "speculative_equals_greedy": spec.token_ids == outputs["plain"]}


def decode_setup(checkpoint: str | None, prompt_text: str, prompt_len: int):
    """(model, its name, prompt ids, whether the weights are trained)."""
    if checkpoint:
        from slmforge.infer.load import load_model

        loaded = load_model(checkpoint, device="cpu")
        model, tokenizer = loaded.model, loaded.tokenizer
        return model, checkpoint, tokenizer.encode(prompt_text), True
    torch.manual_seed(0)
    model = Transformer(load_config(DECODE_PRESET).model).eval()
    with torch.no_grad():  # larger weights than the init, so greedy tokens vary and the equality check means something
        for name, p in model.named_parameters():
            if not name.endswith("norm.weight"):
                p.normal_(0.0, 0.08)
    prompt = torch.randint(0, model.cfg.vocab_size, (prompt_len,)).tolist()
    return model, f"{DECODE_PRESET} (random weights)", prompt, False


# ----------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, 1 repeat: a smoke run of seconds")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256,
                        help="capped at a preset's max_seq_len, the batch grown to keep the tokens per step")
    parser.add_argument("--repeats", type=int, default=15, help="timed training steps / decode runs per variant")
    parser.add_argument("--new-tokens", type=int, default=256, help="capped by the decode model's max_seq_len")
    parser.add_argument("--prompt-len", type=int, default=16, help="random prompt tokens (without --checkpoint)")
    parser.add_argument("--prompt", default="The", help="prompt text (with --checkpoint)")
    parser.add_argument("--checkpoint", default=None, help="run or checkpoint folder to decode with (needs MTP)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--out", default="benchmarks/results/sparse.json")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    keep_freed_memory()  # as `slmforge train` does
    try:
        import transformers
    except ImportError:
        sys.exit("bench_sparse.py compares against transformers: pip install -e '.[bench]'")
    if args.quick:
        shapes, batch, seq_len, repeats, new_tokens = QUICK_SHAPES, 2, 32, 1, 8
    else:
        shapes, batch, seq_len, repeats, new_tokens = SHAPES, args.batch, args.seq_len, args.repeats, args.new_tokens

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    machine = {"cpu": cpu_name(), "cores": os.cpu_count(), "torch": torch.__version__,
               "transformers": transformers.__version__, "threads": torch.get_num_threads()}
    train = {shape: bench_training(preset, overrides, off, batch, seq_len, repeats, log)
             for shape, preset, overrides, off in shapes}
    kv = bench_kv(KV_PRESETS, {shape: overrides for shape, _, overrides, _ in shapes})
    model, model_name, prompt, trained = decode_setup(args.checkpoint, args.prompt, args.prompt_len)
    if not model.mtp or model.cfg.ffn != "moe":
        sys.exit(f"{model_name}: the decode benchmark needs an MoE model with an MTP module (model.mtp_depth >= 1)")
    new_tokens = min(new_tokens, model.cfg.max_seq_len - len(prompt) - 1)
    hf_cfg = replace(model.cfg, residual="add", mtp_depth=0)
    decode = bench_decode(model, hf_twin(hf_cfg).eval(), prompt, new_tokens, repeats, log)
    decode.update(model=model_name, trained_weights=trained)
    result = {"machine": machine, "dtype": "float32", "repeats": repeats, "train": train, "kv_cache": kv,
              "decode": decode}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(report(result))
    print(f"\nJSON: {args.out}")
    if not decode["speculative_equals_greedy"]:
        sys.exit("speculative decoding did not reproduce plain greedy decoding")
    return result


def report(r: dict) -> str:
    m = r["machine"]
    lines = [(f"{m['cpu']} ({m['cores']} cores); torch {m['torch']}, transformers {m['transformers']}, "
              f"{m['threads']} threads, fp32"), "",
             (f"Training: forward + backward + optimizer step (AdamW unless named), tokens/s and step ms of the "
              f"median of {r['repeats']}; ratios = HF time / ours, median / best"), "",
             "| shape | model | tokens/s | step ms | best ms | vs HF default | vs HF fastest |",
             "|---|---|---:|---:|---:|---:|---:|"]

    def ratios(row, key):
        return f"{row[key]:.2f}x / {row[key + '_best']:.2f}x"

    for shape, t in r["train"].items():
        for name, row in t["rows"].items():
            lines.append(f"| {shape} ({t['batch']}x{t['seq_len']}) | {name} | {row['tokens_per_s']:,.0f} | "
                         f"{1000 * row['step_s']:.0f} | {1000 * row['step_s_best']:.0f} | "
                         f"{ratios(row, 'vs_hf_default')} | {ratios(row, 'vs_hf_fastest')} |")
    lines += ["", "transformers models: " + ", ".join(f"{s}: {t['hf_model']}" for s, t in r["train"].items())
              + "; axion1's whole-head RoPE runs as qk_nope = qk_rope = head_dim / 2 in DeepseekV3.", "",
              ("KV cache per token, bf16 (model_stats; measured = bytes allocated, ours KVCache.nbytes(), "
               "transformers' cache after a 64-token prefill)"), "",
              "| preset | latent cache | per-head K and V | saving | measured: ours | measured: transformers |",
              "|---|---:|---:|---:|---:|---:|"]
    for name, k in r["kv_cache"].items():
        got = k.get("measured")
        measured = (f"{got['slmforge_bytes_per_token_bf16']:,.0f} | {got['transformers_bytes_per_token_bf16']:,.0f} "
                    f"({got['transformers_model']})") if got else " | "
        lines.append(f"| {name} | {k['latent_bytes_per_token_bf16']:,} | {k['per_head_kv_bytes_per_token_bf16']:,} | "
                     f"{k['per_head_kv_bytes_per_token_bf16'] / k['latent_bytes_per_token_bf16']:.1f}x | {measured} |")
    d = r["decode"]
    lines += ["", f"Greedy decode, batch 1, {d['model']}, prompt {d['prompt_tokens']}, {d['new_tokens']} new tokens",
              "", "| decoder | tokens/s | ms/token | vs transformers |", "|---|---:|---:|---:|"]
    lines += [f"| {name} | {row['tokens_per_s']:,.1f} | {row['ms_per_token']:.2f} | {row['vs_transformers']:.2f}x |"
              for name, row in d["rows"].items()]
    lines += ["", f"MTP drafts accepted: {d['accepted']}/{d['drafted']} ({d['acceptance_rate']:.0%}), "
              f"{d['decoder_forwards']} decoder forwards after the prompt"
              + ("" if d["trained_weights"] else " (random weights: acceptance is near 0 by construction; "
                 "pass --checkpoint for a trained drafter)"),
              f"speculative output equals plain greedy output: {'yes' if d['speculative_equals_greedy'] else 'NO'}"]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
