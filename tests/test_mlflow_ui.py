"""What a study looks like in MLflow, read back through the client from a real `mlflow server`:
runs named in the study's words, scenario factors as params, headline metrics, descriptions whose
links resolve, datasets as inputs, the study run's table and files, and one study run after a
resume."""

from __future__ import annotations

import shutil

import pytest
from conftest import start_mlflow_server
from e2e import child_runs, write_study

from mergesec.orchestrator.engine import _ray_init, run_study
from mergesec.orchestrator.plan import build_plan
from mergesec.orchestrator.run_notes import linked_runs
from mergesec.orchestrator.spec import load_study
from mergesec.report import build_results, write_reports

pytestmark = pytest.mark.slow
SCENARIOS = {"unprotected": {}, "params": {"protect": {"op": "params"}}}
MERGE = {"op": "ties", "coefficient": {"search": [0.5, 1.0]}}


@pytest.fixture(scope="module")
def study_in_mlflow(tmp_path_factory, tiny_bert):
    """The smoke study with two scenarios, run once, tracked by a server."""
    root = tmp_path_factory.mktemp("mlflow-ui")
    proc, url = start_mlflow_server(root)
    study = load_study(
        write_study(
            root, tiny_bert, scenarios=SCENARIOS, merge=MERGE, tracking={"log_models": True}
        )
    )
    import ray

    for attempt in range(3):  # Ray's node start has a fixed 30 s limit a loaded machine can miss
        try:
            _ray_init(None)  # as run_study starts it; the study's three runs then share it
            break
        except Exception:
            ray.shutdown()
            if attempt == 2:
                proc.terminate()
                raise
    try:
        summary = run_study(
            study, store_uri=str(root / "store"), tracking_uri=url, on_finish=write_reports
        )
        assert summary.ok, (summary.failed, summary.skipped, summary.untracked)
        yield url, study, summary, root
    finally:
        ray.shutdown()
        proc.terminate()
        proc.wait(timeout=30)


def _client(url):
    from mlflow.tracking import MlflowClient

    return MlflowClient(url)


def _experiment(url):
    return _client(url).get_experiment_by_name("mergesec/smoke")


def test_one_params_query_gives_victim_accuracy_per_scenario(study_in_mlflow):
    url, _, summary, _ = study_in_mlflow
    runs = _client(url).search_runs(
        [_experiment(url).experiment_id],
        filter_string="params.victim = 'synthetic_sentiment' and tags.`mergesec.role` = 'merged eval'",
    )
    got = {(r.data.params["scenario"], r.data.params["merge_op"]): r.data.metrics for r in runs}
    rows = build_results(summary.plan, summary.store)
    assert len(got) == len(runs) == len(rows) == 2
    for row in rows:
        m = got[(row["scenario"], row["merge"])]
        assert m["victim/accuracy_merged"] == pytest.approx(row["victim_merged"])
        assert m["victim/accuracy_clean"] == pytest.approx(row["victim_clean"])
        assert m["victim/accuracy_release"] == pytest.approx(row["victim_release"])
        assert m["others/accuracy_mean"] == pytest.approx(row["others_merged"])
        assert m["merge/coefficient"] == row["coefficient"]


def test_run_names_are_unique_and_in_the_study_words(study_in_mlflow):
    url, _, summary, _ = study_in_mlflow
    runs = child_runs(url, "smoke")
    names = [r.info.run_name for r in runs]
    assert len(runs) == len(summary.plan.nodes) and len(set(names)) == len(names), names
    assert "params · synthetic_sentiment · ties · merged eval" in names
    assert "unprotected · synthetic_sentiment · ties · merge" in names
    assert "synthetic_sentiment release (params)" in names
    assert "synthetic_topic expert · shared by 2 scenarios" in names
    for r in runs:
        if r.data.tags.get("mergesec.role") in ("merge", "merged eval"):
            for factor in (
                "scenario",
                "victim",
                "protect_op",
                "attack_op",
                "merge_op",
                "merge_space",
                "seed",
            ):
                assert r.data.tags[factor] == r.data.params[factor]
            assert r.data.tags["protect_op"] == (
                "params" if r.data.tags["scenario"] == "params" else "none"
            )


def test_descriptions_link_to_existing_runs(study_in_mlflow):
    url, _, summary, _ = study_in_mlflow
    c = _client(url)
    runs = child_runs(url, "smoke")
    by_id = {r.info.run_id: r for r in runs}
    exp_id = _experiment(url).experiment_id
    parent = c.get_run(summary.parent_run_id)
    n_links = 0
    for r in [*runs, parent]:
        note = r.data.tags["mlflow.note.content"]
        for exp, run_id in linked_runs(note):
            assert exp == exp_id and c.get_run(run_id).info.run_id == run_id
            n_links += 1
        node_id = r.data.tags.get("mergesec.node_id")
        for role in summary.plan.nodes[node_id].inputs if node_id else ():
            assert (exp_id, r.data.tags[f"mergesec.input.{role}"]) in linked_runs(note)
    assert n_links > len(runs)
    merged = [r for r in runs if r.data.tags["mergesec.role"] == "merged eval"]
    assert all("Headline: victim clean" in r.data.tags["mlflow.note.content"] for r in merged)
    # the study run's table links every result row to its merged evaluation
    assert {run_id for _, run_id in linked_runs(parent.data.tags["mlflow.note.content"])} == {
        r.info.run_id for r in merged
    }
    assert all(rid in by_id for _, rid in linked_runs(parent.data.tags["mlflow.note.content"]))


