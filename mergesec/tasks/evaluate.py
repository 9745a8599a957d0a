"""The evaluate step: the metric per dataset, and for merges the metric relative to each expert.

Works for every task kind: the model is opened through its kind, serves each dataset it has a
head for (or an input ``head.<slug>`` supplies), and is scored on the chosen split (accuracy, or
exact match for QA, under the name ``accuracy/<slug>``).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from mergesec.core.bounds import PositiveInt, TokenLength
from mergesec.core.context import NodeContext
from mergesec.core.protocols import TaskModel
from mergesec.core.registry import get_op, register_op
from mergesec.data import dataset_slug
from mergesec.kinds import build_options, kind_of
from mergesec.models.artifact import ModelArtifact
from mergesec.training.sampling import split_labels


@register_op("evaluate", "accuracy")
def accuracy(
    task: TaskModel,
    examples: Sequence[Any],
    *,
    batch_size: PositiveInt = 64,
    max_length: TokenLength = 64,
) -> dict[str, float]:
    """The kind's metric (top-1 accuracy; exact match for QA) and mean loss on ``examples``.
    ``max_length`` is the text kind's truncation length."""
    loss, acc = task.score(examples, batch_size=batch_size)
    return {"accuracy": acc, "loss": loss}


def majority_rate(examples: Sequence[Any]) -> float | None:
    """The share of the commonest label in ``examples`` (None without labels or examples)."""
    labels = split_labels(examples)
    if not labels:
        return None
    return max(Counter(labels).values()) / len(labels)


def evaluate_artifact(
    art: ModelArtifact,
    datasets: Sequence[Mapping[str, Any]],
    *,
    split: str = "test",
    device: str = "cpu",
    allow_remote_code: bool = False,
    extra_heads: Mapping[str, ModelArtifact] | None = None,
    **params: Any,
) -> dict[str, float]:
    """``accuracy/<slug>`` and ``loss/<slug>`` for every dataset the artifact has a head for,
    plus ``accuracy/mean``; ``majority/<slug>``, the split's majority-class rate (what always
    answering the commonest class scores), for labelled datasets. ``extra_heads`` maps a slug to
    another artifact whose head for it is used (a merge that left that dataset's expert out)."""

    op = get_op("evaluate", "accuracy")
    kind = kind_of(datasets)
    task = kind.from_artifact(
        art, device=device, allow_remote_code=allow_remote_code, **build_options(kind, params)
    )
    heads, known = art.all_heads(), set(art.heads)
    for slug, other in (extra_heads or {}).items():
        if slug not in other.heads:
            raise ValueError(f"the artifact given for head {slug!r} has no head {slug!r}")
        heads.update({k: t for k, t in other.all_heads().items() if k.startswith(f"{slug}.")})
        known.add(slug)
    metrics: dict[str, float] = {}
    for ds in datasets:
        slug = dataset_slug(ds["uri"])
        if slug not in known:
            continue
        data = kind.load(ds)
        task.use(data, heads, slug)
        examples = data.split(split)
        m = op.fn(task, examples, **params)
        metrics[f"accuracy/{slug}"] = m["accuracy"]
        metrics[f"loss/{slug}"] = m["loss"]
        majority = majority_rate(examples)
        if majority is not None:
            metrics[f"majority/{slug}"] = majority
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
            extra_heads={
                s: ModelArtifact.open(p) for s, p in ctx.inputs_with_prefix("head").items()
            },
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
