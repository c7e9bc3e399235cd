"""lm-evaluation-harness's other standard path: `lm_eval --model hf` on slmforge's Hugging Face export (a
native Llama folder, loaded by stock transformers) scores a local loglikelihood task with what slmforge's own
model computes: every choice's log-likelihood within 1e-4, and so the accuracy. Offline, the tiny task of
tests/test_serve_lm_eval.py."""

import importlib.util

import pytest

for package in ("lm_eval", "transformers"):
    if importlib.util.find_spec(package) is None:
        pytest.skip(f"needs {package} (pip install slmforge[test])", allow_module_level=True)

import torch  # noqa: E402
from helpers import random_checkpoint  # noqa: E402
from test_serve_lm_eval import DOCS, TASK, write_task  # noqa: E402

from slmforge.export.hf import export_hf  # noqa: E402
from slmforge.infer.load import load_model  # noqa: E402


def direct_loglikelihoods(model, tokenizer, doc) -> list[float]:
    """log P(" " + choice | question) from one forward of slmforge's model, split as lm-eval splits it."""
    context = tokenizer.encode(doc["question"])
    scores = []
    for choice in doc["choices"]:
        continuation = tokenizer.encode(" " + choice)
        with torch.no_grad():
            logits, _ = model(torch.tensor([context + continuation]))
        logprobs = torch.log_softmax(logits[0].float(), dim=-1)
        scores.append(sum(logprobs[len(context) + i - 1, t].item() for i, t in enumerate(continuation)))
    return scores


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
    expected = [direct_loglikelihoods(loaded.model, loaded.tokenizer, doc) for doc in DOCS]
    samples = sorted(results["samples"][TASK], key=lambda s: s["doc_id"])
    assert len(samples) == len(DOCS)
    for sample, scores in zip(samples, expected):
        reported = [loglikelihood for loglikelihood, _ in sample["filtered_resps"]]
        assert reported == pytest.approx(scores, abs=1e-4)
    accuracy = sum(max(range(len(s)), key=s.__getitem__) == doc["answer"] for s, doc in zip(expected, DOCS)) / len(DOCS)
    assert results["results"][TASK]["acc,none"] == pytest.approx(accuracy)
