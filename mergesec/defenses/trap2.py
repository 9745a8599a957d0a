"""Trap²: a training-time protection that makes a released update brittle under rescaling.

Merging operators combine updates as W₀ + Σᵢ sᵢ·ΔWᵢ, so they move each update away from scale 1.
Trap² fine-tunes with

    J(ΔW) = L(W₀ + ΔW) − λ · w(s) · L(W₀ + s·ΔW),   s ~ U[s_min, s_max] \\ (1−δ, 1+δ)

so the task loss stays low at s = 1 and rises at every other scale. For LoRA the scaled update is
obtained by multiplying only the B matrices by s; for full fine-tuning by W₀ + s·(W − W₀) on every
trained parameter. Both use ``torch.func.functional_call`` overrides of the live parameters, so no
second model object exists and gradients of both passes reach the live parameters.

The forward contract used throughout is ``forward_loss(overrides, batch) -> scalar loss``: run the
model on ``batch`` at its live parameters when ``overrides`` is None, otherwise with those
parameters replaced (``models.functional.forward_with`` does exactly that), and return the mean
task loss.

``trap2_backward`` computes one batch's gradient of J; ``Trap2Steps`` is the step function of the
training loop (``mergesec.training.loop``), with one s per optimizer step; ``trap2_step`` is a
self-contained optimizer step for use outside the loop.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from mergesec.core.bounds import (
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    Probability,
    Seed,
)
from mergesec.core.context import ReportFn
from mergesec.core.protocols import Splits, TaskModel
from mergesec.core.registry import TRAINS, register_op
from mergesec.training.batch import Batch
from mergesec.training.loop import MicroStep, Trainable, fit, fit_config, grad_norm
from mergesec.training.lora import attach_lora

Overrides = dict[str, Tensor]
ForwardLoss = Callable[[Overrides | None, Any], Tensor]
Mode = Literal["full", "lora"]
WeightKind = Literal["inv", "inv_sqrt", "none"]

MODES: tuple[str, ...] = ("full", "lora")
WEIGHT_KINDS: tuple[str, ...] = ("inv", "inv_sqrt", "none")
# peft names the B factor of a LoRA layer `lora_B` (linear/conv) or `lora_embedding_B` (embeddings).
LORA_B_MARKERS: tuple[str, ...] = (".lora_B.", ".lora_embedding_B.")


def sample_scale(
    generator: torch.Generator, *, s_min: float = 0.05, s_max: float = 2.0, delta: float = 0.05
) -> float:
    """Draw s ~ Uniform[s_min, s_max], rejecting draws in the open band (1 − delta, 1 + delta)."""
    if not s_min < s_max:
        raise ValueError(f"need s_min < s_max, got {s_min} and {s_max}")
    if delta < 0:
        raise ValueError(f"delta must be >= 0, got {delta}")
    if s_min >= 1 - delta and s_max <= 1 + delta:
        raise ValueError(f"[{s_min}, {s_max}] lies inside the excluded band (1 ± {delta})")
    while True:
        u = torch.rand((), generator=generator, dtype=torch.float64).item()
        s = s_min + (s_max - s_min) * u
        if not (1 - delta < s < 1 + delta):
            return s


def scale_weight(s: float, kind: str) -> float:
    """w(s): ``inv`` = 1/s (equalises gradient size across scales), ``inv_sqrt`` = 1/√s, ``none`` = 1."""
    if kind == "none":
        return 1.0
    if kind not in WEIGHT_KINDS:
        raise ValueError(f"unknown weight {kind!r}; known: {', '.join(WEIGHT_KINDS)}")
    if s <= 0:
        raise ValueError(f"weight {kind!r} needs s > 0, got {s}")
    return 1.0 / s if kind == "inv" else 1.0 / math.sqrt(s)


def is_lora_b(name: str) -> bool:
    """True for a peft LoRA B factor (``...lora_B.<adapter>.weight`` or ``lora_embedding_B``)."""
    return any(m in f".{name}." for m in LORA_B_MARKERS)


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; known: {', '.join(MODES)}")


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Name -> parameter for every parameter with ``requires_grad``."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def base_params_of(model: nn.Module, mode: str) -> dict[str, Tensor]:
    """Snapshot W₀ for the scaled pass: detached clones of every trainable parameter (full mode).

    Call it before training starts. LoRA mode needs no snapshot (W₀ is the frozen base inside the
    model and ΔW is scaled through B), so it returns an empty dict.
    """
    _check_mode(mode)
    if mode == "lora":
        return {}
    return {n: p.detach().clone() for n, p in trainable_parameters(model).items()}


def scaled_overrides(
    model: nn.Module, base_params: Mapping[str, Tensor] | None, s: float, *, mode: str
) -> Overrides:
    """Parameter overrides that place the model's update at scale s, differentiable in the live params.

    full: ``W₀ + s·(W − W₀)`` for every parameter named in ``base_params`` (W live, W₀ detached);
    trainable parameters absent from ``base_params`` (e.g. a task head the merge never touches) stay
    live. lora: ``s·B`` for every trainable LoRA B factor; ``base_params`` is ignored.
    """
    _check_mode(mode)
    params = dict(model.named_parameters())
    if mode == "lora":
        out = {n: p * s for n, p in params.items() if p.requires_grad and is_lora_b(n)}
        if not out:
            raise ValueError(
                "lora mode found no trainable LoRA B parameters (`lora_B` in the name)"
            )
        return out
    if not base_params:
        raise ValueError("full mode needs base_params (see base_params_of)")
    unknown = [n for n in base_params if n not in params]
    if unknown:
        raise KeyError(f"base_params names no parameter of the model: {unknown[:5]}")
    # lerp(W₀, W, s) = W₀ + s·(W − W₀) in one kernel; W₀ is detached so only W gets gradient.
    return {n: torch.lerp(b.detach(), params[n], s) for n, b in base_params.items()}


@dataclass(frozen=True)
class RngState:
    """The CPU RNG state and, when CUDA is initialised, the state of every CUDA device."""

    cpu: Tensor
    cuda: tuple[Tensor, ...] | None = None

    @classmethod
    def capture(cls) -> RngState:
        cuda = None
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            cuda = tuple(torch.cuda.get_rng_state_all())
        return cls(torch.get_rng_state(), cuda)

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(list(self.cuda))


@dataclass(frozen=True)
class Trap2Loss:
    """The Trap² objective; ``total`` carries the graph for one backward pass."""

    total: Tensor
    clean: Tensor
    scaled: Tensor
    s: float
    weight: float


def trap2_loss(
    model: nn.Module,
    batch: Any,
    loss_fn: ForwardLoss,
    base_params: Mapping[str, Tensor] | None,
    *,
    s: float,
    lam: float,
    weight: str = "inv",
    mode: str = "full",
    rng_state: RngState | None = None,
) -> Trap2Loss:
    """L_clean − lam·w(s)·L_scaled on one batch, both passes under identical dropout randomness.

    ``loss_fn(overrides, batch)`` follows the module's forward contract. The RNG state (``rng_state``
    when given, else the current one) is set before the clean pass and restored before the scaled
    pass, so dropout masks match; afterwards the RNG has advanced as after one forward pass.
    """
    w = scale_weight(s, weight)
    state = rng_state if rng_state is not None else RngState.capture()
    state.restore()
    clean = loss_fn(None, batch)
    state.restore()
    scaled = loss_fn(scaled_overrides(model, base_params, s, mode=mode), batch)
    return Trap2Loss(total=clean - lam * w * scaled, clean=clean, scaled=scaled, s=s, weight=w)


@dataclass(frozen=True)
class Trap2Grads:
    """The losses of one Trap² backward (floats); the gradients are in the parameters' ``.grad``."""

    s: float
    clean: float
    scaled: float
    total: float


