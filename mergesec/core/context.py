"""What a step's executor gets: the node, its upstream outputs, where to write, how to report."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ReportFn = Callable[[dict[str, float], int], None]


def _no_report(metrics: dict[str, float], step: int) -> None:
    return None


@dataclass
class NodeContext:
    node_id: str
    step: str
    op: str
    params: dict[str, Any]
    inputs: dict[str, Path]
    out_dir: Path
    device: str = "cpu"
    allow_remote_code: bool = False
    report: ReportFn = _no_report
    artifacts: list[str] = field(default_factory=list)

    @property
    def base(self) -> str:
        return self.params["base"]

    def inputs_with_prefix(self, prefix: str) -> dict[str, Path]:
        """``{suffix: path}`` for roles ``<prefix>.<suffix>``, in role order."""
        return {
            r[len(prefix) + 1 :]: p
            for r, p in sorted(self.inputs.items())
            if r.startswith(prefix + ".")
        }


def pick_device(gpus: float = 0.0) -> str:
    """CUDA when this process was given a GPU and one is visible, else CPU."""
    import torch  # deferred: the core layer stays importable without torch

    return "cuda" if gpus > 0 and torch.cuda.is_available() else "cpu"
