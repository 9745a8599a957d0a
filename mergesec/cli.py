"""The ``mergesec`` command line."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from mergesec.orchestrator.engine import DEFAULT_STORE
from mergesec.orchestrator.errors import StudyError

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
    from mergesec.orchestrator.spec import load_study

    try:
        return load_study(study, overrides or [])
    except StudyError as e:
        for line in e.lines():
            sys.stderr.write(line + "\n")
        raise typer.Exit(2) from None


def _results_table(rows: list[dict]) -> Table:
    from mergesec.report import COLUMNS

    cols = [c for c in COLUMNS if c != "variant" or any(r["variant"] for r in rows)]
    t = Table(title="results (test accuracy)")
    for c in cols:
        t.add_column(
            c,
            justify="right"
            if c not in {"variant", "scenario", "victim", "merge", "status"}
            else "left",
        )
    for r in rows:
        t.add_row(
            *(
                f"{r[c]:.3f}"
                if isinstance(r.get(c), float)
                else ("-" if r.get(c) is None else str(r[c]))
                for c in cols
            )
        )
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
    """Validate, plan and run a study; resume by running the same command again."""
    s = _load(study, set_)
    from mergesec.orchestrator.engine import run_study

    try:
        summary = run_study(
            s,
            store_uri=store,
            address=address,
            tracking_uri=tracking_uri,
            max_concurrent=max_concurrent,
            console=err,
        )
    except ValueError as e:  # bad store URI, unreachable cluster address, ...
        err.print(f"{study}: {e}", highlight=False, markup=False)
        raise typer.Exit(2) from None
    out.print(_results_table(summary.rows))
    out.print(
        f"nodes: {summary.total} total, {summary.cached} already in the store, {summary.ran} ran, "
        f"{len(summary.failed)} failed, {len(summary.skipped)} skipped; {summary.wall_time_s:.1f}s"
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


@app.command()
def plan(study: StudyArg, set_: SetOpt = None, store: StoreOpt = DEFAULT_STORE) -> None:
    """Show the DAG of nodes without running anything."""
    s = _load(study, set_)
    from mergesec.orchestrator.engine import node_states
    from mergesec.orchestrator.plan import build_plan
    from mergesec.orchestrator.store import Store

    p = build_plan(s)
    states = node_states(p, Store(store))
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


@app.command()
def status(study: StudyArg, set_: SetOpt = None, store: StoreOpt = DEFAULT_STORE) -> None:
    """What is done, failed and pending in the store."""
    s = _load(study, set_)
    from mergesec.orchestrator.engine import node_states
    from mergesec.orchestrator.plan import build_plan
    from mergesec.orchestrator.store import Store

    p = build_plan(s)
    st = Store(store)
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

    from mergesec.orchestrator.plan import build_plan
    from mergesec.orchestrator.store import Store
    from mergesec.report import build_results, report_files, write_files

    p = build_plan(s)
    st = Store(store)
    files = report_files(p, st, build_results(p, st))
    paths = write_files(p, st, files)
    text = files[{"md": "results.md", "csv": "results.csv", "json": "results.json"}[format_]]
    sys.stdout.write(text)
    for name, path in paths.items():
        err.print(f"  {name}: {path}", highlight=False)


@app.command()
def ops() -> None:
    """Every registered op with its parameters and defaults."""
    from mergesec.core.registry import all_ops

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


def main() -> None:
    app()


if __name__ == "__main__":
    main()