def trap2_backward(
    model: nn.Module,
    batch: Any,
    forward_loss: ForwardLoss,
    base_params: Mapping[str, Tensor] | None,
    *,
    s: float,
    lam: float,
    weight: str = "inv",
    mode: str = "full",
    backward: Callable[[Tensor], None] = Tensor.backward,
) -> Trap2Grads:
    """Accumulate the gradient of J = L_clean − lam·w(s)·L_scaled on ``batch`` at scale ``s``.

    The clean loss is back-propagated (through ``backward``) before the scaled pass is built, so
    only one pass's activations are alive at a time; the accumulated gradient equals that of
    ``trap2_loss(...).total``. Both passes see the same dropout randomness. ``lam = 0`` is plain
    fine-tuning (the scaled pass runs without a graph, so its loss is still reported).
    """
    w = scale_weight(s, weight)
    state = RngState.capture()
    clean = forward_loss(None, batch)
    backward(clean)
    state.restore()
    with torch.set_grad_enabled(lam != 0 and torch.is_grad_enabled()):
        scaled = forward_loss(scaled_overrides(model, base_params, s, mode=mode), batch)
    if scaled.requires_grad:
        backward(-lam * w * scaled)
    clean_f, scaled_f = float(clean.detach()), float(scaled.detach())
    return Trap2Grads(s=s, clean=clean_f, scaled=scaled_f, total=clean_f - lam * w * scaled_f)


