"""evaluate/scale_curve: validation loss and accuracy of W₀ + s·τ for any stored model.

τ is the model's backbone minus the base's canonical backbone (``models.hub.base_weights_file``);
for a LoRA release the stored backbone is the materialised W₀ + (α/r)·BA, so scaling τ is scaling
B. The model's own head for the dataset is used at every scale (heads are not part of τ). The
sweep runs through ``functional_call`` overrides of one loaded model (``defenses.scale_curve``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from mergesec.core.bounds import PositiveInt, TokenLength
from mergesec.core.context import NodeContext
from mergesec.core.registry import register_op
from mergesec.data import dataset_slug
from mergesec.defenses.scale_curve import curve_sharpness, scale_curve
from mergesec.kinds import build_options, kind_of
from mergesec.models.artifact import ModelArtifact
from mergesec.models.hub import base_weights_file
from mergesec.models.state_dict import load_state_dict
from mergesec.plots import plot_scale_curves

SCALE_CURVE_FILE = "scale_curve.json"
PLOT_FILE = "scale_curve.png"


def artifact_scale_curve(
    art: ModelArtifact,
    dataset: Mapping[str, Any],
    scales: Sequence[float],
    device: str = "cpu",
    allow_remote_code: bool = False,
    *,
    batch_size: PositiveInt = 64,
    max_length: TokenLength = 64,
) -> list[dict[str, float]]:
    """``{s, loss, accuracy}`` on ``dataset``'s validation split of W₀ + s·τ for each scale.
    ``max_length`` is the text kind's truncation length."""

    slug = dataset_slug(dataset["uri"])
    if slug not in art.heads:
        raise ValueError(
            f"{art.path} has no head for {dataset['uri']} (heads: {sorted(art.heads)})"
        )
    kind = kind_of([dataset])
    options = build_options(kind, {"max_length": max_length})
    task = kind.from_artifact(art, device=device, allow_remote_code=allow_remote_code, **options)
    data = kind.load(dataset)
    task.use(data, art.all_heads(), slug)
    params = dict(task.model.named_parameters())
    prefix = task.backbone_prefix
    base = load_state_dict(base_weights_file(art.base, allow_remote_code))
    reference = {
        prefix + k: v.to(device)
        for k, v in base.items()
        if prefix + k in params and v.is_floating_point()
    }
    prepared = task.prepare(data.validation, batch_size)

    def evaluate(overrides: dict[str, torch.Tensor] | None) -> tuple[float, float]:
        return task.score_batches(prepared, overrides)

    return scale_curve(task.model, reference, evaluate, list(scales), mode="full")


def execute_scale_curve(ctx: NodeContext) -> dict[str, float]:
    """Sweep the scale for the input model; report each point, write the curve and its plot.

    Per point ``scale/s``, ``scale/loss`` and ``scale/accuracy`` go to ``ctx.report`` with the
    point's index as step; the returned metrics are ``sharpness/*`` (``curve_sharpness``).
    """
    datasets = ctx.params["datasets"]
    if len(datasets) != 1:
        raise ValueError(f"evaluate/scale_curve takes one dataset, got {len(datasets)}")
    art = ModelArtifact.open(ctx.inputs["model"])
    with torch.no_grad():
        curve = artifact_scale_curve(
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
