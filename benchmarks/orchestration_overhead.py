"""Orchestration overhead: the same trivial DAG through mergesec, a plain Ray Tune grid, and direct calls.

mergesec's path is the real one (DagSearcher, the trainable, the store's atomic node directories,
optionally the MLflow callback on SQLite); the plain Tune grid runs the same work function as a
function trainable with the same resources and actor reuse; direct calls run it in a loop.

    python benchmarks/orchestration_overhead.py [--leaves 16] [--work 200000] [--repeat 2]

Each path runs ``--repeat`` times in turn (Ray started once, so worker start-up is not charged to
whichever path happens to run first); the best time of each is reported, with the overhead per
node over the direct calls.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORK = int(os.environ.get("MERGESEC_BENCH_WORK", "200000"))


def work(seed: int, n: int | None = None) -> float:
    """A deterministic unit of CPU work (``WORK // 100`` loop steps; the default is under 1 ms)."""
    x = float(seed)
    for i in range((WORK if n is None else n) // 100):
        x = (x * 1.000001 + i) % 1e6
    return x


def _noop_executor(ctx) -> dict[str, float]:
    return {"value": work(int(ctx.params["seed"]))}


def _register() -> None:
    from mergesec.core.registry import register_op

    def noop(*, seed: int = 0) -> None:
        """A trivial op for the orchestration benchmark."""

    register_op("evaluate", "bench_noop", fn=noop, executor=_noop_executor)


_register()


def dag(leaves: int):
    from mergesec.orchestrator.node import Node

    nodes = [Node("evaluate", "bench_noop", "1", {"seed": i}, {}) for i in range(leaves)]
    for i in range(0, leaves, 2):
        ups = {"a": nodes[i].id, "b": nodes[i + 1].id}
        nodes.append(Node("evaluate", "bench_noop", "1", {"seed": 1000 + i}, ups))
    return nodes


def run_mergesec(nodes, root: Path, tracking: bool) -> float:
    from mergesec.orchestrator.engine import run_dag
    from mergesec.orchestrator.store import Store
    from mergesec.orchestrator.tracking import MlflowCallback, StudyTracker, TrackingWriter

    store = Store(str(root / ("store-mlflow" if tracking else "store")))
    callbacks, writer = [], None
    if tracking:
        uri = f"sqlite:///{root / 'mlflow.db'}"
        writer = TrackingWriter(lambda: StudyTracker(uri, "bench"), store)
        writer.open({}, {}, {}, {})
        callbacks.append(MlflowCallback(writer))
    t = time.perf_counter()
    s = run_dag(
        nodes,
        store,
        name="bench",
        resources={"evaluate": {"cpu": 1, "gpu": 0}},
        callbacks=callbacks,
    )
    if writer is not None:
        writer.end_parent("FINISHED")  # the time to the last MLflow write counts
    elapsed = time.perf_counter() - t
    assert all(v == "done" for v in s.state.values()), s.state
    return elapsed


def _tune_trainable(config):
    from ray import tune

    tune.report({"value": work(config["seed"])})


def run_tune_grid(n: int, root: Path, callbacks: list | None = None) -> float:
    """Seconds for a plain Ray Tune grid of ``n`` trivial trials (no dependencies)."""
    from ray import tune

    t = time.perf_counter()
    tune.Tuner(
        tune.with_resources(_tune_trainable, {"cpu": 1}),
        param_space={"seed": tune.grid_search(list(range(n)))},
        tune_config=tune.TuneConfig(reuse_actors=True),
        run_config=tune.RunConfig(
            storage_path=str(root / "tune-grid"), verbose=0, callbacks=callbacks or []
        ),
    ).fit()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument(
        "--leaves", type=int, default=16, help="independent nodes; half as many depend on pairs"
    )
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--work", type=int, default=None, help="size of each node's unit of work")
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()
    global WORK
    WORK = args.work or WORK
    os.environ["MERGESEC_BENCH_WORK"] = str(WORK)
    os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    os.environ["MERGESEC_PLUGINS"] = "benchmarks.orchestration_overhead"
    sys.path.insert(0, str(REPO))
    import ray

    nodes = dag(args.leaves)
    n = len(nodes)
    t = time.perf_counter()
    for node in nodes:
        work(int(node.params["seed"]))
    direct = time.perf_counter() - t
    env = {k: os.environ[k] for k in ("PYTHONPATH", "MERGESEC_PLUGINS", "MERGESEC_BENCH_WORK")}
    ray.init(
        num_cpus=args.cpus,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": env},
    )
    times: dict[str, list[float]] = {"grid": [], "store": [], "mlflow": []}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeat):
            root = Path(tmp) / str(i)
            (root / "tracked").mkdir(parents=True)
            times["grid"].append(run_tune_grid(n, root))
            times["store"].append(run_mergesec(nodes, root, tracking=False))
            times["mlflow"].append(run_mergesec(nodes, root / "tracked", tracking=True))
    grid, ms, ms_mlflow = min(times["grid"]), min(times["store"]), min(times["mlflow"])
    ray.shutdown()
    rows = [
        ("direct calls", direct),
        ("plain Ray Tune grid", grid),
        ("mergesec (store)", ms),
        ("mergesec (store + MLflow)", ms_mlflow),
    ]
    print(
        f"{n} trivial nodes ({args.leaves} independent, {n - args.leaves} depending on two), {args.cpus} CPUs"
    )
    print(f"work per node (direct): {direct / n * 1000:.1f} ms; best of {args.repeat} runs")
    head = f"{'path':28s} {'seconds':>8s} {'per node':>9s} {'overhead/node':>14s} {'vs direct':>10s} {'vs Tune grid':>13s}"
    print(head)
    for name, sec in rows:
        print(
            f"{name:28s} {sec:8.2f} {sec / n:9.3f} {(sec - direct) / n:14.3f} "
            f"{sec / direct:10.1f} {sec / grid:13.2f}"
        )
    print(json.dumps({name: round(sec, 3) for name, sec in rows}))


if __name__ == "__main__":
    main()
