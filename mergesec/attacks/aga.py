"""AGA, the Anchor-Guided Attack (Guo et al., ECCV 2026): data-free recovery of a protected expert.

A function-preserving defense releases ``η(θ_pre + τ)`` with a small task vector ``τ``, so the
release is dominated by ``η(θ_pre)``. Aligning each layer of the release to the public base
model (the anchor) therefore reveals ``η``; undoing it gives back ≈ ``θ_pre + τ``, which merges
like an honest expert. Per layer:

1. MLP: one Hungarian assignment of released hidden units to anchor units on the cosine of
   their MLP-in rows (plus gate rows), undoing any hidden-unit permutation.
2. Heads: a Hungarian assignment of released heads to anchor heads on a score no per-head
   invertible transform changes (the least-squares residual of fitting one head's weights by
   a linear map of another's), undoing a whole-head permutation.
3. Per head, least squares (``torch.linalg.lstsq`` in float64) for the matrix mapping the
   released Q (and V) onto the anchor's. With ``solve_derived`` the K transform is the Q
   transform's inverse-transpose and the O transform the V transform's inverse, so the result
   computes exactly the release's function. With rotary embeddings the Q/K map is solved within
   the scaled rotations per rotary pair (the only maps that keep the function), and with grouped
   key/value heads one map per key/value head is fitted on all of its query heads.

The released attack (``krumpguo/secure-merge-attack``) is steps 1 and 3 with Q, K, V and O each
solved independently: ``solve_derived=False, match_heads=False``. Head matching (step 2), the
derived K/O solves and the rotary and grouped-head handling are mergesec's extensions.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

import torch
from scipy.optimize import linear_sum_assignment

from mergesec.defenses import transforms as T
from mergesec.models.layout import TransformerLayout
from mergesec.models.state_dict import StateDict


# ---- MLP -------------------------------------------------------------------------------------
def _unit_rows(w: torch.Tensor) -> torch.Tensor:
    w = w.to(torch.float32)
    return w / w.norm(dim=1, keepdim=True).clamp_min(1e-12)


def mlp_cost(rel: T.LayerParts, anc: T.LayerParts, use_gate: bool = True) -> torch.Tensor:
    """``−cos`` between released and anchor MLP-in rows (plus gate rows): ``[n_rel, n_anchor]``."""
    cost = -(_unit_rows(rel.w["mlp_in"]) @ _unit_rows(anc.w["mlp_in"]).t())
    if use_gate and "gate" in rel.w:
        cost -= _unit_rows(rel.w["gate"]) @ _unit_rows(anc.w["gate"]).t()
    return cost


def match_mlp_units(cost: torch.Tensor) -> torch.Tensor:
    """``restore`` with anchor position ``c`` taking released unit ``restore[c]`` (Hungarian)."""
    rows, cols = linear_sum_assignment(cost.cpu().numpy())
    restore = torch.empty(len(cols), dtype=torch.long)
    restore[torch.as_tensor(cols)] = torch.as_tensor(rows)
    return restore


# ---- heads -----------------------------------------------------------------------------------
def _row_heads(parts: T.LayerParts, part: str, hd: int) -> torch.Tensor:
    """Per head ``[W_h | b_h]ᵀ``: ``[H, in(+1), hd]``."""
    w = T.split_rows(parts.w[part], hd)
    b = parts.b.get(part)
    if b is not None:
        w = torch.cat([w, b.reshape(-1, hd, 1)], dim=2)
    return w.mT


def _orthonormal_basis(x: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis of each ``x[b]``'s column space (``[B, m, k]``, ``m ≥ k``).

    Two passes of Cholesky QR on column-equilibrated input (batched CPU Householder QR is an
    order of magnitude slower at these shapes); Householder QR where a Gram matrix is singular.
    """
    q = x / x.norm(dim=-2, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny)
    for _ in range(2):
        chol, info = torch.linalg.cholesky_ex(q.mT @ q)
        if bool((info != 0).any()):
            return torch.linalg.qr(x).Q
        q = torch.linalg.solve_triangular(chol.mT, q, upper=True, left=False)
    return q


