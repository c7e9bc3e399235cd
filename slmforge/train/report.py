"""RUN/report.json: a run's final figures, per phase and overall, from the metrics lines of all its sessions
(so a resumed run reports its whole history, not only the last session's steps)."""

from __future__ import annotations

from pathlib import Path


def phase_report(lines: list[dict], name: str, steps: int, checkpoint: str) -> dict:
    """A phase's figures from its metrics lines (over every session of the run): the validation loss at
    step 0 and at its last step, its last training loss, and time and tokens/s inside optimizer steps."""
    step_lines = [line for line in lines if line.get("phase") == name and "val_loss" not in line]
    vals = {line["step"]: line for line in lines if line.get("phase") == name and "val_loss" in line}
    train_s = sum(line.get("dt", 0.0) for line in step_lines)
    tokens = sum(line.get("tokens_per_s", 0.0) * line.get("dt", 0.0) for line in step_lines)
    end = vals.get(steps, {})
    figures = {k: v for k, v in end.items() if k.startswith("val_")}  # preference data adds reward figures
    return {"name": name, "steps": steps, "final_loss": step_lines[-1]["loss"] if step_lines else None,
            "start_val_loss": vals.get(0, {}).get("val_loss"), "val_loss": None, "val_bpb": None, "val_ppl": None,
            **figures, "train_s": train_s, "tokens_per_s": tokens / train_s if train_s else None,
            "checkpoint": checkpoint}


def run_report(out: Path, phases: list, lines: list[dict], progress, facts: dict) -> dict:
    """The report of run folder `out`: each phase's figures, the last phase's validation figures as the
    run's, tokens seen and skipped steps from `progress`, and the session `facts` (device, dtype, ...)."""
    reports = [phase_report(lines, p.name, p.steps, str(out / p.name / f"step_{p.steps}")) for p in phases]
    final, train_s = reports[-1], sum(p["train_s"] for p in reports)
    tokens_trained = sum(p["tokens_per_s"] * p["train_s"] for p in reports if p["tokens_per_s"])
    return {
        "run_dir": str(out),
        "checkpoint": final["checkpoint"],
        "phases": reports,
        "tokens": progress.tokens,
        **{k: v for k, v in final.items() if k.startswith("val_")},
        "skipped_steps": progress.skipped_steps,
        "best_val_loss": progress.best_val_loss,
        **facts,
        "train_s": train_s,
        "tokens_per_s": tokens_trained / train_s if train_s else None,
    }
