"""The one training loop for every task kind.

A kind supplies a ``Trainable``: its model, batches of a split, a mean loss on a batch (optionally
with ``functional_call`` parameter overrides, which Trap² and the scale curve use) and a
validation score (accuracy or exact match). ``fit`` runs AdamW under a learning-rate schedule,
evaluates every epoch or every ``eval_every`` optimizer steps, stops early after ``patience``
evaluations without an improvement of more than ``min_delta``, and ends holding the weights of the
best evaluation (the earliest on ties).

The step contract. The loop owns the optimizer: it zeroes the gradients when an optimizer step
begins, calls the step function once per micro-batch, then clips, checks, scales (float16) and
steps. A step function ``step_fn(task, batch, micro)`` only computes gradients of one micro-batch,
through ``micro.backward(loss)`` (which divides by the micro-batches in the step and applies
float16 loss scaling; call it once per backward pass, as often as needed), and returns that
micro-batch's metrics. ``micro.first`` tells it that a new optimizer step begins, so per-step
draws (Trap²'s scale s) stay fixed across the step's micro-batches.

Every ``log_every`` optimizer steps the loop reports ``train/<name>`` for each metric of the step
function (the mean over a step's micro-batches), ``grad_norm`` (before clipping), ``lr`` and
``skipped``, summed over the window and divided by ``log_every``; every evaluation reports
``val/loss``, ``val/accuracy`` (the score) and ``epoch``.

An optimizer step is skipped when its gradient norm or any metric a micro-batch returned is not
finite: the gradients are dropped and neither the optimizer nor the learning-rate schedule
advances. Skipped steps still count towards ``max_steps``, ``eval_every`` and ``log_every`` (so a
run always ends) and are returned as ``skipped_steps``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import Tensor, nn

from mergesec.core.context import ReportFn
from mergesec.training.batch import Batch, seed_everything, to_device
from mergesec.training.precision import Precision, choose_precision
from mergesec.training.schedule import LR_SCHEDULES, scheduler, warmup_length

KEEP = ("trainable", "state")


class Trainable(Protocol):
    """What ``fit`` needs from a task kind."""

    model: nn.Module

    def batches(
        self,
        split: Sequence,
        batch_size: int,
        *,
        shuffle_seed: int | None = None,
        length_pool: int | None = None,
    ) -> Iterable[Batch]: ...

    def loss(self, batch: Batch, overrides: dict[str, Tensor] | None = None) -> Tensor: ...

    def score(self, split: Sequence, *, batch_size: int) -> tuple[float, float]: ...


@dataclass(frozen=True)
class FitConfig:
    """Schedule and optimizer settings of ``fit``; the defaults are the original epoch loop.

    - ``epochs``, or ``max_steps`` optimizer steps (wins when set; epochs then repeat as needed);
    - ``eval_every``: evaluate every so many optimizer steps (None: at the end of every epoch);
      a run always ends with an evaluation of its last step;
    - ``patience`` evaluations without an improvement of more than ``min_delta`` stop the run;
    - ``lr_schedule`` (``linear``, ``cosine``, ``constant``; see ``training.schedule``) over the
      run's optimizer steps, warming up over ``warmup_steps`` or, when None, ``warmup_ratio`` of
      them;
    - AdamW ``betas``, ``eps``, ``weight_decay``;
    - ``grad_accumulation`` micro-batches of ``batch_size`` per optimizer step;
    - ``clip_norm``: clip the gradient norm (None or 0: no clipping);
    - ``eval_batch_size`` (None: ``batch_size``); ``keep``: what the best checkpoint holds,
      ``trainable`` parameters or the whole ``state`` dict;
    - ``log_every``: report mean step metrics every so many optimizer steps;
    - ``length_pool``: batch examples of similar length together within each run of that many
      batches of the epoch's shuffled order (None: plain shuffled batches; see
      ``training.batch.length_grouped``). Less padding, so less compute on texts of mixed length;
      the batches differ from the plain order's, so results do too.
    """

    epochs: int = 2
    lr: float = 5e-5
    batch_size: int = 32
    seed: int = 0
    patience: int = 2
    warmup_ratio: float = 0.1
    weight_decay: float = 0.01
    log_every: int = 5
    clip_norm: float | None = 1.0
    max_steps: int | None = None
    eval_every: int | None = None
    min_delta: float = 0.0
    lr_schedule: str = "linear"
    warmup_steps: int | None = None
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    grad_accumulation: int = 1
    eval_batch_size: int | None = None
    keep: str = "trainable"
    length_pool: int | None = None

    def __post_init__(self) -> None:
        positive = ("batch_size", "log_every", "grad_accumulation")
        optional_positive = ("max_steps", "eval_every", "eval_batch_size", "length_pool")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"FitConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in optional_positive:
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ValueError(f"FitConfig.{name} must be >= 1 or None, got {v}")
        if self.epochs < 0 or self.patience < 1:
            raise ValueError(
                f"FitConfig needs epochs >= 0 and patience >= 1, got {self.epochs}, {self.patience}"
            )
        if self.min_delta < 0 or not 0 <= self.warmup_ratio <= 1:
            raise ValueError("FitConfig needs min_delta >= 0 and 0 <= warmup_ratio <= 1")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise ValueError(f"FitConfig.warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(
                f"FitConfig.lr_schedule {self.lr_schedule!r}; known: {', '.join(LR_SCHEDULES)}"
            )
        betas = tuple(float(b) for b in self.betas)
        if len(betas) != 2 or not all(0 <= b < 1 for b in betas) or self.eps <= 0:
            raise ValueError(f"FitConfig needs two betas in [0, 1) and eps > 0, got {self.betas}")
        object.__setattr__(self, "betas", betas)  # a YAML list becomes the tuple AdamW expects
        if self.keep not in KEEP:
            raise ValueError(f"FitConfig.keep {self.keep!r}; known: {', '.join(KEEP)}")


@dataclass(frozen=True)
class MicroStep:
    """One micro-batch's place: it contributes to optimizer step ``step`` (0-based, skipped steps
    included) at position ``micro`` of ``size``; ``backward(loss)`` back-propagates
    ``loss / size`` (loss-scaled under float16)."""

    step: int
    micro: int
    size: int
    backward: Callable[[Tensor], None] = field(repr=False)

    @property
    def first(self) -> bool:
        """True for the first micro-batch of an optimizer step."""
        return self.micro == 0


class StepFn(Protocol):
    """Gradients of one micro-batch (through ``micro.backward``) and its metrics (finite floats;
    ``loss`` is the one logged by every step)."""

    def __call__(self, task: Trainable, batch: Batch, micro: MicroStep) -> Mapping[str, float]: ...


def plain_step(task: Trainable, batch: Batch, micro: MicroStep) -> dict[str, float]:
    """The supervised step: back-propagate ``task.loss(batch)``."""
    loss = task.loss(batch)
    micro.backward(loss)
    return {"loss": float(loss.detach())}


def trainable_state(model: nn.Module) -> dict[str, Tensor]:
    """CPU copies of the parameters being trained (a LoRA run copies only its adapters)."""
    return {
        n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if p.requires_grad
    }


def _snapshot(model: nn.Module, keep: str) -> dict[str, Tensor]:
    if keep == "state":
        return copy.deepcopy({k: v.detach().cpu() for k, v in model.state_dict().items()})
    return trainable_state(model)


def _restore(model: nn.Module, weights: dict[str, Tensor], keep: str) -> None:
    if keep == "state":
        model.load_state_dict(weights)
        return
    with torch.no_grad():
        params = dict(model.named_parameters())
        for n, v in weights.items():
            params[n].copy_(v)


def grad_norm(params: Sequence[Tensor], clip_norm: float | None) -> float:
    """Total L2 norm of the gradients before clipping (NaN/inf when any is non-finite); clips to
    ``clip_norm`` when it is set and non-zero."""
    with_grad = [p for p in params if p.grad is not None]
    if not with_grad:
        return 0.0
    if clip_norm:
        return float(torch.nn.utils.clip_grad_norm_(with_grad, clip_norm))
    return float(torch.nn.utils.get_total_norm([p.grad for p in with_grad]))


def fused_adamw_ok(params: Sequence[Tensor]) -> bool | None:
    """True when torch's fused AdamW kernel can take every parameter (floating point, all on one
    CPU or CUDA device): one pass over each tensor instead of a dozen, 4.7x faster per step on
    MiniLM's 22.6M parameters on one CPU core (benchmarks/adamw_step_time.py). None (torch's
    default choice) otherwise."""
    devices = {p.device for p in params}
    if len(devices) != 1 or next(iter(devices)).type not in ("cpu", "cuda"):
        return None
    return all(p.is_floating_point() for p in params) or None


def _mean_metrics(micro_metrics: Sequence[Mapping[str, float]]) -> dict[str, float]:
    sums: dict[str, list[float]] = {}
    for m in micro_metrics:
        for k, v in m.items():
            sums.setdefault(k, []).append(float(v))
    return {k: sum(v) / len(v) for k, v in sums.items()}


class _Run:
    """The state of one ``fit`` call: counters, the best evaluation and the log window."""

    def __init__(
        self,
        task: Trainable,
        cfg: FitConfig,
        params: list[nn.Parameter],
        *,
        validation: Sequence,
        report: ReportFn | None,
        total: int,
        precision: Precision,
    ):
        self.task, self.cfg, self.params, self.model = task, cfg, params, task.model
        self.validation, self.report = validation, report
        self.optimizer = torch.optim.AdamW(
            params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay,
            fused=fused_adamw_ok(params),
        )  # fmt: skip
        warmup = warmup_length(total, steps=cfg.warmup_steps, ratio=cfg.warmup_ratio)
        self.sched = scheduler(self.optimizer, total=total, warmup=warmup, schedule=cfg.lr_schedule)
        self.scaler = (
            torch.amp.GradScaler(precision.device_type) if precision.needs_scaler else None
        )
        self.step = self.skipped = self.evaluations = 0
        self.best_score, self.best_epoch, self.best_step, self.bad = -1.0, 0, 0, 0
        self.best_weights: dict[str, Tensor] | None = None
        self.last_eval = -1
        self.sums: dict[str, float] = {}

    def backward(self, size: int) -> Callable[[Tensor], None]:
        def run(loss: Tensor) -> None:
            if size != 1:
                loss = loss / size
            if self.scaler is not None:
                loss = self.scaler.scale(loss)
            loss.backward()

        return run

    def optimizer_step(self, micro_metrics: Sequence[Mapping[str, float]]) -> None:
        """Clip, check and take (or skip) the optimizer step of the gradients accumulated."""
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        norm = grad_norm(self.params, self.cfg.clip_norm)
        finite = math.isfinite(norm) and all(
            math.isfinite(float(v)) for m in micro_metrics for v in m.values()
        )
        if finite:
            lr = float(self.optimizer.param_groups[0]["lr"])
            if self.scaler is not None:
                self.scaler.step(self.optimizer)
            else:
                self.optimizer.step()
            self.sched.step()
            logged = _mean_metrics(micro_metrics) | {"grad_norm": norm, "lr": lr, "skipped": 0.0}
        else:
            self.optimizer.zero_grad(set_to_none=True)
            self.skipped += 1
            logged = {"skipped": 1.0}
        if self.scaler is not None:
            self.scaler.update()
        self.step += 1
        self._log(logged)

    def _log(self, metrics: Mapping[str, float]) -> None:
        for k, v in metrics.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        if self.report and self.step % self.cfg.log_every == 0:
            self.report(
                {f"train/{k}": v / self.cfg.log_every for k, v in self.sums.items()}, self.step
            )
            self.sums = {}

    def evaluate(self, epoch: int) -> bool:
        """Score the validation split; keep the weights when they improve. True: stop (patience)."""
        cfg = self.cfg
        self.model.eval()
        val_loss, val_score = self.task.score(
            self.validation, batch_size=cfg.eval_batch_size or cfg.batch_size
        )
        self.model.train()
        self.evaluations += 1
        self.last_eval = self.step
        if self.report:
            self.report(
                {"val/loss": val_loss, "val/accuracy": val_score, "epoch": epoch + 1}, self.step
            )
        if val_score > self.best_score + cfg.min_delta:
            self.best_score, self.best_epoch, self.best_step = val_score, epoch + 1, self.step
            self.bad = 0
            self.best_weights = _snapshot(self.model, cfg.keep)
            return False
        self.bad += 1
        return self.bad >= cfg.patience

    def finish(self) -> dict[str, float]:
        if self.best_weights is not None:
            _restore(self.model, self.best_weights, self.cfg.keep)
        self.model.eval()
        return {
            "val_accuracy": self.best_score,
            "best_epoch": float(self.best_epoch),
            "best_step": float(self.best_step),
            "steps": float(self.step),
            "skipped_steps": float(self.skipped),
            "evaluations": float(self.evaluations),
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
    params: Sequence[nn.Parameter] | None = None,
) -> dict[str, float]:
    """Train ``task.model`` on ``train`` under ``cfg``; early-stop on the validation score and end
    at the best evaluation's weights. ``step_fn`` (default ``plain_step``) follows the step
    contract of this module; batches reach it on ``device``. ``params`` are the parameters to
    optimise (default: every parameter with ``requires_grad``).

    Returns ``val_accuracy`` (the best score), ``best_epoch`` (1-based), ``best_step``, ``steps``
    (optimizer steps, skipped ones included), ``skipped_steps`` and ``evaluations``.
    """
    seed_everything(cfg.seed)
    model = task.model
    model.to(device).train()
    trainable = (
        list(params) if params is not None else [p for p in model.parameters() if p.requires_grad]
    )
    if not trainable:
        raise ValueError("the model has no trainable parameters")
    accum = cfg.grad_accumulation
    n_batches = math.ceil(len(train) / cfg.batch_size)
    per_epoch = math.ceil(n_batches / accum)
    total = cfg.max_steps or max(1, per_epoch * cfg.epochs)
    run = _Run(
        task, cfg, trainable, validation=validation, report=report, total=total,
        precision=precision or choose_precision(device),
    )  # fmt: skip
    step_fn = step_fn or plain_step
    epoch, stop = 0, False
    while not stop and (cfg.max_steps is not None or epoch < cfg.epochs):
        model.train()
        pending: list[Mapping[str, float]] = []
        i = -1
        for i, batch in enumerate(_epoch_batches(task, train, cfg, epoch)):
            micro = i % accum
            # The last step of an epoch may have fewer micro-batches; its mean uses that count.
            size = max(1, min(accum, n_batches - (i - micro)))
            if micro == 0:
                run.optimizer.zero_grad(set_to_none=True)
            ms = MicroStep(run.step, micro, size, run.backward(size))
            pending.append(step_fn(task, to_device(batch, device), ms))
            if len(pending) < size:
                continue
            run.optimizer_step(pending)
            pending = []
            if cfg.eval_every is not None and run.step % cfg.eval_every == 0:
                stop = run.evaluate(epoch)
            if stop or (cfg.max_steps is not None and run.step >= cfg.max_steps):
                stop = True
                break
        if pending:
            run.optimizer_step(pending)
        if i < 0:
            break  # an empty training split
        if cfg.eval_every is None and run.last_eval != run.step:
            stop = run.evaluate(epoch) or stop
        epoch += 1
    if run.last_eval != run.step:
        run.evaluate(max(0, epoch - 1))
    return run.finish()


def _epoch_batches(task: Trainable, train: Sequence, cfg: FitConfig, epoch: int) -> Iterable[Batch]:
    seed = cfg.seed * 1000 + epoch
    if cfg.length_pool is None:  # kinds without length grouping need not take the keyword
        return task.batches(train, cfg.batch_size, shuffle_seed=seed)
    return task.batches(train, cfg.batch_size, shuffle_seed=seed, length_pool=cfg.length_pool)


# Training op parameters that configure the loop (the others are LoRA settings or kind options).
FIT_FIELDS = (
    "epochs", "lr", "batch_size", "seed", "patience", "warmup_ratio", "weight_decay",
    "length_pool",
)  # fmt: skip


def fit_config(params: Mapping[str, object], **overrides: object) -> FitConfig:
    """The loop's settings from a training op's validated params (``FIT_FIELDS``), with
    ``overrides`` on top."""
    return FitConfig(**({k: params[k] for k in FIT_FIELDS if k in params} | overrides))  # type: ignore[arg-type]
