"""Preference tuning (DPO): the loss and its gradient on a known pair by hand, preference data and its
batches, a tiny task whose preferred answers are known, and bad input refused in one line."""

import json
import math

import numpy as np
import pytest
import torch

from helpers import crash_then_resume, random_checkpoint
from slmforge.cli import main
from slmforge.config import ConfigError, load_config
from slmforge.data.batch import IGNORE, Batch
from slmforge.data.chat import ChatSource
from slmforge.data.loader import TokenDataset, training_batches, validation_batches
from slmforge.data.preference import prepare_preference_dataset
from slmforge.data.preference_batches import PairBatches
from slmforge.infer.load import load_model
from slmforge.model import build_model
from slmforge.tokenizer import byte_tokenizer, load_tokenizer
from slmforge.train import train
from slmforge.train.dpo import dpo_loss, sequence_logprobs
from slmforge.train.objective import Preference


def write_rows(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def colour_pairs(ids) -> list[dict]:
    """The tiny task: a sky is blue and a fire red, whatever the number in the prompt."""
    return [{"prompt": f"{'sky' if i % 2 else 'fire'} {i}: colour?", "chosen": "blue" if i % 2 else "red",
             "rejected": "red" if i % 2 else "blue"} for i in ids]


def tiny_model(seed: int):
    torch.manual_seed(seed)
    return build_model(load_config("tiny").model)


def logprob_by_hand(model, ids: list[int], reply_from: int) -> float:
    """log p(ids[reply_from:] | ids[:reply_from]) as a sum of per-token log-softmaxes."""
    with torch.no_grad():
        logits, _ = model(torch.tensor([ids[:-1]]))
    logp = torch.log_softmax(logits[0].double(), -1)
    return sum(logp[t - 1, ids[t]].item() for t in range(reply_from, len(ids)))


def pair_batch(prompt: list[int], chosen: list[int], rejected: list[int], width: int = 16) -> Batch:
    """One pair in two padded rows (chosen, then rejected); only the reply tokens are targets."""
    rows, targets = [], []
    for reply in (chosen, rejected):
        ids = prompt + reply
        row = torch.full((width + 1,), 0)
        row[:len(ids)] = torch.tensor(ids)
        target = torch.full((width,), IGNORE)
        target[len(prompt) - 1:len(ids) - 1] = row[len(prompt):len(ids)]
        rows.append(row[:-1])
        targets.append(target)
    return Batch(torch.stack(rows), torch.stack(targets))


def test_loss_and_gradient_sign_on_a_known_pair():
    prompt, chosen, rejected = [5, 9, 17, 3], [40, 41, 42], [60, 61]
    policy, reference = tiny_model(0), tiny_model(1)
    beta = 0.5
    loss, parts, _ = Preference(reference, beta)(policy, pair_batch(prompt, chosen, rejected))
    pc, pr = (logprob_by_hand(policy, prompt + r, len(prompt)) for r in (chosen, rejected))
    rc, rr = (logprob_by_hand(reference, prompt + r, len(prompt)) for r in (chosen, rejected))
    margin = beta * ((pc - rc) - (pr - rr))
    assert loss.item() == pytest.approx(-math.log(1 / (1 + math.exp(-margin))), rel=1e-5)
    assert parts["reward_margin"].item() == pytest.approx(margin, rel=1e-5)
    assert parts["chosen_reward"].item() == pytest.approx(beta * (pc - rc), rel=1e-5)
    assert parts["reward_accuracy"].item() == float(margin > 0)
    assert not any(p.requires_grad for p in reference.parameters())

    # d loss / d log π(chosen) = -β σ(-margin) < 0 and d loss / d log π(rejected) = +β σ(-margin) > 0
    logps = torch.tensor([pc, pr, rc, rr], dtype=torch.float64, requires_grad=True)
    dpo_loss(logps[0:1], logps[1:2], logps[2:3], logps[3:4], beta)[0].backward()
    pull = beta / (1 + math.exp(margin))
    assert logps.grad.tolist() == pytest.approx([-pull, pull, pull, -pull], rel=1e-9)

    # on the model: the loss's gradient is -pull · ∇(log π(chosen) - log π(rejected)), so a small step down it
    # raises the chosen reply's log-probability against the rejected one's by lr · pull · |∇|² (to first order)
    batch = pair_batch(prompt, chosen, rejected)
    policy.zero_grad()
    logp = sequence_logprobs(policy(batch.tokens)[0], batch.targets)
    (logp[0] - logp[1]).backward()
    towards_chosen = {n: p.grad.clone() for n, p in policy.named_parameters()}
    policy.zero_grad()
    loss.backward()
    for name, p in policy.named_parameters():
        torch.testing.assert_close(p.grad, -pull * towards_chosen[name], atol=1e-7, rtol=1e-4)
    lr = 1e-3
    with torch.no_grad():
        for p in policy.parameters():
            p -= lr * p.grad
    pc2, pr2 = (logprob_by_hand(policy, prompt + r, len(prompt)) for r in (chosen, rejected))
    expected = lr * pull * sum(g.square().sum().item() for g in towards_chosen.values())
    assert (pc2 - pr2) - (pc - pr) == pytest.approx(expected, rel=0.1) and expected > 0.01


def test_sequence_logprobs_sum_the_scored_targets():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 7)
    targets = torch.tensor([[3, IGNORE, 1, 6], [IGNORE, IGNORE, IGNORE, IGNORE]])
    logp = torch.log_softmax(logits, -1)
    expected = logp[0, 0, 3] + logp[0, 2, 1] + logp[0, 3, 6]
    assert sequence_logprobs(logits, targets).tolist() == pytest.approx([expected.item(), 0.0], rel=1e-6)


