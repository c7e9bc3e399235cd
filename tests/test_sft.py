"""Supervised fine-tuning on the trainer: the loss mask in the gradient, attention kept within packed
conversations for every family that packs, exact resume, new token rows, and the multi-scale model padded."""

import json

import pytest
import torch
import torch.nn.functional as F

from helpers import crash_then_resume, random_checkpoint, word_dataset
from slmforge.config import ConfigError, load_config
from slmforge.data.batch import IGNORE, Batch
from slmforge.data.chat import CHATML, ChatSource, encode_conversation, prepare_chat_dataset
from slmforge.data.conversation_batches import ConversationBatches, conversation_val_batches
from slmforge.data.loader import TokenDataset
from slmforge.data.prepare import _is_val
from slmforge.data.sources import Source
from slmforge.model import build_model
from slmforge.model.vocab import grow_vocab_rows
from slmforge.tokenizer import byte_tokenizer, load_tokenizer, train_bpe
from slmforge.tokenizer.chat_template import ChatTemplate
from slmforge.train import train
from slmforge.train.objective import LanguageModeling
from test_chat_data import conversations, write_rows

PACKING_PRESETS = ["tiny", "tiny-dense", "codemind-tiny", "nekomind-tiny", "axion1-tiny"]


def tiny_model(preset: str = "tiny", seed: int = 0):
    torch.manual_seed(seed)
    model = build_model(load_config(preset).model)
    with torch.no_grad():  # attention-residual queries start at zero: make them matter
        for name, p in model.named_parameters():
            if "residual" in name:
                p.normal_(0.0, 0.5)
    return model


def chatml_ids(messages: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    tokenizer = byte_tokenizer().with_special_tokens(["<|im_start|>", "<|im_end|>"], CHATML)
    ids, mask = encode_conversation(ChatTemplate(CHATML, tokenizer), messages, "assistant")
    return torch.tensor(ids), torch.tensor(mask, dtype=torch.bool)


def padded_batch(conversation: list[dict], width: int = 120) -> Batch:
    """One conversation in a row of its own, as data.packing=pad lays it out."""
    ids, mask = chatml_ids(conversation)
    row = torch.full((width + 1,), 257)
    row[:len(ids)] = ids
    learned = torch.zeros(width + 1, dtype=torch.bool)
    learned[:len(ids)] = mask
    return Batch(row[None, :-1], torch.where(learned[1:], row[1:], IGNORE)[None])


def gradients(model, batch: Batch) -> dict[str, torch.Tensor]:
    model.zero_grad()
    loss, _, _ = LanguageModeling()(model, batch)
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_gradient_comes_from_the_assistant_tokens_alone():
    model = tiny_model()
    chat = [{"role": "system", "content": "Count."}, {"role": "user", "content": "1 2"},
            {"role": "assistant", "content": "3 4"}, {"role": "user", "content": "and then?"}]
    batch = padded_batch(chat)
    grads = gradients(model, batch)
    # the same as a hand-written cross-entropy over the assistant's tokens only
    ids, mask = chatml_ids(chat)
    model.zero_grad()
    logits, _ = model(ids[None, :-1])
    by_hand = F.cross_entropy(logits[0][mask[1:]].float(), ids[1:][mask[1:]])
    by_hand.backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, atol=1e-6, rtol=1e-5)
    # another system prompt, or another question after the reply, change no target the loss reads: only the
    # context the reply is read in (the system prompt) or nothing at all (the trailing question)
    trailing = gradients(model, padded_batch([*chat[:3], {"role": "user", "content": "something else entirely"}]))
    for name in grads:
        torch.testing.assert_close(trailing[name], grads[name], atol=1e-6, rtol=1e-5)
    other_reply = gradients(model, padded_batch([*chat[:2], {"role": "assistant", "content": "5 6"}, chat[3]]))
    assert max((other_reply[n] - grads[n]).abs().max().item() for n in grads) > 1e-4  # the test can fail


