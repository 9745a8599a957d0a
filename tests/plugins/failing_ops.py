"""A test-only protect op that fails while a marker file exists (loaded through MERGESEC_PLUGINS)."""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch

from mergesec.core.registry import register_op


@register_op("protect", "explode")
def explode(
    expert: Mapping[str, torch.Tensor], base, layout, *, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Return the expert unchanged, or raise while $MERGESEC_TEST_EXPLODE names an existing file."""
    marker = os.environ.get("MERGESEC_TEST_EXPLODE", "")
    if marker and os.path.exists(marker):
        raise RuntimeError("planned failure for the test")
    return dict(expert)
