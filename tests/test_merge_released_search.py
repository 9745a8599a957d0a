"""The released attacker's search in the merge step (``merge: {search: released}``): the plan gives
the merge node its order and the victim's unprotected expert, the node runs the greedy
coordinate search normalised by that expert, and writes the chosen merge."""

from __future__ import annotations

import textwrap

import pytest
import torch

from mergesec.core.context import NodeContext
from mergesec.core.registry import get_op, validate_params
from mergesec.merging.coordinate_search import RELEASED_GRIDS, RELEASED_START, coordinate_search
from mergesec.models.artifact import HeadInfo, ModelArtifact, write_artifact
from mergesec.models.hub import base_weights_file, model_identity
from mergesec.models.state_dict import load_state_dict
from mergesec.orchestrator.plan import build_plan
from mergesec.orchestrator.spec import load_study
from mergesec.tasks import merge
from mergesec.tasks.evaluate import evaluate_artifact
from mergesec.tasks.merge_search import gram_sample
from mergesec.training.sampling import class_balanced_indices

DATASETS = [{"uri": "builtin:synthetic_sentiment"}, {"uri": "builtin:synthetic_topic"}]
LABELS = {"synthetic_sentiment": ["negative", "positive"], "synthetic_topic": ["a", "b", "c", "d"]}


def synthetic_expert(path, tiny_bert, slug: str, seed: int, scale: float = 0.05):
    """The base plus a random update, with a random head for ``slug``."""
    g = torch.Generator().manual_seed(seed)
    base = load_state_dict(base_weights_file(str(tiny_bert)))
    sd = {
        k: v + scale * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
        for k, v in base.items()
    }  # fmt: skip
    heads = {
        f"{slug}.weight": torch.randn(len(LABELS[slug]), 32, generator=g),
        f"{slug}.bias": torch.zeros(len(LABELS[slug])),
    }
    write_artifact(path, base=str(tiny_bert), backbone=sd, heads=heads,
                   head_info={slug: HeadInfo(f"builtin:{slug}", LABELS[slug])})  # fmt: skip
    return path


def test_released_search_in_the_merge_step(tmp_path, tiny_bert):
    experts = {s: synthetic_expert(tmp_path / s, tiny_bert, s, seed=i) for i, s in
               enumerate(LABELS)}  # fmt: skip
    clean = synthetic_expert(
        tmp_path / "clean", tiny_bert, "synthetic_sentiment", seed=7, scale=0.02
    )
    op = validate_params(get_op("merge", "ties"), {})
    reports = []
    out = tmp_path / "merged"
    out.mkdir()
    params = {"base": str(tiny_bert), "base_id": model_identity(str(tiny_bert)),
              "datasets": DATASETS, "op": op,
              "search": {"mode": "released", "order": ["coefficient", "k"]}}  # fmt: skip
    inputs = {f"expert.{s}": d for s, d in experts.items()} | {
        "reference.synthetic_sentiment": clean
    }
    ctx = NodeContext("m", "merge", "ties", params, inputs, out,
                      report=lambda m, s: reports.append((s, m)))  # fmt: skip
    m = merge.execute(ctx)

    # the criterion's references: the unprotected expert for the victim, the expert otherwise
    ref_clean = evaluate_artifact(ModelArtifact.open(clean), DATASETS[:1], split="validation")
    ref_topic = evaluate_artifact(ModelArtifact.open(experts["synthetic_topic"]), DATASETS[1:],
                                  split="validation")  # fmt: skip
    assert m["reference/synthetic_sentiment"] == pytest.approx(
        ref_clean["accuracy/synthetic_sentiment"], abs=1e-9
    )
    assert m["reference/synthetic_topic"] == pytest.approx(
        ref_topic["accuracy/synthetic_topic"], abs=1e-9
    )

    # the trials are the greedy coordinate search's, in order: replaying the reported scores
    # through coordinate_search asks for the same settings and chooses the same ones
    assert [s for s, _ in reports] == list(range(len(reports)))
    tried = [(r["search/coefficient"], r["search/k"]) for _, r in reports]
    scores = dict(zip(tried, (r["search/score"] for _, r in reports), strict=True))
    replay = coordinate_search(
        lambda s: scores[(s["coefficient"], s["k"])], order=("coefficient", "k")
    )
    assert [(s["coefficient"], s["k"]) for s, _ in replay.trials] == tried
    assert tried[0] == (RELEASED_GRIDS["coefficient"][0], RELEASED_START["k"])
    assert {k for c, k in tried if c != m["chosen/coefficient"]} == {RELEASED_START["k"]}
    assert len(tried) < 99 + 10, "early stopping ended a pass"
    assert m["chosen/coefficient"] == replay.best["coefficient"]
    assert m["chosen/k"] == replay.best["k"]
    assert m["search/best_score"] == replay.score

    # the written merge is TIES at the chosen settings
    base = load_state_dict(base_weights_file(str(tiny_bert)))
    sds = [ModelArtifact.open(d).backbone_state() for d in experts.values()]
    want = get_op("merge", "ties").fn(base, sds, k=m["chosen/k"],
                                      coefficient=m["chosen/coefficient"])  # fmt: skip
    got = ModelArtifact.open(out).backbone_state()
    for k in want:
        assert torch.equal(got[k], want[k]), k


