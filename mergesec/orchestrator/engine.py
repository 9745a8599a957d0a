"""Runs a study: plan, skip what the store has, run the rest as one Ray Tune ``Tuner``, report."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console

from mergesec.core.uris import redact_uri
from mergesec.orchestrator.errors import InfeasibleResources
from mergesec.orchestrator.leases import LeaseKeeper, lease_alive, new_owner
from mergesec.orchestrator.maintenance import check_inputs, tune_tmp_prefix
from mergesec.orchestrator.node import Node
from mergesec.orchestrator.plan import Plan, build_plan
from mergesec.orchestrator.priority import estimated_cost
from mergesec.orchestrator.progress import ProgressCallback
from mergesec.orchestrator.runner import run_trial
from mergesec.orchestrator.searcher import (
    DONE,
    FAILED,
    PENDING,
    RUNNING,
    SKIPPED,
    DagCallback,
    DagSearcher,
)
from mergesec.orchestrator.spec import STEP_NAMES, Study
from mergesec.orchestrator.store import Store, safe_name
from mergesec.orchestrator.tracking import (
    MlflowCallback,
    StudyTracker,
    TrackingWriter,
    liveness_tags,
    study_context,
    tracking_threads,
)

DEFAULT_STORE = "mergesec-store"

# Called with the plan and store when a run ends (the CLI writes the report); returns the files it
# wrote, ``{name: location}``, which go to the study's parent run.
OnFinish = Callable[[Plan, Store], Mapping[str, str]]


@dataclass
class RunSummary:
    study: str
    total: int
    cached: int
    ran: int = 0
    failed: list[tuple[str, str]] = field(
        default_factory=list
    )  # (node title, last line of the error)
    skipped: list[str] = field(default_factory=list)
    reports: dict[str, str] = field(default_factory=dict)
    wall_time_s: float = 0.0
    parent_run_id: str | None = None
    plan: Plan | None = None
    store: Store | None = None
    # Nodes whose MLflow run could not be written (the tracking server stayed unreachable); the
    # next invocation logs them.
    untracked: list[str] = field(default_factory=list)
    tracking_error: str = ""
    # Committed nodes found corrupt before use (invalidated and computed again): id -> problems.
    invalidated: dict[str, list[str]] = field(default_factory=dict)
    # Nodes another driver on the same store computed while this one waited for them.
    elsewhere: int = 0

    @property
    def ok(self) -> bool:
        return not self.failed and not self.skipped and not self.untracked


def node_states(plan: Plan, store: Store) -> dict[str, str]:
    """Every plan node's state in the store (done, failed or pending), from one listing."""
    held = store.states()
    return {i: held.get(i, "pending") for i in plan.nodes}


def _trial_name(trial) -> str:
    node = trial.config["node"]
    return f"{node['step']}-{node['op']}-{node['id'][:10]}"


FORWARDED_ENV = (
    "MERGESEC_PLUGINS",
    "MERGESEC_PRECISION",
    "MERGESEC_DATA_WORKERS",
    "HF_HUB_CACHE",
    "HF_HOME",
    "MERGESEC_CACHE",
    "HF_HUB_OFFLINE",
    "PYTHONPATH",
    "MERGESEC_STORE_URI",
)


def worker_env(environ: dict[str, str]) -> dict[str, str]:
    """The driver's variables the workers need, minus those a ``ray job submit`` runtime env sets.

    Ray refuses to merge a job's runtime env with a driver's that sets the same variable; the job's
    own value is the one its submitter chose, so it wins.
    """
    env = {k: environ[k] for k in FORWARDED_ENV if k in environ}
    job = environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if job:
        import json

        job_env = ((json.loads(job).get("runtime_env") or {}).get("env_vars")) or {}
        env = {k: v for k, v in env.items() if k not in job_env}
    return env


def _ray_init(address: str | None) -> bool:
    """Start Ray in-process (or join ``address``, or the cluster of a Ray job); True if started."""
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    env = worker_env(dict(os.environ))
    logging.getLogger("ray.tune").setLevel(logging.ERROR)
    ray.init(
        address=address,
        runtime_env={"env_vars": env} if env else None,
        include_dashboard=False,
        log_to_driver=False,
        logging_level=logging.WARNING,
        configure_logging=True,
    )
    return True


