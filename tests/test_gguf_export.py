"""`slmforge export --to gguf`: llama.cpp (through llama-cpp-python) decodes the file token for token like
slmforge; the file round-trips through slmforge's own GGUF import; what llama.cpp cannot compute is refused."""

import dataclasses
from pathlib import Path

import pytest
import torch
from helpers import random_checkpoint

from slmforge.cli import main
from slmforge.config import load_config
from slmforge.export.gguf_export import export_gguf
from slmforge.infer import SamplingParams, generate_ids
from slmforge.infer.load import load_model
from slmforge.tokenizer import byte_tokenizer

pytest.importorskip("gguf", reason="gguf is not installed (pip install -e '.[test]'): no GGUF export check")

LLAMA = ["model.vocab_size=288", "model.attention_pattern=[global]", "model.final_logit_softcap=null",
         "model.max_seq_len=128", "model.d_model=64", "model.head_dim=16", "model.d_ff=128"]


def llama_cpp():
    return pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (make test builds it): no "
                                                   "llama.cpp check")


def llama_greedy(path: Path, prompt: list[int], n: int) -> tuple[list[int], torch.Tensor]:
    """llama.cpp's greedy continuation of `prompt` (argmax of its own logits) and its prompt logits."""
    # an f32 KV cache (llama.cpp keeps f16 by default), so that f32 logits can be compared closely
    llm = llama_cpp().Llama(model_path=str(path), n_ctx=128, logits_all=True, verbose=False, n_threads=1,
                            type_k=llama_cpp().GGML_TYPE_F32, type_v=llama_cpp().GGML_TYPE_F32)
    llm.eval(prompt)
    prompt_logits = torch.tensor(llm.scores[:len(prompt)])
    out = []
    for _ in range(n):
        out.append(int(llm.scores[llm.n_tokens - 1].argmax()))
        llm.eval([out[-1]])
    return out, prompt_logits


MOE = ["model.ffn=moe", "model.moe.n_experts=4", "model.moe.top_k=2", "model.moe.expert_d_ff=64",
       "model.moe.first_dense_layers=0", "model.moe.bias_update_rate=0", "model.tie_embeddings=false"]
FORMS = {
    "llama-half": [*LLAMA, "model.rope_layout=half"],
    "llama-pairs": [*LLAMA, "model.rope_layout=pairs"],
    "qwen2moe": [*LLAMA, *MOE, "model.moe.shared_d_ff=64", "model.moe.shared_gate=true", "model.rope_layout=pairs"],
    "qwen3moe": [*LLAMA, *MOE, "model.qk_norm=true", "model.moe.norm_topk=true", "model.rope_layout=half"],
    "deepseek2": [*LLAMA, *MOE, "model.attention=mla", "model.n_kv_heads=4", "model.rope_layout=pairs",
                  "model.mla.q_lora_rank=32", "model.mla.kv_lora_rank=32", "model.mla.qk_head_dim=16",
                  "model.mla.rope_head_dim=8", "model.mla.v_head_dim=16", "model.moe.score=sigmoid",
                  "model.moe.shared_d_ff=64", "model.moe.norm_topk=true", "model.moe.route_scale=2.5",
                  "model.moe.first_dense_layers=1", "model.moe.bias_update_rate=0.001"],
    "deepseek2-softmax-no-q-latent": [*LLAMA, *MOE, "model.attention=mla", "model.n_kv_heads=4",
                                      "model.rope_layout=pairs", "model.mla.q_lora_rank=0", "model.mla.kv_lora_rank=32",
                                      "model.mla.qk_head_dim=16", "model.mla.rope_head_dim=8", "model.mla.v_head_dim=16",
                                      "model.moe.shared_d_ff=128", "model.moe.bias_update_rate=0.001"],
}


@pytest.mark.parametrize("form", list(FORMS))
def test_llama_cpp_decodes_like_slmforge(form, tmp_path):
    source = random_checkpoint(tmp_path, FORMS[form])
    path = export_gguf(source, tmp_path / "model.gguf")
    ours = load_model(source, device="cpu").model
    prompt = torch.randint(0, 256, (12,), generator=torch.Generator().manual_seed(1)).tolist()
    theirs, logits = llama_greedy(path, prompt, 64)
    with torch.no_grad():
        torch.testing.assert_close(logits, ours(torch.tensor([prompt]))[0][0], atol=1e-4, rtol=0)
    params = SamplingParams(max_new_tokens=64, min_new_tokens=64, temperature=0.0)
    assert generate_ids(ours, [prompt], params)[0].token_ids == theirs


@pytest.mark.parametrize("dtype", ["f16", "q8_0"])
def test_quantised_exports_keep_the_top_token(dtype, tmp_path):
    source = random_checkpoint(tmp_path, LLAMA)
    path = export_gguf(source, tmp_path / f"model-{dtype}.gguf", dtype=dtype)
    ours = load_model(source, device="cpu").model
    prompt = torch.randint(0, 256, (100,), generator=torch.Generator().manual_seed(2)).tolist()
    _, logits = llama_greedy(path, prompt, 0)
    with torch.no_grad():
        agree = (logits.argmax(-1) == ours(torch.tensor([prompt]))[0][0].argmax(-1)).float().mean().item()
    assert agree >= {"f16": 0.97, "q8_0": 0.9}[dtype], agree


def test_byte_tokenizer_tokenizes_alike(tmp_path):
    path = export_gguf(random_checkpoint(tmp_path, LLAMA), tmp_path / "model.gguf")
    llm = llama_cpp().Llama(model_path=str(path), n_ctx=64, verbose=False, vocab_only=True)
    for text in ["hello world", "déjà vu\n\tx = 1  # ok", "<|eos|> is text here"]:
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == byte_tokenizer().encode(text), text


