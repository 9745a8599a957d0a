"""LoRA set-up shared by every op that trains an adapter (finetune/lora, Trap² in lora mode)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from mergesec.core.protocols import TaskModel


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
