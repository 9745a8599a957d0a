"""The image and QA kinds' former training loop, now ``mergesec.training``: this module re-exports
the names the kinds import from it and keeps ``fit``'s former result."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from mergesec.core.context import ReportFn
from mergesec.training import loop
from mergesec.training.batch import chunks as chunks
from mergesec.training.batch import shuffled as shuffled
from mergesec.training.loop import FitConfig as FitConfig
from mergesec.training.loop import StepFn
from mergesec.training.loop import Trainable as Trainable
from mergesec.training.loop import trainable_state as trainable_state
from mergesec.training.precision import PRECISIONS as PRECISIONS
from mergesec.training.precision import Precision as Precision
from mergesec.training.precision import choose_precision as choose_precision
from mergesec.training.precision import data_workers as data_workers


def fit(
    task: Trainable,
    train: Sequence,
    validation: Sequence,
    cfg: FitConfig,
    *,
    device: str = "cpu",
    report: ReportFn | None = None,
    step_fn: StepFn | None = None,
    precision: Precision | None = None,
) -> dict[str, float]:
    """``training.loop.fit`` returning ``val_accuracy``, ``best_epoch`` and ``steps``. A
    ``step_fn`` with a ``clip_norm`` attribute (``Trap2Steps``) sets the clipping threshold and
    gets ``skipped`` set."""
    if hasattr(step_fn, "clip_norm"):
        cfg = dataclasses.replace(cfg, clip_norm=step_fn.clip_norm)
    m = loop.fit(
        task, train, validation, cfg, device=device, report=report, step_fn=step_fn,
        precision=precision,
    )  # fmt: skip
    if hasattr(step_fn, "skipped"):
        step_fn.skipped = int(m["skipped_steps"])
    return {k: m[k] for k in ("val_accuracy", "best_epoch", "steps")}
