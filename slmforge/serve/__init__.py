"""`slmforge serve`: an OpenAI-compatible HTTP server (completions, chat, streaming, logprobs, /tokenize,
/metrics) over the decoding engine, which clients such as the `openai` package and lm-eval's
`local-completions` use as they use vLLM. Needs the `serve` extra; nothing here imports it, so the CLI
can say what is missing in one line."""

import importlib.util

SERVE_PACKAGES = ("fastapi", "uvicorn", "jinja2")


def check_packages() -> None:
    missing = [name for name in SERVE_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        raise ValueError(f"slmforge serve needs {', '.join(missing)}: pip install slmforge[serve]")
