"""Data: sources and their skips, prepared shards (exact token counts, atomic writes), deterministic batches."""

import json
import os

import numpy as np
import pytest
import torch

from slmforge.data import (
    Source,
    SourceStats,
    TokenDataset,
    TrainBatches,
    default_sources,
    iter_documents,
    parse_source,
    prepare_dataset,
    val_batches,
)
from slmforge.tokenizer import byte_tokenizer

GOOD_TEXTS = {
    "a.txt": "alpha document, plain text.\n",
    "b.py": "def b():\n    return 'ünïcode'\n",
    "sub/c.md": "# C\n\nmarkdown 🙂\n",
}
JSONL_LINES = [
    b'{"question": "1+1?", "answer": "2"}',
    b"{not json",  # invalid JSON
    b'{"question": "no answer"}',  # missing field
    b"",  # blank: ignored, not counted
    b"[1, 2]",  # not an object
    b'{"question": "\xff\xfe", "answer": "x"}',  # not UTF-8
    b'{"question": "2+2?", "answer": "4", "extra": 0}',
]


@pytest.fixture
def corpus(tmp_path):
    """A folder of good files plus one of each kind of unreadable file, and a jsonl with bad lines."""
    root = tmp_path / "corpus"
    for name, text in GOOD_TEXTS.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text, encoding="utf-8")
    (root / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))  # skipped: not UTF-8
    (root / "empty.txt").write_text("")  # skipped: empty
    os.symlink(root / "missing-target.txt", root / "broken.txt")  # skipped: unreadable, even for root
    os.symlink(root, root / "sub" / "loop")  # skipped: a folder seen twice (a loop)
    (root / "image.bin").write_bytes(b"\x00\x01")  # not a text suffix: never read
    (root / ".hidden").mkdir()
    (root / ".hidden" / "h.txt").write_text("hidden")  # hidden folder: never read
    (root / "qa.jsonl").write_bytes(b"\n".join(JSONL_LINES) + b"\n")
    return root


def _documents(source):
    return list(iter_documents(source, SourceStats()))


def test_iter_documents_counts_skips_exactly(corpus):
    stats = SourceStats()
    docs = list(iter_documents(Source("c", str(corpus), fields=["question", "answer"]), stats))
    # sorted paths: a.txt, b.py, qa.jsonl (2 good lines), sub/c.md
    assert docs == [GOOD_TEXTS["a.txt"], GOOD_TEXTS["b.py"], "1+1?\n\n2", "2+2?\n\n4", GOOD_TEXTS["sub/c.md"]]
    assert (stats.documents, stats.bytes) == (5, sum(len(d.encode()) for d in docs))
    assert (stats.skipped_files, stats.skipped_lines) == (4, 4)
    assert stats.reasons == {
        "not UTF-8": 2,
        "empty": 1,
        "unreadable (not a file)": 1,
        "folder already read (symlink)": 1,
        "invalid JSON": 1,
        "missing text field 'answer'": 1,
        "not a JSON object": 1,
    }


def test_sources_glob_file_and_missing(corpus):
    assert _documents(Source("g", str(corpus / "**" / "*.md"))) == [GOOD_TEXTS["sub/c.md"]]
    assert _documents(Source("f", str(corpus / "b.py"))) == [GOOD_TEXTS["b.py"]]
    assert len(_documents(Source("ex", str(corpus), exclude=["sub"]))) == 2  # a.txt, b.py; qa.jsonl has no "text"
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        _documents(Source("x", str(corpus / "nope.txt")))
    with pytest.raises(FileNotFoundError, match="no file matches"):
        _documents(Source("x", str(corpus / "*.nothing")))


