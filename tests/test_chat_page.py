"""The chat page that `slmforge serve` serves at `/`, driven in a real headless Chromium through Playwright.

A random-weight checkpoint whose tokenizer has a ChatML chat template is served by a `slmforge serve`
subprocess; the page streams an answer that grows over several updates and ends as the same text the server
gives for the same greedy request; Stop ends a long generation early and leaves the server serving; a wrong
API key shows the server's own error message in the page; a model without a chat template gets the server's
400 message and the raw-completion toggle, which then streams through /v1/completions.

Needs playwright (pip) and a Chromium (Debian's `chromium` package; `make test` installs it where apt-get is
available); without them the tests skip. A run writes its screenshot to the test's tmp_path; the one in
docs/ shows a real model and comes from docs/chat_page_screenshot.py.
"""

import os
import shutil
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.slow

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = next((p for p in (os.environ.get("SLMFORGE_CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium"),
                             shutil.which("chromium-browser")) if p and Path(p).is_file()), None)
if CHROMIUM is None:
    pytest.skip("no Chromium at /usr/bin/chromium or on PATH (Debian: apt-get install chromium; or set "
                "SLMFORGE_CHROMIUM)", allow_module_level=True)

CHATML = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
KEY = "sk-test-right-key"


def chat_tokenizer():
    """The byte tokenizer plus the reserved ChatML markers as special tokens, with a ChatML template."""
    from tokenizers import AddedToken

    from slmforge.tokenizer import byte_tokenizer
    from slmforge.tokenizer.tokenizer import Tokenizer

    hf = byte_tokenizer().hf
    hf.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<|im_start|>", "<|im_end|>")])
    return Tokenizer(hf, chat_template=CHATML)


