"""Running the app (`slmforge.serve.app`) for `slmforge serve RUN` on uvicorn.

The socket is bound before uvicorn starts, so a port in use is one error line and `--port 0` (any free
port) still prints the port it got; the line saying where the server listens comes once it answers. The
engine runs on the main thread and uvicorn on another (see `Engine.run`).
"""

from __future__ import annotations

import socket
import threading
from pathlib import Path

import uvicorn

from slmforge.infer.engine import Engine
from slmforge.infer.load import load_for_decoding
from slmforge.serve.app import create_app


class ReadyServer(uvicorn.Server):
    """uvicorn's server, printing one line once it listens."""

    def __init__(self, config: uvicorn.Config, ready_message: str):
        super().__init__(config)
        self.ready_message = ready_message

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        if self.started:
            print(self.ready_message, flush=True)


def listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family, backlog=2048)
    except OSError as e:
        raise OSError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None


def serve(path: str | Path, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          max_batch: int = 16, max_queue: int = 256, weights: str = "fp32", device: str = "auto",
          model_name: str | None = None) -> None:
    """Serve the checkpoint (or a run's newest) at `path` until interrupted; clients name it `model_name`
    (by default `path` as given, as vLLM names a model by its path)."""
    loaded = load_for_decoding(path, device=device, weights=weights, max_batch=max_batch)
    tokenizer = loaded.tokenizer
    engine = Engine(loaded.model, tokenizer.eos_id, tokenizer.decode, max_batch=max_batch, max_queue=max_queue)
    name = model_name or str(path)
    app = create_app(engine, tokenizer, name, api_key, run_engine=False)
    sock = listen(host, port)
    bound_host, bound_port = sock.getsockname()[:2]
    url_host = f"[{bound_host}]" if ":" in bound_host else bound_host
    ready = (f"slmforge: serving {name} ({loaded.checkpoint}, {weights} weights on {loaded.device}) at "
             f"http://{url_host}:{bound_port}/v1{' (API key required)' if api_key else ''}; Ctrl-C stops")
    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=5)
    server = ReadyServer(config, ready)

    def http() -> None:
        try:
            server.run(sockets=[sock])
        finally:  # the server ended (or failed to start): so does the engine
            engine.stop()

    # The engine decodes on this, the main thread (see Engine.run); HTTP runs on another. Ctrl-C reaches
    # the main thread, which then lets the HTTP server finish before the CLI reports the interruption.
    thread = threading.Thread(target=http, name="slmforge-http", daemon=True)
    thread.start()
    try:
        engine.run()
    finally:
        server.should_exit = True
        thread.join(timeout=10)
