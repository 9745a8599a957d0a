"""The merge step: stream the experts' weights through a merge op; search its settings on validation.

Parameters given as ``{search: [...]}`` are chosen inside the node: every combination is merged,
scored by the mean over datasets of validation accuracy normalised by each expert's own validation
accuracy, and the best merge is kept. The choice and every candidate's score are recorded.

Two additions ride on the same search:

- With node param ``search_examples`` (the study's ``evaluate.search_examples``) every dataset's
  accuracy in the score, and its reference, is measured on that many validation examples (a fixed
  draw, seed 0) instead of the whole split.
- An attack at stage ``merge`` (node param ``attack``: ``{op, version, params, victim}``) replaces
  the victim's expert by each of its candidates (e.g. ``attack/rescale``: W₀ + s·τ_v), jointly
  with the op's searched settings. When the attack says the attacker holds only ``n_val`` labelled
  victim examples, the victim is scored on at most that many (the same kind of fixed draw).
- Ops with the trait ``grams`` (``merge/regmean``) get, per expert, the input Gram matrices of its
  backbone's Linear layers on up to ``GRAM_EXAMPLES`` unlabelled validation texts of its own
  dataset (the dataset of its input role ``expert.<slug>``).

For ops whose coefficient only scales a merged task vector Δ (trait ``SCALES_TASK_VECTORS`` or
``SCALES_RESULT``, see ``merging.per_key``), the search merges once per setting of the other
parameters (and victim variant): Δ is kept (in memory, or one scratch file when large), each
coefficient candidate is loaded as θ₀ + c·Δ into the scoring model, and the chosen merge is
written from the kept Δ, bit for bit what the op gives. For other ops every candidate is merged
tensor by tensor straight into the loaded model, and the chosen one is written with
``stream_merge``.
"""

from __future__ import annotations

import itertools
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mergesec.core.context import NodeContext
from mergesec.core.registry import GRAMS, get_op, is_search
from mergesec.data import dataset_slug
from mergesec.merging.search import (
    SCALE,
    MergedDirection,
    candidates,
    merge_into_module,
    scale_trait,
    setting_key,
)
from mergesec.merging.stream import check_compatible, stream_merge
from mergesec.models.artifact import MODEL_FILE, HeadInfo, ModelArtifact, write_artifact
from mergesec.models.hub import base_weights_file
from mergesec.models.state_dict import LazyStateDict
from mergesec.tasks.merge_search import ValidationScorer


def merged_heads(
    experts: list[ModelArtifact],
) -> tuple[dict[str, torch.Tensor], dict[str, HeadInfo]]:
    heads: dict[str, torch.Tensor] = {}
    info: dict[str, HeadInfo] = {}
    for art in experts:
        heads.update(art.all_heads())
        info.update(art.heads)
    return heads, info


def _own_dataset(role: str, art: ModelArtifact, slugs: Sequence[str]) -> str:
    """The dataset an expert was trained on: its role's suffix, else its first head."""
    if role in slugs:
        return role
    own = [s for s in art.heads if s in slugs]
    if not own:
        raise ValueError(f"expert {role!r} has a head for none of the merged datasets")
    return own[0]


