"""LoRA merge spaces, as released with Trap² (``task_merger.py``, ``merge_space``): a data-free
merge op applied to each layer's task vectors expressed in a basis the experts share.

- ``full``: the op on the task vectors ΔW_i themselves (mergesec's default).
- ``knots`` (KnOTS, Stoica et al. 2025): the layer's updates are stacked side by side,
  [ΔW_1 … ΔW_T] = U S [V_1 … V_T] (SVD in float64, components with σ ≤ 1e-5 dropped), the op merges
  the V_i, and ΔW = U S V_merged. Task arithmetic is the same in both spaces.
- ``core``: from the LoRA factors ΔW_i = B_i A_i, a shared row basis of the stacked A_i and a shared
  column basis of the stacked B_i; each task becomes a small core M_i = U_Bᵀ B_i A_i V_Aᵀ (computed
  from the factors' SVDs, as released), the op merges the M_i, and ΔW = U_B M_merged V_A.

Differences from the released code, on purpose:

- KnOTS here reads ΔW_i off the materialised weights (θ_i − θ_0), not off the adapter, so it takes
  any expert (a full fine-tune, an attacked victim) and every 2-D tensor that some expert changed;
  tensors that are not 2-D (biases, norms) are merged by the op in the full space. The released
  code merges the LoRA-adapted matrices only (the only ones a LoRA expert changes).
- The op runs on the components in float32, as every mergesec op does (the released code runs
  Core's merge in float64); the bases and the map back are float64.
- The coefficient of an op whose coefficient scales its merged task vector is applied to the
  mapped-back ΔW (θ_0 + c·ΔW), which equals the released U S (c·V_merged) up to rounding and keeps
  the merge step's one-merge-per-setting search exact.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from mergesec.core.registry import GRAMS, Op
from mergesec.merging.per_key import SCALES_RESULT, SCALES_TASK_VECTORS
from mergesec.models.state_dict import StateDict

Space = Literal["full", "knots", "core"]
SPACES: tuple[str, ...] = ("full", "knots", "core")
# KnOTS keeps the stacked updates' singular components above this (the released threshold).
KNOTS_TOL = 1e-5

MergeOpFn = Callable[..., StateDict]
# per expert: base weight key -> (A [r, n], B [m, r]) with the adapter's scale folded into B
Factors = Sequence[Mapping[str, tuple[Tensor, Tensor]]]


def space_problem(op: Op, space: str) -> str | None:
    """Why ``op`` cannot run in ``space`` (None when it can)."""
    if space == "full":
        return None
    if GRAMS in op.traits:
        return (
            f"space: {space} merges task vectors in a shared basis; {op.key} needs the layers' "
            "input Gram matrices and runs in the full space only"
        )
    return None


def knots_components(deltas: Sequence[Tensor]) -> tuple[Tensor, Tensor, list[Tensor]]:
    """KnOTS' shared basis of one layer's updates ``[m, n]``: ``(U [m, k], S [k], [V_i [k, n]])``
    with ``[ΔW_1 … ΔW_T] = U diag(S) [V_1 … V_T]`` over the k components with σ > ``KNOTS_TOL``
    (released ``get_knots_components``; float32 results)."""
    stack = torch.cat(list(deltas), dim=1).double()
    u, s, vh = torch.linalg.svd(stack, full_matrices=False)
    keep = s > KNOTS_TOL
    u, s, vh = u[:, keep].float(), s[keep].float(), vh[keep].float()
    n = deltas[0].shape[1]
    vs = vh.reshape(vh.shape[0], len(deltas), n).permute(1, 0, 2)
    return u, s, list(vs)


def core_components(
    a_list: Sequence[Tensor], b_list: Sequence[Tensor]
) -> tuple[list[Tensor], Tensor, Tensor]:
    """Core space of one LoRA layer: ``([M_i], U_B, V_A)`` in float64, with
    ``B_i A_i = U_B M_i V_A`` when the stacked factors span the layer's updates
    (released ``get_core_matrices``: M_i = (U_Bᵀ U_Bi) Σ_Bi (V_Bi U_Ai) Σ_Ai (V_Ai V_Aᵀ))."""
    a64 = [a.double() for a in a_list]
    b64 = [b.double() for b in b_list]
    vh_a_ref = torch.linalg.svd(torch.cat(a64, dim=0), full_matrices=False)[2]
    u_b_ref = torch.linalg.svd(torch.cat(b64, dim=1), full_matrices=False)[0]
    cores = []
    for a, b in zip(a64, b64, strict=True):
        u_a, s_a, vh_a = torch.linalg.svd(a, full_matrices=False)
        u_b, s_b, vh_b = torch.linalg.svd(b, full_matrices=False)
        m = torch.diag(s_b) @ (vh_b @ u_a) @ torch.diag(s_a)
        cores.append((u_b_ref.T @ u_b) @ m @ (vh_a @ vh_a_ref.T))
    return cores, u_b_ref, vh_a_ref


def scales_coefficient(op: Op) -> bool:
    """Whether ``op``'s coefficient only scales its merged task vector (see ``per_key``)."""
    return (
        bool({SCALES_TASK_VECTORS, SCALES_RESULT} & op.traits)
        and op.param("coefficient") is not None
    )


