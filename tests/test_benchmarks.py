"""The benchmark scripts' --quick runs go end to end and write the JSON they promise."""

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
