"""A two-node Ray cluster run whose trials land on both nodes, tracked through a real `mlflow server`
started as the README's cluster recipe starts it (gunicorn)."""

from __future__ import annotations

import json

import pytest
from e2e import child_runs, write_study

from mergesec.orchestrator.engine import run_study
from mergesec.orchestrator.spec import load_study

pytestmark = pytest.mark.slow


def test_two_node_cluster_with_mlflow_server(tmp_path, tiny_bert, mlflow_gunicorn_server):
    mlflow_server = mlflow_gunicorn_server
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    try:
        ray.init(address=cluster.address, include_dashboard=False, log_to_driver=False)
        ray_nodes = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
        assert len(ray_nodes) == 2
        study = load_study(write_study(tmp_path, tiny_bert))
        store = tmp_path / "store"
        summary = run_study(
            study, store_uri=str(store), address=cluster.address, tracking_uri=mlflow_server
        )
        assert summary.ok and summary.ran == summary.total
    finally:
        ray.shutdown()
        cluster.shutdown()
    workers = {json.loads(p.read_text())["worker"] for p in (store / "nodes").glob("*/node.json")}
    assert workers == ray_nodes, "trials should land on both nodes"
    runs = child_runs(mlflow_server, "smoke")
    assert len(runs) == summary.total and all(r.info.status == "FINISHED" for r in runs)
    from mlflow.tracking import MlflowClient

    arts = [a.path for a in MlflowClient(mlflow_server).list_artifacts(runs[0].info.run_id)]
    assert "node.json" in arts and "metrics.json" in arts
    # requests that scale with the study: no lookups or searches per node
    log = (tmp_path / "server.log").read_text()
    assert "Starting gunicorn" in log
    assert log.count("/api/2.0/mlflow/runs/create") >= summary.total  # the log is the access log
    assert log.count("/api/2.0/mlflow/runs/get") <= 2
    assert log.count("/api/2.0/mlflow/runs/search") <= 3