def check_resources(needs: dict[str, dict[str, float]], nodes: list[dict[str, float]]) -> None:
    """Raise ``InfeasibleResources`` for a step no Ray node can ever host, instead of hanging.

    ``needs`` maps a step to ``{"cpu":, "gpu":}``; ``nodes`` are the alive Ray nodes' resources.
    """

    big_cpu = max((n.get("CPU", 0.0) for n in nodes), default=0.0)
    big_gpu = max((n.get("GPU", 0.0) for n in nodes), default=0.0)
    total = {k: sum(n.get(k, 0.0) for n in nodes) for k in ("CPU", "GPU")}
    steps = [
        f"resources.{step} asks cpu={r['cpu']:g}, gpu={r['gpu']:g}"
        for step, r in sorted(needs.items())
        if r["cpu"] > big_cpu or r["gpu"] > big_gpu
    ]
    if steps:
        raise InfeasibleResources(
            f"{'; '.join(steps)}, but the cluster has {len(nodes)} node(s) with "
            f"{total['CPU']:g} CPU and {total['GPU']:g} GPU in all, at most {big_cpu:g} CPU and "
            f"{big_gpu:g} GPU on one node (set MERGESEC_AUTOSCALING=1 when an autoscaler adds "
            "nodes)"
        )


def run_study(
    study: Study,
    *,
    store_uri: str = DEFAULT_STORE,
    address: str | None = None,
    tracking_uri: str | None = None,
    max_concurrent: int | None = None,
    console: Console | None = None,
    on_finish: OnFinish | None = None,
) -> RunSummary:
    console = console or Console(stderr=True)
    started = time.time()
    plan = build_plan(study)
    store = Store(store_uri)
    states = node_states(plan, store)
    invalidated = check_inputs(plan, store, states)
    todo = [n for n in plan.topological() if states[n.id] != "done"]
    summary = RunSummary(study.name, len(plan.nodes), len(plan.nodes) - len(todo))
    summary.plan, summary.store = plan, store
    summary.invalidated = invalidated
    if todo:
        tracker, status = _run_nodes(
            plan, study, store, todo, summary, address, tracking_uri, max_concurrent, console
        )
    else:  # nothing to run: no Ray, but the study run still gets this invocation's reports
        tracker, status = (
            _open_tracking(plan, study, store, set(), summary, tracking_uri),
            "FINISHED",
        )
    if on_finish is not None:
        summary.reports = dict(on_finish(plan, store))
    local = [p for p in summary.reports.values() if os.path.exists(p)]
    tracker.end_parent(status, local)
    summary.wall_time_s = time.time() - started
    return summary


# Tune features the project does not use: per-trial result loggers (the store and MLflow hold
# the results) and periodic experiment checkpoints (the store is the checkpoint; a rerun resumes).
_TUNE_ENV = {
    "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1",
    "TUNE_GLOBAL_CHECKPOINT_S": str(10**9),
}


@contextlib.contextmanager
def _env(values: dict[str, str]):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def queue_window(cluster: dict[str, float]) -> int:
    """How many nodes of one resource shape may wait in Ray's queue: enough to fill the cluster."""
    return max(8, int(cluster.get("CPU", 0)) + int(cluster.get("GPU", 0)))


