"""`slmforge serve` as a user runs it: the CLI in its own process on a quickstart-shaped checkpoint, answered
through the official openai client, greedy text equal to `slmforge sample --greedy`'s, streamed or not, and
Ctrl-C ending it with exit status 130."""

import os
import re
import signal
import subprocess
import sys

import pytest
from helpers import ctrl_c_reaches_child, random_checkpoint

from slmforge.cli import main

pytest.importorskip("fastapi", reason="the server needs fastapi (pip install slmforge[serve])")
pytest.importorskip("uvicorn", reason="the server needs uvicorn (pip install slmforge[serve])")
openai = pytest.importorskip("openai", reason="the client is the openai package")

PROMPT, TOKENS = "def ", 24


def sample_greedy(checkpoint, capsys) -> str:
    main(["sample", str(checkpoint), "--prompt", PROMPT, "--greedy", "--max-new-tokens", str(TOKENS)])
    printed = capsys.readouterr().out
    return printed.split("\n", 1)[1].removesuffix("\n")  # after the "--- 'def ' (length)" line


@pytest.mark.slow
def test_serve_answers_the_openai_client_like_sample_greedy(tmp_path, capsys):
    checkpoint = random_checkpoint(tmp_path / "run", ["model.vocab_size=258"], preset="quickstart")
    expected = sample_greedy(checkpoint, capsys)
    server = subprocess.Popen([sys.executable, "-m", "slmforge.cli", "serve", str(checkpoint), "--port", "0",
                               "--model-name", "qs"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1"}, preexec_fn=ctrl_c_reaches_child)
    try:
        line = server.stdout.readline()  # the ready line comes once the server answers
        url = re.search(r"http://[\d.]+:\d+/v1", line)
        assert url, line
        client = openai.OpenAI(base_url=url.group(0), api_key="unused", max_retries=0, timeout=60)
        assert [m.id for m in client.models.list()] == ["qs"]
        answer = client.completions.create(model="qs", prompt=PROMPT, max_tokens=TOKENS, temperature=0)
        assert PROMPT + answer.choices[0].text == expected
        assert answer.usage.completion_tokens == TOKENS and answer.choices[0].finish_reason == "length"
        stream = client.completions.create(model="qs", prompt=PROMPT, max_tokens=TOKENS, temperature=0, stream=True)
        chunks = [c.choices[0].text for c in stream if c.choices]
        assert PROMPT + "".join(chunks) == expected and len(chunks) >= TOKENS  # a chunk per token at least
        server.send_signal(signal.SIGINT)
        assert server.wait(timeout=30) == 130
        assert "interrupted" in server.stdout.read()
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
