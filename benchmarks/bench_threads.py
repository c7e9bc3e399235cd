"""Training tokens/s at 1 and 2 CPU threads, on a quiet machine and beside other work, for the quickstart and
the recipes' models: the measurement behind `train.threads: 0` (slmforge.hardware.choose_threads).

  python benchmarks/bench_threads.py            # every shape (each trained 8 times: the slowest benchmark)
  python benchmarks/bench_threads.py --quick    # tiny and quickstart only, fewer steps

Each cell is one `slmforge.train.train` of a few steps in a fresh process (`train.threads` set, fp32, no
evaluation or checkpoint inside the timed steps; the report's tokens/s counts optimizer steps only),
on a byte-tokenized copy of part of the standard library. "Beside other work" runs one process that spins
on the CPU for the whole cell: the situation of a test suite, a second run or a browser next to training.
The table also shows what `train.threads: 0` chooses for each shape and that shape's FLOPs per micro-step.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from bench_dense import cpu_name

from slmforge.config import load_config
from slmforge.data.prepare import prepare_dataset
from slmforge.data.sources import default_sources
from slmforge.hardware import choose_threads, cpu_count
from slmforge.recipes import load_recipe_raw, recipe_config, resolve_recipe
from slmforge.tokenizer import byte_tokenizer
from slmforge.train.setup import micro_step_flops

# (row name, preset or recipe, steps timed)
SHAPES = [
    ("tiny (preset)", "preset:tiny", 60),
    ("quickstart (preset)", "preset:quickstart", 12),
    ("axion1-gsm8k (recipe)", "recipe:axion1-gsm8k", 30),
    ("axl-code-sgd (recipe)", "recipe:axl-code-sgd", 10),
    ("codemind-1b (recipe)", "recipe:codemind-1b", 10),
    ("nekomind-1.5 (recipe)", "recipe:nekomind-1.5", 10),
    ("shard-40m (recipe)", "recipe:shard-40m", 10),
]
QUICK = {"tiny (preset)", "quickstart (preset)"}
SPIN = "while True: pass"

WORKER = """
import json, sys
from slmforge.config import from_dict
from slmforge.train import train
report = train(from_dict(json.loads(sys.argv[1])), sys.argv[2])
print(json.dumps({"tokens_per_s": report["tokens_per_s"], "threads": report["threads"]}))
"""


def config_of(spec: str, data: Path, steps: int):
    kind, name = spec.split(":", 1)
    timing = [f"data.path={data}", f"train.steps={steps}", "train.eval_every=100000", "train.save_every=100000",
              "train.eval_batches=1", "train.dtype=fp32", "train.rank_check_every=0", "schedule.warmup_steps=1",
              "phases=[]", "data.weights={}"]
    if kind == "preset":
        return load_config(name, timing)
    return recipe_config(resolve_recipe(load_recipe_raw(name), full=False), timing)


def tokens_per_s(cfg, threads: int, busy: bool, folder: Path) -> float:
    folder.mkdir(parents=True, exist_ok=True)
    """Median of two runs of `cfg` at `threads`, with a spinning process beside it when `busy`."""
    cfg.train.threads = threads
    spinner = subprocess.Popen([sys.executable, "-c", SPIN]) if busy else None
    try:
        results = []
        for attempt in range(2):
            out = folder / f"run-{threads}-{busy}-{attempt}"
            done = subprocess.run([sys.executable, "-c", WORKER, json.dumps(cfg.to_dict()), str(out)],
                                  capture_output=True, text=True)
            if done.returncode:
                raise SystemExit(f"a run at {threads} threads failed:\n{done.stderr[-3000:]}")
            results.append(json.loads(done.stdout.strip().splitlines()[-1])["tokens_per_s"])
        return sorted(results)[len(results) // 2]
    finally:
        if spinner is not None:
            spinner.kill()
            spinner.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default="benchmarks/results/threads.json")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        prepare_dataset(default_sources(), byte_tokenizer(), tmp / "data", max_tokens_per_source=2_000_000,
                        progress=False)
        for name, spec, steps in SHAPES:
            if args.quick and name not in QUICK:
                continue
            cfg = config_of(spec, tmp / "data", steps if not args.quick else max(steps // 3, 4))
            flops = micro_step_flops(cfg)
            cells = {(t, busy): tokens_per_s(cfg, t, busy, tmp / spec.replace(":", "-"))
                     for busy in (False, True) for t in (1, 2)}
            rows.append({"shape": name, "gflop_per_micro_step": flops / 1e9, "auto": choose_threads(0, flops)[0],
                         **{f"{t}t_{'busy' if b else 'quiet'}": v for (t, b), v in cells.items()}})
            print(json.dumps(rows[-1]), file=sys.stderr)
    print(f"{cpu_name()}, {cpu_count()} CPUs, fp32; training tokens/s (median of 2 runs each)\n")
    print("| shape | GFLOP per micro-step | 1 thread, quiet | 2 threads, quiet | 1 thread, beside work | "
          "2 threads, beside work | auto picks |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['shape']} | {r['gflop_per_micro_step']:.2f} | {r['1t_quiet']:,.0f} | {r['2t_quiet']:,.0f} | "
              f"{r['1t_busy']:,.0f} | {r['2t_busy']:,.0f} | {r['auto']} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