def test_parse_source():
    s = parse_source("math=../shared/data/gsm8k/train.jsonl::question+answer@0.15")
    assert (s.name, s.paths, s.fields, s.weight) == (
        "math",
        "../shared/data/gsm8k/train.jsonl",
        ["question", "answer"],
        0.15,
    )
    s = parse_source("code=/src/**/*.py@0.6")
    assert (s.name, s.paths, s.fields, s.weight) == ("code", "/src/**/*.py", ["text"], 0.6)
    s = parse_source("notes.txt")
    assert (s.name, s.paths, s.weight) == ("notes", "notes.txt", 1.0)
    assert parse_source("/data/books/**/*.txt").name == "books"
    assert parse_source("/home/me@host/x.txt").paths == "/home/me@host/x.txt"
    for bad, message in [
        ("x.txt@abc", "not a number"),
        ("x.txt@-1", ">= 0"),
        ("n=@2", "empty path"),
        ("@1", "empty path"),
    ]:
        with pytest.raises(ValueError, match=message) as info:
            parse_source(bad)
        assert repr(bad) in str(info.value)


def test_default_sources_is_the_stdlib():
    (source,) = default_sources()
    assert source.name == "stdlib" and source.paths.endswith("*.py") and "site-packages" in source.exclude
    code = parse_source("code=<stdlib>@0.6")  # the same corpus under another name in a mixture
    assert (code.name, code.paths, code.exclude, code.weight) == ("code", source.paths, source.exclude, 0.6)


def test_prepare_counts_tokens_exactly(corpus, tmp_path):
    tok = byte_tokenizer()
    sources = [
        Source("files", str(corpus), weight=0.75),
        Source("qa", str(corpus / "qa.jsonl"), ["question", "answer"], 0.25),
    ]
    meta = prepare_dataset(sources, tok, tmp_path / "ds", val_fraction=0.3, progress=False)
    out = tmp_path / "ds"
    assert json.loads((out / "meta.json").read_text()) == meta
    assert (out / "tokenizer.json").is_file() and (out / "tokenizer_config.json").is_file()
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == 258 and meta["eos_id"] == 257
    assert {n: m["weight"] for n, m in meta["sources"].items()} == {"files": 0.75, "qa": 0.25}
    for source in sources:
        m = meta["sources"][source.name]
        expected = [tok.encode(d) + [tok.eos_id] for d in _documents(source)]
        train = np.fromfile(out / source.name / "train.bin", dtype=np.uint16).tolist()
        val = np.fromfile(out / source.name / "val.bin", dtype=np.uint16).tolist()
        assert m["train_tokens"] + m["val_tokens"] == sum(map(len, expected)) == len(train) + len(val)
        assert m["documents"] == len(expected) and m["val_tokens"] > 0
        got = _split_documents(train, tok.eos_id) + _split_documents(val, tok.eos_id)
        assert sorted(got) == sorted(expected)  # every document exactly once, each followed by EOS
    # "files" reads qa.jsonl for a "text" field that no line has: all 6 non-blank lines are skipped.
    assert (meta["sources"]["files"]["skipped_files"], meta["sources"]["files"]["skipped_lines"]) == (4, 6)
    assert (meta["sources"]["qa"]["skipped_files"], meta["sources"]["qa"]["skipped_lines"]) == (0, 4)
    assert meta["total"]["documents"] == 3 + 2
    assert meta["total"]["skipped_lines"] == 10


def _split_documents(tokens, eos):
    docs, current = [], []
    for t in tokens:
        current.append(t)
        if t == eos:
            docs.append(current)
            current = []
    assert not current  # the file ends with an EOS
    return docs


