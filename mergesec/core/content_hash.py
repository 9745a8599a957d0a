"""Content hashes of local files and directories, memoised by size and modification time.

A local dataset enters node ids through its content hash, so editing it recomputes what depends
on it. Hashing a large directory on every ``plan`` or ``run`` would be slow, so each file's hash is
remembered (in this process and under the cache directory) with the size and ``mtime_ns`` it had;
a file whose size or mtime changed is hashed again.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from mergesec.core.paths import cache_root

_memo: dict[tuple[str, int, int], str] = {}


def _memo_file(path: str) -> Path:
    return cache_root() / "file-hashes" / hashlib.sha256(path.encode()).hexdigest()[:32]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_sha256(path: Path) -> str:
    """SHA-256 (hex) of the file at ``path``, hashed again only when its size or mtime changed."""
    real = str(Path(path).resolve())
    st = os.stat(real)
    key = (real, st.st_size, st.st_mtime_ns)
    if key in _memo:
        return _memo[key]
    memo = _memo_file(real)
    try:
        saved = json.loads(memo.read_text())
        if [saved["size"], saved["mtime_ns"]] == [st.st_size, st.st_mtime_ns]:
            _memo[key] = saved["sha256"]
            return saved["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    digest = _sha256(Path(real))
    _memo[key] = digest
    try:
        memo.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo.with_name(f".{memo.name}.{os.getpid()}")
        tmp.write_text(
            json.dumps({"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest})
        )
        os.replace(tmp, memo)
    except OSError:
        pass  # a read-only cache only costs the memo
    return digest


def tree_sha256(root: Path) -> str:
    """SHA-256 (hex) over every file under ``root``: relative paths and their contents' hashes.

    Hidden files and directories (names starting with ``.``) are left out: they hold caches and
    lock files, not data; so are the ``cache-*.arrow`` files ``datasets`` writes beside a saved
    dataset when it is mapped or filtered.
    """
    root = Path(root)
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith(".") or (name.startswith("cache-") and name.endswith(".arrow")):
                continue
            p = Path(dirpath) / name
            rel = p.relative_to(root).as_posix()
            h.update(f"{rel}\0{file_sha256(p)}\n".encode())
    return h.hexdigest()
