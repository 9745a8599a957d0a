"""The evaluate step: accuracy per dataset, and for merges the accuracy relative to each expert."""

from __future__ import annotations

import json
from collections.abc import Sequence

import torch

from mergesec.core.context import NodeContext
from mergesec.core.registry import get_op, register_op
from mergesec.data.splits import Example
from mergesec.models.artifact import ModelArtifact
from mergesec.models.classifier import SequenceClassifier
from mergesec.tasks.training import score


@register_op("evaluate", "accuracy")
def accuracy(
    model: SequenceClassifier,
    tokenizer,
    examples: Sequence[Example],
    device: str = "cpu",
    *,
    batch_size: int = 64,
    max_length: int = 64,
) -> dict[str, float]:
    """Top-1 accuracy and mean cross-entropy of a classifier on labelled examples."""
    loss, acc = score(
        model, tokenizer, examples, batch_size=batch_size, max_length=max_length, device=device
    )
    return {"accuracy": acc, "loss": loss}


def classifier_from_artifact(
    art: ModelArtifact, allow_remote_code: bool = False, device: str = "cpu"
):
    """The artifact's backbone loaded into the base architecture; heads are set per dataset."""
    from mergesec.models.hub import load_backbone, load_tokenizer

    backbone = load_backbone(art.base, allow_remote_code)
    missing, unexpected = backbone.load_state_dict(art.backbone_state(), strict=False)
    if unexpected:
        raise ValueError(
            f"{art.path}: weights do not fit the base model (unexpected key {unexpected[0]!r})"
        )
    model = SequenceClassifier(backbone, 1).to(device).eval()
    return model, load_tokenizer(art.base, allow_remote_code)


def evaluate_artifact(
    art: ModelArtifact,
    datasets: Sequence[dict],
    *,
    split: str = "test",
    device: str = "cpu",
    allow_remote_code: bool = False,
    **params,
) -> dict[str, float]:
    """``accuracy/<slug>`` for every dataset the artifact has a head for."""
    from mergesec.data import dataset_slug, load_dataset_splits
    from mergesec.tasks import kinds

    if kinds.kind_for_datasets(datasets) != kinds.TEXT:
        return kinds.evaluate_artifact(
            art, datasets, split=split, device=device, allow_remote_code=allow_remote_code, **params
        )
    op = get_op("evaluate", "accuracy")
    model, tokenizer = classifier_from_artifact(art, allow_remote_code, device)
    heads = art.all_heads()
    metrics: dict[str, float] = {}
    for ds in datasets:
        slug = dataset_slug(ds["uri"])
        if slug not in art.heads:
            continue
        model.set_head(heads[f"{slug}.weight"].to(device), heads[f"{slug}.bias"].to(device))
        data = load_dataset_splits(ds["uri"], columns=ds.get("columns"))
        m = op.fn(model, tokenizer, getattr(data, split), device, **params)
        metrics[f"accuracy/{slug}"] = m["accuracy"]
        metrics[f"loss/{slug}"] = m["loss"]
    accs = [v for k, v in metrics.items() if k.startswith("accuracy/")]
    if accs:
        metrics["accuracy/mean"] = sum(accs) / len(accs)
    return metrics


def execute(ctx: NodeContext) -> dict[str, float]:
    art = ModelArtifact.open(ctx.inputs["model"])
    with torch.no_grad():
        metrics = evaluate_artifact(
            art,
            ctx.params["datasets"],
            split=ctx.params.get("split", "test"),
            device=ctx.device,
            allow_remote_code=ctx.allow_remote_code,
            **ctx.params["op"],
        )
    normalized = []
    for slug, ref_dir in ctx.inputs_with_prefix("reference").items():
        ref = json.loads((ref_dir / "metrics.json").read_text())
        ref_acc = ref.get(f"accuracy/{slug}")
        if ref_acc and f"accuracy/{slug}" in metrics:
            metrics[f"normalized/{slug}"] = metrics[f"accuracy/{slug}"] / ref_acc
            normalized.append(metrics[f"normalized/{slug}"])
    if normalized:
        metrics["normalized/mean"] = sum(normalized) / len(normalized)
    return metrics
