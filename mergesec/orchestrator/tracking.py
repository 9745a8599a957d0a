"""MLflow tracking from the driver: a background writer fed by a Ray Tune ``Callback``.

One experiment per study, one parent run per invocation, one child run per node. A node's child run
is found again by the tag ``mergesec.node_id`` (all of a study's runs are listed once per
invocation), so a resumed study reuses it instead of adding a duplicate. Workers never talk to
MLflow.

Tune's callbacks only put events on a queue; one thread sends them to MLflow in order, merging
consecutive metric reports of a run into one request and retrying with back-off while the tracking
server is unreachable. Nothing here raises into Tune. What is still unsent when the study ends is
listed in the run summary, and the next invocation logs the nodes it missed (``reconcile``).

Run names, tags and params are made by ``node_run_name``, ``node_tags``, ``node_params`` and
``parent_tags`` alone, from the study's own words (``run_facts``) when the tracker is given a
``StudyContext``: scenario factors as tags and params, Markdown descriptions with links to the
input runs (``run_notes``), datasets as run inputs, headline metrics under stable names on each
merged evaluation once its plan row is complete, and the results table on the study's run. A
resumed study continues under its earlier study run when the study is unchanged.
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import getpass
import hashlib
import json
import logging
import os
import re
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import yaml
from ray.tune import Callback

import mergesec
from mergesec.core.uris import redact_uri
from mergesec.data import dataset_slug
from mergesec.orchestrator.headline import headline_metrics, headline_nodes, row_numbers
from mergesec.orchestrator.leases import lease_ttl, owner_may_live
from mergesec.orchestrator.node import Node, canonical_json
from mergesec.orchestrator.plan import Plan
from mergesec.orchestrator.run_facts import FACTORS, RunFacts, describe_plan, poison_text
from mergesec.orchestrator.run_notes import RESULTS_FILE, InputRun, node_note, parent_note
from mergesec.orchestrator.runner import STEP_KEY
from mergesec.orchestrator.spec import Study
from mergesec.orchestrator.store import Store

TAG_NODE = "mergesec.node_id"
TAG_STUDY = "mergesec.study"
TAG_ROLE = "mergesec.role"
TAG_STATUS = "mergesec.status"
TAG_INVOCATION = "mergesec.invocation"
TAG_DIGEST = "mergesec.study_digest"
TAG_NOTE = "mlflow.note.content"
TAG_KIND = "mlflow.experimentKind"
# The MLflow UI opens an experiment of this kind in its model-training layout.
EXPERIMENT_KIND = "custom_model_development"
RESULTS_TABLE = RESULTS_FILE
SWEEP_TABLE = "sweep.json"
# Model-producing roles that may become MLflow logged models (``tracking.log_models``).
MODEL_ROLES = ("expert", "release", "attacked", "merge")
# Step metrics of the merge search are logged as ``sweep/...``; the chosen values are the run's
# visible ``chosen/...`` and ``merge/coefficient``.
SEARCH_PREFIX, SWEEP_PREFIX = "search/", "sweep/"
DEFAULT_URI = "sqlite:///mlflow.db"
# Files of a node the driver logs as artifacts; everything else (weights) stays in the store.
SMALL_FILES = (".png", ".md")
log = logging.getLogger("mergesec.tracking")


def tracking_uri(explicit: str | None) -> str:
    return explicit or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI


def tracking_threads(uri: str | None) -> int:
    """Writer threads: several for a tracking server, one for a local database or directory."""
    if os.environ.get("MERGESEC_TRACKING_THREADS"):
        return max(1, int(os.environ["MERGESEC_TRACKING_THREADS"]))
    return 4 if tracking_uri(uri).startswith(("http://", "https://")) else 1


_MLFLOW_UNSAFE = re.compile(r"[^A-Za-z0-9_\-. /]")


def mlflow_key(name: str) -> str:
    """A param or metric name MLflow accepts (letters, digits, ``_ - . /`` and spaces)."""
    return _MLFLOW_UNSAFE.sub("_", name)


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v and "search" not in v:
            out.update(flatten(v, key + "."))
        elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
            for i, x in enumerate(v):
                out.update(flatten(x, f"{key}.{i}."))
        else:
            out[key] = json.dumps(v) if not isinstance(v, str) else v
    return {mlflow_key(k): v[:6000] for k, v in out.items()}


@dataclass
class StudyContext:
    """What the tracker knows of the study beyond its nodes; a bare DAG (tests, benchmarks) has
    none and its runs are named by ``Node.title``."""

    plan: Plan | None = None
    facts: dict[str, RunFacts] = field(default_factory=dict)
    source: str = ""  # the command, e.g. ``mergesec run conf/quickstart.yaml``
    study_text: str | None = None  # the study file as given
    resolved: str | None = None  # the study after overrides, each variant validated (YAML)
    digest: str = ""  # of ``resolved``: an unchanged study continues under its study run
    log_models: bool = False


def study_context(study: Study, plan: Plan, log_models: bool = False) -> StudyContext:
    try:
        text = Path(study.file).read_text()
    except OSError:
        text = None
    resolved = yaml.safe_dump(
        {
            "study": study.raw,
            "variants": [
                {"variant": label, "spec": spec.model_dump(mode="json")}
                for label, spec in study.variants
            ],
        },
        sort_keys=False,
    )
    try:
        facts = describe_plan(plan, study)
    except Exception as e:  # noqa: BLE001 - naming runs must never stop a study
        log.warning("MLflow run names fall back to node titles (%s: %s)", type(e).__name__, e)
        facts = {}
    return StudyContext(
        plan=plan,
        facts=facts,
        source=f"mergesec run {study.file}",
        study_text=text,
        resolved=resolved,
        digest=hashlib.sha256(resolved.encode()).hexdigest()[:16],
        log_models=log_models,
    )


@cache
def _git_commit() -> str | None:
    """The commit of the mergesec checkout in use, when it is one."""
    try:
        out = subprocess.run(
            ["git", "-C", str(Path(mergesec.__file__).parent), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else None


def source_tags(source: str) -> dict[str, str]:
    """``mlflow.source.*``, user and mergesec version tags of every run of the study."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    tags = {
        "mlflow.user": user,
        "mlflow.source.type": "LOCAL",
        "mlflow.source.name": source or "mergesec",
        "mergesec.version": mergesec.__version__,
    }
    commit = _git_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit
    return tags


