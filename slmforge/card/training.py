"""The card's training, data and energy sections: config.json (optimizer, schedule, phases), report.json
(tokens, hardware, times, final figures), metrics.jsonl (tokens per phase) and the data folder's meta.json
(sources, token counts, mixture)."""

from __future__ import annotations

from dataclasses import dataclass

from slmforge.card import fmt
from slmforge.card.run import RunFacts, phase_tokens
from slmforge.config import OptimConfig, PhaseConfig, ScheduleConfig

CPU_WATTS = 65.0  # a desktop CPU's package power: the CPU's model and TDP are not recorded in a run
GPU_WATTS = 300.0  # per GPU, a data-centre card under training load
CARBON_INTENSITY = 400.0  # gCO2 per kWh: about the world's average electricity


# ----------------------------------------------------------------------------------------------
# optimizer, schedule, loss


def _one_optimizer(name: str, o: OptimConfig) -> str:
    if name == "adamw":
        return (f"AdamW (lr {o.lr:g}, betas {o.betas[0]:g}/{o.betas[1]:g}, eps {o.eps:g}, weight decay "
                f"{o.weight_decay:g})")
    if name == "lion":
        return f"Lion (lr {o.lr:g}, betas {o.lion_betas[0]:g}/{o.lion_betas[1]:g}, weight decay {o.weight_decay:g})"
    if name == "sgd":
        return (f"SGD (lr {o.lr:g}, momentum {o.sgd_momentum:g}{', Nesterov' if o.sgd_nesterov else ''}, "
                f"L2 weight decay {o.weight_decay:g})")
    return name


def optimizer_text(o: OptimConfig, tied: bool) -> str:
    if o.name == "muon":
        rest = "embeddings, norms and biases" if tied else "embeddings, the output head, norms and biases"
        text = (f"Muon (lr {o.muon_lr:g}, momentum {o.muon_momentum:g}{', Nesterov' if o.muon_nesterov else ''}, "
                f"{o.muon_ns_steps} Newton–Schulz steps, weight decay {o.muon_weight_decay:g}) on hidden weight "
                f"matrices; {_one_optimizer(o.others, o)} on {rest}")
    else:
        text = f"{_one_optimizer(o.name, o)} on every weight"
    return text + (f"; gradient norm clipped at {o.grad_clip:g}" if o.grad_clip else "; no gradient clipping")


def optimizer_names(o: OptimConfig) -> list[str]:
    return ["muon", o.others] if o.name == "muon" else [o.name]


def schedule_text(s: ScheduleConfig, steps: int) -> str:
    warm = f"linear warmup over {s.warmup_steps} steps" if s.warmup_steps else "no warmup"
    floor = f"{s.min_lr_ratio:g}x the peak"
    if s.name == "wsd":
        shape = "1-√" if s.decay_shape == "sqrt" else "linear"
        decay = round(s.decay_fraction * steps)
        return (f"WSD: {warm}, constant, then a {shape} decay over the last {decay} of {steps} steps "
                f"({s.decay_fraction:.0%}) to {floor}")
    if s.name == "cosine":
        return f"cosine: {warm}, then a cosine decay to {floor} at step {steps}"
    if s.name == "constant":
        return f"constant, {warm}"
    return s.name


def loss_text(facts: RunFacts) -> str:
    m, t = facts.config.model, facts.config.train
    parts = ["next-token cross-entropy"]
    if t.z_loss:
        parts.append(f"z-loss x {t.z_loss:g}")
    if m.mtp_depth:
        parts.append(f"{t.mtp_weight:g} x the mean multi-token-prediction loss ({m.mtp_depth} "
                     f"module{'s' if m.mtp_depth > 1 else ''})")
    if m.ffn == "moe" and m.moe.balance_loss:
        parts.append(f"expert balance loss x {m.moe.balance_loss:g}")
    return " + ".join(parts)


def _per_phase(phases: list[PhaseConfig], text) -> str:
    """One text when every phase shares it, else 'phase: text' for each."""
    texts = [text(p) for p in phases]
    if len(set(texts)) == 1:
        return texts[0]
    return "<br>".join(f"**{p.name}**: {t}" for p, t in zip(phases, texts))


# ----------------------------------------------------------------------------------------------
# data


def _mixture(meta: dict, phase: PhaseConfig) -> dict[str, float]:
    """Share of training windows each source gets in `phase`, as the loader draws them: the folder's weights
    with the phase's data.weights over them; sources of weight 0 or too short for one window are left out."""
    sources = meta.get("sources") or {}
    weights = {name: float(s.get("weight", 1.0)) for name, s in sources.items()}
    weights.update({name: float(w) for name, w in (phase.data.weights or {}).items() if name in weights})
    weights = {name: w for name, w in weights.items()
               if w > 0 and sources[name].get("train_tokens", 0) >= phase.data.seq_len + 1}
    total = sum(weights.values())
    return {name: w / total for name, w in weights.items()} if total else {}


