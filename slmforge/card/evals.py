"""The card's evaluation section (every result in RUN/eval/, the samples table) and its known limitations,
each derived from a number the folder holds and quoting it."""

from __future__ import annotations

import math

from slmforge.card import fmt
from slmforge.card.model import tokenizer_kind
from slmforge.card.run import RunFacts, _step_id

RATE_METRICS = {"exact_match", "acc", "acc_norm", "accuracy", "em", "chance"}
SAMPLE_ROWS = 24  # rows of the samples table at most
SAMPLE_CHARS = 240  # characters of a continuation shown
FEW = 20  # fewer examples than this: a score is quoted, but no capability is denied from it


def is_rate(name: str) -> bool:
    return name in RATE_METRICS or name.startswith("pass@")


def metric_value(name: str, value) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return fmt.cell(value, 40)
    if is_rate(name) and 0 <= value <= 1:
        return fmt.percent(value)
    return fmt.number(value)


def _scalar(value) -> bool:
    return value is None or isinstance(value, (str, int, float, bool))


def settings_summary(settings: dict, limit: int = 180) -> str:
    """The settings of a result in one cell: scalars as key=value, short lists joined, longer ones counted."""
    parts = []
    for key, value in (settings or {}).items():
        value = fmt.public_paths(value) if isinstance(value, str) else value
        if _scalar(value):
            parts.append(f"{key}={fmt.cell(value, 48)}")
        elif isinstance(value, list) and len(value) <= 3 and all(_scalar(v) for v in value):
            parts.append(f"{key}={', '.join(fmt.cell(fmt.public_paths(str(v)), 40) for v in value)}")
        elif isinstance(value, (list, dict)):
            parts.append(f"{key}: {len(value)} item{'s' if len(value) != 1 else ''}")
    return fmt.cell("; ".join(parts), limit) or "—"


def _scored_elsewhere(facts: RunFacts, result: dict) -> str:
    """'step_200' when a result scored another checkpoint than the card's, else ''."""
    checkpoint = result.get("checkpoint")
    if not checkpoint or _step_id(checkpoint) == _step_id(facts.checkpoint):
        return ""
    return "/".join(_step_id(checkpoint))


def results_table(facts: RunFacts, results: list[dict]) -> str:
    rows = []
    for r in results:
        elsewhere = _scored_elsewhere(facts, r)
        settings = settings_summary(r.get("settings") or {})
        if elsewhere:
            settings = f"**scored {elsewhere}, not this card's checkpoint**; {settings}"
        for i, (name, value) in enumerate(r["metrics"].items()):
            rows.append([fmt.cell(r["task"]) if i == 0 else "", fmt.cell(name), metric_value(name, value),
                         fmt.count(r["n_examples"]) if i == 0 and isinstance(r.get("n_examples"), int) else "",
                         settings if i == 0 else ""])
    return fmt.table(["Task", "Metric", "Value", "Examples", "Settings"], rows, "llrrl")


def _first(record: dict, keys: tuple[str, ...]):
    return next((record[k] for k in keys if isinstance(record.get(k), str)), None)


def samples_table(result: dict) -> list[str]:
    """The samples result as a Prompt | Output table (the Shard card's), with its sampling settings."""
    rows = []
    for record in result.get("records") or []:
        if not isinstance(record, dict):
            continue
        prompt = _first(record, ("prompt", "input"))
        outputs = record.get("outputs") if isinstance(record.get("outputs"), list) else \
            [_first(record, ("output", "completion", "continuation", "text", "sample"))]
        for output in outputs:
            if prompt is not None and isinstance(output, str):
                rows.append([fmt.code(prompt, 80), fmt.code(output, SAMPLE_CHARS)])
    if not rows:
        return []
    shown = rows[:SAMPLE_ROWS]
    more = f" ({len(rows) - len(shown)} more in eval/{result['task']}.json)" if len(rows) > len(shown) else ""
    return [f"Continuations sampled with {settings_summary(result.get('settings') or {})}{more}; ⏎ marks a "
            "newline, … a cut:", "", fmt.table(["Prompt", "Output"], shown)]


# ----------------------------------------------------------------------------------------------
# limitations


def _metric(result: dict, *names: str):
    for name in names:
        value = result["metrics"].get(name)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
    return None


def _setting(result: dict, *names: str):
    settings = result.get("settings") or {}
    return next((settings[n] for n in names if n in settings), None)


def _where(result: dict, facts: RunFacts) -> str:
    n = result.get("n_examples")
    parts = [f"{n:,} examples" if isinstance(n, int) else ""]
    shots = _setting(result, "shots", "k_shot", "num_fewshot", "fewshot")
    if shots is not None:
        fewer = _setting(result, "fewer_shots")
        parts.append(f"{shots}-shot" + (f"; {fewer:,} prompts kept fewer examples to fit the context"
                                         if isinstance(fewer, int) and fewer and shots else ""))
    elsewhere = _scored_elsewhere(facts, result)
    if elsewhere:
        parts.append(f"scored {elsewhere}")
    return ", ".join(p for p in parts if p)


def _bpb_line(bpb: float, on: str) -> str | None:
    if not math.isfinite(bpb) or bpb <= 1.0:
        return None
    return (f"Predicts {on} weakly: {bpb:.4f} bits per byte (each byte of that text costs it {bpb:.2f} bits, "
            "more than 1; a uniform guess over the 256 byte values costs 8).")


