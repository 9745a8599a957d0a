"""The store on an S3 API server process (moto on 127.0.0.1) through ``--store s3://...``."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from e2e import cli, write_study
from s3_server import CREDENTIALS, s3_server
from test_store_downloads import other_filesystem_than_tmp

from mergesec.orchestrator.objects import put_if_absent
from mergesec.orchestrator.plan import build_plan
from mergesec.orchestrator.spec import load_study
from mergesec.orchestrator.store import Store


@pytest.fixture(scope="module")
def s3():
    with s3_server() as server:
        yield server


@pytest.fixture
def s3_env(monkeypatch):
    for k, v in CREDENTIALS.items():
        monkeypatch.setenv(k, v)


def test_create_if_absent_is_conditional_on_s3(s3, s3_env):
    s3.client().create_bucket(Bucket="conditional")
    store = Store(s3.uri("conditional", "s"))
    assert put_if_absent(store.fs, store.uri, "conditional/s/x", b"first")
    assert not put_if_absent(store.fs, store.uri, "conditional/s/x", b"second")
    body = s3.client().get_object(Bucket="conditional", Key="s/x")["Body"].read()
    assert body == b"first"


def commits(s3, bucket: str) -> dict[str, str]:
    """node id -> the attempt its manifest names."""
    c = s3.client()
    out = {}
    for page in c.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix="store/nodes/"):
        for obj in page.get("Contents", []):
            parts = obj["Key"].split("/")
            if len(parts) == 4 and parts[3] == "_SUCCESS":
                doc = json.loads(c.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read())
                out[parts[2]] = doc["attempt"]
    return out


@pytest.mark.slow
def test_study_runs_resumes_and_verifies_on_s3(tmp_path, tiny_bert, s3):
    """Cache and temporary directory on different filesystems (the Dockerfile's layout) where the
    machine has a second one (``/dev/shm`` nearly everywhere); the study runs either way."""
    other = other_filesystem_than_tmp() or Path(tempfile.gettempdir())
    bucket = "study"
    s3.client().create_bucket(Bucket=bucket)
    uri = s3.uri(bucket, "store")
    cache = Path(tempfile.mkdtemp(prefix="mergesec-cache-", dir=other))
    env = {**CREDENTIALS, "MERGESEC_CACHE": str(cache / "c")}
    study = write_study(tmp_path, tiny_bert)
    n = len(build_plan(load_study(study)).nodes)
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run = ["run", str(study), "--store", uri, "--tracking-uri", tracking]
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mergesec.cli", *run],
            cwd=tmp_path,
            env={**os.environ, **env},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.time() + 600
        while time.time() < deadline and len(commits(s3, bucket)) < 2 and proc.poll() is None:
            time.sleep(0.3)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        before = commits(s3, bucket)
        assert 2 <= len(before) < n, f"killed too late or too early: {len(before)} of {n}"

        r = cli(run, tmp_path, env, timeout=900)
        assert r.returncode == 0, r.stderr[-3000:]
        after = commits(s3, bucket)
        assert len(after) == n
        assert all(after[i] == a for i, a in before.items()), "a committed node was recomputed"
        assert "Traceback" not in r.stderr and "Errno 18" not in r.stderr

        r = cli(["verify", str(study), "--store", uri], tmp_path, env, timeout=300)
        assert r.returncode == 0 and f": {n} match, 0 corrupt" in r.stdout, r.stdout + r.stderr

        # an object cut short on the server is found, invalidated and computed again
        c = s3.client()
        victim = next(
            i
            for i in after
            if c.list_objects_v2(
                Bucket=bucket, Prefix=f"store/nodes/{i}/attempts/{after[i]}/model"
            )["KeyCount"]
        )
        key = c.list_objects_v2(
            Bucket=bucket, Prefix=f"store/nodes/{victim}/attempts/{after[victim]}/model"
        )["Contents"][0]["Key"]
        body = c.get_object(Bucket=bucket, Key=key)["Body"].read()
        c.put_object(Bucket=bucket, Key=key, Body=body[: len(body) // 2])
        r = cli(["verify", str(study), "--store", uri], tmp_path, env, timeout=300)
        assert r.returncode == 1 and victim in r.stderr, r.stdout + r.stderr
        r = cli(run, tmp_path, env, timeout=900)
        assert r.returncode == 0, r.stderr[-3000:]
        final = commits(s3, bucket)
        assert {i for i in final if final[i] != after[i]} == {victim}
        r = cli(["verify", str(study), "--store", uri], tmp_path, env, timeout=300)
        assert r.returncode == 0 and ", 0 corrupt" in r.stdout, r.stdout + r.stderr
        r = cli(["gc", "--store", uri, "--min-age", "0"], tmp_path, env, timeout=300)
        removed = [x for x in r.stdout.splitlines() if "/attempts/" in x]
        assert r.returncode == 0 and len(removed) == 1 and victim in removed[0], r.stdout
        assert commits(s3, bucket) == final
    finally:
        shutil.rmtree(cache, ignore_errors=True)