def test_dataset_inputs_and_source_tags(study_in_mlflow):
    url, *_ = study_in_mlflow
    for r in child_runs(url, "smoke"):
        ds = {d.dataset.name: d.dataset for d in r.inputs.dataset_inputs}
        step = r.data.tags["mergesec.step"]
        if step in ("finetune", "evaluate", "merge"):
            assert ds, f"{r.info.run_name} has no dataset input"
        for d in ds.values():
            assert d.digest and d.source.startswith("builtin:")
        if step == "merge":
            assert set(ds) == {"synthetic_sentiment", "synthetic_topic"}
        assert r.data.tags["mlflow.source.name"].startswith("mergesec run ")
        assert r.data.tags["mergesec.version"] and r.data.tags["mlflow.user"]
    exp = _experiment(url)
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    assert "merged eval" in exp.tags["mlflow.note.content"]


def test_study_run_holds_table_files_and_summary(study_in_mlflow, monkeypatch):
    url, _, summary, _ = study_in_mlflow
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)  # ``load_table`` searches through it
    c = _client(url)
    parent = c.get_run(summary.parent_run_id)
    table = c.load_table(
        _experiment(url).experiment_id, "results_table.json", run_ids=[summary.parent_run_id]
    )
    assert len(table) == 2 and set(table["scenario"]) == set(SCENARIOS)
    assert parent.data.metrics["study/rows_done"] == 2
    assert 0 <= parent.data.metrics["study/victim_accuracy_merged_mean"] <= 1
    files = {a.path for a in c.list_artifacts(summary.parent_run_id, "study")}
    assert files == {"study/study.yaml", "study/study.resolved.yaml"}
    report = {a.path for a in c.list_artifacts(summary.parent_run_id, "report")}
    assert {"report/results.md", "report/results.png", "report/results.csv"} <= report


def test_merge_search_is_a_table_and_the_chosen_value_is_visible(study_in_mlflow, monkeypatch):
    url, *_ = study_in_mlflow
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    c = _client(url)
    merge = next(r for r in child_runs(url, "smoke") if r.data.tags["mergesec.role"] == "merge")
    assert merge.data.metrics["merge/coefficient"] == merge.data.metrics["chosen/coefficient"]
    assert "search/coefficient" not in merge.data.metrics
    tried = c.get_metric_history(merge.info.run_id, "sweep/coefficient")
    assert sorted(m.value for m in tried) == [0.5, 1.0]
    exp_id = _experiment(url).experiment_id
    sweep = c.load_table(exp_id, "sweep.json", run_ids=[merge.info.run_id])
    assert sorted(sweep["coefficient"]) == [0.5, 1.0] and sweep["score"].notna().all()


def test_resume_continues_under_one_study_run(study_in_mlflow):
    url, study, first, root = study_in_mlflow
    store = root / "store"
    before = {r.data.tags["mergesec.node_id"]: r.info.run_id for r in child_runs(url, "smoke")}
    row = build_plan(study).rows[0]
    shutil.rmtree(store / "nodes" / row.merge_eval)  # as if killed before it finished
    second = run_study(study, store_uri=str(store), tracking_uri=url, on_finish=write_reports)
    assert second.ok and second.ran == 1 and second.parent_run_id == first.parent_run_id
    third = run_study(study, store_uri=str(store), tracking_uri=url, on_finish=write_reports)
    assert third.ran == 0 and third.parent_run_id == first.parent_run_id
    after = {r.data.tags["mergesec.node_id"]: r.info.run_id for r in child_runs(url, "smoke")}
    assert after == before, "a resumed study reuses every node's run"
    c = _client(url)
    exp_id = _experiment(url).experiment_id
    parents = [r for r in c.search_runs([exp_id]) if "mergesec.node_id" not in r.data.tags]
    assert [p.info.run_id for p in parents] == [first.parent_run_id]
    p = parents[0]
    assert p.info.run_name == "smoke · invocation 3" and p.info.status == "FINISHED"
    assert "invocation 3" in p.data.tags["mlflow.note.content"]
    merged = c.get_run(before[row.merge_eval])
    assert merged.info.status == "FINISHED" and "victim/accuracy_merged" in merged.data.metrics


def test_models_are_logged_models_pointing_at_the_store(study_in_mlflow):
    url, _, summary, root = study_in_mlflow
    c = _client(url)
    runs = {r.info.run_id: r for r in child_runs(url, "smoke")}
    models = c.search_logged_models(experiment_ids=[_experiment(url).experiment_id])
    roles = sorted(runs[m.source_run_id].data.tags["mergesec.role"] for m in models)
    # two experts, the params release, one merge per scenario
    assert roles == ["expert", "expert", "merge", "merge", "release"]
    for m in models:
        node_id = m.tags["mergesec.node_id"]
        assert m.tags["mergesec.store_location"] == str(root / "store" / "nodes" / node_id)
        assert runs[m.source_run_id].data.tags["mergesec.node_id"] == node_id
        assert not c.list_artifacts(m.source_run_id, "weights"), "nothing uploaded"