def data_section(facts: RunFacts) -> list[str]:
    phases = facts.config.run_phases()
    tokens = phase_tokens(facts)
    out = []
    for dataset in facts.datasets.values():
        users = [p for p in phases if p.data.path == dataset.path]
        out.append(f"Data folder `{dataset.path}`, prepared by `slmforge data prepare` (manifest: {dataset.where}).")
        if dataset.meta is None:
            weights = {p.name: p.data.weights for p in users if p.data.weights}
            if weights:
                out.append("Mixture weights set by the run: "
                           + "; ".join(f"{name}: {w}" for name, w in weights.items()) + ".")
            continue
        sources = dataset.meta.get("sources") or {}
        rows = []
        for name, s in sources.items():
            n_tokens = s.get("train_tokens", 0) + s.get("val_tokens", 0)
            where = fmt.code(s.get("paths")) + (f" (fields {'+'.join(s['fields'])})" if s.get("fields")
                                                       not in (None, ["text"]) else "")
            if s.get("val_paths"):
                where += f"; validation: all of {fmt.code(s['val_paths'])}"
            rows.append([fmt.cell(name), where, fmt.count(s.get("documents", 0)),
                         fmt.count(s.get("train_tokens", 0)), fmt.count(s.get("val_tokens", 0)),
                         f"{s.get('bytes', 0) / max(n_tokens, 1):.2f}"])
        out += ["", fmt.table(["Source", "Read from", "Documents", "Train tokens", "Val tokens", "Bytes/token"],
                              rows, "llrrrr")]
        mix_rows = []
        for p in users:
            for name, share in _mixture(dataset.meta, p).items():
                drawn = share * tokens.get(p.name, 0)
                train_tokens = sources[name].get("train_tokens", 0)
                mix_rows.append([p.name, fmt.cell(name), fmt.percent(share), fmt.count(drawn),
                                 f"{drawn / train_tokens:.2f}" if train_tokens else "—"])
        rows = ("Training windows are drawn" if dataset.meta.get("kind", "text") == "text"
                else "Whole conversations fill the training rows")
        out += ["", f"{rows} from the sources by these shares (the folder's weights, with the "
                "phase's `data.weights` over them); tokens and epochs per source are the shares' expectation:",
                "", fmt.table(["Phase", "Source", "Share", "Tokens drawn (≈)", "Epochs (≈)"], mix_rows, "llrrr")]
    if not facts.datasets:
        out.append("The run names no data folder (`data.path`), so its data is not known.")
    return out


# ----------------------------------------------------------------------------------------------
# procedure


def wall_time(report: dict) -> tuple[float, str]:
    """(seconds, what they are): the wall time of the session that wrote report.json, or the time inside
    optimizer steps over every session when that is longer (a resumed run)."""
    elapsed, steps = report.get("elapsed_s"), report.get("train_s") or 0.0
    if elapsed is not None and elapsed >= steps:
        return float(elapsed), "wall time of the training command (report.json `elapsed_s`)"
    return float(steps), ("time inside optimizer steps over every session (report.json `train_s`; the run was "
                          "resumed, and `elapsed_s` covers only its last session)")


def hardware_text(report: dict, short: bool = False) -> str:
    """What report.json records of the hardware: the device kind, processes and CPU threads."""
    device, world = str(report.get("device", "unknown")), int(report.get("world_size", 1))
    unknown = "" if short else " (its model is not recorded)"
    if device.startswith("cuda"):
        return f"{world} CUDA GPU{'s' if world > 1 else ''}{unknown}"
    if device == "cpu":
        threads = report.get("threads")
        text = "a CPU" + (f"{' with' if short else ','} {threads} thread{'s' if threads != 1 else ''}" if threads
                          else "") + unknown
        return text + (f", {world} processes (DDP)" if world > 1 else "")
    return f"{device} x {world}"