STUDY = """
study: s
base: builtin:minilm-l6
datasets: [builtin:synthetic_sentiment, builtin:synthetic_topic]
finetune: {mode: lora, epochs: 1}
scenarios:
  unprotected: {}
  trap2: {protect: {op: trap2}}
victims: [builtin:synthetic_sentiment]
merge: {op: dare_ties_released, search: released, k: 0.5, space: {grid: [full, knots, core]}}
"""


def test_the_plan_gives_the_merge_its_search_order_space_and_unprotected_reference(tmp_path):
    f = tmp_path / "s.yaml"
    f.write_text(textwrap.dedent(STUDY))
    plan = build_plan(load_study(f))
    merges = [n for n in plan.nodes.values() if n.step == "merge"]
    assert len(merges) == 6  # 3 spaces x 2 scenarios
    assert {n.params.get("space", "full") for n in merges} == {"full", "knots", "core"}
    clean = {n.id for n in plan.nodes.values() if n.step == "finetune"}
    for n in merges:
        # k is given, so only the coefficient and the drop rate are searched
        assert n.params["search"] == {"mode": "released", "order": ["coefficient", "drop_rate"]}
        assert n.params["op"]["k"] == 0.5
        if n.inputs["expert.synthetic_sentiment"] in clean:
            assert "reference.synthetic_sentiment" not in n.inputs
        else:  # the Trap² release is normalised by the clean expert
            assert n.inputs["reference.synthetic_sentiment"] in clean
    assert len({n.id for n in merges}) == 6


def test_plain_merges_keep_their_identity(tmp_path):
    f = tmp_path / "s.yaml"
    f.write_text(textwrap.dedent(STUDY).replace(", search: released, k: 0.5, space: {grid: "
                                                 "[full, knots, core]}", ""))  # fmt: skip
    merges = [n for n in build_plan(load_study(f)).nodes.values() if n.step == "merge"]
    assert merges and all("search" not in n.params and "space" not in n.params for n in merges)


def test_class_balanced_gram_sample():
    labels = [0] * 50 + [1] * 5 + [2] * 45
    idx = class_balanced_indices(labels, 12, seed=0)
    assert idx == sorted(idx) and len(set(idx)) == 12
    assert [sum(labels[i] == c for i in idx) for c in range(3)] == [4, 4, 4]
    idx = class_balanced_indices(labels, 30, seed=0)
    assert [sum(labels[i] == c for i in idx) for c in range(3)] == [13, 5, 12]  # class 1 runs out
    assert class_balanced_indices(labels, 500) == list(range(100))

    from mergesec.data.splits import Example

    split = [Example(f"t{i}", y) for i, y in enumerate(labels)]
    picked = gram_sample(split, 9, "class_balanced")
    assert sorted(e.label for e in picked) == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert len(gram_sample(split, 9, "random")) == 9
    assert gram_sample(split, 9, None) is split
    with pytest.raises(ValueError, match="labelled split"):
        gram_sample([{"q": 1}, {"q": 2}], 1, "class_balanced")


