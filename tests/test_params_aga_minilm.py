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
DATASETS = [{"uri": "builtin:synthetic_sentiment"}, {"uri": "builtin:synthetic_topic"}]
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
    return m["accuracy/synthetic_sentiment"]


def _merged_victim_accuracy(root, victim, other, lam: float) -> float:
    params = {"base": BASE, "datasets": DATASETS, "op": {"coefficient": lam}}
    out, _ = run_executor(
        root,
        "merge",
        "task_arithmetic",
        params,
        {"expert.synthetic_sentiment": victim, "expert.synthetic_topic": other},
    )
    return _victim_accuracy(root, out)


def test_protection_breaks_merging_and_aga_restores_it(tmp_path, minilm_experts):
    clean, other = minilm_experts["sentiment"], minilm_experts["topic"]
    clean_standalone = _victim_accuracy(tmp_path, clean)
    clean_merged = {lam: _merged_victim_accuracy(tmp_path, clean, other, lam) for lam in LAMBDAS}
    records = []
    for defense in ("params", "mergelock"):
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
        models = {"release": release, "attacked": attacked}
        record = {
            "defense": defense,
            "standalone": {"clean": clean_standalone}
            | {k: _victim_accuracy(tmp_path, m) for k, m in models.items()},
            "merged_victim_by_lambda": {
                lam: {"clean": clean_merged[lam]}
                | {k: _merged_victim_accuracy(tmp_path, m, other, lam) for k, m in models.items()}
                for lam in LAMBDAS
            },
            "task_vector_ratio": pm["task_vector_norm/ratio"],
            "aga_cos_all": am["diagnostics/cos/all"],
            "aga_mlp_match": am["diagnostics/mlp_match_fraction"],
        }
        print(json.dumps(record, indent=2))
        records.append(record)

    for record in records:
        standalone, merged = record["standalone"], record["merged_victim_by_lambda"]
        # function preserving: the release classifies the test set as the clean expert does
        assert abs(standalone["release"] - standalone["clean"]) <= 1 / 400
        assert record["task_vector_ratio"] > 10
        assert record["aga_mlp_match"] == 1.0
        assert abs(standalone["attacked"] - standalone["clean"]) <= 0.02
        # Merging the release costs the victim at every λ; at the protocol's λ = 0.3 it falls to
        # chance (2 labels). At λ = 0.8 the release enters the merge nearly whole and keeps part of
        # its function (measured 0.65 for PaRaMS, 0.77 for MergeLock vs 0.905 clean).
        for lam, acc in merged.items():
            assert acc["release"] <= acc["clean"] - 0.1, (record["defense"], lam, acc)
            # AGA, from the base alone, brings the merge back next to the unprotected one
            assert acc["attacked"] >= acc["clean"] - 0.05, (record["defense"], lam, acc)
        assert merged[0.3]["release"] <= 0.5 + 0.1, (record["defense"], merged[0.3])