def execute(ctx: NodeContext) -> dict[str, float]:

    op = get_op("merge", ctx.op)
    roles = ctx.inputs_with_prefix("expert")
    experts = [ModelArtifact.open(p) for p in roles.values()]
    lazies: list[Mapping[str, Tensor]] = [e.backbone_lazy() for e in experts]
    base = LazyStateDict(base_weights_file(ctx.base, ctx.allow_remote_code))
    heads, head_info = merged_heads(experts)
    datasets = ctx.params["datasets"]
    slugs = [dataset_slug(d["uri"]) for d in datasets]
    own = [_own_dataset(r, e, slugs) for r, e in zip(roles, experts, strict=True)]
    cands = candidates(ctx.params["op"])
    needs_grams = GRAMS in op.traits

    # The victim's replacements: [(attack choice, weights or None for the expert as released)].
    variants: list[tuple[dict[str, float], Mapping[str, Tensor] | None]] = [({}, None)]
    attack = ctx.params.get("attack")
    victim_i = None
    # Validation examples per dataset that score a candidate (the study's search_examples).
    search_n = ctx.params.get("search_examples")
    subsets: dict[str, int] = {s: search_n for s in slugs} if search_n else {}
    if attack:
        a_op = get_op("attack", attack["op"])
        if attack["victim"] not in own:
            raise ValueError(f"attack victim {attack['victim']!r} is none of the merged experts")
        victim_i = own.index(attack["victim"])
        plan = a_op.fn(base, lazies[victim_i], **attack["params"])
        variants = [(dict(c), w) for c, w in plan.candidates]
        if plan.n_val is not None:
            v = attack["victim"]
            subsets[v] = min(subsets.get(v, plan.n_val), plan.n_val)

    def members(variant: int) -> list[Mapping[str, Tensor]]:
        out = list(lazies)
        w = variants[variant][1]
        if victim_i is not None and w is not None:
            out[victim_i] = w
        return out

    n_total = len(cands) * len(variants)
    specs = check_compatible(base, lazies)
    scorer = None
    if n_total > 1 or needs_grams:
        scorer = ValidationScorer(
            ctx.base, datasets, device=ctx.device, allow_remote_code=ctx.allow_remote_code,
            subsets=subsets or None,
        )  # fmt: skip
    scratch = Path(tempfile.mkdtemp(prefix="merge-", dir=ctx.out_dir.parent))
    try:
        gram_cache: dict[tuple[int, int], Mapping[str, Tensor]] = {}

        def grams_for(variant: int) -> list[Mapping[str, Tensor]]:
            assert scorer is not None
            out = []
            for i, weights in enumerate(members(variant)):
                key = (i, variant if i == victim_i else 0)
                if key not in gram_cache:
                    scorer.load(weights)
                    gram_cache[key] = scorer.grams(
                        own[i], scratch / f"grams-{i}-{key[1]}.safetensors"
                    )
                out.append(gram_cache[key])
            return out

        def full_params(params: dict[str, Any], variant: int) -> dict[str, Any]:
            return params | {"grams": grams_for(variant)} if needs_grams else params

        metrics: dict[str, float] = {"experts": float(len(experts))}
        best = (None, cands[0], 0)
        kept: MergedDirection | None = None  # Δ of the best candidate, when the op has one
        trait = scale_trait(op)
        if n_total > 1:
            assert scorer is not None
            reference: dict[str, float] = {}
            for e, w in zip(experts, lazies, strict=True):
                scorer.load(w)
                reference.update(
                    scorer.accuracies(e.all_heads(), [s for s in e.heads if s in slugs])
                )
            searched_names = [k for k, v in ctx.params["op"].items() if is_search(v)]
            items = list(itertools.product(range(len(variants)), cands))
            best_i = -1

            def score(i: int) -> None:
                """Score the candidate loaded into the scorer; keep it if it is the best so far
                (ties go to the first in candidate order)."""
                nonlocal best, best_i
                v, params = items[i]
                acc = scorer.accuracies(heads, slugs)
                value = sum(acc[s] / max(reference[s], 1e-9) for s in slugs) / len(slugs)
                report = {
                    "search/score": value,
                    **{f"search/{k}": float(params[k]) for k in searched_names},
                }
                report |= {f"search/{k}": float(x) for k, x in variants[v][0].items()}
                if attack:
                    report["search/victim_accuracy"] = acc[attack["victim"]]
                ctx.report(report, i)
                if best[0] is None or value > best[0] or (value == best[0] and i < best_i):
                    best, best_i = (value, params, v), i

            if trait is None:
                for i, (v, params) in enumerate(items):
                    merge_into_module(
                        op.fn, base, members(v), full_params(params, v), scorer.backbone
                    )
                    score(i)
            else:
                # One merge per setting of the other parameters (and victim variant); each
                # coefficient is applied to its Δ.
                groups: dict[tuple[int, str], list[int]] = {}
                for i, (v, params) in enumerate(items):
                    groups.setdefault((v, setting_key(params)), []).append(i)
                for g, ((v, _), idxs) in enumerate(groups.items()):
                    first = items[idxs[0]][1]
                    direction = MergedDirection.compute(
                        op.fn, trait, base, members(v), full_params(first, v), specs,
                        scratch / f"delta-{g}.safetensors",
                    )  # fmt: skip
                    for i in idxs:
                        direction.load_into(base, items[i][1][SCALE], scorer.backbone)
                        score(i)
                        if best_i == i and kept is not direction:
                            if kept is not None:
                                kept.close()
                            kept = direction
                    if kept is not direction:
                        direction.close()
            metrics["search/best_score"] = best[0]
            metrics.update({f"chosen/{k}": float(best[1][k]) for k in searched_names})
            metrics.update({f"chosen/{k}": float(x) for k, x in variants[best[2]][0].items()})
        _, params, v = best
        out_file = ctx.out_dir / MODEL_FILE
        if kept is not None:
            kept.write(base, params[SCALE], specs, out_file)
            kept.close()
        else:
            stream_merge(op.fn, base, members(v), full_params(params, v), out_file)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    extra: dict[str, Any] = {"merge": op.name}
    if experts[0].meta.get("kind"):
        extra["kind"] = experts[0].meta["kind"]
    if attack:
        extra["attack"] = attack["op"]
        extra["attack_choice"] = variants[best[2]][0]
    write_artifact(
        ctx.out_dir, base=ctx.base, backbone=None, heads=heads, head_info=head_info, extra=extra
    )
    return metrics
