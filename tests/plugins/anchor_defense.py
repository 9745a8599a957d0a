"""A training-time defense registered from outside mergesec (loaded through MERGESEC_PLUGINS or
imported): fine-tune with an L2 pull of the backbone towards the base, ``strength·‖W − W₀‖²``.

It is one registration: the trait ``trains`` makes the protect step build the victim's model of
whatever kind the study's datasets are, hand it here, and write the release.
"""

from __future__ import annotations

from typing import Any

import torch

from mergesec.core.context import ReportFn
from mergesec.core.protocols import Splits, TaskModel
from mergesec.core.registry import register_op
from mergesec.training.loop import MicroStep, fit, fit_config
from mergesec.training.lora import attach_lora


@register_op("protect", "anchor_l2", traits=("trains",))
def protect_anchor_l2(
    task: TaskModel,
    data: Splits,
    finetune: dict[str, Any],
    device: str = "cpu",
    report: ReportFn | None = None,
    *,
    strength: float = 1.0,
) -> dict[str, float]:
    """Fine-tune like the study's finetune settings, adding ``strength``·‖W − W₀‖² over the
    trainable backbone parameters (LoRA: over the adapter's factors, so ΔW is pulled to 0)."""
    lora = finetune.get("mode") == "lora"
    if lora:
        attach_lora(task, finetune)
    task.model.to(device)
    anchor = {
        n: p.detach().clone()
        for n, p in task.model.named_parameters()
        if p.requires_grad and (lora or n.startswith(task.backbone_prefix))
    }

    def step(t: TaskModel, batch: dict[str, torch.Tensor], micro: MicroStep) -> dict[str, float]:
        loss = t.loss(batch)
        params = dict(t.model.named_parameters())
        penalty = torch.stack([((params[n] - w) ** 2).sum() for n, w in anchor.items()]).sum()
        micro.backward(loss + strength * penalty)
        return {"loss": float(loss.detach()), "penalty": float(penalty.detach())}

    cfg = fit_config(finetune, eval_batch_size=task.eval_batch_size)
    return fit(task, data.train, data.validation, cfg, device=device, report=report,
               step_fn=step, precision=task.precision)  # fmt: skip
