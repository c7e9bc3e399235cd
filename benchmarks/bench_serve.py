"""The OpenAI-compatible server under load: aggregate tokens/s and time to first token at 1, 4, 16 and 64
concurrent streaming clients, for `slmforge serve` and for llama.cpp's server (llama-cpp-python's
`llama_cpp.server`) on a GGUF export of the same weights, side by side in one run on one machine.

  python benchmarks/bench_serve.py                 # shard-40m's shape (llama form), random weights
  python benchmarks/bench_serve.py --quick         # the quickstart's shape, fewer clients

Every client sends one streaming `/v1/completions` request at the same moment (a 32-token prompt of its
own, `max_tokens` new tokens, greedy) and reads the stream to its end. tokens/s = all completion tokens /
wall time from the first request sent to the last stream ended; time to first token is per client, from
sending to the first streamed chunk. Both servers get the same CPU threads and run one at a time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch
from bench_dense import cpu_name
from bench_gguf import build

from slmforge.export.gguf_export import export_gguf

LLAMA_FORM = ["model.attention_pattern=[global]", "model.final_logit_softcap=null", "model.vocab_size=8192"]
SHAPES = {"shard-40m": ("shard-40m", LLAMA_FORM), "quickstart": ("quickstart", [*LLAMA_FORM[:2], "model.vocab_size=4096"])}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(command: list[str], port: int, threads: int, log: Path, timeout: float = 300) -> subprocess.Popen:
    """A server process, once it answers; its output goes to `log` (a pipe nobody reads would fill and block it)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    with open(log, "w") as out:
        process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{command[:4]} exited: {log.read_text()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2).status_code == 200:
                return process
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    process.kill()
    raise RuntimeError(f"{command[:4]} did not answer within {timeout} s")


async def one_client(client: httpx.AsyncClient, url: str, model: str, prompt: str, max_tokens: int):
    """(time to first token, completion tokens) of one streamed request."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first, chunks, usage = None, 0, None
    async with client.stream("POST", url, json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                usage = event["usage"]["completion_tokens"]
            for choice in event.get("choices", []):
                # a chunk per token (its text may be held back: bytes of a character still to come), then
                # one with the finish reason and no text
                if choice.get("text") or not choice.get("finish_reason"):
                    chunks += 1
                    first = first or time.perf_counter() - t0
    return first or float("nan"), usage if usage is not None else chunks


async def load(base: str, model: str, clients: int, max_tokens: int) -> dict:
    gen = torch.Generator().manual_seed(clients)
    letters = "abcdefghijklmnopqrstuvwxyz "  # text (llama-cpp-python's server takes no token ids): one byte a token
    prompts = ["".join(letters[i] for i in torch.randint(0, len(letters), (32,), generator=gen)) for _ in range(clients)]
    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        t0 = time.perf_counter()
        results = await asyncio.gather(*(one_client(client, f"{base}/v1/completions", model, p, max_tokens)
                                         for p in prompts))
        wall = time.perf_counter() - t0
    ttft = [r[0] for r in results]
    return {"clients": clients, "tokens": sum(r[1] for r in results), "wall_s": wall,
            "tokens_per_s": sum(r[1] for r in results) / wall,
            "ttft_median_s": statistics.median(ttft), "ttft_max_s": max(ttft)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--weights", nargs="+", default=["fp32", "int8"], help="slmforge serve --weights, each a run")
    parser.add_argument("--out", default="benchmarks/results/serve.json")
    args = parser.parse_args()
    shape = "quickstart" if args.quick else "shard-40m"
    levels = [1, 4, 16] if args.quick else [1, 4, 16, 64]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        source = build(*SHAPES[shape], Path(tmp))
        gguf = export_gguf(source, Path(tmp) / "model-f32.gguf", dtype="f32")
        servers = {
            f"slmforge serve, {weights} (max batch {args.max_batch})": lambda port, weights=weights: [
                sys.executable, "-m", "slmforge.cli", "serve", str(source), "--port", str(port),
                "--max-batch", str(args.max_batch), "--max-queue", "1024", "--model-name", "bench",
                "--weights", weights]
            for weights in args.weights
        }
        servers |= {
            "llama.cpp server (llama-cpp-python)": lambda port: [
                sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--port", str(port),
                "--n_threads", str(args.threads), "--n_ctx", "2048", "--model_alias", "bench",
                "--interrupt_requests", "False"],  # queue concurrent requests instead of cutting the running one
        }
        for name, command in servers.items():
            port = free_port()
            process = start(command(port), port, args.threads, Path(tmp) / f"server-{port}.log")
            try:
                # warm-up: slmforge times its kernels at the first products of each batch size
                for clients in (1, 2, 4, 8, args.max_batch):
                    asyncio.run(load(f"http://127.0.0.1:{port}", "bench", clients, 4))
                for clients in levels:
                    row = {"server": name, **asyncio.run(load(f"http://127.0.0.1:{port}", "bench", clients,
                                                              args.max_tokens))}
                    rows.append(row)
                    print(json.dumps(row), file=sys.stderr)
            finally:
                process.terminate()
                process.wait(timeout=30)
    print(f"{cpu_name()}, {args.threads} threads, {shape} (llama form, random weights; llama.cpp: f32 GGUF), "
          f"32-token prompts, {args.max_tokens} new tokens per client, greedy, streaming\n")
    print("| server | clients | tokens/s | vs 1 client | time to first token, median (max) |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        one = next(x for x in rows if x["server"] == r["server"] and x["clients"] == 1)["tokens_per_s"]
        print(f"| {r['server']} | {r['clients']} | {r['tokens_per_s']:,.1f} | {r['tokens_per_s'] / one:.1f}x | "
              f"{r['ttft_median_s']:.2f} s ({r['ttft_max_s']:.2f} s) |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"cpu": cpu_name(), "threads": args.threads, "shape": shape,
                                          "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
