"""The sentinels of a healthy run: steps skipped for a non-finite loss or gradient, and Muon matrices
whose rank collapses."""

from __future__ import annotations

from collections.abc import Callable

from slmforge.config import PhaseConfig, RunConfig
from slmforge.optim import smallest_singular_ratios
from slmforge.train.errors import TrainingError
from slmforge.train.setup import phase_key


def check_skips(progress, record: dict, cfg: RunConfig, phase: PhaseConfig, step: int,
                log: Callable[[str], None]) -> None:
    """Count a skipped step in `progress` (a trainer's Progress), and stop the run with advice after
    train.max_bad_steps skipped in a row."""
    p, limit = progress, cfg.train.max_bad_steps
    if not record["skipped"]:
        p.consecutive_skips = 0
        return
    p.consecutive_skips += 1
    p.skipped_steps += 1
    log(f"{phase.name} step {step}: non-finite loss {record['loss']} or grad norm {record['grad_norm']}; "
        f"optimizer step skipped ({p.consecutive_skips} in a row, limit train.max_bad_steps={limit})")
    if p.consecutive_skips >= limit:
        optim = phase_key(cfg, p.phase_index, "optim")
        raise TrainingError(
            f"training stopped: {p.consecutive_skips} optimizer steps in a row had a non-finite loss or gradient "
            f"norm (phase '{phase.name}', step {step}). Try a lower learning rate ({optim}.lr / {optim}.muon_lr), "
            f"a longer warmup (schedule.warmup_steps), gradient clipping ({optim}.grad_clip=1.0), "
            f"train.dtype=fp32 or a larger train.z_loss; then start again with --fresh, or --resume from the "
            f"last checkpoint."
        )


def rank_check(record: dict, optimizers: list, warn_ratio: float, log: Callable[[str], None]) -> None:
    """The rank-collapse sentinel: record the smallest sigma_min / sigma_max of the Muon matrices, and warn
    of those below `warn_ratio` (train.rank_warn_ratio)."""
    ratios = smallest_singular_ratios(optimizers)
    if not ratios:
        return
    record["min_singular_ratio"] = min(ratios.values())
    low = {name: r for name, r in ratios.items() if r < warn_ratio}
    if low:
        record["rank_warnings"] = low
        log(f"rank warning: {len(low)} matrices below sigma_min/sigma_max={warn_ratio}: "
            + ", ".join(f"{n}={r:.2e}" for n, r in sorted(low.items(), key=lambda kv: kv[1])[:5]))
