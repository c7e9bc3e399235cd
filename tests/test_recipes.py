"""The seed recipes: every file loads (also at full size) and trains 2 steps at its CPU size; a recipe's
data section builds its tokenizer and dataset once and reuses them."""

import json
from pathlib import Path

import pytest
from helpers import sentences

from slmforge.config import ConfigError, load_config
from slmforge.data.prepare import prepare_dataset
from slmforge.data.sources import Source
from slmforge.recipes import (
    list_recipes,
    load_recipe_raw,
    prepare_recipe_data,
    recipe_config,
    recipe_data_folder,
    resolve_recipe,
)
from slmforge.tokenizer import byte_tokenizer
from slmforge.train import train

GSM8K = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k"
EXPECTED = {"axion1-gsm8k", "axl-code-sgd", "axl-code-lion", "shard-40m", "codemind-1b", "nekomind-1.5"}


@pytest.fixture(scope="module")
def mixture(tmp_path_factory) -> Path:
    """A small byte dataset whose sources carry the names the recipes' mixtures and phases use."""
    root = tmp_path_factory.mktemp("mixture")
    texts = sentences(12, 200)
    sources = []
    for name in ("code", "math", "general", "gsm8k", "stdlib"):
        folder = root / "src" / name
        folder.mkdir(parents=True)
        for i, text in enumerate(texts):
            (folder / f"{i}.txt").write_text(f"{name} {text}")
        sources.append(Source(name, str(folder)))
    prepare_dataset(sources, byte_tokenizer(), root / "data", val_fraction=0.25, progress=False)
    return root / "data"


def test_every_card_has_a_recipe():
    assert EXPECTED <= set(list_recipes())


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_recipe_loads_at_both_sizes(name):
    raw = load_recipe_raw(name)
    assert raw.get("card") and raw.get("tokenizer") and raw.get("run")
    small = recipe_config(resolve_recipe(raw, full=False), [])
    big = recipe_config(resolve_recipe(raw, full=True), [])
    assert small.model.d_model <= big.model.d_model and small.model.n_layers <= big.model.n_layers
    assert resolve_recipe(raw, True)["tokenizer"].get("vocab_size", 258) <= big.model.vocab_size


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_recipe_trains_two_steps(name, mixture, tmp_path):
    raw = resolve_recipe(load_recipe_raw(name), full=False)
    steps = ["train.steps=2"] if not raw["run"].get("phases") else ["phases.0.steps=1", "phases.1.steps=1"]
    cfg = recipe_config(raw, [f"data.path={mixture}", *steps, "train.eval_every=2", "train.eval_batches=1",
                              "data.batch_size=2", "data.seq_len=64"])
    report = train(cfg, tmp_path / "run")
    assert report["tokens"] == 2 * 2 * 64
    assert all(p["val_loss"] is not None and p["val_loss"] < 20 for p in report["phases"])


def test_unknown_recipe_and_section(tmp_path):
    with pytest.raises(ConfigError, match="unknown recipe 'axion2'.*axion1-gsm8k"):
        load_recipe_raw("axion2")
    bad = tmp_path / "bad.yaml"
    bad.write_text("card: x\nrun: {base: tiny}\ntraining: {}\n")
    with pytest.raises(ConfigError, match=r"unknown section\(s\) \['training'\]"):
        load_recipe_raw(str(bad))


def test_extends_merges_over_the_parent():
    lion = recipe_config(resolve_recipe(load_recipe_raw("axl-code-lion"), False), [])
    sgd = recipe_config(resolve_recipe(load_recipe_raw("axl-code-sgd"), False), [])
    assert (lion.optim.name, sgd.optim.name) == ("lion", "sgd")
    assert lion.model == sgd.model and lion.train.steps == sgd.train.steps  # equal steps: a fair comparison
    folders = {recipe_data_folder(resolve_recipe(load_recipe_raw(n), False), Path("/c")) for n in ("axl-code-sgd",
                                                                                              "axl-code-lion")}
    assert len(folders) == 1  # one prepared dataset for both


