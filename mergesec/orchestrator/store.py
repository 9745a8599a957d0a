"""The content-addressed store: ``<root>/nodes/<node_id>/`` holds a node's outputs.

A node directory is complete when it holds ``_SUCCESS``, which is written last. Locally, outputs are
written into a temporary directory beside the target and renamed into place, so a reader never
sees half a node. Any filesystem ``pyarrow.fs`` opens (``s3://``, ``gs://``, ``hdfs://``, a shared
mount) also works: outputs are written locally, uploaded, then ``_SUCCESS`` is uploaded last.
"""

from __future__ import annotations

import contextlib
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

SUCCESS = "_SUCCESS"
FAILED = "_FAILED"
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

    def _exists(self, path: str) -> bool:
        if self.local is not None:
            return os.path.exists(path)
        import pyarrow.fs

        return self.fs.get_file_info(path).type != pyarrow.fs.FileType.NotFound

    # ---- state
    def is_done(self, node_id: str) -> bool:
        return self._exists(f"{self._node(node_id)}/{SUCCESS}")

    def is_failed(self, node_id: str) -> bool:
        return not self.is_done(node_id) and self._exists(f"{self._node(node_id)}/{FAILED}")

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

        sel = pyarrow.fs.FileSelector(f"{self.root}/nodes", allow_not_found=True, recursive=True)
        prefix = f"{self.root}/nodes/"
        for info in self.fs.get_file_info(sel):
            rel = info.path[len(prefix) :].split("/") if info.path.startswith(prefix) else []
            if len(rel) != 2:
                continue  # only markers directly inside a node directory count
            node_id, name = rel
            if name == SUCCESS:
                out[node_id] = "done"
            elif name == FAILED and out.get(node_id) != "done":
                out[node_id] = "failed"
        return {i: s for i, s in out.items() if _ID_RE.match(i)}

    def failure(self, node_id: str) -> str:
        return self.read_text(f"nodes/{_check_id(node_id)}/{FAILED}")

    def read_metrics(self, node_id: str) -> dict[str, Any]:
        return json.loads(self.read_text(f"nodes/{_check_id(node_id)}/metrics.json"))

    def read_node(self, node_id: str) -> dict[str, Any]:
        return json.loads(self.read_text(f"nodes/{_check_id(node_id)}/node.json"))

    # ---- reading
    def read_text(self, rel: str) -> str:
        if self.local is not None:
            return (self.local / rel).read_text()
        with self.fs.open_input_stream(f"{self.root}/{rel}") as f:
            return f.read().decode()

    def local_dir(self, node_id: str) -> Path:
        """A local directory with the node's outputs (downloaded once into a cache when remote)."""
        if self.local is not None:
            return self.local / "nodes" / _check_id(node_id)

        target = cache_root() / "store" / safe_name(redact_uri(self.uri)) / node_id
        if not (target / SUCCESS).exists():
            import pyarrow.fs

            tmp = Path(tempfile.mkdtemp(dir=target.parent if target.parent.exists() else None))
            pyarrow.fs.copy_files(self._node(node_id), str(tmp), source_filesystem=self.fs)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(target, ignore_errors=True)
            os.replace(tmp, target)
        return target

    def fetch_files(
        self, node_id: str, dest: str | Path, *, names: tuple[str, ...] = (), suffixes=()
    ) -> list[Path]:
        """Local paths of the node's top-level files named ``names`` (in that order), then those
        ending in one of ``suffixes`` (sorted). A remote store downloads only these into ``dest``.
        """
        node_dir = self._node(node_id)
        if self.local is not None:
            entries = [p.name for p in Path(node_dir).iterdir() if p.is_file()]
        else:
            import pyarrow.fs

            infos = self.fs.get_file_info(pyarrow.fs.FileSelector(node_dir))
            entries = [i.base_name for i in infos if i.type == pyarrow.fs.FileType.File]
        picked = [n for n in names if n in entries]
        picked += sorted(n for n in entries if n.endswith(tuple(suffixes)) and n not in names)
        if self.local is not None:
            return [Path(node_dir) / n for n in picked]
        out = []
        for n in picked:
            target = Path(dest) / n
            with self.fs.open_input_stream(f"{node_dir}/{n}") as src, target.open("wb") as f:
                while chunk := src.read(1 << 20):
                    f.write(chunk)
            out.append(target)
        return out

    # ---- writing
    @contextlib.contextmanager
    def writing(self, node_id: str, record: dict[str, Any]) -> Iterator[Path]:
        """Yield an empty local directory; on normal exit publish it as the node's outputs.

        The caller writes ``metrics.json`` (and everything else) into it; ``node.json`` and
        ``_SUCCESS`` are added here.
        """
        _check_id(node_id)
        parent = self.local / "nodes" if self.local is not None else None
        if parent is not None:
            parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{node_id}-", dir=parent))
        try:
            yield tmp
            (tmp / "node.json").write_text(
                json.dumps(record, indent=2, sort_keys=True, default=str)
            )
            if not (tmp / "metrics.json").exists():
                (tmp / "metrics.json").write_text("{}")
            self._publish(node_id, tmp)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _publish(self, node_id: str, tmp: Path) -> None:
        if self.local is not None:
            (tmp / SUCCESS).write_text("")
            final = self.local / "nodes" / node_id
            if final.exists():
                if (final / SUCCESS).exists():
                    return  # another worker finished the same node first; identical by construction
                trash = final.with_name(f".trash-{node_id}-{uuid.uuid4().hex[:8]}")
                os.replace(final, trash)
                shutil.rmtree(trash, ignore_errors=True)
            os.replace(tmp, final)
            return
        import pyarrow.fs

        dest = self._node(node_id)
        self.fs.delete_dir_contents(dest, missing_dir_ok=True)
        self.fs.create_dir(dest)
        pyarrow.fs.copy_files(str(tmp), dest, destination_filesystem=self.fs)
        with self.fs.open_output_stream(f"{dest}/{SUCCESS}") as f:
            f.write(b"")

    def mark_failed(self, node_id: str, record: dict[str, Any], traceback_text: str) -> None:
        if self.is_done(node_id):
            return
        self.write_text(f"nodes/{_check_id(node_id)}/{FAILED}", traceback_text)
        self.write_text(
            f"nodes/{node_id}/node.json", json.dumps(record, indent=2, sort_keys=True, default=str)
        )

    def write_text(self, rel: str, text: str) -> None:
        if self.local is not None:
            p = self.local / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            tmp = p.with_name(f".{p.name}.{uuid.uuid4().hex[:8]}")
            tmp.write_text(text)
            os.replace(tmp, p)
            return
        path = f"{self.root}/{rel}"
        self.fs.create_dir(path.rsplit("/", 1)[0])
        with self.fs.open_output_stream(path) as f:
            f.write(text.encode())

    def write_bytes(self, rel: str, data: bytes) -> None:
        if self.local is not None:
            p = self.local / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(data)
            return
        path = f"{self.root}/{rel}"
        self.fs.create_dir(path.rsplit("/", 1)[0])
        with self.fs.open_output_stream(path) as f:
            f.write(data)

    def study_rel(self, study: str, name: str) -> str:
        return f"studies/{safe_name(study)}/{name}"

    def location(self, rel: str) -> str:
        return f"{self.root}/{rel}" if self.local is None else str(self.local / rel)