@pytest.mark.parametrize("preset", PACKING_PRESETS)
def test_packed_conversations_do_not_see_each_other(preset):
    """The logits of a conversation packed after another equal its logits alone, for every family that packs."""
    model = tiny_model(preset).eval()
    first, _ = chatml_ids([{"role": "user", "content": "first question"}, {"role": "assistant", "content": "one"}])
    second, _ = chatml_ids([{"role": "user", "content": "2nd?"}, {"role": "assistant", "content": "two two"}])
    tokens = torch.cat([first, second])[None] % 512
    documents = torch.cat([torch.zeros(len(first)), torch.ones(len(second))]).long()[None]
    positions = torch.cat([torch.arange(len(first)), torch.arange(len(second))])[None]
    with torch.no_grad():
        packed, _ = model(tokens, positions=positions, documents=documents)
        alone, _ = model(second[None] % 512)
        plain, _ = model(tokens)
    torch.testing.assert_close(packed[0, len(first):], alone[0], atol=1e-5, rtol=1e-4)
    assert (plain[0, len(first):] - alone[0]).abs().max() > 1e-3  # without documents the second sees the first


@pytest.fixture(scope="module")
def chat_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sft")
    rows = write_rows(folder / "chat.jsonl", conversations(60))
    prepare_chat_dataset([ChatSource("chat", rows)], byte_tokenizer(), folder / "data", val_fraction=0.2,
                         progress=False)
    return folder


def sft_config(data, *overrides, preset="tiny"):
    return load_config(preset, [f"data.path={data}", "train.steps=4", "train.save_every=2", "train.eval_every=2",
                                "train.dtype=fp32", *overrides])


def step_lines(run):
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [line for line in lines if "loss" in line]


def test_sft_resumes_exactly(chat_folder, tmp_path, monkeypatch):
    cfg = sft_config(chat_folder / "data")
    train(cfg, tmp_path / "straight")
    crash_then_resume(cfg, tmp_path / "run", lambda phase, step: step == 2, monkeypatch)
    expected, got = step_lines(tmp_path / "straight"), step_lines(tmp_path / "run")
    assert [l["step"] for l in got] == [1, 2, 3, 4]
    for e, g in zip(expected, got):
        assert g["loss"] == pytest.approx(e["loss"], abs=1e-6)


def test_init_grows_the_vocabulary_by_the_chat_markers(chat_folder, tmp_path, capsys):
    base = random_checkpoint(tmp_path / "base", ["model.vocab_size=258"])  # the byte tokenizer's 258 ids
    train(sft_config(chat_folder / "data", f"train.init={base}", "train.steps=1"), tmp_path / "run")
    cfg = json.loads((tmp_path / "run" / "main" / "step_1" / "config.json").read_text())
    assert cfg["model"]["vocab_size"] == 260
    assert "ids 258..259 are new: their rows of embed.weight start as the mean of the others" in capsys.readouterr().err
    old = {"embed.weight": torch.randn(5, 3)}
    grown, names = grow_vocab_rows(old, {"embed.weight": torch.zeros(7, 3)}, 5)
    assert names == ["embed.weight"] and torch.equal(grown["embed.weight"][:5], old["embed.weight"])
    torch.testing.assert_close(grown["embed.weight"][5:], old["embed.weight"].mean(0).expand(2, 3))


