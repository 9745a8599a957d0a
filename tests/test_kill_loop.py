"""A loop of kills: SIGINT, SIGTERM and SIGKILL of the driver at random moments, each followed by
a resume. The results equal an uninterrupted run's, no committed node is computed again, every
node has one FINISHED run, and each run exits with the status its signal calls for."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from e2e import child_runs, cli, write_study

from mergesec.orchestrator.plan import build_plan
from mergesec.orchestrator.spec import load_study

pytestmark = pytest.mark.slow
EXPECTED = {signal.SIGINT: 130, signal.SIGTERM: 143, signal.SIGKILL: -signal.SIGKILL}


def attempts(store: Path) -> dict[str, str]:
    """node id -> the attempt its commit names."""
    out = {}
    for p in (store / "nodes").glob("*/_SUCCESS"):
        if not p.parent.name.startswith("."):  # an attempt directory before its rename
            out[p.parent.name] = json.loads(p.read_text())["attempt"]
    return out


def test_kill_loop_then_resume(tmp_path, tiny_bert):
    rng = random.Random(14)
    study = write_study(tmp_path, tiny_bert)
    n = len(build_plan(load_study(study)).nodes)
    store, uri = tmp_path / "store", f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = ["run", str(study), "--store", str(store), "--tracking-uri", uri]
    figures = []
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGKILL):
        before = attempts(store)
        proc = subprocess.Popen(
            [sys.executable, "-m", "mergesec.cli", *args],
            cwd=tmp_path,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        # a random moment once this run has committed something new
        deadline = time.time() + 600
        while time.time() < deadline and proc.poll() is None:
            if len(attempts(store)) > len(before):
                break
            time.sleep(0.1)
        time.sleep(rng.uniform(0.0, 2.0))
        if proc.poll() is not None or len(attempts(store)) >= n:
            # the study's work ended before this kill (a signal during the driver's own exit
            # interrupts nothing); the final run checks the result
            proc.communicate(timeout=300)
            break
        if sig == signal.SIGKILL:
            os.killpg(proc.pid, sig)  # the driver and the Ray processes it started
        else:
            os.kill(proc.pid, sig)
        try:
            _, stderr = proc.communicate(timeout=300)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        assert proc.returncode == EXPECTED[sig], stderr[-3000:]
        if _group_alive(proc.pid):  # Ray processes still shutting down
            os.killpg(proc.pid, signal.SIGKILL)
        after = attempts(store)
        assert all(after[i] == a for i, a in before.items()), "a committed node was recomputed"
        figures.append((signal.Signals(sig).name, len(after) - len(before)))
    r = cli(args, tmp_path, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    final = attempts(store)
    assert len(final) == n
    print(f"kill loop on {n} nodes: {figures}")

    reference = tmp_path / "reference"
    ref_uri = f"sqlite:///{tmp_path / 'reference.db'}"
    r = cli(
        ["run", str(study), "--store", str(reference), "--tracking-uri", ref_uri],
        tmp_path,
        timeout=900,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    results = (store / "studies" / "smoke" / "results.json").read_text()
    assert json.loads(results) == json.loads(
        (reference / "studies" / "smoke" / "results.json").read_text()
    )
    runs = child_runs(uri, "smoke")
    ids = [x.data.tags["mergesec.node_id"] for x in runs]
    assert sorted(ids) == sorted(set(ids)) == sorted(final), "one run per node"
    assert all(x.info.status == "FINISHED" for x in runs)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True
