"""Input Gram matrices XᵀX of a model's Linear layers, the statistic RegMean merges with."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import Tensor, nn


def collect_linear_grams(
    model: nn.Module,
    inputs_batches: Iterable[Mapping[str, Tensor] | Tensor],
    *,
    normalize: bool = True,
) -> dict[str, Tensor]:
    """Input Gram matrices XᵀX of every ``nn.Linear`` in ``model``, keyed by module name.

    Each batch is passed as ``model(**batch)`` (a mapping) or ``model(batch)``. When a mapping
    carries an ``attention_mask``, token rows under mask 0 (padding) are left out of inputs
    shaped ``[batch, seq, features]``. With ``normalize`` the sum is divided by the number of
    rows, so experts with more data do not outweigh the others. Returned on the CPU in float32.
    """
    sums: dict[str, Tensor] = {}
    rows: dict[str, int] = {}
    current_mask: list[Tensor | None] = [None]

    def make_hook(name: str):
        def hook(_module: nn.Module, args: tuple) -> None:
            x = args[0].detach()
            mask = current_mask[0]
            if mask is not None and x.dim() == mask.dim() + 1 and x.shape[:-1] == mask.shape:
                x = x[mask.to(device=x.device).bool()]
            x = x.reshape(-1, x.shape[-1]).double()
            g = x.T @ x
            sums[name] = sums[name] + g if name in sums else g
            rows[name] = rows.get(name, 0) + x.shape[0]

        return hook

    handles = [
        m.register_forward_pre_hook(make_hook(name))
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear)
    ]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in inputs_batches:
                if isinstance(batch, Mapping):
                    current_mask[0] = batch.get("attention_mask")
                    model(**batch)
                else:
                    current_mask[0] = None
                    model(batch)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return {
        name: (g / max(rows[name], 1) if normalize else g).float().cpu() for name, g in sums.items()
    }


def grams_by_weight_key(grams: Mapping[str, Tensor], prefix: str = "") -> dict[str, Tensor]:
    """Re-key module-name Gram matrices to the state-dict keys of their weights."""
    return {f"{prefix}{name}.weight": g for name, g in grams.items()}
