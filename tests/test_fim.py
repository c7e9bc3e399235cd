"""Fill-in-the-middle: the transform's round trip, rate and determinism, the prepared dataset, and `slmforge
sample --prefix/--suffix`."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import slmforge.data.prepare
import slmforge.infer
from slmforge.checkpoint import save_checkpoint
from slmforge.cli import main
from slmforge.config import load_config
from slmforge.data.fim import FIM_TOKENS, FimCut, FimTransform, draw_cut, find_fim_ids, with_fim_tokens
from slmforge.data.prepare import format_report, prepare_dataset
from slmforge.data.sources import Source
from slmforge.model import build_model
from slmforge.tokenizer import byte_tokenizer, load_tokenizer, train_bpe

from helpers import random_checkpoint

DOCUMENT = "def größe(x):\n    \"\"\"Maß für 🙂 and naïve 日本語.\"\"\"\n    return x * 2  # ünïcode\n"
CODE = [f"def f{i}(a, b):\n    c = a + {i} * b  # größe {i}\n    return c - {i % 7}\n\nprint(f{i}(1, 2))\n"
        for i in range(40)]


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    """A small byte-level BPE with the FIM tokens, trained on the code and the multi-byte document."""
    folder = tmp_path_factory.mktemp("bpe")
    (folder / "code.txt").write_text("\n".join(CODE * 3 + [DOCUMENT] * 20))
    return with_fim_tokens(train_bpe([Source("code", str(folder))], vocab_size=400, progress=False))


def pieces_of(ids: list[int], fim) -> tuple[list[int], list[int] | None, list[int]]:
    """Undo `FimIds.arrange`: (prefix, middle, suffix) of a PSM example; (prefix + middle, None, suffix) of an
    SPM one, whose prefix and middle are not separated by a marker."""
    middle_at = ids.index(fim.middle)
    if ids[:2] == [fim.prefix, fim.suffix]:
        return ids[middle_at + 1:], None, ids[2:middle_at]
    assert ids[0] == fim.prefix
    suffix_at = ids.index(fim.suffix)
    return ids[1:suffix_at], ids[middle_at + 1:], ids[suffix_at + 1:middle_at]


def restore(ids: list[int], tokenizer, fim) -> str:
    prefix, middle, suffix = pieces_of(ids, fim)
    return tokenizer.decode(prefix) + tokenizer.decode(middle or []) + tokenizer.decode(suffix)


@pytest.mark.parametrize("spm", [False, True])
def test_prefix_middle_suffix_restore_the_document(bpe, spm):
    fim = find_fim_ids(bpe)
    start, end = DOCUMENT.index("öß") + 1, DOCUMENT.index("日本") + 1  # cuts between multi-byte characters
    cut = FimCut(start, end, spm)
    ids = FimTransform(fim, rate=1.0).encode_batch(bpe, [DOCUMENT], [cut])[0]
    prefix, middle, suffix = (bpe.encode(p) for p in cut.pieces(DOCUMENT))
    if spm:
        assert ids == [fim.prefix, fim.suffix, *suffix, fim.middle, *prefix, *middle]
    else:
        assert ids == [fim.prefix, *prefix, fim.suffix, *suffix, fim.middle, *middle]
    assert bpe.decode(prefix) == "def grö" and bpe.decode(middle).endswith("日") and bpe.decode(suffix)[0] == "本"
    assert restore(ids, bpe, fim) == DOCUMENT


def test_every_random_cut_restores_its_document(bpe):
    fim = find_fim_ids(bpe)
    texts = [DOCUMENT[:n] for n in range(len(DOCUMENT) + 1)] * 3
    keys = [f"doc/{i}" for i in range(len(texts))]
    transform = FimTransform(fim, rate=1.0, spm_rate=0.5)
    cuts = transform.cuts(texts, keys)
    assert {cut.spm for cut in cuts} == {False, True}
    for text, ids in zip(texts, transform.encode_batch(bpe, texts, cuts)):
        assert restore(ids, bpe, fim) == text


def test_the_rates_are_honoured():
    n = 6000
    cuts = [draw_cut("x" * 100, f"src/{i}", rate=0.3, spm_rate=0.25, seed=0) for i in range(n)]
    transformed = [c for c in cuts if c is not None]
    # binomial standard deviations: 0.006 for the rate, 0.010 for the SPM share; 4 of them allowed
    assert abs(len(transformed) / n - 0.3) < 0.024
    assert abs(sum(c.spm for c in transformed) / len(transformed) - 0.25) < 0.04
    # two uniform points sorted: the first averages a third of the document, the second two thirds
    assert abs(np.mean([c.start for c in transformed]) - 100 / 3) < 2
    assert abs(np.mean([c.end for c in transformed]) - 200 / 3) < 2
    assert all(0 <= c.start <= c.end <= 100 for c in transformed)
    assert all(draw_cut("x" * 100, f"src/{i}", 0.0, 0.5, 0) is None for i in range(500))
    assert all(draw_cut("x" * 100, f"src/{i}", 1.0, 0.5, 0) is not None for i in range(500))


def test_cuts_depend_on_seed_and_document_only():
    first = [draw_cut(DOCUMENT, f"code/{i}", 0.5, 0.5, seed=7) for i in range(200)]
    assert first == [draw_cut(DOCUMENT, f"code/{i}", 0.5, 0.5, seed=7) for i in range(200)]
    assert first != [draw_cut(DOCUMENT, f"code/{i}", 0.5, 0.5, seed=8) for i in range(200)]
    # the rate only decides which documents are transformed: a higher one keeps the lower one's cuts
    higher = [draw_cut(DOCUMENT, f"code/{i}", 0.8, 0.5, seed=7) for i in range(200)]
    assert all(h == c for h, c in zip(higher, first) if c is not None)


def code_folder(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    src.mkdir()
    for i, text in enumerate(CODE):
        (src / f"f{i:02d}.py").write_text(text)
    return src


def documents(path: Path, eos: int) -> list[list[int]]:
    ids = np.fromfile(path, dtype=np.uint16).tolist()
    ends = [i for i, t in enumerate(ids) if t == eos]
    assert ends and ends[-1] == len(ids) - 1  # every document keeps its trailing EOS
    return [ids[a + 1:b] for a, b in zip([-1, *ends], ends)]


def test_prepared_dataset_has_fim_train_plain_val_and_the_tokenizer(tmp_path):
    src = code_folder(tmp_path)
    meta = prepare_dataset([Source("code", str(src))], byte_tokenizer(), tmp_path / "ds", val_fraction=0.25,
                           progress=False, fim_rate=0.5, fim_spm_rate=0.5, fim_seed=3)
    tokenizer = load_tokenizer(tmp_path / "ds")
    assert [tokenizer.special_tokens[t] for t in FIM_TOKENS] == [258, 259, 260]
    assert meta["vocab_size"] == tokenizer.vocab_size == 261
    assert json.loads((tmp_path / "ds" / "meta.json").read_text())["fim"] == meta["fim"]
    assert meta["fim"]["rate"] == 0.5 and meta["fim"]["spm_rate"] == 0.5 and meta["fim"]["seed"] == 3
    assert meta["fim"]["marker_ids"] == {"prefix": 258, "suffix": 259, "middle": 260}
    fim = find_fim_ids(tokenizer)
    train = documents(tmp_path / "ds" / "code" / "train.bin", tokenizer.eos_id)
    val = documents(tmp_path / "ds" / "code" / "val.bin", tokenizer.eos_id)
    assert len(train) + len(val) == len(CODE) and len(val) == meta["sources"]["code"]["documents"] - len(train)
    arranged = [ids for ids in train if ids[0] == fim.prefix]
    assert len(arranged) == meta["fim"]["documents"]["code"] == meta["sources"]["code"]["fim_documents"]
    assert 0 < len(arranged) < len(train)
    assert (f"fill-in-the-middle: {len(arranged)} training documents rearranged (rate 0.5, in SPM order at 0.5, "
            "seed 3); validation plain") in format_report(meta)
    assert sorted(restore(ids, tokenizer, fim) if ids[0] == fim.prefix else tokenizer.decode(ids)
                  for ids in train + val) == sorted(CODE)
    assert all(t < 256 for ids in val for t in ids)  # validation stays plain text


def test_preparation_is_reproducible_and_independent_of_batching(tmp_path, monkeypatch):
    src = code_folder(tmp_path)

    def train_bytes(name: str, seed: int = 0) -> bytes:
        prepare_dataset([Source("code", str(src))], byte_tokenizer(), tmp_path / name, val_fraction=0.1,
                        progress=False, fim_rate=0.5, fim_seed=seed)
        return (tmp_path / name / "code" / "train.bin").read_bytes()

    once = train_bytes("a")
    assert once == train_bytes("b")
    assert once != train_bytes("c", seed=1)
    monkeypatch.setattr(slmforge.data.prepare, "ENCODE_BATCH", 3)
    assert once == train_bytes("d")


def test_no_fim_leaves_the_tokenizer_and_data_plain(tmp_path):
    src = code_folder(tmp_path)
    meta = prepare_dataset([Source("code", str(src))], byte_tokenizer(), tmp_path / "ds", progress=False)
    assert meta["fim"] is None and meta["vocab_size"] == 258 and meta["sources"]["code"]["fim_documents"] == 0
    assert load_tokenizer(tmp_path / "ds").vocab_size == 258


def test_bad_fim_input_is_one_line(tmp_path, capsys):
    src = code_folder(tmp_path)
    tok = tmp_path / "tok"
    byte_tokenizer().save(tok)
    prepare = ["data", "prepare", "--tokenizer", str(tok), "--source", str(src), "--out", str(tmp_path / "ds")]
    with pytest.raises(SystemExit) as exit_:
        main([*prepare, "--fim-rate", "1.5"])
    assert exit_.value.code == 2 and "--fim-rate: must lie in [0, 1], got 1.5" in capsys.readouterr().err
    assert main([*prepare, "--fim-spm-rate", "0.2"]) == 2
    assert capsys.readouterr().err == ("slmforge: error: --fim-spm-rate orders the fill-in-the-middle documents: "
                                       "give --fim-rate too\n")
    with pytest.raises(ValueError, match="fim_rate must lie in"):
        prepare_dataset([Source("code", str(src))], byte_tokenizer(), tmp_path / "ds", fim_rate=-0.1)

    run = random_checkpoint(tmp_path / "plain", ["model.vocab_size=258"])
    for args, message in [
        (["--suffix", "x"], "--prefix and --suffix come in pairs (the n-th --prefix with the n-th --suffix); "
                            "got 0 --prefix and 1 --suffix"),
        (["--prefix", "a", "--suffix", "b", "--prompt", "c"], "--prompt continues a text, --prefix/--suffix fill "
                                                              "in a middle: give one or the other"),
        (["--prefix", "a", "--suffix", "b", "--speculative", "--greedy"], "--speculative continues --prompt"),
        ([], "give --prompt TEXT to continue, or --prefix TEXT --suffix TEXT"),
        (["--prompt", "a", "--spm"], "--spm orders a fill-in-the-middle prompt: give --prefix and --suffix"),
        (["--prefix", "a", "--suffix", "b"], f"{run} cannot fill in the middle: its tokenizer lacks the "
                                             "fill-in-the-middle tokens <fim_prefix>, <fim_suffix>, <fim_middle>"),
    ]:
        assert main(["sample", str(run), *args]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"slmforge: error: {message}") and err.count("\n") == 1, err


def fim_checkpoint(folder: Path) -> Path:
    """Random weights of the tiny preset and the byte tokenizer with the FIM tokens (ids 258, 259, 260)."""
    tokenizer = with_fim_tokens(byte_tokenizer())
    cfg = load_config("tiny", [f"model.vocab_size={tokenizer.vocab_size}"])
    torch.manual_seed(0)
    model = build_model(cfg.model)
    return save_checkpoint(folder / "step_1", cfg=cfg, model_state=model.state_dict(), tokenizer=tokenizer,
                           optimizer_tensors={}, state={"step": 1}, keep_last=1)


def test_sample_fills_in_the_middle_from_the_psm_prompt(tmp_path, capsys, monkeypatch):
    run = fim_checkpoint(tmp_path)
    seen, real = {}, slmforge.infer.generate_ids

    def recording(model, prompt_ids, params, **kwargs):
        seen.update(prompts=prompt_ids, stop_token_ids=params.stop_token_ids)
        seen["completions"] = real(model, prompt_ids, params, **kwargs)
        return seen["completions"]

    monkeypatch.setattr(slmforge.infer, "generate_ids", recording)
    assert main(["sample", str(run), "--prefix", "def f(", "--suffix", "):\n", "--prefix", "é", "--suffix", "",
                 "--greedy", "--max-new-tokens", "5"]) == 0
    assert seen["prompts"] == [[258, *b"def f(", 259, *b"):\n", 260], [258, 0xC3, 0xA9, 259, 260]]
    assert seen["stop_token_ids"] == [258, 259, 260]
    printed = capsys.readouterr().out.split("\n")
    first, second = seen["completions"]
    assert printed[0] == f"--- 'def f(' ... '):\\n' ({first.finish_reason})"
    assert printed[1:] == [*first.text.split("\n"), f"--- 'é' ... '' ({second.finish_reason})",
                           *second.text.split("\n"), ""]
    assert first.text == byte_tokenizer().decode(first.token_ids)

    assert main(["sample", str(run), "--prefix", "def f(", "--suffix", "):\n", "--spm", "--max-new-tokens", "3"]) == 0
    assert seen["prompts"] == [[258, 259, *b"):\n", 260, *b"def f("]]
