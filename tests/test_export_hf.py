"""`slmforge export --to hf`: each native family loads in stock transformers (trust_remote_code=False) with
logits within 1e-4 of slmforge's and the same 32 greedy tokens; what no native class computes is refused
with one line per field; the output is written whole or not at all."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from helpers import random_checkpoint

from slmforge.checkpoint import save_checkpoint
from slmforge.cli import main
from slmforge.config import load_config
from slmforge.data.loader import TokenDataset, val_batches
from slmforge.eval.heldout import evaluate
from slmforge.export.hf import export_hf
from slmforge.infer import SamplingParams, generate_ids
from slmforge.infer.load import load_model
from slmforge.model import build_model
from slmforge.tokenizer import byte_tokenizer

transformers = pytest.importorskip(
    "transformers", reason="transformers is not installed (pip install -e '.[test]'): no export check")

DENSE = ["model.vocab_size=288", "model.attention_pattern=[global]", "model.final_logit_softcap=null",
         "model.max_seq_len=128"]
MOE = ["model.ffn=moe", "model.moe.n_experts=6", "model.moe.top_k=2", "model.moe.expert_d_ff=32",
       "model.moe.first_dense_layers=1", "model.n_layers=3"]
FORMS = {
    "llama": DENSE,
    "llama-untied-pairs-mha": [*DENSE, "model.tie_embeddings=false", "model.rope_layout=pairs", "model.n_kv_heads=4"],
    "llama-bias": [*DENSE, "model.bias=true"],
    "qwen3": [*DENSE, "model.qk_norm=true", "model.rope_layout=pairs"],
    "qwen2": [*DENSE, "model.qkv_bias=true"],
    "qwen2-sliding": [*DENSE, "model.qkv_bias=true", "model.attention_pattern=[sliding, global]",
                      "model.sliding_window=8"],
    "llama-yarn": [*DENSE, "model.rope_scaling.kind=yarn", "model.rope_scaling.factor=4.0",
                   "model.rope_scaling.original_max_len=32"],
    "llama-linear": [*DENSE, "model.rope_scaling.kind=linear", "model.rope_scaling.factor=2.5"],
    "qwen3-yarn-attention-factor": [*DENSE, "model.qk_norm=true", "model.rope_scaling.kind=yarn",
                                    "model.rope_scaling.factor=8.0", "model.rope_scaling.original_max_len=16",
                                    "model.rope_scaling.beta_fast=16", "model.rope_scaling.attention_factor=1.0"],
    "qwen3-sliding": [*DENSE, "model.qk_norm=true", "model.attention_pattern=[sliding, global]",
                      "model.sliding_window=8"],
    "qwen2_moe": [*DENSE, *MOE, "model.moe.shared_d_ff=48", "model.moe.shared_gate=true", "model.moe.norm_topk=false",
                  "model.moe.bias_update_rate=0"],
    "qwen3_moe": [*DENSE, *MOE, "model.qk_norm=true", "model.moe.norm_topk=true", "model.moe.bias_update_rate=0"],
    "qwen2_moe-qkv-bias": [*DENSE, *MOE, "model.qkv_bias=true", "model.moe.shared_d_ff=48", "model.moe.shared_gate=true",
                           "model.moe.bias_update_rate=0"],
    "deepseek_v3": [*DENSE, *MOE, "model.attention=mla", "model.n_kv_heads=4", "model.rope_layout=pairs",
                    "model.mla.q_lora_rank=24",
                    "model.mla.kv_lora_rank=16", "model.mla.qk_head_dim=16", "model.mla.rope_head_dim=8",
                    "model.mla.v_head_dim=12", "model.moe.score=sigmoid", "model.moe.shared_d_ff=32",
                    "model.moe.norm_topk=true", "model.moe.route_scale=2.5"],
}


@pytest.mark.parametrize("form", list(FORMS))
def test_native_export_matches(form, tmp_path):
    source = random_checkpoint(tmp_path, FORMS[form])
    out, family = export_hf(source, tmp_path / "hf")
    assert family == form.split("-")[0]
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=False).eval()
    assert type(hf).__name__ == transformers.AutoConfig.from_pretrained(out).architectures[0]
    ours = load_model(source, device="cpu").model
    tokens = torch.randint(0, 288, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(hf(tokens).logits, ours(tokens)[0], atol=1e-4, rtol=0)
        prompt = tokens[:1, :9]
        theirs = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=32, min_new_tokens=32,
                             do_sample=False, pad_token_id=0)[0, 9:].tolist()
    params = SamplingParams(max_new_tokens=32, min_new_tokens=32, temperature=0.0)
    assert generate_ids(ours, [prompt[0].tolist()], params)[0].token_ids == theirs
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    assert tokenizer("def f(x):\n  return 2")["input_ids"] == byte_tokenizer().encode("def f(x):\n  return 2")


@pytest.mark.parametrize(("overrides", "reasons"), [
    (["model.vocab_size=288"], ["model.final_logit_softcap=30.0", "model.attention_pattern=['sliding', 'global']"]),
    ([*DENSE, "model.residual=attnres_block", "model.residual_blocks=2", "model.mtp_depth=1"],
     ["model.residual=attnres_block", "model.mtp_depth=1"]),
    ([*FORMS["qwen2_moe"], "model.moe.score=sigmoid", "model.moe.route_scale=2.0"],
     ["model.moe.score=sigmoid", "model.moe.route_scale=2.0"]),
    ([*FORMS["qwen2_moe"][:-1], "model.moe.bias_update_rate=0.001"], ["model.moe.bias_update_rate=0.001"]),
    ([*FORMS["deepseek_v3"], "model.mla.rope_mode=whole_head", "model.mla.rope_head_dim=0", "model.moe.score=softmax"],
     ["model.mla.rope_mode=whole_head", "model.moe.score=softmax"]),
])
def test_what_no_native_class_computes_is_refused(overrides, reasons, tmp_path, capsys):
    source = random_checkpoint(tmp_path, overrides)
    assert main(["export", str(source), "--to", "hf", str(tmp_path / "hf"), "--native"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("slmforge: error: ") and "no transformers class computes this model exactly" in err[0]
    assert [line.strip().split(":")[0] for line in err[1:]] == reasons
    assert not (tmp_path / "hf").exists() and not list(tmp_path.glob(".hf.tmp-*"))


def test_existing_output_needs_force(tmp_path, capsys):
    source = random_checkpoint(tmp_path, FORMS["llama"])
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "mine.txt").write_text("keep")
    assert main(["export", str(source), "--to", "hf", str(tmp_path / "hf")]) == 2
    assert "already exists: pass --force" in capsys.readouterr().err
    assert (tmp_path / "hf" / "mine.txt").read_text() == "keep"
    assert main(["export", str(source), "--to", "hf", str(tmp_path / "hf"), "--force"]) == 0
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]


@pytest.mark.parametrize("form", ["llama-untied-pairs-mha", "qwen2-sliding", "qwen3-sliding", "qwen2_moe-qkv-bias",
                                  "qwen3_moe", "deepseek_v3"])
def test_export_then_import_gives_identical_tensors(form, tmp_path):
    source = random_checkpoint(tmp_path, FORMS[form])
    out, _ = export_hf(source, tmp_path / "hf")
    assert main(["import", str(out), str(tmp_path / "back")]) == 0
    original, back = load_model(source, device="cpu"), load_model(tmp_path / "back", device="cpu")
    tokens = torch.randint(0, 288, (1, 30), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(back.model(tokens)[0], original.model(tokens)[0], atol=1e-5, rtol=0)
    assert back.config.model.layer_windows() == original.config.model.layer_windows()
    if "pairs" not in form:  # a "pairs" GQA model comes back in the rotate-half layout, its q/k rows permuted
        for name, tensor in original.model.state_dict().items():
            assert torch.equal(back.model.state_dict()[name], tensor), name


def test_import_a_model_made_by_transformers(tmp_path):
    """A Llama that transformers itself initialised and saved: our logits are its logits."""
    hf_cfg = transformers.LlamaConfig(vocab_size=288, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      tie_word_embeddings=True, bos_token_id=256, eos_token_id=257)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    hf.save_pretrained(tmp_path / "hf")
    byte_tokenizer().save(tmp_path / "hf")
    assert main(["import", str(tmp_path / "hf"), str(tmp_path / "ours")]) == 0
    ours = load_model(tmp_path / "ours", device="cpu").model
    tokens = torch.randint(0, 288, (2, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens)[0], hf(tokens).logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize(("change", "message"), [
    (lambda cfg, folder: cfg.update(model_type="gpt2"), "model_type 'gpt2': slmforge imports llama"),
    (lambda cfg, folder: cfg.update(hidden_act="gelu"), "hidden_act 'gelu'"),
    (lambda cfg, folder: cfg.update(rope_parameters={"rope_type": "longrope", "factor": 4.0}), "rope type 'longrope'"),
    (lambda cfg, folder: cfg.update(vocab_size=200), "model.vocab_size=200 is smaller than the tokenizer"),
    (lambda cfg, folder: (folder / "model.safetensors").rename(folder / "pytorch_model.bin"), "pickles"),
    (lambda cfg, folder: cfg.update(intermediate_size=80), "shape mismatches"),
    (lambda cfg, folder: save_file({**load_file(folder / "model.safetensors"), "lm_head.weight": torch.zeros(288, 64)},
                                   folder / "model.safetensors"), "lm_head.weight differs"),
])
def test_import_refusals(change, message, tmp_path, capsys):
    source = random_checkpoint(tmp_path, FORMS["llama"])
    out, _ = export_hf(source, tmp_path / "hf")
    cfg = json.loads((out / "config.json").read_text())
    change(cfg, out)
    (out / "config.json").write_text(json.dumps(cfg))
    assert main(["import", str(out), str(tmp_path / "back")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("slmforge: error:") and message in err and "Traceback" not in err
    assert not (tmp_path / "back").exists() and not list(tmp_path.glob(".tmp-*"))


def test_train_from_imported_weights(tmp_path, capsys):
    """`train --init`: the run's model is the checkpoint's, and its step-0 validation loss is the imported
    model's own (the weights were loaded, not drawn afresh)."""
    from helpers import word_dataset

    data = word_dataset(tmp_path)
    out, _ = export_hf(random_checkpoint(tmp_path, FORMS["qwen3"]), tmp_path / "hf")
    assert main(["import", str(out), str(tmp_path / "imported")]) == 0
    args = ["train", "--preset", "tiny", "--init", str(tmp_path / "imported"), "--data", str(data),
            "--out", str(tmp_path / "run"), "--set", "train.steps=2", "--set", "train.dtype=fp32"]
    assert main(args) == 0
    run_model = load_model(tmp_path / "run", device="cpu").config.model
    assert run_model == load_model(tmp_path / "imported", device="cpu").config.model and run_model.qk_norm
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    start = next(line["val_loss"] for line in lines if "val_loss" in line and line["step"] == 0)
    imported = load_model(tmp_path / "imported", device="cpu")
    batches = val_batches(TokenDataset(data), 64, 4, 2)  # the tiny preset's seq_len, batch_size, eval_batches
    expected = evaluate(imported.model, batches, imported.tokenizer.token_byte_lengths())["loss"]
    assert start == pytest.approx(expected, abs=1e-5)
    assert "weights from" in capsys.readouterr().err