# ---- what a run is called and tagged with (the one place that decides it)
def parent_run_name(study: str, invocation: int = 1) -> str:
    return study if invocation <= 1 else f"{study} · invocation {invocation}"


def parent_tags(study: str, extra: dict[str, str]) -> dict[str, str]:
    return {TAG_STUDY: study, **extra}


def node_run_name(node: Node, facts: RunFacts | None = None) -> str:
    return facts.name if facts is not None else node.title()


def node_tags(
    node: Node,
    parent_id: str | None,
    input_runs: dict[str, str],
    facts: RunFacts | None = None,
) -> dict[str, str]:
    tags = {
        TAG_NODE: node.id,
        "mergesec.step": node.step,
        "mergesec.op": node.op,
        "mergesec.scenario": ";".join(node.labels.get("scenario", [])) or "-",
        "mergesec.what": ",".join(node.labels.get("what", [])),
        "mlflow.parentRunId": parent_id or "",
    }
    if facts is not None:
        tags[TAG_ROLE] = facts.role
        tags.update(facts.factors)
    for role, up in node.inputs.items():
        tags[f"mergesec.input_node.{role}"] = up
        if up in input_runs:
            tags[f"mergesec.input.{role}"] = input_runs[up]
    return tags


def node_params(node: Node, facts: RunFacts | None = None) -> dict[str, str]:
    params = flatten({"op": node.op_key} | node.params)
    if facts is not None:
        params.update({k: v[:6000] for k, v in facts.factors.items() if k in FACTORS})
    return params


def node_datasets(node: Node) -> list:
    """The datasets a node reads, as MLflow dataset inputs (name, source, digest, context)."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    p = node.params
    refs = p.get("datasets") if isinstance(p.get("datasets"), list) else []
    if isinstance(p.get("dataset"), dict):
        refs = [p["dataset"], *[r for r in refs if r.get("uri") != p["dataset"].get("uri")]]
    context = {
        "finetune": "training",
        "protect": "training",
        "attack": "attack",
        "merge": "merge search (validation)",
        "monitor": "monitor",
    }.get(node.step, str(p.get("split", "evaluation")))
    poison = p.get("poison") if node.step in ("finetune", "protect", "monitor") else None
    out = []
    for i, ref in enumerate(r for r in refs if isinstance(r, dict) and "uri" in r):
        poisoned = poison if i == 0 else None
        name = dataset_slug(ref["uri"])
        if poisoned:
            name += f" (poisoned: {poison_text(poisoned)})"
        digest = (
            ref.get("sha256")
            or hashlib.sha256(
                canonical_json({"ref": ref, "poison": poisoned}).encode()
            ).hexdigest()[:16]
        )
        ds = Dataset(name, digest[:36], "mergesec", redact_uri(str(ref["uri"])))
        out.append(DatasetInput(ds, tags=[InputTag("mlflow.data.context", context)]))
    return out


def sweep_key(key: str) -> str:
    """A merge-search step metric's MLflow name (``search/score`` -> ``sweep/score``)."""
    return SWEEP_PREFIX + key[len(SEARCH_PREFIX) :] if key.startswith(SEARCH_PREFIX) else key


def table_json(columns: list[str], data: list[list[Any]]) -> str:
    """A table in the form ``MlflowClient.log_table`` writes (pandas ``orient="split"``)."""
    return json.dumps({"columns": columns, "data": data}, default=str)


@contextlib.contextmanager
def sqlite_setup_lock(uri: str) -> Iterator[None]:
    """Serialise first contact with a SQLite tracking database: two drivers opening a new one at
    once would both run MLflow's schema migrations on it and break it. A lock file beside the
    database; other URIs need none."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    path = uri[len("sqlite:///") :].split("?", 1)[0]
    with open(f"{path}.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# ---- liveness: a driver's parent run carries its owner and a heartbeat, so that another driver
# on the same experiment never closes (or logs into) the runs of a driver that is still alive
TAG_OWNER = "mergesec.owner"
TAG_HEARTBEAT = "mergesec.heartbeat"


def liveness_tags(owner: str, now: float | None = None) -> dict[str, str]:
    return {TAG_OWNER: owner, TAG_HEARTBEAT: f"{time.time() if now is None else now:.0f}"}


def parent_is_live(tags: dict[str, str], now: float | None = None) -> bool:
    """Whether a RUNNING parent run's driver beat within the lease time (``lease_ttl``) and, on
    this host, its process still exists."""
    try:
        beat = float(tags.get(TAG_HEARTBEAT, ""))
    except ValueError:
        return False
    fresh = (time.time() if now is None else now) - beat < lease_ttl()
    return fresh and owner_may_live(tags.get(TAG_OWNER, ""))


def live_parents(runs: list, study: str) -> dict[str, str]:
    """``{run id: owner}`` of the study's parent runs whose driver is alive."""
    return {
        r.info.run_id: r.data.tags.get(TAG_OWNER, "")
        for r in runs
        if TAG_NODE not in r.data.tags
        and r.data.tags.get(TAG_STUDY) == study
        and r.info.status == "RUNNING"
        and parent_is_live(r.data.tags)
    }


