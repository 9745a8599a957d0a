"""Learning-rate schedules as pure multipliers of the base rate, by optimizer step.

Every schedule warms up linearly over ``warmup`` steps, as ``(step + 1) / warmup`` (the first step
already trains), and then follows its shape until ``total`` steps:

- ``linear``: ``(total − step) / (total − warmup)``, reaching 0 at ``total``;
- ``cosine``: ``½·(1 + cos(π·(step − warmup) / (total − warmup)))``, 0 at ``total`` and after;
- ``constant``: 1.
"""

from __future__ import annotations

import math
from functools import partial

import torch

LR_SCHEDULES: tuple[str, ...] = ("linear", "cosine", "constant")


def lr_factor(step: int, *, total: int, warmup: int, schedule: str = "linear") -> float:
    """The multiplier of the base learning rate at optimizer step ``step`` (0-based)."""
    if step < warmup:
        return (step + 1) / max(1, warmup)
    if schedule == "linear":
        return max(0.0, (total - step) / max(1, total - warmup))
    if schedule == "cosine":
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "constant":
        return 1.0
    raise ValueError(f"unknown lr_schedule {schedule!r}; known: {', '.join(LR_SCHEDULES)}")


def warmup_length(total: int, *, steps: int | None, ratio: float) -> int:
    """Warm-up steps: ``steps`` when given, else ``int(ratio · total)``."""
    return steps if steps is not None else int(ratio * total)


def scheduler(
    optimizer: torch.optim.Optimizer, *, total: int, warmup: int, schedule: str
) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` over ``lr_factor``; call its ``step()`` once per optimizer step taken."""
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"unknown lr_schedule {schedule!r}; known: {', '.join(LR_SCHEDULES)}")
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, partial(lr_factor, total=total, warmup=warmup, schedule=schedule)
    )