@pytest.fixture
def pairs_data(tmp_path):
    rows = [{"prompt": [{"role": "system", "content": "Be short."},
                                                  {"role": "user", "content": "hi"},
                                                  {"role": "assistant", "content": "hello"},
                                                  {"role": "user", "content": "sea 0: colour?"}],
                                       "chosen": {"role": "assistant", "content": "blue"},
                                       "rejected": [{"role": "assistant", "content": "grey, " * 20}]}]
    rows += colour_pairs(range(10))  # the list prompt is row 0, which always trains
    prepare_preference_dataset([ChatSource("pairs", write_rows(tmp_path / "pairs.jsonl", rows))], byte_tokenizer(),
                               tmp_path / "data", val_fraction=0.25, progress=False)
    return tmp_path / "data"


def test_prepared_pairs_line_up_and_mask_only_the_final_reply(pairs_data):
    dataset = TokenDataset(pairs_data)
    tokenizer = load_tokenizer(pairs_data)
    assert dataset.kind == "preference" and dataset.meta["sources"]["pairs"]["train_pairs"] == 7
    assert dataset.meta["sources"]["pairs"]["val_pairs"] == 4
    tokens, mask, offsets = dataset.train["pairs"], dataset.masks["train"]["pairs"], dataset.offsets["train"]["pairs"]
    assert len(offsets) == 2 * 7 + 1
    for k in range(7):
        (cs, ce), (rs, re) = (offsets[2 * k], offsets[2 * k + 1]), (offsets[2 * k + 1], offsets[2 * k + 2])
        chosen_prompt = tokens[cs:ce][mask[cs:ce] == 0]
        rejected_prompt = tokens[rs:re][mask[rs:re] == 0]
        assert np.array_equal(chosen_prompt, rejected_prompt)  # the pair shares its prompt exactly
        replies = [tokenizer.decode(tokens[s:e][mask[s:e] == 1].tolist(), skip_special=False)
                   for s, e in ((cs, ce), (rs, re))]
        prompt = tokenizer.decode(chosen_prompt.tolist(), skip_special=False)
        assert prompt.endswith(": colour?<|im_end|>\n<|im_start|>assistant\n")
        if k == 0:  # the list prompt: its earlier assistant turn is context, not learned
            assert "<|im_start|>assistant\nhello<|im_end|>" in prompt and prompt.startswith("<|im_start|>system")
            assert replies == ["blue<|im_end|>\n", "grey, " * 20 + "<|im_end|>\n"]
        else:
            assert replies == (["blue<|im_end|>\n", "red<|im_end|>\n"] if "sky" in prompt
                               else ["red<|im_end|>\n", "blue<|im_end|>\n"])


