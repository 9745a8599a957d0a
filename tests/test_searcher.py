"""DagSearcher ordering on a synthetic DAG: never before inputs; a failure skips exactly its descendants."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from ray.tune.search import Searcher

from mergesec.orchestrator.searcher import DONE, FAILED, PENDING, SKIPPED, DagSearcher

# a -> c, b -> c, c -> e, b -> d, d -> f, (g independent)
EDGES = {"a": [], "b": [], "c": ["a", "b"], "d": ["b"], "e": ["c"], "f": ["d"], "g": []}


def dag() -> list[dict]:
    return [
        {"id": k, "step": "x", "op": "y", "inputs": {f"in{i}": u for i, u in enumerate(v)}}
        for k, v in EDGES.items()
    ]


def test_suggest_order_and_waiting():
    s = DagSearcher(dag())
    first = [s.suggest(f"t{i}") for i in range(4)]
    assert [c["node"]["id"] for c in first[:3]] == ["a", "b", "g"]
    assert first[3] is None  # everything else waits on running inputs
    s.on_trial_complete("t1")  # b done -> d ready, c still waits on a
    assert s.suggest("t4")["node"]["id"] == "d"
    assert s.suggest("t5") is None
    s.on_trial_complete("t0")  # a done -> c ready
    assert s.suggest("t6")["node"]["id"] == "c"


def test_with_costs_the_longest_remaining_path_leaves_first():
    # priorities: f = 1, d = 1 + f = 2, b = 1 + max(c, d), e = 5, c = 1 + e = 6, b = 7,
    # a = 1 + c = 7, g = 10: g first, then a and b (equal: first ready first), c before d
    cost = {"e": 5.0, "g": 10.0}
    s = DagSearcher(dag(), cost=lambda n: cost.get(n["id"], 1.0))
    assert s.priority == {"a": 7, "b": 7, "c": 6, "d": 2, "e": 5, "f": 1, "g": 10}
    first = [s.suggest(f"t{i}")["node"]["id"] for i in range(3)]
    assert first == ["g", "a", "b"]
    s.on_trial_complete("t2")  # b done: d ready
    s.on_trial_complete("t1")  # a done: c ready after d, yet c's path is longer
    assert [s.suggest(f"t{i}")["node"]["id"] for i in (3, 4)] == ["c", "d"]


def test_the_quickstart_starts_its_longest_training_node_first():
    from mergesec.orchestrator.plan import build_plan
    from mergesec.orchestrator.priority import estimated_cost, training_steps
    from mergesec.orchestrator.spec import load_study

    plan = build_plan(load_study(Path(__file__).resolve().parents[1] / "conf/quickstart.yaml"))
    nodes = [n.to_dict() for n in plan.nodes.values()]
    ft = next(n for n in nodes if n["step"] == "finetune")
    assert training_steps(ft["params"]) == 23  # one epoch of 360 examples in batches of 16
    trap = next(n for n in nodes if n["op"] == "trap2")
    for n in nodes:  # give the Trap² release 150 steps: it must leave before every fine-tune
        if n is trap:
            n["params"] = {**n["params"], "op": {**n["params"]["op"], "max_steps": 150}}
    assert estimated_cost(trap) == 150.0
    s = DagSearcher(nodes, cost=estimated_cost)
    assert s.suggest("t0")["node"]["id"] == trap["id"]
    assert s.suggest("t1")["node"]["step"] == "finetune"
    assert estimated_cost({"step": "merge", "params": {"op": {"epochs": 3}}}) == 12.0


def test_failure_skips_exactly_descendants_and_finishes():
    s = DagSearcher(dag())
    trials = {}
    for i in range(3):
        c = s.suggest(f"t{i}")
        trials[c["node"]["id"]] = f"t{i}"
    s.on_trial_complete(trials["b"], error=True)
    assert (
        s.state["c"] == SKIPPED
        and s.state["d"] == SKIPPED
        and s.state["e"] == SKIPPED
        and s.state["f"] == SKIPPED
    )
    assert s.state["a"] != SKIPPED and s.state["g"] != SKIPPED
    s.on_trial_complete(trials["a"])
    s.on_trial_complete(trials["g"])
    assert s.suggest("t9") == Searcher.FINISHED
    assert s.counts() == {"pending": 0, "running": 0, "done": 2, "failed": 1, "skipped": 4}


def test_done_nodes_are_not_suggested_and_state_round_trips(tmp_path):
    s = DagSearcher(dag(), done={"a", "b"})
    got = {s.suggest(f"t{i}")["node"]["id"] for i in range(3)}
    assert got == {"c", "d", "g"}
    path = tmp_path / "searcher.pkl"
    s.save(str(path))
    r = DagSearcher([])
    r.restore(str(path))
    # running trials are handed out again after a restore; done ones never are
    assert r.state["a"] == DONE and r.state["c"] == PENDING
    assert {r.suggest(f"u{i}")["node"]["id"] for i in range(3)} == {"c", "d", "g"}
    assert r.state["e"] == PENDING and r.state["f"] == PENDING


def _trainable(config):
    import random

    from ray import tune

    log = Path(config["log"])
    node = config["node"]
    (log / f"{node['id']}.start").write_text(str(time.time()))
    time.sleep(random.Random(node["id"]).uniform(0.05, 0.3))
    if node["id"] == config.get("fail"):
        raise RuntimeError("planned failure")
    (log / f"{node['id']}.end").write_text(str(time.time()))
    tune.report({"ok": 1})


@pytest.fixture(scope="module")
def ray_local():
    import ray

    # Workers import this module to unpickle the trainable.
    here = str(Path(__file__).parent)
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"PYTHONPATH": here}},
    )
    yield
    ray.shutdown()


@pytest.mark.parametrize("fail", [None, "b"])
def test_real_tune_run_respects_dependencies(ray_local, tmp_path, fail):
    from ray import tune

    s = DagSearcher(dag(), extra={"log": str(tmp_path), "fail": fail})
    tuner = tune.Tuner(
        tune.with_resources(_trainable, {"cpu": 0.5}),
        tune_config=tune.TuneConfig(search_alg=s, num_samples=-1),
        run_config=tune.RunConfig(storage_path=str(tmp_path / "tune"), verbose=0),
    )
    tuner.fit()
    ends = {p.stem: float(p.read_text()) for p in tmp_path.glob("*.end")}
    starts = {p.stem: float(p.read_text()) for p in tmp_path.glob("*.start")}
    for node, ups in EDGES.items():
        if node in starts:
            for u in ups:
                assert u in ends and ends[u] <= starts[node], f"{node} started before {u} finished"
    if fail is None:
        assert set(ends) == set(EDGES)
    else:
        assert set(starts) == {"a", "b", "g"}
        assert s.state["b"] == FAILED
        assert (
            json.dumps(sorted(k for k, v in s.state.items() if v == SKIPPED))
            == '["c", "d", "e", "f"]'
        )
