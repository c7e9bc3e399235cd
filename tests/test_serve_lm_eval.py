"""lm-eval's `local-completions` model scores a loglikelihood task through the server (token-id prompts,
echo, logprobs 1, max_tokens 1), and what it reports is what the model computes directly: every choice's
log-likelihood within 1e-4, and so the accuracy. A tiny multiple-choice task in a local jsonl file, all
offline."""

import importlib.util

import pytest

for package in ("fastapi", "uvicorn", "lm_eval", "aiohttp", "tenacity", "transformers"):
    if importlib.util.find_spec(package) is None:
        pytest.skip(f"needs {package} (pip install slmforge[test]: lm-eval[api], transformers, the serve extra)",
                    allow_module_level=True)

from lm_eval_task import TASK, assert_reports_what_the_model_computes, write_task  # noqa: E402
from serve_helpers import RunningServer, plain_checkpoint  # noqa: E402

@pytest.mark.slow
def test_lm_eval_local_completions_scores_what_the_model_computes(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    import lm_eval
    from lm_eval.tasks import TaskManager

    write_task(tmp_path)
    checkpoint = plain_checkpoint(tmp_path / "model")
    with RunningServer(checkpoint) as server:
        results = lm_eval.simple_evaluate(
            model="local-completions",
            model_args={"model": "tiny", "base_url": f"{server.base_url}/completions",
                        "tokenizer_backend": "huggingface", "tokenizer": str(checkpoint), "max_retries": 1,
                        "max_length": server.engine.max_len},
            tasks=[TASK], task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False),
            log_samples=True, bootstrap_iters=0)
        assert_reports_what_the_model_computes(results, server.model, server.tokenizer)
