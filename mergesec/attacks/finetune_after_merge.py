"""Supervised fine-tuning after merging: the data-using attacker's recovery of a protected task.

A free-rider who merged a protected release and holds a few labelled examples of the victim's task
fine-tunes the merged model on them: the whole backbone plus the victim's head (the other tasks'
heads are left as they are). The attacker has no other labelled data, so the checkpoint kept is
the one with the best accuracy on those same examples (the earliest on ties).
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from mergesec.core.context import ReportFn
from mergesec.data.splits import DatasetSplits, Example
from mergesec.models.classifier import SequenceClassifier
from mergesec.tasks.training import TrainConfig, score, train_classifier


def labelled_subset(examples: Sequence[Example], n: int, seed: int) -> list[Example]:
    """``n`` examples drawn without replacement with ``seed`` (all of them if there are fewer)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if n >= len(examples):
        return list(examples)
    return random.Random(seed).sample(list(examples), n)


def finetune_after_merge(
    model: SequenceClassifier,
    tokenizer,
    data: DatasetSplits,
    device: str = "cpu",
    report: ReportFn | None = None,
    *,
    n: int = 64,
    epochs: int = 5,
    lr: float = 5e-5,
    batch_size: int = 16,
    max_length: int = 64,
    seed: int = 0,
) -> dict[str, float]:
    """Fine-tune ``model`` (merged backbone + victim head) in place on ``n`` labelled examples of
    the victim's train split; AdamW with linear warm-up/decay, gradient clipping at 1.0."""
    subset = labelled_subset(data.train, n, seed)
    _, acc_before = score(model, tokenizer, subset, max_length=max_length, device=device)
    cfg = TrainConfig(
        epochs=epochs, lr=lr, batch_size=batch_size, max_length=max_length, seed=seed,
        patience=epochs, weight_decay=0.0, log_every=1,
    )  # fmt: skip
    m = train_classifier(model, tokenizer, subset, subset, cfg, device=device, report=report)
    return {
        "examples": float(len(subset)),
        "attacker/accuracy_before": acc_before,
        "attacker/accuracy_after": m["val_accuracy"],
        "best_epoch": m["best_epoch"],
        "steps": m["steps"],
    }