def test_prepare_with_a_held_out_validation_source(corpus, tmp_path):
    """GSM8K style: train on one file, validate on another; the named val source takes the whole split."""
    tok = byte_tokenizer()
    test_split = tmp_path / "test.jsonl"
    test_split.write_text('{"question": "3+3?", "answer": "6"}\n{"question": "5-1?", "answer": "4"}\n')
    train_source = Source("qa", str(corpus / "qa.jsonl"), ["question", "answer"])
    val_source = Source("qa", str(test_split), ["question", "answer"])
    meta = prepare_dataset([train_source], tok, tmp_path / "ds", val_fraction=0.5, progress=False,
                           val_sources=[val_source])
    train = np.fromfile(tmp_path / "ds" / "qa" / "train.bin", dtype=np.uint16).tolist()
    val = np.fromfile(tmp_path / "ds" / "qa" / "val.bin", dtype=np.uint16).tolist()
    assert _split_documents(train, tok.eos_id) == [tok.encode(d) + [tok.eos_id] for d in _documents(train_source)]
    assert _split_documents(val, tok.eos_id) == [tok.encode(d) + [tok.eos_id] for d in _documents(val_source)]
    assert meta["sources"]["qa"]["val_paths"] == str(test_split) and meta["sources"]["qa"]["documents"] == 4
    with pytest.raises(ValueError, match=r"validation sources \['other'\] name no training source"):
        prepare_dataset([train_source], tok, tmp_path / "ds2", val_sources=[Source("other", str(test_split))])


def test_prepare_is_deterministic_and_capped(corpus, tmp_path):
    tok = byte_tokenizer()
    sources = [Source("files", str(corpus))]
    prepare_dataset(sources, tok, tmp_path / "one", progress=False)
    prepare_dataset(sources, tok, tmp_path / "two", progress=False)
    for split in ("train.bin", "val.bin"):
        assert (tmp_path / "one" / "files" / split).read_bytes() == (tmp_path / "two" / "files" / split).read_bytes()
    capped = prepare_dataset(sources, tok, tmp_path / "cap", max_tokens_per_source=10, progress=False)
    first = len(GOOD_TEXTS["a.txt"].encode()) + 1
    assert capped["sources"]["files"]["documents"] == 1  # stops after the document that reaches the cap
    assert capped["sources"]["files"]["train_tokens"] == first


def test_prepare_checks_every_source_before_reading_any(corpus, tmp_path, monkeypatch):
    def tokenize(*args, **kwargs):
        raise AssertionError("a source was tokenized before the missing ones were reported")

    monkeypatch.setattr("slmforge.data.prepare._write_source", tokenize)
    sources = [Source("files", str(corpus)), Source("gone", str(tmp_path / "gone.txt"))]
    val_sources = [Source("files", str(tmp_path / "*.jsonl"))]
    with pytest.raises(FileNotFoundError) as info:
        prepare_dataset(sources, byte_tokenizer(), tmp_path / "ds", progress=False, val_sources=val_sources)
    assert str(info.value) == (
        f"source 'gone': {str(tmp_path / 'gone.txt')!r} does not exist; "
        f"source 'files': no file matches {str(tmp_path / '*.jsonl')!r}"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus"]


def test_prepare_uint32_for_large_vocab(tmp_path):
    tok = byte_tokenizer()
    tok.hf.add_tokens([f"<w{i}>" for i in range(70_000)])
    (tmp_path / "t.txt").write_text("x<w69999>y")
    meta = prepare_dataset([Source("t", str(tmp_path / "t.txt"))], tok, tmp_path / "ds", progress=False)
    assert meta["dtype"] == "uint32"
    tokens = np.fromfile(tmp_path / "ds" / "t" / "train.bin", dtype=np.uint32).tolist()
    assert tokens == [ord("x"), 256 + 2 + 69_999, ord("y"), tok.eos_id]


def test_prepare_empty_corpus_raises_and_leaves_no_trace(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "bad.txt").write_bytes(b"\xff\xfe")
    with pytest.raises(ValueError, match="the corpus is empty: 'src'.*not UTF-8"):
        prepare_dataset([Source("src", str(tmp_path / "src"))], byte_tokenizer(), tmp_path / "ds", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_prepare_replaces_only_on_success(corpus, tmp_path):
    tok = byte_tokenizer()
    out = tmp_path / "ds"
    first = prepare_dataset([Source("files", str(corpus))], tok, out, progress=False)
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="some sources gave no documents: 'e'"):
        prepare_dataset(
            [Source("files", str(corpus)), Source("e", str(tmp_path / "empty.txt"))], tok, out, progress=False
        )
    assert json.loads((out / "meta.json").read_text()) == first  # the old dataset is untouched
    second = prepare_dataset([Source("other", str(corpus / "a.txt"))], tok, out, progress=False)
    assert list(second["sources"]) == ["other"] and not (out / "files").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus", "ds", "empty.txt"]
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="not a prepared dataset"):
        prepare_dataset([Source("files", str(corpus))], tok, tmp_path / "precious", progress=False)