@dataclass(frozen=True)
class StepResult:
    """What one Trap² step did; losses are floats, ``skipped`` means no optimiser step was taken."""

    s: float
    clean: float
    scaled: float
    total: float
    skipped: bool
    grad_norm: float


def trap2_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: Any,
    forward_loss: ForwardLoss,
    base_params: Mapping[str, Tensor] | None,
    *,
    generator: torch.Generator,
    lam: float,
    weight: str = "inv",
    mode: str = "full",
    s_min: float = 0.05,
    s_max: float = 2.0,
    delta: float = 0.05,
    clip_norm: float | None = 1.0,
) -> StepResult:
    """One optimisation step on the Trap² objective with a freshly sampled scale, outside the
    training loop (benchmarks, tests).

    Gradients come from ``trap2_backward`` and are clipped to ``clip_norm`` (None: no clipping).
    A non-finite loss or gradient zeroes the gradients and skips the optimiser step.
    """
    s = sample_scale(generator, s_min=s_min, s_max=s_max, delta=delta)
    optimizer.zero_grad(set_to_none=True)
    g = trap2_backward(
        model, batch, forward_loss, base_params, s=s, lam=lam, weight=weight, mode=mode
    )
    norm = grad_norm(list(trainable_parameters(model).values()), clip_norm)
    skipped = not (math.isfinite(g.clean) and math.isfinite(g.scaled) and math.isfinite(norm))
    if skipped:
        optimizer.zero_grad(set_to_none=True)
    else:
        optimizer.step()
    return StepResult(
        s=s, clean=g.clean, scaled=g.scaled, total=g.total, skipped=skipped, grad_norm=norm
    )


def check_trap2_settings(s_min: float, s_max: float, delta: float, weight: str) -> None:
    """``ValueError`` for settings that ``sample_scale``/``scale_weight`` would refuse mid-run."""
    if not 0 < s_min < s_max:
        raise ValueError(f"need 0 < s_min < s_max, got s_min={s_min}, s_max={s_max}")
    if delta < 0:
        raise ValueError(f"delta must be >= 0, got {delta}")
    if s_min >= 1 - delta and s_max <= 1 + delta:
        raise ValueError(f"[{s_min}, {s_max}] lies inside the excluded band 1 ± {delta}")
    if weight not in WEIGHT_KINDS:
        raise ValueError(f"unknown weight {weight!r}; known: {', '.join(WEIGHT_KINDS)}")


class Trap2Steps:
    """The training loop's step function for Trap² (see ``mergesec.training.loop``): every
    optimizer step draws one s from its own seeded generator, kept for all of that step's
    micro-batches, and each micro-batch back-propagates J at that s.

    ``clip_norm`` is the op's clipping threshold, for the loop's ``FitConfig.clip_norm`` (the loop
    clips); ``skipped`` is set by the callers from the loop's ``skipped_steps``.
    """

    def __init__(
        self,
        forward_loss: ForwardLoss,
        base: Mapping[str, Tensor] | None,
        *,
        mode: str,
        lam: float,
        s_min: float,
        s_max: float,
        delta: float,
        weight: str,
        clip_norm: float | None,
        seed: int,
    ):
        check_trap2_settings(s_min, s_max, delta, weight)
        _check_mode(mode)
        self.forward_loss, self.base, self.mode = forward_loss, base, mode
        self.lam, self.weight = lam, weight
        self.range = dict(s_min=s_min, s_max=s_max, delta=delta)
        self.clip_norm = clip_norm
        self.generator = torch.Generator().manual_seed(seed)
        self.s: float | None = None
        self.skipped = 0

    def __call__(self, task: Trainable, batch: Batch, micro: MicroStep) -> dict[str, float]:
        if micro.first or self.s is None:
            self.s = sample_scale(self.generator, **self.range)
        g = trap2_backward(
            task.model, batch, self.forward_loss, self.base, s=self.s, lam=self.lam,
            weight=self.weight, mode=self.mode, backward=micro.backward,
        )  # fmt: skip
        return {"loss": g.clean, "scaled_loss": g.scaled, "objective": g.total, "s": g.s}


