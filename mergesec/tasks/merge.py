"""The merge step: stream the experts' weights through a merge op; search its settings on validation.

Parameters given as ``{search: [...]}`` are chosen inside the node: every combination is merged,
scored by the mean over datasets of validation accuracy normalised by each expert's own validation
accuracy, and the best merge is kept. The choice (``chosen/<param>``), the references
(``reference/<slug>``) and every candidate's score are recorded.

Additions riding on the same search:

- With node param ``search_examples`` (the study's ``evaluate.search_examples``) every dataset's
  accuracy in the score, and its reference, is measured on that many validation examples (a fixed
  draw, seed 0) instead of the whole split.
- An attack at stage ``merge`` (node param ``attack``: ``{op, version, params, victim}``) replaces
  the victim's expert by each of its candidates (e.g. ``attack/rescale``: W₀ + s·τ_v), jointly
  with the op's searched settings. When the attack says the attacker holds only ``n_val`` labelled
  victim examples, the victim is scored on at most that many (the same kind of fixed draw).
- Ops with the trait ``grams`` (``merge/regmean``) get, per expert, the input Gram matrices of its
  backbone's Linear layers on up to ``GRAM_EXAMPLES`` unlabelled validation texts of its own
  dataset (the dataset of its input role ``expert.<slug>``); an op with ``gram_examples`` and
  ``gram_sample`` parameters (``merge/regmean_released``) chooses how many and how they are drawn.
- Node param ``search: {mode: released, order: [...]}`` (the study's ``merge.search: released``)
  replaces the grid by the released attacker's greedy coordinate search
  (``merging.coordinate_search``) over the parameters in ``order``, once per victim variant. Its
  criterion normalises each dataset by the *unprotected* expert's validation accuracy: input
  ``reference.<slug>`` where the merged expert is a protected or attacked release.
- Node param ``space`` (``knots`` or ``core``) runs the op in a LoRA merge space
  (``merging.spaces``); ``core`` reads each expert's peft adapter.

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
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mergesec.core.context import NodeContext
from mergesec.core.registry import GRAMS, get_op, is_search
from mergesec.data import dataset_slug
from mergesec.merging.coordinate_search import coordinate_search
from mergesec.merging.search import (
    SCALE,
    CandidateLoader,
    candidates,
    scale_trait,
    setting_key,
)
from mergesec.merging.spaces import in_space
from mergesec.merging.stream import check_compatible, stream_merge
from mergesec.models.artifact import MODEL_FILE, HeadInfo, ModelArtifact, write_artifact
from mergesec.models.hub import base_weights_file
from mergesec.models.lora_factors import read_lora_factors
from mergesec.models.state_dict import LazyStateDict
from mergesec.tasks.merge_search import GRAM_EXAMPLES, ValidationScorer


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


# Reference accuracies already measured in this worker process. Merge nodes of one study score
# the same experts again and again; an artifact directory is written once (node outputs are
# content-addressed and immutable), so its files' sizes and times with the scorer's set-up
# identify the value.
_REFERENCE_MEMO: dict[tuple[Any, ...], float] = {}


def _artifact_stamp(art: ModelArtifact) -> tuple[Any, ...]:
    files = sorted(f for f in art.path.iterdir() if f.is_file())
    return (str(art.path.resolve()),) + tuple(
        (f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files
    )


def _reference_accuracies(
    scorer: ValidationScorer,
    experts: Sequence[ModelArtifact],
    lazies: Sequence[Mapping[str, Tensor]],
    references: Mapping[str, Path],
    slugs: Sequence[str],
) -> dict[str, float]:
    """Each dataset's validation accuracy of its expert alone, or of its unprotected expert
    (input ``reference.<slug>``) where the merge node was given one."""
    jobs = [
        (e, w, [s for s in e.heads if s in slugs]) for e, w in zip(experts, lazies, strict=True)
    ]
    for slug, path in references.items():
        ref = ModelArtifact.open(path)
        jobs.append((ref, ref.backbone_lazy(), [slug]))
    out: dict[str, float] = {}
    for art, weights, own in jobs:
        keys = {s: (_artifact_stamp(art), scorer.setup_key(s)) for s in own}
        missing = [s for s in own if keys[s] not in _REFERENCE_MEMO]
        if missing:
            scorer.load(weights)
            for s, acc in scorer.accuracies(art.all_heads(), missing).items():
                _REFERENCE_MEMO[keys[s]] = acc
        out.update({s: _REFERENCE_MEMO[keys[s]] for s in own})
    return out


def _space_factors(
    space: str, roles: Mapping[str, Path], base_keys: Sequence[str]
) -> list[dict[str, tuple[Tensor, Tensor]]] | None:
    """Each expert's LoRA factors when the space needs them (``core``), else None."""
    if space != "core":
        return None
    factors = [read_lora_factors(p, base_keys) for p in roles.values()]
    names = list(roles)
    for name, f in zip(names[1:], factors[1:], strict=True):
        if set(f) != set(factors[0]):
            raise ValueError(
                f"space core needs the same LoRA layers in every expert; {names[0]!r} and "
                f"{name!r} adapt different ones"
            )
    return factors