def test_pair_batches_put_chosen_rows_first_and_resume(pairs_data):
    dataset = TokenDataset(pairs_data)
    batches = training_batches(dataset, seq_len=96, batch_size=3, seed=7)
    assert isinstance(batches, PairBatches)
    batch = batches.get(0)
    assert batch.tokens.shape == (6, 96) and batch.documents is None
    for i in range(3):  # rows i and 3 + i: one prompt, then different replies
        first = int((batch.targets[i] != IGNORE).nonzero()[0])
        assert first == int((batch.targets[3 + i] != IGNORE).nonzero()[0])
        assert torch.equal(batch.tokens[i, :first + 1], batch.tokens[3 + i, :first + 1])
        assert not torch.equal(batch.targets[i], batch.targets[3 + i])
    # stateless: another instance gives the same rows; two ranks see the pairs one process sees
    again = PairBatches(dataset, 96, 3, seed=7)
    assert torch.equal(again.get(5, 0).tokens, batches.get(5, 0).tokens)
    one = PairBatches(dataset, 96, 4, seed=7).get(2)
    ranks = [PairBatches(dataset, 96, 2, seed=7, rank=r, world_size=2).get(2) for r in (0, 1)]
    assert torch.equal(one.tokens[:4], torch.cat([r.tokens[:2] for r in ranks]))  # chosen rows
    assert torch.equal(one.tokens[4:], torch.cat([r.tokens[2:] for r in ranks]))  # rejected rows
    # an epoch holds each of the 7 pairs once
    assert sorted(batches.epoch(0).tolist()) == list(range(7))
    # the long rejected reply is cut at seq_len + 1 and counted
    assert "1 sequences are longer than seq_len + 1 = 97" in batches.describe()
    # validation: the val pairs in order, paired like training batches; a process's share keeps both rows
    val = validation_batches(dataset, 96, batch_size=2, max_batches=5)
    assert [b.examples for b in val] == [2, 2] and all(b.paired and b.scored > 0 for b in val)
    assert torch.equal(val[0].share(1, 2).tokens, val[0].tokens[[1, 3]])


def test_tiny_task_moves_the_preference_the_right_way(tmp_path):
    init = random_checkpoint(tmp_path / "init", [])
    held_out = colour_pairs(range(20, 28))
    prepare_preference_dataset([ChatSource("pairs", write_rows(tmp_path / "train.jsonl", colour_pairs(range(20))))],
                               byte_tokenizer(), tmp_path / "data",
                               val_sources=[ChatSource("pairs", write_rows(tmp_path / "val.jsonl", held_out))],
                               progress=False)
    cfg = load_config("tiny", [f"data.path={tmp_path / 'data'}", f"train.init={init}", "train.steps=30",
                               "optim.name=adamw", "optim.lr=1e-3", "data.seq_len=48", "data.batch_size=4",
                               "train.dtype=fp32", "preference.beta=0.1", "train.eval_every=1000"])
    train(cfg, tmp_path / "run")
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [line for line in lines if "dpo_loss" in line]
    val = [line for line in lines if "val_loss" in line]
    assert len(steps) == 30
    # the policy starts as the reference: no margin, loss log 2
    assert steps[0]["dpo_loss"] == pytest.approx(math.log(2), abs=1e-6) and steps[0]["reward_margin"] == 0.0
    assert all(line["reward_accuracy"] == 1.0 for line in steps[-10:])
    assert steps[-1]["reward_margin"] > 3.0 and steps[-1]["dpo_loss"] < 0.05  # measured 4.7 and 0.009
    # the preferred replies' cross-entropy fell (measured 6.98 -> 2.51)
    assert val[-1]["val_loss"] < val[0]["val_loss"] - 2.0
    # held-out pairs: the policy starts as the reference (no margin), and ends preferring every chosen reply
    assert val[0]["val_reward_margin"] == 0.0 and val[0]["val_reward_accuracy"] == 0.0
    assert val[-1]["val_reward_accuracy"] == 1.0 and val[-1]["val_reward_margin"] > 3.0
    assert val[-1]["val_dpo_loss"] < 0.05

    # on held-out prompts the policy prefers the chosen reply by far more than the reference did
    prepare_preference_dataset([ChatSource("held_out", tmp_path / "val.jsonl")], byte_tokenizer(),
                               tmp_path / "held_out", val_fraction=0.0, progress=False)
    pairs = PairBatches(TokenDataset(tmp_path / "held_out"), 48, batch_size=8, seed=0).get(0)
    margins = {}
    for name, path in (("reference", init), ("policy", tmp_path / "run")):
        with torch.no_grad():
            logp = sequence_logprobs(load_model(path, device="cpu", dtype="fp32").model(pairs.tokens)[0], pairs.targets)
        margins[name] = (logp[:8] - logp[8:]).numpy()
    assert (margins["policy"] > 20).all()  # measured 38 to 56 nats
    assert (margins["policy"] - margins["reference"] > 25).all()  # the reference: -8 to +8


