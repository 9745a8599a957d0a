"""The training loop and run-time precision shared by the image (``mergesec.vision``) and causal-LM
(``mergesec.lm``) task kinds.

A kind supplies a ``Trainable``: its model, batches of a split, a mean loss on a batch (optionally
with ``functional_call`` parameter overrides, which Trap² and the scale curve use) and a validation
score. ``fit`` runs AdamW with linear warm-up and decay, gradient clipping, optional mixed
precision, and early stopping on the validation score, ending at the best checkpoint.

Precision is chosen at run time: ``MERGESEC_PRECISION`` (``auto``, ``fp32``, ``bf16``, ``fp16``)
or, by default (``auto``), bfloat16 autocast on a CUDA device that supports it, float16 autocast
(with loss scaling) on an older CUDA device, and float32 on the CPU. Weights stay in float32.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor, nn

from mergesec.core.context import ReportFn

Batch = dict[str, torch.Tensor]
# A training step: (model, optimizer, batch) -> metrics of that step (at least "loss").
StepFn = Callable[[nn.Module, torch.optim.Optimizer, Batch], dict[str, float]]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def to_device(batch: Batch, device: str) -> Batch:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


PRECISIONS = ("auto", "fp32", "bf16", "fp16")


@dataclass(frozen=True)
class Precision:
    """How forward passes run: ``dtype`` None is float32; else autocast to ``dtype``."""

    device_type: str
    dtype: torch.dtype | None = None

    @property
    def name(self) -> str:
        return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.dtype]

    @property
    def needs_scaler(self) -> bool:
        return self.dtype is torch.float16

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)


def choose_precision(device: str, requested: str | None = None) -> Precision:
    """The precision for ``device``: ``requested`` or ``$MERGESEC_PRECISION`` or ``auto``."""
    req = (requested or os.environ.get("MERGESEC_PRECISION") or "auto").lower()
    if req not in PRECISIONS:
        raise ValueError(f"unknown precision {req!r}; known: {', '.join(PRECISIONS)}")
    device_type = torch.device(device).type
    if req == "fp32":
        return Precision(device_type)
    if req == "auto":
        if device_type != "cuda":
            return Precision(device_type)
        req = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return Precision(device_type, torch.bfloat16 if req == "bf16" else torch.float16)


def data_workers(device: str) -> int:
    """DataLoader workers for preprocessing: ``$MERGESEC_DATA_WORKERS``, else 4 on CUDA (bounded by
    the CPUs this process may use) and 0 on the CPU, where the model needs every core."""
    env = os.environ.get("MERGESEC_DATA_WORKERS")
    if env:
        return max(0, int(env))
    if torch.device(device).type != "cuda":
        return 0
    return min(4, max(0, len(os.sched_getaffinity(0)) - 1))


class Trainable(Protocol):
    """What ``fit`` needs from a task kind."""

    model: nn.Module

    def batches(
        self, split: Sequence, batch_size: int, *, shuffle_seed: int | None = None
    ) -> Iterable[Batch]: ...

    def loss(self, batch: Batch, overrides: dict[str, Tensor] | None = None) -> Tensor: ...

    def score(self, split: Sequence, *, batch_size: int) -> tuple[float, float]: ...


@dataclass(frozen=True)
class FitConfig:
    epochs: int = 2
    lr: float = 5e-5
    batch_size: int = 32
    seed: int = 0
    patience: int = 2
    warmup_ratio: float = 0.1
    weight_decay: float = 0.01
    log_every: int = 5
    clip_norm: float = 1.0


def shuffled(n: int, seed: int | None) -> list[int]:
    order = list(range(n))
    if seed is not None:
        random.Random(seed).shuffle(order)
    return order


def chunks(order: Sequence[int], size: int) -> Iterator[list[int]]:
    for i in range(0, len(order), size):
        yield list(order[i : i + size])


def linear_schedule(optimizer: torch.optim.Optimizer, total: int, warmup: int):
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: (
            (s + 1) / max(1, warmup)
            if s < warmup
            else max(0.0, (total - s) / max(1, total - warmup))
        ),
    )


def _plain_step(
    task: Trainable, scaler: Any, clip_norm: float
) -> Callable[[nn.Module, torch.optim.Optimizer, Batch], dict[str, float]]:
    def step(model: nn.Module, optimizer: torch.optim.Optimizer, batch: Batch) -> dict[str, float]:
        loss = task.loss(batch)
        optimizer.zero_grad(set_to_none=True)
        params = [p for p in model.parameters() if p.requires_grad]
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, clip_norm)
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, clip_norm)
            optimizer.step()
        return {"loss": float(loss.detach())}

    return step


def trainable_state(model: nn.Module) -> dict[str, Tensor]:
    """CPU copies of the parameters being trained (a LoRA run copies only its adapters)."""
    return {
        n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if p.requires_grad
    }


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
    """Train ``task.model`` on ``train``; early-stop on the validation score (accuracy or exact
    match), keeping the best epoch's weights (the earliest on ties). Returns summary metrics.

    ``step_fn`` replaces the plain step (e.g. a Trap² step); it is called with batches already on
    ``device``. With a float16 precision the plain step scales the loss; a custom step runs as it
    is (use bfloat16 or float32 for custom steps).
    """
    seed_everything(cfg.seed)
    model = task.model
    model.to(device).train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("the model has no trainable parameters")
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
    total = max(1, math.ceil(len(train) / cfg.batch_size) * cfg.epochs)
    sched = linear_schedule(optimizer, total, int(cfg.warmup_ratio * total))
    precision = precision or choose_precision(device)
    scaler = (
        torch.amp.GradScaler(precision.device_type)
        if precision.needs_scaler and step_fn is None
        else None
    )
    step = step_fn or _plain_step(task, scaler, cfg.clip_norm)
    best_score, best_state, best_epoch, bad, n_steps = -1.0, None, 0, 0, 0
    sums: dict[str, float] = {}
    for epoch in range(cfg.epochs):
        model.train()
        for batch in task.batches(train, cfg.batch_size, shuffle_seed=cfg.seed * 1000 + epoch):
            m = step(model, optimizer, to_device(batch, device))
            sched.step()
            n_steps += 1
            for k, v in m.items():
                sums[k] = sums.get(k, 0.0) + float(v)
            if report and n_steps % cfg.log_every == 0:
                report({f"train/{k}": v / cfg.log_every for k, v in sums.items()}, n_steps)
                sums = {}
        model.eval()
        val_loss, val_score = task.score(validation, batch_size=cfg.batch_size)
        if report:
            report({"val/loss": val_loss, "val/accuracy": val_score, "epoch": epoch + 1}, n_steps)
        if val_score > best_score:
            best_score, best_epoch, bad = val_score, epoch + 1, 0
            best_state = trainable_state(model)
        else:
            bad += 1
            if bad >= cfg.patience:
                break
    if best_state is not None:
        with torch.no_grad():
            params = dict(model.named_parameters())
            for n, v in best_state.items():
                params[n].copy_(v)
    model.eval()
    return {"val_accuracy": best_score, "best_epoch": float(best_epoch), "steps": float(n_steps)}