def numeric_metrics(metrics: dict[str, Any], step: int | None, ts: int) -> list:
    from mlflow.entities import Metric

    return [
        Metric(mlflow_key(k), float(v), ts, step or 0)
        for k, v in metrics.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool)
    ]


class StudyTracker:
    """Synchronous MLflow calls for one study: its experiment, parent run and child runs.

    Only the ``TrackingWriter`` thread calls it during a run; every method may raise.
    """

    def __init__(
        self,
        uri: str | None,
        study: str,
        experiment: str | None = None,
        context: StudyContext | None = None,
    ):
        from mlflow.tracking import MlflowClient

        logging.getLogger("mlflow").setLevel(logging.WARNING)
        logging.getLogger("alembic").setLevel(logging.WARNING)
        self.uri = tracking_uri(uri)
        if self.uri.startswith(("http://", "https://")):
            # The writer retries with its own back-off; MLflow's default (7 retries with
            # exponential waits) would hold one event for minutes while the server is down.
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "60")
            # Ending a run would otherwise fetch it again just to print its URL on stdout.
            os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
        self.study = study
        self.experiment_name = experiment or f"mergesec/{study}"
        self.ctx = context or StudyContext()
        self.client = MlflowClient(self.uri)
        if self.uri.startswith("sqlite:///"):
            with sqlite_setup_lock(self.uri):  # the first call creates or migrates the schema
                self.client.search_experiments(max_results=1)
        self.experiment_id: str | None = None
        self.parent_id: str | None = None
        self.invocation = 1
        self._source = source_tags(self.ctx.source)
        self._parents: list = []  # earlier study runs of this study
        self._node_runs: dict[str, str] = {}
        # run id -> artifact URI, from the run's creation; spares a request to look it up when
        # the run's files are logged
        self._artifact_uris: dict[str, str] = {}
        self._finished: set[str] = set()  # node ids whose run is FINISHED
        self._params_due: set[str] = set()  # runs created without their params
        self._sweeps: dict[str, dict[int, dict[str, float]]] = {}  # node -> step -> sweep metrics
        self._rows: dict[int, dict[str, Any]] = {}  # plan row -> its results, once complete
        self._table_sent = 0.0  # when the parent's results table was last written

    def _facts(self, node: Node) -> RunFacts | None:
        return self.ctx.facts.get(node.id)

    def connect(self) -> None:
        if self.experiment_id is None:
            with sqlite_setup_lock(self.uri):
                exp = self._experiment()
            self.experiment_id = exp.experiment_id
            tags = exp.tags
            if tags.get(TAG_KIND) != EXPERIMENT_KIND:
                self.client.set_experiment_tag(self.experiment_id, TAG_KIND, EXPERIMENT_KIND)
            if TAG_NOTE not in tags:
                self.client.set_experiment_tag(
                    self.experiment_id, TAG_NOTE, self._experiment_note()
                )

    def _experiment(self):
        """The study's experiment, created when absent (another driver may create it first)."""
        from mlflow.exceptions import MlflowException

        exp = self.client.get_experiment_by_name(self.experiment_name)
        if exp is None:
            # a concurrent driver may create it in between: then read theirs below
            with contextlib.suppress(MlflowException):
                self.client.create_experiment(self.experiment_name)
            exp = self.client.get_experiment_by_name(self.experiment_name)
        if exp is None:
            raise RuntimeError(f"could not create MLflow experiment {self.experiment_name!r}")
        return exp

    def _experiment_note(self) -> str:
        return (
            f"mergesec study `{self.study}`: model-merging security scenarios. The run named "
            "after the study holds the results table (`results_table.json`), the study file and "
            "the reports; each node of the study (fine-tune, protect, attack, merge, evaluate, "
            "monitor) is one child run named in the study's words.\n\n"
            "- Merged evaluations: filter `tags.mergesec.role = 'merged eval'`; headline metrics "
            "`victim/accuracy_clean`, `victim/accuracy_release`, `victim/accuracy_merged`, "
            "`others/accuracy_mean`, `merge/coefficient`.\n"
            "- Scenario factors are params and tags: `scenario`, `variant`, `victim`, "
            "`protect_op`, `attack_op`, `poison`, `merge_op`, `seed` (group by them in the chart "
            "view).\n"
            "- Each run's description links to the runs it read from.\n"
        )

    def _all_runs(self) -> list:
        """Every run of the experiment, paginated: one listing per invocation."""
        runs, token = [], None
        while True:
            page = self.client.search_runs([self.experiment_id], max_results=1000, page_token=token)
            runs.extend(page)
            token = page.token
            if not token:
                return runs

    def start_parent(self, params: dict[str, Any], tags: dict[str, str]) -> str:
        """The study's run: the latest one of an unchanged study continues (renamed for this
        invocation), otherwise a new one. Logs the study file as given and as resolved."""
        from mlflow.entities import RunTag

        self.connect()
        self.invocation = 1 + max((_invocation(p) for p in self._parents), default=0)
        name = parent_run_name(self.study, self.invocation)
        all_tags = parent_tags(self.study, tags) | self._source
        all_tags[TAG_INVOCATION] = str(self.invocation)
        if self.ctx.digest:
            all_tags[TAG_DIGEST] = self.ctx.digest
        latest = max(self._parents, key=lambda r: r.info.start_time or 0, default=None)
        if (
            latest is not None
            and self.ctx.digest
            and latest.data.tags.get(TAG_DIGEST) == self.ctx.digest
        ):
            self.parent_id = latest.info.run_id
            self.client.update_run(self.parent_id, status="RUNNING", name=name)
            self.client.log_batch(self.parent_id, tags=[RunTag(k, v) for k, v in all_tags.items()])
        else:
            run = self.client.create_run(self.experiment_id, run_name=name, tags=all_tags)
            self.parent_id = run.info.run_id
            self._log_params(self.parent_id, flatten(params))
        self._log_texts(
            self.parent_id,
            {"study.yaml": self.ctx.study_text, "study.resolved.yaml": self.ctx.resolved},
            artifact_path="study",
        )
        self.client.set_tag(self.parent_id, TAG_NOTE, self._parent_note())
        return self.parent_id

    def _parent_note(self) -> str:
        rows = [self._rows[i] for i in sorted(self._rows)]
        total = len(self.ctx.plan.rows) if self.ctx.plan is not None else 0
        return parent_note(
            self.study, self.invocation, self.ctx.source, self.experiment_id, rows, total
        )

    def _log_texts(self, run_id: str, files: Mapping[str, str | None], artifact_path=None) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            for name, text in files.items():
                if text is None:
                    continue
                p = os.path.join(tmp, name)
                with open(p, "w") as f:
                    f.write(text)
                self._log_artifact(run_id, p, artifact_path)

    def _log_artifact(self, run_id: str, path: str, artifact_path: str | None = None) -> None:
        """``log_artifact`` without fetching the run first when its artifact URI is known."""
        from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

        uri = self._artifact_uris.get(run_id)
        if uri is None:
            self.client.log_artifact(run_id, path, artifact_path=artifact_path)
        else:
            get_artifact_repository(uri, tracking_uri=self.uri).log_artifact(path, artifact_path)

    def _log_table(self, run_id: str, name: str, columns: list[str], data: list[list]) -> None:
        """Write (or replace) a table artifact the UI lists as one (``log_table``'s format and
        tag; ``log_table`` itself would append to an existing file)."""
        self._log_texts(run_id, {name: table_json(columns, data)})
        self.client.set_tag(
            run_id, "mlflow.loggedArtifacts", json.dumps([{"path": name, "type": "table"}])
        )

    def reconcile(
        self,
        states: dict[str, str],
        nodes: dict[str, Node],
        committed_by: Callable[[str], str] | None = None,
    ) -> list[Node]:
        """Index the study's runs; close what a killed invocation left RUNNING.

        Returns the plan's nodes the store holds as done that have no FINISHED run yet (an earlier
        invocation could not log them); the caller logs them. Runs of a live driver (see
        ``parent_is_live``) are never closed nor continued, and the nodes it committed
        (``committed_by`` gives a node's committing driver) are left for it to log.
        """
        self.connect()
        runs = self._all_runs()
        live = live_parents(runs, self.study)  # other drivers' runs: left as they are
        theirs: set[str] = set()
        for r in runs:
            tags, status = r.data.tags, r.info.status
            node_id = tags.get(TAG_NODE)
            if node_id is None:
                if tags.get(TAG_STUDY) == self.study and r.info.run_id not in live:
                    self._parents.append(r)
                    if status == "RUNNING":
                        self.client.set_terminated(r.info.run_id, status="KILLED")  # stale
                continue
            self._node_runs.setdefault(node_id, r.info.run_id)
            if status == "FINISHED":
                self._finished.add(node_id)
            elif status == "RUNNING" and tags.get("mlflow.parentRunId") in live:
                theirs.add(node_id)
            elif status == "RUNNING" and states.get(node_id) != "done":
                self.client.set_tag(r.info.run_id, TAG_STATUS, "killed")
                self.client.set_terminated(r.info.run_id, status="KILLED")
        owners = set(live.values())
        return [
            n
            for i, n in nodes.items()
            if states.get(i) == "done"
            and i not in self._finished
            and i not in theirs
            and (committed_by is None or committed_by(i) not in owners)
        ]

    def beat(self) -> None:
        """Renew the parent run's heartbeat."""
        if self.parent_id is not None:
            self.client.set_tag(self.parent_id, TAG_HEARTBEAT, liveness_tags("")[TAG_HEARTBEAT])

    def end_parent(
        self, status: str, artifacts: list[str] = (), store: Store | None = None
    ) -> None:
        """Log the results table, summary metrics and report files on the study run; end it."""
        if self.parent_id is None:
            return
        if store is not None and self.ctx.plan is not None:
            for i in range(len(self.ctx.plan.rows)):
                self._row_result(i, store)
            self._send_results(force=True)
        for a in artifacts:
            if os.path.exists(a):
                self.client.log_artifact(self.parent_id, a, artifact_path="report")
        self.client.set_terminated(self.parent_id, status=status)

    def _log_params(self, run_id: str, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        self.client.log_batch(run_id, params=[Param(k, v) for k, v in params.items()])

    def _find(self, node_id: str) -> str | None:
        runs = self.client.search_runs(
            [self.experiment_id], filter_string=f"tags.`{TAG_NODE}` = '{node_id}'", max_results=1
        )
        return runs[0].info.run_id if runs else None

    def _inputs(self, node: Node, only: set[str] | None = None) -> list[InputRun]:
        out = []
        for role, up in node.inputs.items():
            if only is not None and up not in only:
                continue
            upn = self.ctx.plan.nodes.get(up) if self.ctx.plan is not None else None
            f = self.ctx.facts.get(up)
            name = f.name if f is not None else (upn.title() if upn is not None else up)
            out.append((role, name, self._node_runs.get(up)))
        return out

    def _note(self, node: Node, **kw: Any) -> str | None:
        f = self._facts(node)
        if f is None:
            return None
        return node_note(f, node, self.experiment_id, self._inputs(node), **kw)

    def start_node(self, node: Node, retry: bool = False, params: bool = True) -> str:
        """The node's run, created or reused and set RUNNING.

        ``retry``: an earlier attempt failed and may have created the run before the connection
        dropped, so look for it once before creating another. ``params=False`` leaves the params
        to ``finish_node`` (one request less when the node is already over).
        """
        from mlflow.entities import RunTag

        self.connect()
        if retry and node.id not in self._node_runs:
            found = self._find(node.id)
            if found:
                self._node_runs[node.id] = found
                self._params_due.add(node.id)  # the lost attempt may not have sent them
        facts = self._facts(node)
        tags = node_tags(node, self.parent_id, self._node_runs, facts)
        if facts is not None:
            tags |= self._source | {TAG_STATUS: "running", TAG_NOTE: self._note(node) or ""}
        existing = self._node_runs.get(node.id)
        if existing:
            self.client.log_batch(existing, tags=[RunTag(k, v) for k, v in tags.items()])
            self.client.update_run(existing, status="RUNNING", name=node_run_name(node, facts))
            self._finished.discard(node.id)
            return existing
        run = self.client.create_run(
            self.experiment_id, run_name=node_run_name(node, facts), tags=tags
        )
        self._node_runs[node.id] = run.info.run_id
        self._artifact_uris[run.info.run_id] = run.info.artifact_uri
        if params:
            self._log_params(run.info.run_id, node_params(node, facts))
        else:
            self._params_due.add(node.id)
        if facts is not None:
            datasets = node_datasets(node)
            if datasets:
                self.client.log_inputs(run.info.run_id, datasets=datasets)
        return run.info.run_id

    def log_metrics(self, node_id: str, metrics: list) -> None:
        run_id = self._node_runs.get(node_id)
        if run_id is not None and metrics:
            self.client.log_batch(run_id, metrics=metrics)
            for m in metrics:
                if m.key.startswith(SWEEP_PREFIX):
                    self._sweeps.setdefault(node_id, {}).setdefault(m.step, {})[m.key] = m.value

    def finish_node(self, node: Node, store: Store, status: str, log_weights: bool = False) -> None:
        """Log the node's small files and end its run. Reads metrics, ``node.json``, PNG and
        Markdown files only (weights too when ``log_weights``), never the whole node."""
        from mlflow.entities import Param, RunTag

        run_id = self._node_runs.get(node.id)
        if run_id is None:
            return
        facts = self._facts(node)
        with tempfile.TemporaryDirectory() as tmp:
            params = (
                [Param(k, v) for k, v in node_params(node, facts).items()]
                if node.id in self._params_due
                else []
            )
            metrics, values, error = [], {}, None
            ts = int(time.time() * 1000)
            if status == "FINISHED":
                values = store.metrics_if_done(node.id) or {}
                if "chosen/coefficient" in values:
                    values = values | {"merge/coefficient": values["chosen/coefficient"]}
                metrics = numeric_metrics(values, None, ts)
            elif store.is_failed(node.id):
                lines = store.failure(node.id).strip().splitlines()
                error = lines[-1] if lines else "unknown error"
            tags = []
            if facts is not None:
                state = {"FINISHED": "done", "FAILED": "failed"}.get(status, status.lower())
                note = self._note(node, metrics=values, error=error)
                tags = [RunTag(TAG_STATUS, state), RunTag(TAG_NOTE, note or "")]
                if error is not None:
                    tags.append(RunTag("mergesec.error", error[:500]))
            if params or metrics or tags:
                self.client.log_batch(run_id, metrics=metrics, params=params, tags=tags)
                self._params_due.discard(node.id)
            if status == "FINISHED":
                suffixes = SMALL_FILES + ((".safetensors",) if log_weights else ())
                try:
                    files = store.fetch_files(
                        node.id, tmp, names=("node.json", "metrics.json"), suffixes=suffixes
                    )
                except ValueError:  # corrupt (``CorruptNode``): the next run computes it again
                    files = []
                for path in files:
                    weights = path.suffix == ".safetensors"
                    self._log_artifact(run_id, str(path), "weights" if weights else None)
                self._log_sweep(node.id, run_id)
                if self.ctx.log_models and facts is not None and facts.role in MODEL_ROLES:
                    self._log_model(node, facts, run_id, store)
            elif store.is_failed(node.id):
                p = os.path.join(tmp, "traceback.txt")
                with open(p, "w") as f:
                    f.write(store.failure(node.id))
                self._log_artifact(run_id, p)
        self._end_run(run_id, status)
        if status == "FINISHED":
            self._finished.add(node.id)
            self._rows_done_by(node, store)

    def skip_node(self, node: Node, failed: list[Node]) -> None:
        """A run for a node skipped because an input failed: KILLED, with links to the failed
        upstream runs."""
        from mlflow.entities import RunTag

        run_id = self.start_node(node)
        tags = [RunTag(TAG_STATUS, "skipped")]
        f = self._facts(node)
        if f is not None:
            failed_runs = [
                (
                    n.step,
                    self.ctx.facts[n.id].name if n.id in self.ctx.facts else n.title(),
                    self._node_runs.get(n.id),
                )
                for n in failed
            ]
            note = node_note(
                f, node, self.experiment_id, self._inputs(node), failed_inputs=failed_runs
            )
            tags.append(RunTag(TAG_NOTE, note))
        self.client.log_batch(run_id, tags=tags)
        self._end_run(run_id, "KILLED")

    def _end_run(self, run_id: str, status: str) -> None:
        self.client.set_terminated(run_id, status=status)
        self._artifact_uris.pop(run_id, None)

    def _log_sweep(self, node_id: str, run_id: str) -> None:
        """The merge search as a table: one row per candidate tried (step), its settings and
        score."""
        sweep = self._sweeps.pop(node_id, None)
        if not sweep:
            return
        keys = sorted({k for row in sweep.values() for k in row})
        cols = ["step", *(k[len(SWEEP_PREFIX) :] for k in keys)]
        data = [[step, *(sweep[step].get(k) for k in keys)] for step in sorted(sweep)]
        self._log_table(run_id, SWEEP_TABLE, cols, data)

    def _log_model(self, node: Node, facts: RunFacts, run_id: str, store: Store) -> None:
        """An MLflow logged model for a model a node produced, pointing at the store (nothing is
        uploaded)."""
        from mlflow.entities import LoggedModelOutput, LoggedModelStatus

        where = redact_uri(store.location(f"nodes/{node.id}"))
        model = self.client.create_logged_model(
            self.experiment_id,
            name=re.sub(r"[^A-Za-z0-9_.-]+", "-", facts.name).strip("-")[:200] or node.id,
            source_run_id=run_id,
            tags={TAG_NODE: node.id, "mergesec.store_location": where, TAG_ROLE: facts.role},
            params={k: v for k, v in facts.factors.items()},
            model_type=f"mergesec/{facts.role}",
        )
        self.client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)
        self.client.log_outputs(run_id, [LoggedModelOutput(model.model_id, step=0)])

    # ---- plan rows: headline metrics on the merged evaluation, the table on the study run
    def _rows_done_by(self, node: Node, store: Store) -> None:
        plan, facts = self.ctx.plan, self._facts(node)
        if plan is None or facts is None:
            return
        changed = False
        for i in facts.rows:
            if i not in self._rows and all(
                n in self._finished for n in headline_nodes(plan.rows[i])
            ):
                changed |= self._row_result(i, store, log=True)
        if changed:
            self._send_results()

    def _row_result(self, i: int, store: Store, log: bool = False) -> bool:
        """Compute row ``i`` from the store when its merged evaluation is done; with ``log``,
        log its headline metrics and description on the merged evaluation's run."""
        from mlflow.entities import RunTag

        if i in self._rows:
            return False
        row = self.ctx.plan.rows[i]
        if not store.is_done(row.merge_eval):
            return False
        numbers = row_numbers(row, store.metrics_if_done)
        headline = headline_metrics(numbers)
        run_id = self._node_runs.get(row.merge_eval)
        self._rows[i] = {
            "variant": row.variant,
            "scenario": row.scenario,
            "victim": dataset_slug(row.victim),
            "merge": row.merge_op,
            **{k: v for k, v in numbers.items() if k != "per_dataset"},
            "run_id": run_id,
        }
        if log and run_id is not None:
            node = self.ctx.plan.nodes[row.merge_eval]
            ts = int(time.time() * 1000)
            note = self._note(
                node, metrics=store.metrics_if_done(row.merge_eval) or {}, headline=headline
            )
            self.client.log_batch(
                run_id,
                metrics=numeric_metrics(headline, None, ts),
                tags=[RunTag(TAG_NOTE, note or "")],
            )
        return True

    def _send_results(self, force: bool = False, every_s: float = 30.0) -> None:
        """The results table, summary metrics and description of the study run (at most every
        ``every_s`` seconds unless ``force``)."""
        if self.parent_id is None or not self._rows:
            return
        if not force and time.monotonic() - self._table_sent < every_s:
            return
        self._table_sent = time.monotonic()
        rows = [self._rows[i] for i in sorted(self._rows)]
        cols = list(dict.fromkeys(k for r in rows for k in r))
        self._log_table(
            self.parent_id, RESULTS_TABLE, cols, [[r.get(c) for c in cols] for r in rows]
        )
        ts = int(time.time() * 1000)
        self.client.log_batch(
            self.parent_id,
            metrics=numeric_metrics(study_summary(rows, len(self.ctx.plan.rows)), None, ts),
        )
        self.client.set_tag(self.parent_id, TAG_NOTE, self._parent_note())


