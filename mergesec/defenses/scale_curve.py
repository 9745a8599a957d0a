"""Loss and accuracy along the scaling direction of an update: the diagnostic Trap² is built to move.

A Trap²-protected update has a sharp minimum at scale 1 and a high loss elsewhere; a plain
fine-tuned update degrades smoothly as it is scaled towards the base. ``scale_curve`` sweeps the
scale through ``functional_call`` overrides of the live model (no copy) and ``curve_sharpness``
reduces the sweep to a few scalars worth logging.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Literal

import numpy as np
import torch
from torch import Tensor, nn

from mergesec.defenses.trap2 import scaled_overrides

EvaluateFn = Callable[[dict[str, Tensor] | None], tuple[float, float]]


def default_scales() -> list[float]:
    """s = −0.5, −0.4, …, 2.0 (the sweep of the reference implementation)."""
    return [round(float(s), 6) for s in torch.arange(-0.5, 2.01, 0.1, dtype=torch.float64)]


def scale_curve(
    model: nn.Module,
    reference: Mapping[str, Tensor] | None,
    evaluate_fn: EvaluateFn,
    scales: Sequence[float] | Tensor | None = None,
    *,
    mode: Literal["full", "lora"] = "full",
    reference_kind: Literal["base", "task_vector"] = "base",
) -> list[dict[str, float]]:
    """Evaluate the model with its update at each scale; one ``{s, loss, accuracy}`` dict per scale.

    ``evaluate_fn(overrides)`` must evaluate the same model with ``overrides`` replacing parameters
    (None: live parameters; see ``models.functional.forward_with``) and return ``(loss, accuracy)``.

    full, ``reference_kind="base"``: the live model is the fine-tuned W and ``reference`` holds W₀;
    evaluates W₀ + s·(W − W₀). full, ``"task_vector"``: the live model is the base W₀ and
    ``reference`` holds τ; evaluates W₀ + s·τ. lora: scales every LoRA B factor by s;
    ``reference`` is ignored. The model is put in eval mode for the sweep and restored afterwards;
    scales are rounded to 6 decimals so that a float grid still hits s = 1 exactly.
    """
    grid = default_scales() if scales is None else [round(float(s), 6) for s in scales]
    if reference_kind not in ("base", "task_vector"):
        raise ValueError(f"unknown reference_kind {reference_kind!r}; known: base, task_vector")
    was_training = model.training
    model.eval()
    curve: list[dict[str, float]] = []
    try:
        with torch.no_grad():
            for s in grid:
                overrides = _overrides_at(model, reference, s, mode, reference_kind)
                loss, acc = evaluate_fn(overrides)
                curve.append({"s": s, "loss": float(loss), "accuracy": float(acc)})
    finally:
        model.train(was_training)
    return curve


def _overrides_at(
    model: nn.Module,
    reference: Mapping[str, Tensor] | None,
    s: float,
    mode: str,
    reference_kind: str,
) -> dict[str, Tensor]:
    if mode == "lora" or reference_kind == "base":
        return scaled_overrides(model, reference, s, mode=mode)
    if not reference:
        raise ValueError("task_vector reference is empty")
    live = dict(model.named_parameters()) | dict(model.named_buffers())
    unknown = [n for n in reference if n not in live]
    if unknown:
        raise KeyError(f"task vector names no parameter or buffer of the model: {unknown[:5]}")
    return {n: live[n] + s * tau.to(live[n]) for n, tau in reference.items()}


def interpolate(curve: Sequence[Mapping[str, float]], key: str, s: float) -> float:
    """Linear interpolation of ``key`` at scale s; NaN outside the swept range."""
    pts = sorted((float(p["s"]), float(p[key])) for p in curve)
    xs = np.array([x for x, _ in pts])
    ys = np.array([y for _, y in pts])
    if len(xs) == 0 or s < xs[0] - 1e-9 or s > xs[-1] + 1e-9:
        return float("nan")
    return float(np.interp(s, xs, ys))


def curve_sharpness(
    curve: Sequence[Mapping[str, float]], *, off_margin: float = 0.25
) -> dict[str, float]:
    """Scalars that summarise how sharp the minimum at s = 1 is.

    - ``loss_s1`` / ``acc_s1``: loss and accuracy at s = 1 (interpolated if 1 was not swept);
    - ``min_loss_off`` and ``s_min_loss_off``: the lowest loss among swept scales with
      |s − 1| ≥ ``off_margin`` and where it occurs;
    - ``off_to_nominal``: ``min_loss_off / loss_s1`` (large for a protected update);
    - ``s_argmin``: the swept scale of lowest loss (1 for a sharp minimum at the nominal scale);
    - ``loss_s0.5``, ``loss_s0.25``, and ``acc_drop_s0.5``, ``acc_drop_s0.25``: accuracy at s = 1
      minus accuracy at s = 0.5 and s = 0.25 (what averaging two or four updates does to one).
    """
    if not curve:
        raise ValueError("empty curve")
    loss1 = interpolate(curve, "loss", 1.0)
    acc1 = interpolate(curve, "accuracy", 1.0)
    off = [p for p in curve if abs(float(p["s"]) - 1.0) >= off_margin - 1e-9]
    best_off = min(off, key=lambda p: float(p["loss"])) if off else None
    min_off = float(best_off["loss"]) if best_off else float("nan")
    argmin = min(curve, key=lambda p: float(p["loss"]))
    out = {
        "loss_s1": loss1,
        "acc_s1": acc1,
        "min_loss_off": min_off,
        "s_min_loss_off": float(best_off["s"]) if best_off else float("nan"),
        "off_to_nominal": min_off / loss1 if loss1 != 0 else float("inf"),
        "s_argmin": float(argmin["s"]),
    }
    for s in (0.5, 0.25):
        out[f"loss_s{s}"] = interpolate(curve, "loss", s)
        out[f"acc_drop_s{s}"] = acc1 - interpolate(curve, "accuracy", s)
    return out
