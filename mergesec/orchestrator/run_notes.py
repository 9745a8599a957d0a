"""The Markdown descriptions (``mlflow.note.content``) of a study's runs: what the run is, links to
the runs it read from, its headline numbers and, when it failed or was skipped, why.

Links are relative UI routes (``#/experiments/<id>/runs/<run id>``), so they open in the MLflow UI
the description is shown in, whatever its host.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from mergesec.orchestrator.node import Node
from mergesec.orchestrator.run_facts import RunFacts

# (role, run name, run id or None when the input has no run in this experiment)
InputRun = tuple[str, str, str | None]
LINK = re.compile(r"\(#/experiments/(\w+)/runs/(\w+)\)")
HEADLINE_TEXT = (
    ("victim/accuracy_clean", "victim clean"),
    ("victim/accuracy_release", "released"),
    ("victim/accuracy_merged", "merged"),
    ("others/accuracy_mean", "others merged"),
    ("merge/coefficient", "coefficient"),
)
MAX_METRICS = 8


def run_link(experiment_id: str, run_id: str) -> str:
    return f"#/experiments/{experiment_id}/runs/{run_id}"


def linked_runs(note: str) -> list[tuple[str, str]]:
    """``(experiment id, run id)`` of every run link in a description."""
    return LINK.findall(note)


def _md(text: str) -> str:
    """Text safe inside a Markdown link label or table cell."""
    return re.sub(r"([\[\]|*_`])", r"\\\1", text)


def _num(x: Any) -> str:
    return f"{x:.3f}" if isinstance(x, float) else str(x)


def _link(experiment_id: str, name: str, run_id: str | None) -> str:
    return (
        f"[{_md(name)}]({run_link(experiment_id, run_id)})" if run_id else f"{_md(name)} (no run)"
    )


def headline_line(headline: Mapping[str, float]) -> str:
    parts = [f"{label} **{_num(headline[k])}**" for k, label in HEADLINE_TEXT if k in headline]
    return " · ".join(parts)


def node_note(
    facts: RunFacts,
    node: Node,
    experiment_id: str,
    inputs: Sequence[InputRun],
    *,
    metrics: Mapping[str, Any] | None = None,
    headline: Mapping[str, float] | None = None,
    error: str | None = None,
    failed_inputs: Sequence[InputRun] = (),
) -> str:
    """A node run's description: first what a reader looks for (headline numbers, the error,
    the inputs' links), then what the run is (role, step, node, scenario factors) and its main
    metrics. The UI shows the first lines until "Show more" is clicked."""
    lines: list[str] = []
    if headline:
        lines += ["Headline: " + headline_line(headline), ""]
    if error is not None:
        quoted = error.replace("`", "'")[:500]
        lines += [f"**Failed:** `{quoted}`", ""]
    if failed_inputs:
        lines += ["**Skipped**, because an input failed:"]
        lines += [
            f"- {role}: {_link(experiment_id, name, rid)}" for role, name, rid in failed_inputs
        ]
        lines += [""]
    if inputs:
        lines += ["Inputs:"]
        lines += [f"- {role}: {_link(experiment_id, name, rid)}" for role, name, rid in inputs]
        lines += [""]
    lines += [f"{facts.role} · `{node.step}/{node.op}` · node `{node.id}`"]
    shown = {k: v for k, v in facts.factors.items() if v not in ("-", "none", "")}
    if shown:
        lines += ["", " · ".join(f"{k}: `{v}`" for k, v in shown.items())]
    nums = [
        (k, v)
        for k, v in (metrics or {}).items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and "/" in k
    ]
    if nums:
        picked = [
            kv for kv in nums if kv[0].startswith(("accuracy/", "chosen/", "monitor/", "val/"))
        ]
        picked = (picked or nums)[:MAX_METRICS]
        lines += ["", "Metrics: " + " · ".join(f"`{k}` {_num(float(v))}" for k, v in picked)]
    return "\n".join(lines) + "\n"


def parent_note(
    study: str,
    invocation: int,
    source: str,
    experiment_id: str,
    rows: Sequence[Mapping[str, Any]],
) -> str:
    """The study run's description: which invocation it is and the results so far, each row
    linking to its merged-evaluation run."""
    lines = [
        f"**Study `{_md(study)}`**, invocation {invocation} (`{_md(source)}`)",
        "",
        f"{len(rows)} result row(s) so far; the table is also logged as `results_table.json`.",
    ]
    if rows:
        cols = (
            "scenario",
            "victim",
            "merge",
            "coefficient",
            "clean",
            "release",
            "merged",
            "others",
        )
        lines += ["", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        for r in rows:
            name = _md(str(r["scenario"])) + (f" ({_md(r['variant'])})" if r.get("variant") else "")
            cell = f"[{name}]({run_link(experiment_id, r['run_id'])})" if r.get("run_id") else name
            vals = [
                r.get(k) for k in ("coefficient", "victim_clean", "victim_release", "victim_merged")
            ] + [r.get("others_merged")]
            lines.append(
                "| "
                + " | ".join([cell, _md(str(r["victim"])), _md(str(r["merge"]))])
                + " | "
                + " | ".join("-" if x is None else _num(float(x)) for x in vals)
                + " |"
            )
    return "\n".join(lines) + "\n"