def checkpoint(folder: Path, tokenizer, seed: int = 0) -> Path:
    """A tiny random-weight checkpoint (as tests/helpers.random_checkpoint builds, with `tokenizer`), with a
    context long enough for a generation that takes a while to finish."""
    import torch

    from slmforge.checkpoint import save_checkpoint
    from slmforge.config import load_config
    from slmforge.model import build_model

    cfg = load_config("tiny", [f"model.vocab_size={tokenizer.vocab_size}", "model.max_seq_len=4096"])
    torch.manual_seed(seed)
    model = build_model(cfg.model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.uniform_(0.5, 1.5) if name.endswith("norm.weight") else p.normal_(0.0, 0.1)
    return save_checkpoint(folder / "step_1", cfg=cfg, model_state=model.state_dict(), tokenizer=tokenizer,
                           optimizer_tensors={}, state={"step": 1}, keep_last=1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serve(ckpt: Path, log: Path, api_key: str | None = None):
    """`slmforge serve ckpt` on a free port until the block ends; yields the base URL once /health answers."""
    port = free_port()
    command = [sys.executable, "-m", "slmforge.cli", "serve", str(ckpt), "--host", "127.0.0.1", "--port", str(port)]
    if api_key:
        command += ["--api-key", api_key]
    url = f"http://127.0.0.1:{port}"
    with open(log, "wb") as out:
        proc = subprocess.Popen(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"slmforge serve exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"slmforge serve did not answer /health in 120 s:\n{log.read_text()[-4000:]}")
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def chat_server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("chatml")
    with serve(checkpoint(folder, chat_tokenizer()), folder / "serve.log") as url:
        yield url


@pytest.fixture(scope="module")
def keyed_server(tmp_path_factory):
    """A model without a chat template, behind an API key."""
    from slmforge.tokenizer import byte_tokenizer

    folder = tmp_path_factory.mktemp("plain")
    with serve(checkpoint(folder, byte_tokenizer(), seed=1), folder / "serve.log", api_key=KEY) as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1100, "height": 760})
    page = context.new_page()
    page.set_default_timeout(30_000)
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    yield page
    context.close()
    assert not errors, f"uncaught errors in the page: {errors}"


# Every text the last assistant message shows while the page streams: a MutationObserver records the
# message's length at each DOM update, so no update is missed however fast the tokens come.
WATCH = """() => {
  window.lengths = [];
  new MutationObserver(() => {
    const boxes = document.querySelectorAll('#transcript .msg.assistant .content');
    if (boxes.length && document.getElementById('app').dataset.state === 'streaming')
      window.lengths.push(boxes[boxes.length - 1].textContent.length);
  }).observe(document.getElementById('transcript'), {subtree: true, childList: true, characterData: true});
}"""


def open_page(page, url: str) -> None:
    page.goto(url + "/")
    page.wait_for_function("document.getElementById('model').value !== ''")


def set_fields(page, **values) -> None:
    for name, value in values.items():
        page.fill(f"#{name}", str(value))


def wait_idle(page, timeout: float = 60_000) -> None:
    page.wait_for_selector("#app[data-state=idle]", timeout=timeout)


def last_answer(page) -> str:
    return page.locator("#transcript .msg.assistant .content").last.text_content()


def test_page_streams_the_servers_answer(chat_server, page, tmp_path):
    open_page(page, chat_server)
    model = page.input_value("#model")
    assert model in [m["id"] for m in httpx.get(chat_server + "/v1/models").json()["data"]]
    prompt, max_tokens = "Tell me about the river.", 200
    set_fields(page, temperature=0, max_tokens=max_tokens)
    page.evaluate(WATCH)
    page.get_by_label("Message").fill(prompt)
    page.get_by_role("button", name="Send").click()
    wait_idle(page)

    lengths = page.evaluate("window.lengths")
    growth = sorted(set(lengths))
    assert len(growth) >= 3 and lengths == sorted(lengths), f"the answer did not stream: lengths seen {lengths}"
    assert page.locator(".notice").count() == 0, page.locator(".notice").all_text_contents()

    reply = httpx.post(chat_server + "/v1/chat/completions", timeout=120, json={
        "model": model, "messages": [{"role": "user", "content": prompt}], "temperature": 0,
        "max_tokens": max_tokens}).json()
    expected = reply["choices"][0]["message"]["content"]
    answer = last_answer(page)
    assert answer == expected and len(answer) > 0
    assert growth[-1] == len(answer)

    stats = page.locator("#transcript .msg.assistant .stats").last.text_content()
    tokens = reply["usage"]["completion_tokens"]
    assert f"{tokens} tokens" in stats and "tokens/s" in stats and "time to first token" in stats, stats
    assert f"finish: {reply['choices'][0]['finish_reason']}" in stats, stats

    # A second turn carries the first: the page sends the whole conversation, and Enter sends.
    page.get_by_label("Message").fill("And the stone?")
    page.get_by_label("Message").press("Enter")
    wait_idle(page)
    assert page.locator("#transcript .msg.user").count() == 2
    assert page.locator("#transcript .msg.assistant").count() == 2
    conversation = [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer},
                    {"role": "user", "content": "And the stone?"}]
    reply = httpx.post(chat_server + "/v1/chat/completions", timeout=120, json={
        "model": model, "messages": conversation, "temperature": 0, "max_tokens": max_tokens}).json()
    assert last_answer(page) == reply["choices"][0]["message"]["content"]

    shot = tmp_path / "chat-page.png"
    page.screenshot(path=str(shot))
    assert shot.stat().st_size > 10_000

    # Shift+Enter is a new line, not a send.
    page.get_by_label("Message").fill("two")
    page.get_by_label("Message").press("Home")
    page.get_by_label("Message").press("Shift+Enter")
    assert page.get_by_label("Message").input_value() == "\ntwo"
    assert page.locator("#transcript .msg.user").count() == 2

    page.get_by_role("button", name="New chat").click()
    assert page.locator("#transcript .msg").count() == 0


def running_requests(url: str) -> int:
    metrics = httpx.get(url + "/metrics").text
    return int(next(line for line in metrics.splitlines() if line.startswith("slmforge_requests_running ")).split()[1])


def test_stop_ends_a_long_generation_early(chat_server, page):
    # Greedy, this model runs to max_tokens (3000 tokens, seconds on a CPU); sampled, it soon says <|eos|>.
    open_page(page, chat_server)
    max_tokens = 3000
    set_fields(page, temperature=0, max_tokens=max_tokens)
    page.get_by_label("Message").fill("Write a very long story.")
    page.get_by_label("Message").press("Enter")
    page.wait_for_function("""() => {
        const c = document.querySelectorAll('#transcript .msg.assistant .content');
        return c.length && c[c.length - 1].textContent.length > 0; }""")
    stop = page.get_by_role("button", name="Stop")
    assert stop.is_enabled()
    start = time.monotonic()
    stop.click()
    wait_idle(page, timeout=10_000)
    assert time.monotonic() - start < 3
    stats = page.locator("#transcript .msg.assistant .stats").last.text_content()
    assert "finish: stopped" in stats, stats
    shown = int(stats.split(" tokens")[0].lstrip("≈"))
    assert 0 < shown < max_tokens // 2, stats
    assert not stop.is_enabled() and page.get_by_role("button", name="Send").is_enabled()
    assert page.locator(".notice").count() == 0, page.locator(".notice").all_text_contents()

    # The server noticed the disconnect and freed the slot.
    deadline = time.monotonic() + 5
    while running_requests(chat_server) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert running_requests(chat_server) == 0

    # Escape stops too, and the next request is served as usual.
    page.get_by_role("button", name="New chat").click()
    page.get_by_label("Message").fill("Write a very long story.")
    page.get_by_label("Message").press("Enter")
    page.wait_for_selector("#app[data-state=streaming]")
    page.keyboard.press("Escape")
    wait_idle(page, timeout=10_000)
    assert "finish: stopped" in page.locator("#transcript .msg.assistant .stats").last.text_content()
    set_fields(page, max_tokens=8)
    page.get_by_label("Message").fill("Short, please.")
    page.get_by_label("Message").press("Enter")
    wait_idle(page, timeout=30_000)
    assert "finish: length" in page.locator("#transcript .msg.assistant .stats").last.text_content()
    assert page.locator(".notice").count() == 0, page.locator(".notice").all_text_contents()