# ---- the protect/trap2 op --------------------------------------------------------------------


def trap2_mode(finetune: Mapping[str, Any]) -> str:
    """The release mode of a Trap² node (its study's finetune mode): ``full`` or ``lora``."""
    mode = finetune.get("mode", "full")
    if mode not in MODES:
        raise ValueError(f"protect/trap2 trains full or lora releases, not finetune mode {mode!r}")
    return mode


def backbone_snapshot(task: TaskModel) -> dict[str, Tensor]:
    """W₀ for the full-mode scaled pass: detached clones of the trainable backbone parameters
    (names as in ``task.model``). A head outside the backbone is left out on purpose: the released
    task vector is the backbone's, and merging rescales only that (each expert keeps its own head),
    so the head must learn to read the backbone at s = 1, not to be brittle itself."""
    return {
        n: p.detach().clone()
        for n, p in task.model.named_parameters()
        if p.requires_grad and n.startswith(task.backbone_prefix)
    }


def head_parameters(task: TaskModel) -> dict[str, nn.Parameter]:
    """Trainable parameters of ``task.model`` outside its backbone module (a text kind's linear
    head). The merge never rescales them, so the scaled pass holds them at their current values:
    the −λ·w(s)·L_scaled term must not train the head to read a rescaled backbone (the paper's
    heads are frozen zero-shot heads)."""
    inside = {id(p) for p in task.backbone().parameters()}
    return {
        n: p for n, p in task.model.named_parameters() if p.requires_grad and id(p) not in inside
    }


def scaled_pass_loss(task: TaskModel) -> ForwardLoss:
    """``forward_loss`` for Trap² on ``task``: the clean pass as is; in the scaled pass the
    parameters of ``head_parameters`` are detached (their gradient comes from the clean loss
    only)."""
    head = head_parameters(task)

    def forward_loss(overrides: Overrides | None, batch: Any) -> Tensor:
        if overrides is not None and head:
            overrides = {n: p.detach() for n, p in head.items()} | overrides
        return task.loss(batch, overrides)

    return forward_loss


def resolve_weight(weight: str, task: TaskModel) -> str:
    """``auto``: w(s) = 1/√s (``inv_sqrt``) for causal LMs, as Trap²'s released LLM script, and
    1/s (``inv``) for every other model, as its vision scripts; other values pass through."""
    if weight != "auto":
        return weight
    from mergesec.kinds.qa.task import QATask

    return "inv_sqrt" if isinstance(task, QATask) else "inv"


LrSchedule = Literal["linear", "cosine", "constant"]

# Version 1's schedule as explicit settings: the study's epochs, evaluation once per epoch, linear
# warm-up (warmup_ratio) and decay, torch's AdamW defaults, w(s) = 1/s. For short CPU runs and for
# reproducing version-1 releases (which also took ``patience`` and ``weight_decay`` from the
# finetune settings: pass those too).
EPOCH_SCHEDULE: dict[str, Any] = {
    "max_steps": None,
    "eval_every": None,
    "min_delta": 0.0,
    "lr_schedule": "linear",
    "warmup_steps": None,
    "betas": (0.9, 0.999),
    "eps": 1e-8,
    "weight": "inv",
}


