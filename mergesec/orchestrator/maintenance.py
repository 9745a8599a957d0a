"""Keeping a store sound: checking nodes against their manifests, and removing leftovers.

- ``check_inputs`` runs before a study: the committed nodes the pending ones will read are checked
  (sizes, and hashes memoised per host on a local store); corrupt ones are invalidated and run
  again in the same study.
- ``verify_nodes`` (``mergesec verify``) checks every committed node of a plan, reading every file,
  and invalidates the corrupt ones.
- ``collect_garbage`` (``mergesec gc``) removes abandoned attempts and temporary files: attempt and
  download directories no commit names and no live lease protects, older than ``min_age_s``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from mergesec.core.uris import redact_uri
from mergesec.orchestrator.leases import LEASES, lease_alive
from mergesec.orchestrator.manifest import CorruptNode
from mergesec.orchestrator.plan import Plan
from mergesec.orchestrator.store import (
    ATTEMPTS,
    DL_PREFIX,
    TMP_PREFIX,
    TRASH_PREFIX,
    Store,
    relative_to,
)

TUNE_TMP_PREFIX = "mergesec-tune-"


@dataclass
class Verified:
    checked: int = 0
    legacy: int = 0  # committed before manifests: only their JSON files could be checked
    corrupt: dict[str, list[str]] = field(default_factory=dict)  # node id -> problems
    bytes_checked: int = 0


def verify_nodes(
    store: Store, node_ids: Iterable[str], *, deep: bool = True, invalidate: bool = True
) -> Verified:
    """Check every committed node in ``node_ids``; invalidate the corrupt ones."""
    out = Verified()
    for node_id in node_ids:
        if not store.is_done(node_id):
            continue
        out.checked += 1
        try:
            m = store.manifest(node_id)
        except CorruptNode:
            m = None
        if m is not None and m.legacy:
            out.legacy += 1
        elif m is not None:
            out.bytes_checked += m.total_bytes if deep else 0
        problems = store.check(node_id, deep=deep)
        if problems:
            out.corrupt[node_id] = problems
            if invalidate:
                store.invalidate(node_id)
    return out


def check_inputs(plan: Plan, store: Store, states: dict[str, str]) -> dict[str, list[str]]:
    """Check the committed inputs of the plan's pending nodes; invalidate the corrupt ones and
    mark them pending in ``states`` (their own inputs are then checked too). Returns the corrupt
    nodes' problems."""
    corrupt: dict[str, list[str]] = {}
    seen: set[str] = set()
    todo = [i for i, s in states.items() if s != "done"]
    while todo:
        frontier = {
            up
            for i in todo
            for up in plan.nodes[i].inputs.values()
            if states.get(up) == "done" and up not in seen
        }
        seen |= frontier
        todo = []
        for up in sorted(frontier):
            problems = store.check(up, deep=store.local is not None)
            if problems:
                store.invalidate(up)
                corrupt[up] = problems
                states[up] = "pending"
                todo.append(up)
    return corrupt


@dataclass
class Collected:
    removed: list[str] = field(default_factory=list)
    bytes: int = 0


def _age(path: Path, now: float) -> float:
    try:
        return now - path.lstat().st_mtime
    except OSError:
        return 0.0


def _tree_bytes(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, f)).st_size
    return total


def tune_tmp_prefix() -> str:
    """The prefix of this process's Tune directory: ``gc`` leaves it while the process lives."""
    return f"{TUNE_TMP_PREFIX}{os.getpid()}-"


def _process_alive(name: str) -> bool:
    pid = name.split("-", 1)[0]
    if not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def _node_of(name: str, prefix: str) -> str:
    return name[len(prefix) :].split("-", 1)[0]


def _remove_local(path: Path, out: Collected) -> None:
    size = _tree_bytes(path) if path.is_dir() else path.lstat().st_size
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    if not path.exists():
        out.removed.append(str(path))
        out.bytes += size


def collect_garbage(store: Store, *, min_age_s: float = 6 * 3600) -> Collected:
    """Remove abandoned attempts and temporary files of ``store`` and of the local cache."""
    now = time.time()
    out = Collected()
    if store.local is not None:
        nodes = store.local / "nodes"
        for p in sorted(nodes.iterdir()) if nodes.is_dir() else []:
            if p.name.startswith(TRASH_PREFIX) or (
                p.name.startswith(TMP_PREFIX)
                and _age(p, now) >= min_age_s
                and not lease_alive(store, _node_of(p.name, TMP_PREFIX))
            ):
                _remove_local(p, out)
        studies = store.local / "studies"
        for p in sorted(studies.glob(f"*/{TMP_PREFIX}*")) if studies.is_dir() else []:
            if _age(p, now) >= min_age_s:
                _remove_local(p, out)
    else:
        _collect_attempts(store, now, min_age_s, out)
    _collect_leases(store, out)
    cache = store.cache_dir()
    for p in sorted(cache.iterdir()) if cache.is_dir() else []:
        if p.name.startswith(TRASH_PREFIX) or (
            p.name.startswith(DL_PREFIX) and _age(p, now) >= min_age_s
        ):
            _remove_local(p, out)
    for p in sorted(Path(tempfile.gettempdir()).glob(f"{TUNE_TMP_PREFIX}*")):
        if _age(p, now) >= min_age_s and not _process_alive(p.name[len(TUNE_TMP_PREFIX) :]):
            _remove_local(p, out)
    return out


def _collect_leases(store: Store, out: Collected) -> None:
    """Leases whose owner is gone (a killed driver): the next driver would take them over."""
    if store.local is not None:
        d = store.local / LEASES
        names = [p.name for p in d.iterdir() if p.is_file()] if d.is_dir() else []
    else:
        import pyarrow.fs

        sel = pyarrow.fs.FileSelector(f"{store.root}/{LEASES}", allow_not_found=True)
        names = [i.base_name for i in store.fs.get_file_info(sel)]
    for name in sorted(names):
        if name.startswith(".") or lease_alive(store, name):
            continue
        store.delete(f"{LEASES}/{name}")
        out.removed.append(redact_uri(store.location(f"{LEASES}/{name}")))


def _collect_attempts(store: Store, now: float, min_age_s: float, out: Collected) -> None:
    """Attempt prefixes on an object store that no commit names (a lost race, a killed upload,
    an invalidated node), once older than ``min_age_s`` and with no live lease on their node."""
    import pyarrow.fs

    base = f"{store.root}/nodes"
    sel = pyarrow.fs.FileSelector(base, allow_not_found=True, recursive=True)
    attempts: dict[tuple[str, str], list] = {}
    for info in store.fs.get_file_info(sel):
        rel = relative_to(base, info.path).split("/")
        if len(rel) >= 4 and rel[1] == ATTEMPTS and info.type == pyarrow.fs.FileType.File:
            attempts.setdefault((rel[0], rel[2]), []).append(info)
    committed: dict[str, str] = {}
    for node_id, attempt in sorted(attempts):
        if node_id not in committed:
            try:
                m = store.manifest(node_id)
            except CorruptNode:
                m = None
            committed[node_id] = m.attempt if m is not None else ""
        infos = attempts[(node_id, attempt)]
        newest = max((i.mtime.timestamp() for i in infos if i.mtime is not None), default=now)
        if attempt == committed[node_id] or now - newest < min_age_s:
            continue
        if lease_alive(store, node_id):
            continue
        path = f"{base}/{node_id}/{ATTEMPTS}/{attempt}"
        with contextlib.suppress(FileNotFoundError):
            store.fs.delete_dir(path)
        out.removed.append(redact_uri(path))
        out.bytes += sum(i.size or 0 for i in infos)
