"""A study on a tiny random BERT through real Ray and a real MLflow (SQLite), twice."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from e2e import child_runs, write_study

from mergesec.orchestrator.engine import run_study
from mergesec.orchestrator.plan import build_plan
from mergesec.orchestrator.spec import load_study
from mergesec.report import build_results, write_reports

pytestmark = pytest.mark.slow


def test_study_runs_tracks_lineage_and_reruns_nothing(tmp_path, tiny_bert):
    study = load_study(write_study(tmp_path, tiny_bert))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    store = tmp_path / "store"
    plan = build_plan(study)

    first = run_study(study, store_uri=str(store), tracking_uri=uri, on_finish=write_reports)
    assert first.ok and first.ran == len(plan.nodes) == first.total and first.cached == 0

    runs = child_runs(uri, "smoke")
    by_node = {r.data.tags["mergesec.node_id"]: r for r in runs}
    assert len(runs) == len(by_node) == len(plan.nodes), "one child run per node"
    assert set(by_node) == set(plan.nodes)
    for node_id, node in plan.nodes.items():
        run = by_node[node_id]
        assert run.info.status == "FINISHED"
        assert (
            run.data.tags["mergesec.step"] == node.step and run.data.tags["mergesec.op"] == node.op
        )
        assert run.data.tags["mlflow.parentRunId"] == first.parent_run_id
        for role, upstream in node.inputs.items():
            assert run.data.tags[f"mergesec.input.{role}"] == by_node[upstream].info.run_id
        stored = json.loads((store / "nodes" / node_id / "metrics.json").read_text())
        for k, v in stored.items():
            assert run.data.metrics[k] == pytest.approx(v)
    ft = next(r for r in runs if r.data.tags["mergesec.step"] == "finetune")
    assert ft.data.params["op.epochs"] == "1"
    from mlflow.tracking import MlflowClient

    history = MlflowClient(uri).get_metric_history(ft.info.run_id, "train/loss")
    assert len(history) >= 2 and len({m.step for m in history}) == len(history), (
        "training curve by step"
    )
    merge = next(r for r in runs if r.data.tags["mergesec.step"] == "merge")
    assert merge.data.metrics["chosen/coefficient"] in (0.5, 1.0)

    rows = build_results(first.plan, first.store)
    assert len(rows) == 1 and rows[0]["status"] == "done"
    assert 0.0 <= rows[0]["victim_merged"] <= 1.0 and rows[0]["victim_clean"] > 0.5
    assert (store / "studies" / "smoke" / "results.csv").read_text().count("\n") == 2
    assert (store / "studies" / "smoke" / "results.png").stat().st_size > 1000
    # the report written at the end of the run goes to the study's parent run
    assert Path(first.reports["results.csv"]).samefile(store / "studies" / "smoke" / "results.csv")
    parent_files = {a.path for a in MlflowClient(uri).list_artifacts(first.parent_run_id, "report")}
    assert {"report/results.csv", "report/results.md", "report/results.png"} <= parent_files

    second = run_study(study, store_uri=str(store), tracking_uri=uri)
    assert second.ran == 0 and second.cached == len(plan.nodes) and second.ok
    assert second.parent_run_id == first.parent_run_id, "an unchanged study keeps its study run"
    assert len(child_runs(uri, "smoke")) == len(plan.nodes)
    assert second.reports == {}, "without on_finish the orchestrator writes no report"
    assert build_results(second.plan, second.store) == rows
    # rewriting the report from unchanged results keeps the figures drawn by the first run
    png = (store / "studies" / "smoke" / "results.png").read_bytes()
    write_reports(second.plan, second.store)
    assert (store / "studies" / "smoke" / "results.png").read_bytes() == png
