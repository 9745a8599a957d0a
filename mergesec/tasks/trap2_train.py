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
import torch.nn.functional as F
from torch import Tensor, nn

from mergesec.core.context import NodeContext, ReportFn
from mergesec.core.registry import Op, get_op, register_op
from mergesec.data.splits import DatasetSplits
from mergesec.defenses.trap2 import Trap2Steps
from mergesec.models.classifier import SequenceClassifier
from mergesec.models.functional import forward_with
from mergesec.tasks.finetune import (
    FinetuneResult,
    build_classifier,
    load_node_dataset,
    save_trained,
)
from mergesec.tasks.training import Batch, TrainConfig, train_classifier

BACKBONE_PREFIX = "backbone."
_TRAIN_FIELDS = (
    "epochs",
    "lr",
    "batch_size",
    "max_length",
    "seed",
    "patience",
    "warmup_ratio",
    "weight_decay",
)


def train_config(finetune: dict[str, Any]) -> TrainConfig:
    """The ``TrainConfig`` of a finetune op's validated params (LoRA settings are ignored here)."""
    return TrainConfig(**{k: finetune[k] for k in _TRAIN_FIELDS if k in finetune})


def attach_lora(model: SequenceClassifier, finetune: dict[str, Any]) -> nn.Module:
    """Wrap ``model.backbone`` in a peft LoRA adapter configured like ``finetune/lora``."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(finetune.get("seed", 0))
    cfg = LoraConfig(
        r=finetune.get("r", 8),
        lora_alpha=finetune.get("alpha", 16),
        lora_dropout=finetune.get("dropout", 0.1),
        target_modules=finetune.get("target_modules") or "all-linear",
    )
    model.backbone = get_peft_model(model.backbone, cfg)
    return model.backbone


def backbone_snapshot(model: SequenceClassifier) -> dict[str, Tensor]:
    """W₀ for the full-mode scaled pass: detached clones of the trainable backbone parameters.

    Keys are the classifier's parameter names (``backbone.…``); the head is left out on purpose
    (see the module docstring).
    """
    return {
        n: p.detach().clone()
        for n, p in model.named_parameters()
        if p.requires_grad and n.startswith(BACKBONE_PREFIX)
    }


def classifier_loss(model: nn.Module) -> Callable[[dict[str, Tensor] | None, Batch], Tensor]:
    """``forward_loss(overrides, batch)``: cross-entropy of ``model`` with optional overrides."""

    def forward_loss(overrides: dict[str, Tensor] | None, batch: Batch) -> Tensor:
        logits = forward_with(
            model, overrides, input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        )
        return F.cross_entropy(logits, batch["labels"])

    return forward_loss


def trap2_mode(finetune: dict[str, Any]) -> str:
    """The release mode of a Trap² node (its study's finetune mode): ``full`` or ``lora``."""
    mode = finetune.get("mode", "full")
    if mode not in ("full", "lora"):
        raise ValueError(f"protect/trap2 trains full or lora releases, not finetune mode {mode!r}")
    return mode


def protect_trap2(
    model: SequenceClassifier,
    tokenizer,
    data: DatasetSplits,
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
) -> FinetuneResult:
    """Trap² (Jang et al., ICML 2026): fine-tune from the base so the update breaks when rescaled.

    Minimises L(W₀+ΔW) − lam·w(s)·L(W₀+s·ΔW) with one s per step drawn from U[s_min, s_max]
    outside (1−delta, 1+delta); w(s) is 1/s (``inv``), 1/√s (``inv_sqrt``) or 1 (``none``).
    Training follows ``finetune`` (``{"mode": "full"|"lora", ...finetune op params}``); ``seed``
    drives the draws of s only. Gradients are clipped to ``clip_norm``; steps with a non-finite
    loss or gradient are skipped and counted.
    """
    mode = trap2_mode(finetune)
    cfg = train_config(finetune)
    adapter = attach_lora(model, finetune) if mode == "lora" else None
    model.to(device)
    base = backbone_snapshot(model) if mode == "full" else None
    step = Trap2Steps(
        classifier_loss(model), base, mode=mode, lam=lam, s_min=s_min, s_max=s_max, delta=delta,
        weight=weight, clip_norm=clip_norm, seed=seed,
    )  # fmt: skip
    metrics = train_classifier(
        model, tokenizer, data.train, data.validation, cfg, device=device, report=report,
        step_fn=step,
    )  # fmt: skip
    metrics["skipped_steps"] = float(step.skipped)
    return FinetuneResult(metrics, adapter_model=adapter, extra={"protect": "trap2"})


def execute_training_protection(ctx: NodeContext, op: Op) -> dict[str, float]:
    """Run a protect op with the trait ``trains``: build the classifier from the base, train, save.

    The node's params carry the victim's dataset (``dataset``, ``poison``), the study's finetune
    settings (``finetune``: mode plus finetune op params) and the op's own params (``op``).
    Datasets of another kind than text (images, QA) are trained by ``tasks.kinds``.
    """
    from mergesec.tasks import kinds

    if kinds.node_kind(ctx) != kinds.TEXT:
        return kinds.execute_training_protection(ctx, op)
    from mergesec.models.artifact import ModelArtifact
    from mergesec.models.hub import base_weights_file
    from mergesec.models.state_dict import load_state_dict
    from mergesec.tasks.protect import task_vector_norm

    data = load_node_dataset(ctx)
    finetune = dict(ctx.params["finetune"])
    model, tokenizer = build_classifier(ctx, len(data.label_names), finetune.get("seed", 0))
    result = op.fn(model, tokenizer, data, finetune, ctx.device, ctx.report, **ctx.params["op"])
    save_trained(ctx, model, data, result)
    released = ModelArtifact.open(ctx.out_dir).backbone_state()
    base = load_state_dict(base_weights_file(ctx.base, ctx.allow_remote_code))
    return result.metrics | {"task_vector_norm/release": task_vector_norm(released, base)}


register_op(
    "protect",
    "trap2",
    traits=("trains",),
    fn=protect_trap2,
    executor=lambda ctx: execute_training_protection(ctx, get_op("protect", ctx.op)),
)