def subspace_residual(x_rel: torch.Tensor, x_anc: torch.Tensor) -> torch.Tensor:
    """``[R, A]``: ``min_T ‖x_rel[r] T − x_anc[a]‖² / ‖x_anc[a]‖²`` for ``[*, m, k]`` inputs.

    Invariant to any invertible ``x_rel[r] ← x_rel[r] M``, hence to every per-head transform.
    """
    (r, m, k), a = x_rel.shape, x_anc.shape[0]
    basis = _orthonormal_basis(x_rel)
    proj = basis.mT.reshape(r * k, m) @ x_anc.permute(1, 0, 2).reshape(m, a * k)
    captured = (proj.reshape(r, k, a, k) ** 2).sum(dim=(1, 3))
    total = (x_anc**2).sum(dim=(1, 2))
    return (1 - captured / total).clamp_min(0)


def head_scores(
    rel: T.LayerParts, anc: T.LayerParts, layout: TransformerLayout
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Residual scores for head matching: ``[kv_rel, kv_anc]`` on K and V, and (with grouped
    heads only) ``[q_rel, q_anc]`` on Q and O for the assignment within groups."""
    hd = layout.head_dim
    res_kv = subspace_residual(_row_heads(rel, "k", hd), _row_heads(anc, "k", hd))
    res_kv += subspace_residual(_row_heads(rel, "v", hd), _row_heads(anc, "v", hd))
    if layout.group_size == 1:  # a query head moves with its key/value head: K, V decide
        return res_kv, None
    res_q = subspace_residual(_row_heads(rel, "q", hd), _row_heads(anc, "q", hd))
    res_q += subspace_residual(T.split_cols(rel.w["o"], hd), T.split_cols(anc.w["o"], hd))
    return res_kv, res_q


def assign_heads(
    res_kv: torch.Tensor, res_q: torch.Tensor | None, layout: TransformerLayout
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q_perm, kv_perm)`` from ``head_scores`` by Hungarian assignments (see ``permute_heads``).

    A key/value pairing costs its K and V residuals plus the best assignment of its query heads'
    Q and O residuals; query heads are then assigned within each paired group.
    """
    gs, nkv = layout.group_size, layout.num_kv_heads
    cost = res_kv.cpu().numpy().copy()
    within: dict[tuple[int, int], tuple] = {}
    if res_q is not None:
        sub = res_q.reshape(nkv, gs, nkv, gs).permute(0, 2, 1, 3).cpu().numpy()  # [r, a, i, j]
        for r in range(nkv):
            for a in range(nkv):
                i, j = linear_sum_assignment(sub[r, a])
                within[(r, a)] = (i, j)
                cost[r, a] += sub[r, a][i, j].sum()
    rows, cols = linear_sum_assignment(cost)
    kv_perm = torch.empty(nkv, dtype=torch.long)
    q_perm = torch.empty(layout.num_heads, dtype=torch.long)
    for r, a in zip(rows.tolist(), cols.tolist(), strict=True):
        kv_perm[a] = r
        i, j = within.get((r, a), ([0], [0]))
        q_perm[a * gs + torch.as_tensor(j)] = r * gs + torch.as_tensor(i)
    return q_perm, kv_perm


# ---- per-head solves -------------------------------------------------------------------------
def _lstsq(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.linalg.lstsq(x, y).solution


def _rope_qk_fit(x_rel: torch.Tensor, x_anc: torch.Tensor) -> torch.Tensor:
    """Best per-pair complex scalar ``z`` with ``z·x_rel ≈ x_anc`` (``[B, m, hd]`` -> matrices)."""
    h = x_rel.shape[-1] // 2
    cr = torch.complex(x_rel[..., :h], x_rel[..., h:])
    ca = torch.complex(x_anc[..., :h], x_anc[..., h:])
    z = (cr.conj() * ca).sum(dim=1) / (cr.abs() ** 2).sum(dim=1)
    return T.rope_pair_matrix(z.real, z.imag)


def solve_attention(
    rel: T.LayerParts, anc: T.LayerParts, layout: TransformerLayout, solve_derived: bool = True
) -> T.LayerParts:
    """Map the released attention weights onto the anchor's by per-head least squares."""
    hd, nkv, gs = layout.head_dim, layout.num_kv_heads, layout.group_size
    xq_r, xq_a = _row_heads(rel, "q", hd), _row_heads(anc, "q", hd)
    xv_r, xv_a = _row_heads(rel, "v", hd), _row_heads(anc, "v", hd)
    if solve_derived:
        # One Q/K map per key/value head, fitted on all query heads of its group.
        gq_r = xq_r.reshape(nkv, gs * xq_r.shape[1], hd)
        gq_a = xq_a.reshape(nkv, gs * xq_a.shape[1], hd)
        m = _rope_qk_fit(gq_r, gq_a) if layout.rope else _lstsq(gq_r, gq_a).mT
        n = _lstsq(xv_r, xv_a).mT
        return T.apply_vo(T.apply_qk(rel, layout, m), layout, n)
    out = rel.copy()
    out.w["q"], out.b["q"] = T.apply_rows(rel.w["q"], rel.b["q"], _lstsq(xq_r, xq_a).mT)
    tk = _lstsq(_row_heads(rel, "k", hd), _row_heads(anc, "k", hd)).mT
    out.w["k"], out.b["k"] = T.apply_rows(rel.w["k"], rel.b["k"], tk)
    out.w["v"], out.b["v"] = T.apply_rows(rel.w["v"], rel.b["v"], _lstsq(xv_r, xv_a).mT)
    to = _lstsq(T.split_cols(rel.w["o"], hd), T.split_cols(anc.w["o"], hd))
    out.w["o"] = T.apply_cols(rel.w["o"], to)
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def recover_layer(
    rel: T.LayerParts,
    anc: T.LayerParts,
    layout: TransformerLayout,
    *,
    solve_derived: bool = True,
    match_heads_first: bool = True,
    match_mlp: bool = True,
    mlp_use_gate: bool = True,
    timings: dict[str, float] | None = None,
) -> T.LayerParts:
    """AGA on one layer's float64 parts; adds seconds per stage to ``timings`` when given.

    Stages: ``mlp_cost`` (cosine matrix), ``mlp_hungarian`` (assignment and un-permuting),
    ``head_scores`` (subspace residuals), ``head_hungarian``, ``attn_lstsq`` (solves and maps).
    """
    dev = rel.w["q"].device
    clock: dict[str, float] = timings if timings is not None else {}

    def tick(name: str, start: float) -> float:
        _sync(dev)
        now = time.perf_counter()
        clock[name] = clock.get(name, 0.0) + now - start
        return now

    t = time.perf_counter()
    if match_mlp:
        cost = mlp_cost(rel, anc, mlp_use_gate)
        t = tick("mlp_cost", t)
        restore = match_mlp_units(cost)
        del cost
        rel = T.permute_mlp(rel, restore)
        t = tick("mlp_hungarian", t)
    if match_heads_first:
        scores = head_scores(rel, anc, layout)
        t = tick("head_scores", t)
        rel = T.permute_heads(rel, layout, *assign_heads(*scores, layout))
        t = tick("head_hungarian", t)
    rel = solve_attention(rel, anc, layout, solve_derived)
    tick("attn_lstsq", t)
    return rel


def attack_aga(
    release: Mapping[str, torch.Tensor],
    base: Mapping[str, torch.Tensor],
    layout: TransformerLayout,
    *,
    solve_derived: bool = True,
    match_heads: bool = True,
    match_mlp: bool = True,
    mlp_use_gate: bool = True,
    device: str = "cpu",
) -> StateDict:
    """Recover an expert from a PaRaMS/MergeLock-style release using only the public ``base``.

    Returns a new state dict; tensors outside the layers' attention and MLP projections are
    passed through. ``solve_derived`` keeps the result exactly function-equivalent to the
    release (K and O maps derived from the Q and V maps); without it Q, K, V and O are each
    fitted independently as in the original attack. ``match_heads`` undoes whole-head
    permutations, ``match_mlp`` hidden-unit permutations (``mlp_use_gate`` adds the gate rows'
    cosine to the matching cost). Solves run in float64 on ``device``; the Hungarian solves on CPU.
    Raises ``ValueError`` when ``base`` has other keys or shapes than ``release``.
    """
    T.check_same_shapes(release, base, "release", "anchor")
    out: StateDict = dict(release)
    for layer in range(layout.num_layers):
        rel = T.read_layer(release, layout, layer, device=device)
        anc = T.read_layer(base, layout, layer, device=device)
        rec = recover_layer(
            rel,
            anc,
            layout,
            solve_derived=solve_derived,
            match_heads_first=match_heads,
            match_mlp=match_mlp,
            mlp_use_gate=mlp_use_gate,
        )
        T.write_layer(out, layout, layer, rec)
    return out


# ---- diagnostics -----------------------------------------------------------------------------
class _Agreement:
    """Running sums over tensor pairs (recovered r, true t) for cos(r, t) and ‖r − t‖ / ‖t‖ in
    float64, so no whole-model vector is ever built."""

    def __init__(self) -> None:
        self.rt = self.rr = self.tt = self.dd = 0.0

    def add(self, r: torch.Tensor, t: torch.Tensor) -> None:
        r, t = r.double(), t.double()
        self.rt += float((r * t).sum())
        self.rr += float((r * r).sum())
        self.tt += float((t * t).sum())
        self.dd += float((r - t).pow(2).sum())

    def result(self) -> tuple[float, float]:
        cos = self.rt / max((self.rr * self.tt) ** 0.5, 1e-30)
        return cos, (self.dd / self.tt) ** 0.5 if self.tt > 0 else float("nan")


def recovery_diagnostics(
    recovered: Mapping[str, torch.Tensor],
    clean: Mapping[str, torch.Tensor],
    base: Mapping[str, torch.Tensor],
    layout: TransformerLayout,
) -> dict[str, float]:
    """Cosine and relative error of the recovered task vector against the true one.

    Keys ``cos/<part>`` and ``rel_err/<part>`` for every part (q, k, v, o, mlp_in, gate,
    mlp_out; weights and biases of all layers together), and ``cos/all``, ``rel_err/all`` over
    every floating tensor. Accumulated tensor by tensor, so memory holds one tensor at a time.
    """
    out: dict[str, float] = {}
    for part in layout.parts:
        agree = _Agreement()
        for layer in range(layout.num_layers):
            r, c, b = (T.read_layer(sd, layout, layer, (part,)) for sd in (recovered, clean, base))
            agree.add(r.w[part] - b.w[part], c.w[part] - b.w[part])
            if b.b[part] is not None:
                agree.add(r.b[part] - b.b[part], c.b[part] - b.b[part])
        out[f"cos/{part}"], out[f"rel_err/{part}"] = agree.result()
    agree = _Agreement()
    for k in clean:
        if clean[k].is_floating_point() and k in base and k in recovered:
            bk = base[k].double()
            agree.add(recovered[k].double() - bk, clean[k].double() - bk)
    out["cos/all"], out["rel_err/all"] = agree.result()
    return out


def mlp_match_fraction(
    recovered: Mapping[str, torch.Tensor],
    clean: Mapping[str, torch.Tensor],
    layout: TransformerLayout,
) -> float:
    """Fraction of MLP hidden units (all layers) sitting at their true position after recovery.

    A recovered unit is at its true position when the clean unit most similar to it (cosine of
    MLP-in and gate rows, biases and MLP-out column) has the same index.
    """
    mlp = tuple(p for p in ("mlp_in", "gate", "mlp_out") if p in layout.parts)
    hits = total = 0
    for layer in range(layout.num_layers):
        r = T.mlp_unit_features(T.read_layer(recovered, layout, layer, mlp))
        c = T.mlp_unit_features(T.read_layer(clean, layout, layer, mlp))
        sim = _unit_rows(r) @ _unit_rows(c).t()
        hits += int((sim.argmax(dim=1) == torch.arange(len(sim))).sum())
        total += len(sim)
    return hits / total
