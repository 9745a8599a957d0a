"""Where mergesec keeps its caches (bases, datasets, store downloads, assets)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """``$MERGESEC_CACHE``, else ``~/.cache/mergesec``."""
    return Path(os.environ.get("MERGESEC_CACHE", Path.home() / ".cache" / "mergesec"))
