"""Merge operators: pure functions from a base state dict and expert state dicts to merged weights.

Every ``merge/*`` op has the signature ``fn(base, experts, *, <params>) -> StateDict`` and returns
the merged weights (not a task vector) for every key of ``base``. Task vectors are
``τ_i = θ_i − θ_0``. Conventions shared by all ops:

- Integer and bool tensors, and keys where every expert equals the base, pass through unchanged.
- Arithmetic runs in float32 (RegMean's linear solve in float64); results come back in the base
  tensor's dtype.
- Everything is computed per tensor, so calling an op on one key (as ``stream_merge`` does) gives
  the same result as calling it on the whole state dict. In particular TIES trims the top-k
  entries of each task vector *per tensor*, as mergekit does, not over the flattened model as the
  original TIES code does; and DARE draws its masks from a generator seeded by
  ``(seed, key, expert index)``.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

from mergesec.core.registry import register_op
from mergesec.models.state_dict import StateDict

# (key, base as float32, experts as float32) -> merged weights as float32
Combine = Callable[[str, Tensor, list[Tensor]], Tensor]


def merge_per_key(
    base: Mapping[str, Tensor], experts: Sequence[Mapping[str, Tensor]], combine: Combine
) -> StateDict:
    """Apply ``combine`` to each floating key of ``base`` that some expert changed.

    Checks that every expert has each key with the base's shape; other keys pass through.
    """
    if not experts:
        raise ValueError("merging needs at least one expert")
    out: StateDict = {}
    for key, b in base.items():
        ts = []
        for i, e in enumerate(experts):
            try:
                t = e[key]
            except KeyError:
                raise ValueError(
                    f"key {key!r}: expert {i} does not have it, base has shape {tuple(b.shape)}"
                ) from None
            if t.shape != b.shape:
                raise ValueError(
                    f"key {key!r}: expert {i} has shape {tuple(t.shape)}, base has {tuple(b.shape)}"
                )
            ts.append(t)
        if not b.is_floating_point() or all(torch.equal(t, b) for t in ts):
            out[key] = b
            continue
        merged = combine(key, b.float(), [t.to(device=b.device, dtype=torch.float32) for t in ts])
        out[key] = merged.to(b.dtype)
    return out


def accumulate(tensors: Iterable[Tensor], *, fresh: bool = False) -> Tensor:
    """Sum of tensors produced one at a time, holding one running sum (not a stack of all).

    With ``fresh`` the tensors are temporaries nobody else holds, so the first one becomes the
    running sum instead of being copied.
    """
    it = iter(tensors)
    first = next(it)
    acc = first if fresh else first.clone()
    for t in it:
        acc += t
    return acc


def _mean(ts: Sequence[Tensor]) -> Tensor:
    return accumulate(ts).div_(len(ts))


def _check_fraction(
    name: str, value: float, *, low_open: bool = True, high_open: bool = False
) -> None:
    ok_low = value > 0 if low_open else value >= 0
    ok_high = value < 1 if high_open else value <= 1
    if not (ok_low and ok_high):
        lo = "(0" if low_open else "[0"
        hi = "1)" if high_open else "1]"
        raise ValueError(f"{name} must be in {lo}, {hi}, got {value}")


# --------------------------------------------------------------------------- linear


@register_op("merge", "weight_average")
def weight_average(base: StateDict, experts: Sequence[StateDict]) -> StateDict:
    """Mean of the expert weights (model soup / uniform averaging)."""
    return merge_per_key(base, experts, lambda _k, _b, ts: _mean(ts))


@register_op("merge", "task_arithmetic", searchable=("coefficient",))
def task_arithmetic(
    base: StateDict, experts: Sequence[StateDict], *, coefficient: float = 1.0
) -> StateDict:
    """Task arithmetic: θ_0 + coefficient · Σ_i τ_i."""

    def combine(_key: str, b: Tensor, ts: list[Tensor]) -> Tensor:
        return accumulate((t - b for t in ts), fresh=True).mul_(coefficient).add_(b)

    return merge_per_key(base, experts, combine)


# --------------------------------------------------------------------------- TIES / DARE


def trim_top_k(tv: Tensor, k: float) -> Tensor:
    """Zero all but the ``max(1, int(k · numel))`` largest-magnitude entries of ``tv``.

    Keeps exactly that many entries (like mergekit's ``magnitude`` sparsification; the original
    TIES code keeps one more because it thresholds at the k-th value inclusively).
    """
    n = tv.numel()
    keep = n if k >= 1 else max(1, int(k * n))
    if keep >= n:
        return tv
    flat = tv.reshape(-1)
    mask = torch.zeros(n, dtype=torch.bool, device=tv.device)
    mask[flat.abs().topk(keep, sorted=False).indices] = True
    return (flat * mask).view_as(tv)


def elect_sign_disjoint_mean(tvs: Tensor, *, inplace: bool = False) -> Tensor:
    """TIES sign election and disjoint merge over stacked task vectors ``[N, ...]``.

    The elected sign of an entry is the sign of the sum of the (trimmed) task vectors there,
    i.e. the sign carrying more total mass; entries whose sum is exactly zero take the tensor's
    majority sign (as the reference TIES code does). The merged value is the mean over the
    task vectors whose entry is nonzero and agrees with the elected sign (zero if none does).
    With ``inplace`` the disagreeing entries of ``tvs`` are zeroed in place to save memory.
    """
    sign = torch.sign(tvs.sum(0))
    sign[sign == 0] = torch.sign(sign.sum())
    agree = torch.where(sign > 0, tvs > 0, tvs < 0)
    count = agree.sum(0).clamp_(min=1)
    selected = tvs.mul_(agree) if inplace else tvs * agree
    return selected.sum(0).div_(count)


def _stacked(ts: Sequence[Tensor], make: Callable[[int, Tensor], Tensor]) -> Tensor:
    """``torch.stack([make(i, t) for ...])`` filled one row at a time."""
    out = torch.empty((len(ts), *ts[0].shape), dtype=ts[0].dtype, device=ts[0].device)
    for i, t in enumerate(ts):
        out[i] = make(i, t)
    return out


@register_op("merge", "ties", searchable=("coefficient", "k"))
def ties(
    base: StateDict, experts: Sequence[StateDict], *, k: float = 0.2, coefficient: float = 1.0
) -> StateDict:
    """TIES-Merging: trim each task vector to its top-k fraction by magnitude (per tensor), elect
    signs by mass, take the disjoint mean of agreeing entries: θ_0 + coefficient · merged."""
    _check_fraction("k", k)

    def combine(_key: str, b: Tensor, ts: list[Tensor]) -> Tensor:
        tvs = _stacked(ts, lambda _i, t: trim_top_k(t - b, k))
        return elect_sign_disjoint_mean(tvs, inplace=True).mul_(coefficient).add_(b)

    return merge_per_key(base, experts, combine)


def key_seed(seed: int, key: str, index: int) -> int:
    """A 63-bit generator seed derived from (seed, tensor name, expert index), stable across runs."""
    digest = hashlib.blake2b(f"{seed}\x00{key}\x00{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def dare(tv: Tensor, drop_rate: float, seed: int) -> Tensor:
    """DARE: drop each entry with probability ``drop_rate``, rescale the kept ones by 1/(1−p)."""
    if drop_rate == 0:
        return tv
    gen = torch.Generator(device="cpu").manual_seed(seed)
    keep = (torch.rand(tv.shape, generator=gen) >= drop_rate).to(tv.device)
    return tv * keep / (1.0 - drop_rate)


@register_op("merge", "dare_linear", searchable=("coefficient", "drop_rate"))
def dare_linear(
    base: StateDict,
    experts: Sequence[StateDict],
    *,
    drop_rate: float = 0.5,
    coefficient: float = 1.0,
    seed: int = 0,
) -> StateDict:
    """DARE then task arithmetic: θ_0 + coefficient · Σ_i DARE(τ_i)."""
    _check_fraction("drop_rate", drop_rate, low_open=False, high_open=True)

    def combine(key: str, b: Tensor, ts: list[Tensor]) -> Tensor:
        tvs = (dare(t - b, drop_rate, key_seed(seed, key, i)) for i, t in enumerate(ts))
        return accumulate(tvs, fresh=True).mul_(coefficient).add_(b)

    return merge_per_key(base, experts, combine)


@register_op("merge", "dare_ties", searchable=("coefficient", "drop_rate"))
def dare_ties(
    base: StateDict,
    experts: Sequence[StateDict],
    *,
    drop_rate: float = 0.5,
    coefficient: float = 1.0,
    seed: int = 0,
) -> StateDict:
    """DARE, then TIES sign election and disjoint mean (no magnitude trimming, as mergekit's
    ``dare_ties``): θ_0 + coefficient · merged."""
    _check_fraction("drop_rate", drop_rate, low_open=False, high_open=True)

    def combine(key: str, b: Tensor, ts: list[Tensor]) -> Tensor:
        tvs = _stacked(ts, lambda i, t: dare(t - b, drop_rate, key_seed(seed, key, i)))
        return elect_sign_disjoint_mean(tvs, inplace=True).mul_(coefficient).add_(b)

    return merge_per_key(base, experts, combine)


# --------------------------------------------------------------------------- SVD-based


def _orthogonalize(m: Tensor) -> Tensor:
    """The nearest matrix with orthonormal columns (or rows, if wide): P Qᵀ from m = P Σ Qᵀ."""
    p, _, qh = torch.linalg.svd(m, full_matrices=False)
    return p @ qh


def tsv_matrix(tvs: Sequence[Tensor], rank_fraction: float) -> Tensor:
    """TSV-Merge of 2-D task vectors: Û diag(σ) V̂ᵀ from each task's top singular triplets.

    Each task keeps its top ``max(1, int(rank_fraction · min(m, n)))`` singular components
    (components with zero singular value are dropped: their vectors are arbitrary and would
    only perturb the orthogonalisation). The concatenated left and right singular vectors are
    replaced by their nearest orthonormal matrices, which removes the overlap between tasks'
    subspaces.
    """
    us, ss, vhs = [], [], []
    for tv in tvs:
        u, s, vh = torch.linalg.svd(tv, full_matrices=False)
        k = max(1, int(rank_fraction * s.numel()))
        keep = s[:k] > s[0] * torch.finfo(s.dtype).eps * max(tv.shape)
        us.append(u[:, :k][:, keep])
        ss.append(s[:k][keep])
        vhs.append(vh[:k][keep])
    s_cat = torch.cat(ss)
    if s_cat.numel() == 0:
        return torch.zeros_like(tvs[0])
    u_orth = _orthogonalize(torch.cat(us, dim=1))
    vh_orth = _orthogonalize(torch.cat(vhs, dim=0))
    return (u_orth * s_cat) @ vh_orth


@register_op("merge", "tsv", searchable=("coefficient", "rank_fraction"))
def tsv(
    base: StateDict,
    experts: Sequence[StateDict],
    *,
    rank_fraction: float | None = None,
    coefficient: float = 1.0,
) -> StateDict:
    """Task Singular Vectors merge (TSV-M, Gargiulo et al. 2025): θ_0 + coefficient · merged.

    2-D tensors are merged with ``tsv_matrix`` keeping ``rank_fraction`` (default 1/N) of each
    task's singular components; other tensors (biases, norms, conv kernels) take the mean task
    vector, as the reference implementation does.
    """
    frac = 1.0 / len(experts) if rank_fraction is None else rank_fraction
    _check_fraction("rank_fraction", frac)

    def combine(_key: str, b: Tensor, ts: list[Tensor]) -> Tensor:
        tvs = [t - b for t in ts]
        merged = tsv_matrix(tvs, frac) if b.dim() == 2 else _mean(tvs)
        return b + coefficient * merged

    return merge_per_key(base, experts, combine)


def low_rank(m: Tensor, rank: int) -> Tensor:
    """Best rank-``rank`` approximation of a 2-D tensor (truncated SVD)."""
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    return (u[:, :rank] * s[:rank]) @ vh[:rank]


@register_op("merge", "cart", searchable=("coefficient", "rank_fraction"))
def cart(
    base: StateDict,
    experts: Sequence[StateDict],
    *,
    rank_fraction: float = 0.16,
    coefficient: float = 1.0,
) -> StateDict:
    """CART (Choi et al. 2024, "Revisiting Weight Averaging for Model Merging").

    merged = θ_avg + coefficient · Σ_i LR_k(θ_i − θ_avg), with θ_avg the mean of the experts
    (= θ_0 + τ̄) and LR_k the truncated SVD keeping k = ceil(rank_fraction · min(m, n))
    components, applied to each centred task vector separately (the sum of the centred vectors
    is zero, so truncating their sum would give plain averaging). Tensors that are not 2-D get
    θ_avg, since their centred vectors sum to zero. With two experts the centred vectors are
    opposite and CART reduces to weight averaging.
    """
    _check_fraction("rank_fraction", rank_fraction)

    def combine(_key: str, b: Tensor, ts: list[Tensor]) -> Tensor:
        avg = _mean(ts)
        if b.dim() != 2:
            return avg
        k = max(1, math.ceil(rank_fraction * min(b.shape)))
        return avg + coefficient * sum(low_rank(t - avg, k) for t in ts)

    return merge_per_key(base, experts, combine)


# --------------------------------------------------------------------------- RegMean


def _shrink_off_diagonal(gram: Tensor, alpha: float) -> Tensor:
    return alpha * gram + (1 - alpha) * torch.diag_embed(torch.diagonal(gram))


def regmean_linear(
    weights: Sequence[Tensor], grams: Sequence[Tensor], *, alpha: float = 0.95
) -> Tensor:
    """RegMean for one Linear weight ``[out, in]``: the W minimising Σ_i ‖X_i Wᵀ − X_i W_iᵀ‖².

    With input Gram matrices G_i = X_iᵀX_i (off-diagonals scaled by ``alpha``), the solution is
    W = (Σ_i W_i G_i)(Σ_i G_i)⁻¹ (the paper's (ΣG_i)⁻¹ Σ G_i W_i for weights stored ``[in, out]``).
    Solved in float64; if Σ G_i is singular (an input feature never active), a tiny ridge pulls
    the unconstrained directions to the mean weight. Returns the dtype of ``weights[0]``.
    """
    if len(weights) != len(grams) or not weights:
        raise ValueError(
            f"need one Gram matrix per weight, got {len(weights)} weights and {len(grams)} grams"
        )
    _check_fraction("alpha", alpha, low_open=False)
    n_in = weights[0].shape[1]
    for i, (w, g) in enumerate(zip(weights, grams, strict=True)):
        if w.dim() != 2 or tuple(g.shape) != (n_in, n_in) or w.shape != weights[0].shape:
            raise ValueError(
                f"weight {i} has shape {tuple(w.shape)} and Gram {tuple(g.shape)}; "
                f"expected {tuple(weights[0].shape)} and ({n_in}, {n_in})"
            )
    gs = [_shrink_off_diagonal(g.double(), alpha) for g in grams]
    ws = [w.double() for w in weights]
    g_sum = sum(gs)
    rhs = sum(w @ g for w, g in zip(ws, gs, strict=True))
    chol, info = torch.linalg.cholesky_ex(g_sum)
    if info.item() != 0:
        eps = 1e-8 * max(torch.diagonal(g_sum).abs().max().item(), 1e-30)
        g_sum = g_sum + eps * torch.eye(n_in, dtype=g_sum.dtype, device=g_sum.device)
        rhs = rhs + eps * torch.stack(ws).mean(0)
        chol = torch.linalg.cholesky(g_sum)
    # W Σ G = rhs with Σ G symmetric  <=>  Σ G Wᵀ = rhsᵀ
    return torch.cholesky_solve(rhs.T, chol).T.to(weights[0].dtype)


@register_op("merge", "regmean", searchable=("coefficient", "alpha"), traits=("grams",))
def regmean(
    base: StateDict,
    experts: Sequence[StateDict],
    *,
    grams: Sequence[Mapping[str, Tensor]] | None = None,
    alpha: float = 0.95,
    coefficient: float = 1.0,
) -> StateDict:
    """RegMean (Jin et al. 2023): θ_0 + coefficient · (R − θ_0).

    ``grams[i]`` maps state-dict weight keys of expert i to its input Gram matrix (see
    ``collect_linear_grams`` and ``grams_by_weight_key``). For 2-D keys with grams, R is
    ``regmean_linear``; every other key takes the mean of the experts.
    """
    if grams is None:
        raise ValueError(
            "merge/regmean needs one dict of input Gram matrices per expert (grams=...)"
        )
    if len(grams) != len(experts):
        raise ValueError(f"merge/regmean got {len(grams)} Gram dicts for {len(experts)} experts")

    def combine(key: str, b: Tensor, ts: list[Tensor]) -> Tensor:
        have = [key in g for g in grams]
        if any(have) and not all(have):
            raise ValueError(f"key {key!r} has Gram matrices for only some experts")
        if all(have) and b.dim() == 2:
            r = regmean_linear(ts, [g[key].to(b.device) for g in grams], alpha=alpha).float()
        else:
            r = _mean(ts)
        return b + coefficient * (r - b)

    return merge_per_key(base, experts, combine)


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
