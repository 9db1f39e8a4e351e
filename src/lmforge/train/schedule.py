"""Learning-rate schedules: a linear warmup in steps, then a decay over the run's progress.

Progress is the fraction of the run done: of max_steps, of the time budget, or the larger of the two when
both are set, so a run limited by wall-clock time still ends its decay when its time ends.
"""

from __future__ import annotations

import math

from lmforge.config import OptimConfig


def progress(step: int, elapsed: float, max_steps: int, time_budget: float) -> float:
    fractions = []
    if max_steps:
        fractions.append(step / max_steps)
    if time_budget:
        fractions.append(elapsed / time_budget)
    return min(1.0, max(fractions, default=0.0))


def lr_at(config: OptimConfig, step: int, done: float) -> float:
    """The learning rate for optimizer step `step` (0-based) when a fraction `done` of the run is over."""
    warmup = min(1.0, (step + 1) / config.warmup_steps) if config.warmup_steps else 1.0
    low = config.lr * config.min_lr_ratio
    if config.schedule == "constant":
        factor = config.lr
    elif config.schedule == "linear":
        factor = low + (config.lr - low) * (1.0 - done)
    elif config.schedule == "wsd":  # stable at lr, then a linear decay over the last decay_fraction of the run
        decay_start = 1.0 - config.decay_fraction
        factor = config.lr if done <= decay_start else low + (config.lr - low) * (1.0 - done) / config.decay_fraction
    else:
        factor = low + (config.lr - low) * 0.5 * (1.0 + math.cos(math.pi * done))
    return factor * warmup