# Loads an export where slmforge cannot be imported (a finder that refuses it is first on sys.meta_path), and
# writes the logits of the tokens given and 32 greedy tokens from generate() with its cache.
REMOTE_WORKER = """
import importlib.abc, json, sys

class NoSlmforge(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] == "slmforge":
            raise ImportError("slmforge is not installed here")

sys.meta_path.insert(0, NoSlmforge())
import torch, transformers
from safetensors.torch import load_file, save_file

folder, io = sys.argv[1], sys.argv[2]
model = transformers.AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
tokens = load_file(io + "/in.safetensors")["tokens"]
with torch.no_grad():
    logits = model(tokens).logits
    prompt = tokens[:1, :9]
    greedy = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=32, min_new_tokens=32,
                            do_sample=False, pad_token_id=0)[:, 9:]
save_file({"logits": logits.contiguous(), "greedy": greedy.contiguous()}, io + "/out.safetensors")
print(type(model).__name__, "slmforge" in sys.modules)
"""


@pytest.mark.slow
@pytest.mark.parametrize(("preset", "family"), [
    ("tiny", "slmforge"), ("quickstart", "llama"),  # the quickstart is native: the same check without slmforge
    ("nekomind-tiny", "slmforge"), ("axion1-tiny", "slmforge"), ("codemind-tiny", "slmforge"),
    ("axl-code-tiny", "slmforge")])