def _invocation(run) -> int:
    """Which invocation a study run says it is (1 when it does not say)."""
    value = run.data.tags.get(TAG_INVOCATION, "1")
    return int(value) if value.isdigit() else 1


def study_summary(rows: list[dict[str, Any]], total: int) -> dict[str, float]:
    """The study run's metrics: rows done, and the victim's merged accuracy over them."""
    merged = [r["victim_merged"] for r in rows if isinstance(r.get("victim_merged"), (int, float))]
    others = [r["others_merged"] for r in rows if isinstance(r.get("others_merged"), (int, float))]
    out = {"study/rows": float(total), "study/rows_done": float(len(rows))}
    if merged:
        out |= {
            "study/victim_accuracy_merged_mean": sum(merged) / len(merged),
            "study/victim_accuracy_merged_min": min(merged),
            "study/victim_accuracy_merged_max": max(merged),
        }
    if others:
        out["study/others_accuracy_mean"] = sum(others) / len(others)
    return out


@dataclass
class _Op:
    kind: str  # "open", "start", "metrics", "finish", "skip", "end", "beat"
    node: Node | None = None
    args: dict[str, Any] = field(default_factory=dict)
    metrics: list = field(default_factory=list)
    attempts: int = 0


class TrackingWriter:
    """Sends tracking events to MLflow from background threads, in order per node, with retries.

    Events are sharded by node over ``threads`` threads (one is right for a local database; a
    tracking server answers several requests at once). A node's run is created after its inputs'
    runs, so lineage tags can name them. ``max_metric_events`` bounds the queued metric reports
    (the oldest are dropped first and counted in ``dropped_metrics``); start and finish events are
    never dropped (two per node).
    """

    def __init__(
        self,
        make_tracker: Callable[[], StudyTracker],
        store: Store,
        *,
        log_weights: bool = False,
        threads: int = 1,
        max_metric_events: int = 10_000,
        backoff: tuple[float, float] = (0.2, 15.0),
        on_close: Callable[[TrackingWriter], None] | None = None,
    ):
        self.on_close = on_close
        self.make_tracker = make_tracker
        self.tracker: StudyTracker | None = None
        self.store = store
        self.log_weights = log_weights
        self.max_metric_events = max_metric_events
        self.backoff = backoff
        self.dropped_metrics = 0
        self.errors = 0
        self.last_error = ""
        self.parent_id: str | None = None
        self._queues: list[collections.deque[_Op]] = [collections.deque() for _ in range(threads)]
        self._busy: list[_Op | None] = [None] * threads
        self._starting: set[str] = set()  # nodes whose start is queued, not yet sent
        self._finishing: set[str] = set()  # nodes whose finish is queued, not yet sent
        self._n_metrics = 0
        self._cv = threading.Condition()
        self._opened = False
        self._abandoned = False
        self._failing = False  # the last request failed (no answer yet since)
        self._last_ok = time.monotonic()
        self._threads = [
            threading.Thread(target=self._loop, args=(k,), name=f"mergesec-tracking-{k}")
            for k in range(threads)
        ]
        for t in self._threads:
            t.daemon = True
            t.start()

    # ---- producers (Tune's thread): never block for long, never raise
    def _shard(self, node: Node | None) -> int:
        return 0 if node is None else hash(node.id) % len(self._queues)

    def _put(self, op: _Op, front: bool = False) -> None:
        """Queue ``op``; the caller holds ``self._cv``."""
        q = self._queues[self._shard(op.node)]
        if op.kind == "metrics":
            if self._n_metrics >= self.max_metric_events:
                old = next((i for i, o in enumerate(q) if o.kind == "metrics"), None)
                if old is None:
                    self.dropped_metrics += 1
                    return
                del q[old]
                self._n_metrics -= 1
                self.dropped_metrics += 1
            self._n_metrics += 1
        elif op.kind == "start":
            self._starting.add(op.node.id)
        elif op.kind == "finish":
            self._finishing.add(op.node.id)
        if front:
            q.appendleft(op)
        else:
            q.append(op)
        self._cv.notify_all()

    def _enqueue(self, op: _Op) -> None:
        with self._cv:
            self._put(op)

    def open(
        self,
        params: dict[str, Any],
        tags: dict[str, str],
        states: dict[str, str],
        nodes: dict[str, Node],
    ) -> None:
        """Connect, index and reconcile the study's runs, start the parent run (before anything)."""
        args = {"params": params, "tags": tags, "states": states, "nodes": nodes}
        self._enqueue(_Op("open", args=args))

    def heartbeat(self) -> None:
        """Renew the parent run's liveness tag (one beat queued at most)."""
        with self._cv:
            if self._opened and not any(o.kind == "beat" for o in self._queues[0]):
                self._put(_Op("beat"), front=True)

    def start(self, node: Node) -> None:
        self._enqueue(_Op("start", node))

    def metrics(self, node: Node, metrics: dict[str, Any], step: int | None) -> None:
        ms = numeric_metrics(metrics, step, int(time.time() * 1000))
        if ms:
            self._enqueue(_Op("metrics", node, metrics=ms))

    def finish(self, node: Node, status: str) -> None:
        self._enqueue(_Op("finish", node, args={"status": status}))

    def skip(self, node: Node, failed: list[Node]) -> None:
        """A node skipped because ``failed`` (upstream nodes) failed."""
        self._enqueue(_Op("skip", node, args={"failed": list(failed)}))

    def end_parent(
        self, status: str, artifacts: list[str] = (), grace_s: float | None = None
    ) -> None:
        """Send everything queued, then end the parent run; give up when nothing could be sent
        for ``grace_s`` seconds (``MERGESEC_TRACKING_GRACE_S``, default 60)."""
        grace = self._grace(grace_s)
        if self._drain(grace):
            self._enqueue(_Op("end", args={"status": status, "artifacts": list(artifacts)}))
            self._drain(grace)
        self._stop()

    def close(self, grace_s: float | None = None) -> None:
        """Send what is queued (same ``grace_s`` as ``end_parent``) and stop; what is left stays
        unsent (``unsent``) and is never sent later."""
        self._drain(self._grace(grace_s))
        self._stop()

    @staticmethod
    def _grace(grace_s: float | None) -> float:
        if grace_s is not None:
            return float(grace_s)
        return float(os.environ.get("MERGESEC_TRACKING_GRACE_S", 60))

    def _drain(self, grace: float) -> bool:
        """Wait until every queue is empty (True), or nothing was sent for ``grace`` seconds."""
        with self._cv:
            # a slow server that still answers is waited for; one that fails gets ``grace``
            while self._pending() and (
                not self._failing or time.monotonic() - self._last_ok < grace
            ):
                self._cv.wait(timeout=0.2)
            return not self._pending()

    def _pending(self) -> bool:
        return any(self._queues) or any(b is not None for b in self._busy)

    def _stop(self) -> None:
        with self._cv:
            self._abandoned = True  # the threads stop at their next step
            self._cv.notify_all()
        if self.on_close is not None:
            self.on_close(self)

    def unsent(self) -> list[str]:
        """Titles of the nodes whose start or finish has not reached MLflow."""
        with self._cv:
            ops = [b for b in self._busy if b is not None] + [o for q in self._queues for o in q]
        titles = []
        for op in ops:
            if op.kind in ("start", "finish") and op.node.title() not in titles:
                titles.append(op.node.title())
        return titles

    # ---- the writer threads
    def _next(self, k: int) -> _Op | None:
        q = self._queues[k]
        with self._cv:
            while not self._abandoned and (not q or (k > 0 and not self._opened)):
                self._cv.wait(timeout=0.5)
            if self._abandoned:
                return None
            op = q.popleft()
            self._busy[k] = op
            if op.kind == "metrics":
                self._n_metrics -= 1
                # one request for consecutive reports of the same node
                while q and q[0].kind == "metrics" and q[0].node.id == op.node.id:
                    if len(op.metrics) >= 900:
                        break
                    op.metrics.extend(q.popleft().metrics)
                    self._n_metrics -= 1
            elif op.kind == "start":
                # the inputs' runs first, so that this run's lineage tags can name them
                while not self._abandoned and any(
                    up in self._starting for up in op.node.inputs.values()
                ):
                    self._cv.wait(timeout=0.2)
            return op

    def _loop(self, k: int) -> None:
        while True:
            op = self._next(k)
            if op is None:
                return
            delay = self.backoff[0]
            while True:
                try:
                    self._apply(op)
                    break
                except Exception as e:  # noqa: BLE001 - tracking must never stop the study
                    op.attempts += 1
                    self.errors += 1
                    self.last_error = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                    if op.attempts == 1:
                        log.warning("MLflow unreachable (%s); retrying", self.last_error)
                    with self._cv:
                        self._failing = True
                        if self._abandoned:
                            self._busy[k] = None
                            self._queues[k].appendleft(op)  # keep it listed as unsent
                            self._cv.notify_all()
                            return
                    time.sleep(delay)
                    delay = min(delay * 2, self.backoff[1])
            with self._cv:
                self._busy[k] = None
                if op.kind == "start":
                    self._starting.discard(op.node.id)
                elif op.kind == "finish":
                    self._finishing.discard(op.node.id)
                self._last_ok = time.monotonic()
                self._failing = False
                self._cv.notify_all()

    def _apply(self, op: _Op) -> None:
        if self.tracker is None:
            self.tracker = self.make_tracker()
        t = self.tracker
        if op.kind == "open":
            a = op.args
            backlog = t.reconcile(a["states"], a["nodes"], self._committed_by)
            if t.parent_id is None:
                self.parent_id = t.start_parent(a["params"], a["tags"])
            # nodes an earlier invocation finished but could not log: log them before the rest
            with self._cv:
                for n in reversed(backlog):
                    self._put(_Op("finish", n, args={"status": "FINISHED"}), front=True)
                    self._put(_Op("start", n), front=True)
                self._opened = True
        elif op.kind == "start":
            # a node already over sends its params with its metrics, in one request
            over = op.node.id in self._finishing
            t.start_node(op.node, retry=op.attempts > 0, params=not over)
        elif op.kind == "metrics":
            t.log_metrics(op.node.id, op.metrics)
        elif op.kind == "finish":
            t.finish_node(op.node, self.store, op.args["status"], self.log_weights)
        elif op.kind == "skip":
            t.skip_node(op.node, op.args["failed"])
        elif op.kind == "end":
            t.end_parent(op.args["status"], op.args["artifacts"], self.store)
        elif op.kind == "beat":
            t.beat()

    def _committed_by(self, node_id: str) -> str:
        """The driver that committed the node, from its manifest ("" when unknown)."""
        try:
            m = self.store.manifest(node_id)
        except ValueError:
            return ""
        return m.owner if m is not None else ""


class MlflowCallback(Callback):
    """Ray Tune callback that mirrors every trial (node) into an MLflow child run, through a
    ``TrackingWriter``: it only queues events, so Tune's loop never waits on MLflow."""

    def __init__(self, writer: TrackingWriter):
        self.writer = writer

    def __getstate__(self) -> dict:
        # Tune pickles its run config (callbacks included) into the experiment directory; the live
        # writer cannot be pickled and is not needed by a restored experiment's metadata.
        return {"writer": None}

    @staticmethod
    def _node(trial) -> Node:
        return Node.from_dict(trial.config["node"])

    def on_trial_start(self, iteration, trials, trial, **info):
        self.writer.start(self._node(trial))

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if result.get("node_done"):
            return
        step = result.get(STEP_KEY)
        metrics = {sweep_key(k): v for k, v in result.items() if "/" in k or k in {"epoch"}}
        self.writer.metrics(self._node(trial), metrics, int(step) if step is not None else None)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.writer.finish(self._node(trial), "FINISHED")

    def on_trial_error(self, iteration, trials, trial, **info):
        self.writer.finish(self._node(trial), "FAILED")
