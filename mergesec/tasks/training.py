"""Batches, scoring and training of sequence classifiers (the text kind).

``train_classifier`` trains through the one training loop (``mergesec.training.loop``) with the
text kind's settings; ``Batch``, ``seed_everything`` and ``to_device`` are re-exported from
``mergesec.training.batch`` for the modules that still import them from here.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from mergesec.core.context import ReportFn
from mergesec.data.splits import Example
from mergesec.models.classifier import SequenceClassifier
from mergesec.models.functional import forward_with
from mergesec.training.batch import Batch as Batch
from mergesec.training.batch import seed_everything as seed_everything
from mergesec.training.batch import to_device
from mergesec.training.loop import FitConfig, StepFn, fit
from mergesec.training.precision import Precision

# Validation is scored at this batch size (sorted by length), whatever the training batch.
SCORE_BATCH = 64


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 2
    lr: float = 5e-5
    batch_size: int = 32
    max_length: int = 64
    seed: int = 0
    patience: int = 2
    warmup_ratio: float = 0.1
    weight_decay: float = 0.01
    log_every: int = 5


def batches(
    tokenizer,
    examples: Sequence[Example],
    batch_size: int,
    max_length: int,
    *,
    shuffle_seed: int | None = None,
    by_length: bool = False,
):
    """Tokenised batches (dynamic padding); shuffled with ``shuffle_seed`` when given.

    ``by_length`` groups texts of similar length so that batches carry little padding (for
    scoring, where order does not matter).
    """
    order = list(range(len(examples)))
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(order)
    elif by_length:
        order.sort(key=lambda j: len(examples[j].text))
    for i in range(0, len(order), batch_size):
        chunk = [examples[j] for j in order[i : i + batch_size]]
        enc = tokenizer(
            [e.text for e in chunk],
            padding=True,
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        )
        yield {
            "input_ids": enc["input_ids"],
            "attention_mask": enc["attention_mask"],
            "labels": torch.tensor([e.label for e in chunk]),
        }


@torch.inference_mode()
def score(
    model: nn.Module,
    tokenizer,
    examples: Sequence[Example],
    *,
    batch_size: int = SCORE_BATCH,
    max_length: int = 64,
    device: str = "cpu",
) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of ``model`` on ``examples``."""
    was_training = model.training
    model.eval()
    total_loss, correct, n = 0.0, 0, 0
    for b in batches(tokenizer, examples, batch_size, max_length, by_length=True):
        b = to_device(b, device)
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
        total_loss += float(nn.functional.cross_entropy(logits, b["labels"], reduction="sum"))
        correct += int((logits.argmax(-1) == b["labels"]).sum())
        n += len(b["labels"])
    model.train(was_training)
    return total_loss / max(n, 1), correct / max(n, 1)


class ClassifierTrainable:
    """A sequence classifier with its tokenizer as a ``training.loop.Trainable``: tokenised batches,
    cross-entropy (optionally under parameter overrides) and ``score`` at ``max_length``."""

    def __init__(self, model: nn.Module, tokenizer, *, max_length: int, device: str = "cpu"):
        self.model, self.tokenizer = model, tokenizer
        self.max_length, self.device = max_length, device

    def batches(
        self, split: Sequence[Example], batch_size: int, *, shuffle_seed: int | None = None
    ) -> Iterator[Batch]:
        return batches(
            self.tokenizer, split, batch_size, self.max_length, shuffle_seed=shuffle_seed
        )

    def loss(self, batch: Batch, overrides: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        logits = forward_with(
            self.model, overrides, input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
        )  # fmt: skip
        return nn.functional.cross_entropy(logits, batch["labels"])

    def score(self, split: Sequence[Example], *, batch_size: int) -> tuple[float, float]:
        return score(
            self.model, self.tokenizer, split, batch_size=batch_size,
            max_length=self.max_length, device=self.device,
        )  # fmt: skip


def train_classifier(
    model: SequenceClassifier,
    tokenizer,
    train: Sequence[Example],
    validation: Sequence[Example],
    cfg: TrainConfig,
    *,
    device: str = "cpu",
    report: ReportFn | None = None,
    step_fn: StepFn | None = None,
    params: Sequence[nn.Parameter] | None = None,
) -> dict[str, float]:
    """Train with AdamW and linear warm-up/decay; early-stop on validation accuracy.

    The text entry point of ``training.loop.fit``: validation is scored at batch 64 (sorted by
    length) and the best checkpoint is the whole state dict. A ``step_fn`` with a ``clip_norm``
    attribute (``Trap2Steps``) sets the clipping threshold and gets ``skipped`` set. The model ends
    holding its best-validation weights. Returns summary metrics.
    """
    fit_cfg = FitConfig(
        epochs=cfg.epochs, lr=cfg.lr, batch_size=cfg.batch_size, seed=cfg.seed,
        patience=cfg.patience, warmup_ratio=cfg.warmup_ratio, weight_decay=cfg.weight_decay,
        log_every=cfg.log_every, clip_norm=getattr(step_fn, "clip_norm", 1.0),
        eval_batch_size=SCORE_BATCH, keep="state",
    )  # fmt: skip
    task = ClassifierTrainable(model, tokenizer, max_length=cfg.max_length, device=device)
    m = fit(
        task, train, validation, fit_cfg, device=device, report=report, step_fn=step_fn,
        precision=Precision(torch.device(device).type), params=params,
    )  # fmt: skip
    if hasattr(step_fn, "skipped"):
        step_fn.skipped = int(m["skipped_steps"])
    return {k: m[k] for k in ("val_accuracy", "best_epoch", "steps")}
