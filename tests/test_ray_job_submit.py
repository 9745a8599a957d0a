"""`ray job submit` runs a study on a running Ray cluster: the entrypoint joins that cluster."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from conftest import free_port
from e2e import done_nodes, write_study

pytestmark = pytest.mark.slow


def _ray_cli() -> list[str]:
    exe = shutil.which("ray")
    return [exe] if exe else [sys.executable, "-m", "ray.scripts.scripts"]


@pytest.fixture
def ray_env() -> dict[str, str]:
    """Token authentication, as Ray enables it for a cluster with a dashboard: the head and every
    client share one token."""
    return {**os.environ, "RAY_ADDRESS": "", "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": secrets.token_hex(32)}  # fmt: skip


@pytest.fixture
def ray_head(ray_env):
    """A one-node Ray cluster with its dashboard (the job server) on 127.0.0.1, started with
    ``ray start --block`` in its own process group so that stopping it touches no other Ray.
    Yields the dashboard URL and Ray's temporary directory (session logs)."""
    pytest.importorskip("aiohttp_cors", reason="ray job submit needs ray[default]")
    gcs, dash = free_port(), free_port()
    # The head's agents get ports of their own: Ray's defaults (agent 52365, ...) are taken by any
    # other Ray instance on this machine (another test worker's), and a head whose job agent could
    # not bind refuses every submission with "No available agent to submit job".
    agent_ports = [f"--dashboard-agent-listen-port={free_port()}",
                   f"--dashboard-agent-grpc-port={free_port()}",
                   f"--metrics-export-port={free_port()}",
                   f"--runtime-env-agent-port={free_port()}"]  # fmt: skip
    temp = Path(tempfile.mkdtemp(prefix="rayjob", dir="/tmp"))  # socket paths must stay short
    proc = subprocess.Popen(
        [*_ray_cli(), "start", "--head", "--block", f"--port={gcs}", "--num-cpus=2",
         "--num-gpus=0", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
         f"--dashboard-port={dash}", f"--temp-dir={temp}", "--disable-usage-stats", *agent_ports],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        # its address file goes to its own directory: a plain ``ray.init()`` elsewhere on this
        # machine (another test) must not find and join this cluster
        env={**ray_env, "RAY_TMPDIR": str(temp)},
    )  # fmt: skip
    url = f"http://127.0.0.1:{dash}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/api/version", timeout=2) as r:
                if r.status == 200:
                    break
        except urllib.error.HTTPError as e:
            if e.code == 401:  # up, and asking for the token
                break
        except OSError:
            if proc.poll() is not None:
                pytest.fail(f"ray start exited with {proc.returncode}")
            time.sleep(1)
    else:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("the Ray dashboard did not come up on 127.0.0.1")
    try:
        yield url, temp
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        _kill_leftovers(str(temp))
        shutil.rmtree(temp, ignore_errors=True)


def _kill_leftovers(marker: str) -> None:
    """Ray services that left the process group (they carry the temp dir in their command)."""
    import psutil

    for p in psutil.process_iter(["cmdline"]):
        if any(marker in a for a in p.info["cmdline"] or ()):
            with contextlib.suppress(psutil.Error):
                p.kill()


def test_study_submitted_as_a_ray_job_runs_on_that_cluster(tmp_path, tiny_bert, ray_head, ray_env):
    url, temp = ray_head
    study = write_study(tmp_path, tiny_bert)
    store = tmp_path / "store"
    entry = [sys.executable, "-m", "mergesec.cli", "run", str(study), "--store", str(store),
             "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]  # fmt: skip
    cmd = [*_ray_cli(), "job", "submit", "--address", url, "--submission-id", "mergesec-smoke",
           "--runtime-env-json", json.dumps({"env_vars": {"HF_HUB_OFFLINE": "1"}}), "--", *entry]  # fmt: skip
    # The job server answers before the head's job agent has registered; until then a submission
    # is refused with "No available agent to submit job, please try again later" and not created.
    deadline = time.time() + 120
    while True:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=ray_env)
        out = res.stdout + res.stderr
        if res.returncode == 0 or "No available agent" not in out or time.time() > deadline:
            break
        time.sleep(2)
    assert res.returncode == 0, out[-4000:]
    assert "Job 'mergesec-smoke' succeeded" in out, out[-2000:]
    assert len(done_nodes(store)) == 6, "finetune x2, evaluate x3 and the merge of the smoke study"
    assert (store / "studies" / "smoke" / "results.md").is_file()
    # the entrypoint joined the cluster it was submitted to: its Tune trials ran as actors there
    trial_logs = [
        f for f in (temp / "session_latest" / "logs").glob("worker-*.out")
        if ":actor_name:" in f.read_text(errors="replace")
    ]  # fmt: skip
    assert trial_logs, "no trial actor ran on the submitted-to cluster"
