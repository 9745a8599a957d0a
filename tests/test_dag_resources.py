"""Real Ray Tune runs of ``run_dag`` with declared resources: GPU nodes that wait for a GPU do not
hold back CPU nodes, and a per-step timeout fails a hung node."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mergesec.orchestrator.engine import run_dag
from mergesec.orchestrator.node import Node
from mergesec.orchestrator.searcher import DONE, FAILED
from mergesec.orchestrator.store import Store

REPO = Path(__file__).resolve().parents[1]
PLUGINS = Path(__file__).parent / "plugins"


@pytest.fixture(scope="module")
def ray_gpu():
    import ray

    env = {
        "PYTHONPATH": os.pathsep.join([str(REPO), str(PLUGINS)]),
        "MERGESEC_PLUGINS": "sleepy_ops",
    }
    # Declared GPUs: Ray schedules by them; nothing here touches a physical device.
    ray.init(
        num_cpus=2,
        num_gpus=1,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": env},
    )
    yield
    ray.shutdown()


def sleepy(step: str, tag: str, log: Path, seconds: float, hang: bool = False) -> Node:
    params = {"tag": tag, "log": str(log), "seconds": seconds, "hang": hang}
    return Node(step, "sleepy", "1", params, {})


def times(log: Path, kind: str) -> dict[str, float]:
    return {p.stem: float(p.read_text()) for p in log.glob(f"*.{kind}")}


def test_cpu_nodes_start_while_gpu_nodes_wait(ray_gpu, tmp_path):
    log = tmp_path / "log"
    log.mkdir()
    # GPU nodes first in plan order: with Tune's default pending window of one trial, the second
    # one would wait for the GPU and every CPU node would wait behind it.
    # (long enough for the CPU workers to start on a loaded machine)
    nodes = [sleepy("finetune", f"g{i}", log, 8.0) for i in range(2)]
    nodes += [sleepy("evaluate", f"c{i}", log, 0.2) for i in range(4)]
    s = run_dag(
        nodes,
        Store(str(tmp_path / "store")),
        name="gpu-wait",
        resources={"finetune": {"cpu": 0, "gpu": 1}, "evaluate": {"cpu": 1, "gpu": 0}},
    )
    assert all(v == DONE for v in s.state.values()), s.state
    starts, ends = times(log, "start"), times(log, "end")
    gpu_starts = sorted(starts[f"g{i}"] for i in range(2))
    gpu_ends = sorted(ends[f"g{i}"] for i in range(2))
    assert gpu_starts[1] >= gpu_ends[0] - 0.1, "one declared GPU: GPU nodes ran one at a time"
    cpu_ends = [ends[f"c{i}"] for i in range(4)]
    assert max(cpu_ends) < gpu_starts[1], "CPU nodes waited behind a GPU node"


def test_step_timeout_fails_a_hung_node_and_the_rest_finish(ray_gpu, tmp_path):
    log = tmp_path / "log"
    log.mkdir()
    hung = sleepy("evaluate", "hung", log, 0.0, hang=True)
    fine = sleepy("finetune", "fine", log, 0.2)
    store = Store(str(tmp_path / "store"))
    s = run_dag(
        [hung, fine],
        store,
        name="timeout",
        resources={"finetune": {"cpu": 1, "gpu": 0}, "evaluate": {"cpu": 1, "gpu": 0}},
        timeouts={"evaluate": 25.0},
    )
    assert s.state == {hung.id: FAILED, fine.id: DONE}
    assert "evaluate node ran longer than its timeout of 25 s" in store.failure(hung.id)
    # it had started its work (worker start-up counts towards the timeout too, hence 25 s: a
    # loaded machine takes over 12 s to start a worker)
    assert "hung" in times(log, "start") and "hung" not in times(log, "end")