def procedure_section(facts: RunFacts) -> list[str]:
    cfg, report = facts.config, facts.report
    phases = cfg.run_phases()
    tokens = phase_tokens(facts)
    world = int(report.get("world_size", 1))
    by_name = {p.get("name"): p for p in report.get("phases", []) if isinstance(p, dict)}
    total_params = report.get("parameters")

    def val(p: dict, key: str) -> str:
        return fmt.number(p[key]) if isinstance(p.get(key), (int, float)) else "—"

    rows = []
    for phase in phases:
        r = by_name.get(phase.name, {})
        batch = f"{phase.data.batch_size * cfg.train.grad_accum * world} x {phase.data.seq_len}"
        start = f"{val(r, 'start_val_loss')} → " if r.get("start_val_loss") is not None else ""
        rows.append([phase.name, fmt.count(phase.steps), fmt.count(tokens.get(phase.name, 0)), batch,
                     start + val(r, "val_loss"), val(r, "val_bpb"),
                     fmt.duration(r["train_s"]) if r.get("train_s") else "—",
                     fmt.count(r["tokens_per_s"]) if r.get("tokens_per_s") else "—"])
    init = (f"the weights of `{cfg.train.init}` (`train.init`)" if cfg.train.init
            else f"random (from scratch), seed {cfg.train.seed}")
    seconds, _ = wall_time(report)
    props = [
        ("Tokens seen", fmt.count_human(report["tokens"])
         + (f": {report['tokens'] / total_params:.2f} per parameter" if total_params else "")),
        ("Initialisation", init),
        ("Objective", loss_text(facts)),
        ("Optimizer", _per_phase(phases, lambda p: optimizer_text(p.optim, cfg.model.tie_embeddings))),
        ("Schedule", _per_phase(phases, lambda p: schedule_text(p.schedule, p.steps))),
        ("Batch", f"{cfg.train.grad_accum} micro-batch{'es' if cfg.train.grad_accum > 1 else ''} per step x "
                  f"{world} process{'es' if world > 1 else ''}; sequences x tokens in the table below"),
        ("Precision", f"{report.get('dtype', 'unknown')}: {report.get('dtype_reason', 'reason not recorded')}"),
        ("Hardware", hardware_text(report)),
        ("Wall time", fmt.duration(seconds) + (f"; {fmt.duration(report['train_s'])} inside optimizer steps"
                                              if report.get("train_s") else "")),
        ("Throughput", f"{fmt.count(report['tokens_per_s'])} tokens/s inside optimizer steps"
         if report.get("tokens_per_s") else "not recorded"),
        ("Skipped steps", f"{report.get('skipped_steps', 0)} (non-finite loss or gradient)"),
    ]
    if report.get("val_loss") is not None:
        props.append(("Final validation", f"loss {fmt.number(report['val_loss'])} nats/token, perplexity "
                      f"{fmt.number(report.get('val_ppl'), 2)}, {fmt.number(report['val_bpb'])} bits per byte"))
    if report.get("recipe"):
        props.append(("Recipe", f"`{report['recipe']}`{' (full size)' if report.get('full_size') else ''}"
                      + (f": {fmt.cell(report['card'])}" if report.get("card") else "")))
    return [fmt.properties(props), "",
            fmt.table(["Phase", "Steps", "Tokens", "Batch (seqs x tokens)", "Val loss", "Val bits/byte",
                       "Time in steps", "Tokens/s"], rows, "lrrlrrrr")]


# ----------------------------------------------------------------------------------------------
# energy


@dataclass
class Energy:
    seconds: float
    seconds_source: str
    watts: float
    watts_source: str
    intensity: float  # gCO2 / kWh
    intensity_source: str

    @property
    def kwh(self) -> float:
        return self.seconds / 3600 * self.watts / 1000

    @property
    def grams(self) -> float:
        return self.kwh * self.intensity


def energy(report: dict, watts: float | None = None, intensity: float | None = None) -> Energy:
    seconds, source = wall_time(report)
    if watts is None:
        world = int(report.get("world_size", 1))
        if str(report.get("device", "")).startswith("cuda"):
            watts, why = GPU_WATTS * world, (f"the default for a GPU run, {GPU_WATTS:g} W per GPU x {world} (the GPU "
                                            "model is not recorded)")
        else:
            watts, why = CPU_WATTS, ("the default for a CPU run, a desktop CPU's package power (the CPU's model and "
                                     "TDP are not recorded)")
    else:
        why = "given with `--power-watts`"
    if intensity is None:
        intensity, why_i = CARBON_INTENSITY, "the default, about the world's average electricity"
    else:
        why_i = "given with `--carbon-intensity`"
    return Energy(seconds, source, float(watts), why, float(intensity), why_i)


def energy_section(e: Energy) -> list[str]:
    grams = e.grams
    co2 = f"{fmt.significant(grams)} g CO2" if grams < 1000 else f"{fmt.significant(grams / 1000)} kg CO2"
    rows = [
        ("Time (measured)", f"{fmt.significant(e.seconds / 3600)} h ({fmt.duration(e.seconds)}): {e.seconds_source}"),
        ("Power (assumed)", f"{e.watts:g} W: {e.watts_source}"),
        ("Energy (estimate)", f"{fmt.significant(e.kwh)} kWh"),
        ("Carbon intensity (assumed)", f"{e.intensity:g} gCO2/kWh: {e.intensity_source}"),
        ("CO2 emitted (estimate)", co2),
    ]
    return ["An estimate, not a measurement: the measured time x an assumed power draw x an assumed carbon "
            "intensity (`slmforge card --power-watts W --carbon-intensity G` replaces either). Tokenizer training, "
            "data preparation and `slmforge eval` runs are not counted.", "", fmt.properties(rows)]
