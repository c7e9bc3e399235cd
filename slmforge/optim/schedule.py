"""Learning-rate schedules as a multiplier of each param group's base lr.

Steps count from 0 and a run takes steps 0 .. total_steps-1. Ramps are symmetric: warmup gives step s the
factor (s+1)/warmup, so step warmup-1 is the first at 1; a decay over D steps gives its k-th step
(k = 1..D) progress k/D, so the last step of the run, total_steps-1, trains at exactly min_lr_ratio.
Warmup and decay may overlap in short runs; the smaller factor wins, so such a run still ramps up and
still ends at min_lr_ratio.
"""

from __future__ import annotations

import math

from slmforge.config import ScheduleConfig


def _decay_value(progress: float, shape: str) -> float:
    """Fraction of the way from 1 down to min_lr_ratio: 1 at progress 0, 0 at progress 1."""
    if shape == "linear":
        return 1.0 - progress
    if shape == "sqrt":  # 1 - sqrt(p): drops fast, then flattens (Hägele et al. 2024)
        return 1.0 - math.sqrt(progress)
    if shape == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown decay shape {shape!r}")


def _decay_steps(total_steps: int, cfg: ScheduleConfig) -> int:
    """Number of steps in the decay ramp (wsd: the last decay_fraction of the run; cosine: all after warmup)."""
    if cfg.name == "wsd":
        return round(cfg.decay_fraction * total_steps)
    if cfg.name == "cosine":
        return max(total_steps - cfg.warmup_steps, 0)
    return 0


def lr_factor(step: int, total_steps: int, cfg: ScheduleConfig) -> float:
    """Multiplier of the base lr at `step` (0-based) of a run of `total_steps` steps."""
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    if cfg.name not in ("wsd", "cosine", "constant"):
        raise ValueError(f"unknown schedule {cfg.name!r}")
    warm = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps > 0 else 1.0
    n_decay = _decay_steps(total_steps, cfg)
    if n_decay == 0:
        return warm
    progress = min(max((step + 1 - (total_steps - n_decay)) / n_decay, 0.0), 1.0)
    shape = cfg.decay_shape if cfg.name == "wsd" else "cosine"
    decayed = cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * _decay_value(progress, shape)
    return min(warm, decayed)
