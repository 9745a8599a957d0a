"""Leases: one driver computes a node at a time, whatever the number of drivers on a store.

A lease is the object ``leases/<node_id>`` in the store, created if absent (an atomic link on a
local store, a conditional PUT on S3) and naming its owner (host, process, invocation) and when it
expires. Its owner renews it while the node runs (``LeaseKeeper``) and deletes it when the node
ends. Another driver that finds a live lease waits for the node instead of starting it; when the
lease expires (its owner died), or its owner is a process of this host that no longer exists, the
lease is taken over.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass

from mergesec.orchestrator.store import Store

LEASES = "leases"
DEFAULT_TTL_S = 60.0


def lease_ttl() -> float:
    """Seconds a lease lives without renewal (``MERGESEC_LEASE_S``, default 60)."""
    return float(os.environ.get("MERGESEC_LEASE_S", DEFAULT_TTL_S))


def new_owner() -> str:
    """This invocation's owner id: host, process and a random part."""
    return f"{os.uname().nodename}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def owner_may_live(owner: str) -> bool:
    """False when ``owner`` (``host:pid:…``) is a process of this host that no longer exists: no
    need to wait for its lease or heartbeat to expire. True otherwise (another host: unknown)."""
    host, _, rest = owner.partition(":")
    pid = rest.partition(":")[0]
    if host == os.uname().nodename and pid.isdigit():
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass
    return True


@dataclass(frozen=True)
class Lease:
    owner: str
    expires_at: float

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self)).encode()

    def alive(self, now: float | None = None) -> bool:
        if (time.time() if now is None else now) >= self.expires_at:
            return False
        return owner_may_live(self.owner)


def _rel(node_id: str) -> str:
    return f"{LEASES}/{node_id}"


def read_lease(store: Store, node_id: str) -> Lease | None:
    data = store.read_bytes(_rel(node_id))
    if data is None:
        return None
    try:
        doc = json.loads(data)
        return Lease(str(doc["owner"]), float(doc["expires_at"]))
    except (ValueError, KeyError, TypeError):
        return Lease("", 0.0)  # unreadable (a torn write): treated as expired


def lease_alive(store: Store, node_id: str) -> bool:
    lease = read_lease(store, node_id)
    return lease is not None and lease.alive()


def try_acquire(store: Store, node_id: str, owner: str, ttl: float) -> Lease | None:
    """Take the node's lease for ``owner``: None when it is ours now, else the live lease of
    the driver that holds it."""
    mine = Lease(owner, time.time() + ttl)
    for _ in range(3):
        if store.create_if_absent(_rel(node_id), mine.to_bytes()):
            return None
        held = read_lease(store, node_id)
        if held is None:
            continue  # released in between
        if held.owner == owner:
            store.write_bytes(_rel(node_id), mine.to_bytes())
            return None
        if held.alive():
            return held
        store.delete(_rel(node_id))  # expired: take it over
    return read_lease(store, node_id) or mine


def renew(store: Store, node_id: str, owner: str, ttl: float) -> bool:
    """Extend ``owner``'s lease; False when it is no longer ours."""
    held = read_lease(store, node_id)
    if held is None or held.owner != owner:
        return False
    store.write_bytes(_rel(node_id), Lease(owner, time.time() + ttl).to_bytes())
    return True


def release(store: Store, node_id: str, owner: str) -> None:
    held = read_lease(store, node_id)
    if held is not None and held.owner == owner:
        store.delete(_rel(node_id))


class LeaseKeeper:
    """The leases one driver holds, renewed from a background thread every ``ttl / 4``; each beat
    also calls ``on_beat`` (the driver's MLflow heartbeat)."""

    def __init__(
        self,
        store: Store,
        owner: str | None = None,
        ttl: float | None = None,
        on_beat: Callable[[], None] | None = None,
    ):
        self.store = store
        self.on_beat = on_beat
        self.owner = owner or new_owner()
        self.ttl = lease_ttl() if ttl is None else ttl
        self.held: set[str] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="mergesec-leases", daemon=True)
        self._thread.start()

    def acquire(self, node_id: str) -> Lease | None:
        """None when the lease is ours (now held and renewed), else the other owner's lease."""
        other = try_acquire(self.store, node_id, self.owner, self.ttl)
        if other is None:
            with self._lock:
                self.held.add(node_id)
        return other

    def release(self, node_id: str) -> None:
        with self._lock:
            if node_id not in self.held:
                return
            self.held.discard(node_id)
        release(self.store, node_id, self.owner)

    def _loop(self) -> None:
        while not self._stop.wait(self.ttl / 4):
            with self._lock:
                ids = list(self.held)
            for node_id in ids:
                # a miss is retried at the next beat; the lease outlives a few
                with contextlib.suppress(OSError):
                    renew(self.store, node_id, self.owner, self.ttl)
            if self.on_beat is not None:
                self.on_beat()

    def close(self) -> None:
        """Stop renewing and release every lease still held."""
        self._stop.set()
        with self._lock:
            ids, self.held = list(self.held), set()
        for node_id in ids:
            with contextlib.suppress(OSError):  # else it expires by itself
                release(self.store, node_id, self.owner)
