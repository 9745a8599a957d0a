"""The merge step: stream the experts' weights through a merge op; search its settings on validation.

Parameters given as ``{search: [...]}`` are chosen inside the node: every combination is merged,
scored by the mean over datasets of validation accuracy normalised by each expert's own validation
accuracy, and the best merge is kept. The choice and every candidate's score are recorded.
"""

from __future__ import annotations

import itertools
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from mergesec.models.artifact import MODEL_FILE, HeadInfo, ModelArtifact, write_artifact
from mergesec.models.state_dict import LazyStateDict
from mergesec.tasks.context import NodeContext
from mergesec.tasks.registry import get_op, is_search


def candidates(params: dict[str, Any]) -> list[dict[str, Any]]:
    """Every combination of the searched parameters, the fixed ones filled in."""
    searched = {k: v["search"] for k, v in params.items() if is_search(v)}
    fixed = {k: v for k, v in params.items() if not is_search(v)}
    if not searched:
        return [fixed]
    names = list(searched)
    return [
        fixed | dict(zip(names, combo, strict=True))
        for combo in itertools.product(*searched.values())
    ]


def merged_heads(
    experts: list[ModelArtifact],
) -> tuple[dict[str, torch.Tensor], dict[str, HeadInfo]]:
    heads: dict[str, torch.Tensor] = {}
    info: dict[str, HeadInfo] = {}
    for art in experts:
        heads.update(art.all_heads())
        info.update(art.heads)
    return heads, info


def validation_score(
    art_dir: Path, datasets: list[dict], reference: dict[str, float], ctx: NodeContext
) -> dict[str, float]:
    from mergesec.data import dataset_slug
    from mergesec.tasks.evaluate import evaluate_artifact

    m = evaluate_artifact(
        ModelArtifact.open(art_dir), datasets, split="validation", device=ctx.device
    )
    norm = [
        m[f"accuracy/{dataset_slug(d['uri'])}"] / max(reference[dataset_slug(d["uri"])], 1e-9)
        for d in datasets
    ]
    return {"score": sum(norm) / len(norm), **m}


def execute(ctx: NodeContext) -> dict[str, float]:
    from mergesec.models.hub import base_weights_file
    from mergesec.tasks.evaluate import evaluate_artifact
    from mergesec.tasks.merge_stream import stream_merge

    op = get_op("merge", ctx.op)
    experts = [ModelArtifact.open(p) for p in ctx.inputs_with_prefix("expert").values()]
    base = LazyStateDict(base_weights_file(ctx.base, ctx.allow_remote_code))
    heads, head_info = merged_heads(experts)
    datasets = ctx.params["datasets"]
    cands = candidates(ctx.params["op"])

    def merge_into(out: Path, params: dict[str, Any]) -> None:
        out.mkdir(parents=True, exist_ok=True)
        stream_merge(op.fn, base, [e.backbone_lazy() for e in experts], params, out / MODEL_FILE)
        write_artifact(
            out,
            base=ctx.base,
            backbone=None,
            heads=heads,
            head_info=head_info,
            extra={"merge": op.name},
        )

    metrics: dict[str, float] = {"experts": float(len(experts))}
    if len(cands) == 1:
        merge_into(ctx.out_dir, cands[0])
        return metrics

    reference: dict[str, float] = {}
    for e in experts:
        m = evaluate_artifact(e, datasets, split="validation", device=ctx.device)
        reference.update(
            {
                k.split("/", 1)[1]: v
                for k, v in m.items()
                if k.startswith("accuracy/") and k != "accuracy/mean"
            }
        )
    best: tuple[float, dict[str, Any], Path] | None = None
    scratch = Path(tempfile.mkdtemp(prefix="merge-search-", dir=ctx.out_dir.parent))
    try:
        for i, params in enumerate(cands):
            out = scratch / f"c{i}"
            merge_into(out, params)
            s = validation_score(out, datasets, reference, ctx)
            searched = {k: v for k, v in params.items() if is_search(ctx.params["op"].get(k))}
            ctx.report(
                {
                    "search/score": s["score"],
                    **{f"search/{k}": float(v) for k, v in searched.items()},
                },
                i,
            )
            if best is None or s["score"] > best[0]:
                if best is not None:
                    shutil.rmtree(best[2], ignore_errors=True)
                best = (s["score"], searched, out)
            else:
                shutil.rmtree(out, ignore_errors=True)
        assert best is not None
        for f in best[2].iterdir():
            shutil.move(str(f), ctx.out_dir / f.name)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    metrics["search/best_score"] = best[0]
    metrics.update({f"chosen/{k}": float(v) for k, v in best[1].items()})
    return metrics
