"""The merge step's search: candidates merged into one live model score like the written merge."""

from __future__ import annotations

import json

import pytest
import torch

from mergesec.core.context import NodeContext
from mergesec.core.registry import get_op, validate_params
from mergesec.merging.methods.linear import task_arithmetic
from mergesec.merging.search import merge_into_module
from mergesec.merging.stream import stream_merge
from mergesec.models.artifact import HeadInfo, ModelArtifact, write_artifact
from mergesec.models.hub import base_weights_file, load_backbone, model_identity
from mergesec.models.state_dict import LazyStateDict, load_state_dict
from mergesec.tasks import merge
from mergesec.tasks.evaluate import evaluate_artifact

DATASETS = [{"uri": "builtin:synthetic_sentiment"}, {"uri": "builtin:synthetic_topic"}]
LABELS = {"synthetic_sentiment": ["negative", "positive"], "synthetic_topic": ["a", "b", "c", "d"]}


@pytest.fixture
def experts(tmp_path, tiny_bert):
    """Two synthetic experts: the base plus a random update, and a random head for their dataset."""
    torch.manual_seed(0)
    base = load_state_dict(base_weights_file(str(tiny_bert)))
    dirs = {}
    for slug, labels in LABELS.items():
        sd = {
            k: v + 0.05 * torch.randn_like(v) if v.is_floating_point() else v
            for k, v in base.items()
        }  # fmt: skip
        heads = {
            f"{slug}.weight": torch.randn(len(labels), 32),
            f"{slug}.bias": torch.zeros(len(labels)),
        }
        dirs[slug] = tmp_path / slug
        write_artifact(dirs[slug], base=str(tiny_bert), backbone=sd, heads=heads,
                       head_info={slug: HeadInfo(f"builtin:{slug}", labels)})  # fmt: skip
    return dirs


@pytest.mark.parametrize("op", ["ties", "dare_ties", "tsv", "cart"])
def test_merge_into_module_equals_the_streamed_file(tmp_path, tiny_bert, experts, op):
    base = LazyStateDict(base_weights_file(str(tiny_bert)))
    lazies = [ModelArtifact.open(d).backbone_lazy() for d in experts.values()]
    params = validate_params(get_op("merge", op), {"coefficient": 0.8})
    stream_merge(get_op("merge", op).fn, base, lazies, params, tmp_path / "m.safetensors")
    model = load_backbone(str(tiny_bert))
    merge_into_module(get_op("merge", op).fn, base, lazies, params, model)
    want = load_state_dict(tmp_path / "m.safetensors")
    got = model.state_dict()
    for k, v in want.items():
        assert torch.equal(got[k], v), k


def test_coefficient_search_up_to_ten_keeps_the_best_and_its_score(tmp_path, tiny_bert, experts):
    coefs = [0.1, 1.0, 3.0, 10.0]
    op = validate_params(get_op("merge", "task_arithmetic"), {"coefficient": {"search": coefs}})
    assert op["coefficient"] == {"search": coefs}
    reports = []
    out = tmp_path / "merged"
    out.mkdir()
    params = {"base": str(tiny_bert), "base_id": model_identity(str(tiny_bert)),
              "datasets": DATASETS, "op": op}  # fmt: skip
    ctx = NodeContext("m", "merge", "task_arithmetic", params,
                      {f"expert.{s}": d for s, d in experts.items()}, out,
                      report=lambda m, s: reports.append((s, m)))  # fmt: skip
    m = merge.execute(ctx)
    assert [s for s, _ in reports] == list(range(len(coefs)))
    scores = {p["search/coefficient"]: p["search/score"] for _, p in reports}
    assert set(scores) == set(coefs)
    assert len(set(scores.values())) > 1, "the coefficient changes the merged model's accuracy"
    assert m["chosen/coefficient"] == max(scores, key=scores.get)
    assert m["search/best_score"] == max(scores.values())

    # the written merge is task arithmetic at the chosen coefficient ...
    base = load_state_dict(base_weights_file(str(tiny_bert)))
    sds = [ModelArtifact.open(d).backbone_state() for d in experts.values()]
    want = task_arithmetic(base, sds, coefficient=m["chosen/coefficient"])
    got = ModelArtifact.open(out).backbone_state()
    for k in want:
        torch.testing.assert_close(got[k], want[k])
    # ... and re-scoring it from disk with the evaluate step gives the reported score
    acc = evaluate_artifact(ModelArtifact.open(out), DATASETS, split="validation")
    ref = {}
    for d in experts.values():
        ref |= evaluate_artifact(ModelArtifact.open(d), DATASETS, split="validation")
    score = sum(acc[f"accuracy/{s}"] / ref[f"accuracy/{s}"] for s in LABELS) / len(LABELS)
    assert score == pytest.approx(m["search/best_score"], abs=0.011)
    meta = json.loads((out / "model.json").read_text())
    assert meta["merge"] == "task_arithmetic" and set(meta["heads"]) == set(LABELS)


