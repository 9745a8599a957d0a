"""PaRaMS / MergeLock and AGA on MiniLM experts: the effects the papers claim, measured.

Protection must leave the victim's standalone accuracy unchanged, make its accuracy after merging
collapse, and AGA must bring it back close to the unprotected merge. Merges follow the PaRaMS
task-arithmetic protocol (fixed λ from its sweep, here both ends: 0.3 and 0.8). The measured
numbers are printed (pytest -s shows them). The quickstart reports the same comparison with the
coefficient searched on validation data instead, where the attacker may pick λ = 1.
"""

from __future__ import annotations

import json

import pytest
from conftest import run_executor

pytestmark = pytest.mark.slow

BASE = "builtin:minilm-l6"
DATASETS = [{"uri": "builtin:sentiment"}, {"uri": "builtin:topic"}]
EVAL = {"batch_size": 64, "max_length": 64}
LAMBDAS = (0.3, 0.8)


def _victim_accuracy(root, model) -> float:
    _, m = run_executor(
        root,
        "evaluate",
        "accuracy",
        {"datasets": DATASETS[:1], "split": "test", "op": EVAL},
        {"model": model},
    )
    return m["accuracy/sentiment"]


def _merged_victim_accuracy(root, victim, other, lam: float) -> float:
    params = {"base": BASE, "datasets": DATASETS, "op": {"coefficient": lam}}
    out, _ = run_executor(
        root,
        "merge",
        "task_arithmetic",
        params,
        {"expert.sentiment": victim, "expert.topic": other},
    )
    return _victim_accuracy(root, out)


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
    models = {"clean": clean, "release": release, "attacked": attacked}
    standalone = {k: _victim_accuracy(tmp_path, m) for k, m in models.items()}
    merged = {
        lam: {k: _merged_victim_accuracy(tmp_path, m, other, lam) for k, m in models.items()}
        for lam in LAMBDAS
    }
    record = {
        "defense": defense,
        "standalone": standalone,
        "merged_victim_by_lambda": merged,
        "task_vector_ratio": pm["task_vector_norm/ratio"],
        "aga_cos_all": am["diagnostics/cos/all"],
        "aga_mlp_match": am["diagnostics/mlp_match_fraction"],
    }
    print(json.dumps(record, indent=2))

    # function preserving: the release classifies the test set as the clean expert does
    assert abs(standalone["release"] - standalone["clean"]) <= 1 / 400
    assert record["task_vector_ratio"] > 10
    assert record["aga_mlp_match"] == 1.0
    assert abs(standalone["attacked"] - standalone["clean"]) <= 0.02
    for lam, acc in merged.items():
        # merging the protected release collapses the victim to chance (2 labels) ...
        assert acc["release"] <= 0.5 + 0.1 < acc["clean"], (lam, acc)
        # ... and AGA, from the base alone, brings it back next to the unprotected merge
        assert acc["attacked"] >= acc["clean"] - 0.05, (lam, acc)
