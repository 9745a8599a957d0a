"""The attack step: recover a mergeable expert from a protected release.

Attack ops see only the release and the public base. When the study also has the clean expert
(input ``reference``), the executor logs how close the recovery came to it: diagnostics a
researcher wants and an attacker would not have.

An attack op declares when it acts by a trait (none: on the release, before merging):

- ``stage:merge``: inside the merge step (``tasks/merge.py``). Its function takes
  ``(base, release, **params)`` and returns ``attacks.rescale.MergeStageCandidates``; no attack
  node exists for it.
- ``stage:merged``: on the merged model. Its function takes ``(task, data, device, report,
  **params)``: ``task`` is the merged model of the victim's kind serving the victim's head; the op
  trains it in place and returns metrics; the node writes the merged model with the trained
  backbone and victim head, the other heads unchanged. This works for every task kind.
"""

from __future__ import annotations

import torch

from mergesec.attacks.aga import attack_aga, mlp_match_fraction, recovery_diagnostics
from mergesec.attacks.finetune_after_merge import finetune_after_merge
from mergesec.attacks.rescale import attack_rescale
from mergesec.core.context import NodeContext
from mergesec.core.registry import STAGE_MERGE, STAGE_MERGED, get_op, register_op
from mergesec.data import dataset_slug
from mergesec.models.artifact import ModelArtifact, write_artifact
from mergesec.tasks._io import base_and_layout, node_kind, open_for_node, task_vector_norm

# 2: ``device`` became a run-time argument (it was hashed into node ids and then overwritten).
register_op("attack", "aga", version="2", fn=attack_aga)

register_op("attack", "rescale", traits=(STAGE_MERGE,), fn=attack_rescale)


def execute_after_merge(ctx: NodeContext) -> dict[str, float]:
    """Run a ``stage:merged`` attack on the merged model ``release`` for the victim's dataset."""

    op = get_op("attack", ctx.op)
    merged = ModelArtifact.open(ctx.inputs["release"])
    ds = ctx.params["dataset"]
    slug = dataset_slug(ds["uri"])
    if slug not in merged.heads:
        raise ValueError(f"the merged model has no head for the victim {ds['uri']}")
    kind = node_kind(ctx)
    params = ctx.params["op"]
    task = open_for_node(ctx, kind, merged, params)
    data = kind.load(ds)
    heads = merged.all_heads()
    task.use(data, heads, slug)
    metrics = op.fn(task, data, ctx.device, ctx.report, **params)
    heads.update(task.head_tensors(slug))
    write_artifact(
        ctx.out_dir,
        base=merged.base,
        backbone=task.release_state(),
        heads=heads,
        head_info=merged.heads,
        extra={"release": "full", "kind": kind.name, "merge": merged.meta.get("merge"),
               "attack": op.name},
    )  # fmt: skip
    return metrics


register_op(
    "attack",
    "finetune_after_merge",
    # 2: one seeded subset for every kind (sorted indices); text drew the same examples in
    # another order, which changed its batches.
    version="2",
    traits=(STAGE_MERGED,),
    fn=finetune_after_merge,
)


def execute(ctx: NodeContext) -> dict[str, float]:
    op = get_op("attack", ctx.op)
    if STAGE_MERGE in op.traits:
        raise ValueError(f"attack/{op.name} acts inside the merge step; it has no attack node")
    if STAGE_MERGED in op.traits:
        return execute_after_merge(ctx)
    release = ModelArtifact.open(ctx.inputs["release"])
    sd = release.backbone_state()
    base, layout = base_and_layout(ctx, sd.keys())
    params = dict(ctx.params["op"]) | op.runtime_args(device=ctx.device)
    with torch.no_grad():
        recovered = op.fn(sd, base, layout, **params)
    write_artifact(
        ctx.out_dir,
        base=ctx.base,
        backbone=recovered,
        heads=release.all_heads(),
        head_info=release.heads,
        extra={"release": release.meta.get("release", "full"), "attack": op.name},
    )
    metrics = {
        "task_vector_norm/release": task_vector_norm(sd, base),
        "task_vector_norm/recovered": task_vector_norm(recovered, base),
    }
    if "reference" in ctx.inputs:
        clean = ModelArtifact.open(ctx.inputs["reference"]).backbone_state()
        metrics.update(
            {
                f"diagnostics/{k}": v
                for k, v in recovery_diagnostics(recovered, clean, base, layout).items()
            }
        )
        metrics["diagnostics/mlp_match_fraction"] = mlp_match_fraction(recovered, clean, layout)
    return metrics
