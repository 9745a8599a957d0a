"""Runs a study: plan, skip what the store has, run the rest as one Ray Tune ``Tuner``, report."""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from rich.console import Console

from mergesec.orchestrator.node import Node
from mergesec.orchestrator.plan import Plan, build_plan
from mergesec.orchestrator.searcher import DONE, FAILED, SKIPPED, DagSearcher
from mergesec.orchestrator.spec import STEP_NAMES, Study
from mergesec.orchestrator.store import Store, safe_name

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

    @property
    def ok(self) -> bool:
        return not self.failed and not self.skipped


def node_states(plan: Plan, store: Store) -> dict[str, str]:
    return {
        i: "done" if store.is_done(i) else ("failed" if store.is_failed(i) else "pending")
        for i in plan.nodes
    }


def _trial_name(trial) -> str:
    node = trial.config["node"]
    return f"{node['step']}-{node['op']}-{node['id'][:10]}"


def _ray_init(address: str | None) -> bool:
    """Start Ray in-process (or join ``address``); returns whether this call started it."""
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "100")
    env = {
        k: os.environ[k]
        for k in (
            "MERGESEC_PLUGINS",
            "MERGESEC_PRECISION",
            "MERGESEC_DATA_WORKERS",
            "HF_HUB_CACHE",
            "MERGESEC_CACHE",
            "HF_HUB_OFFLINE",
            "PYTHONPATH",
        )
        if k in os.environ
    }
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
    todo = [n for n in plan.topological() if states[n.id] != "done"]
    summary = RunSummary(study.name, len(plan.nodes), len(plan.nodes) - len(todo))
    summary.plan, summary.store = plan, store
    tracked = None
    if todo:
        tracked = _run_nodes(
            plan, study, store, todo, summary, address, tracking_uri, max_concurrent, console
        )
    if on_finish is not None:
        summary.reports = dict(on_finish(plan, store))
    if tracked is not None:
        tracker, status = tracked
        local = [p for p in summary.reports.values() if os.path.exists(p)]
        tracker.end_parent(status, local)
    summary.wall_time_s = time.time() - started
    return summary


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
) -> DagSearcher:
    """Run ``nodes`` (inputs outside the list count as done) as one Tuner; return the searcher's end state.

    Ray must already be initialised. ``resources`` maps a step to ``{"cpu": .., "gpu": ..}``.
    """
    from ray import tune

    from mergesec.orchestrator.progress import ProgressCallback
    from mergesec.orchestrator.runner import run_trial

    searcher = DagSearcher(
        [n.to_dict() for n in nodes],
        extra={"store": store.uri, "allow_remote_code": allow_remote_code},
    )
    default = {"cpu": 1.0, "gpu": 0.0}
    trainable = tune.with_resources(
        run_trial, lambda config: resources.get(config["node"]["step"], default)
    )
    progress = ProgressCallback(searcher, cached or {}, console or Console(stderr=True))
    tune_dir = (
        store.local / "tune"
        if store.local is not None
        else tempfile.mkdtemp(prefix="mergesec-tune-")
    )
    try:
        tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(
                search_alg=searcher,
                num_samples=-1,
                max_concurrent_trials=max_concurrent,
                # Workers keep their imports (torch, transformers) between nodes.
                reuse_actors=True,
                trial_name_creator=_trial_name,
                trial_dirname_creator=_trial_name,
            ),
            run_config=tune.RunConfig(
                name=safe_name(name),
                storage_path=str(tune_dir),
                callbacks=[progress, *(callbacks or [])],
                failure_config=tune.FailureConfig(max_failures=retries),
                verbose=0,
            ),
        ).fit()
    finally:
        progress.close()
    return searcher


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

    from mergesec.orchestrator.tracking import MlflowCallback, StudyTracker

    spec = study.spec
    started_ray = _ray_init(address)
    tracker = StudyTracker(tracking_uri, study.name, spec.tracking.experiment)
    tracker.reconcile(store, plan.nodes)
    summary.parent_run_id = tracker.start_parent(
        study.name, study.raw, {"mergesec.store": store.uri, "mergesec.study_file": study.file}
    )
    todo_ids = {n.id for n in todo}
    cached: dict[str, int] = {}
    for n in plan.topological():
        if n.id not in todo_ids:
            cached[n.step] = cached.get(n.step, 0) + 1
    resources = {
        step: {"cpu": spec.resources_for(step).cpu, "gpu": spec.resources_for(step).gpu}
        for step in STEP_NAMES
    }
    status = "FAILED"
    searcher = None
    try:
        searcher = run_dag(
            todo,
            store,
            name=study.name,
            resources=resources,
            callbacks=[MlflowCallback(tracker, store, spec.tracking.log_weights)],
            retries=spec.retries,
            max_concurrent=max_concurrent,
            allow_remote_code=spec.allow_remote_code,
            cached=cached,
            console=console,
        )
        status = "FINISHED"
    finally:
        states = searcher.state if searcher is not None else {}
        summary.ran = sum(1 for s in states.values() if s == DONE)
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
        if summary.failed or summary.skipped:
            status = "FAILED"
        if started_ray:
            ray.shutdown()
    return tracker, status
