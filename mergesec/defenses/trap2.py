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
parameters replaced (``forward_with`` does exactly that), and return the mean task loss.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.func import functional_call

Overrides = dict[str, Tensor]
ForwardLoss = Callable[[Overrides | None, Any], Tensor]
Mode = Literal["full", "lora"]
WeightKind = Literal["inv", "inv_sqrt", "none"]

MODES: tuple[str, ...] = ("full", "lora")
WEIGHT_KINDS: tuple[str, ...] = ("inv", "inv_sqrt", "none")
# peft names the B factor of a LoRA layer `lora_B` (linear/conv) or `lora_embedding_B` (embeddings).
LORA_B_MARKERS: tuple[str, ...] = (".lora_B.", ".lora_embedding_B.")


def forward_with(model: nn.Module, overrides: Mapping[str, Tensor] | None, /, *args, **kwargs):
    """Call ``model(*args, **kwargs)``, with ``overrides`` replacing parameters when given.

    Parameters and buffers not named in ``overrides`` keep their live values.
    """
    if overrides is None:
        return model(*args, **kwargs)
    return functional_call(model, dict(overrides), args, kwargs, strict=False)


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
    """One optimisation step on the Trap² objective with a freshly sampled scale.

    The clean loss is back-propagated before the scaled pass is built, so only one pass's activations
    are alive at a time; the accumulated gradient equals that of ``trap2_loss(...).total``. Gradients
    are clipped to ``clip_norm`` (None: no clipping). A non-finite loss or gradient zeroes the
    gradients and skips the optimiser step. ``lam = 0`` is plain fine-tuning (the scaled pass is
    still run, without a graph, so the scaled loss is reported).
    """
    s = sample_scale(generator, s_min=s_min, s_max=s_max, delta=delta)
    w = scale_weight(s, weight)
    params = list(trainable_parameters(model).values())
    optimizer.zero_grad(set_to_none=True)

    state = RngState.capture()
    clean = forward_loss(None, batch)
    clean.backward()
    state.restore()
    with torch.set_grad_enabled(lam != 0 and torch.is_grad_enabled()):
        scaled = forward_loss(scaled_overrides(model, base_params, s, mode=mode), batch)
    if scaled.requires_grad:
        (-lam * w * scaled).backward()

    clean_f, scaled_f = float(clean.detach()), float(scaled.detach())
    total_f = clean_f - lam * w * scaled_f
    norm = float(_grad_norm(params, clip_norm))
    skipped = not (math.isfinite(clean_f) and math.isfinite(scaled_f) and math.isfinite(norm))
    if skipped:
        optimizer.zero_grad(set_to_none=True)
    else:
        optimizer.step()
    return StepResult(
        s=s, clean=clean_f, scaled=scaled_f, total=total_f, skipped=skipped, grad_norm=norm
    )


def _grad_norm(params: Iterable[Tensor], clip_norm: float | None) -> Tensor:
    # Total L2 norm of the gradients: NaN/inf when any gradient is non-finite.
    params = [p for p in params if p.grad is not None]
    if not params:
        return torch.tensor(0.0)
    if clip_norm is None:
        return torch.nn.utils.get_total_norm([p.grad for p in params])
    return torch.nn.utils.clip_grad_norm_(params, clip_norm)
