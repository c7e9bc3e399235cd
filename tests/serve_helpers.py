"""What the serve tests share: small random-weights checkpoints, and the real server (the app on uvicorn)
in a background thread on a free 127.0.0.1 port."""

import socket
import threading
import time
from pathlib import Path

import torch
import uvicorn
from tokenizers import AddedToken

from slmforge.checkpoint import save_checkpoint
from slmforge.config import load_config
from slmforge.data.sources import Source
from slmforge.infer.engine import Engine
from slmforge.infer.load import load_for_decoding
from slmforge.model import build_model
from slmforge.serve.app import create_app
from slmforge.tokenizer import Tokenizer, train_bpe

from helpers import random_checkpoint, sentences

# ChatML over the markers every trained slmforge BPE reserves (<|im_start|>, <|im_end|>); like many
# templates, it refuses a role it has no place for
CHATML = ("{% for message in messages %}{% if message['role'] == 'tool' %}"
          "{{ raise_exception('this template has no tool messages') }}{% endif %}"
          "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
FIM_TOKENS = ["<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"]


def plain_checkpoint(folder: Path) -> Path:
    """The byte tokenizer (no chat template, no fill-in-the-middle tokens) and a 2048-token context, so that a
    long generation takes seconds."""
    return random_checkpoint(folder, ["model.vocab_size=258", "model.max_seq_len=2048"])


def chat_checkpoint(folder: Path) -> Path:
    """A trained BPE with the chat markers reserved, fill-in-the-middle tokens and a ChatML chat_template in
    its tokenizer_config.json; random weights, a 128-token context."""
    text = folder / "text"
    text.mkdir(parents=True)
    for i, doc in enumerate(sentences(12, 60)):
        (text / f"doc{i}.txt").write_text(doc)
    bpe = train_bpe([Source("text", str(text))], vocab_size=300, progress=False)
    bpe.hf.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in FIM_TOKENS])
    tokenizer = Tokenizer(bpe.hf, chat_template=CHATML)
    cfg = load_config("tiny", [f"model.vocab_size={tokenizer.vocab_size}"])
    torch.manual_seed(1)
    model = build_model(cfg.model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.uniform_(0.5, 1.5) if name.endswith("norm.weight") else p.normal_(0.0, 0.1)
    return save_checkpoint(folder / "run" / "step_1", cfg=cfg, model_state=model.state_dict(), tokenizer=tokenizer,
                           optimizer_tensors={}, state={"step": 1}, keep_last=1)


class RunningServer:
    """`slmforge serve`'s app for `checkpoint` on uvicorn in a thread, as a context manager; `base_url` is what
    the openai client takes, `engine` the engine behind it."""

    def __init__(self, checkpoint: Path, name: str = "tiny", api_key: str | None = None, max_batch: int = 4,
                 max_queue: int = 64):
        self.loaded = load_for_decoding(checkpoint, device="cpu")
        self.model, self.tokenizer = self.loaded.model, self.loaded.tokenizer
        self.engine = Engine(self.model, self.tokenizer.eos_id, self.tokenizer.decode, max_batch=max_batch,
                             max_queue=max_queue)
        self.name = name
        app = create_app(self.engine, self.tokenizer, name, api_key)
        self.socket = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.socket.getsockname()[1]}"
        self.base_url = f"{self.url}/v1"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True)

    def __enter__(self) -> "RunningServer":
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)

    def wait_until_idle(self, timeout: float = 10.0) -> float:
        """Seconds until no request holds a slot or waits (raises after `timeout`)."""
        start = time.monotonic()
        while True:
            stats = self.engine.stats()
            if stats["running"] == 0 and stats["waiting"] == 0:
                return time.monotonic() - start
            if time.monotonic() - start > timeout:
                raise AssertionError(f"the engine is still busy after {timeout} s: {stats}")
            time.sleep(0.01)
