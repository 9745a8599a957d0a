"""Pipeline steps. Every module here registers its ops on import; ``load_all`` imports them all.

Ops from outside the package are added by naming their modules in ``MERGESEC_PLUGINS``
(comma-separated import paths); the engine passes that variable on to every Ray worker.
"""

from __future__ import annotations

import importlib
import os
import pkgutil

_loaded = False


def load_all() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for info in pkgutil.iter_modules(__path__):
        if info.name != "registry" and not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")
    for name in filter(
        None, (m.strip() for m in os.environ.get("MERGESEC_PLUGINS", "").split(","))
    ):
        importlib.import_module(name)
