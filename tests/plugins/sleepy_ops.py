"""Test-only ops that sleep (or hang) and record when they ran (loaded through MERGESEC_PLUGINS)."""

from __future__ import annotations

import time
from pathlib import Path

from mergesec.core.registry import register_op


def _execute(ctx) -> dict[str, float]:
    log = Path(ctx.params["log"])
    tag = ctx.params["tag"]
    (log / f"{tag}.start").write_text(str(time.time()))
    hang, seconds = ctx.params.get("hang", False), float(ctx.params.get("seconds", 0.0))
    deadline = time.time() + (1e9 if hang else seconds)
    while time.time() < deadline:
        time.sleep(0.05)
    (log / f"{tag}.end").write_text(str(time.time()))
    return {"slept": seconds}


def sleepy(*, tag: str = "", log: str = "", seconds: float = 0.0, hang: bool = False) -> None:
    """Sleep ``seconds`` (forever when ``hang``), writing ``<log>/<tag>.start`` and ``.end``."""


register_op("finetune", "sleepy", fn=sleepy, executor=_execute)
register_op("evaluate", "sleepy", fn=sleepy, executor=_execute)
