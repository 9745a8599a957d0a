"""Interrupted runs: SIGINT exits 130 and SIGTERM 143, reports stay as they were, and the next run
resumes and exits 0."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from e2e import cli, done_nodes, write_study

from mergesec.orchestrator.interrupts import Interrupts


def _deliver(sig: int) -> None:
    os.kill(os.getpid(), sig)
    for _ in range(100):  # Python runs the handler between bytecodes of the main thread
        time.sleep(0.01)


def test_a_signal_outside_tune_raises_at_once_and_is_recorded():
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    old_usr1 = signal.signal(signal.SIGUSR1, signal.SIG_DFL)
    try:
        with pytest.raises(KeyboardInterrupt), Interrupts() as it:
            assert os.environ["TUNE_DISABLE_SIGINT_HANDLER"] == "1"
            _deliver(signal.SIGTERM)
        assert it.signum == signal.SIGTERM and it.exit_code == 143 and it.name == "SIGTERM"
    finally:
        signal.signal(signal.SIGUSR1, old_usr1)
    assert {s: signal.getsignal(s) for s in before} == before
    assert "TUNE_DISABLE_SIGINT_HANDLER" not in os.environ


def test_a_signal_during_tune_asks_tune_to_stop_and_a_second_one_raises():
    stops: list[int] = []
    old_usr1 = signal.signal(signal.SIGUSR1, lambda s, f: stops.append(s))  # Tune's stop, in fit()
    try:
        with Interrupts() as it:
            _deliver(signal.SIGINT)
            assert stops == [signal.SIGUSR1] and it.signum == signal.SIGINT
            with pytest.raises(KeyboardInterrupt):
                _deliver(signal.SIGINT)
        assert it.exit_code == 130 and stops == [signal.SIGUSR1]
    finally:
        signal.signal(signal.SIGUSR1, old_usr1)


@pytest.mark.slow
@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupted_run_exit_code_then_resume(tmp_path, tiny_bert, sig, code):
    study = write_study(tmp_path, tiny_bert)
    store, uri = tmp_path / "store", f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = ["run", str(study), "--store", str(store), "--tracking-uri", uri]
    proc = subprocess.Popen(
        [sys.executable, "-m", "mergesec.cli", *args],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    deadline = time.time() + 300
    while time.time() < deadline and not done_nodes(store) and proc.poll() is None:
        time.sleep(0.2)
    assert proc.poll() is None, "the run ended before it could be interrupted"
    os.kill(proc.pid, sig)  # the driver only, as a scheduler or Ctrl-C in a wrapper would
    try:
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == code, stderr[-3000:]
    assert f"interrupted by {signal.Signals(sig).name}" in stderr
    assert "Traceback" not in stderr
    assert not list(store.glob("studies/*/results.*")), "an interrupted run wrote reports"
    # the study run says it was stopped, and no node run was left RUNNING
    from mlflow.tracking import MlflowClient

    c = MlflowClient(uri)
    runs = c.search_runs([c.get_experiment_by_name("mergesec/smoke").experiment_id])
    parents = [x for x in runs if "mergesec.node_id" not in x.data.tags]
    assert [x.info.status for x in parents] == ["KILLED"]
    assert not [x.info.run_name for x in runs if x.info.status == "RUNNING"]

    r = cli(args, tmp_path, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert list(store.glob("studies/*/results.md"))
