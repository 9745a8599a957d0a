"""What code computed a node: mergesec's version and commit, and the key libraries' versions.

``code_versions()`` is recorded in every node record (``node.json``) beside the node's identity, so
a result can be traced to the code that produced it. It is computed once per process.
"""

from __future__ import annotations

import functools
import importlib.metadata
import subprocess
from pathlib import Path
from typing import Any

import mergesec

# The libraries whose behaviour decides what a node computes or how it is tracked.
KEY_LIBRARIES = ("torch", "transformers", "peft", "ray", "mlflow", "safetensors", "numpy")


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git(root: Path, *args: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_state(root: Path) -> dict[str, Any] | None:
    """``{"commit": sha, "dirty": bool}`` when ``root`` is a git checkout, else None."""
    if not (root / ".git").exists():
        return None
    commit = _git(root, "rev-parse", "HEAD")
    if not commit:
        return None
    status = _git(root, "status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": bool(status)}


@functools.cache
def code_versions() -> dict[str, Any]:
    """``{"mergesec": {"version", "commit", "dirty"}, "libraries": {name: version}}``."""

    root = Path(mergesec.__file__).resolve().parent.parent
    state = git_state(root) or {}
    return {
        "mergesec": {
            "version": mergesec.__version__,
            "commit": state.get("commit"),
            "dirty": state.get("dirty"),
        },
        "libraries": {name: _version(name) for name in KEY_LIBRARIES},
    }