def test_init_refuses_data_of_another_tokenizer(chat_folder, tmp_path):
    base = random_checkpoint(tmp_path / "base", [])
    texts = tmp_path / "text.txt"
    texts.write_text("the quick brown fox " * 200)
    bpe = train_bpe([Source("t", str(texts))], 270, progress=False)
    rows = write_rows(tmp_path / "chat.jsonl", conversations(10))
    prepare_chat_dataset([ChatSource("chat", rows)], bpe, tmp_path / "bpe-data", progress=False)
    with pytest.raises(ConfigError, match=r"was not tokenized with the tokenizer of train.init=.* \(\d+ and 258 "
                                          r"tokens, different ids\): prepare it with --tokenizer"):
        train(sft_config(tmp_path / "bpe-data", f"train.init={base}"), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_multiscale_model_pads_and_refuses_to_pack(chat_folder, tmp_path):
    # from scratch, the byte model needs rows for the two ChatML markers the chat data added
    report = train(sft_config(chat_folder / "data", "train.steps=2", "model.vocab_size=260", preset="axl-code-tiny"),
                   tmp_path / "run")
    assert report["val_loss"] < 10
    with pytest.raises(ConfigError, match="data.packing=pack: the multiscale model cannot keep packed "
                                          "conversations apart; use pad"):
        train(sft_config(chat_folder / "data", "data.packing=pack", "model.vocab_size=260", preset="axl-code-tiny"),
              tmp_path / "other")


def test_validation_scores_exactly_the_held_out_replies(chat_folder):
    """The validation targets are each held-out reply's bytes and the end of its turn (<|im_end|> and a
    newline in ChatML), in order: nothing of the user's turns or the template's headers, nothing across packed
    conversations."""
    end_of_turn = [load_tokenizer(chat_folder / "data").hf.token_to_id("<|im_end|>"), ord("\n")]
    replies = [c["messages"][1]["content"] for i, c in enumerate(conversations(60)) if _is_val(i, 0.2)]
    val = conversation_val_batches(TokenDataset(chat_folder / "data"), 191, 4, max_batches=100)
    assert sum(len(b) for b in val) < len(replies)  # the rows pack several conversations each
    scored = torch.cat([b.targets[b.targets != IGNORE] for b in val]).tolist()
    assert scored == [t for r in replies for t in [*r.encode(), *end_of_turn]]


def test_pretraining_then_sft_in_one_run_of_two_phases(chat_folder, tmp_path):
    """Text data of the byte tokenizer, then chat data whose tokenizer extends it with the chat markers: the
    run's tokenizer is the chat one, in every checkpoint. Data of an unrelated tokenizer is refused."""
    text = word_dataset(tmp_path / "text")
    raw = {"base": "tiny", "train": {"dtype": "fp32", "eval_every": 2, "save_every": 3},
           "phases": [{"name": "pretrain", "steps": 3, "data": {"path": str(text)}},
                      {"name": "sft", "steps": 3, "data": {"path": str(chat_folder / "data")}}]}
    (tmp_path / "two.json").write_text(json.dumps(raw))
    report = train(load_config(str(tmp_path / "two.json")), tmp_path / "run")
    assert [p["name"] for p in report["phases"]] == ["pretrain", "sft"]
    for phase in ("pretrain", "sft"):
        tokenizer = load_tokenizer(tmp_path / "run" / phase / "step_3")
        assert tokenizer.vocab_size == 260 and "<|im_start|>" in tokenizer.chat_template
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    sft_val = [line for line in lines if line["phase"] == "sft" and "val_loss" in line]
    assert [line["step"] for line in sft_val] == [0, 2, 3]

    texts = tmp_path / "bpe.txt"
    texts.write_text("the quick brown fox " * 200)
    bpe = train_bpe([Source("t", str(texts))], 270, progress=False)
    prepare_chat_dataset([ChatSource("chat", chat_folder / "chat.jsonl")], bpe, tmp_path / "bpe-data", progress=False)
    raw["phases"][1]["data"]["path"] = str(tmp_path / "bpe-data")
    (tmp_path / "two.json").write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match=r"^phases.0.data.path=.*text/data was tokenized with another tokenizer than "
                                          r"phases.1.data.path=.*bpe-data \(258 and 270 tokens, different ids\)"):
        train(load_config(str(tmp_path / "two.json")), tmp_path / "other")


def test_accumulated_micro_batches_weigh_by_their_learned_tokens(tmp_path):
    """Two micro-batches of 4 rows make the same step as one of 8: the loss is the mean over the step's
    learned tokens, not the mean of the micro-batches' means (their rows hold different numbers of them)."""
    rows = [{"messages": [{"role": "user", "content": f"q{i % 7}"},
                          {"role": "assistant", "content": " ".join(["a"] * (1 + (i * 7) % 11))}]} for i in range(40)]
    prepare_chat_dataset([ChatSource("chat", write_rows(tmp_path / "chat.jsonl", rows))], byte_tokenizer(),
                         tmp_path / "data", val_fraction=0.2, progress=False)
    micro = [ConversationBatches(TokenDataset(tmp_path / "data"), 47, 4, seed=1337, grad_accum=2).get(0, m)
             for m in (0, 1)]
    assert micro[0].scored != micro[1].scored  # the test can fail
    lines = {}
    for batch, accum in ((8, 1), (4, 2)):
        cfg = sft_config(tmp_path / "data", f"data.batch_size={batch}", f"train.grad_accum={accum}",
                         "data.seq_len=47", "train.steps=3", "optim.name=adamw")
        train(cfg, tmp_path / f"b{batch}")
        lines[accum] = step_lines(tmp_path / f"b{batch}")
    for one, two in zip(lines[1], lines[2]):
        for key in ("loss", "grad_norm"):
            if key in one:
                assert two[key] == pytest.approx(one[key], abs=1e-5), (key, one, two)
