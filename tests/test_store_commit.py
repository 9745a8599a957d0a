"""The store's commit protocol: manifests, checks before use, invalidation, races and leftovers."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pyarrow.fs
import pytest
import torch
from safetensors.torch import load_file, save_file

from mergesec.orchestrator.leases import LeaseKeeper, read_lease, try_acquire
from mergesec.orchestrator.maintenance import collect_garbage, verify_nodes
from mergesec.orchestrator.manifest import CorruptNode
from mergesec.orchestrator.store import SUCCESS, Store

NID = "0123456789abcdef"


def remote_store(root: Path) -> Store:
    """The generic pyarrow.fs path of the store, on a SubTreeFileSystem over a local directory."""
    root.mkdir(parents=True, exist_ok=True)
    store = Store(str(root))
    store.fs = pyarrow.fs.SubTreeFileSystem(str(root), pyarrow.fs.LocalFileSystem())
    store.root, store.local = "", None
    store.uri = f"subtree-{root.name}"
    return store


def make_store(tmp_path: Path, kind: str) -> Store:
    return remote_store(tmp_path / "s") if kind == "remote" else Store(str(tmp_path / "s"))


def commit(store: Store, node_id: str = NID, value: float = 1.0) -> None:
    with store.writing(node_id, {"id": node_id}) as out:
        save_file({"w": torch.full((64, 64), value)}, str(out / "model.safetensors"))
        (out / "metrics.json").write_text(json.dumps({"acc": value}))
        (out / "adapter").mkdir()
        (out / "adapter" / "config.json").write_text("{}")


def stored_file(tmp_path: Path, store: Store, rel: str, node_id: str = NID) -> Path:
    """The file ``rel`` of a committed node as it lies on disk (under its attempt if remote)."""
    node = tmp_path / "s" / "nodes" / node_id
    m = store.manifest(node_id)
    return node / m.prefix / rel if m.prefix else node / rel


def corrupt(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "truncate":
        path.write_bytes(bytes(data[: len(data) // 2]))
    else:  # one bit flipped, same size
        data[len(data) - 3] ^= 0x01
        path.write_bytes(bytes(data))


@pytest.mark.parametrize("kind", ["local", "remote"])
def test_manifest_is_the_commit(tmp_path, kind):
    store = make_store(tmp_path, kind)
    commit(store)
    m = store.manifest(NID)
    assert m is not None and not m.legacy
    assert set(m.files) == {"model.safetensors", "metrics.json", "node.json", "adapter/config.json"}
    on_disk = stored_file(tmp_path, store, "model.safetensors")
    assert m.files["model.safetensors"]["size"] == on_disk.stat().st_size
    assert (m.prefix == "") == (kind == "local")
    assert m.prefix == "" or m.prefix == f"attempts/{m.attempt}"
    assert store.check(NID, deep=True) == []
    assert load_file(str(store.local_dir(NID) / "model.safetensors"))["w"][0, 0] == 1.0
    assert store.read_metrics(NID) == {"acc": 1.0}
    names = [p.name for p in store.fetch_files(NID, tmp_path, names=("metrics.json",))]
    assert names == ["metrics.json"]


@pytest.mark.parametrize("kind", ["local", "remote"])
@pytest.mark.parametrize("how", ["truncate", "bitflip"])
@pytest.mark.parametrize("rel", ["model.safetensors", "metrics.json"])
def test_corruption_is_detected_before_use(tmp_path, kind, how, rel):
    store = make_store(tmp_path, kind)
    commit(store)
    corrupt(stored_file(tmp_path, store, rel), how)
    problems = store.check(NID, deep=True)
    assert len(problems) == 1 and rel in problems[0]
    with pytest.raises(CorruptNode):
        store.local_dir(NID)
    if rel == "metrics.json":
        with pytest.raises(CorruptNode):
            store.read_metrics(NID)
        assert store.metrics_if_done(NID) is None
    v = verify_nodes(store, [NID])
    assert list(v.corrupt) == [NID] and not store.is_done(NID)
    commit(store, value=2.0)  # the next run computes it again
    assert store.check(NID, deep=True) == [] and store.read_metrics(NID) == {"acc": 2.0}


@pytest.mark.parametrize("kind", ["local", "remote"])
def test_a_second_commit_never_replaces_the_first(tmp_path, kind):
    store = make_store(tmp_path, kind)
    commit(store, value=1.0)
    first = store.manifest(NID)
    commit(store, value=2.0)  # a duplicate execution: discarded, no error
    assert store.manifest(NID) == first and store.read_metrics(NID) == {"acc": 1.0}
    assert store.check(NID, deep=True) == []
    store.mark_failed(NID, {"id": NID, "error": True}, "late failure")
    assert not store.is_failed(NID) and store.read_node(NID) == {"id": NID}


@pytest.mark.parametrize("kind", ["local", "remote"])
def test_concurrent_commits_one_wins(tmp_path, kind):
    store = make_store(tmp_path, kind)
    store.mark_failed(NID, {"id": NID}, "an earlier failure")
    barrier = threading.Barrier(4)
    errors: list[BaseException] = []

    def write(value: float) -> None:
        try:
            with store.writing(NID, {"id": NID}) as out:
                (out / "metrics.json").write_text(json.dumps({"acc": value}))
                (out / "big.bin").write_bytes(os.urandom(1 << 18))
                barrier.wait()
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=write, args=(float(i),)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert store.is_done(NID) and store.check(NID, deep=True) == []
    assert store.read_metrics(NID)["acc"] in {0.0, 1.0, 2.0, 3.0}
    if kind == "local":
        assert not [p for p in (tmp_path / "s" / "nodes").iterdir() if p.name.startswith(".")]


def test_legacy_success_still_reads_and_a_broken_metrics_json_is_not_fatal(tmp_path):
    store = Store(str(tmp_path / "s"))
    node = tmp_path / "s" / "nodes" / NID
    node.mkdir(parents=True)
    (node / "metrics.json").write_text('{"acc": 0.5}')
    (node / "node.json").write_text("{}")
    (node / "w.bin").write_bytes(b"abc")
    (node / SUCCESS).write_text("")
    assert store.manifest(NID).legacy and store.check(NID) == []
    assert store.read_metrics(NID) == {"acc": 0.5} and (store.local_dir(NID) / "w.bin").exists()
    (node / "metrics.json").write_text('{"acc": 0.')
    assert store.metrics_if_done(NID) is None
    assert store.check(NID) and verify_nodes(store, [NID]).legacy == 1 and not store.is_done(NID)


def test_gc_removes_abandoned_attempts_only(tmp_path):
    local = Store(str(tmp_path / "l"))
    commit(local)
    old = time.time() - 10 * 3600
    stale = tmp_path / "l" / "nodes" / f".tmp-{'f' * 16}-abc"
    stale.mkdir()
    (stale / "x.bin").write_bytes(b"x" * 100)
    os.utime(stale, (old, old))
    fresh = tmp_path / "l" / "nodes" / f".tmp-{'e' * 16}-abc"
    fresh.mkdir()
    leased = tmp_path / "l" / "nodes" / f".tmp-{'d' * 16}-abc"
    leased.mkdir()
    os.utime(leased, (old, old))
    keeper = LeaseKeeper(local, ttl=30)
    assert keeper.acquire("d" * 16) is None
    got = collect_garbage(local)
    keeper.close()
    assert got.removed == [str(stale)] and got.bytes == 100
    assert fresh.exists() and leased.exists() and local.check(NID, deep=True) == []

    remote = remote_store(tmp_path / "r")
    commit(remote)
    committed = remote.manifest(NID).attempt
    lost = tmp_path / "r" / "nodes" / NID / "attempts" / "deadbeef"
    lost.mkdir(parents=True)
    (lost / "model.safetensors").write_bytes(b"y" * 50)
    os.utime(lost / "model.safetensors", (old, old))
    got = collect_garbage(remote)
    assert len(got.removed) == 1 and got.bytes == 50 and not lost.exists()
    assert (tmp_path / "r" / "nodes" / NID / "attempts" / committed).is_dir()
    assert remote.check(NID, deep=True) == []


@pytest.mark.parametrize("kind", ["local", "remote"])
def test_leases_exclude_a_second_owner_until_expiry(tmp_path, kind):
    store = make_store(tmp_path, kind)
    assert try_acquire(store, NID, "hostA:1:x", ttl=0.5) is None
    held = try_acquire(store, NID, "hostB:2:y", ttl=0.5)
    assert held is not None and held.owner == "hostA:1:x"
    time.sleep(0.6)
    assert try_acquire(store, NID, "hostB:2:y", ttl=30) is None  # taken over after expiry
    assert read_lease(store, NID).owner == "hostB:2:y"
    # an owner on this host whose process is gone does not hold its lease
    dead = f"{os.uname().nodename}:{2**22 + 12345}:z"
    other = "e" * 16
    assert try_acquire(store, other, dead, ttl=300) is None
    assert try_acquire(store, other, "hostC:3:w", ttl=30) is None


def test_gc_removes_leases_of_dead_owners(tmp_path):
    store = Store(str(tmp_path / "s"))
    dead = f"{os.uname().nodename}:{2**22 + 12345}:z"
    assert try_acquire(store, NID, dead, ttl=300) is None
    keeper = LeaseKeeper(store, ttl=30)
    assert keeper.acquire("e" * 16) is None
    got = collect_garbage(store)
    assert got.removed == [str(tmp_path / "s" / "leases" / NID)]
    assert read_lease(store, "e" * 16).owner == keeper.owner
    keeper.close()
    assert read_lease(store, "e" * 16) is None
