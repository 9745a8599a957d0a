"""Loading every op: the project's op modules, then the modules named in ``MERGESEC_PLUGINS``.

``MERGESEC_PLUGINS`` holds comma-separated import paths; the engine passes it on to every Ray
worker, so plugin ops register there too.
"""

from __future__ import annotations

import importlib
import os

# Every module that registers ops, in the order they load (mergekit-style explicit list).
OP_MODULES: tuple[str, ...] = (
    "mergesec.tasks.finetune",
    "mergesec.tasks.protect",
    "mergesec.defenses.trap2",
    "mergesec.tasks.attack",
    "mergesec.merging.methods",
    "mergesec.tasks.merge",
    "mergesec.tasks.evaluate",
    "mergesec.tasks.scale_diagnostics",
    "mergesec.tasks.monitor",
)

_loaded = False


def plugin_modules() -> list[str]:
    """The import paths named in ``MERGESEC_PLUGINS``."""
    return [m.strip() for m in os.environ.get("MERGESEC_PLUGINS", "").split(",") if m.strip()]


def load_ops() -> None:
    """Import every op module once (registering its ops), then the plugins."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    for name in (*OP_MODULES, *plugin_modules()):
        importlib.import_module(name)