def merge_components(
    op_fn: MergeOpFn, key: str, comps: Sequence[Tensor], params: dict[str, Any], unit: bool
) -> Tensor:
    """The op's merged task vector of components ``comps`` (each taken as a task vector from a
    zero base); at coefficient 1 when ``unit``."""
    zero = {key: torch.zeros_like(comps[0])}
    p = params | {"coefficient": 1.0} if unit else params
    return op_fn(zero, [{key: c} for c in comps], **p)[key]


# A weight whose task vector is further than this (relative) from its adapter's s·B A was changed
# after training (a protection that rewrote the weights): Core space would merge stale factors.
FACTOR_TOL = 0.05


def check_factors(
    key: str, b: Tensor, ts: Sequence[Tensor], a_list: Sequence[Tensor], b_list: Sequence[Tensor]
) -> None:
    """Raise ``ValueError`` when an expert's task vector at ``key`` is not its factors' B A."""
    bf = b.float()
    for i, (t, fa, fb) in enumerate(zip(ts, a_list, b_list, strict=True)):
        update = fb.float() @ fa.float()
        err = float((t.float() - bf - update).norm())
        if err > FACTOR_TOL * max(float(update.norm()), 1e-12):
            raise ValueError(
                f"space core: expert {i}'s weights at {key!r} are not its LoRA adapter's update "
                f"(relative difference {err / max(float(update.norm()), 1e-12):.2g}); was the "
                "release changed after training? Use space knots or full"
            )


def in_space(op: Op, space: str, factors: Factors | None = None) -> Callable[..., StateDict]:
    """``op.fn`` run in ``space``: the same call contract (``fn(base, experts, **params)``,
    per key, merged weights out). ``core`` needs ``factors`` (one dict per expert, in expert
    order) and merges the keys they cover; other keys are merged by the op in the full space."""
    if space == "full":
        return op.fn
    if space not in SPACES:
        raise ValueError(f"unknown merge space {space!r}; known: {', '.join(SPACES)}")
    if space == "core" and factors is None:
        raise ValueError("space core needs each expert's LoRA factors")
    unit = scales_coefficient(op)

    def fn(base: Mapping[str, Tensor], experts: Sequence[Mapping[str, Tensor]], **params: Any):
        out: StateDict = {}
        for key, b in base.items():
            ts = [e[key] for e in experts]
            delta = None
            if space == "core" and factors is not None and key in factors[0]:
                a_list, b_list = zip(*(f[key] for f in factors), strict=True)
                check_factors(key, b, ts, a_list, b_list)
                cores, u_b, vh_a = core_components(a_list, b_list)
                merged = merge_components(op.fn, key, [c.float() for c in cores], params, unit)
                delta = (u_b @ merged.double() @ vh_a).float()
            elif (
                space == "knots"
                and b.dim() == 2
                and b.is_floating_point()
                and not all(torch.equal(t, b) for t in ts)
            ):
                bf = b.float()
                u, s, vs = knots_components([t.float() - bf for t in ts])
                if s.numel() == 0:
                    out[key] = b
                    continue
                delta = (u * s) @ merge_components(op.fn, key, vs, params, unit)
            if delta is None:
                out[key] = op.fn({key: b}, [{key: t} for t in ts], **params)[key]
            elif unit:
                out[key] = (b.float() + params.get("coefficient", 1.0) * delta).to(b.dtype)
            else:
                out[key] = (b.float() + delta).to(b.dtype)
        return out

    return fn
