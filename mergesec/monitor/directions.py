"""Weight-difference directions: the top left singular vectors of each residual writer's ΔW.

For every layer, the two linear maps that write into the residual stream (attention output and
MLP output, each ``[hidden, in]``) are differenced, ``ΔW = W_ft − W_base``, and the top-k left
singular vectors of ΔW are kept. They live in the residual-stream space, so the cosine between
a token's hidden state and one of them says how much of that token's state lies along something
fine-tuning wrote.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from mergesec.models.state_dict import save_state_dict

WriterWeights = Mapping[tuple[int, str], torch.Tensor]


@dataclass(frozen=True)
class Directions:
    """Unit-norm residual-stream directions per layer.

    ``vectors[l]`` is ``[n_l, hidden]`` (rows are directions), ``names[l]`` names its rows
    (``L{l}.{writer}.u{i}``) and ``singular_values[l]`` holds each row's σ. Layers whose writers
    did not change have no entry. ``num_layers`` is the model's layer count, so the last layers
    can be told apart even when they have no directions.
    """

    vectors: dict[int, torch.Tensor]
    names: dict[int, list[str]]
    singular_values: dict[int, torch.Tensor]
    num_layers: int
    hidden_size: int

    @property
    def layers(self) -> list[int]:
        return sorted(self.vectors)

    def flat_names(self) -> list[str]:
        """All direction names, layer by layer, rows in order."""
        return [n for layer in self.layers for n in self.names[layer]]

    def __len__(self) -> int:
        return sum(v.shape[0] for v in self.vectors.values())

    def vector(self, name: str) -> torch.Tensor:
        """The unit vector called ``name``."""
        for layer in self.layers:
            if name in self.names[layer]:
                return self.vectors[layer][self.names[layer].index(name)]
        raise KeyError(name)

    def select(self, names: Iterable[str]) -> Directions:
        """The subset of directions with these names (e.g. the flagged ones)."""
        wanted = set(names)
        unknown = wanted - set(self.flat_names())
        if unknown:
            raise KeyError(f"unknown directions: {sorted(unknown)[:5]}")
        vectors, out_names, sv = {}, {}, {}
        for layer in self.layers:
            rows = [i for i, n in enumerate(self.names[layer]) if n in wanted]
            if rows:
                idx = torch.tensor(rows)
                vectors[layer] = self.vectors[layer][idx]
                out_names[layer] = [self.names[layer][i] for i in rows]
                sv[layer] = self.singular_values[layer][idx]
        return Directions(vectors, out_names, sv, self.num_layers, self.hidden_size)

    def save(self, path: str | Path) -> None:
        """Write the directions to one safetensors file (names and sizes in its metadata)."""
        tensors = {}
        for layer in self.layers:
            tensors[f"vectors.{layer}"] = self.vectors[layer]
            tensors[f"singular_values.{layer}"] = self.singular_values[layer]
        meta = {
            "names": json.dumps({str(k): v for k, v in self.names.items()}),
            "num_layers": str(self.num_layers),
            "hidden_size": str(self.hidden_size),
        }
        save_state_dict(tensors, path, metadata=meta)

    @classmethod
    def load(cls, path: str | Path) -> Directions:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
            keys = f.keys()  # a safetensors handle is not iterable
            tensors = {k: f.get_tensor(k) for k in keys}
        names = {int(k): v for k, v in json.loads(meta["names"]).items()}
        return cls(
            vectors={layer: tensors[f"vectors.{layer}"] for layer in names},
            names=names,
            singular_values={layer: tensors[f"singular_values.{layer}"] for layer in names},
            num_layers=int(meta["num_layers"]),
            hidden_size=int(meta["hidden_size"]),
        )


def exact_left_singular(a: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` left singular vectors ``[m, k]`` and values of ``a`` from a full thin SVD."""
    u, s, _ = torch.linalg.svd(a, full_matrices=False)
    return u[:, :k], s[:k]