def execute(ctx: NodeContext) -> dict[str, float]:

    op = get_op("merge", ctx.op)
    space = ctx.params.get("space", "full")
    released = ctx.params.get("search")  # {"mode": "released", "order": [...]} or None
    roles = ctx.inputs_with_prefix("expert")
    references = ctx.inputs_with_prefix("reference")
    experts = [ModelArtifact.open(p) for p in roles.values()]
    lazies: list[Mapping[str, Tensor]] = [e.backbone_lazy() for e in experts]
    base = LazyStateDict(base_weights_file(ctx.base, ctx.allow_remote_code))
    merge_fn = in_space(op, space, _space_factors(space, roles, list(base.keys())))
    heads, head_info = merged_heads(experts)
    datasets = ctx.params["datasets"]
    slugs = [dataset_slug(d["uri"]) for d in datasets]
    own = [_own_dataset(r, e, slugs) for r, e in zip(roles, experts, strict=True)]
    cands = candidates(ctx.params["op"])
    needs_grams = GRAMS in op.traits
    gram_n = ctx.params["op"].get("gram_examples", GRAM_EXAMPLES)
    gram_sample = ctx.params["op"].get("gram_sample")

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
    searching = n_total > 1 or released is not None
    specs = check_compatible(base, lazies)
    scorer = None
    if searching or needs_grams:
        scorer = ValidationScorer(
            ctx.base, datasets, device=ctx.device, allow_remote_code=ctx.allow_remote_code,
            subsets=subsets or None,
        )  # fmt: skip
    scratch = Path(tempfile.mkdtemp(prefix="merge-", dir=ctx.out_dir.parent))
    loader = None
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
                        own[i], scratch / f"grams-{i}-{key[1]}.safetensors",
                        n=gram_n, sample=gram_sample,
                    )  # fmt: skip
                out.append(gram_cache[key])
            return out

        def full_params(params: dict[str, Any], variant: int) -> dict[str, Any]:
            return params | {"grams": grams_for(variant)} if needs_grams else params

        metrics: dict[str, float] = {"experts": float(len(experts))}
        best: tuple[float | None, dict[str, Any], int] = (None, cands[0], 0)
        if searching:
            assert scorer is not None
            loader = CandidateLoader(
                merge_fn, scale_trait(op), base, specs, scorer.backbone, scratch
            )
            reference = _reference_accuracies(scorer, experts, lazies, references, slugs)
            metrics.update({f"reference/{s}": reference[s] for s in slugs})
            steps = itertools.count()

            def score(v: int, params: dict[str, Any], shown: Sequence[str]) -> float:
                """Merge candidate (v, params) into the scorer and report its score."""
                assert scorer is not None and loader is not None
                loader.load(v, members(v), full_params(params, v))
                acc = scorer.accuracies(heads, slugs)
                value = sum(acc[s] / max(reference[s], 1e-9) for s in slugs) / len(slugs)
                report = {"search/score": value, **{f"search/{k}": float(params[k]) for k in shown}}
                report |= {f"search/{k}": float(x) for k, x in variants[v][0].items()}
                if attack:
                    report["search/victim_accuracy"] = acc[attack["victim"]]
                ctx.report(report, next(steps))
                return value

            if released is not None:
                best = _released_search(released["order"], cands[0], len(variants), score)
                searched_names = list(released["order"])
            else:
                searched_names = [k for k, v in ctx.params["op"].items() if is_search(v)]
                best = _grid_search(cands, len(variants), score, searched_names, loader)
            metrics["search/best_score"] = best[0]
            metrics.update({f"chosen/{k}": float(best[1][k]) for k in searched_names})
            metrics.update({f"chosen/{k}": float(x) for k, x in variants[best[2]][0].items()})
        _, params, v = best
        out_file = ctx.out_dir / MODEL_FILE
        if loader is not None and loader.kept is not None and released is None:
            loader.kept.write(base, params[SCALE], specs, out_file)
        else:
            stream_merge(merge_fn, base, members(v), full_params(params, v), out_file)
    finally:
        if loader is not None:
            loader.close()
        shutil.rmtree(scratch, ignore_errors=True)
    extra: dict[str, Any] = {"merge": op.name}
    if space != "full":
        extra["space"] = space
    if experts[0].meta.get("kind"):
        extra["kind"] = experts[0].meta["kind"]
    if attack:
        extra["attack"] = attack["op"]
        extra["attack_choice"] = variants[best[2]][0]
    write_artifact(
        ctx.out_dir, base=ctx.base, backbone=None, heads=heads, head_info=head_info, extra=extra
    )
    return metrics


Scorer = Callable[[int, dict[str, Any], Sequence[str]], float]


def _grid_search(
    cands: list[dict[str, Any]],
    n_variants: int,
    score: Scorer,
    shown: Sequence[str],
    loader: CandidateLoader,
) -> tuple[float, dict[str, Any], int]:
    """Every (variant, candidate), grouped so that a Δ is merged once per setting of the other
    parameters; the best score wins, ties going to the first in candidate order."""
    items = list(itertools.product(range(n_variants), cands))
    order = sorted(range(len(items)), key=lambda i: (items[i][0], setting_key(items[i][1])))
    best: tuple[float, int] | None = None
    for i in order:
        v, params = items[i]
        value = score(v, params, shown)
        if best is None or value > best[0] or (value == best[0] and i < best[1]):
            best = (value, i)
            loader.keep_loaded()
    assert best is not None
    return best[0], items[best[1]][1], items[best[1]][0]


def _released_search(
    order: Sequence[str], fixed: dict[str, Any], n_variants: int, score: Scorer
) -> tuple[float, dict[str, Any], int]:
    """The released attacker's greedy coordinate search (``coordinate_search``), once per victim
    variant; the best variant wins (ties to the first)."""
    best: tuple[float, dict[str, Any], int] | None = None
    for v in range(n_variants):
        result = coordinate_search(
            lambda settings, v=v: score(v, fixed | settings, order), order=order
        )
        if best is None or result.score > best[0]:
            best = (result.score, fixed | result.best, v)
    assert best is not None
    return best