def _as_float(value) -> float:
    """A figure of report.json as a float (non-finite ones are written as strings there)."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _chance(result: dict) -> float | None:
    """Mean chance accuracy of a multiple-choice result, from its records' choices."""
    ks = [len(r["choices"]) if isinstance(r.get("choices"), list) else r.get("n_choices")
          for r in result.get("records") or [] if isinstance(r, dict)]
    ks = [k for k in ks if isinstance(k, int) and k > 0]
    return sum(1 / k for k in ks) / len(ks) if ks else None


def result_limitation(result: dict, facts: RunFacts) -> str | None:
    """A limitation a result shows, or None: only from the numbers it holds."""
    task, where, n = result["task"].lower(), _where(result, facts), result.get("n_examples")
    few = isinstance(n, int) and n < FEW
    if task.startswith("gsm8k"):
        em = _metric(result, "exact_match", "em", "accuracy", next(iter(result["metrics"]), ""))
        if em is None or em >= 0.5:
            return None
        if few:
            return f"GSM8K exact match {fmt.percent(em)} ({where}): too few problems to say more."
        if em == 0:
            return f"Does not do arithmetic: GSM8K exact match {fmt.percent(em)} ({where})."
        if em < 0.1:
            return f"Rarely solves grade-school arithmetic problems: GSM8K exact match {fmt.percent(em)} ({where})."
        return f"Gets most grade-school arithmetic problems wrong: GSM8K exact match {fmt.percent(em)} ({where})."
    if task.startswith("humaneval"):
        p1 = _metric(result, "pass@1")
        if p1 is None or p1 >= 0.5:
            return None
        if few:
            return f"HumanEval pass@1 {fmt.percent(p1)} ({where}): too few problems to say more."
        samples = _setting(result, "n_samples", "samples", "n")
        temperature = _setting(result, "temperature")
        per = f"{samples} sample{'s' if samples != 1 else ''} per problem" if samples else ""
        how = "; ".join(x for x in (where, per,
                                    f"temperature {temperature}" if temperature is not None else "") if x)
        if p1 == 0:
            return f"Does not write working code: HumanEval pass@1 {fmt.percent(p1)} ({how})."
        if p1 < 0.1:
            return f"Rarely writes a Python function that passes its tests: HumanEval pass@1 {fmt.percent(p1)} ({how})."
        return f"Most of the Python functions it writes fail their tests: HumanEval pass@1 {fmt.percent(p1)} ({how})."
    if task.startswith("choice"):
        acc, n = _metric(result, "acc", "accuracy"), result.get("n_examples")
        chance = _metric(result, "chance")
        chance = _chance(result) if chance is None else chance
        if acc is None or chance is None or not isinstance(n, int) or n <= 0:
            return None
        if acc <= chance + 2 * math.sqrt(chance * (1 - chance) / n):
            return (f"Answers the multiple-choice questions of `{result['task']}` no better than chance: accuracy "
                    f"{fmt.percent(acc)} against {fmt.percent(chance)} by guessing ({where}).")
        return None
    if task.startswith("ppl"):
        bpb = _metric(result, "bpb", "bits_per_byte")
        sources, data = _setting(result, "sources", "source"), _setting(result, "data")
        if sources:
            on = f"`{fmt.cell(sources if isinstance(sources, str) else ', '.join(map(str, sources)), 80)}`"
        elif data:
            on = f"the {'validation split' if _setting(result, 'split') == 'val' else 'text'} of `{fmt.cell(data, 80)}`"
        else:
            on = f"the text of `{result['task']}`"
        return _bpb_line(bpb, on) if bpb is not None else None
    return None


def limitations(facts: RunFacts) -> list[str]:
    """Bullets: each limitation the measured numbers show, and the ones the model's shape sets."""
    lines = [line for r in facts.evals if (line := result_limitation(r, facts))]
    report, m = facts.report or {}, facts.config.model
    if not any(r["task"].lower().startswith("ppl") for r in facts.evals) and report.get("val_bpb") is not None:
        line = _bpb_line(_as_float(report["val_bpb"]), "its own validation split")
        if line:
            lines.append(line)
    params = report.get("parameters")
    if params and report.get("tokens") is not None and report["tokens"] / params < 20:
        lines.append(f"Undertrained by the compute-optimal measure: {report['tokens'] / params:.2f} training tokens "
                     "per parameter (Hoffmann et al., 2022, put the compute-optimal ratio near 20).")
    unit = "bytes" if tokenizer_kind(facts.tokenizer)[1] else "tokens"
    context = f"Reads at most {m.max_seq_len:,} {unit} of context"
    windows = [w for w in m.layer_windows() if w is not None] if m.arch != "multiscale" else []
    if windows:
        context += f"; {len(windows)} of its {m.n_layers} layers see only the last {m.sliding_window:,} of them"
    lines.append(context + ".")
    if not facts.evals:
        lines.append(f"No benchmark has been run on it ({facts.folder}/eval/ holds no results), so nothing is "
                     "claimed here about arithmetic, code or knowledge: measure them with `slmforge eval "
                     f"{facts.folder} --task gsm8k --task humaneval --task ppl ...` and generate this card again.")
    return [f"- {line}" for line in lines]
