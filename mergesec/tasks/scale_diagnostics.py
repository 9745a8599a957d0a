"""evaluate/scale_curve: validation loss and accuracy of W₀ + s·τ for any stored model.

τ is the model's backbone minus the base's canonical backbone (``models.hub.base_weights_file``);
for a LoRA release the stored backbone is the materialised W₀ + (α/r)·BA, so scaling τ is scaling
B. The model's own head for the dataset is used at every scale (heads are not part of τ). The
sweep runs through ``functional_call`` overrides of one loaded model (``defenses.scale_curve``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from mergesec.core.context import NodeContext
from mergesec.core.registry import register_op
from mergesec.defenses.scale_curve import curve_sharpness, scale_curve
from mergesec.models.artifact import ModelArtifact
from mergesec.models.functional import forward_with
from mergesec.report_scale import SCALE_CURVE_FILE
from mergesec.tasks.training import batches, to_device

PLOT_FILE = "scale_curve.png"


def artifact_scale_curve(
    art: ModelArtifact,
    dataset: dict,
    scales: Sequence[float],
    device: str = "cpu",
    allow_remote_code: bool = False,
    *,
    batch_size: int = 64,
    max_length: int = 64,
) -> list[dict[str, float]]:
    """``{s, loss, accuracy}`` on ``dataset``'s validation split of W₀ + s·τ for each scale."""
    from mergesec.data import dataset_slug, load_dataset_splits
    from mergesec.models.hub import base_weights_file
    from mergesec.models.state_dict import load_state_dict
    from mergesec.tasks.evaluate import classifier_from_artifact

    slug = dataset_slug(dataset["uri"])
    if slug not in art.heads:
        raise ValueError(
            f"{art.path} has no head for {dataset['uri']} (heads: {sorted(art.heads)})"
        )
    model, tokenizer = classifier_from_artifact(art, allow_remote_code, device)
    head = art.head_state(slug)
    model.set_head(head["weight"].to(device), head["bias"].to(device))
    params = dict(model.named_parameters())
    base = load_state_dict(base_weights_file(art.base, allow_remote_code))
    reference = {
        f"backbone.{k}": v.to(device)
        for k, v in base.items()
        if f"backbone.{k}" in params and v.is_floating_point()
    }
    data = load_dataset_splits(dataset["uri"], columns=dataset.get("columns"))
    pre = [
        to_device(b, device) for b in batches(tokenizer, data.validation, batch_size, max_length)
    ]

    def evaluate(overrides: dict[str, Tensor] | None) -> tuple[float, float]:
        total, correct, n = 0.0, 0, 0
        for b in pre:
            logits = forward_with(
                model, overrides, input_ids=b["input_ids"], attention_mask=b["attention_mask"]
            )
            total += float(F.cross_entropy(logits, b["labels"], reduction="sum"))
            correct += int((logits.argmax(-1) == b["labels"]).sum())
            n += len(b["labels"])
        return total / max(n, 1), correct / max(n, 1)

    return scale_curve(model, reference, evaluate, list(scales), mode="full")


def execute_scale_curve(ctx: NodeContext) -> dict[str, float]:
    """Sweep the scale for the input model; report each point, write the curve and its plot.

    Per point ``scale/s``, ``scale/loss`` and ``scale/accuracy`` go to ``ctx.report`` with the
    point's index as step; the returned metrics are ``sharpness/*`` (``curve_sharpness``).
    """
    from mergesec.report_scale import plot_scale_curves
    from mergesec.tasks import kinds

    datasets = ctx.params["datasets"]
    if len(datasets) != 1:
        raise ValueError(f"evaluate/scale_curve takes one dataset, got {len(datasets)}")
    art = ModelArtifact.open(ctx.inputs["model"])
    sweep = artifact_scale_curve
    if kinds.dataset_kind(datasets[0]) != kinds.TEXT:
        sweep = kinds.artifact_scale_curve
    with torch.no_grad():
        curve = sweep(
            art, datasets[0], ctx.params["scales"], ctx.device, ctx.allow_remote_code,
            **ctx.params["op"],
        )  # fmt: skip
    for i, p in enumerate(curve):
        ctx.report({"scale/s": p["s"], "scale/loss": p["loss"], "scale/accuracy": p["accuracy"]}, i)
    kind = art.meta.get("protect") or art.meta.get("attack") or art.meta.get("merge") or "expert"
    label = f"{kind} ({art.meta.get('release', 'full')})"
    doc = {"dataset": datasets[0], "model": label, "curve": curve}
    (ctx.out_dir / SCALE_CURVE_FILE).write_text(json.dumps(doc, indent=2))
    (ctx.out_dir / PLOT_FILE).write_bytes(plot_scale_curves({label: curve}))
    summary = curve_sharpness(curve)
    return {f"sharpness/{k}": v for k, v in summary.items() if math.isfinite(v)} | {
        "points": float(len(curve))
    }


register_op("evaluate", "scale_curve", fn=artifact_scale_curve, executor=execute_scale_curve)
