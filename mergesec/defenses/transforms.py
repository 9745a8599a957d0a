"""Function-preserving reparameterisations of one transformer layer, shared by defenses and attacks.

A layer is read into ``LayerParts`` (float64 standard ``[out, in]`` matrices and biases). The
transforms below act on it and keep the layer's function exactly (in exact arithmetic):

- ``apply_qk(parts, layout, M)``: per key/value head ``g``, every query head ``h`` of the group gets
  ``Q_h ← M_g Q_h`` and the key head ``K_g ← M_g^{-T} K_g`` (biases alike), so ``Q_hᵀK_g`` is
  unchanged. With rotary embeddings ``M_g`` must commute with every rotation of each rotary pair,
  i.e. act on the pair ``(i, i + head_dim/2)`` as a scaled rotation ``a·I + b·J`` (a complex
  scalar); ``rope_pair_matrix`` builds those.
- ``apply_vo(parts, layout, N)``: ``V_g ← N_g V_g`` and ``O[:, h] ← O[:, h] N_g^{-1}`` for the query
  heads of group ``g``; any invertible ``N_g`` works, rotary embeddings or not.
- ``permute_heads``: reorders whole key/value groups together with their query heads, and query
  heads within a group (Q/K/V rows by head blocks, O columns by head blocks).
- ``permute_mlp``: reorders MLP hidden units (MLP-in and gate rows and biases, MLP-out columns).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass, field

import torch

from mergesec.models.layout import TransformerLayout

F64 = torch.float64


@dataclass
class LayerParts:
    """One layer's weights (``[out, in]``) and biases (``None`` where absent), in float64."""

    w: dict[str, torch.Tensor] = field(default_factory=dict)
    b: dict[str, torch.Tensor | None] = field(default_factory=dict)

    def copy(self) -> LayerParts:
        return LayerParts(dict(self.w), dict(self.b))


def read_layer(
    sd: Mapping[str, torch.Tensor],
    layout: TransformerLayout,
    layer: int,
    parts: tuple[str, ...] | None = None,
    device: str | torch.device = "cpu",
) -> LayerParts:
    """Read a layer's parts from ``sd`` as float64 tensors on ``device``."""
    out = LayerParts()
    for part in parts or layout.parts:
        w, b = layout.read(sd, layer, part)
        out.w[part] = w.detach().to(device=device, dtype=F64)
        out.b[part] = None if b is None else b.detach().to(device=device, dtype=F64)
    return out


def write_layer(
    sd: MutableMapping[str, torch.Tensor], layout: TransformerLayout, layer: int, parts: LayerParts
) -> None:
    """Write ``parts`` back into ``sd`` (on CPU, in each replaced tensor's dtype)."""
    for part, w in parts.w.items():
        b = parts.b.get(part)
        layout.write(sd, layer, part, w.cpu(), None if b is None else b.cpu())


# ---- head views ------------------------------------------------------------------------------
def split_rows(w: torch.Tensor, head_dim: int) -> torch.Tensor:
    """``[H*hd, in] -> [H, hd, in]`` (a view)."""
    return w.reshape(-1, head_dim, w.shape[-1])


def split_cols(o: torch.Tensor, head_dim: int) -> torch.Tensor:
    """``[out, H*hd] -> [H, out, hd]``."""
    return o.reshape(o.shape[0], -1, head_dim).permute(1, 0, 2)


def join_cols(oh: torch.Tensor) -> torch.Tensor:
    """``[H, out, hd] -> [out, H*hd]``."""
    return oh.permute(1, 0, 2).reshape(oh.shape[1], -1)


