"""Orchestration at sweep scale: trivial nodes in a sweep-shaped DAG, and the driver's cost per event.

For each N the same DAG (groups of 8 expert roots, 6 merges of all 8, one evaluation per merge)
runs through mergesec with the store alone, with MLflow on SQLite, and with a real
``mlflow server`` on 127.0.0.1, next to a plain Ray Tune grid of N trials (no dependencies) in the
same Ray instance. The server runs as the README's cluster recipe starts it (Flask under
gunicorn, ``--gunicorn-opts``); ``server_uvicorn`` is the same server as MLflow starts it by
default (FastAPI and uvicorn around the same Flask app). The server's own CPU time per node is
printed for every server path. The pure driver cost (``DagSearcher`` and progress, no Ray) is
measured per event on a 1e4- and a 1e5-node plan.

    python benchmarks/orchestration_scale.py [--n 100 1000 10000] [--cpus 2] [--paths ...]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
PATHS = ("grid", "store", "sqlite", "server", "server_uvicorn", "grid_server")


def sweep_dicts(n: int, datasets: int = 8, merges: int = 6) -> list[dict]:
    """Plan-shaped node dicts: ``datasets`` roots, ``merges`` merges of them, an eval per merge."""
    nodes: list[dict] = []
    while len(nodes) < n:
        roots = []
        for _ in range(datasets):
            nodes.append({"id": f"{len(nodes):016x}", "step": "finetune", "op": "x", "inputs": {}})
            roots.append(nodes[-1]["id"])
        for _ in range(merges):
            ins = {f"e{j}": r for j, r in enumerate(roots)}
            nodes.append({"id": f"{len(nodes):016x}", "step": "merge", "op": "x", "inputs": ins})
            merged = nodes[-1]["id"]
            nodes.append(
                {"id": f"{len(nodes):016x}", "step": "evaluate", "op": "x", "inputs": {"m": merged}}
            )
    return nodes[:n]


def driver_cost(n: int) -> dict[str, float]:
    """Seconds per driver event (suggest, start, complete, progress line) over a whole plan."""
    from ray.tune.search import Searcher

    from mergesec.orchestrator.progress import progress_line, progress_table
    from mergesec.orchestrator.searcher import DagSearcher

    shapes = {"finetune": (1, 1), "merge": (2, 0), "evaluate": (1, 0)}
    nodes = sweep_dicts(n)
    t = time.perf_counter()
    s = DagSearcher(nodes, shape=lambda d: shapes[d["step"]], window=64)
    build = time.perf_counter() - t
    live: list[tuple[str, dict]] = []
    k = events = 0
    t = time.perf_counter()
    while True:
        c = s.suggest(f"t{k}")
        events += 1
        if isinstance(c, dict):
            s.on_trial_start(f"t{k}")
            live.append((f"t{k}", c["node"]))
            progress_line(s, c["node"], "start", 0.0)
            k += 1
            events += 1
        elif c == Searcher.FINISHED:
            break
        else:
            tid, node = live.pop(0)
            s.on_trial_complete(tid)
            progress_line(s, node, "done", 0.0)
            events += 1
    per_event = (time.perf_counter() - t) / events
    t = time.perf_counter()
    progress_table(s, {}, 0.0)
    return {
        "n": n,
        "build_s": build,
        "events": events,
        "per_event_us": per_event * 1e6,
        "table_ms": (time.perf_counter() - t) * 1e3,
    }


def sweep_nodes(n: int):
    from mergesec.orchestrator.node import Node

    nodes, by_id = [], {}
    for d in sweep_dicts(n):
        ins = {role: by_id[up] for role, up in d["inputs"].items()}
        node = Node("evaluate", "bench_noop", "1", {"seed": int(d["id"], 16)}, ins)
        by_id[d["id"]] = node.id
        nodes.append(node)
    return nodes


class MlflowServer:
    def __init__(self, root: Path, cores: set[int] | None = None, app: str = "gunicorn"):
        self.root, self.cores = root, cores
        # MLflow's default app wraps Flask in FastAPI and uvicorn; gunicorn serves Flask directly
        self.app_args = ["--gunicorn-opts", "--log-level warning"] if app == "gunicorn" else []
        with __import__("socket").socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> MlflowServer:
        exe = shutil.which("mlflow")
        cmd = [exe] if exe else [sys.executable, "-m", "mlflow"]
        self.proc = subprocess.Popen(
            [*cmd, "server", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"]
            + ["--backend-store-uri", f"sqlite:///{self.root / 'server.db'}"]
            + ["--artifacts-destination", str(self.root / "artifacts")]
            + self.app_args,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            # the job runner (seven consumer processes for jobs mergesec never submits) would
            # spend about 20 s of CPU starting up on the cores the study runs on
            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
            preexec_fn=(lambda: os.sched_setaffinity(0, self.cores)) if self.cores else None,
        )
        for _ in range(400):
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2):
                    return self
            except OSError:
                time.sleep(0.3)
        raise RuntimeError("mlflow server did not start")

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)

    def cpu_seconds(self) -> float:
        """CPU time of the server's process tree so far (Linux ``/proc``; 0 elsewhere)."""
        tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        parents: dict[int, int] = {}
        times: dict[int, int] = {}
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            pid = int(stat.parent.name)
            parents[pid] = int(fields[1])
            times[pid] = sum(int(f) for f in fields[11:15])  # utime stime cutime cstime
        tree, grew = {self.proc.pid}, True
        while grew:
            more = {p for p, pp in parents.items() if pp in tree} - tree
            tree |= more
            grew = bool(more)
        return sum(times.get(p, 0) for p in tree) / tick