@pytest.mark.parametrize("dtype", ["f32", "q8_0"])
def test_round_trip_through_slmforge_import(dtype, tmp_path):
    """Exported, then imported by slmforge's GGUF reader: the same logits (f32 exactly up to rounding)."""
    source = random_checkpoint(tmp_path, [*LLAMA, "model.rope_layout=half", "model.tie_embeddings=false"])
    assert main(["export", str(source), "--to", "gguf", str(tmp_path / "m.gguf"), "--dtype", dtype]) == 0
    assert main(["import", str(tmp_path / "m.gguf"), str(tmp_path / "back")]) == 0
    tokens = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(3))
    original, back = load_model(source, device="cpu").model, load_model(tmp_path / "back", device="cpu").model
    with torch.no_grad():
        a, b = original(tokens)[0], back(tokens)[0]
    if dtype == "f32":
        torch.testing.assert_close(b, a, atol=1e-5, rtol=0)
    else:
        assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.9


def test_what_llama_cpp_cannot_compute_is_refused(tmp_path, capsys):
    source = random_checkpoint(tmp_path, ["model.vocab_size=288"])  # the tiny preset: soft-cap, sliding layers
    assert main(["export", str(source), "--to", "gguf", str(tmp_path / "m.gguf")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert "llama.cpp cannot compute this model as slmforge does" in lines[0]
    assert [line.strip().split(":")[0] for line in lines[1:]] == [
        "model.final_logit_softcap=30.0", "model.attention_pattern=['sliding', 'global']"]
    assert not list(tmp_path.glob("*.gguf*")) and not list(tmp_path.glob(".m.gguf*"))


def test_ollama_folder(tmp_path, capsys):
    """A GGUF and a Modelfile: FROM the file, a completion template for a model without a chat template, the
    end-of-text token as a stop string, the context length."""
    source = random_checkpoint(tmp_path, LLAMA)
    assert main(["export", str(source), "--to", "ollama", str(tmp_path / "ollama")]) == 0
    assert "ollama create ollama -f" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "ollama").iterdir()) == ["Modelfile", "model.gguf"]
    assert (tmp_path / "ollama" / "Modelfile").read_text() == (
        'FROM ./model.gguf\nTEMPLATE """{{ .Prompt }}"""\nPARAMETER stop "<|eos|>"\nPARAMETER num_ctx 128\n')


def test_targets_of_a_preset_and_a_run(tmp_path, capsys):
    assert main(["info", "tiny", "--targets"]) == 0
    out = capsys.readouterr().out
    assert "hf-remote  yes" in out and "gguf       no" in out and "model.final_logit_softcap=30.0" in out
    assert main(["info", str(random_checkpoint(tmp_path, LLAMA)), "--targets"]) == 0
    out = capsys.readouterr().out
    assert "hf-native  yes: llama" in out and "gguf       yes" in out and "ollama     yes" in out


def test_the_quickstart_preset_reaches_every_target():
    from slmforge.export.targets import reachable

    assert [(target, reasons) for target, _, reasons in reachable(load_config("quickstart").model)] == [
        ("hf-native", []), ("hf-remote", []), ("gguf", []), ("ollama", [])]


def test_moe_forms_llama_cpp_cannot_compute_are_refused(tmp_path, capsys):
    overrides = [*FORMS["qwen2moe"], "model.moe.first_dense_layers=1", "model.moe.score=sigmoid",
                 "model.tie_embeddings=true"]
    source = random_checkpoint(tmp_path, overrides)
    assert main(["export", str(source), "--to", "gguf", str(tmp_path / "m.gguf")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert [line.strip().split(":")[0] for line in lines[1:]] == [
        "model.moe.score=sigmoid, route_scale=1.0", "model.moe.first_dense_layers=1", "model.tie_embeddings=true"]


def test_the_quickstart_model_runs_in_llama_cpp(tmp_path):
    """The quickstart preset as `make quickstart` trains it (random weights here): llama.cpp decodes its GGUF
    like slmforge."""
    source = random_checkpoint(tmp_path, [], preset="quickstart")
    path = export_gguf(source, tmp_path / "quickstart.gguf")
    ours = load_model(source, device="cpu").model
    prompt = torch.randint(0, 256, (16,), generator=torch.Generator().manual_seed(4)).tolist()
    theirs, _ = llama_greedy(path, prompt, 64)
    params = SamplingParams(max_new_tokens=64, min_new_tokens=64, temperature=0.0)
    assert generate_ids(ours, [prompt], params)[0].token_ids == theirs


@pytest.mark.parametrize("form", ["qwen2moe", "qwen3moe", "deepseek2", "deepseek2-softmax-no-q-latent"])
def test_moe_and_mla_round_trip_through_slmforge_import(form, tmp_path):
    source = random_checkpoint(tmp_path, FORMS[form])
    export_gguf(source, tmp_path / "m.gguf")
    assert main(["import", str(tmp_path / "m.gguf"), str(tmp_path / "back")]) == 0
    tokens = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(5))
    original, back = load_model(source, device="cpu"), load_model(tmp_path / "back", device="cpu")
    # the routing as it was (the bias's update rate is a training setting, which a GGUF does not carry)
    assert back.config.model.moe == dataclasses.replace(original.config.model.moe, bias_update_rate=0.0)
    with torch.no_grad():
        torch.testing.assert_close(back.model(tokens)[0], original.model(tokens)[0], atol=1e-5, rtol=0)