def _write_dataset(folder, sources):
    """A dataset folder written by hand: {name: (train tokens, val tokens, weight)}; contents are easy to check."""
    folder.mkdir()
    meta = {"format_version": 1, "dtype": "uint16", "vocab_size": 65536, "eos_id": 0, "sources": {}}
    for name, (train, val, weight) in sources.items():
        (folder / name).mkdir()
        np.asarray(train, dtype=np.uint16).tofile(folder / name / "train.bin")
        np.asarray(val, dtype=np.uint16).tofile(folder / name / "val.bin")
        meta["sources"][name] = {"weight": weight, "train_tokens": len(train), "val_tokens": len(val)}
    (folder / "meta.json").write_text(json.dumps(meta))
    return TokenDataset(folder)


@pytest.fixture
def dataset(tmp_path):
    # Source a holds 1000..5999 and b holds 10000..12999, so each token names its source and position.
    return _write_dataset(
        tmp_path / "ds",
        {
            "a": (np.arange(1000, 6000), np.arange(100, 400), 3.0),
            "b": (np.arange(10000, 13000), np.arange(500, 700), 1.0),
        },
    )


def test_train_batches_shift_and_contiguity(dataset):
    batch = TrainBatches(dataset, seq_len=16, batch_size=4, seed=0).get(step=3, micro=1)
    x, y = batch.tokens, batch.targets
    assert x.shape == y.shape == (4, 16) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert torch.equal(y - x, torch.ones_like(x))  # windows are contiguous runs of one source


def test_train_batches_deterministic_and_stateless(dataset):
    a = TrainBatches(dataset, 16, 4, seed=7)
    b = TrainBatches(dataset, 16, 4, seed=7)
    assert torch.equal(a.get(10, 2).tokens, b.get(10, 2).tokens)  # a fresh loader resumes with nothing but the step
    assert not torch.equal(a.get(10, 2).tokens, a.get(11, 2).tokens)
    assert not torch.equal(a.get(10, 2).tokens, a.get(10, 3).tokens)
    assert not torch.equal(a.get(10, 2).tokens, TrainBatches(dataset, 16, 4, seed=8).get(10, 2).tokens)


def test_two_ranks_see_the_rows_of_one_rank(dataset):
    one = TrainBatches(dataset, 16, 8, seed=1)
    ranks = [TrainBatches(dataset, 16, 4, seed=1, rank=r, world_size=2) for r in range(2)]
    for step, micro in [(0, 0), (5, 1), (123, 3)]:
        x, y = one.get(step, micro).tokens, one.get(step, micro).targets
        assert torch.equal(x, torch.cat([r.get(step, micro).tokens for r in ranks]))
        assert torch.equal(y, torch.cat([r.get(step, micro).targets for r in ranks]))


