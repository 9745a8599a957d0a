"""Calling a model with some of its parameters replaced (``torch.func.functional_call``)."""

from __future__ import annotations

import inspect
from collections.abc import Mapping

from torch import Tensor, nn
from torch.func import functional_call


def forward_with(model: nn.Module, overrides: Mapping[str, Tensor] | None, /, *args, **kwargs):
    """Call ``model(*args, **kwargs)``, with ``overrides`` replacing parameters when given.

    Parameters and buffers not named in ``overrides`` keep their live values.
    """
    if overrides is None:
        return model(*args, **kwargs)
    return functional_call(model, dict(overrides), args, kwargs, strict=False)


def takes_logits_to_keep(model: nn.Module) -> bool:
    """Whether a causal LM's forward takes ``logits_to_keep`` (transformers' decoder LMs do), so a
    caller that needs few positions' logits, or none, can skip the LM head elsewhere."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(inner.forward).parameters
