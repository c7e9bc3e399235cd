"""`slmforge chat`: turns rendered by the run's chat template, replies as greedy generation gives them and
kept in the history, /reset, and one line for what cannot run."""

import io

import pytest

from helpers import random_checkpoint
from slmforge.cli import main
from slmforge.config import load_config
from slmforge.data.chat import ChatSource, prepare_chat_dataset
from slmforge.infer import SamplingParams, generate_ids
from slmforge.infer.chat import ChatSession
from slmforge.infer.load import load_for_decoding
from slmforge.tokenizer import byte_tokenizer
from slmforge.tokenizer.chat_template import ChatTemplate
from slmforge.train import train
from test_chat_data import conversations, write_rows


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("chat-run")
    rows = write_rows(folder / "chat.jsonl", conversations(40))
    prepare_chat_dataset([ChatSource("chat", rows)], byte_tokenizer(), folder / "data", val_fraction=0.2,
                         progress=False)
    train(load_config("tiny", [f"data.path={folder / 'data'}", "train.steps=6", "train.dtype=fp32"]), folder / "run")
    return folder / "run"


def chat(argv, lines: str, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO(lines))
    code = main(["chat", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def test_replies_are_greedy_generation_of_the_rendered_history(chat_run, monkeypatch, capsys):
    loaded = load_for_decoding(chat_run, device="cpu")
    template = ChatTemplate(loaded.tokenizer.chat_template, loaded.tokenizer)
    params = SamplingParams(max_new_tokens=12, temperature=0.0)
    session = ChatSession(loaded.model, template, params)
    first = session.reply("q1 q2 q3")
    second = session.reply("q4 q5")
    # by hand: the history rendered with the generation prompt, continued greedily up to <|im_end|>
    end = loaded.tokenizer.special_tokens["<|im_end|>"]
    history = [{"role": "user", "content": "q1 q2 q3"}, {"role": "assistant", "content": first},
               {"role": "user", "content": "q4 q5"}]
    ids = template.encode(template.render(history, add_generation_prompt=True))
    expected = generate_ids(loaded.model, [ids], SamplingParams(max_new_tokens=12, temperature=0.0,
                                                                stop_token_ids=[end]),
                            loaded.tokenizer.eos_id, loaded.tokenizer.decode)[0]
    assert second == expected.text and session.history == [*history, {"role": "assistant", "content": second}]

    code, out, err = chat([chat_run, "--temperature", "0", "--max-new-tokens", "12", "--device", "cpu"],
                          "q1 q2 q3\nq4 q5\n/reset\nq1 q2 q3\n/exit\nnever read\n", monkeypatch, capsys)
    assert code == 0, err
    assert out.splitlines() == [first, second, first]  # /reset forgets the history; /exit ends


def test_a_turn_that_cannot_run_is_one_line_and_the_chat_goes_on(chat_run, monkeypatch, capsys):
    code, out, err = chat([chat_run, "--temperature", "0", "--max-new-tokens", "100", "--device", "cpu"],
                          "x" * 200 + "\nq1\n", monkeypatch, capsys)
    assert code == 0 and len(out.splitlines()) == 1
    assert "slmforge: this message takes" in err and "the context holds 28" in err


def test_a_model_without_a_chat_template(tmp_path, monkeypatch, capsys):
    checkpoint = random_checkpoint(tmp_path, [])
    code, _, err = chat([checkpoint, "--device", "cpu"], "hi\n", monkeypatch, capsys)
    assert code == 2 and err.strip().endswith("has no chat template (chat_template in tokenizer_config.json): "
                                              "fine-tune it on chat data (`slmforge data prepare --chat`), or pass "
                                              "--template FILE")
    code, _, err = chat([checkpoint, "--device", "cpu", "--template", "chatml"], "hi\n", monkeypatch, capsys)
    assert code == 2 and "--template chatml: the tokenizer of" in err and "has no <|im_start|> or <|im_end|>" in err