def test_errors_show_the_servers_message(keyed_server, page):
    wrong = {"Authorization": "Bearer sk-wrong"}
    refused = httpx.post(keyed_server + "/v1/chat/completions", headers=wrong,
                         json={"model": "x", "messages": [{"role": "user", "content": "hi"}]})
    assert refused.status_code == 401
    key_message = refused.json()["error"]["message"]

    # No key: the model list is refused, and the page says so with the server's words.
    open_page_without_models(page, keyed_server)
    page.wait_for_selector(".notice")
    assert key_message in page.locator(".notice").last.text_content()

    # The right key is kept in localStorage and survives a reload; the models then load.
    page.get_by_label("API key").fill(KEY)
    page.get_by_label("API key").press("Tab")
    page.wait_for_function("document.getElementById('model').value !== ''")
    page.reload()
    page.wait_for_function("document.getElementById('model').value !== ''")
    assert page.get_by_label("API key").input_value() == KEY
    model = page.input_value("#model")

    # This model has no chat template: the server's 400 message, and the raw-completion hint.
    chat = httpx.post(keyed_server + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                      json={"model": model, "messages": [{"role": "user", "content": "hi"}]})
    assert chat.status_code == 400, chat.text
    template_message = chat.json()["error"]["message"]
    set_fields(page, temperature=0, max_tokens=40)
    page.get_by_label("Message").fill("def hello")
    page.get_by_label("Message").press("Enter")
    wait_idle(page)
    notice = page.locator(".notice").last
    assert template_message in notice.text_content() and "Raw completion" in notice.text_content()
    assert page.locator("#transcript .msg").count() == 0  # the unsent message went back into the box
    assert page.get_by_label("Message").input_value() == "def hello"

    # The toggle: the transcript goes to /v1/completions as one text, and the answer streams in.
    notice.get_by_role("button", name="Use raw completion").click()
    assert page.get_by_label("Raw completion").is_checked()
    page.evaluate(WATCH)
    page.get_by_role("button", name="Send").click()
    wait_idle(page)
    reply = httpx.post(keyed_server + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=120,
                       json={"model": model, "prompt": "def hello", "temperature": 0, "max_tokens": 40}).json()
    assert last_answer(page) == reply["choices"][0]["text"]
    assert len(set(page.evaluate("window.lengths"))) >= 2

    # A wrong key mid-session: the request's error shows in the page, the message goes back into the box.
    page.get_by_label("API key").fill("sk-wrong")
    page.get_by_label("API key").press("Tab")
    page.wait_for_function("document.querySelectorAll('.notice').length >= 2")
    notices = page.locator(".notice").count()
    page.get_by_label("Message").fill("hello again")
    page.get_by_role("button", name="Send").click()
    wait_idle(page)
    page.wait_for_function(f"document.querySelectorAll('.notice').length > {notices}")
    assert key_message in page.locator(".notice").last.text_content()
    assert "401" in page.locator(".notice").last.text_content()
    assert page.get_by_label("Message").input_value() == "hello again"


def open_page_without_models(page, url: str) -> None:
    page.goto(url + "/")
    page.wait_for_function("document.getElementById('status').textContent !== 'Loading models…'")


def test_page_is_self_contained():
    """One file, no external resources, and model text never goes through innerHTML."""
    html = (ROOT / "slmforge" / "serve" / "static" / "index.html").read_text()
    assert "innerHTML" not in html and "insertAdjacentHTML" not in html and "document.write" not in html
    for external in ("http://", "https://", "//cdn", "<link rel=\"stylesheet\"", "<script src"):
        assert external not in html, external