def run_dag(
    nodes: list[Node],
    store: Store,
    *,
    name: str,
    resources: dict[str, dict[str, float]],
    callbacks: list | None = None,
    retries: int = 0,
    max_concurrent: int | None = None,
    allow_remote_code: bool = False,
    cached: dict[str, int] | None = None,
    console: Console | None = None,
    timeouts: dict[str, float] | None = None,
    leases: LeaseKeeper | None = None,
) -> DagSearcher:
    """Run ``nodes`` (inputs outside the list count as done) as one Tuner; return the searcher's end state.

    Ray must already be initialised. ``resources`` maps a step to ``{"cpu": .., "gpu": ..}``.
    Ready nodes leave longest estimated path first (``priority.estimated_cost``). Every ready node
    is handed to Tune with its own resource shape (up to ``queue_window`` of each
    shape waiting at once), so nodes waiting for a GPU never hold back CPU nodes;
    ``max_concurrent`` bounds the nodes handed out and not finished. With ``leases``, a node is
    started only under this driver's lease; one another driver holds is waited for (see
    ``DagSearcher``).
    """
    import ray
    from ray import tune

    default = {"cpu": 1.0, "gpu": 0.0}

    def shape_of(node: dict[str, Any]) -> tuple[float, float]:
        r = resources.get(node["step"], default)
        return (float(r.get("cpu", 0)), float(r.get("gpu", 0)))

    window = queue_window(ray.cluster_resources())
    searcher = DagSearcher(
        [n.to_dict() for n in nodes],
        extra={
            "store": redact_uri(store.uri),
            "allow_remote_code": allow_remote_code,
            "timeouts": dict(timeouts or {}),
            "owner": leases.owner if leases is not None else "",
        },
        shape=shape_of,
        window=window,
        max_running=max_concurrent,
        cost=estimated_cost,
        **(lease_hooks(leases) if leases is not None else {}),
    )
    shapes = {shape_of(n) for n in searcher.nodes.values()}
    trainable = tune.with_resources(
        run_trial, lambda config: resources.get(config["node"]["step"], default)
    )
    progress = ProgressCallback(searcher, cached or {}, console or Console(stderr=True))
    # Tune's own files are not used (the store is the checkpoint): one directory per invocation,
    # so concurrent drivers never share it, removed at the end.
    tune_dir = tempfile.mkdtemp(prefix=tune_tmp_prefix())
    pending = str(max(1, window * len(shapes)))
    # Without per-trial result files Tune's end-of-run analysis warns once per trial.
    logging.getLogger("ray.tune.analysis.experiment_analysis").setLevel(logging.ERROR)
    try:
        with _env(_TUNE_ENV | {"TUNE_MAX_PENDING_TRIALS_PG": pending}):
            tune.Tuner(
                trainable,
                tune_config=tune.TuneConfig(
                    search_alg=searcher,
                    num_samples=-1,
                    # Not passed to Tune: there it would also cap the trials waiting for
                    # resources (its pending window); the searcher applies it instead.
                    max_concurrent_trials=None,
                    # Workers keep their imports (torch, transformers) between nodes.
                    reuse_actors=True,
                    trial_name_creator=_trial_name,
                    trial_dirname_creator=_trial_name,
                ),
                run_config=tune.RunConfig(
                    name=safe_name(name),
                    storage_path=str(tune_dir),
                    callbacks=[DagCallback(searcher), progress, *(callbacks or [])],
                    failure_config=tune.FailureConfig(max_failures=retries),
                    sync_config=tune.SyncConfig(sync_artifacts=False),
                    verbose=0,
                ),
            ).fit()
    finally:
        progress.close()
        shutil.rmtree(tune_dir, ignore_errors=True)
    return searcher


def lease_hooks(leases: LeaseKeeper) -> dict[str, Any]:
    """``DagSearcher``'s claim, release and elsewhere hooks on the store's leases."""
    store = leases.store

    def claim(node_id: str) -> bool:
        # a node another driver committed since this one read the store is not claimed: it then
        # waits aside, and the next poll of ``elsewhere`` finds it done
        try:
            if store.is_done(node_id) or leases.acquire(node_id) is not None:
                return False
            if store.is_done(node_id):  # committed between the check and the lease
                leases.release(node_id)
                return False
        except OSError:  # the store did not answer: run it; its commit is still conditional
            return True
        return True

    def release(node_id: str) -> None:
        with contextlib.suppress(OSError):  # else the lease expires by itself
            leases.release(node_id)

    def elsewhere(node_id: str) -> str:
        try:
            if store.is_done(node_id):
                return "done"
            return "held" if lease_alive(store, node_id) else "free"
        except OSError:
            return "held"  # asked again at the next poll

    return {"claim": claim, "release": release, "elsewhere": elsewhere}


