"""The content-addressed store: ``<root>/nodes/<node_id>/`` holds a node's outputs.

A node is committed when its manifest (``_SUCCESS``: every file's size and SHA-256, see
``manifest``) exists; readers trust nothing else and check the files against it before use.

- Local store: outputs are written into an attempt directory beside the target
  (``nodes/.tmp-<id>-*``), flushed to disk, the manifest written last, and the directory renamed
  into place. The rename is the conditional commit: it fails when another writer committed first,
  and that writer's node stands.
- Any filesystem ``pyarrow.fs`` opens (``s3://``, ``gs://``, ``hdfs://``): outputs are uploaded
  under ``nodes/<id>/attempts/<attempt>/``, then the manifest, naming that attempt, is created as
  ``nodes/<id>/_SUCCESS`` (create-if-absent on S3, see ``objects``). A committed attempt is never
  deleted or overwritten; a node found corrupt is invalidated (its manifest removed) and the next
  run commits a new attempt.

Downloads into the local cache go to a temporary directory beside their destination and are
renamed into place, so they are atomic on any filesystem layout and two processes downloading one
node both end up with a complete copy. ``gc`` removes abandoned attempts and temporary files.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mergesec.core.paths import cache_root
from mergesec.core.uris import redact_uri
from mergesec.orchestrator import manifest as mf
from mergesec.orchestrator.manifest import CorruptNode, Manifest
from mergesec.orchestrator.objects import put_if_absent

SUCCESS = "_SUCCESS"
FAILED = "_FAILED"
FAILED_RECORD = "_FAILED.node.json"
ATTEMPTS = "attempts"
TMP_PREFIX, TRASH_PREFIX, DL_PREFIX = ".tmp-", ".trash-", ".dl-"
_ID_RE = re.compile(r"^[0-9a-f]{8,64}$")
_SAFE_NAME = re.compile(r"[^A-Za-z0-9_.+-]")


def safe_name(name: str) -> str:
    """A study or scenario name as a single safe path component."""
    cleaned = _SAFE_NAME.sub("_", name).lstrip(".") or "_"
    return cleaned[:100]


def _check_id(node_id: str) -> str:
    if not _ID_RE.match(node_id):
        raise ValueError(f"not a node id: {node_id!r}")
    return node_id


def relative_to(base: str, path: str) -> str:
    """``path`` relative to ``base`` ("" when outside it); filesystems differ on a leading /."""
    b, p = base.strip("/"), path.lstrip("/")
    if b and not p.startswith(b + "/"):
        return ""
    return p[len(b) + 1 :] if b else p


def writer_id() -> str:
    """Who writes: host and process, recorded in manifests and leases."""
    return f"{os.uname().nodename}:{os.getpid()}"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _remove_tree(path: Path) -> None:
    """Move ``path`` aside under a trash name, then delete it (``gc`` finishes what fails)."""
    trash = path.with_name(f"{TRASH_PREFIX}{path.name}-{uuid.uuid4().hex[:8]}")
    try:
        os.rename(path, trash)
    except FileNotFoundError:
        return
    shutil.rmtree(trash, ignore_errors=True)


class Store:
    def __init__(self, uri: str):
        self.uri = uri
        if "://" in uri and not uri.startswith("file://"):
            import pyarrow.fs

            self.fs, self.root = pyarrow.fs.FileSystem.from_uri(uri)
            self.local: Path | None = None
        else:
            self.fs = None
            self.root = str(Path(uri.removeprefix("file://")).expanduser().resolve())
            self.local = Path(self.root)
            self.uri = self.root  # workers run in other directories: hand them an absolute path

    # ---- paths
    def _node(self, node_id: str) -> str:
        return f"{self.root}/nodes/{_check_id(node_id)}"

    def _file(self, node_id: str, rel: str, m: Manifest) -> str:
        return (
            f"{self._node(node_id)}/{m.prefix}/{rel}"
            if m.prefix
            else f"{self._node(node_id)}/{rel}"
        )

    def _exists(self, path: str) -> bool:
        if self.local is not None:
            return os.path.exists(path)
        import pyarrow.fs

        return self.fs.get_file_info(path).type != pyarrow.fs.FileType.NotFound

    def _read(self, path: str) -> bytes | None:
        """The bytes at ``path``, or None when nothing is there."""
        if self.local is not None:
            try:
                return Path(path).read_bytes()
            except (FileNotFoundError, NotADirectoryError):
                return None
        try:
            with self.fs.open_input_stream(path) as f:
                return f.read()
        except FileNotFoundError:
            return None

    def cache_dir(self) -> Path:
        """Where this (remote) store's nodes are downloaded to; the URI's credentials redacted."""
        return cache_root() / "store" / safe_name(redact_uri(self.uri))

    # ---- state
    def is_done(self, node_id: str) -> bool:
        """Whether the node has a commit (its manifest); ``check`` says whether its files match."""
        return self._exists(f"{self._node(node_id)}/{SUCCESS}")

    def is_failed(self, node_id: str) -> bool:
        return not self.is_done(node_id) and self._exists(f"{self._node(node_id)}/{FAILED}")

    def manifest(self, node_id: str) -> Manifest | None:
        """The node's manifest, None when it has no commit; ``CorruptNode`` when unreadable."""
        data = self._read(f"{self._node(node_id)}/{SUCCESS}")
        return None if data is None else mf.parse(node_id, data)

    def states(self) -> dict[str, str]:
        """``{node_id: "done" | "failed"}`` for every node the store holds, from one listing.

        Nodes absent from the result are pending. On an object store this is one (paginated)
        recursive listing instead of one or two requests per node.
        """
        out: dict[str, str] = {}
        if self.local is not None:
            nodes = self.local / "nodes"
            if not nodes.is_dir():
                return out
            with os.scandir(nodes) as it:
                for e in it:
                    if e.name.startswith(".") or not _ID_RE.match(e.name):
                        continue
                    if os.path.exists(f"{e.path}/{SUCCESS}"):
                        out[e.name] = "done"
                    elif os.path.exists(f"{e.path}/{FAILED}"):
                        out[e.name] = "failed"
            return out
        import pyarrow.fs

        base = f"{self.root}/nodes"
        sel = pyarrow.fs.FileSelector(base, allow_not_found=True, recursive=True)
        for info in self.fs.get_file_info(sel):
            rel = relative_to(base, info.path).split("/")
            if len(rel) != 2:
                continue  # only markers directly inside a node directory count
            node_id, name = rel
            if name == SUCCESS:
                out[node_id] = "done"
            elif name == FAILED and out.get(node_id) != "done":
                out[node_id] = "failed"
        return {i: s for i, s in out.items() if _ID_RE.match(i)}

    def failure(self, node_id: str) -> str:
        data = self._read(f"{self._node(node_id)}/{FAILED}")
        return "" if data is None else data.decode(errors="replace")

    # ---- reading a committed node (checked against its manifest)
    def read_node_bytes(self, node_id: str, rel: str) -> bytes:
        """One file of a committed node, checked against the manifest (``CorruptNode`` else)."""
        m = self.manifest(node_id)
        if m is None:
            raise FileNotFoundError(f"node {node_id} has no commit")
        data = self._read(self._file(node_id, rel, m))
        if data is None:
            raise CorruptNode(node_id, [f"{rel} is missing"])
        problems = mf.check_bytes(rel, data, m)
        if problems:
            raise CorruptNode(node_id, problems)
        return data

    def read_node_text(self, node_id: str, rel: str) -> str:
        return self.read_node_bytes(node_id, rel).decode()

    def _read_json(self, node_id: str, rel: str) -> dict[str, Any]:
        data = self.read_node_bytes(node_id, rel)
        try:
            doc = json.loads(data)
        except ValueError as e:  # a legacy node has no hashes to catch this earlier
            raise CorruptNode(node_id, [f"{rel} is not JSON ({e})"]) from None
        if not isinstance(doc, dict):
            raise CorruptNode(node_id, [f"{rel} is not a JSON object"])
        return doc

    def read_metrics(self, node_id: str) -> dict[str, Any]:
        return self._read_json(node_id, "metrics.json")

    def read_node(self, node_id: str) -> dict[str, Any]:
        return self._read_json(node_id, "node.json")

    def metrics_if_done(self, node_id: str) -> dict[str, Any] | None:
        """The node's metrics when it is committed and they match the manifest, else None."""
        try:
            return self.read_metrics(node_id)
        except (FileNotFoundError, CorruptNode):
            return None

    def read_text(self, rel: str) -> str:
        """A file outside the nodes (reports, studies) at ``rel`` under the root."""
        if self.local is not None:
            return (self.local / rel).read_text()
        with self.fs.open_input_stream(f"{self.root}/{rel}") as f:
            return f.read().decode()

    # ---- checking, invalidating
    def check(self, node_id: str, *, deep: bool = False) -> list[str]:
        """Problems of a committed node against its manifest (empty when it matches).

        Sizes are always checked and small files hashed; ``deep`` hashes every file (a remote
        store reads them all). A node written before manifests has only its JSON files checked.
        """
        try:
            m = self.manifest(node_id)
        except CorruptNode as e:
            return e.problems
        if m is None:
            return ["no commit"]
        if m.legacy:
            problems = []
            for rel in ("metrics.json", "node.json"):
                try:
                    self._read_json(node_id, rel)
                except CorruptNode as e:
                    problems += e.problems
            return problems
        if self.local is not None:
            return mf.check_local(self.local / "nodes" / node_id, m, deep=deep)
        return self._check_remote(node_id, m, deep=deep)

    def _check_remote(self, node_id: str, m: Manifest, *, deep: bool) -> list[str]:
        import pyarrow.fs

        base = self._file(node_id, "", m).rstrip("/")
        sel = pyarrow.fs.FileSelector(base, allow_not_found=True, recursive=True)
        sizes = {
            relative_to(base, i.path): i.size
            for i in self.fs.get_file_info(sel)
            if i.type == pyarrow.fs.FileType.File
        }
        problems = []
        for rel, meta in m.files.items():
            if rel not in sizes:
                problems.append(f"{rel} is missing")
            elif sizes[rel] != meta["size"]:
                problems.append(f"{rel} has {sizes[rel]} bytes, the manifest says {meta['size']}")
            elif deep or int(meta["size"]) <= mf.SMALL:
                h = hashlib.sha256()
                with self.fs.open_input_stream(f"{base}/{rel}") as src:
                    while chunk := src.read(1 << 20):
                        h.update(chunk)
                if h.hexdigest() != meta["sha256"]:
                    problems.append(f"{rel} does not match its sha256")
        return problems

    def invalidate(self, node_id: str) -> None:
        """Drop the node's commit so that the next run computes it again."""
        if self.local is not None:
            _remove_tree(self.local / "nodes" / _check_id(node_id))
            return
        with contextlib.suppress(FileNotFoundError):
            self.fs.delete_file(f"{self._node(node_id)}/{SUCCESS}")
        _remove_tree(self.cache_dir() / node_id)

    # ---- local copies
    def local_dir(self, node_id: str) -> Path:
        """A local directory with the node's outputs, checked against its manifest.

        A remote node is downloaded once into the cache (again when its commit changed). Raises
        ``CorruptNode`` when the files do not match, ``FileNotFoundError`` without a commit.
        """
        _check_id(node_id)
        m = self.manifest(node_id)
        if m is None:
            raise FileNotFoundError(f"node {node_id} has no commit")
        if self.local is not None:
            node_dir = self.local / "nodes" / node_id
            problems = [] if m.legacy else mf.check_local(node_dir, m, deep=True)
            if problems:
                raise CorruptNode(node_id, problems)
            return node_dir
        target = self.cache_dir() / node_id
        if self._cached(target, m):
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        # beside the target, so the rename never crosses filesystems
        tmp = Path(tempfile.mkdtemp(prefix=f"{DL_PREFIX}{node_id}-", dir=target.parent))
        try:
            self._download(node_id, m, tmp)
            (tmp / SUCCESS).write_bytes(m.to_bytes() if not m.legacy else b"")
            self._install(tmp, target, m)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return target

    @staticmethod
    def _cached(target: Path, m: Manifest) -> bool:
        try:
            have = mf.parse(target.name, (target / SUCCESS).read_bytes())
        except (OSError, CorruptNode):
            return False
        if have.attempt != m.attempt or have.legacy != m.legacy:
            return False
        return m.legacy or not mf.check_local(target, m, deep=False)

    def _download(self, node_id: str, m: Manifest, dest: Path) -> None:
        if m.legacy:
            import pyarrow.fs

            pyarrow.fs.copy_files(self._node(node_id), str(dest), source_filesystem=self.fs)
            for p in dest.rglob("*"):
                if p.name == SUCCESS or p.name == FAILED:
                    p.unlink()
            return
        problems = []
        for rel, meta in m.files.items():
            out = dest / rel
            out.parent.mkdir(parents=True, exist_ok=True)
            h = hashlib.sha256()
            size = 0
            try:
                with (
                    self.fs.open_input_stream(self._file(node_id, rel, m)) as src,
                    out.open("wb") as f,
                ):
                    while chunk := src.read(1 << 20):
                        h.update(chunk)
                        size += len(chunk)
                        f.write(chunk)
            except FileNotFoundError:
                problems.append(f"{rel} is missing")
                continue
            if size != meta["size"]:
                problems.append(f"{rel} has {size} bytes, the manifest says {meta['size']}")
            elif h.hexdigest() != meta["sha256"]:
                problems.append(f"{rel} does not match its sha256")
        if problems:
            raise CorruptNode(node_id, problems)

    @staticmethod
    def _install(tmp: Path, target: Path, m: Manifest) -> None:
        """Rename the complete download ``tmp`` into place; keep a valid copy already there."""
        for _ in range(5):
            try:
                os.rename(tmp, target)
                return
            except OSError as e:
                if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
            if Store._cached(target, m):
                return  # another process installed the same commit first
            _remove_tree(target)  # a stale copy of an older commit; open files stay readable
        raise OSError(f"could not install the download of {target.name}")

    def fetch_files(
        self, node_id: str, dest: str | Path, *, names: tuple[str, ...] = (), suffixes=()
    ) -> list[Path]:
        """Local paths of the node's top-level files named ``names`` (in that order), then those
        ending in one of ``suffixes`` (sorted). A remote store downloads only these into ``dest``.
        """
        m = self.manifest(node_id)
        if m is None:
            raise FileNotFoundError(f"node {node_id} has no commit")
        base = self._file(node_id, "", m).rstrip("/")
        if m.legacy:
            if self.local is not None:
                entries = [p.name for p in Path(base).iterdir() if p.is_file()]
            else:
                import pyarrow.fs

                infos = self.fs.get_file_info(pyarrow.fs.FileSelector(base))
                entries = [i.base_name for i in infos if i.type == pyarrow.fs.FileType.File]
            entries = [e for e in entries if e not in (SUCCESS, FAILED, FAILED_RECORD)]
        else:
            entries = [rel for rel in m.files if "/" not in rel]
        picked = [n for n in names if n in entries]
        picked += sorted(n for n in entries if n.endswith(tuple(suffixes)) and n not in names)
        if self.local is not None:
            return [Path(base) / n for n in picked]
        out = []
        for n in picked:
            target = Path(dest) / n
            if m.legacy:
                with self.fs.open_input_stream(f"{base}/{n}") as src, target.open("wb") as f:
                    while chunk := src.read(1 << 20):
                        f.write(chunk)
            else:
                target.write_bytes(self.read_node_bytes(node_id, n))
            out.append(target)
        return out

    # ---- writing
    @contextlib.contextmanager
    def writing(self, node_id: str, record: dict[str, Any], owner: str = "") -> Iterator[Path]:
        """Yield an empty local directory; on normal exit commit it as the node's outputs.

        The caller writes ``metrics.json`` (and everything else) into it; ``node.json`` and the
        manifest are added here. When another writer committed the node first, its commit stands
        and this one is discarded. ``owner`` (the driver) is recorded in the manifest.
        """
        _check_id(node_id)
        parent = self.local / "nodes" if self.local is not None else None
        if parent is not None:
            parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{node_id}-", dir=parent))
        try:
            yield tmp
            (tmp / "node.json").write_text(
                json.dumps(record, indent=2, sort_keys=True, default=str)
            )
            if not (tmp / "metrics.json").exists():
                (tmp / "metrics.json").write_text("{}")
            self._publish(node_id, tmp, owner or writer_id())
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _publish(self, node_id: str, tmp: Path, owner: str) -> bool:
        """Commit ``tmp`` as the node; False when another commit was there first."""
        attempt = uuid.uuid4().hex
        if self.local is not None:
            m = mf.build(tmp, attempt=attempt, prefix="", owner=owner)
            with open(tmp / SUCCESS, "wb") as f:
                f.write(m.to_bytes())
                os.fsync(f.fileno())
            _fsync_dir(tmp)
            committed = self._rename_commit(node_id, tmp)
            _fsync_dir(tmp.parent)
            return committed
        import pyarrow.fs

        node = self._node(node_id)
        try:
            current = self.manifest(node_id)
        except CorruptNode:
            current = None  # an unreadable commit is replaced below
            replace = True
        else:
            replace = False
        if current is not None:
            return False  # committed already; never touched again
        prefix = f"{ATTEMPTS}/{attempt}"
        m = mf.build(tmp, attempt=attempt, prefix=prefix, owner=owner)
        self.fs.create_dir(f"{node}/{prefix}")
        pyarrow.fs.copy_files(str(tmp), f"{node}/{prefix}", destination_filesystem=self.fs)
        if replace:
            with self.fs.open_output_stream(f"{node}/{SUCCESS}") as f:
                f.write(m.to_bytes())
            return True
        if put_if_absent(self.fs, self.uri, f"{node}/{SUCCESS}", m.to_bytes()):
            return True
        with contextlib.suppress(OSError):  # another attempt won: ours is never read
            self.fs.delete_dir(f"{node}/{prefix}")
        return False

    def _rename_commit(self, node_id: str, tmp: Path) -> bool:
        final = self.local / "nodes" / node_id
        for _ in range(5):
            try:
                os.rename(tmp, final)
                return True
            except OSError as e:
                if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
            if (final / SUCCESS).exists():
                return False  # another writer committed first; its node stands
            # an uncommitted leftover (a failure marker): move it aside and try again
            trash = final.with_name(f"{TRASH_PREFIX}{node_id}-{uuid.uuid4().hex[:8]}")
            try:
                os.rename(final, trash)
            except FileNotFoundError:
                continue
            if (trash / SUCCESS).exists():  # committed in between: put it back, keep it
                with contextlib.suppress(OSError):
                    os.rename(trash, final)
                    return False
            shutil.rmtree(trash, ignore_errors=True)
        raise OSError(f"could not commit node {node_id}")

    def mark_failed(self, node_id: str, record: dict[str, Any], traceback_text: str) -> None:
        """Record a failure beside (never inside) a commit: ``_FAILED`` and its node record."""
        if self.is_done(node_id):
            return
        doc = json.dumps(record, indent=2, sort_keys=True, default=str)
        self.write_text(f"nodes/{_check_id(node_id)}/{FAILED_RECORD}", doc)
        self.write_text(f"nodes/{node_id}/{FAILED}", traceback_text)

    def write_text(self, rel: str, text: str) -> None:
        self.write_bytes(rel, text.encode())

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Write ``data`` at ``rel`` under the root, atomically on a local store."""
        if self.local is not None:
            p = self.local / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            tmp = p.with_name(f"{TMP_PREFIX}{p.name}.{uuid.uuid4().hex[:8]}")
            tmp.write_bytes(data)
            os.replace(tmp, p)
            return
        path = f"{self.root}/{rel}"
        self.fs.create_dir(path.rsplit("/", 1)[0])
        with self.fs.open_output_stream(path) as f:
            f.write(data)

    def create_if_absent(self, rel: str, data: bytes) -> bool:
        """Write ``data`` at ``rel`` unless something is there; True if this call created it."""
        if self.local is not None:
            p = self.local / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            tmp = p.with_name(f"{TMP_PREFIX}{p.name}.{uuid.uuid4().hex[:8]}")
            tmp.write_bytes(data)
            try:
                os.link(tmp, p)  # atomic, and fails when ``p`` exists
                return True
            except FileExistsError:
                return False
            finally:
                tmp.unlink()
        path = f"{self.root}/{rel}"
        self.fs.create_dir(path.rsplit("/", 1)[0])
        return put_if_absent(self.fs, self.uri, path, data)

    def read_bytes(self, rel: str) -> bytes | None:
        """The bytes at ``rel`` under the root, None when nothing is there."""
        return self._read(self.location(rel))

    def delete(self, rel: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            if self.local is not None:
                (self.local / rel).unlink()
            else:
                self.fs.delete_file(f"{self.root}/{rel}")

    def study_rel(self, study: str, name: str) -> str:
        return f"studies/{safe_name(study)}/{name}"

    def location(self, rel: str) -> str:
        return f"{self.root}/{rel}" if self.local is None else str(self.local / rel)