def test_every_family_exports_and_runs_without_slmforge(preset, family, tmp_path):
    cfg = load_config(preset, ["model.vocab_size=288"] if preset != "axl-code-tiny" else [])
    torch.manual_seed(3)
    model = build_model(cfg.model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.uniform_(0.5, 1.5) if name.endswith("norm.weight") else p.normal_(0.0, 0.1)
    tokenizer = byte_tokenizer()
    source = save_checkpoint(tmp_path / "step_1", cfg=cfg, model_state=model.state_dict(), tokenizer=tokenizer,
                             optimizer_tensors={}, state={"step": 1}, keep_last=1)
    out, written = export_hf(source, tmp_path / "hf")
    assert written == family and (out / "modeling_slmforge.py").is_file() == (family == "slmforge")
    assert all("from slmforge" not in p.read_text() for p in out.glob("*.py"))

    tokens = torch.randint(0, 258, (2, 40), generator=torch.Generator().manual_seed(4))
    save_file({"tokens": tokens}, tmp_path / "in.safetensors")
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf_home"), "PYTHONPATH": ""}
    done = subprocess.run([sys.executable, "-c", REMOTE_WORKER, str(out), str(tmp_path)], capture_output=True,
                          text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    expected_class = "SlmforgeForCausalLM" if family == "slmforge" else "LlamaForCausalLM"
    assert done.stdout.split() == [expected_class, "False"]
    theirs = load_file(tmp_path / "out.safetensors")
    ours = load_model(source, device="cpu").model
    with torch.no_grad():
        torch.testing.assert_close(theirs["logits"], ours(tokens)[0], atol=1e-4, rtol=0)
    params = SamplingParams(max_new_tokens=32, min_new_tokens=32, temperature=0.0)
    assert theirs["greedy"][0].tolist() == generate_ids(ours, [tokens[0, :9].tolist()], params)[0].token_ids


@pytest.mark.parametrize("params", [
    {"rope_type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096, "beta_fast": 32, "beta_slow": 1},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "attention_factor": 1.0},
    {"rope_type": "linear", "factor": 3.0},
])
def test_rope_scaling_equals_transformers(params):
    """Our inverse frequencies and cos/sin factor against transformers' own RoPE initialisers, same settings."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from slmforge.config import RopeScalingConfig
    from slmforge.model.rope import inverse_frequencies

    hf_cfg = transformers.LlamaConfig(hidden_size=128, num_attention_heads=4, max_position_embeddings=8192,
                                      rope_parameters={"rope_theta": 10000.0, **params})
    theirs, their_factor = ROPE_INIT_FUNCTIONS[params["rope_type"]](hf_cfg, "cpu")
    scaling = RopeScalingConfig(kind=params["rope_type"], factor=params["factor"],
                                original_max_len=params.get("original_max_position_embeddings", 0),
                                beta_fast=params.get("beta_fast", 32.0), beta_slow=params.get("beta_slow", 1.0),
                                attention_factor=params.get("attention_factor"))
    ours, our_factor = inverse_frequencies(32, 10000.0, scaling)
    torch.testing.assert_close(ours.float(), theirs.float(), atol=1e-7, rtol=1e-5)
    assert our_factor == pytest.approx(their_factor)


def test_chat_template_survives_import_and_export(tmp_path):
    source = random_checkpoint(tmp_path, FORMS["llama"])
    out, _ = export_hf(source, tmp_path / "hf")
    template = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    config = json.loads((out / "tokenizer_config.json").read_text())
    (out / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": template}))
    assert main(["import", str(out), str(tmp_path / "imported")]) == 0
    again, _ = export_hf(tmp_path / "imported", tmp_path / "hf2")
    tokenizer = transformers.AutoTokenizer.from_pretrained(again)
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert text == "<|im_start|>user\nhi<|im_end|>\n"