def test_mixture_weights(dataset):
    rows = torch.cat([TrainBatches(dataset, 16, 64, seed=0).get(s).tokens for s in range(40)])
    share_a = (rows[:, 0] < 10000).float().mean().item()
    assert abs(share_a - 0.75) < 0.04  # weights 3:1 from meta.json, 2,560 rows
    only_a = torch.cat([TrainBatches(dataset, 16, 64, seed=0, weights={"b": 0}).get(s).tokens for s in range(5)])
    assert only_a.max().item() < 6000 and only_a.min().item() >= 1000
    only_b = TrainBatches(dataset, 16, 64, seed=0, weights={"a": 0.0, "b": 2.0}).get(0).tokens
    assert only_b.min().item() >= 10000
    with pytest.raises(ValueError, match=r"unknown sources \['code'\]"):
        TrainBatches(dataset, 16, 4, seed=0, weights={"code": 1.0})
    with pytest.raises(ValueError, match="all mixture weights are 0"):
        TrainBatches(dataset, 16, 4, seed=0, weights={"a": 0, "b": 0})


def test_short_sources_are_left_out(dataset):
    with pytest.warns(UserWarning, match="'b' has 3000 train tokens"):
        batches = TrainBatches(dataset, 3500, 2, seed=0)
    assert batches.sources == ["a"]
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="lower seq_len"):
        TrainBatches(dataset, 6000, 2, seed=0)


def test_val_batches_fixed_and_non_overlapping(dataset):
    batches = val_batches(dataset, seq_len=10, batch_size=4, max_batches=100)
    again = val_batches(dataset, seq_len=10, batch_size=4, max_batches=100)
    assert all(torch.equal(a.tokens, b.tokens) and torch.equal(a.targets, b.targets) for a, b in zip(batches, again))
    x = torch.cat([b.tokens for b in batches])
    y = torch.cat([b.targets for b in batches])
    assert torch.equal(y - x, torch.ones_like(x))
    # All 29 + 19 windows of stride 10 fit in 100 batches: each taken once, the last batch short.
    starts = sorted(x[:, 0].tolist())
    assert starts == list(range(100, 390, 10)) + list(range(500, 690, 10))
    assert [len(b) for b in batches] == [4] * 12
    few = torch.cat([b.tokens for b in val_batches(dataset, 10, 4, max_batches=2)])
    assert (few[:, 0] < 500).sum().item() == 6  # 3:1 mixture of 8 rows
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="larger val_fraction"):
        val_batches(dataset, seq_len=400, batch_size=4, max_batches=1)


def test_token_dataset_errors_name_the_problem(dataset, tmp_path):
    with pytest.raises(FileNotFoundError, match="not a prepared dataset"):
        TokenDataset(tmp_path)
    (dataset.path / "b" / "val.bin").write_bytes(b"\x00" * 10)
    with pytest.raises(ValueError, match="val.bin holds 10 bytes but meta.json says 200"):
        TokenDataset(dataset.path)
    (dataset.path / "b" / "val.bin").unlink()
    with pytest.raises(FileNotFoundError, match="missing .*val.bin"):
        TokenDataset(dataset.path)


def test_prepared_dataset_feeds_the_loader(corpus, tmp_path):
    tok = byte_tokenizer()
    prepare_dataset([Source("files", str(corpus))], tok, tmp_path / "ds", val_fraction=0.5, progress=False)
    ds = TokenDataset(tmp_path / "ds")
    batches = TrainBatches(ds, seq_len=8, batch_size=2, seed=0)
    x, y = batches.get(0).tokens, batches.get(0).targets
    start = batches.windows(0)[1][0]
    assert x[0].tolist() == ds.train["files"][start : start + 8].tolist()
    assert y[0].tolist() == ds.train["files"][start + 1 : start + 9].tolist()


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a file whatever its mode (the broken link covers root)")
def test_permission_denied_is_skipped(tmp_path):
    (tmp_path / "ok.txt").write_text("fine")
    (tmp_path / "locked.txt").write_text("secret")
    (tmp_path / "locked.txt").chmod(0)
    stats = SourceStats()
    assert list(iter_documents(Source("p", str(tmp_path)), stats)) == ["fine"]
    assert stats.reasons == {"unreadable (Permission denied)": 1}
