"""The attack step: recover a mergeable expert from a protected release.

Attack ops see only the release and the public base. When the study also has the clean expert
(input ``reference``), the executor logs how close the recovery came to it: diagnostics a
researcher wants and an attacker would not have.

An attack op declares when it acts by a trait (none: on the release, before merging):

- ``stage:merge``: inside the merge step (``tasks/merge.py``). Its function takes
  ``(base, release, **params)`` and returns ``attacks.rescale.MergeStageCandidates``; no attack
  node exists for it.
- ``stage:merged``: on the merged model. Its function takes ``(model, tokenizer, data, device,
  report, **params)``, trains the classifier (merged backbone + the victim's head) in place and
  returns metrics; the node writes the merged model with that backbone and head, the other
  heads unchanged.
"""

from __future__ import annotations

import torch

from mergesec.attacks.aga import attack_aga, mlp_match_fraction, recovery_diagnostics
from mergesec.attacks.finetune_after_merge import finetune_after_merge
from mergesec.attacks.rescale import attack_rescale
from mergesec.core.context import NodeContext
from mergesec.core.registry import get_op, register_op
from mergesec.models.artifact import ModelArtifact, write_artifact
from mergesec.tasks.protect import base_and_layout, task_vector_norm

register_op("attack", "aga", fn=attack_aga)

STAGE_MERGE = "stage:merge"
STAGE_MERGED = "stage:merged"
register_op("attack", "rescale", traits=(STAGE_MERGE,), fn=attack_rescale)


def execute_after_merge(ctx: NodeContext, op) -> dict[str, float]:
    """Run a ``stage:merged`` attack on the merged model ``release`` for the victim's dataset
    (datasets of another kind than text go to ``tasks.kinds``)."""
    from mergesec.data import dataset_slug, load_dataset_splits
    from mergesec.tasks import kinds
    from mergesec.tasks.evaluate import classifier_from_artifact

    if kinds.node_kind(ctx) != kinds.TEXT:
        return kinds.execute_after_merge(ctx, op)
    merged = ModelArtifact.open(ctx.inputs["release"])
    ds = ctx.params["dataset"]
    slug = dataset_slug(ds["uri"])
    if slug not in merged.heads:
        raise ValueError(f"the merged model has no head for the victim {ds['uri']}")
    model, tokenizer = classifier_from_artifact(merged, ctx.allow_remote_code, ctx.device)
    head = merged.head_state(slug)
    model.set_head(head["weight"].to(ctx.device), head["bias"].to(ctx.device))
    data = load_dataset_splits(ds["uri"], columns=ds.get("columns"))
    metrics = op.fn(model, tokenizer, data, ctx.device, ctx.report, **ctx.params["op"])
    heads = merged.all_heads()
    heads[f"{slug}.weight"] = model.head.weight.detach().cpu()
    heads[f"{slug}.bias"] = model.head.bias.detach().cpu()
    write_artifact(
        ctx.out_dir,
        base=merged.base,
        backbone={k: v.detach().cpu() for k, v in model.backbone.state_dict().items()},
        heads=heads,
        head_info=merged.heads,
        extra={"release": "full", "merge": merged.meta.get("merge"), "attack": op.name},
    )
    return metrics


register_op(
    "attack",
    "finetune_after_merge",
    traits=(STAGE_MERGED,),
    fn=finetune_after_merge,
    executor=lambda ctx: execute_after_merge(ctx, get_op("attack", ctx.op)),
)


def execute(ctx: NodeContext) -> dict[str, float]:
    op = get_op("attack", ctx.op)
    if STAGE_MERGE in op.traits:
        raise ValueError(f"attack/{op.name} acts inside the merge step; it has no attack node")
    release = ModelArtifact.open(ctx.inputs["release"])
    sd = release.backbone_state()
    base, layout = base_and_layout(ctx, sd.keys())
    params = dict(ctx.params["op"])
    if op.param("device") is not None:
        params["device"] = ctx.device
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