# Version 2: the released training schedule and optimiser became the defaults (step-based cosine
# schedule, evaluation every 2,000 steps, patience 5, min delta 0.001, AdamW (0.9, 0.98), eps
# 1e-6, weight decay 0), w(s) = 1/√s for causal LMs, and the head is detached in the scaled pass.
@register_op("protect", "trap2", version="2", traits=(TRAINS,))
def protect_trap2(
    task: TaskModel,
    data: Splits,
    finetune: dict[str, Any],
    device: str = "cpu",
    report: ReportFn | None = None,
    *,
    lam: NonNegativeFloat = 0.005,
    s_min: PositiveFloat = 0.05,
    s_max: PositiveFloat = 2.0,
    delta: NonNegativeFloat = 0.05,
    weight: Literal["auto", "inv", "inv_sqrt", "none"] = "auto",
    clip_norm: PositiveFloat = 1.0,
    seed: Seed = 0,
    max_steps: PositiveInt | None = 100_000,
    eval_every: PositiveInt | None = 2000,
    patience: PositiveInt = 5,
    min_delta: NonNegativeFloat = 0.001,
    lr_schedule: LrSchedule = "cosine",
    warmup_steps: NonNegativeInt | None = 500,
    betas: tuple[Probability, Probability] = (0.9, 0.98),
    eps: PositiveFloat = 1e-6,
    weight_decay: NonNegativeFloat = 0.0,
    grad_accumulation: PositiveInt = 1,
    lr: PositiveFloat | None = None,
) -> dict[str, float]:
    """Trap² (Jang et al., ICML 2026): fine-tune from the base so the update breaks when rescaled.

    Minimises L(W₀+ΔW) − lam·w(s)·L(W₀+s·ΔW) with one s per optimizer step (kept across its
    ``grad_accumulation`` micro-batches) drawn from U[s_min, s_max] outside (1−delta, 1+delta);
    w(s) is 1/s (``inv``), 1/√s (``inv_sqrt``), 1 (``none``) or, with ``auto``, 1/√s for causal
    LMs and 1/s otherwise. A head outside the backbone is detached in the scaled pass.

    The schedule and optimiser are this op's parameters, and the defaults are the released
    code's: ``max_steps`` 1e5 optimizer steps under a ``cosine`` schedule with ``warmup_steps``
    500 (almost constant over a real run), evaluation every ``eval_every`` 2,000 steps, early
    stopping after ``patience`` 5 evaluations without a gain above ``min_delta`` 0.001 (so at
    least 12k steps), AdamW ``betas`` (0.9, 0.98), ``eps`` 1e-6, ``weight_decay`` 0. From the
    study's ``finetune`` settings it takes the model (mode, LoRA settings), ``lr`` (unless ``lr``
    is set here), ``batch_size``, ``length_pool`` and its seed, plus ``epochs`` when
    ``max_steps`` is None (evaluation per epoch when ``eval_every`` is None) and ``warmup_ratio``
    when ``warmup_steps`` is None; the finetune's ``patience`` and ``weight_decay`` are not used.
    Short schedules for CPU studies are set here, explicitly. ``seed`` drives the draws of s only. Gradients are clipped to
    ``clip_norm``; steps with a non-finite loss or gradient are skipped and counted. Works for
    every task kind.
    """
    mode = trap2_mode(finetune)
    if lr is not None:
        finetune = {**finetune, "lr": lr}
    if mode == "lora":
        attach_lora(task, finetune)
    task.model.to(device)
    base = backbone_snapshot(task) if mode == "full" else None
    step = Trap2Steps(
        scaled_pass_loss(task), base, mode=mode, lam=lam, s_min=s_min, s_max=s_max, delta=delta,
        weight=resolve_weight(weight, task), clip_norm=clip_norm, seed=seed,
    )  # fmt: skip
    schedule = dict(
        max_steps=max_steps, eval_every=eval_every, patience=patience, min_delta=min_delta,
        lr_schedule=lr_schedule, warmup_steps=warmup_steps, betas=betas, eps=eps,
        weight_decay=weight_decay, grad_accumulation=grad_accumulation,
    )  # fmt: skip
    cfg = fit_config(
        finetune, clip_norm=clip_norm, eval_batch_size=task.eval_batch_size, **schedule
    )
    metrics = fit(task, data.train, data.validation, cfg, device=device, report=report,
                  step_fn=step, precision=task.precision)  # fmt: skip
    return metrics