BAD_ROWS = [
    ('{"chosen": "a", "rejected": "b"}', "prompt is missing"),
    ('{"prompt": " ", "chosen": "a", "rejected": "b"}', "prompt is empty"),
    ('{"prompt": "q", "chosen": 3, "rejected": "b"}', "chosen is int, not text, a message or a list of messages"),
    ('{"prompt": "q", "chosen": "a"}', "rejected is missing"),
    ('{"prompt": "q", "chosen": "same", "rejected": {"role": "assistant", "content": "same"}}',
     "chosen and rejected are the same reply"),
    ('{"prompt": [{"role": "user", "content": ""}], "chosen": "a", "rejected": "b"}', "prompt[0].content is empty"),
    ('{"prompt": [{"role": "bot", "content": "x"}], "chosen": "a", "rejected": "b"}', "prompt[0].role 'bot' is not"),
    ('{"prompt": "q", "chosen": {"role": "user", "content": "a"}, "rejected": "b"}',
     "chosen must end with the assistant's message, not the user's"),
    ('{"prompt": [], "chosen": "a", "rejected": "b"}', "prompt must be a non-empty list of messages"),
    ("[1, 2]", "a row must be a JSON object"),
    ("{not json", "not valid JSON"),
]


@pytest.mark.parametrize("row, message", BAD_ROWS, ids=[m.split(",")[0][:30] for _, m in BAD_ROWS])
def test_a_bad_row_is_one_line_and_nothing_written(tmp_path, capsys, row, message):
    rows = write_rows(tmp_path / "pairs.jsonl", [*colour_pairs(range(3)), row])
    byte_tokenizer().save(tmp_path / "tok")
    code = main(["data", "prepare", "--tokenizer", str(tmp_path / "tok"), "--preference", str(rows), "--out",
                 str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert f"{rows} line 4: {message}" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pairs.jsonl", "tok"]


def test_skipped_rows_are_counted_and_flags_checked(tmp_path, capsys):
    rows = write_rows(tmp_path / "pairs.jsonl", [*colour_pairs(range(4)), BAD_ROWS[0][0], BAD_ROWS[4][0],
                                                 BAD_ROWS[4][0]])
    byte_tokenizer().save(tmp_path / "tok")
    base = ["data", "prepare", "--tokenizer", str(tmp_path / "tok"), "--out", str(tmp_path / "out")]
    assert main([*base, "--preference", str(rows), "--skip-bad-rows"]) == 0
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["sources"]["pairs"]["skip_reasons"] == {"missing field": 1, "same reply": 2}
    assert meta["total"]["train_pairs"] + meta["total"]["val_pairs"] == 4
    capsys.readouterr()
    for extra, message in ((["--chat", str(rows)], "--chat and --preference write different datasets"),
                           (["--role-map", "bot=assistant"], "--role-map is not for preference rows"),
                           (["--train-on", "all"], "--train-on is not for preference rows")):
        assert main([*base, "--preference", str(rows), *extra]) == 2
        assert message in capsys.readouterr().err
    assert main([*base, "--val-preference", f"pairs={rows}"]) == 2
    assert "--val-preference needs --preference FILE.jsonl" in capsys.readouterr().err
    assert main([*base, "--preference", "pairs=x.jsonl@heavy"]) == 2
    assert "--preference 'pairs=x.jsonl@heavy': the weight after @ must be a number" in capsys.readouterr().err


def test_a_run_without_a_reference_or_with_another_vocabulary_is_refused(tmp_path):
    prepare_preference_dataset([ChatSource("pairs", write_rows(tmp_path / "pairs.jsonl", colour_pairs(range(6))))],
                               byte_tokenizer(), tmp_path / "data", val_fraction=0.3, progress=False)
    base = [f"data.path={tmp_path / 'data'}", "train.steps=1", "data.seq_len=48"]
    with pytest.raises(ConfigError, match=r"^DPO on preference data needs a reference model: set train.init"):
        train(load_config("tiny", base), tmp_path / "run")
    other = random_checkpoint(tmp_path / "other", ["model.vocab_size=600"])
    init = random_checkpoint(tmp_path / "init", [])
    with pytest.raises(ConfigError, match="its vocabulary has 600 tokens, the policy's 512"):
        train(load_config("tiny", [*base, f"train.init={init}", f"preference.reference={other}"]), tmp_path / "run")
    assert not (tmp_path / "run").exists()


@pytest.fixture
def colour_data(tmp_path):
    prepare_preference_dataset([ChatSource("pairs", write_rows(tmp_path / "colours.jsonl", colour_pairs(range(24))))],
                               byte_tokenizer(), tmp_path / "colours", val_fraction=0.25, progress=False)
    return tmp_path / "colours"


def dpo_config(data, init, *overrides):
    return load_config("tiny", [f"data.path={data}", f"train.init={init}", "train.steps=4", "optim.name=adamw",
                                "optim.lr=1e-3", "data.seq_len=48", "data.batch_size=2", "train.dtype=fp32",
                                "train.eval_every=2", "train.save_every=2", "preference.beta=0.1", *overrides])


def metric_lines(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_dpo_resumes_exactly(colour_data, tmp_path, monkeypatch):
    cfg = dpo_config(colour_data, random_checkpoint(tmp_path / "init", []))
    train(cfg, tmp_path / "straight")
    crash_then_resume(cfg, tmp_path / "run", lambda phase, step: step == 2, monkeypatch)
    expected, got = metric_lines(tmp_path / "straight"), metric_lines(tmp_path / "run")
    assert [(line["step"], "val_loss" in line) for line in got] == [(0, True), (1, False), (2, False), (2, True),
                                                                   (3, False), (4, False), (4, True)]
    assert [(line["step"], "val_loss" in line) for line in got] == [(line["step"], "val_loss" in line)
                                                                   for line in expected]
    for e, g in zip(expected, got):
        for key in ("loss", "dpo_loss", "reward_margin", "val_loss", "val_dpo_loss", "val_reward_margin"):
            if key in e:
                assert g[key] == pytest.approx(e[key], abs=1e-6), (key, e, g)
    assert expected[-1]["val_reward_margin"] != 0.0  # the policy moved away from the reference


def test_dpo_tunes_a_mixture_of_experts_policy(colour_data, tmp_path):
    """The router's balance loss joins the DPO loss, and the routing biases keep balancing the experts."""
    moe = ["model.ffn=moe", "model.moe.n_experts=4", "model.moe.top_k=2", "model.moe.expert_d_ff=32",
           "model.moe.balance_loss=0.01"]
    init = random_checkpoint(tmp_path / "init", moe)
    train(dpo_config(colour_data, init, "train.steps=16", "train.eval_every=16", "train.save_every=16", *moe),
          tmp_path / "run")
    lines = metric_lines(tmp_path / "run")
    steps, val = [line for line in lines if "dpo_loss" in line], [line for line in lines if "val_loss" in line]
    assert all(line["balance_loss"] > 0 for line in steps)
    assert steps[-1]["loss"] == pytest.approx(steps[-1]["dpo_loss"] + steps[-1]["balance_loss"], abs=1e-5)
    assert val[0]["val_reward_accuracy"] == 0.0 and val[-1]["val_reward_accuracy"] == 1.0
    start = load_model(init, device="cpu", dtype="fp32").model.state_dict()
    tuned = load_model(tmp_path / "run", device="cpu", dtype="fp32").model.state_dict()
    biases = [name for name in start if name.endswith("balance_bias")]
    assert biases and all(not torch.equal(start[n], tuned[n]) for n in biases)
