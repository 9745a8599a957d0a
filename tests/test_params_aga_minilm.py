"""PaRaMS / MergeLock and AGA on MiniLM experts: the effects the papers claim, measured.

Protection must leave the victim's standalone accuracy unchanged, make its accuracy after merging
collapse, and AGA must bring it back close to the unprotected merge. The measured numbers are
written to the test's log (pytest -s shows them).
"""

from __future__ import annotations

import json

import pytest
from conftest import run_executor

pytestmark = pytest.mark.slow

BASE = "builtin:minilm-l6"
DATASETS = [{"uri": "builtin:sentiment"}, {"uri": "builtin:topic"}]
EVAL = {"batch_size": 64, "max_length": 64}


def _evaluate(root, model, datasets):
    _, m = run_executor(
        root,
        "evaluate",
        "accuracy",
        {"datasets": datasets, "split": "test", "op": EVAL},
        {"model": model},
    )
    return m


def _merge(root, victim, other):
    params = {
        "base": BASE,
        "datasets": DATASETS,
        "op": {"coefficient": {"search": [0.3, 0.5, 0.7, 1.0]}},
    }
    out, m = run_executor(
        root,
        "merge",
        "task_arithmetic",
        params,
        {"expert.sentiment": victim, "expert.topic": other},
    )
    return out, m


@pytest.mark.parametrize("defense", ["params", "mergelock"])
def test_protection_breaks_merging_and_aga_restores_it(tmp_path, minilm_experts, defense):
    clean, other = minilm_experts["sentiment"], minilm_experts["topic"]
    release, pm = run_executor(
        tmp_path, "protect", defense, {"base": BASE, "op": {"seed": 0}}, {"expert": clean}
    )
    attacked, am = run_executor(
        tmp_path,
        "attack",
        "aga",
        {"base": BASE, "op": {}},
        {"release": release, "reference": clean},
    )

    standalone = {
        k: _evaluate(tmp_path, m, DATASETS[:1])["accuracy/sentiment"]
        for k, m in (("clean", clean), ("release", release), ("attacked", attacked))
    }
    merged = {}
    for k, m in (("clean", clean), ("release", release), ("attacked", attacked)):
        out, mm = _merge(tmp_path, m, other)
        merged[k] = _evaluate(tmp_path, out, DATASETS) | {"coefficient": mm["chosen/coefficient"]}
    record = {
        "defense": defense,
        "standalone": standalone,
        "merged_victim": {k: v["accuracy/sentiment"] for k, v in merged.items()},
        "merged_other": {k: v["accuracy/topic"] for k, v in merged.items()},
        "coefficient": {k: v["coefficient"] for k, v in merged.items()},
        "task_vector_ratio": pm["task_vector_norm/ratio"],
        "aga_cos_all": am["diagnostics/cos/all"],
        "aga_mlp_match": am["diagnostics/mlp_match_fraction"],
    }
    print(json.dumps(record, indent=2))

    # function preserving: the release classifies the test set exactly as the clean expert does
    assert abs(standalone["release"] - standalone["clean"]) <= 1 / 400
    assert record["task_vector_ratio"] > 10
    # merging the protected release collapses the victim towards chance (2 labels)
    assert record["merged_victim"]["release"] <= 0.5 + 0.15 < record["merged_victim"]["clean"]
    # AGA: data-free recovery from the base alone brings the merge back near the unprotected one
    assert record["aga_mlp_match"] == 1.0
    assert record["merged_victim"]["attacked"] >= record["merged_victim"]["clean"] - 0.05
    assert abs(standalone["attacked"] - standalone["clean"]) <= 0.02
