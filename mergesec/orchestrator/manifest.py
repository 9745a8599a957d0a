"""A node's manifest: the commit record of its outputs (every file's size and SHA-256).

The manifest is the content of the node's ``_SUCCESS`` object, written last: a node is committed
when its manifest exists, and a reader trusts a file only when its size (and, where cheap, its
hash) matches the manifest. ``prefix`` is where the files lie inside the node directory: ``""``
for a local store (the attempt directory is renamed into place) and ``attempts/<id>`` on an object
store (which has no atomic rename). An empty ``_SUCCESS`` is a node written before manifests
existed; it is read as before, without checks.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from mergesec.core.content_hash import file_sha256

FORMAT = "mergesec-manifest/1"
# Files up to this size are hashed on every read; larger ones once per host (memoised by size
# and modification time) on a local store, and while downloading from an object store.
SMALL = 1 << 20


class CorruptNode(ValueError):
    """A committed node whose files do not match its manifest (or whose manifest is unreadable)."""

    def __init__(self, node_id: str, problems: list[str]):
        self.node_id = node_id
        self.problems = problems
        super().__init__(f"node {node_id} is corrupt: {'; '.join(problems[:3])}")


@dataclass(frozen=True)
class Manifest:
    attempt: str
    prefix: str
    files: dict[str, dict[str, object]] = field(default_factory=dict)  # relpath -> size, sha256
    owner: str = ""
    committed_at: float = 0.0
    legacy: bool = False  # an empty ``_SUCCESS``: no file list to check against

    def to_bytes(self) -> bytes:
        doc = {
            "format": FORMAT,
            "attempt": self.attempt,
            "prefix": self.prefix,
            "files": self.files,
            "owner": self.owner,
            "committed_at": self.committed_at,
        }
        return json.dumps(doc, indent=1, sort_keys=True).encode()

    @property
    def total_bytes(self) -> int:
        return sum(int(f["size"]) for f in self.files.values())


def parse(node_id: str, data: bytes) -> Manifest:
    """The manifest in ``data`` (an empty ``_SUCCESS`` is a legacy one); ``CorruptNode`` else."""
    if not data.strip():
        return Manifest(attempt="", prefix="", legacy=True)
    try:
        doc = json.loads(data)
        if doc.get("format") != FORMAT:
            raise ValueError(f"unknown format {doc.get('format')!r}")
        files = {
            str(k): {"size": int(v["size"]), "sha256": str(v["sha256"])}
            for k, v in doc["files"].items()
        }
        return Manifest(
            attempt=str(doc["attempt"]),
            prefix=str(doc["prefix"]),
            files=files,
            owner=str(doc.get("owner", "")),
            committed_at=float(doc.get("committed_at", 0.0)),
        )
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CorruptNode(node_id, [f"unreadable manifest ({type(e).__name__}: {e})"]) from None


def _sha256_fsync(path: Path) -> tuple[int, str]:
    h = hashlib.sha256()
    size = 0
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
            size += len(chunk)
        os.fsync(f.fileno())
    return size, h.hexdigest()


def build(directory: Path, *, attempt: str, prefix: str, owner: str, skip=()) -> Manifest:
    """The manifest of every file under ``directory`` (recursively), each flushed to disk."""
    files: dict[str, dict[str, object]] = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        rel = path.relative_to(directory).as_posix()
        if rel in skip:
            continue
        size, digest = _sha256_fsync(path)
        files[rel] = {"size": size, "sha256": digest}
    return Manifest(
        attempt=attempt, prefix=prefix, files=files, owner=owner, committed_at=time.time()
    )


def check_local(directory: Path, manifest: Manifest, *, deep: bool) -> list[str]:
    """Problems of the files under ``directory`` against ``manifest`` (empty when they match).

    Sizes are always checked and small files hashed; ``deep`` hashes every file (memoised by
    size and modification time, so a file is read once per host until it changes).
    """
    problems = []
    for rel, meta in manifest.files.items():
        path = directory / rel
        try:
            size = path.stat().st_size
        except OSError:
            problems.append(f"{rel} is missing")
            continue
        if size != meta["size"]:
            problems.append(f"{rel} has {size} bytes, the manifest says {meta['size']}")
        elif (deep or size <= SMALL) and file_sha256(path) != meta["sha256"]:
            problems.append(f"{rel} does not match its sha256")
    return problems


def check_bytes(rel: str, data: bytes, manifest: Manifest) -> list[str]:
    """Problems of one file read whole (``data``) against ``manifest``."""
    if manifest.legacy:
        return []
    meta = manifest.files.get(rel)
    if meta is None:
        return [f"{rel} is not in the manifest"]
    if len(data) != meta["size"]:
        return [f"{rel} has {len(data)} bytes, the manifest says {meta['size']}"]
    if hashlib.sha256(data).hexdigest() != meta["sha256"]:
        return [f"{rel} does not match its sha256"]
    return []
