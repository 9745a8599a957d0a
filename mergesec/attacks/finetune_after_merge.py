"""Supervised fine-tuning after merging: the data-using attacker's recovery of a protected task.

A free-rider who merged a protected release and holds a few labelled examples of the victim's task
fine-tunes the merged model on them: the whole backbone plus the victim's head where the kind
trains heads (the other tasks' heads are left as they are). The attacker has no other labelled
data, so the checkpoint kept is the one with the best score on those same examples (the earliest
on ties). Works for every task kind through ``TaskModel``.
"""

from __future__ import annotations

from mergesec.core.bounds import PositiveFloat, PositiveInt, Seed, TokenLength
from mergesec.core.context import ReportFn
from mergesec.core.protocols import Splits, TaskModel
from mergesec.training.loop import FitConfig, fit
from mergesec.training.sampling import fixed_subset

EVAL_BATCH = 64


def finetune_after_merge(
    task: TaskModel,
    data: Splits,
    device: str = "cpu",
    report: ReportFn | None = None,
    *,
    n: PositiveInt = 64,
    epochs: PositiveInt = 5,
    lr: PositiveFloat = 5e-5,
    batch_size: PositiveInt = 16,
    max_length: TokenLength = 64,
    seed: Seed = 0,
) -> dict[str, float]:
    """Fine-tune ``task`` (merged backbone + victim head) in place on ``n`` labelled examples of
    the victim's train split; AdamW with linear warm-up/decay, gradient clipping at 1.0.
    ``max_length`` is the text kind's truncation length."""
    subset = fixed_subset(data.train, n, seed=seed)
    _, before = task.score(subset, batch_size=EVAL_BATCH)
    cfg = FitConfig(
        epochs=epochs, lr=lr, batch_size=batch_size, seed=seed, patience=epochs,
        weight_decay=0.0, log_every=1, eval_batch_size=task.eval_batch_size,
    )  # fmt: skip
    m = fit(task, subset, subset, cfg, device=device, report=report, precision=task.precision)
    return {
        "examples": float(len(subset)),
        "attacker/accuracy_before": before,
        "attacker/accuracy_after": m["val_accuracy"],
        "best_epoch": m["best_epoch"],
        "steps": m["steps"],
    }
