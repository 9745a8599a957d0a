"""The driver's per-event work: in-degree readiness, resource-shape queues, incremental counts,
one-listing store states, and the checks made before a study starts. No Ray cluster needed."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from ray.tune.search import Searcher

from mergesec.orchestrator.engine import check_resources, worker_env
from mergesec.orchestrator.errors import InfeasibleResources
from mergesec.orchestrator.progress import progress_table
from mergesec.orchestrator.searcher import STATES, DagSearcher
from mergesec.orchestrator.store import Store


def sweep(n: int, datasets: int = 4) -> list[dict]:
    """A sweep-shaped DAG: expert roots, merges of every expert, one evaluation per merge."""
    nodes: list[dict] = []
    while len(nodes) < n:
        experts = []
        for _ in range(datasets):
            nodes.append({"id": f"{len(nodes):016x}", "step": "finetune", "inputs": {}})
            experts.append(nodes[-1]["id"])
        for _ in range(3):
            ins = {f"e{j}": e for j, e in enumerate(experts)}
            nodes.append({"id": f"{len(nodes):016x}", "step": "merge", "inputs": ins})
            merged = nodes[-1]["id"]
            nodes.append({"id": f"{len(nodes):016x}", "step": "evaluate", "inputs": {"m": merged}})
    return nodes[:n]


def drain(s: DagSearcher) -> int:
    """Run the whole DAG through the searcher in event order; return the number of events."""
    live: list[str] = []
    k = events = 0
    while True:
        c = s.suggest(f"t{k}")
        events += 1
        if isinstance(c, dict):
            s.on_trial_start(f"t{k}")
            live.append(f"t{k}")
            k += 1
        elif c == Searcher.FINISHED:
            return events
        else:
            s.on_trial_complete(live.pop(0))
            events += 1


def test_counts_and_per_step_rows_stay_equal_to_a_recount():
    s = DagSearcher(sweep(200))
    for k in range(30):
        s.suggest(f"t{k}")
    s.on_trial_complete("t0", error=True)
    for k in range(1, 20):
        s.on_trial_complete(f"t{k}")
    recount = dict.fromkeys(STATES, 0)
    for st in s.state.values():
        recount[st] += 1
    assert s.counts() == recount
    for step, row in s.by_step.items():
        ids = [i for i, n in s.nodes.items() if n["step"] == step]
        assert row == {x: sum(s.state[i] == x for i in ids) for x in STATES}


def test_gpu_nodes_waiting_for_resources_do_not_hold_back_cpu_nodes():
    nodes = [{"id": f"g{i}", "step": "finetune", "inputs": {}} for i in range(5)]
    nodes += [{"id": f"c{i}", "step": "evaluate", "inputs": {}} for i in range(5)]
    gpu = {"finetune": "gpu", "evaluate": "cpu"}
    s = DagSearcher(nodes, shape=lambda n: gpu[n["step"]], window=2)
    got = [s.suggest(f"t{k}") for k in range(6)]
    ids = [c["node"]["id"] for c in got if isinstance(c, dict)]
    # two of each shape wait in Ray's queue; the GPU nodes do not take every slot
    assert sorted(ids) == ["c0", "c1", "g0", "g1"] and got[4] is None and got[5] is None
    s.on_trial_start("t1")  # a CPU node got its resources: one more CPU node may wait
    assert s.suggest("t6")["node"]["id"] == "c2"


def test_max_running_caps_nodes_handed_out():
    s = DagSearcher(sweep(50), max_running=3)
    assert all(isinstance(s.suggest(f"t{k}"), dict) for k in range(3))
    assert s.suggest("t3") is None
    s.on_trial_complete("t0")
    assert isinstance(s.suggest("t4"), dict)


@pytest.mark.parametrize("n", [10_000, 100_000])
def test_driver_cost_per_event_is_flat(n):
    s = DagSearcher(sweep(n), shape=lambda d: d["step"], window=64)
    t = time.perf_counter()
    events = drain(s)
    per_event = (time.perf_counter() - t) / events
    assert s.counts()["done"] == n
    t = time.perf_counter()
    progress_table(s, {}, 0.0)
    table = time.perf_counter() - t
    # generous bounds for a shared machine: the plan rescan this replaces took 16 ms at 1e4
    assert per_event < 1e-3 and table < 0.05, (per_event, table)


def test_store_states_come_from_one_listing(tmp_path):
    store = Store(str(tmp_path / "s"))
    ids = [f"{i:016x}" for i in range(6)]
    for i in ids[:3]:
        with store.writing(i, {"id": i}):
            pass
    store.mark_failed(ids[3], {"id": ids[3]}, "boom")
    (tmp_path / "s" / "nodes" / ids[4]).mkdir()  # a directory without markers is pending
    assert store.states() == {ids[0]: "done", ids[1]: "done", ids[2]: "done", ids[3]: "failed"}
    assert Store(str(tmp_path / "empty")).states() == {}


def test_store_states_over_a_pyarrow_filesystem(tmp_path):
    import pyarrow.fs

    local = Store(str(tmp_path / "s"))
    with local.writing("ab" * 8, {"id": "ab" * 8}) as out:
        (out / "sub").mkdir()
        (out / "sub" / "_FAILED").write_text("not a marker of this node")
    local.mark_failed("cd" * 8, {"id": "cd" * 8}, "boom")
    remote = Store("mock://x")  # an object-store code path over a local subtree
    remote.fs = pyarrow.fs.SubTreeFileSystem(str(tmp_path), pyarrow.fs.LocalFileSystem())
    remote.root = "s"
    assert remote.states() == {"ab" * 8: "done", "cd" * 8: "failed"}


def test_worker_env_leaves_a_ray_jobs_own_variables_to_it():
    env = {"HF_HUB_OFFLINE": "1", "MERGESEC_PLUGINS": "p", "HOME": "/root"}
    assert worker_env(env) == {"HF_HUB_OFFLINE": "1", "MERGESEC_PLUGINS": "p"}
    job = {"runtime_env": {"env_vars": {"HF_HUB_OFFLINE": "1"}, "working_dir": "."}}
    env["RAY_JOB_CONFIG_JSON_ENV_VAR"] = json.dumps(job)
    assert worker_env(env) == {"MERGESEC_PLUGINS": "p"}


def test_infeasible_resources_fail_with_one_line():
    cluster = [{"CPU": 2.0}, {"CPU": 4.0, "GPU": 1.0}]
    check_resources({"finetune": {"cpu": 4, "gpu": 1}, "evaluate": {"cpu": 1, "gpu": 0}}, cluster)
    with pytest.raises(InfeasibleResources) as e:
        check_resources({"finetune": {"cpu": 8, "gpu": 1}}, cluster)
    msg = str(e.value)
    assert "\n" not in msg and "resources.finetune asks cpu=8, gpu=1" in msg
    assert "6 CPU and 1 GPU in all, at most 4 CPU and 1 GPU on one node" in msg


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        (
            "resources.finetune.gpu=2",
            "resources.finetune.gpu: Input should be less than or equal to 1",
        ),
        (
            "resources.evaluate.cpu=0",
            "resources.evaluate: a step needs cpu > 0 or gpu > 0 (both are 0)",
        ),
        ("resources.merge.timeout=0", "resources.merge.timeout"),
    ],
)
def test_resource_requests_that_cannot_work_are_refused(override, expected):
    from mergesec.orchestrator.errors import StudyError
    from mergesec.orchestrator.spec import load_study

    smoke = Path(__file__).resolve().parents[1] / "conf" / "smoke.yaml"
    with pytest.raises(StudyError) as e:
        load_study(smoke, [override])
    assert any(expected in line for line in e.value.lines()), e.value.lines()
    assert load_study(smoke, ["resources.merge.timeout=600"]).spec.resources_for("merge").timeout
