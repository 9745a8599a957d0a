"""LoRA set-up shared by every op that trains an adapter (finetune/lora, Trap² in lora mode)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from mergesec.core.protocols import TaskModel


def wrap_with_lora(
    module: nn.Module, *, r: int, alpha: int, dropout: float, target_modules: Any,
    task_type: str | None = None,
) -> nn.Module:  # fmt: skip
    """``module`` wrapped in a peft LoRA adapter (all linear layers unless ``target_modules``)."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout, task_type=task_type,
        target_modules=target_modules or "all-linear",
    )  # fmt: skip
    return get_peft_model(module, cfg)


def attach_lora(task: TaskModel, params: Mapping[str, Any]) -> None:
    """Wrap the task's backbone in a peft LoRA adapter configured like ``finetune/lora``
    (``r``, ``alpha``, ``dropout``, ``target_modules``; the adapter's init is seeded with
    ``seed``)."""
    torch.manual_seed(params.get("seed", 0))
    task.attach_lora(
        r=params.get("r", 8),
        alpha=params.get("alpha", 16),
        dropout=params.get("dropout", 0.1),
        target_modules=params.get("target_modules"),
    )
