"""lm-evaluation-harness's other standard path: `lm_eval --model hf` on slmforge's Hugging Face export (a
native Llama folder, loaded by stock transformers) scores a local loglikelihood task with what slmforge's own
model computes: every choice's log-likelihood within 1e-4, and so the accuracy. Offline, the tiny task of
tests/lm_eval_task.py."""

import importlib.util

import pytest

for package in ("lm_eval", "transformers"):
    if importlib.util.find_spec(package) is None:
        pytest.skip(f"needs {package} (pip install slmforge[test])", allow_module_level=True)

from helpers import random_checkpoint  # noqa: E402
from lm_eval_task import TASK, assert_reports_what_the_model_computes, write_task  # noqa: E402

from slmforge.export.hf import export_hf  # noqa: E402
from slmforge.infer.load import load_model  # noqa: E402


@pytest.mark.slow
def test_lm_eval_hf_on_the_export_scores_what_slmforge_computes(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    import lm_eval
    from lm_eval.tasks import TaskManager

    write_task(tmp_path)
    checkpoint = random_checkpoint(tmp_path / "run", ["model.vocab_size=258"], preset="tiny-dense")
    folder, family = export_hf(checkpoint, tmp_path / "hf")
    assert family == "llama"  # a native class: lm-eval loads it without remote code
    results = lm_eval.simple_evaluate(
        model="hf", model_args={"pretrained": str(folder), "dtype": "float32", "device": "cpu"},
        tasks=[TASK], task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False),
        log_samples=True, bootstrap_iters=0, batch_size=1)
    loaded = load_model(checkpoint, device="cpu", dtype="fp32")
    assert_reports_what_the_model_computes(results, loaded.model, loaded.tokenizer)
