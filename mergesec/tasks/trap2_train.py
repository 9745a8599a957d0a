"""Trap² as a protect op: train the victim's release from the base with the scaling-sensitive loss.

``protect/trap2`` has the trait ``trains``: its node takes no upstream expert. It fine-tunes the
base on the victim's dataset exactly as ``finetune/<mode>`` would (same data, seed, schedule,
early stopping and checkpoint selection on clean validation accuracy), with every step replaced
by a Trap² step (see ``mergesec.defenses.trap2``):

    J = L(W₀ + ΔW) − λ · w(s) · L(W₀ + s·ΔW),   one s per step

The scaled pass runs through ``functional_call`` overrides of the live parameters, so there is no
second model object; full mode keeps one detached snapshot of the backbone's W₀.

What is scaled:

- ``mode: full``: every trainable *backbone* parameter, ``W₀ + s·(W − W₀)``. The task head stays
  at its live value in the scaled pass: the released task vector is the backbone's, and merging
  rescales only that (each expert keeps its own head in a merged model), so the head must learn to
  read the backbone at s = 1, not to be brittle itself.
- ``mode: lora``: the peft LoRA B factors only (``s·B`` gives ``W₀ + s·(α/r)·BA``); the release is
  the adapter, materialised for merging like ``finetune/lora``.

With ``lam = 0`` a Trap² run takes the same optimiser steps as the matching ``finetune`` run.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import Tensor, nn

from mergesec.core.context import ReportFn
from mergesec.core.protocols import Splits, TaskModel
from mergesec.core.registry import register_op
from mergesec.defenses.trap2 import trap2_step
from mergesec.tasks.finetune import attach_lora, fit_config
from mergesec.tasks.protect import execute_training_protection
from mergesec.vision.loop import Batch, Precision, fit


def check_trap2_settings(s_min: float, s_max: float, delta: float, weight: str) -> None:
    """``ValueError`` for settings that ``sample_scale``/``scale_weight`` would refuse mid-run."""
    if not 0 < s_min < s_max:
        raise ValueError(f"need 0 < s_min < s_max, got s_min={s_min}, s_max={s_max}")
    if delta < 0:
        raise ValueError(f"delta must be >= 0, got {delta}")
    if s_min >= 1 - delta and s_max <= 1 + delta:
        raise ValueError(f"[{s_min}, {s_max}] lies inside the excluded band 1 ± {delta}")
    if weight not in ("inv", "inv_sqrt", "none"):
        raise ValueError(f"unknown weight {weight!r}; known: inv, inv_sqrt, none")


def trap2_mode(finetune: dict[str, Any]) -> str:
    """The release mode of a Trap² node (its study's finetune mode): ``full`` or ``lora``."""
    mode = finetune.get("mode", "full")
    if mode not in ("full", "lora"):
        raise ValueError(f"protect/trap2 trains full or lora releases, not finetune mode {mode!r}")
    return mode


def backbone_snapshot(task: TaskModel) -> dict[str, Tensor]:
    """W₀ for the full-mode scaled pass: detached clones of the trainable backbone parameters
    (names as in ``task.model``); a head outside the backbone is left out on purpose."""
    return {
        n: p.detach().clone()
        for n, p in task.model.named_parameters()
        if p.requires_grad and n.startswith(task.backbone_prefix)
    }


class Trap2Steps:
    """A step function for the training loop: every optimiser step is a ``trap2_step`` with one
    s drawn from its own seeded generator; skipped steps are counted."""

    def __init__(
        self,
        forward_loss: Callable[[dict[str, Tensor] | None, Batch], Tensor],
        base: dict[str, Tensor] | None,
        *,
        mode: str,
        lam: float,
        s_min: float,
        s_max: float,
        delta: float,
        weight: str,
        clip_norm: float,
        seed: int,
    ):
        check_trap2_settings(s_min, s_max, delta, weight)
        self.forward_loss, self.base, self.mode = forward_loss, base, mode
        self.settings = dict(lam=lam, s_min=s_min, s_max=s_max, delta=delta, weight=weight)
        self.clip_norm = clip_norm
        self.generator = torch.Generator().manual_seed(seed)
        self.skipped = 0

    def __call__(
        self, m: nn.Module, optimizer: torch.optim.Optimizer, batch: Batch
    ) -> dict[str, float]:
        r = trap2_step(
            m, optimizer, batch, self.forward_loss, self.base, generator=self.generator,
            mode=self.mode, clip_norm=self.clip_norm, **self.settings,
        )  # fmt: skip
        if r.skipped:
            self.skipped += 1
            return {"skipped": 1.0}
        return {"loss": r.clean, "scaled_loss": r.scaled, "objective": r.total, "s": r.s,
                "grad_norm": r.grad_norm, "skipped": 0.0}  # fmt: skip


def protect_trap2(
    task: TaskModel,
    data: Splits,
    finetune: dict[str, Any],
    device: str = "cpu",
    report: ReportFn | None = None,
    *,
    lam: float = 0.005,
    s_min: float = 0.05,
    s_max: float = 2.0,
    delta: float = 0.05,
    weight: Literal["inv", "inv_sqrt", "none"] = "inv",
    clip_norm: float = 1.0,
    seed: int = 0,
) -> dict[str, float]:
    """Trap² (Jang et al., ICML 2026): fine-tune from the base so the update breaks when rescaled.

    Minimises L(W₀+ΔW) − lam·w(s)·L(W₀+s·ΔW) with one s per step drawn from U[s_min, s_max]
    outside (1−delta, 1+delta); w(s) is 1/s (``inv``), 1/√s (``inv_sqrt``) or 1 (``none``).
    Training follows ``finetune`` (``{"mode": "full"|"lora", ...finetune op params}``); ``seed``
    drives the draws of s only. Gradients are clipped to ``clip_norm``; steps with a non-finite
    loss or gradient are skipped and counted.
    """
    mode = trap2_mode(finetune)
    if mode == "lora":
        attach_lora(task, finetune)
    if task.precision.needs_scaler:
        # A custom step takes its own optimiser steps, so float16 (which needs loss scaling)
        # falls back to float32; bfloat16 and float32 are kept.
        task.precision = Precision(task.precision.device_type)
    task.model.to(device)
    base = backbone_snapshot(task) if mode == "full" else None
    step = Trap2Steps(
        lambda overrides, batch: task.loss(batch, overrides), base, mode=mode, lam=lam,
        s_min=s_min, s_max=s_max, delta=delta, weight=weight, clip_norm=clip_norm, seed=seed,
    )  # fmt: skip
    metrics = fit(
        task, data.train, data.validation, fit_config(finetune), device=device, report=report,
        step_fn=step, precision=task.precision,
    )  # fmt: skip
    return metrics | {"skipped_steps": float(step.skipped)}


register_op(
    "protect",
    "trap2",
    traits=("trains",),
    fn=protect_trap2,
    executor=execute_training_protection,
)