def test_reference_accuracies_are_measured_once_per_artifact_and_setup(
    tmp_path, tiny_bert, experts, monkeypatch
):
    """A worker that runs many merge nodes over the same experts scores each expert's reference
    once; rewriting an expert, or scoring on another validation subset, measures it again."""
    from mergesec.tasks.merge_search import ValidationScorer

    monkeypatch.setattr(merge, "_REFERENCE_MEMO", {})
    calls: list[tuple[str, ...]] = []
    real = ValidationScorer.accuracies

    def counting(self, heads, slugs):
        calls.append(tuple(slugs))
        return real(self, heads, slugs)

    monkeypatch.setattr(ValidationScorer, "accuracies", counting)
    op = validate_params(
        get_op("merge", "task_arithmetic"), {"coefficient": {"search": [0.5, 1.0]}}
    )

    def run(name: str, search_examples: int | None = None) -> dict[str, float]:
        out = tmp_path / name
        out.mkdir()
        params = {"base": str(tiny_bert), "base_id": model_identity(str(tiny_bert)),
                  "datasets": DATASETS, "op": op}  # fmt: skip
        if search_examples:
            params["search_examples"] = search_examples
        ctx = NodeContext(name, "merge", "task_arithmetic", params,
                          {f"expert.{s}": d for s, d in experts.items()}, out)  # fmt: skip
        calls.clear()
        return merge.execute(ctx)

    first = run("a")
    assert len(calls) == 2 + 2  # two references (one per expert), two candidates
    second = run("b")
    assert len(calls) == 2  # the candidates only
    assert {k: v for k, v in second.items() if k.startswith("reference/")} == {
        k: v for k, v in first.items() if k.startswith("reference/")
    }
    run("c", search_examples=5)
    assert len(calls) == 2 + 2  # another validation subset: measured again

    # an expert written anew (another node output at the same path) is measured again
    sentiment = experts["synthetic_sentiment"]
    art = ModelArtifact.open(sentiment)
    sd = {k: v * 1.5 for k, v in load_state_dict(sentiment / "model.safetensors").items()}
    write_artifact(sentiment, base=str(tiny_bert), backbone=sd, heads=art.all_heads(),
                   head_info=art.heads)  # fmt: skip
    run("d")
    assert len(calls) == 1 + 2


def test_scoring_batches_are_tokenised_once_per_worker(tiny_bert):
    """Two scorers of the same datasets on the same base (two merge nodes in one worker) share
    the tokenised batches; another subset size is tokenised anew."""
    from mergesec.tasks.merge_search import ValidationScorer

    a = ValidationScorer(str(tiny_bert), DATASETS, subsets={"synthetic_sentiment": 12})
    b = ValidationScorer(str(tiny_bert), DATASETS, subsets={"synthetic_sentiment": 12})
    c = ValidationScorer(str(tiny_bert), DATASETS, subsets={"synthetic_sentiment": 13})
    assert a.prepared["synthetic_sentiment"] is b.prepared["synthetic_sentiment"]
    assert a.prepared["synthetic_topic"] is b.prepared["synthetic_topic"]
    assert a.prepared["synthetic_sentiment"] is not c.prepared["synthetic_sentiment"]
    assert sum(len(x["labels"]) for x in c.prepared["synthetic_sentiment"]) == 13
    # batches grouped by token count: each batch is padded only to its own longest text
    lengths = [int(x["attention_mask"].sum(1).max()) for x in a.prepared["synthetic_topic"]]
    assert lengths == sorted(lengths)
