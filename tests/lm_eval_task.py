"""The tiny local multiple-choice task both lm-evaluation-harness tests run (through the server, and on the
Hugging Face export), and the check that lm-eval reports what the model itself computes."""

import json

import pytest
import torch

TASK = "slmforge_choice"
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


def direct_loglikelihoods(model, tokenizer, doc) -> list[float]:
    """log P(" " + choice | question) from one forward of the model, as lm-eval splits context and continuation."""
    context = tokenizer.encode(doc["question"])
    scores = []
    for choice in doc["choices"]:
        continuation = tokenizer.encode(" " + choice)
        ids = context + continuation
        with torch.no_grad():
            logits, _ = model(torch.tensor([ids]))
        logprobs = torch.log_softmax(logits[0].float(), dim=-1)
        scores.append(sum(logprobs[len(context) + i - 1, t].item() for i, t in enumerate(continuation)))
    return scores


def assert_reports_what_the_model_computes(results, model, tokenizer) -> None:
    """lm-eval's per-sample log-likelihoods equal the model's own within 1e-4, and so does the accuracy."""
    expected = [direct_loglikelihoods(model, tokenizer, doc) for doc in DOCS]
    samples = sorted(results["samples"][TASK], key=lambda s: s["doc_id"])
    assert len(samples) == len(DOCS)
    for sample, scores in zip(samples, expected):
        reported = [loglikelihood for loglikelihood, _ in sample["filtered_resps"]]
        assert reported == pytest.approx(scores, abs=1e-4)
    accuracy = sum(max(range(len(s)), key=s.__getitem__) == doc["answer"] for s, doc in zip(expected, DOCS)) / len(DOCS)
    assert results["results"][TASK]["acc,none"] == pytest.approx(accuracy)
