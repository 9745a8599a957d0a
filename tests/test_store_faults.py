"""Corrupt outputs in a real study: detected before use, never reported as results, recomputed."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from e2e import cli, done_nodes, write_study

from mergesec.orchestrator.plan import build_plan
from mergesec.orchestrator.spec import load_study
from mergesec.orchestrator.store import Store

pytestmark = pytest.mark.slow


def flip_bit(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x10
    path.write_bytes(bytes(data))


def results(store: Path) -> list[dict]:
    return json.loads((store / "studies" / "smoke" / "results.json").read_text())


def test_corrupt_nodes_are_detected_invalidated_and_recomputed(tmp_path, tiny_bert):
    study = write_study(tmp_path, tiny_bert)
    plan = build_plan(load_study(study))
    store, uri = tmp_path / "store", f"sqlite:///{tmp_path / 'mlflow.db'}"
    run = ["run", str(study), "--store", str(store), "--tracking-uri", uri]
    r = cli(run, tmp_path, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    first, done = results(store), done_nodes(store)
    st = Store(str(store))

    # an expert's weights get one flipped bit; the merge that reads them is to be computed again
    expert = next(n for n in plan.topological() if n.step == "finetune")
    weights = next((store / "nodes" / expert.id).glob("*.safetensors"))
    flip_bit(weights)
    merge = next(n for n in plan.topological() if expert.id in n.inputs.values())
    shutil.rmtree(store / "nodes" / merge.id)
    # an evaluation's metrics.json is cut short
    evaluation = next(
        n for n in plan.topological() if n.step == "evaluate" and n.id not in (merge.id,)
    )
    metrics = store / "nodes" / evaluation.id / "metrics.json"
    metrics.write_text(metrics.read_text()[:7])

    r = cli(["report", str(study), "--store", str(store)], tmp_path, timeout=300)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-3000:]

    # the run checks the merge's inputs before use: the expert is computed again, then the merge
    r = cli(run, tmp_path, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"corrupt {expert.title()} ({expert.id})" in r.stderr
    assert "1 ran" not in r.stdout and f"{len(plan.nodes) - 2} already in the store" in r.stdout
    assert st.check(expert.id, deep=True) == []

    # the truncated metrics.json (no run reads it) is found by verify and invalidated
    r = cli(["verify", str(study), "--store", str(store)], tmp_path, timeout=300)
    assert r.returncode == 1, r.stdout + r.stderr
    assert f"corrupt {evaluation.title()} ({evaluation.id})" in r.stderr
    assert f": {len(plan.nodes) - 1} match, 1 corrupt" in r.stdout
    r = cli(run, tmp_path, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"{len(plan.nodes) - 1} already in the store, 1 ran" in r.stdout
    r = cli(["verify", str(study), "--store", str(store)], tmp_path, timeout=300)
    assert r.returncode == 0 and ", 0 corrupt" in r.stdout, r.stdout + r.stderr

    after = done_nodes(store)
    recomputed = {i for i in after if after[i] != done.get(i)}
    assert recomputed == {expert.id, merge.id, evaluation.id}
    assert results(store) == first
