"""`slmforge card RUN`: a model card (Hugging Face README.md) generated only from what a run folder holds.

Every figure is read from the folder or computed from it: the architecture from the checkpoint's config
(`slmforge.model.stats`, as `slmforge info` prints), the training from config.json, report.json,
metrics.jsonl and the manifest of the data folder the run names, evaluations from RUN/eval/*.json, the
ways to load it from the exporters' own checks, and limitations from the measured numbers only. The
energy and CO2 figures are the one estimate: measured time x a stated power x a stated carbon intensity.

One module per section: run (reading the folder), model, training (with data and energy), evals (with
limitations), usage; fmt formats.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from slmforge.card import fmt
from slmforge.card.evals import limitations, results_table, samples_table
from slmforge.card.model import architecture_rows, tags, tokenizer_kind
from slmforge.card.run import RunFacts, read_run
from slmforge.card.training import data_section, energy, energy_section, hardware_text, optimizer_names, \
    procedure_section, wall_time
from slmforge.card.usage import export_targets, usage_section

DEFAULT_LICENSE = "apache-2.0"


@dataclass
class CardOptions:
    license: str = DEFAULT_LICENSE
    name: str | None = None  # the card's title (default: the recipe's name, else the run folder's)
    datasets: list[str] = field(default_factory=list)  # Hugging Face dataset ids for the front matter
    power_watts: float | None = None  # the training hardware's power draw (default: see training.energy)
    carbon_intensity: float | None = None  # gCO2/kWh of its electricity


def _front_matter(facts: RunFacts, options: CardOptions, byte_level: bool, native: bool) -> str:
    optimizers = [n for p in facts.config.run_phases() for n in optimizer_names(p.optim)]
    meta = {"license": options.license, "library_name": "transformers", "pipeline_tag": "text-generation",
            "tags": tags(facts.config.model, byte_level, optimizers if facts.report is not None else [], native,
                         from_scratch=facts.report is not None and not facts.config.train.init)}
    if options.datasets:
        meta["datasets"] = list(options.datasets)
    return "---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True) + "---"


def _summary(facts: RunFacts, name: str, stats: dict) -> str:
    m, report = facts.config.model, facts.report
    total, active = stats["total_params"], stats["active_params_per_token"]
    kind = "multi-scale byte" if m.arch == "multiscale" else "decoder-only"
    text = f"**{name}** is a {fmt.human(total)}-parameter {'mixture-of-experts ' if m.ffn == 'moe' else ''}{kind} " \
           f"language model" + (f" ({fmt.human(active)} active per token)" if active != total else "")
    if report is None:
        return text + (f". This folder holds a checkpoint only (`{facts.checkpoint.name}`, no report.json): it records "
                       "no training, so this card reports none.")
    phases = facts.config.run_phases()
    how = "from scratch" if not facts.config.train.init else f"from the weights of `{facts.config.train.init}`"
    steps = sum(p.steps for p in phases)
    text += (f", trained {how} with slmforge on {fmt.human(report['tokens'])} tokens in {steps:,} optimizer steps"
             + (f" ({', '.join(p.name for p in phases)})" if len(phases) > 1 else "")
             + f", in {fmt.duration(wall_time(report)[0])} on {hardware_text(report, short=True)}.")
    if report.get("val_loss") is not None:
        text += (f" Its final validation loss is {fmt.number(report['val_loss'])} nats/token "
                 f"({fmt.number(report['val_bpb'])} bits per byte).")
    return text


def render_card(facts: RunFacts, options: CardOptions, png_name: str | None, png_note: str = "") -> str:
    """The card's Markdown. `png_name`: the loss-curve PNG beside it (None: `png_note` says why there is none)."""
    from slmforge.model.stats import model_stats

    cfg, report = facts.config, facts.report
    name = options.name or (report or {}).get("recipe") or facts.folder.resolve().name
    stats = model_stats(cfg.model)
    tokenizer, byte_level = tokenizer_kind(facts.tokenizer)
    targets = export_targets(facts)
    seq_len = cfg.run_phases()[-1].data.seq_len if report is not None else None
    weights_bytes = (facts.checkpoint / "model.safetensors").stat().st_size
    parts = [_front_matter(facts, options, byte_level, targets.native is not None), "", f"# {name}", "",
             _summary(facts, name, stats), "",
             "## Model", "", fmt.properties(architecture_rows(cfg.model, stats, tokenizer, byte_level, seq_len,
                                                                          weights_bytes)), ""]
    if report is not None:
        parts += ["## Training", "", *procedure_section(facts), "", "### Data", "", *data_section(facts), "",
                  "### Energy and CO2", "", *energy_section(energy(report, options.power_watts,
                                                                    options.carbon_intensity)), "",
                  "### Loss curves", ""]
        parts.append(f"![Training curves against tokens seen]({png_name})\n\n"
                     "Drawn by `slmforge plot` from the run's metrics.jsonl: the faint line is every step, the solid "
                     "one smoothed; validation losses are markers." if png_name else png_note)
        parts.append("")
    parts += ["## Evaluation", ""]
    if report is not None and report.get("val_loss") is not None:
        parts += [f"On its validation split at the end of training (`train.eval_batches` = {cfg.train.eval_batches} "
                  f"batches): loss {fmt.number(report['val_loss'])} nats/token, perplexity "
                  f"{fmt.number(report.get('val_ppl'), 2)}, {fmt.number(report['val_bpb'])} bits per byte.", ""]
    scored = [r for r in facts.evals if r["metrics"]]
    if scored:
        parts += [f"Every result in `{facts.folder}/eval/` (`slmforge eval`):", "", results_table(facts, scored), ""]
    else:
        parts += [f"No benchmark results: `{facts.folder}/eval/` holds none. `slmforge eval {facts.folder} --task "
                  "gsm8k --task humaneval --task ppl ...` measures them; run `slmforge card` again afterwards.", ""]
    for r in facts.evals:
        if r["task"] == "samples" and (table := samples_table(r)):
            parts += ["### Samples", "", *table, ""]
    prompt = next((rec.get("prompt") for r in facts.evals if r["task"] == "samples"
                   for rec in r.get("records") or [] if isinstance(rec, dict) and isinstance(rec.get("prompt"), str)),
                  "The")
    parts += ["## How to use", "", *usage_section(facts, targets, prompt, name), "",
              "## Limitations", "", *limitations(facts), "",
              "## About this card", "",
              f"Generated by `slmforge card` from `{facts.folder}` (checkpoint "
              f"`{facts.checkpoint.parent.name}/{facts.checkpoint.name}`). Every figure is read from that folder or "
              "computed from it (parameters and KV cache from the model's config, as `slmforge info` does)"
              + ("; the energy and CO2 figures are estimates from stated assumptions." if report is not None else "."),
              ""]
    return fmt.public_paths("\n".join(parts))