def run_mergesec(nodes, root: Path, tracking_uri: str | None) -> float:
    from mergesec.orchestrator.engine import run_dag
    from mergesec.orchestrator.store import Store
    from mergesec.orchestrator.tracking import (
        MlflowCallback,
        StudyTracker,
        TrackingWriter,
        tracking_threads,
    )

    store = Store(str(root / "store"))
    callbacks, writer = [], None
    t = time.perf_counter()
    if tracking_uri:
        writer = TrackingWriter(
            lambda: StudyTracker(tracking_uri, "bench"),
            store,
            threads=tracking_threads(tracking_uri),
        )
        writer.open({}, {}, {}, {})
        callbacks.append(MlflowCallback(writer))
    with open(os.devnull, "w") as quiet:
        from rich.console import Console

        s = run_dag(
            nodes,
            store,
            name="bench",
            resources={"evaluate": {"cpu": 1, "gpu": 0}},
            callbacks=callbacks,
            console=Console(file=quiet),
        )
    if writer is not None:
        writer.end_parent("FINISHED")  # the time to the last MLflow write counts
        assert not writer.unsent(), writer.last_error
    elapsed = time.perf_counter() - t
    assert all(v == "done" for v in s.state.values())
    return elapsed


def run_grid(n: int, root: Path, tracking_uri: str | None = None) -> float:
    """A plain Ray Tune grid of ``n`` trials; with ``tracking_uri``, tracked by Ray's own
    ``MLflowLoggerCallback`` (one MLflow run per trial, logged in Tune's callbacks)."""
    from ray.air.integrations.mlflow import MLflowLoggerCallback

    from benchmarks.orchestration_overhead import run_tune_grid

    callbacks = [MLflowLoggerCallback(tracking_uri, experiment_name="grid")] if tracking_uri else []
    return run_tune_grid(n, root, callbacks)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, nargs="+", default=[100, 1000, 10000])
    ap.add_argument("--paths", nargs="+", choices=PATHS, default=list(PATHS))
    ap.add_argument("--driver-n", type=int, nargs="*", default=[10_000, 100_000])
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument(
        "--server-cores",
        type=int,
        nargs="*",
        default=[],
        help="pin the mlflow servers to these cores and everything else (driver, Ray, the grid) "
        "to the others: the tracking server on a host of its own, as on a cluster",
    )
    ap.add_argument(
        "--grid-server-max-n",
        type=int,
        default=1000,
        help="run the grid_server path up to this N (0.17-0.19 s per trial on 2 cores)",
    )
    ap.add_argument(
        "--uvicorn-max-n",
        type=int,
        default=1000,
        help="run the server_uvicorn path (MLflow's default server app) up to this N",
    )
    args = ap.parse_args()

    for n in args.driver_n:
        d = driver_cost(n)
        print(
            f"driver cost at {n} nodes: {d['per_event_us']:.1f} us per event over {d['events']} "
            f"events; plan state built in {d['build_s']:.2f} s; progress table {d['table_ms']:.2f} ms"
        )
    if not args.n:
        return
    os.environ["MERGESEC_BENCH_WORK"] = "100"  # trivial nodes: what is measured is overhead
    os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    os.environ["MERGESEC_PLUGINS"] = "benchmarks.orchestration_overhead"
    os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "0"
    import ray

    from benchmarks.orchestration_overhead import _register  # noqa: F401 - registers bench_noop

    env = {k: os.environ[k] for k in ("PYTHONPATH", "MERGESEC_PLUGINS", "MERGESEC_BENCH_WORK")}
    server_cores = set(args.server_cores) or None
    if server_cores:
        rest = os.sched_getaffinity(0) - server_cores
        if not rest:
            sys.exit(f"--server-cores {sorted(server_cores)} leaves no core for Ray")
        os.sched_setaffinity(0, rest)  # Ray's processes inherit it
        print(f"mlflow servers on cores {sorted(server_cores)}; driver and Ray on {sorted(rest)}")
    ray.init(
        num_cpus=args.cpus,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": env},
    )
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.n:
            nodes = sweep_nodes(n)
            row = {"n": n}
            for path in args.paths:
                cap = {"grid_server": args.grid_server_max_n, "server_uvicorn": args.uvicorn_max_n}
                if n > cap.get(path, n):
                    print(f"N={n} {path}: skipped (run up to N={cap[path]})")
                    continue
                root = Path(tmp) / f"{n}-{path}"
                root.mkdir(parents=True)
                if path == "grid":
                    row[path] = run_grid(n, root)
                elif path == "store":
                    row[path] = run_mergesec(nodes, root, None)
                elif path == "sqlite":
                    row[path] = run_mergesec(nodes, root, f"sqlite:///{root / 'mlflow.db'}")
                else:
                    app = "uvicorn" if path == "server_uvicorn" else "gunicorn"
                    with MlflowServer(root, server_cores, app) as server:
                        started = server.cpu_seconds()  # start-up and schema creation excluded
                        if path.startswith("server"):
                            row[path] = run_mergesec(nodes, root, server.url)
                        else:
                            row[path] = run_grid(n, root, server.url)
                        row[f"{path}_cpu"] = server.cpu_seconds() - started
                print(
                    f"N={n} {path}: {row[path]:.1f} s ({row[path] / n:.4f} s per node)", flush=True
                )
                if f"{path}_cpu" in row:
                    cpu = row[f"{path}_cpu"]
                    print(
                        f"N={n} {path}: the mlflow server's own CPU time {cpu:.1f} s "
                        f"({cpu / n:.4f} s per node)",
                        flush=True,
                    )
            rows.append(row)
    ray.shutdown()
    names = {
        "grid": "plain Tune grid",
        "store": "mergesec, store",
        "sqlite": "store + MLflow SQLite",
        "server": "store + mlflow server (gunicorn)",
        "server_uvicorn": "store + mlflow server (MLflow's default uvicorn)",
        "grid_server": "Tune grid + MLflowLoggerCallback, mlflow server (gunicorn)",
    }
    print(f"\n{args.cpus} CPUs; seconds per node (wall time / N); ratio to the Tune grid")
    print("| N | " + " | ".join(names[p] for p in args.paths) + " |")
    print("|---" * (len(args.paths) + 1) + "|")
    for row in rows:
        cells = []
        for p in args.paths:
            if p not in row:
                cells.append("—")
                continue
            per = row[p] / row["n"]
            ratio = f" ({row[p] / row['grid']:.2f}x)" if "grid" in row and p != "grid" else ""
            cells.append(f"{per:.4f}{ratio}")
        print(f"| {row['n']} | " + " | ".join(cells) + " |")
    for row in rows:
        if "server" in row and "grid_server" in row:
            print(
                f"N={row['n']}: mergesec with an mlflow server / the Tune grid tracked by "
                f"MLflowLoggerCallback to the same kind of server: "
                f"{row['server'] / row['grid_server']:.2f}x"
            )
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
