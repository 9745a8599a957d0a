"""PaRaMS (Wei, Yu & Sakuma, ICCV 2025): parameter rearrangement and random multi-head scaling.

The released model computes exactly the expert's function, but its task vector (release − base)
is huge and unaligned with other experts', so merging it ruins the merge.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from mergesec.core.bounds import NonNegativeFloat, PositiveFloat, Seed
from mergesec.defenses import transforms as T
from mergesec.models.layout import MLP_PARTS, TransformerLayout
from mergesec.models.state_dict import StateDict

SCALINGS = ("none", "diagonal", "nonsymmetric", "symmetric", "nonsymmetric_released")


def dissimilar_permutation(expert: T.LayerParts, base: T.LayerParts) -> torch.Tensor:
    """The MLP unit order least similar to the base: ``perm[i]`` = expert unit put at position ``i``.

    Minimises ``Σ_i <base unit i, expert unit perm[i]>`` over the units' MLP-in rows and bias, gate
    rows and MLP-out columns by one Hungarian solve (PaRaMS' weight matching, objective reversed).
    """
    sim = T.mlp_unit_features(base) @ T.mlp_unit_features(expert).t()
    _, cols = linear_sum_assignment(sim.cpu().numpy(), maximize=False)
    return torch.as_tensor(cols, dtype=torch.long)


def _qk_vo_matrices(
    layout: TransformerLayout,
    scaling: str,
    scale_min: float,
    scale_max: float,
    epsilon: float,
    max_condition: float | None,
    g: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    n, hd = layout.num_kv_heads, layout.head_dim
    if scaling == "diagonal":
        alpha = T.uniform(scale_min, scale_max, (n, hd), g)
        if layout.rope:  # equal scale on both members of a rotary pair
            alpha[:, hd // 2 :] = alpha[:, : hd // 2]
        gamma = T.uniform(scale_min, scale_max, (n, hd), g)
        return torch.diag_embed(alpha), torch.diag_embed(gamma)
    if scaling == "symmetric":
        return (a := _symmetric(layout, scale_min, scale_max, g)), a
    if scaling == "nonsymmetric_released":
        # the released draw: no conditioning filter, and V/O reuse the Q/K matrix
        return (a := _nonsymmetric_qk(layout, scale_min, scale_max, epsilon, None, g)), a
    # nonsymmetric: A = (G + εI)·diag(s), s ~ log-U[scale_min, scale_max]
    m = _nonsymmetric_qk(layout, scale_min, scale_max, epsilon, max_condition, g)
    s = T.log_uniform(scale_min, scale_max, (n, 1, hd), g)
    v = _gaussian(n, hd, epsilon, max_condition, g) * s
    return m, v


def _nonsymmetric_qk(
    layout: TransformerLayout,
    scale_min: float,
    scale_max: float,
    epsilon: float,
    max_condition: float | None,
    g: torch.Generator,
) -> torch.Tensor:
    """``(G + εI)·diag(s)`` per key/value head, or a random scaled rotation per rotary pair."""
    n, hd = layout.num_kv_heads, layout.head_dim
    if layout.rope:
        m = T.random_rope_qk(n, hd, scale_min, scale_max, g)
    else:
        s = T.log_uniform(scale_min, scale_max, (n, 1, hd), g)
        m = _gaussian(n, hd, epsilon, max_condition, g) * s
    return m


def _symmetric(
    layout: TransformerLayout, scale_min: float, scale_max: float, g: torch.Generator
) -> torch.Tensor:
    """The released symmetric draw ``U·diag(e)·Uᵀ`` per key/value head: ``U`` the Q factor of a
    Gaussian matrix, ``e ~ log-U[scale_min, scale_max]``. With rotary embeddings a symmetric map
    that commutes with every pair's rotation is a scalar on each pair, so ``e`` is tied within
    rotary pairs and ``U`` is the identity."""
    n, hd = layout.num_kv_heads, layout.head_dim
    e = T.log_uniform(scale_min, scale_max, (n, hd), g)
    if layout.rope:
        e[:, hd // 2 :] = e[:, : hd // 2]
        return torch.diag_embed(e)
    u, _ = torch.linalg.qr(torch.randn(n, hd, hd, generator=g, dtype=T.F64))
    return (u * e.unsqueeze(-2)) @ u.transpose(-1, -2)


def _gaussian(
    batch: int, n: int, epsilon: float, max_condition: float | None, g: torch.Generator
) -> torch.Tensor:
    """``G + εI`` with standard Gaussian ``G``; draws whose condition number exceeds
    ``max_condition·n`` are replaced by fresh ones (the float32 rounding error of ``A Q`` and
    ``A^{-T} K`` grows with the condition number of ``A``)."""
    eye = torch.eye(n, dtype=T.F64)
    if max_condition is None:
        return torch.randn(batch, n, n, generator=g, dtype=T.F64) + epsilon * eye
    kept: list[torch.Tensor] = []
    while len(kept) < batch:
        cand = torch.randn(2 * batch + 4, n, n, generator=g, dtype=T.F64) + epsilon * eye
        sv = np.linalg.svd(cand.numpy(), compute_uv=False)  # faster than torch for small batches
        ok = torch.from_numpy(sv[:, 0] / sv[:, -1] <= max_condition * n)
        kept.extend(cand[ok])
    return torch.stack(kept[:batch])


# Per-variant scale ranges of the released apply_PaRaMS.py.
DEFAULT_SCALE_RANGE = {
    "diagonal": (0.05, 20.0),
    "nonsymmetric": (0.1, 15.0),
    "symmetric": (0.05, 20.0),
    "nonsymmetric_released": (0.1, 15.0),
}


def protect_params(
    expert: Mapping[str, torch.Tensor],
    base: Mapping[str, torch.Tensor],
    layout: TransformerLayout,
    *,
    seed: Seed = 0,
    permute_mlp: bool = True,
    scaling: Literal[
        "diagonal", "nonsymmetric", "nonsymmetric_released", "symmetric", "none"
    ] = "diagonal",
    scale_min: PositiveFloat | None = None,
    scale_max: PositiveFloat | None = None,
    permute_heads: bool = False,
    epsilon: NonNegativeFloat = 1e-3,
    max_condition: PositiveFloat | None = 4.0,
) -> StateDict:
    """Release ``expert`` protected by PaRaMS; returns a new state dict computing the same function.

    Per layer:

    - ``permute_mlp``: MLP hidden units reordered by the Hungarian permutation least similar to
      ``base`` (MLP-in rows and bias, gate rows, MLP-out columns; the MLP-out bias is untouched).
    - ``permute_heads``: whole heads shuffled; with grouped key/value heads a key/value head moves
      together with its query heads, and query heads are shuffled within their group.
    - ``scaling`` per key/value head (shared by the query heads of its group):

      * ``"diagonal"``: ``Q·α, K/α, V·γ, O/γ`` (rows of Q/K/V and biases, columns of O) with
        ``α, γ ~ U[scale_min, scale_max]`` per dimension. With rotary embeddings (llama family)
        ``α`` is equal on both members of each rotary pair, the only diagonal that commutes with
        the rotation.
      * ``"nonsymmetric"``: ``A = (G + εI)·diag(s)``, ``G`` standard Gaussian,
        ``s ~ log-U[scale_min, scale_max]``; ``Q' = A Q``, ``K' = A^{-T} K``, ``V' = B V``,
        ``O' = O B^{-1}`` with an independent ``B`` of the same form. With rotary embeddings the
        Q/K matrix is instead a random scaled rotation per rotary pair (scale log-U, uniform
        angle), the general matrices that commute with the rotation; V/O keep the general form.
      * ``"nonsymmetric_released"``: the released draw of ``"nonsymmetric"``: every draw kept
        (``max_condition`` is not used) and ``V' = A V``, ``O' = O A^{-1}`` with the Q/K matrix
        ``A`` itself.
      * ``"symmetric"`` (released ``apply_attention_qkvw_blockdiag_sym``): ``A = U diag(e) Uᵀ``,
        ``U`` the Q factor of a Gaussian matrix, ``e ~ log-U[scale_min, scale_max]``;
        ``Q' = A Q``, ``K' = A^{-1} K``, ``V' = A V``, ``O' = O A^{-1}``. With rotary
        embeddings ``A`` is diagonal with ``e`` tied within each rotary pair (the symmetric
        maps that commute with the rotation).
      * ``"none"``: no attention scaling.

    ``scale_min``/``scale_max`` default to the released ``apply_PaRaMS.py`` settings of each
    variant: [0.05, 20] for ``"diagonal"`` and ``"symmetric"``, [0.1, 15] for the two
    nonsymmetric ones.

    ``max_condition``: in ``"nonsymmetric"``, Gaussian draws ``G + εI`` with a condition number
    above ``max_condition · head_dim`` are redrawn (``None``: keep every draw, as the original
    code does). Heavy-tailed draws otherwise push float32 output errors of head_dim-64 models to
    1e-3; the bound keeps them near 5e-5. The nonsymmetric form stays the least exact variant:
    ``diag(s)`` applied before the mixing ``G`` amplifies rounding by up to ``scale_max/scale_min``.

    The maths runs in float64 and each tensor is cast back to its original dtype, so a float32
    model's outputs are unchanged to float32 rounding. Other tensors (embeddings, norms, heads) are
    passed through. The random draws come from ``torch.Generator().manual_seed(seed)``.
    """
    if scaling not in SCALINGS:
        raise ValueError(f"unknown scaling {scaling!r}; known: {', '.join(SCALINGS)}")
    default_min, default_max = DEFAULT_SCALE_RANGE.get(scaling, (0.05, 20.0))
    scale_min = default_min if scale_min is None else scale_min
    scale_max = default_max if scale_max is None else scale_max
    if not 0 < scale_min <= scale_max:
        raise ValueError(f"need 0 < scale_min <= scale_max, got {scale_min}, {scale_max}")
    if permute_mlp:
        keys = [k for layer in range(layout.num_layers) for k in _mlp_keys(layout, expert, layer)]
        T.check_same_shapes(expert, base, "expert", "base", keys)
    g = torch.Generator().manual_seed(seed)
    out: StateDict = dict(expert)
    for layer in range(layout.num_layers):
        parts = T.read_layer(expert, layout, layer)
        if permute_mlp:
            base_mlp = T.read_layer(base, layout, layer, _mlp_parts(layout))
            parts = T.permute_mlp(parts, dissimilar_permutation(parts, base_mlp))
        if permute_heads:
            q_perm, kv_perm = T.random_head_permutation(layout, g)
            parts = T.permute_heads(parts, layout, q_perm, kv_perm)
        if scaling != "none":
            m, n = _qk_vo_matrices(layout, scaling, scale_min, scale_max, epsilon, max_condition, g)
            parts = T.apply_vo(T.apply_qk(parts, layout, m), layout, n)
        T.write_layer(out, layout, layer, parts)
    return out


def _mlp_parts(layout: TransformerLayout) -> tuple[str, ...]:
    return tuple(p for p in MLP_PARTS if p in layout.parts)


def _mlp_keys(layout: TransformerLayout, sd: Mapping[str, torch.Tensor], layer: int) -> list[str]:
    keys = []
    for part in _mlp_parts(layout):
        keys.append(layout.weight_key(layer, part))
        if layout.bias_key(layer, part) in sd and part != "mlp_out":
            keys.append(layout.bias_key(layer, part))
    return keys
