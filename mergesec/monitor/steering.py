"""Steering: project weight directions out of the residual stream with forward hooks.

Each hooked block's output ``h`` (the residual stream after that layer) is replaced by
``h − Q Qᵀ h`` where ``Q`` is an orthonormal basis of the directions to remove at that token.
Directions of one layer (attention and MLP writers) are not orthogonal to each other, so they
are orthonormalised first; subtracting ``(h·u)u`` one direction after another would not remove
their span. This is directional ablation, as in WeightWatch's clipped inference.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from mergesec.monitor.directions import Directions
from mergesec.monitor.scoring import Calibration, token_cosines

Bounds = Mapping[int, tuple[torch.Tensor, torch.Tensor]]
SCOPES = ("from_trigger", "sequence")


def orthonormal_basis(vectors: torch.Tensor, tol: float = 1e-5) -> torch.Tensor:
    """Orthonormal basis ``[hidden, r]`` of the span of the rows of ``vectors`` ``[n, hidden]``."""
    u, s, _ = torch.linalg.svd(vectors.T.double(), full_matrices=False)
    keep = s > tol * s[0].clamp_min(1e-30)
    return u[:, keep].float()


def project_out(
    h: torch.Tensor, vectors: torch.Tensor, active: torch.Tensor | None = None
) -> torch.Tensor:
    """Remove from ``h`` ``[..., hidden]`` its component in the span of the rows of ``vectors``.

    ``active`` (``[..., n]`` bool, same leading shape as ``h``) chooses per token which rows span
    the removed subspace; ``None`` removes all of them everywhere. Returns a new tensor of
    ``h``'s dtype; the arithmetic is float32.
    """
    shape = h.shape
    flat = h.reshape(-1, shape[-1]).float()
    u = vectors.to(device=h.device, dtype=torch.float32)
    if active is None:
        q = orthonormal_basis(u)
        return (flat - (flat @ q) @ q.T).reshape(shape).to(h.dtype)
    act = active.reshape(-1, u.shape[0]).to(h.device)
    out = flat.clone()
    # Tokens sharing the same set of active directions share one basis.
    masks, inverse = torch.unique(act, dim=0, return_inverse=True)
    for i, mask in enumerate(masks):
        if not mask.any():
            continue
        idx = (inverse == i).nonzero().flatten()
        q = orthonormal_basis(u[mask])
        rows = flat[idx]
        out[idx] = rows - (rows @ q) @ q.T
    return out.reshape(shape).to(h.dtype)


class SteeringHooks:
    """Context manager that projects directions out of the outputs of transformer blocks.

    ``blocks`` are the per-layer modules (``layout.block_modules(model)``) whose output (or
    ``output[0]``) is the residual stream after the layer; ``directions_per_layer[l]`` is the
    ``[n_l, hidden]`` set of unit directions eligible at layer ``l``.

    Without ``bounds`` every given direction is removed at every token (ablation of, e.g., the
    directions a detector flagged). With ``bounds[l] = (lower, upper)`` (one value per row of
    ``directions_per_layer[l]``, from a ``Calibration``) a direction is *triggered* at a token
    when that token's cosine with it lies outside ``[lower − ε, upper + ε]`` (the same rule the
    detector uses), and only triggered directions are removed:

    - ``sticky=False``: per sequence and per forward call, a direction triggered at any token of
      the sequence is removed from all of that call's tokens of the sequence (the released code's
      rule, kept per batch row so batched inputs do not affect each other).
    - ``sticky=True`` (causal LMs, ``generate()``): once a direction is triggered at token ``t``
      of a sequence it is removed from ``t`` and every later token of that sequence, across all
      later forward calls (decode steps) until ``reset()`` or the context exits. With
      ``scope="from_trigger"`` tokens before the trigger are left alone (a causal model's
      earlier tokens cannot have seen it); with ``scope="sequence"`` (the released code's
      clipped generation) the direction is removed from every token of the call in which it
      fired, the whole prompt included, and from every later token.

    The first call after entering (or ``reset()``) is the prefill and uses ``bounds``; later
    calls use ``decode_bounds`` when given (WeightWatch checks the prompt against user-role
    ranges and generated tokens against assistant-role ranges). ``set_token_mask`` marks padded
    prompt tokens so they never trigger. ``from_calibration`` builds all of this from a
    ``Directions`` and a ``Calibration``.
    """

    def __init__(
        self,
        blocks: Sequence[torch.nn.Module],
        directions_per_layer: Mapping[int, torch.Tensor],
        *,
        sticky: bool = False,
        bounds: Bounds | None = None,
        decode_bounds: Bounds | None = None,
        epsilon: float = 0.0,
        names: Mapping[int, Sequence[str]] | None = None,
        scope: str = "from_trigger",
    ):
        if scope not in SCOPES:
            raise ValueError(f"unknown steering scope {scope!r}; allowed: {', '.join(SCOPES)}")
        if sticky and bounds is None:
            raise ValueError(
                "sticky steering needs calibration bounds to know when a direction triggers"
            )
        for layer in directions_per_layer:
            if not 0 <= layer < len(blocks):
                raise ValueError(f"layer {layer} is outside the {len(blocks)} blocks")
        for b in (bounds, decode_bounds):
            if b is not None:
                for layer, vecs in directions_per_layer.items():
                    lo, hi = b[layer]
                    if lo.shape != (vecs.shape[0],) or hi.shape != (vecs.shape[0],):
                        raise ValueError(
                            f"layer {layer}: bounds do not match its {vecs.shape[0]} directions"
                        )
        self.blocks = list(blocks)
        self.directions = {k: v.float() for k, v in directions_per_layer.items() if v.shape[0]}
        self.sticky = sticky
        self.scope = scope
        self.bounds = bounds
        self.decode_bounds = decode_bounds
        self.epsilon = epsilon
        self.names = {k: list(v) for k, v in (names or {}).items()}
        self._handles: list[Any] = []
        self._token_mask: torch.Tensor | None = None
        self.reset()

    @classmethod
    def from_calibration(
        cls,
        blocks: Sequence[torch.nn.Module],
        directions: Directions,
        calibration: Calibration,
        *,
        sticky: bool = False,
        only: Sequence[str] | None = None,
        prefill_role: str = "user",
        decode_role: str = "assistant",
        scope: str = "from_trigger",
    ) -> SteeringHooks:
        """Hooks gated by ``calibration``'s ranges over its active (non-dropped) directions.

        ``only`` restricts steering to these direction names (without role suffix). For a
        role-split calibration the prefill uses ``prefill_role``'s ranges and decode steps
        ``decode_role``'s; otherwise both use the same ranges.
        """
        split = bool(calibration.columns.role_names)
        vecs, names, bounds, dbounds = {}, {}, {}, {}
        for layer in directions.layers:
            rows, lo, hi = calibration.layer_bounds(layer, prefill_role if split else None)
            if split:
                drows, dlo, dhi = calibration.layer_bounds(layer, decode_role)
                if not torch.equal(rows, drows):
                    raise ValueError(f"layer {layer}: roles cover different directions")
            else:
                dlo, dhi = lo, hi
            keep = [
                i
                for i, r in enumerate(rows.tolist())
                if only is None or directions.names[layer][r] in only
            ]
            if not keep:
                continue
            k = torch.tensor(keep, dtype=torch.long)
            vecs[layer] = directions.vectors[layer][rows[k]]
            names[layer] = [directions.names[layer][r] for r in rows[k].tolist()]
            bounds[layer] = (lo[k], hi[k])
            dbounds[layer] = (dlo[k], dhi[k])
        return cls(
            blocks,
            vecs,
            sticky=sticky,
            bounds=bounds,
            decode_bounds=dbounds,
            epsilon=calibration.epsilon,
            names=names,
            scope=scope,
        )

    def reset(self) -> None:
        """Forget sticky state and the record of triggered directions; next call is a prefill."""
        self._calls = dict.fromkeys(self.directions, 0)
        self._state: dict[int, torch.Tensor | None] = dict.fromkeys(self.directions)
        self._triggered: dict[int, torch.Tensor | None] = dict.fromkeys(self.directions)

    def set_token_mask(self, mask: torch.Tensor | None) -> None:
        """``[batch, seq]`` mask of real tokens (the prompt's attention mask); padding never triggers.

        It applies to every call whose batch and sequence sizes match it, i.e. the prefill.
        """
        self._token_mask = None if mask is None else mask.to(torch.bool)

    def triggered(self) -> dict[int, torch.Tensor]:
        """Per layer, ``[batch, n_l]``: which directions were removed somewhere so far."""
        return {k: v for k, v in self._triggered.items() if v is not None}

    def triggered_names(self) -> list[str]:
        """Names of directions removed for any sequence so far (needs ``names``)."""
        out = []
        for layer, t in sorted(self.triggered().items()):
            rows = t.any(dim=0).nonzero().flatten().tolist()
            out += [self.names[layer][r] if layer in self.names else f"L{layer}[{r}]" for r in rows]
        return out

    def __enter__(self) -> SteeringHooks:
        self.reset()
        for layer in self.directions:
            self._handles.append(self.blocks[layer].register_forward_hook(self._make_hook(layer)))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _make_hook(self, layer: int):
        def hook(module: torch.nn.Module, args: Any, output: Any) -> Any:
            h = output[0] if isinstance(output, tuple) else output
            new = self._steer(layer, h)
            return (new, *output[1:]) if isinstance(output, tuple) else new

        return hook

    def _steer(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        u = self.directions[layer]
        first = self._calls[layer] == 0
        self._calls[layer] += 1
        if self.bounds is None:
            active = None
            self._record(layer, torch.ones(h.shape[0], u.shape[0], dtype=torch.bool))
        else:
            use = self.bounds if first or self.decode_bounds is None else self.decode_bounds
            lo, hi = (b.to(h.device) for b in use[layer])
            cos = token_cosines(h, u)
            out = (cos < lo - self.epsilon) | (cos > hi + self.epsilon)
            mask = self._token_mask
            if mask is not None and mask.shape == h.shape[:2]:
                out &= mask.to(h.device)[..., None]
            if self.sticky:
                if self.scope == "sequence":
                    active = out.any(dim=1, keepdim=True).expand_as(out).clone()
                else:
                    active = torch.cummax(out.to(torch.uint8), dim=1).values.bool()
                state = self._state[layer]
                if state is not None:
                    if state.shape[0] != h.shape[0]:
                        raise RuntimeError("batch size changed between calls; reset() first")
                    active |= state.to(h.device)[:, None, :]
                self._state[layer] = active[:, -1, :].cpu()
            else:
                active = out.any(dim=1, keepdim=True).expand_as(out)
            self._record(layer, active.any(dim=1).cpu())
        return project_out(h, u, active)

    def _record(self, layer: int, rows: torch.Tensor) -> None:
        prev = self._triggered[layer]
        self._triggered[layer] = rows if prev is None or prev.shape != rows.shape else prev | rows
