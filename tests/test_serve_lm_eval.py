"""lm-eval's `local-completions` model scores a loglikelihood task through the server (token-id prompts,
echo, logprobs 1, max_tokens 1), and what it reports is what the model computes directly: every choice's
log-likelihood within 1e-4, and so the accuracy. A tiny multiple-choice task in a local jsonl file, all
offline."""

import importlib.util
import json

import pytest

for package in ("fastapi", "uvicorn", "lm_eval", "aiohttp", "tenacity", "transformers"):
    if importlib.util.find_spec(package) is None:
        pytest.skip(f"needs {package} (pip install slmforge[test]: lm-eval[api], transformers, the serve extra)",
                    allow_module_level=True)

import torch  # noqa: E402

from serve_helpers import RunningServer, plain_checkpoint  # noqa: E402

TASK = "slmforge_serve_choice"
DOCS = [
    {"question": "The sky on a clear day is", "choices": ["blue", "green", "made of stone"], "answer": 0},
    {"question": "A fox is a kind of", "choices": ["animal", "river", "number"], "answer": 0},
    {"question": "Two plus two is", "choices": ["three", "four", "five hundred"], "answer": 1},
    {"question": "Water freezes when it is", "choices": ["hot", "cold"], "answer": 1},
    {"question": "The opposite of up is", "choices": ["down", "left", "sideways"], "answer": 0},
    {"question": "A tree grows from a", "choices": ["seed", "stone", "cloud", "song"], "answer": 0},
    {"question": "Fish live in", "choices": ["water", "fire", "the sky"], "answer": 0},
    {"question": "A week has this many days:", "choices": ["five", "seven", "ten"], "answer": 1},
]


def write_task(folder) -> None:
    data = folder / "docs.jsonl"
    data.write_text("".join(json.dumps(doc) + "\n" for doc in DOCS))
    (folder / f"{TASK}.yaml").write_text(json.dumps({
        "task": TASK,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data)}, "cache_dir": str(folder / "datasets-cache")},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "{{question}}",
        "doc_to_choice": "{{choices}}",
        "doc_to_target": "{{answer}}",
        "metric_list": [{"metric": "acc"}],
    }))


def direct_loglikelihoods(server, doc) -> list[float]:
    """log P(" " + choice | question) from one forward of the model, as lm-eval splits context and continuation."""
    context = server.tokenizer.encode(doc["question"])
    scores = []
    for choice in doc["choices"]:
        continuation = server.tokenizer.encode(" " + choice)
        ids = context + continuation
        with torch.no_grad():
            logits, _ = server.model(torch.tensor([ids]))
        logprobs = torch.log_softmax(logits[0].float(), dim=-1)
        scores.append(sum(logprobs[len(context) + i - 1, t].item() for i, t in enumerate(continuation)))
    return scores


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
        expected = [direct_loglikelihoods(server, doc) for doc in DOCS]
    samples = sorted(results["samples"][TASK], key=lambda s: s["doc_id"])
    assert len(samples) == len(DOCS)
    for sample, scores in zip(samples, expected):
        reported = [loglikelihood for loglikelihood, _ in sample["filtered_resps"]]
        assert reported == pytest.approx(scores, abs=1e-4)
    accuracy = sum(max(range(len(s)), key=s.__getitem__) == doc["answer"] for s, doc in zip(expected, DOCS)) / len(DOCS)
    assert results["results"][TASK]["acc,none"] == pytest.approx(accuracy)