def apply_rows(
    w: torch.Tensor, b: torch.Tensor | None, mats: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per head block ``h``: ``w_h ← mats[h] @ w_h`` and ``b_h ← mats[h] @ b_h``."""
    hd = mats.shape[-1]
    nw = (mats @ split_rows(w, hd)).reshape(w.shape)
    nb = None if b is None else (mats @ b.reshape(-1, hd, 1)).reshape(b.shape)
    return nw, nb


def apply_cols(o: torch.Tensor, mats: torch.Tensor) -> torch.Tensor:
    """Per head block ``h`` of columns: ``o[:, h] ← o[:, h] @ mats[h]``."""
    return join_cols(split_cols(o, mats.shape[-1]) @ mats)


def group_of(layout: TransformerLayout) -> torch.Tensor:
    """Key/value head index of every query head."""
    return torch.arange(layout.num_heads) // layout.group_size


def apply_qk(parts: LayerParts, layout: TransformerLayout, m: torch.Tensor) -> LayerParts:
    """``Q_h ← M_g Q_h``, ``K_g ← M_g^{-T} K_g`` with ``m`` of shape ``[num_kv_heads, hd, hd]``."""
    out = parts.copy()
    m = m.to(parts.w["q"])
    out.w["q"], out.b["q"] = apply_rows(parts.w["q"], parts.b["q"], m[group_of(layout)])
    out.w["k"], out.b["k"] = apply_rows(parts.w["k"], parts.b["k"], torch.linalg.inv(m).mT)
    return out


def apply_vo(parts: LayerParts, layout: TransformerLayout, n: torch.Tensor) -> LayerParts:
    """``V_g ← N_g V_g``, ``O[:, h] ← O[:, h] N_g^{-1}`` with ``n`` of shape ``[num_kv_heads, hd, hd]``."""
    out = parts.copy()
    n = n.to(parts.w["v"])
    out.w["v"], out.b["v"] = apply_rows(parts.w["v"], parts.b["v"], n)
    out.w["o"] = apply_cols(parts.w["o"], torch.linalg.inv(n)[group_of(layout)])
    return out


def permute_heads(
    parts: LayerParts, layout: TransformerLayout, q_perm: torch.Tensor, kv_perm: torch.Tensor
) -> LayerParts:
    """New query head ``h`` is old head ``q_perm[h]``; new key/value head ``g`` is old ``kv_perm[g]``.

    Function-preserving when ``q_perm[h] // group_size == kv_perm[h // group_size]``.
    """
    q_perm, kv_perm = q_perm.cpu(), kv_perm.cpu()
    if not torch.equal(q_perm // layout.group_size, kv_perm[group_of(layout)]):
        raise ValueError("head permutation splits a key/value group from its query heads")
    hd = layout.head_dim
    out = parts.copy()

    def rows(part: str, perm: torch.Tensor) -> None:
        w, b = parts.w[part], parts.b[part]
        out.w[part] = split_rows(w, hd)[perm].reshape(w.shape)
        out.b[part] = None if b is None else b.reshape(-1, hd)[perm].reshape(b.shape)

    rows("q", q_perm)
    rows("k", kv_perm)
    rows("v", kv_perm)
    out.w["o"] = join_cols(split_cols(parts.w["o"], hd)[q_perm])
    return out


def random_head_permutation(
    layout: TransformerLayout, g: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """A random function-preserving head order: groups shuffled, query heads shuffled within."""
    gs = layout.group_size
    kv_perm = torch.randperm(layout.num_kv_heads, generator=g)
    q_perm = torch.cat([kv * gs + torch.randperm(gs, generator=g) for kv in kv_perm.tolist()])
    return q_perm, kv_perm


def permute_mlp(parts: LayerParts, perm: torch.Tensor) -> LayerParts:
    """New hidden unit ``i`` is old unit ``perm[i]``."""
    out = parts.copy()
    perm = perm.to(parts.w["mlp_in"].device)
    for part in ("mlp_in", "gate"):
        if part in parts.w:
            out.w[part] = parts.w[part][perm]
            b = parts.b[part]
            out.b[part] = None if b is None else b[perm]
    out.w["mlp_out"] = parts.w["mlp_out"][:, perm]
    return out


def mlp_unit_features(parts: LayerParts, use_gate: bool = True) -> torch.Tensor:
    """Each hidden unit's incoming rows, biases and outgoing column, side by side: ``[n, f]``."""
    cols = [parts.w["mlp_in"]]
    if parts.b.get("mlp_in") is not None:
        cols.append(parts.b["mlp_in"][:, None])
    if use_gate and "gate" in parts.w:
        cols.append(parts.w["gate"])
        if parts.b.get("gate") is not None:
            cols.append(parts.b["gate"][:, None])
    cols.append(parts.w["mlp_out"].t())
    return torch.cat(cols, dim=1)


# ---- random matrices -------------------------------------------------------------------------
def uniform(lo: float, hi: float, shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(shape, generator=g, dtype=F64)


def log_uniform(lo: float, hi: float, shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    return torch.exp(uniform(math.log(lo), math.log(hi), shape, g))


def random_orthogonal(batch: int, n: int, g: torch.Generator) -> torch.Tensor:
    """Haar-distributed orthogonal matrices ``[batch, n, n]``."""
    q, r = torch.linalg.qr(torch.randn(batch, n, n, generator=g, dtype=F64))
    return q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)


def random_permutation_matrix(batch: int, n: int, g: torch.Generator) -> torch.Tensor:
    eye = torch.eye(n, dtype=F64)
    return torch.stack([eye[torch.randperm(n, generator=g)] for _ in range(batch)])


def rope_pair_matrix(re: torch.Tensor, im: torch.Tensor) -> torch.Tensor:
    """``[..., hd/2]`` complex coefficients ``re + i·im`` -> ``[..., hd, hd]`` real matrices.

    Dimension pair ``(i, i + hd/2)`` (HF ``rotate_half``) is multiplied by ``re_i + i·im_i``:
    ``[[re, -im], [im, re]]`` on ``(x_i, x_{i+hd/2})``. These commute with rotary embeddings.
    """
    half = re.shape[-1]
    m = torch.zeros(*re.shape[:-1], 2 * half, 2 * half, dtype=re.dtype, device=re.device)
    idx = torch.arange(half, device=re.device)
    m[..., idx, idx] = re
    m[..., idx + half, idx + half] = re
    m[..., idx, idx + half] = -im
    m[..., idx + half, idx] = im
    return m


def random_rope_qk(
    batch: int, head_dim: int, scale_min: float, scale_max: float, g: torch.Generator
) -> torch.Tensor:
    """Random rotary-compatible Q/K matrices: per pair a random rotation times a log-U scale."""
    half = head_dim // 2
    s = log_uniform(scale_min, scale_max, (batch, half), g)
    phi = uniform(0.0, 2 * math.pi, (batch, half), g)
    return rope_pair_matrix(s * torch.cos(phi), s * torch.sin(phi))


# ---- checks ----------------------------------------------------------------------------------
def check_same_shapes(
    a: Mapping[str, torch.Tensor],
    b: Mapping[str, torch.Tensor],
    a_name: str,
    b_name: str,
    keys: list[str] | None = None,
) -> None:
    """``ValueError`` naming the first key whose presence or shape differs between ``a`` and ``b``."""

    def shape(sd: Mapping[str, torch.Tensor], k: str) -> str:
        if k not in sd:
            return "missing"
        lazy_shape = getattr(sd, "shape", None)  # LazyStateDict reads shapes without the data
        return str(tuple(lazy_shape(k) if callable(lazy_shape) else sd[k].shape))

    if keys is None:
        keys = list(a) + [k for k in b if k not in a]
    for k in keys:
        sa, sb = shape(a, k), shape(b, k)
        if sa != sb:
            raise ValueError(
                f"{b_name} does not match the {a_name} at '{k}': "
                f"{a_name} shape {sa}, {b_name} shape {sb}"
            )
