"""Tracking off the critical path: a real ``mlflow server`` killed mid-study and restarted, and one
that stays down until the study is over. Every node finishes; MLflow ends with one run per node."""

from __future__ import annotations

import os
import subprocess
import threading
import time
from pathlib import Path

import pytest
from conftest import free_port, start_mlflow_server

from mergesec.orchestrator.engine import run_dag
from mergesec.orchestrator.node import Node
from mergesec.orchestrator.searcher import DONE
from mergesec.orchestrator.store import Store
from mergesec.orchestrator.tracking import MlflowCallback, StudyTracker, TrackingWriter

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
PLUGINS = Path(__file__).parent / "plugins"
RESOURCES = {"evaluate": {"cpu": 1, "gpu": 0}}


class Server:
    """An ``mlflow server`` on 127.0.0.1 that can be killed and started again on the same port
    and database."""

    def __init__(self, root: Path):
        self.root = root
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc, _ = start_mlflow_server(self.root, self.port)

    def kill(self) -> None:
        if self.proc is not None:
            os.killpg(self.proc.pid, 9)  # the server and its worker process
            self.proc.wait()
            self.proc = None


@pytest.fixture(scope="module")
def ray_local():
    import ray

    env = {
        "PYTHONPATH": os.pathsep.join([str(REPO), str(PLUGINS)]),
        "MERGESEC_PLUGINS": "sleepy_ops",
    }
    ray.init(
        num_cpus=2, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": env}
    )
    yield
    ray.shutdown()


@pytest.fixture
def server(tmp_path):
    s = Server(tmp_path)
    s.start()
    yield s
    s.kill()


def dag(log: Path, n: int, seconds: float) -> list[Node]:
    roots = [
        Node("evaluate", "sleepy", "1", {"tag": f"r{i}", "log": str(log), "seconds": seconds}, {})
        for i in range(n // 2)
    ]
    kids = [
        Node(
            "evaluate",
            "sleepy",
            "1",
            {"tag": f"k{i}", "log": str(log), "seconds": seconds},
            {"up": r.id},
        )
        for i, r in enumerate(roots)
    ]
    return roots + kids


def node_runs(url: str) -> list:
    from mlflow.tracking import MlflowClient

    c = MlflowClient(url)
    exp = c.get_experiment_by_name("mergesec/outage")
    runs = c.search_runs([exp.experiment_id], max_results=1000)
    return [r for r in runs if "mergesec.node_id" in r.data.tags]


def writer_for(url: str, store: Store, nodes: list[Node], states: dict[str, str], threads=1):
    w = TrackingWriter(
        lambda: StudyTracker(url, "outage"), store, backoff=(0.2, 1.0), threads=threads
    )
    w.open({"n": len(nodes)}, {}, states, {n.id: n for n in nodes})
    return w


def test_server_killed_mid_study_and_restarted(ray_local, server, tmp_path):
    log = tmp_path / "log"
    log.mkdir()
    nodes = dag(log, 12, 0.8)
    store = Store(str(tmp_path / "store"))
    writer = writer_for(server.url, store, nodes, {}, threads=3)
    down_while = {}
    over = threading.Event()

    def ended() -> int:
        return len(list(log.glob("*.end")))

    def outage() -> None:
        while ended() < 2 and not over.is_set():
            time.sleep(0.1)
        server.kill()
        before = ended()
        while ended() < before + 3 and not over.is_set():  # nodes finish while it is down
            time.sleep(0.1)
        down_while["finished"] = len(list(log.glob("*.end"))) - before
        server.start()

    t = threading.Thread(target=outage)
    t.start()
    s = run_dag(
        nodes, store, name="outage", resources=RESOURCES, callbacks=[MlflowCallback(writer)]
    )
    t.join(timeout=300)
    writer.end_parent("FINISHED", grace_s=120)
    assert all(v == DONE for v in s.state.values()), s.state
    assert down_while["finished"] >= 3 and writer.errors > 0, "the outage did not hit the writer"
    assert writer.unsent() == []
    runs = node_runs(server.url)
    ids = [r.data.tags["mergesec.node_id"] for r in runs]
    assert sorted(ids) == sorted(n.id for n in nodes), "exactly one run per node"
    assert all(r.info.status == "FINISHED" for r in runs)
    assert all(r.data.tags["mlflow.parentRunId"] == writer.parent_id for r in runs)
    by_node = {r.data.tags["mergesec.node_id"]: r.info.run_id for r in runs}
    for r in runs:  # lineage: a child's run names its input's run, whichever thread sent it
        up = r.data.tags.get("mergesec.input_node.up")
        if up is not None:
            assert r.data.tags["mergesec.input.up"] == by_node[up]


def test_server_down_for_the_whole_study_then_the_next_run_logs_it(ray_local, tmp_path):
    log = tmp_path / "log"
    log.mkdir()
    nodes = dag(log, 4, 0.1)
    store = Store(str(tmp_path / "store"))
    server = Server(tmp_path)  # not started yet: nothing listens on its port
    writer = writer_for(server.url, store, nodes, {})
    t = time.time()
    s = run_dag(
        nodes, store, name="outage", resources=RESOURCES, callbacks=[MlflowCallback(writer)]
    )
    writer.end_parent("FINISHED", grace_s=3)
    assert all(v == DONE for v in s.state.values()), "the study finished without MLflow"
    assert time.time() - t < 120
    assert sorted(writer.unsent()) == sorted(n.title() for n in nodes)
    server.start()
    try:
        later = writer_for(server.url, store, nodes, {n.id: "done" for n in nodes})
        later.end_parent("FINISHED", grace_s=60)
        assert later.unsent() == []
        runs = node_runs(server.url)
        assert sorted(r.data.tags["mergesec.node_id"] for r in runs) == sorted(n.id for n in nodes)
        assert all(r.info.status == "FINISHED" for r in runs)
    finally:
        server.kill()