def _open_tracking(
    plan: Plan,
    study: Study,
    store: Store,
    todo_ids: set[str],
    summary: RunSummary,
    tracking_uri: str | None,
    owner: str | None = None,
) -> TrackingWriter:
    """The study's background MLflow writer, opened (its study run started) for this invocation."""
    spec = study.spec

    def record(w: TrackingWriter) -> None:
        summary.parent_run_id = w.parent_id
        summary.untracked = w.unsent()
        summary.tracking_error = w.last_error if summary.untracked else ""

    context = study_context(study, plan, log_models=spec.tracking.log_models)
    tracker = TrackingWriter(
        lambda: StudyTracker(tracking_uri, study.name, spec.tracking.experiment, context),
        store,
        log_weights=spec.tracking.log_weights,
        threads=tracking_threads(tracking_uri),
        on_close=record,
    )
    tracker.open(
        study.raw,
        {
            "mergesec.store": redact_uri(store.uri),
            "mergesec.study_file": study.file,
            **(liveness_tags(owner) if owner else {}),
        },
        {i: "done" for i in plan.nodes if i not in todo_ids},
        plan.nodes,
    )
    return tracker


def _run_nodes(
    plan: Plan,
    study: Study,
    store: Store,
    todo: list[Node],
    summary: RunSummary,
    address: str | None,
    tracking_uri: str | None,
    max_concurrent: int | None,
    console: Console,
):
    import ray

    spec = study.spec
    started_ray = _ray_init(address)
    resources = {
        step: {"cpu": spec.resources_for(step).cpu, "gpu": spec.resources_for(step).gpu}
        for step in STEP_NAMES
    }
    if os.environ.get("MERGESEC_AUTOSCALING") != "1":  # an autoscaler adds nodes later
        try:
            check_resources(
                {n.step: resources[n.step] for n in todo},
                [n["Resources"] for n in ray.nodes() if n.get("Alive")],
            )
        except ValueError:
            if started_ray:
                ray.shutdown()
            raise
    todo_ids = {n.id for n in todo}
    owner = new_owner()
    tracker = _open_tracking(plan, study, store, todo_ids, summary, tracking_uri, owner)
    cached: dict[str, int] = {}
    for n in plan.topological():
        if n.id not in todo_ids:
            cached[n.step] = cached.get(n.step, 0) + 1
    timeouts = {
        step: spec.resources_for(step).timeout
        for step in STEP_NAMES
        if spec.resources_for(step).timeout
    }
    status = "FAILED"
    searcher = None
    leases = LeaseKeeper(store, owner=owner, on_beat=tracker.heartbeat)
    try:
        searcher = run_dag(
            todo,
            store,
            name=study.name,
            resources=resources,
            callbacks=[MlflowCallback(tracker)],
            retries=spec.retries,
            max_concurrent=max_concurrent,
            allow_remote_code=spec.allow_remote_code,
            cached=cached,
            console=console,
            timeouts=timeouts,
            leases=leases,
        )
        status = "FINISHED"
    finally:
        leases.close()
        states = searcher.state if searcher is not None else {}
        summary.elsewhere = len(searcher.done_elsewhere) if searcher is not None else 0
        summary.ran = sum(1 for s in states.values() if s == DONE) - summary.elsewhere
        for node_id, s in states.items():
            node = plan.nodes[node_id]
            if s == FAILED:
                err = (
                    store.failure(node_id).strip().splitlines()
                    if store.is_failed(node_id)
                    else ["unknown error"]
                )
                summary.failed.append((node.title(), err[-1] if err else ""))
            elif s == SKIPPED:
                summary.skipped.append(node.title())
                tracker.skip(node, plan.upstream_in(node_id, states, FAILED))
        if summary.failed or summary.skipped:
            status = "FAILED"
        if any(s in (PENDING, RUNNING) for s in states.values()):
            # Stopped before every node ended (SIGINT/SIGTERM): the parent run says so, and the
            # runs of the nodes that were running end KILLED instead of staying RUNNING.
            status = "KILLED"
            for node_id, s in states.items():
                if s == RUNNING:
                    tracker.finish(plan.nodes[node_id], "KILLED")
        if started_ray:
            ray.shutdown()
    return tracker, status
