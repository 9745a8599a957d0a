"""The protect step: turn a victim's expert into a protected release.

Post-hoc protections (PaRaMS, MergeLock) take the clean expert as input and transform its weights
without changing its function: ``fn(expert, base, layout, **params) -> release``.

Training-time protections (trait ``trains``, e.g. Trap²) train the release from the base
themselves and take no input: ``fn(task, data, finetune, device, report, **params) -> metrics``,
where ``task`` is a fresh ``TaskModel`` of the victim's kind and ``finetune`` the study's finetune
settings (mode plus finetune op params). The trait is all it takes: ``execute`` runs such an op
for every task kind.
"""

from __future__ import annotations

import torch

from mergesec.core.context import NodeContext
from mergesec.core.registry import TRAINS, get_op, register_op
from mergesec.defenses.mergelock import protect_mergelock
from mergesec.defenses.params import protect_params
from mergesec.models.artifact import ModelArtifact, write_artifact
from mergesec.tasks._io import (
    base_and_layout,
    base_state,
    build_for_node,
    node_kind,
    save_expert,
    task_vector_norm,
)

register_op("protect", "params", fn=protect_params)
register_op("protect", "mergelock", fn=protect_mergelock)


def execute_training_protection(ctx: NodeContext) -> dict[str, float]:
    """The node of a protect op with trait ``trains``: build the victim's model from the base,
    let the op train it, write the release like an expert."""
    op = get_op("protect", ctx.op)
    kind = node_kind(ctx)
    finetune = dict(ctx.params["finetune"])
    data = kind.load(ctx.params["dataset"], poison=ctx.params.get("poison"))
    task = build_for_node(ctx, kind, data, finetune)
    metrics = op.fn(task, data, finetune, ctx.device, ctx.report, **ctx.params["op"])
    save_expert(ctx, kind, task, data, {"protect": op.name, "precision": task.precision.name})
    released = ModelArtifact.open(ctx.out_dir).backbone_state()
    return metrics | {"task_vector_norm/release": task_vector_norm(released, base_state(ctx))}


def execute(ctx: NodeContext) -> dict[str, float]:
    op = get_op("protect", ctx.op)
    if TRAINS in op.traits:
        return execute_training_protection(ctx)
    expert = ModelArtifact.open(ctx.inputs["expert"])
    sd = expert.backbone_state()
    base, layout = base_and_layout(ctx, sd.keys())
    with torch.no_grad():
        released = op.fn(sd, base, layout, **ctx.params["op"])
    write_artifact(
        ctx.out_dir,
        base=ctx.base,
        backbone=released,
        heads=expert.all_heads(),
        head_info=expert.heads,
        extra={"release": expert.meta.get("release", "full"), "protect": op.name},
    )
    clean_norm = task_vector_norm(sd, base)
    released_norm = task_vector_norm(released, base)
    return {
        "task_vector_norm/clean": clean_norm,
        "task_vector_norm/release": released_norm,
        "task_vector_norm/ratio": released_norm / max(clean_norm, 1e-12),
    }
