"""Tokenizers: exact BPE vocabulary size, lossless round trips, special ids, files that transformers reads."""

import json
import random

import numpy as np
import pytest
import tokenizers

from slmforge.data import Source
from slmforge.tokenizer import bpe as bpe_module
from slmforge.tokenizer import SPECIAL_TOKENS, byte_tokenizer, load_tokenizer, train_bpe

VOCAB = 600

TEXTS = [
    "",
    "hello world",
    "naïve café — déjà vu, 日本語のテキスト, Ελληνικά, русский, עברית",
    "emoji 🙂👍🏽 family 👨‍👩‍👧 flags 🇫🇷",
    "def f(x):\n\treturn {'a': [x ** 2 for _ in range(3)]}  # comment\r\n",
    "   leading and trailing spaces   \n\n\n\t\t \u00a0\u2003",
    "control \x00\x01\x1b[0m\x7f and a lone surrogate-free \U0010ffff",
    "<|bos|> looks special but sits mid-text",
    "x" * 5000,
]


def _write_corpus(folder, n_docs=400, seed=0):
    """Random pseudo-words, code lines and a little unicode: enough distinct pairs for VOCAB ids."""
    rng = random.Random(seed)
    syllables = ["ka", "lo", "mi", "tu", "re", "sa", "no", "vi", "de", "po", "qu", "zh", "é", "ü", "ß"]
    folder.mkdir()
    for i in range(n_docs):
        words = ["".join(rng.choices(syllables, k=rng.randint(1, 4))) for _ in range(rng.randint(20, 60))]
        code = f"def fn_{i}(x, y={rng.randint(0, 99)}):\n    return x * y + {rng.random():.3f}\n"
        (folder / f"doc{i:03d}.txt").write_text(" ".join(words) + "\n\n" + code, encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return _write_corpus(tmp_path_factory.mktemp("tok") / "corpus")


@pytest.fixture(scope="module")
def bpe(corpus):
    return train_bpe([Source("corpus", str(corpus))], VOCAB)


def test_bpe_reaches_exact_vocab_with_specials_first(bpe):
    assert bpe.vocab_size == VOCAB
    assert bpe.hf.get_vocab_size() == VOCAB
    assert [bpe.hf.token_to_id(t) for t in SPECIAL_TOKENS] == list(range(8))
    assert (bpe.bos_id, bpe.eos_id, bpe.pad_id) == (0, 1, 2)
    assert bpe.special_tokens == {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    assert len(bpe.encode("kalomitu resa")) < len("kalomitu resa")  # merges were learned


@pytest.mark.parametrize("text", TEXTS)
def test_bpe_round_trip(bpe, text):
    ids = bpe.encode(text)
    assert bpe.decode(ids) == text
    framed = bpe.encode(text, bos=True, eos=True)
    assert framed[0] == bpe.bos_id and framed[-1] == bpe.eos_id
    assert bpe.decode(framed) == text
    assert bpe.decode(framed, skip_special=False) == "<|bos|>" + text + "<|eos|>"


def test_encode_batch_matches_encode(bpe):
    assert bpe.encode_batch(TEXTS) == [bpe.encode(t) for t in TEXTS]


def test_token_byte_lengths_count_utf8_bytes(bpe):
    lengths = bpe.token_byte_lengths()
    assert lengths.shape == (VOCAB,) and lengths.dtype == np.int32
    assert lengths[:8].tolist() == [0] * 8
    assert lengths[8:].min() >= 1
    for text in TEXTS:
        assert int(lengths[bpe.encode(text, bos=True, eos=True)].sum()) == len(text.encode("utf-8"))


def test_save_and_load_give_identical_ids(bpe, tmp_path):
    bpe.save(tmp_path / "tok")
    assert (tmp_path / "tok" / "tokenizer.json").is_file()
    config = json.loads((tmp_path / "tok" / "tokenizer_config.json").read_text())
    assert (config["bos_token"], config["eos_token"], config["pad_token"]) == ("<|bos|>", "<|eos|>", "<|pad|>")
    for loaded in (load_tokenizer(tmp_path / "tok"), load_tokenizer(tmp_path / "tok" / "tokenizer.json")):
        assert (loaded.vocab_size, loaded.bos_id, loaded.eos_id, loaded.pad_id) == (VOCAB, 0, 1, 2)
        assert [loaded.encode(t) for t in TEXTS] == [bpe.encode(t) for t in TEXTS]


@pytest.mark.parametrize("kind", ["bpe", "byte"])
def test_transformers_loads_saved_folder(bpe, tmp_path, kind):
    transformers = pytest.importorskip("transformers", reason="transformers is not installed (pip install -e .[test])")
    tok = bpe if kind == "bpe" else byte_tokenizer()
    tok.save(tmp_path)
    for cls in (transformers.PreTrainedTokenizerFast, transformers.AutoTokenizer):
        hf = cls.from_pretrained(str(tmp_path))
        assert (hf.bos_token, hf.eos_token) == ("<|bos|>", "<|eos|>")
        assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (tok.bos_id, tok.eos_id, tok.pad_id)
        assert len(hf) == tok.vocab_size
        for text in TEXTS:
            if "<|" in text:  # transformers turns literal special-token text into the special id; we do not
                continue
            assert hf(text)["input_ids"] == tok.encode(text)
            assert hf.decode(tok.encode(text, bos=True, eos=True), skip_special_tokens=True) == text


def test_byte_tokenizer():
    tok = byte_tokenizer()
    assert tok.vocab_size == 258
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (256, 257, 257)
    assert tok.encode("é") == [0xC3, 0xA9]
    assert tok.encode("A", bos=True, eos=True) == [256, 65, 257]
    for text in TEXTS:
        assert tok.encode(text) == list(text.encode("utf-8"))
        assert tok.decode(tok.encode(text, bos=True, eos=True)) == text
    assert tok.token_byte_lengths().tolist() == [1] * 256 + [0, 0]


def test_bpe_vocab_size_validation(corpus):
    with pytest.raises(ValueError, match="vocab_size=264 must be > 264"):
        train_bpe([Source("corpus", str(corpus))], 264)
    with pytest.raises(ValueError, match="only supports .* tokens, fewer than vocab_size=100000"):
        train_bpe([Source("corpus", str(corpus))], 100_000)


def test_max_chars_splits_budget_by_weight(corpus, tmp_path):
    rare = tmp_path / "rare.txt"
    rare.write_text("zqxv " * 20_000)
    sources = [Source("corpus", str(corpus)), Source("rare", str(rare), weight=0.0)]
    capped = train_bpe(sources, 300, max_chars=50_000)
    assert not any("zqx" in t for t in capped.hf.get_vocab())  # weight 0 under a cap: no text used
    full = train_bpe(sources, 300)
    assert any("zqx" in t for t in full.hf.get_vocab())
    with pytest.raises(ValueError, match="max_chars"):
        train_bpe(sources, 300, max_chars=0)


def test_no_documents_names_the_skips(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"txt": "hello"}\n')
    with pytest.raises(ValueError, match="no documents in sources \\['a'\\].*missing text field 'text'"):
        train_bpe([Source("a", str(tmp_path / "a.jsonl"))], 300)


def test_bpe_checks_every_source_before_reading_any(corpus, tmp_path, monkeypatch):
    read = []

    def iter_documents(source, stats):
        read.append(source.name)
        return real_iter_documents(source, stats)

    real_iter_documents = bpe_module.iter_documents
    monkeypatch.setattr(bpe_module, "iter_documents", iter_documents)
    sources = [Source("corpus", str(corpus)), Source("typo", str(tmp_path / "corpsu" / "*.txt"))]
    with pytest.raises(FileNotFoundError, match="source 'typo': no file matches .*corpsu"):
        train_bpe(sources, 300, progress=False)
    assert read == []


def test_bpe_progress_on_stderr_only_when_asked(corpus, capfd):
    sources = [Source("corpus", str(corpus))]
    train_bpe(sources, 300, progress=False)
    assert capfd.readouterr() == ("", "")
    train_bpe(sources, 300)  # as `slmforge tokenizer train` calls it
    out, err = capfd.readouterr()
    assert out == "" and "reading text" in err and "source=corpus" in err


def test_load_tokenizer_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_tokenizer(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty"):
        load_tokenizer(tmp_path / "empty")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="bad.json is not a valid tokenizer.json"):
        load_tokenizer(tmp_path / "bad.json")
    path = tmp_path / "nobos.json"
    tokenizers.Tokenizer(tokenizers.models.BPE(vocab={"a": 0}, merges=[])).save(str(path))
    with pytest.raises(ValueError, match="nobos.json: tokenizer has no special token <\\|bos\\|>"):
        load_tokenizer(path)
