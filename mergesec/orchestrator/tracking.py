"""MLflow tracking from the driver, as a Ray Tune ``Callback``.

One experiment per study, one parent run per invocation, one child run per node. A node's child run
is found again by the tag ``mergesec.node_id``, so a resumed study reuses it instead of adding a
duplicate. Workers never talk to MLflow.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from typing import Any

from ray.tune import Callback

from mergesec.orchestrator.node import Node
from mergesec.orchestrator.runner import STEP_KEY
from mergesec.orchestrator.store import Store

TAG_NODE = "mergesec.node_id"
DEFAULT_URI = "sqlite:///mlflow.db"


def tracking_uri(explicit: str | None) -> str:
    return explicit or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI


_MLFLOW_UNSAFE = re.compile(r"[^A-Za-z0-9_\-. /]")


def mlflow_key(name: str) -> str:
    """A param or metric name MLflow accepts (letters, digits, ``_ - . /`` and spaces)."""
    return _MLFLOW_UNSAFE.sub("_", name)


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v and "search" not in v:
            out.update(flatten(v, key + "."))
        elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
            for i, x in enumerate(v):
                out.update(flatten(x, f"{key}.{i}."))
        else:
            out[key] = json.dumps(v) if not isinstance(v, str) else v
    return {mlflow_key(k): v[:6000] for k, v in out.items()}


class StudyTracker:
    """Owns the MLflow client, the study's experiment and this invocation's parent run."""

    def __init__(self, uri: str | None, study: str, experiment: str | None = None):
        import logging

        from mlflow.tracking import MlflowClient

        logging.getLogger("mlflow").setLevel(logging.WARNING)
        logging.getLogger("alembic").setLevel(logging.WARNING)

        self.uri = tracking_uri(uri)
        self.client = MlflowClient(self.uri)
        name = experiment or f"mergesec/{study}"
        exp = self.client.get_experiment_by_name(name)
        self.experiment_id = exp.experiment_id if exp else self.client.create_experiment(name)
        self.parent_id: str | None = None
        self._node_runs: dict[str, str] = {}

    def start_parent(self, study: str, params: dict[str, Any], tags: dict[str, str]) -> str:
        # An invocation that was killed left its parent run RUNNING; it is over now.
        stale = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`mergesec.study` = '{study}' and attributes.status = 'RUNNING'",
            max_results=100,
        )
        for r in stale:
            if "mlflow.parentRunId" not in r.data.tags:
                self.client.set_terminated(r.info.run_id, status="KILLED")
        run = self.client.create_run(
            self.experiment_id, run_name=f"{study}", tags={"mergesec.study": study, **tags}
        )
        self.parent_id = run.info.run_id
        items = list(flatten(params).items())
        for i in range(0, len(items), 100):
            self._log_params(self.parent_id, dict(items[i : i + 100]))
        return self.parent_id

    def reconcile(self, store: Store, nodes: dict[str, Node]) -> None:
        """Close child runs a killed invocation left RUNNING: FINISHED when the store has the node."""
        running = self.client.search_runs(
            [self.experiment_id], filter_string="attributes.status = 'RUNNING'", max_results=1000
        )
        for r in running:
            node_id = r.data.tags.get(TAG_NODE)
            if node_id in nodes:
                self._node_runs[node_id] = r.info.run_id
                if store.is_done(node_id):
                    self.finish_node(nodes[node_id], store, "FINISHED")
                else:
                    self.client.set_terminated(r.info.run_id, status="KILLED")

    def end_parent(self, status: str, artifacts: list[str] = ()) -> None:
        if self.parent_id is None:
            return
        for a in artifacts:
            if os.path.exists(a):
                self.client.log_artifact(self.parent_id, a)
        self.client.set_terminated(self.parent_id, status=status)

    def _log_params(self, run_id: str, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        self.client.log_batch(run_id, params=[Param(k, v) for k, v in params.items()])

    def node_run(self, node_id: str) -> str | None:
        if node_id in self._node_runs:
            return self._node_runs[node_id]
        runs = self.client.search_runs(
            [self.experiment_id], filter_string=f"tags.`{TAG_NODE}` = '{node_id}'", max_results=1
        )
        if runs:
            self._node_runs[node_id] = runs[0].info.run_id
            return runs[0].info.run_id
        return None

    def start_node(self, node: Node) -> str:
        tags = {
            TAG_NODE: node.id,
            "mergesec.step": node.step,
            "mergesec.op": node.op,
            "mergesec.scenario": ";".join(node.labels.get("scenario", [])) or "-",
            "mergesec.what": ",".join(node.labels.get("what", [])),
            "mlflow.parentRunId": self.parent_id or "",
        }
        for role, up in node.inputs.items():
            tags[f"mergesec.input_node.{role}"] = up
            up_run = self.node_run(up)
            if up_run:
                tags[f"mergesec.input.{role}"] = up_run
        existing = self.node_run(node.id)
        if existing:
            for k, v in tags.items():
                self.client.set_tag(existing, k, v)
            self.client.update_run(existing, status="RUNNING")
            return existing
        run = self.client.create_run(self.experiment_id, run_name=node.title(), tags=tags)
        self._node_runs[node.id] = run.info.run_id
        self._log_params(run.info.run_id, flatten({"op": node.op_key} | node.params))
        return run.info.run_id

    def log_metrics(self, run_id: str, metrics: dict[str, Any], step: int | None) -> None:
        import time

        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        ms = [
            Metric(mlflow_key(k), float(v), ts, step or 0)
            for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)
        ]
        if ms:
            self.client.log_batch(run_id, metrics=ms)

    def finish_node(self, node: Node, store: Store, status: str, log_weights: bool = False) -> None:
        run_id = self.node_run(node.id)
        if run_id is None:
            return
        try:
            if status == "FINISHED":
                self.log_metrics(run_id, store.read_metrics(node.id), None)
                with tempfile.TemporaryDirectory() as tmp:
                    for name in ("node.json", "metrics.json"):
                        p = os.path.join(tmp, name)
                        with open(p, "w") as f:
                            f.write(store.read_text(f"nodes/{node.id}/{name}"))
                        self.client.log_artifact(run_id, p)
                local = store.local_dir(node.id)
                for png in sorted(local.glob("*.png")) + sorted(local.glob("*.md")):
                    self.client.log_artifact(run_id, str(png))
                if log_weights:
                    for f in sorted(local.glob("*.safetensors")):
                        self.client.log_artifact(run_id, str(f), artifact_path="weights")
            elif store.is_failed(node.id):
                with tempfile.TemporaryDirectory() as tmp:
                    p = os.path.join(tmp, "traceback.txt")
                    with open(p, "w") as f:
                        f.write(store.failure(node.id))
                    self.client.log_artifact(run_id, p)
        finally:
            self.client.set_terminated(run_id, status=status)


class MlflowCallback(Callback):
    """Ray Tune callback that mirrors every trial (node) into an MLflow child run."""

    def __init__(self, tracker: StudyTracker, store: Store, log_weights: bool = False):
        self.tracker = tracker
        self.store = store
        self.log_weights = log_weights
        self._runs: dict[str, str] = {}

    def __getstate__(self) -> dict:
        # Tune pickles its run config (callbacks included) into the experiment directory; the live
        # MLflow client cannot be pickled and is not needed by a restored experiment's metadata.
        return {"tracker": None, "store": self.store, "log_weights": self.log_weights, "_runs": {}}

    @staticmethod
    def _node(trial) -> Node:
        return Node.from_dict(trial.config["node"])

    def on_trial_start(self, iteration, trials, trial, **info):
        self._runs[trial.trial_id] = self.tracker.start_node(self._node(trial))

    def on_trial_result(self, iteration, trials, trial, result, **info):
        run_id = self._runs.get(trial.trial_id)
        if run_id is None or result.get("node_done"):
            return
        step = result.get(STEP_KEY)
        metrics = {k: v for k, v in result.items() if "/" in k or k in {"epoch"}}
        self.tracker.log_metrics(run_id, metrics, int(step) if step is not None else None)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.tracker.finish_node(self._node(trial), self.store, "FINISHED", self.log_weights)

    def on_trial_error(self, iteration, trials, trial, **info):
        self.tracker.finish_node(self._node(trial), self.store, "FAILED")
