"""LoRA: the merged weights compute the adapted model's logits, only the adapters train, checkpoints hold
both, resume is exact, and a target that matches nothing is one line."""

import json

import pytest
import torch
from safetensors.torch import load_file

from helpers import crash_then_resume, random_checkpoint, word_dataset
from slmforge.config import ConfigError, load_config
from slmforge.infer.load import load_model
from slmforge.model import build_model
from slmforge.model.lora import adapted_modules, add_lora, merged_state_dict
from slmforge.train import train

LORA = ["lora.rank=4", "lora.alpha=8", "optim.name=adamw", "optim.lr=0.01", "train.dtype=fp32", "train.steps=4",
        "train.save_every=2", "train.eval_every=2"]


@pytest.mark.parametrize("preset", ["tiny", "codemind-tiny"])
def test_merged_weights_give_the_adapted_logits(preset):
    cfg = load_config(preset)
    torch.manual_seed(0)
    model = build_model(cfg.model)
    names = add_lora(model, 4, 8.0, cfg.lora.targets)
    for lora in adapted_modules(model).values():
        torch.nn.init.normal_(lora.lora_B, std=0.2)
    tokens = torch.randint(0, 258, (2, 24))
    with torch.no_grad():
        adapted, _ = model(tokens)
        merged = build_model(cfg.model)
        merged.load_state_dict(merged_state_dict(model))
        plain, _ = merged(tokens)
    assert names and torch.allclose(adapted, plain, atol=1e-5, rtol=0)
    assert all(not p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lora")
    base = random_checkpoint(folder / "base", [])
    data = word_dataset(folder)
    cfg = load_config("tiny", [f"data.path={data}", f"train.init={base}", *LORA])
    train(cfg, folder / "run")
    return folder, base, cfg


def test_checkpoint_holds_merged_weights_and_the_adapters_apart(lora_run):
    folder, base, cfg = lora_run
    step = folder / "run" / "main" / "step_4"
    merged, before = load_file(step / "model.safetensors"), load_file(base / "model.safetensors")
    adapters = load_file(step / "adapter.safetensors")
    described = json.loads((step / "adapter_config.json").read_text())
    assert described["rank"] == 4 and described["alpha"] == 8.0 and described["base"] == str(base)
    assert sorted(merged) == sorted(before)
    for name, weight in before.items():
        module = name.removesuffix(".weight")
        if module in described["modules"]:  # W + alpha / rank * B A, the frozen W unchanged
            delta = adapters[f"{module}.lora_B"] @ adapters[f"{module}.lora_A"] * 2.0
            torch.testing.assert_close(merged[name], weight + delta, atol=1e-6, rtol=0)
            assert delta.abs().max() > 0
        else:
            assert torch.equal(merged[name], weight), name  # nothing else moved
    optimizer = load_file(step / "trainer_state" / "optimizer.safetensors")
    assert optimizer and all("lora_" in name for name in optimizer)
    # every reader loads the merged weights as a plain model
    assert load_model(folder / "run", device="cpu").config.lora.rank == 4


def test_lora_resumes_exactly(lora_run, tmp_path, monkeypatch):
    folder, _, cfg = lora_run
    crash_then_resume(cfg, tmp_path / "run", lambda phase, step: step == 2, monkeypatch)

    def losses(run):
        return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()
                if '"loss"' in line]

    assert losses(tmp_path / "run") == pytest.approx(losses(folder / "run"), abs=1e-6)


def test_lora_mistakes_are_one_line(tmp_path):
    data = word_dataset(tmp_path)
    base = random_checkpoint(tmp_path / "base", [])
    with pytest.raises(ConfigError, match=r"lora.targets=\['qkv'\]: match no nn.Linear of the model; its "
                                          r"projections are named down_proj, gate_proj, k_proj"):
        train(load_config("tiny", [f"data.path={data}", f"train.init={base}", *LORA, "lora.targets=[qkv]"]),
              tmp_path / "run")
    with pytest.raises(ConfigError, match="lora.rank=4 needs train.init"):
        train(load_config("tiny", [f"data.path={data}", *LORA]), tmp_path / "run")
    assert not (tmp_path / "run").exists()
