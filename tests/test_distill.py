"""Distillation: the KL term against a hand computation, the mixed objective, a run with a teacher, and a
teacher of another vocabulary refused."""

import json
import math

import pytest
import torch

from helpers import random_checkpoint, word_dataset
from slmforge.config import ConfigError, load_config
from slmforge.data.batch import IGNORE, Batch
from slmforge.model import build_model
from slmforge.train import train
from slmforge.train.loss import distillation_kl, mean_ce
from slmforge.train.objective import Distillation


def test_kl_equals_a_hand_computation():
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 3, 5), torch.randn(2, 3, 5)
    targets = torch.tensor([[1, IGNORE, 2], [0, 4, IGNORE]])
    for temperature in (1.0, 2.0):
        total, count = 0.0, 0
        for b in range(2):
            for t in range(3):
                if targets[b, t] == IGNORE:
                    continue
                p = [math.exp(x / temperature) for x in teacher[b, t].tolist()]
                q = [math.exp(x / temperature) for x in student[b, t].tolist()]
                p, q = [x / sum(p) for x in p], [x / sum(q) for x in q]
                total += sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
                count += 1
        assert distillation_kl(student, teacher, targets, temperature).item() == pytest.approx(total / count, rel=1e-5)
    assert distillation_kl(teacher, teacher, targets, 2.0).item() == pytest.approx(0.0, abs=1e-6)


def test_objective_mixes_cross_entropy_and_kl():
    cfg = load_config("tiny")
    torch.manual_seed(1)
    student, teacher = build_model(cfg.model), build_model(cfg.model)
    tokens = torch.randint(0, 258, (2, 16))
    targets = torch.randint(0, 258, (2, 16)).masked_fill(torch.rand(2, 16) < 0.3, IGNORE)
    objective = Distillation(teacher, temperature=2.0, weight=0.25)
    loss, parts, _ = objective(student, Batch(tokens, targets))
    logits, _ = student(tokens)
    with torch.no_grad():
        teacher_logits, _ = teacher(tokens)
    expected = 0.75 * mean_ce(logits, targets) + 0.25 * 4.0 * distillation_kl(logits, teacher_logits, targets, 2.0)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert parts["ce_loss"].item() == pytest.approx(mean_ce(logits, targets).item(), rel=1e-6) and "kd_loss" in parts
    assert not any(p.requires_grad for p in teacher.parameters())


def test_a_run_with_a_teacher(tmp_path):
    data = word_dataset(tmp_path)
    teacher = random_checkpoint(tmp_path / "teacher", [])
    cfg = load_config("tiny", [f"data.path={data}", f"distill.teacher={teacher}", "distill.temperature=2",
                               "train.steps=3", "train.dtype=fp32"])
    train(cfg, tmp_path / "run")
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [line for line in lines if "loss" in line]
    assert len(steps) == 3 and all(line["kd_loss"] > 0 for line in steps)
    for line in steps:  # the logged total is the mix of the two logged parts (tiny adds a z-loss)
        mixed = 0.5 * line["ce_loss"] + 0.5 * 4.0 * line["kd_loss"] + line.get("z_loss", 0.0)
        assert line["loss"] == pytest.approx(mixed, rel=1e-4)


def test_a_teacher_of_another_vocabulary_is_refused(tmp_path):
    data = word_dataset(tmp_path)
    teacher = random_checkpoint(tmp_path / "teacher", ["model.vocab_size=600"])
    cfg = load_config("tiny", [f"data.path={data}", f"distill.teacher={teacher}", "train.steps=1"])
    with pytest.raises(ConfigError, match="its vocabulary has 600 tokens, the student's 512: distillation compares "
                                          "the two distributions token by token"):
        train(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()
