"""The protect step: turn a victim's expert into a protected release.

Post-hoc protections (PaRaMS, MergeLock) take the clean expert as input and transform its weights
without changing its function. Training-time protections (trait ``trains``) fine-tune the release
from the base themselves and take no input.
"""

from __future__ import annotations

import torch

from mergesec.core.context import NodeContext
from mergesec.core.registry import get_op, register_op
from mergesec.defenses.mergelock import protect_mergelock
from mergesec.defenses.params import protect_params
from mergesec.models.artifact import ModelArtifact, write_artifact
from mergesec.models.state_dict import StateDict

register_op("protect", "params", fn=protect_params)
register_op("protect", "mergelock", fn=protect_mergelock)


def base_and_layout(ctx: NodeContext, keys):
    """The canonical base weights and the transformer layout of the base's architecture."""
    from mergesec.models.hub import base_weights_file, load_config
    from mergesec.models.layout import detect_layout
    from mergesec.models.state_dict import load_state_dict

    base = load_state_dict(base_weights_file(ctx.base, ctx.allow_remote_code))
    layout = detect_layout(load_config(ctx.base, ctx.allow_remote_code), keys)
    return base, layout


def task_vector_norm(sd: StateDict, base: StateDict) -> float:
    total = 0.0
    for k, v in sd.items():
        if k in base and v.is_floating_point():
            total += float((v.double() - base[k].double()).pow(2).sum())
    return total**0.5


def execute(ctx: NodeContext) -> dict[str, float]:
    op = get_op("protect", ctx.op)
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