@pytest.mark.skipif(not GSM8K.is_dir(), reason=f"GSM8K is not at {GSM8K} (the shared data folder)")
def test_axion_recipe_data_uses_gsm8k_test_for_validation(tmp_path):
    raw = resolve_recipe(load_recipe_raw("axion1-gsm8k"), False)
    raw["tokenizer"]["vocab_size"] = 300  # a quick BPE: the recipe's data path is what is tested
    raw["tokenizer"]["sources"] = [f"gsm8k={GSM8K / 'train.jsonl'}::question+answer"]
    raw["data"] = {"sources": [f"gsm8k={GSM8K / 'train.jsonl'}::question+answer"],
                   "val_sources": [f"gsm8k={GSM8K / 'test.jsonl'}::question+answer"]}
    data = prepare_recipe_data(raw, tmp_path)
    meta = json.loads((data / "meta.json").read_text())
    assert meta["vocab_size"] == 300 and meta["sources"]["gsm8k"]["documents"] == 7473 + 1319
    assert prepare_recipe_data(raw, tmp_path) == data  # built once, then reused
    assert len(list(tmp_path.iterdir())) == 1
    assert load_config("axion1-350k").model.vocab_size >= meta["vocab_size"]


def test_extends_cycle_is_named(tmp_path):
    (tmp_path / "a.yaml").write_text(f"extends: {tmp_path / 'b.yaml'}\n")
    (tmp_path / "b.yaml").write_text(f"extends: {tmp_path / 'a.yaml'}\n")
    with pytest.raises(ConfigError, match=r"extends: cycle .*a.yaml -> .*b.yaml -> .*a.yaml"):
        load_recipe_raw(str(tmp_path / "a.yaml"))


@pytest.mark.slow
def test_shard_recipe_learns_more_than_byte_frequencies(mixture, tmp_path):
    """The Shard recipe's two phases (its model at CPU size, WSD pretrain then anneal) on the byte mixture reach
    a validation loss below what the best model of byte frequencies alone scores on the same batches, which
    a model that learned nothing, or only unigram statistics, cannot."""
    import math

    import torch

    from slmforge.data.loader import TokenDataset, val_batches

    raw = resolve_recipe(load_recipe_raw("shard-40m"), full=False)
    cfg = recipe_config(raw, [f"data.path={mixture}", "phases.0.steps=60", "phases.1.steps=20",
                              "schedule.warmup_steps=10", "train.eval_every=1000", "train.eval_batches=4",
                              "data.batch_size=4", "data.seq_len=64", "model.vocab_size=258"])
    report = train(cfg, tmp_path / "run")
    dataset = TokenDataset(mixture)
    train_tokens = torch.cat([torch.from_numpy(t.astype("int64")) for t in dataset.train.values()])
    counts = torch.bincount(train_tokens, minlength=258).double() + 1
    unigram = -(counts / counts.sum()).log()  # nats of each byte under its training frequency
    batches = val_batches(dataset, 64, 4, 4, weights=cfg.run_phases()[-1].data.weights or None)
    frequencies_only = sum(unigram[b.targets].sum().item() for b in batches) / sum(b.scored for b in batches)
    final = report["phases"][-1]["val_loss"]
    assert final < frequencies_only - 0.3 < math.log(258), (final, frequencies_only)


def test_a_fine_tuning_recipe_prepares_its_chat_data_with_the_init_tokenizer(tmp_path):
    """init + chat: the chat data is written once with the init checkpoint's tokenizer and the run starts from
    its weights; a chat section without init is one line."""
    from helpers import random_checkpoint
    from slmforge.recipes import PRETRAINED, run_recipe
    from test_chat_data import conversations, write_rows

    base = random_checkpoint(tmp_path / "base", [])
    rows = write_rows(tmp_path / "chat.jsonl", conversations(30))
    recipe = tmp_path / "sft.yaml"
    recipe.write_text(json.dumps({"card": "test", "init": str(base), "chat": {"sources": [f"c={rows}"],
                                                                             "val_fraction": 0.2},
                                  "run": {"base": "tiny", "train": {"steps": 2, "eval_every": 2}}}))
    report = run_recipe(str(recipe), tmp_path / "run", cache=tmp_path / "cache")
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["train"]["init"] == str(base.resolve()) and config["model"]["vocab_size"] == 512
    data = Path(config["data"]["path"])
    assert data.parent.parent == tmp_path / "cache" and json.loads((data / "meta.json").read_text())["kind"] == "chat"
    assert report["recipe"] == "sft" and report["tokens"] > 0
    assert "smollm2-135m-instruct" in PRETRAINED and "smollm2-gsm8k-chat" in list_recipes()
    recipe.write_text(json.dumps({"chat": {"sources": [str(rows)]}, "run": {"base": "tiny"}}))
    with pytest.raises(ConfigError, match="a chat section fine-tunes a model: name it with init"):
        run_recipe(str(recipe), tmp_path / "other", cache=tmp_path / "cache")
