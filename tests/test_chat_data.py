"""Chat data: rows of three shapes read as the same conversation, the loss mask from the template, packing
and its bookkeeping, and one line for each kind of bad row."""

import json

import numpy as np
import pytest
import torch

from slmforge.cli import main
from slmforge.data.batch import IGNORE
from slmforge.data.chat import CHATML, ChatSource, encode_conversation, prepare_chat_dataset
from slmforge.data.conversation_batches import ConversationBatches, EpochOrder, conversation_val_batches
from slmforge.data.conversations import BadRow, RowFormat, to_messages
from slmforge.data.loader import TokenDataset
from slmforge.tokenizer import byte_tokenizer, load_tokenizer
from slmforge.tokenizer.chat_template import ChatTemplate

CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "4"}, {"role": "user", "content": "and 3+3?"},
                {"role": "assistant", "content": "6, café"}]


def chatml():
    tokenizer = byte_tokenizer().with_special_tokens(["<|im_start|>", "<|im_end|>"], CHATML)
    return tokenizer, ChatTemplate(CHATML, tokenizer)


def write_rows(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def conversations(n: int, words: int = 6) -> list[dict]:
    """n two-turn conversations whose replies are a function of the question."""
    return [{"messages": [{"role": "user", "content": " ".join(f"q{(i + j) % 7}" for j in range(words))},
                          {"role": "assistant", "content": " ".join(f"a{(i * j) % 5}" for j in range(words))}]}
            for i in range(n)]


def test_three_row_shapes_read_as_one_conversation():
    fmt = RowFormat()
    messages = [{"role": "user", "content": "Add 1 and 2.\n\n1 2"}, {"role": "assistant", "content": "3"}]
    assert to_messages({"messages": messages}, "f", fmt) == messages
    sharegpt = {"conversations": [{"from": "human", "value": "Add 1 and 2.\n\n1 2"}, {"from": "gpt", "value": "3"}]}
    assert to_messages(sharegpt, "f", fmt) == messages
    assert to_messages({"instruction": "Add 1 and 2.", "input": "1 2", "output": "3"}, "f", fmt) == messages
    gsm8k = RowFormat(fields={"instruction": "question", "output": "answer"})
    assert to_messages({"question": "Q?", "answer": "#### 4"}, "f", gsm8k)[1] == {"role": "assistant",
                                                                              "content": "#### 4"}
    bot = RowFormat(role_map={"bot": "assistant"})
    assert to_messages({"messages": [{"role": "bot", "content": "hi"}]}, "f", bot)[0]["role"] == "assistant"


def test_mask_is_exactly_what_the_assistant_says():
    tokenizer, template = chatml()
    assert tokenizer.vocab_size == 260  # the byte tokenizer lacked ChatML's markers: two ids added after 257
    ids, mask = encode_conversation(template, CONVERSATION, "assistant")
    ids, mask = np.array(ids), np.array(mask, dtype=bool)
    assert tokenizer.decode(ids.tolist(), skip_special=False) == template.render(CONVERSATION, False)
    assert tokenizer.decode(ids[mask].tolist(), skip_special=False) == "4<|im_end|>\n6, café<|im_end|>\n"
    _, last = encode_conversation(template, CONVERSATION, "last")
    assert tokenizer.decode(ids[np.array(last, dtype=bool)].tolist(), skip_special=False) == "6, café<|im_end|>\n"
    _, every = encode_conversation(template, CONVERSATION, "all")
    assert all(every) and len(every) == len(ids)
    # the learned ids start right after the generation prompt, as the server would prompt the model
    prompt = template.encode(template.render(CONVERSATION[:2], add_generation_prompt=True))
    assert ids[:len(prompt)].tolist() == prompt and mask[len(prompt)] and not mask[len(prompt) - 1]


def test_prepared_chat_dataset(tmp_path):
    rows = write_rows(tmp_path / "chat.jsonl", conversations(40))
    meta = prepare_chat_dataset([ChatSource("chat", rows)], byte_tokenizer(), tmp_path / "data", val_fraction=0.1,
                                progress=False)
    dataset = TokenDataset(tmp_path / "data")
    assert dataset.kind == "chat" and meta["sources"]["chat"]["train_conversations"] + \
        meta["sources"]["chat"]["val_conversations"] == 40
    tokenizer = load_tokenizer(tmp_path / "data")
    assert tokenizer.vocab_size == 260 and tokenizer.chat_template == CHATML
    offsets, mask = dataset.offsets["train"]["chat"], dataset.masks["train"]["chat"]
    assert len(offsets) == meta["sources"]["chat"]["train_conversations"] + 1
    first = dataset.train["chat"][offsets[0]:offsets[1]]
    learned = tokenizer.decode(first[mask[offsets[0]:offsets[1]] == 1].tolist(), skip_special=False)
    assert learned == conversations(1)[0]["messages"][1]["content"] + "<|im_end|>\n"
    assert meta["sources"]["chat"]["trained_tokens"] == int(np.asarray(mask).sum())
    every = np.concatenate([dataset.train["chat"], dataset.val["chat"]])
    assert meta["sources"]["chat"]["bytes"] == int((every < 256).sum())  # byte tokens spell one byte, markers none


@pytest.fixture(scope="module")
def chat_data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("chat")
    rows = write_rows(folder / "chat.jsonl", conversations(30) + conversations(3, words=40))  # 3 long ones
    prepare_chat_dataset([ChatSource("chat", rows)], byte_tokenizer(), folder / "data", val_fraction=0.2,
                         progress=False)
    return TokenDataset(folder / "data")


def test_packed_rows_hold_whole_conversations_once_per_epoch(chat_data):
    batches = ConversationBatches(chat_data, seq_len=127, batch_size=4, seed=3)
    rows = batches.epoch(0)
    members = np.sort(np.concatenate(rows))
    assert members.tolist() == list(range(len(batches.conversations)))  # each conversation once
    assert all(batches.conversations.length[r].sum() <= 128 for r in rows)
    batch = batches.get(0)
    for row in range(4):
        docs, pos = batch.documents[row], batch.positions[row]
        for d in docs.unique().tolist():
            if d >= 0:  # positions count 0, 1, ... within each conversation
                assert pos[docs == d].tolist() == list(range(int((docs == d).sum())))
        # no target crosses into another conversation or comes from padding
        learned = batch.targets[row] != IGNORE
        assert bool((docs[1:][learned[:-1]] == docs[:-1][learned[:-1]]).all()) and bool((docs[learned] >= 0).all())
    # weight 2 takes every conversation twice per epoch; the rows are a function of the seed alone
    twice = ConversationBatches(chat_data, 127, 4, seed=3, weights={"chat": 2.0})
    assert np.bincount(np.concatenate(twice.epoch(0))).tolist() == [2] * len(batches.conversations)
    again = ConversationBatches(chat_data, 127, 4, seed=3)
    assert torch.equal(again.get(5, 1).tokens, batches.get(5, 1).tokens)


def test_rows_walk_epoch_after_epoch_and_are_found_again():
    order = EpochOrder(lambda e: [f"{e}.{i}" for i in range(e % 3 + 1)])  # epochs of 1, 2, 3, 1, ... items
    walked = [order[g] for g in range(12)]
    assert walked == ["0.0", "1.0", "1.1", "2.0", "2.1", "2.2", "3.0", "4.0", "4.1", "5.0", "5.1", "5.2"]
    fresh = EpochOrder(order.make)  # a restarted run finds a late position first, then earlier ones
    assert [fresh[g] for g in (10, 3, 0, 11)] == ["5.1", "2.0", "0.0", "5.2"]


def test_two_ranks_see_the_rows_of_one(chat_data):
    one = ConversationBatches(chat_data, 63, 4, seed=1, grad_accum=2)
    ranks = [ConversationBatches(chat_data, 63, 2, seed=1, rank=r, world_size=2, grad_accum=2) for r in range(2)]
    for step, micro in [(0, 0), (0, 1), (7, 1)]:  # step 7 is in a later epoch
        whole = one.get(step, micro)
        parts = [r.get(step, micro) for r in ranks]
        for field in ("tokens", "targets", "positions", "documents"):
            assert torch.equal(getattr(whole, field), torch.cat([getattr(p, field) for p in parts]))


def test_long_conversations_are_cut_and_counted(chat_data):
    batches = ConversationBatches(chat_data, 63, 2, seed=0)
    c = batches.conversations
    long = int((c.full_length > 64).sum())
    assert long >= 2 and (c.length <= 64).all()
    assert f"{long:,} conversations are longer than seq_len + 1 = 64 and keep their first 64 tokens" \
        in batches.describe()
    padded = ConversationBatches(chat_data, 63, 2, seed=0, pack=False)
    assert all(len(r) == 1 for r in padded.epoch(0)) and padded.get(0).documents is None
    val = conversation_val_batches(chat_data, 63, 2, 100)
    assert sum(len(b) for b in val) >= 1 and all(b.documents is not None for b in val)


BAD_ROWS = [
    ('{"messages": [{"role": "bot", "content": "hi"}]}', "messages[0].role 'bot' is not one of"),
    ('{"messages": [{"role": "user", "content": ""}]}', "messages[0].content is empty"),
    ('{"messages": [{"role": "user"}]}', "messages[0].content is missing"),
    ('{"conversations": [{"from": "human", "value": 3}]}', "conversations[0].value is int, not text"),
    ('{"text": "plain"}', "no conversation in this row"),
    ("[1, 2]", "a row must be a JSON object"),
    ("{not json", "not valid JSON"),
    ('{"messages": []}', "messages must be a non-empty list"),
]


@pytest.mark.parametrize("row, message", BAD_ROWS, ids=[m.split()[0] for _, m in BAD_ROWS])
def test_a_bad_row_is_one_line_and_nothing_written(tmp_path, capsys, row, message):
    rows = write_rows(tmp_path / "chat.jsonl", [*conversations(3), row])
    byte_tokenizer().save(tmp_path / "tok")
    code = main(["data", "prepare", "--tokenizer", str(tmp_path / "tok"), "--chat", str(rows), "--out",
                 str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert f"{rows} line 4: " in err and message in err
    assert not (tmp_path / "out").exists() and [p.name for p in tmp_path.iterdir()] == ["chat.jsonl", "tok"]


def test_skipped_rows_are_counted_by_reason(tmp_path):
    rows = write_rows(tmp_path / "chat.jsonl", [*conversations(5), BAD_ROWS[0][0], BAD_ROWS[1][0], BAD_ROWS[1][0],
                                                '{"messages": [{"role": "user", "content": "no reply"}]}'])
    meta = prepare_chat_dataset([ChatSource("chat", rows)], byte_tokenizer(), tmp_path / "data", skip_bad=True,
                                progress=False)
    assert meta["sources"]["chat"]["skip_reasons"] == {"unknown role": 1, "empty content": 2, "nothing to learn": 1}
    assert meta["sources"]["chat"]["documents"] == 5


def test_templates_that_cannot_mark_the_replies(tmp_path):
    tokenizer, _ = chatml()
    rows = write_rows(tmp_path / "chat.jsonl", conversations(3))
    rewrites = "{{ messages|length }}" + CHATML  # the text of earlier turns changes as the conversation grows
    with pytest.raises(ValueError, match=r"line 1: the chat template changes the text of earlier messages .*\(at messages\[:2\]\)"):
        prepare_chat_dataset([ChatSource("c", rows)], tokenizer, tmp_path / "a", template=rewrites, progress=False)
    refuses = "{{ raise_exception('no system role') }}"
    with pytest.raises(ValueError, match="line 1: the chat template refused these messages: no system role"):
        prepare_chat_dataset([ChatSource("c", rows)], tokenizer, tmp_path / "b", template=refuses, progress=False)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_cli_flags_that_need_chat_or_text(tmp_path, capsys):
    byte_tokenizer().save(tmp_path / "tok")
    rows = write_rows(tmp_path / "chat.jsonl", conversations(3))
    base = ["data", "prepare", "--tokenizer", str(tmp_path / "tok"), "--out", str(tmp_path / "out")]
    assert main([*base, "--role-map", "bot=assistant"]) == 2
    assert "--role-map needs --chat FILE.jsonl" in capsys.readouterr().err
    assert main([*base, "--chat", str(rows), "--source", "x"]) == 2
    assert "--source is for text sources" in capsys.readouterr().err
    assert main([*base, "--chat", str(rows), "--role-map", "bot"]) == 2
    assert "--role-map 'bot': expected NAME=VALUE" in capsys.readouterr().err
    assert main([*base, "--chat", str(rows), "--field", "answer=output"]) == 2
    assert "--field answer=...: the fields are" in capsys.readouterr().err
    assert main([*base, "--chat", str(tmp_path / "missing.jsonl")]) == 2
    assert "missing.jsonl: no such file" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_bad_row_message_names_the_role_map():
    with pytest.raises(BadRow, match="--role-map narrator=assistant or =user"):
        to_messages({"messages": [{"role": "narrator", "content": "x"}]}, "f", RowFormat())
