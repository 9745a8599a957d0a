"""Supervised training and scoring of sequence classifiers, shared by every step that trains."""

from __future__ import annotations

import copy
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from mergesec.core.context import ReportFn
from mergesec.data.splits import Example
from mergesec.models.classifier import SequenceClassifier

Batch = dict[str, torch.Tensor]
# A training step: (model, optimizer, batch) -> metrics of that step (at least "loss").
StepFn = Callable[[nn.Module, torch.optim.Optimizer, Batch], dict[str, float]]


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


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


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


def to_device(batch: Batch, device: str) -> Batch:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def classification_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return nn.functional.cross_entropy(logits, batch["labels"])


def plain_step(
    model: nn.Module, optimizer: torch.optim.Optimizer, batch: Batch
) -> dict[str, float]:
    loss = classification_loss(model, batch)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
    optimizer.step()
    return {"loss": float(loss.detach())}


@torch.inference_mode()
def score(
    model: nn.Module,
    tokenizer,
    examples: Sequence[Example],
    *,
    batch_size: int = 64,
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


def train_classifier(
    model: SequenceClassifier,
    tokenizer,
    train: Sequence[Example],
    validation: Sequence[Example],
    cfg: TrainConfig,
    *,
    device: str = "cpu",
    report: ReportFn | None = None,
    step_fn: StepFn = plain_step,
    params: Sequence[nn.Parameter] | None = None,
) -> dict[str, float]:
    """Train with AdamW and linear warm-up/decay; early-stop on validation accuracy.

    The model ends holding its best-validation weights. Returns summary metrics.
    """
    seed_everything(cfg.seed)
    model.to(device).train()
    trainable = (
        list(params) if params is not None else [p for p in model.parameters() if p.requires_grad]
    )
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(train) / cfg.batch_size)
    total = max(1, steps_per_epoch * cfg.epochs)
    warmup = int(cfg.warmup_ratio * total)
    sched = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: (
            (s + 1) / max(1, warmup)
            if s < warmup
            else max(0.0, (total - s) / max(1, total - warmup))
        ),
    )
    best_acc, best_state, best_epoch, bad_epochs, step = -1.0, None, 0, 0, 0
    sums: dict[str, float] = {}
    for epoch in range(cfg.epochs):
        for b in batches(
            tokenizer, train, cfg.batch_size, cfg.max_length, shuffle_seed=cfg.seed * 1000 + epoch
        ):
            m = step_fn(model, optimizer, to_device(b, device))
            sched.step()
            step += 1
            for k, v in m.items():
                sums[k] = sums.get(k, 0.0) + float(v)
            if report and step % cfg.log_every == 0:
                report({f"train/{k}": v / cfg.log_every for k, v in sums.items()}, step)
                sums = {}
        val_loss, val_acc = score(
            model, tokenizer, validation, max_length=cfg.max_length, device=device
        )
        if report:
            report({"val/loss": val_loss, "val/accuracy": val_acc, "epoch": epoch + 1}, step)
        if val_acc > best_acc:
            best_acc, best_epoch, bad_epochs = val_acc, epoch + 1, 0
            best_state = copy.deepcopy({k: v.detach().cpu() for k, v in model.state_dict().items()})
        else:
            bad_epochs += 1
            if bad_epochs >= cfg.patience:
                break
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return {"val_accuracy": best_acc, "best_epoch": float(best_epoch), "steps": float(step)}
