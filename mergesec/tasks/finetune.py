"""The finetune step: train an expert from the base on one dataset (full or LoRA), any kind."""

from __future__ import annotations

from mergesec.core.bounds import (
    DropFraction,
    NonNegativeFloat,
    PositiveFloat,
    PositiveInt,
    Probability,
    Seed,
    TokenLength,
)
from mergesec.core.context import NodeContext, ReportFn
from mergesec.core.protocols import Splits, TaskModel
from mergesec.core.registry import get_op, register_op
from mergesec.tasks._io import build_for_node, node_kind, save_expert
from mergesec.training.loop import fit, fit_config
from mergesec.training.lora import attach_lora


@register_op("finetune", "full")
def finetune_full(
    task: TaskModel,
    data: Splits,
    device: str = "cpu",
    report: ReportFn | None = None,
    *,
    epochs: PositiveInt = 2,
    lr: PositiveFloat = 5e-5,
    batch_size: PositiveInt = 32,
    max_length: TokenLength = 64,
    seed: Seed = 0,
    patience: PositiveInt = 2,
    warmup_ratio: Probability = 0.1,
    weight_decay: NonNegativeFloat = 0.01,
    length_pool: PositiveInt | None = None,
) -> dict[str, float]:
    """Fine-tune every backbone weight and the head; early stopping on the validation metric.

    ``max_length`` is the text kind's truncation length (other kinds set their own).
    ``length_pool`` batches texts of similar token count together within each run of that many
    shuffled batches (less padding; None: plain shuffled batches, as transformers' Trainer
    without ``group_by_length``)."""
    cfg = fit_config(locals(), eval_batch_size=task.eval_batch_size)
    return fit(task, data.train, data.validation, cfg, device=device, report=report,
               precision=task.precision)  # fmt: skip


@register_op("finetune", "lora")
def finetune_lora(
    task: TaskModel,
    data: Splits,
    device: str = "cpu",
    report: ReportFn | None = None,
    *,
    epochs: PositiveInt = 3,
    lr: PositiveFloat = 5e-4,
    batch_size: PositiveInt = 32,
    max_length: TokenLength = 64,
    seed: Seed = 0,
    patience: PositiveInt = 2,
    warmup_ratio: Probability = 0.1,
    weight_decay: NonNegativeFloat = 0.0,
    length_pool: PositiveInt | None = None,
    r: PositiveInt = 8,
    alpha: PositiveInt = 16,
    dropout: DropFraction = 0.1,
    target_modules: list[str] | None = None,
) -> dict[str, float]:
    """Train a peft LoRA adapter on the backbone (all linear layers unless ``target_modules``)
    and the head. The release is the adapter; downstream steps see its materialised weights
    W₀ + (α/r)·BA. ``length_pool`` as in ``finetune/full``."""
    params = locals()
    attach_lora(task, params)
    cfg = fit_config(params, eval_batch_size=task.eval_batch_size)
    return fit(task, data.train, data.validation, cfg, device=device, report=report,
               precision=task.precision)  # fmt: skip


def execute(ctx: NodeContext) -> dict[str, float]:
    op = get_op("finetune", ctx.op)
    kind = node_kind(ctx)
    params = ctx.params["op"]
    data = kind.load(ctx.params["dataset"], poison=ctx.params.get("poison"))
    task = build_for_node(ctx, kind, data, params)
    metrics = op.fn(task, data, ctx.device, ctx.report, **params)
    save_expert(ctx, kind, task, data, {"precision": task.precision.name})
    return metrics
