import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers", reason="the benchmark compares against transformers")


@pytest.mark.slow
def test_dense_benchmark_quick_run(tmp_path):
    out = tmp_path / "dense.json"
    script = Path(__file__).parent.parent / "benchmarks" / "bench_dense.py"
    done = subprocess.run([sys.executable, str(script), "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    for part in ("train", "decode"):
        for impl in ("slmforge", "transformers"):
            assert result[part][impl]["tokens_per_s"] > 0
    assert 0 < result["train"]["slmforge"]["mfu"] < 1
    assert result["decode"]["slmforge"]["same_tokens"] is True  # same weights, same greedy tokens
    assert "| training tokens/s" in done.stdout
