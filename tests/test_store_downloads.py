"""Downloads from an object store into the local cache: atomic across filesystems, safe when two
processes fetch the same nodes at once, and fetched again when the node's commit changed."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_store_commit import commit, remote_store

REPO = Path(__file__).resolve().parents[1]
IDS = [f"{i:016x}" for i in range(1, 13)]


def other_filesystem_than_tmp() -> Path | None:
    """A writable directory on another filesystem than the system temporary directory."""
    tmp_dev = os.stat(tempfile.gettempdir()).st_dev
    for cand in ("/dev/shm", "/run/user", "/var/tmp"):
        p = Path(cand)
        if p.is_dir() and os.access(p, os.W_OK) and os.stat(p).st_dev != tmp_dev:
            return p
    return None


def refuse_renames_across(monkeypatch, root: Path) -> None:
    """Make ``os.rename``/``os.replace`` between ``root`` and anywhere outside it fail with EXDEV,
    as the kernel does between two filesystems (for machines that have only one)."""
    for name in ("rename", "replace"):
        real = getattr(os, name)

        def guarded(src, dst, *a, _real=real, **kw):
            inside = [Path(x).resolve().is_relative_to(root) for x in (src, dst)]
            if inside[0] != inside[1]:
                raise OSError(errno.EXDEV, os.strerror(errno.EXDEV), str(src), None, str(dst))
            return _real(src, dst, *a, **kw)

        monkeypatch.setattr(os, name, guarded)


@pytest.fixture
def split_cache(monkeypatch, tmp_path):
    """``MERGESEC_CACHE`` on another filesystem than the temporary directory (the Dockerfile's
    layout: the cache on a shared mount). Where this machine has a single filesystem, the cache
    gets a directory of its own and renames across its border fail with EXDEV in this process
    (subprocesses see one filesystem)."""
    other = other_filesystem_than_tmp()
    if other is not None:
        parent = Path(tempfile.mkdtemp(prefix="mergesec-cache-", dir=other))
    else:
        parent = Path(tempfile.mkdtemp(prefix="mergesec-cache-", dir=tmp_path)).resolve()
        refuse_renames_across(monkeypatch, parent)
    monkeypatch.setenv("MERGESEC_CACHE", str(parent / "fresh" / "cache"))  # parents do not exist
    yield parent / "fresh" / "cache"
    import shutil

    shutil.rmtree(parent, ignore_errors=True)


def test_first_download_across_filesystems(tmp_path, split_cache):
    store = remote_store(tmp_path / "s")
    commit(store, IDS[0], value=3.0)
    # the layout: a rename from the temporary directory into the cache crosses filesystems
    fd, probe = tempfile.mkstemp()
    os.close(fd)
    with pytest.raises(OSError) as crossed:
        os.rename(probe, split_cache.parents[1] / "probe")
    os.unlink(probe)
    assert crossed.value.errno == errno.EXDEV
    got = store.local_dir(IDS[0])
    assert got.is_relative_to(split_cache)
    assert load_file(str(got / "model.safetensors"))["w"][0, 0] == 3.0
    assert not [p for p in got.parent.iterdir() if p.name.startswith(".")]


def test_renames_across_the_cache_border_fail_like_across_filesystems(tmp_path, monkeypatch):
    """The stand-in for a second filesystem refuses exactly the renames the kernel would."""
    border = (tmp_path / "cache").resolve()
    border.mkdir()
    refuse_renames_across(monkeypatch, border)
    (tmp_path / "a").write_text("x")
    with pytest.raises(OSError) as e:
        os.rename(tmp_path / "a", border / "a")
    assert e.value.errno == errno.EXDEV
    (border / "b").write_text("y")
    os.replace(border / "b", border / "c")  # within the cache: allowed
    assert (border / "c").read_text() == "y"


def test_a_changed_commit_is_fetched_again(tmp_path):
    store = remote_store(tmp_path / "s")
    commit(store, IDS[0], value=1.0)
    assert json.loads((store.local_dir(IDS[0]) / "metrics.json").read_text()) == {"acc": 1.0}
    store.invalidate(IDS[0])
    commit(store, IDS[0], value=2.0)
    assert json.loads((store.local_dir(IDS[0]) / "metrics.json").read_text()) == {"acc": 2.0}


READER = """
import sys, time, torch
from pathlib import Path
sys.path.insert(0, {tests!r})
from test_store_commit import remote_store
from safetensors.torch import load_file
store = remote_store(Path({root!r}))
start = float(sys.argv[1])
while time.time() < start:
    time.sleep(0.001)
for i, node_id in enumerate({ids!r}):
    d = store.local_dir(node_id)
    w = load_file(str(d / "model.safetensors"))["w"]
    assert torch.equal(w, torch.full((64, 64), float(i))), node_id
print("ok", len({ids!r}))
"""


def test_two_processes_download_the_same_nodes(tmp_path, split_cache):
    store = remote_store(tmp_path / "s")
    for i, node_id in enumerate(IDS):
        commit(store, node_id, value=float(i))
    code = READER.format(tests=str(REPO / "tests"), root=str(tmp_path / "s"), ids=IDS)
    import time

    start = str(time.time() + 3.0)
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, start],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0 and out.startswith("ok"), err[-2000:]
    cache = store.cache_dir()
    assert sorted(p.name for p in cache.iterdir()) == sorted(IDS)  # no temporary leftovers
    for i, node_id in enumerate(IDS):
        assert torch.equal(
            load_file(str(cache / node_id / "model.safetensors"))["w"],
            torch.full((64, 64), float(i)),
        )
