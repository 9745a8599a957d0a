"""Killing a run with SIGKILL, and a failing op: the next run finishes only what is missing."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from e2e import REPO, child_runs, cli, done_nodes, write_study

from mergesec.orchestrator.plan import build_plan
from mergesec.orchestrator.run_notes import linked_runs
from mergesec.orchestrator.spec import load_study

pytestmark = pytest.mark.slow
PLUGINS = {
    "MERGESEC_PLUGINS": "failing_ops",
    "PYTHONPATH": f"{Path(__file__).parent / 'plugins'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
}


def test_sigkill_then_resume(tmp_path, tiny_bert):
    study = write_study(tmp_path, tiny_bert)
    n_nodes = len(build_plan(load_study(study)).nodes)
    store, uri = tmp_path / "store", f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = [
        sys.executable,
        "-m",
        "mergesec.cli",
        "run",
        str(study),
        "--store",
        str(store),
        "--tracking-uri",
        uri,
    ]
    proc = subprocess.Popen(
        args,
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.time() + 300
    while time.time() < deadline and len(done_nodes(store)) < 2 and proc.poll() is None:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray processes it started
    proc.wait()
    before = done_nodes(store)
    assert 2 <= len(before) < n_nodes, (
        f"killed too late or too early: {len(before)} of {n_nodes} done"
    )

    r = cli(
        ["run", str(study), "--store", str(store), "--tracking-uri", uri], tmp_path, timeout=600
    )
    assert r.returncode == 0, r.stderr[-3000:]
    after = done_nodes(store)
    assert len(after) == n_nodes
    for node_id, mtime in before.items():
        assert after[node_id] == mtime, "a node that had _SUCCESS was executed again"
    # A worker killed with the driver may still have been publishing a node: count from the store
    # as the resumed run found it, which holds at least the nodes seen done after the kill.
    m = re.search(r"(\d+) already in the store, (\d+) ran", r.stdout)
    assert m is not None, r.stdout[-2000:]
    cached, ran = int(m.group(1)), int(m.group(2))
    assert cached >= len(before) and cached + ran == n_nodes, (cached, ran, len(before))
    runs = child_runs(uri, "smoke")
    ids = [x.data.tags["mergesec.node_id"] for x in runs]
    assert len(ids) == len(set(ids)), "duplicate MLflow child runs after a resume"
    assert set(ids) == set(after)
    assert all(x.info.status == "FINISHED" for x in runs)


def test_failing_op_skips_dependents_and_rerun_retries_only_those(tmp_path, tiny_bert):
    scenarios = {"unprotected": {}, "boom": {"protect": {"op": "explode"}}}
    study = write_study(tmp_path, tiny_bert, scenarios=scenarios)
    marker = tmp_path / "explode"
    marker.write_text("")
    env = PLUGINS | {"MERGESEC_TEST_EXPLODE": str(marker)}
    store, uri = tmp_path / "store", f"sqlite:///{tmp_path / 'mlflow.db'}"
    r = cli(
        ["run", str(study), "--store", str(store), "--tracking-uri", uri],
        tmp_path,
        env,
        timeout=600,
    )
    assert r.returncode == 1, r.stderr[-3000:]
    assert "FAILED  protect/explode" in r.stderr and "planned failure for the test" in r.stderr
    skipped = [x for x in r.stderr.splitlines() if x.startswith("skipped ")]
    assert (
        len(skipped) == 3
    )  # the release's evaluation, the merge that uses it, and that merge's evaluation
    assert "Traceback" not in r.stdout
    failed_dirs = [p.parent for p in (store / "nodes").glob("*/_FAILED")]
    assert (
        len(failed_dirs) == 1
        and "RuntimeError: planned failure" in (failed_dirs[0] / "_FAILED").read_text()
    )
    first_done = done_nodes(store)
    runs = {x.data.tags["mergesec.node_id"]: x for x in child_runs(uri, "smoke")}
    failed_run = runs[failed_dirs[0].name]
    assert failed_run.info.status == "FAILED"
    assert "planned failure for the test" in failed_run.data.tags["mlflow.note.content"]
    assert "planned failure" in failed_run.data.tags["mergesec.error"]
    # skipped nodes get a run that says so and links to the failed upstream run
    skipped_runs = [x for x in runs.values() if x.data.tags.get("mergesec.status") == "skipped"]
    assert len(skipped_runs) == 3 and all(x.info.status == "KILLED" for x in skipped_runs)
    for x in skipped_runs:
        assert failed_run.info.run_id in {
            rid for _, rid in linked_runs(x.data.tags["mlflow.note.content"])
        }
    rows = (store / "studies" / "smoke" / "results.csv").read_text()
    assert "unprotected" in rows and ",done" in rows and "boom" in rows

    marker.unlink()
    r = cli(
        ["run", str(study), "--store", str(store), "--tracking-uri", uri],
        tmp_path,
        env,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"{len(first_done)} already in the store, 4 ran, 0 failed" in r.stdout
    assert all(done_nodes(store)[k] == v for k, v in first_done.items())
    assert not list((store / "nodes").glob("*/_FAILED"))
    runs = {x.data.tags["mergesec.node_id"]: x for x in child_runs(uri, "smoke")}
    assert runs[failed_dirs[0].name].info.status == "FINISHED"
    assert len(runs) == len(done_nodes(store))


def test_status_and_plan_show_store_state(tmp_path, tiny_bert):
    study = write_study(tmp_path, tiny_bert)
    r = cli(["plan", str(study), "--store", str(tmp_path / "store")], tmp_path)
    assert r.returncode == 0 and r.stdout.count("pending") == len(
        build_plan(load_study(study)).nodes
    )
    r = cli(["ops"], REPO)
    assert r.returncode == 0 and "merge/ties" in r.stdout and "coefficient" in r.stdout
