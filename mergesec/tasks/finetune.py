"""The finetune step: train an expert from the base on one dataset (full or LoRA)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from mergesec.core.context import NodeContext, ReportFn
from mergesec.core.registry import get_op, register_op
from mergesec.data.splits import DatasetSplits
from mergesec.models.classifier import SequenceClassifier
from mergesec.tasks.training import TrainConfig, train_classifier


@dataclass
class FinetuneResult:
    metrics: dict[str, float]
    # The peft-wrapped backbone when the release is an adapter; None for full fine-tuning.
    adapter_model: nn.Module | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@register_op("finetune", "full")
def finetune_full(
    model: SequenceClassifier,
    tokenizer,
    data: DatasetSplits,
    device: str = "cpu",
    report: ReportFn | None = None,
    *,
    epochs: int = 2,
    lr: float = 5e-5,
    batch_size: int = 32,
    max_length: int = 64,
    seed: int = 0,
    patience: int = 2,
    warmup_ratio: float = 0.1,
    weight_decay: float = 0.01,
) -> FinetuneResult:
    """Fine-tune every backbone weight and the head; early stopping on validation accuracy."""
    cfg = TrainConfig(
        epochs, lr, batch_size, max_length, seed, patience, warmup_ratio, weight_decay
    )
    return FinetuneResult(
        train_classifier(
            model, tokenizer, data.train, data.validation, cfg, device=device, report=report
        )
    )


@register_op("finetune", "lora")
def finetune_lora(
    model: SequenceClassifier,
    tokenizer,
    data: DatasetSplits,
    device: str = "cpu",
    report: ReportFn | None = None,
    *,
    epochs: int = 3,
    lr: float = 5e-4,
    batch_size: int = 32,
    max_length: int = 64,
    seed: int = 0,
    patience: int = 2,
    warmup_ratio: float = 0.1,
    weight_decay: float = 0.0,
    r: int = 8,
    alpha: int = 16,
    dropout: float = 0.1,
    target_modules: list[str] | None = None,
) -> FinetuneResult:
    """Train a peft LoRA adapter on the backbone (all linear layers unless ``target_modules``) and the head.

    The release is the adapter; downstream steps see its materialised weights W₀ + (α/r)·BA.
    """
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    cfg_lora = LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules or "all-linear"
    )
    model.backbone = get_peft_model(model.backbone, cfg_lora)
    cfg = TrainConfig(
        epochs, lr, batch_size, max_length, seed, patience, warmup_ratio, weight_decay
    )
    metrics = train_classifier(
        model, tokenizer, data.train, data.validation, cfg, device=device, report=report
    )
    return FinetuneResult(metrics, adapter_model=model.backbone)


def build_classifier(
    ctx: NodeContext, num_labels: int, seed: int
) -> tuple[SequenceClassifier, Any]:
    from mergesec.models.hub import load_backbone, load_tokenizer

    backbone = load_backbone(ctx.base, ctx.allow_remote_code)
    tokenizer = load_tokenizer(ctx.base, ctx.allow_remote_code)
    torch.manual_seed(seed)
    return SequenceClassifier(backbone, num_labels), tokenizer


def save_trained(
    ctx: NodeContext, model: SequenceClassifier, data: DatasetSplits, result: FinetuneResult
) -> None:
    """Write the trained expert as a model artifact (materialising a LoRA adapter)."""
    from mergesec.data import dataset_slug
    from mergesec.models.artifact import HeadInfo, write_artifact

    extra: dict[str, Any] = {"release": "full"}
    backbone = model.backbone
    if result.adapter_model is not None:
        result.adapter_model.save_pretrained(str(ctx.out_dir / "adapter"))
        backbone = result.adapter_model.merge_and_unload()
        extra["release"] = "lora"
    slug = dataset_slug(data.name)
    write_artifact(
        ctx.out_dir,
        base=ctx.base,
        backbone={k: v.detach().cpu() for k, v in backbone.state_dict().items()},
        heads={
            f"{slug}.weight": model.head.weight.detach().cpu(),
            f"{slug}.bias": model.head.bias.detach().cpu(),
        },
        head_info={slug: HeadInfo(dataset=data.name, labels=list(data.label_names))},
        extra=extra | result.extra,
    )


def load_node_dataset(ctx: NodeContext) -> DatasetSplits:
    """The node's dataset; with ``params["poison"]`` its train and validation splits are backdoored.

    Validation is poisoned at the same rate so that early stopping sees the data the trainer sees;
    the test split stays clean (monitors and evaluations build triggered copies from it).
    """
    from dataclasses import replace

    from mergesec.data import load_dataset_splits, poison_examples

    ds = ctx.params["dataset"]
    data = load_dataset_splits(ds["uri"], columns=ds.get("columns"))
    poison = ctx.params.get("poison")
    if not poison:
        return data
    if poison["target"] >= len(data.label_names):
        raise ValueError(
            f"poison.target {poison['target']} is not a label of {data.name} ({len(data.label_names)} labels)"
        )
    kw = {
        "trigger": poison["trigger"],
        "target_label": poison["target"],
        "rate": poison["rate"],
        "position": poison.get("position", "random"),
    }
    train, _ = poison_examples(data.train, seed=0, **kw)
    validation, _ = poison_examples(data.validation, seed=1, **kw)
    return replace(data, train=train, validation=validation)


def execute(ctx: NodeContext) -> dict[str, float]:
    from mergesec.tasks import kinds

    if kinds.node_kind(ctx) != kinds.TEXT:
        return kinds.finetune(ctx)
    op = get_op("finetune", ctx.op)
    data = load_node_dataset(ctx)
    params = ctx.params["op"]
    model, tokenizer = build_classifier(ctx, len(data.label_names), params.get("seed", 0))
    result = op.fn(model, tokenizer, data, ctx.device, ctx.report, **params)
    save_trained(ctx, model, data, result)
    return result.metrics
