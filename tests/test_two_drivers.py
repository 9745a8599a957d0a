"""Two ``mergesec run`` of one study on one store and one MLflow at once: every node is computed
once, by one of them, and has exactly one FINISHED run; neither closes the other's runs."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import pytest
from e2e import child_runs, done_nodes, write_study

from mergesec.orchestrator.plan import build_plan
from mergesec.orchestrator.spec import load_study

pytestmark = pytest.mark.slow


def test_two_drivers_compute_every_node_once(tmp_path, tiny_bert):
    study = write_study(tmp_path, tiny_bert)
    n = len(build_plan(load_study(study)).nodes)
    store, uri = tmp_path / "store", f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = ["run", str(study), "--store", str(store), "--tracking-uri", uri]
    procs = []
    for k in range(2):
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "mergesec.cli", *args],
                cwd=tmp_path,
                env=os.environ.copy(),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
        if k == 0:
            time.sleep(1.0)
    outs = [p.communicate(timeout=1200) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    ran, waited = [], []
    for out, _ in outs:
        m = re.search(r"(\d+) already in the store, (\d+) ran, (?:(\d+) by another run, )?", out)
        assert m is not None, out[-2000:]
        ran.append(int(m.group(2)))
        waited.append(int(m.group(3) or 0))
    print(f"two drivers: computed {ran}, waited for the other's {waited}, {n} nodes")
    logs = "\n----\n".join(o[-2500:] + e[-2500:] for o, e in outs)
    assert sum(ran) == n, f"nodes computed by each driver: {ran} for {n} nodes\n{logs}"
    assert sum(waited) > 0 or min(ran) > 0, "the two runs did not overlap"
    assert len(done_nodes(store)) == n

    runs = child_runs(uri, "smoke")
    ids = [r.data.tags["mergesec.node_id"] for r in runs]
    assert sorted(ids) == sorted(set(ids)) and len(ids) == n, "one run per node"
    assert all(r.info.status == "FINISHED" for r in runs)
    from mlflow.tracking import MlflowClient

    c = MlflowClient(uri)
    exp = c.get_experiment_by_name("mergesec/smoke")
    parents = [
        r
        for r in c.search_runs([exp.experiment_id], max_results=100)
        if "mergesec.node_id" not in r.data.tags
    ]
    assert [r.info.status for r in parents] == ["FINISHED", "FINISHED"]