# ----------------------------------------------------------------------------------------------
# writing


def _place(tmp: Path, out: Path, force: bool) -> None:
    """Move the finished `tmp` to `out`: over it only with `force`, else only where nothing is."""
    if force:
        os.replace(tmp, out)
        return
    try:
        os.link(tmp, out)  # fails if `out` exists, even one created since the check
    except FileExistsError:
        raise ValueError(f"{out} exists: pass --force to replace it") from None
    except OSError:  # a filesystem without hard links
        if out.exists():
            raise ValueError(f"{out} exists: pass --force to replace it") from None
        os.replace(tmp, out)
    tmp.unlink(missing_ok=True)


def _draw(facts: RunFacts, tmp: Path) -> tuple[bool, str]:
    """Draw the loss curves into `tmp`: (drawn, why not)."""
    from slmforge.plot import INSTALL_HINT, plot_runs

    if not facts.metrics:
        return False, f"No loss curves: `{facts.folder}/metrics.jsonl` holds no lines."
    try:
        plot_runs([facts.folder], tmp, x="tokens")
    except ValueError as e:
        if str(e) != INSTALL_HINT:
            raise
        return False, f"No loss curves drawn: {INSTALL_HINT}, then run `slmforge card` again."
    return True, ""


def write_card(run: str | Path, out: str | Path | None = None, force: bool = False,
               options: CardOptions | None = None) -> tuple[Path, Path | None]:
    """Write the card of `run` to `out` (default RUN/README.md) and its loss curves beside it as
    `<stem>-loss.png`, each whole or not at all; existing files are replaced only with `force`.
    Returns (card, PNG or None)."""
    options = options or CardOptions()
    facts = read_run(run)
    out = Path(out) if out is not None else Path(run) / "README.md"
    if out.is_dir():
        raise ValueError(f"{out} is a folder; give the name of the Markdown file to write")
    png = out.with_name(f"{out.stem}-loss.png") if facts.report is not None else None
    for path in (out, png):
        if path is not None and path.exists() and not force:
            raise ValueError(f"{path} exists: pass --force to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tag = f"tmp-{os.getpid()}"
    tmp_md, tmp_png = out.with_name(f".{out.name}.{tag}"), png and png.with_name(f".{png.name}.{tag}")
    try:
        drawn, note = _draw(facts, tmp_png) if png is not None else (False, "")
        png = png if drawn else None
        tmp_md.write_text(render_card(facts, options, png.name if png else None, note))
        _place(tmp_md, out, force)
        if png is not None:
            _place(tmp_png, png, force)
    finally:
        tmp_md.unlink(missing_ok=True)
        if tmp_png is not None:
            tmp_png.unlink(missing_ok=True)
    return out, png