def test_left_out_and_majority_references_in_the_results(tmp_path, tiny_bert):
    """``references: [left_out]`` plans the merge without the victim, scored with the victim's
    head; every row carries the victim's majority-class rate on its test split."""
    from collections import Counter

    import yaml

    from mergesec.kinds import get_kind
    from mergesec.merging.methods.linear import task_arithmetic
    from mergesec.orchestrator.runner import execute_node
    from mergesec.orchestrator.store import Store
    from mergesec.report import build_results

    doc = {
        "study": "refs",
        "base": str(tiny_bert),
        "datasets": ["builtin:synthetic_sentiment", "builtin:synthetic_topic"],
        "finetune": {"mode": "full", "epochs": 1, "max_length": 32},
        "scenarios": {"unprotected": {}},
        "victims": ["builtin:synthetic_sentiment"],
        "merge": {"op": "task_arithmetic", "coefficient": 0.5},
        "references": ["left_out"],
    }
    f = tmp_path / "study.yaml"
    f.write_text(yaml.safe_dump(doc))
    plan = build_plan(load_study(f))
    (row,) = plan.rows
    left_eval = plan.nodes[row.left_out_eval]
    left_merge = plan.nodes[left_eval.inputs["model"]]
    assert set(left_merge.inputs) == {"expert.synthetic_topic"}
    assert (
        left_eval.inputs["head.synthetic_sentiment"] == plan.nodes[row.victim_eval].inputs["model"]
    )
    assert [d["uri"] for d in left_merge.params["datasets"]] == ["builtin:synthetic_topic"]
    store = Store(str(tmp_path / "store"))
    for node in plan.topological():
        execute_node(node, store)
    (res,) = build_results(plan, store)

    data = get_kind("text").load({"uri": "builtin:synthetic_sentiment"})
    labels = [e.label for e in data.split("test")]
    assert res["victim_majority"] == max(Counter(labels).values()) / len(labels)

    # the left-out reference: the topic expert alone, merged, with the sentiment expert's head
    synthetic_topic = ModelArtifact.open(
        store.local_dir(left_merge.inputs["expert.synthetic_topic"])
    )
    victim = ModelArtifact.open(store.local_dir(left_eval.inputs["head.synthetic_sentiment"]))
    base = load_state_dict(base_weights_file(str(tiny_bert)))
    merged = task_arithmetic(base, [synthetic_topic.backbone_state()], coefficient=0.5)
    out = tmp_path / "by-hand"
    write_artifact(out, base=str(tiny_bert), backbone=merged,
                   heads=victim.all_heads(), head_info=victim.heads)  # fmt: skip
    want = evaluate_artifact(ModelArtifact.open(out), DATASETS[:1])["accuracy/synthetic_sentiment"]
    assert res["victim_left_out"] == pytest.approx(want, abs=1e-9)
    assert res["victim_left_out"] is not None and res["victim_merged"] is not None


def test_left_out_merge_is_planned_once_for_every_scenario(tmp_path, tiny_bert):
    """The others' merge does not depend on the scenario: one node, and one evaluation per
    scenario with that scenario's victim head."""
    import yaml

    doc = {
        "study": "refs",
        "base": str(tiny_bert),
        "datasets": ["builtin:synthetic_sentiment", "builtin:synthetic_topic"],
        "finetune": {"mode": "full", "epochs": 1, "max_length": 32},
        "scenarios": {"unprotected": {}, "params": {"protect": {"op": "params"}}},
        "victims": ["builtin:synthetic_sentiment"],
        "merge": {"op": {"grid": ["task_arithmetic", "ties"]}, "coefficient": 0.5},
        "references": ["left_out"],
    }
    f = tmp_path / "study.yaml"
    f.write_text(yaml.safe_dump(doc))
    plan = build_plan(load_study(f))
    assert len(plan.rows) == 4
    evals = [plan.nodes[row.left_out_eval] for row in plan.rows]
    merges = {e.inputs["model"] for e in evals}
    assert len(merges) == 2  # one per merge op, shared by both scenarios
    heads = {(e.inputs["model"], e.inputs["head.synthetic_sentiment"]) for e in evals}
    assert len(heads) == 4  # each row scores with its own scenario's victim release
