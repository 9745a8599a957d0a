"""Helpers for end-to-end tests: a study on a tiny BERT, subprocess runs, MLflow queries."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def write_study(tmp: Path, base: Path, **changes) -> Path:
    doc = yaml.safe_load((REPO / "conf" / "smoke.yaml").read_text())
    doc["base"] = str(base)
    doc.update(changes)
    f = tmp / "study.yaml"
    f.write_text(yaml.safe_dump(doc))
    return f


def cli(
    args: list[str], cwd: Path, env: dict[str, str] | None = None, **kw
) -> subprocess.CompletedProcess:
    e = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "mergesec.cli", *args],
        cwd=cwd,
        env=e,
        capture_output=True,
        text=True,
        **kw,
    )


def child_runs(tracking_uri: str, study: str) -> list:
    from mlflow.tracking import MlflowClient

    c = MlflowClient(tracking_uri)
    exp = c.get_experiment_by_name(f"mergesec/{study}")
    assert exp is not None, "no MLflow experiment for the study"
    runs = c.search_runs([exp.experiment_id], max_results=1000)
    return [r for r in runs if "mergesec.node_id" in r.data.tags]


def done_nodes(store: Path) -> dict[str, float]:
    """node id -> mtime of its _SUCCESS."""
    nodes = store / "nodes"
    if not nodes.exists():
        return {}
    # names starting with "." are attempt directories not committed yet
    return {
        p.parent.name: p.stat().st_mtime
        for p in nodes.glob("*/_SUCCESS")
        if not p.parent.name.startswith(".")
    }
