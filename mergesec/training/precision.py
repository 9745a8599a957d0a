"""Run-time precision of forward passes, and DataLoader workers for preprocessing.

Precision is chosen at run time: ``MERGESEC_PRECISION`` (``auto``, ``fp32``, ``bf16``, ``fp16``)
or, by default (``auto``), bfloat16 autocast on a CUDA device that supports it, float16 autocast
(with loss scaling) on an older CUDA device, and float32 on the CPU. Weights stay in float32.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


@dataclass(frozen=True)
class Precision:
    """How forward passes run: ``dtype`` None is float32; else autocast to ``dtype``."""

    device_type: str
    dtype: torch.dtype | None = None

    @property
    def name(self) -> str:
        return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.dtype]

    @property
    def needs_scaler(self) -> bool:
        return self.dtype is torch.float16

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)


def choose_precision(device: str, requested: str | None = None) -> Precision:
    """The precision for ``device``: ``requested`` or ``$MERGESEC_PRECISION`` or ``auto``."""
    req = (requested or os.environ.get("MERGESEC_PRECISION") or "auto").lower()
    if req not in PRECISIONS:
        raise ValueError(f"unknown precision {req!r}; known: {', '.join(PRECISIONS)}")
    device_type = torch.device(device).type
    if req == "fp32":
        return Precision(device_type)
    if req == "auto":
        if device_type != "cuda":
            return Precision(device_type)
        req = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return Precision(device_type, torch.bfloat16 if req == "bf16" else torch.float16)


def data_workers(device: str) -> int:
    """DataLoader workers for preprocessing: ``$MERGESEC_DATA_WORKERS``, else 4 on CUDA (bounded by
    the CPUs this process may use) and 0 on the CPU, where the model needs every core."""
    env = os.environ.get("MERGESEC_DATA_WORKERS")
    if env:
        return max(0, int(env))
    if torch.device(device).type != "cuda":
        return 0
    return min(4, max(0, len(os.sched_getaffinity(0)) - 1))