def randomized_left_singular(
    a: torch.Tensor, k: int, *, oversample: int = 10, n_iter: int = 4, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` left singular vectors and values of ``a`` by a randomized range finder.

    Halko, Martinsson & Tropp (2011), Alg. 4.4: a Gaussian sketch of ``k + oversample`` columns,
    ``n_iter`` power (subspace) iterations re-orthonormalised by QR on both sides, then an exact
    SVD of the small projected matrix. Each power iteration raises the spectrum to a higher odd
    power, so the error along the top-k subspace shrinks like ``(σ_{k+1}/σ_k)^(2·n_iter+1)``.
    The sketch comes from a seeded CPU generator, so results repeat across devices.
    """
    m, n = a.shape
    width = min(k + oversample, m, n)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    omega = torch.randn(n, width, generator=gen, dtype=a.dtype).to(a.device)
    q, _ = torch.linalg.qr(a @ omega)
    for _ in range(n_iter):
        z, _ = torch.linalg.qr(a.T @ q)
        q, _ = torch.linalg.qr(a @ z)
    ub, s, _ = torch.linalg.svd(q.T @ a, full_matrices=False)
    return (q @ ub)[:, :k], s[:k]


def weight_directions(
    base_writers: WriterWeights,
    tuned_writers: WriterWeights,
    *,
    k: int = 20,
    method: str = "exact",
    oversample: int = 10,
    n_iter: int = 4,
    seed: int = 0,
    zero_tol: float = 1e-7,
    rank_tol: float = 1e-5,
    num_layers: int | None = None,
) -> Directions:
    """Top-``k`` left singular vectors of ``ΔW = W_ft − W_base`` for every residual writer.

    ``base_writers``/``tuned_writers`` map ``(layer, writer)`` (e.g. ``(3, "mlp_out")``) to the
    ``[hidden, in]`` weight; a lazy mapping works, since one writer is read and differenced at a
    time, in float32, on the device the tensors are on. ``method`` is ``"exact"`` (a full thin
    ``torch.linalg.svd``, as the released WeightWatch code does) or ``"randomized"`` (see
    ``randomized_left_singular``).

    A writer whose ``‖ΔW‖_F`` is at most ``zero_tol·‖W_base‖_F`` is treated as unchanged and
    skipped; directions whose σ is at most ``rank_tol·σ_1`` are numerical noise of a ΔW whose
    rank is below ``k`` (an exact low-rank update, a small LoRA) and are dropped too, so every
    kept direction is one fine-tuning actually wrote. Returned vectors are float32 on the CPU.
    """
    if method not in ("exact", "randomized"):
        raise ValueError(f"method must be 'exact' or 'randomized', got {method!r}")
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    missing = set(base_writers) ^ set(tuned_writers)
    if missing:
        raise KeyError(f"writers present in only one model: {sorted(missing)[:5]}")

    per_layer: dict[int, list[tuple[str, torch.Tensor, torch.Tensor]]] = {}
    hidden = None
    for layer, writer in base_writers:  # dict order within a layer is kept (attn_out, mlp_out)
        w_base = base_writers[(layer, writer)].float()
        delta = tuned_writers[(layer, writer)].float() - w_base
        if hidden is None:
            hidden = delta.shape[0]
        elif delta.shape[0] != hidden:
            raise ValueError(
                f"({layer}, {writer}): {delta.shape[0]} output rows, expected {hidden}"
            )
        norm = torch.linalg.matrix_norm(delta)
        if norm == 0 or norm <= zero_tol * torch.linalg.matrix_norm(w_base):
            continue
        kk = min(k, *delta.shape)
        if method == "exact":
            u, s = exact_left_singular(delta, kk)
        else:
            u, s = randomized_left_singular(
                delta, kk, oversample=oversample, n_iter=n_iter, seed=seed
            )
        keep = s > rank_tol * s[0]
        per_layer.setdefault(layer, []).append((writer, u[:, keep].T.cpu(), s[keep].cpu()))

    vectors, names, svals = {}, {}, {}
    for layer in sorted(per_layer):
        parts = per_layer[layer]
        vecs = torch.cat([u for _, u, _ in parts])
        vectors[layer] = vecs / vecs.norm(dim=1, keepdim=True)
        names[layer] = [f"L{layer}.{w}.u{i}" for w, u, _ in parts for i in range(u.shape[0])]
        svals[layer] = torch.cat([s for _, _, s in parts])
    n_layers = (
        num_layers
        if num_layers is not None
        else 1 + max((lay for lay, _ in base_writers), default=-1)
    )
    return Directions(vectors, names, svals, n_layers, hidden or 0)


def subspace_sines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Sines of the principal angles between the column spans of ``a`` ``[d, p]`` and ``b`` ``[d, q]``.

    Both are orthonormalised first; the sines come largest first, and the largest is the usual
    subspace distance ``‖P_a − P_b‖₂`` when ``p == q``.
    """
    qa, _ = torch.linalg.qr(a.double())
    qb, _ = torch.linalg.qr(b.double())
    cos = torch.linalg.svdvals(qa.T @ qb).clamp(max=1.0)
    return torch.sqrt(1.0 - cos**2).flip(0)
