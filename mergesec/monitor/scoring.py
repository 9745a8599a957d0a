"""Monitoring: per-input cosine extremes along weight directions, and calibrated range checks.

A monitored input is summarised, for every direction ``u`` of layer ``l``, by the minimum and
maximum over its valid tokens of ``cos(h_{l+1,t}, u)``, where ``h_{l+1}`` is the residual stream
after block ``l`` (``hidden_states[l + 1]`` of a Hugging Face forward pass). A ``Calibration``
holds the range those extremes span on benign inputs; an input is flagged when any extreme leaves
that range (both sides are checked, which also removes the sign ambiguity of singular vectors).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from safetensors import safe_open

from mergesec.models.state_dict import save_state_dict
from mergesec.monitor.directions import Directions

ROLE_NAMES = ("user", "assistant")


@dataclass(frozen=True)
class Columns:
    """What each score column is: a direction, optionally restricted to one token role.

    ``names`` are ``L{l}.{writer}.u{i}``, or ``L{l}.{writer}.u{i}@{role}`` for role-split scores;
    ``layers`` and ``rows`` locate the direction in ``Directions.vectors``; ``roles`` is the role
    index (``-1`` when roles are not split).
    """

    names: list[str]
    layers: torch.Tensor
    rows: torch.Tensor
    roles: torch.Tensor
    num_layers: int
    role_names: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.names)

    def index(self, name: str) -> int:
        return self.names.index(name)

    def same_as(self, other: Columns) -> bool:
        return self.names == other.names and self.num_layers == other.num_layers

    def to_json(self) -> str:
        return json.dumps(
            {
                "names": self.names,
                "layers": self.layers.tolist(),
                "rows": self.rows.tolist(),
                "roles": self.roles.tolist(),
                "num_layers": self.num_layers,
                "role_names": list(self.role_names),
            }
        )

    @classmethod
    def from_json(cls, text: str) -> Columns:
        d = json.loads(text)
        return cls(
            d["names"],
            torch.tensor(d["layers"], dtype=torch.long),
            torch.tensor(d["rows"], dtype=torch.long),
            torch.tensor(d["roles"], dtype=torch.long),
            d["num_layers"],
            tuple(d["role_names"]),
        )


@dataclass(frozen=True)
class DirectionScores:
    """Per input and column, the min and max token cosine (``[n_inputs, n_columns]`` each).

    An input with no valid token of a column's role has ``min = +inf`` and ``max = -inf``, so it
    neither moves a calibration range nor gets flagged.
    """

    min: torch.Tensor
    max: torch.Tensor
    columns: Columns

    def __len__(self) -> int:
        return self.min.shape[0]

    @staticmethod
    def cat(parts: Sequence[DirectionScores]) -> DirectionScores:
        """Stack scores of several batches (same columns) along the input axis."""
        if not parts:
            raise ValueError("nothing to concatenate")
        cols = parts[0].columns
        if any(not p.columns.same_as(cols) for p in parts):
            raise ValueError("scores were computed for different directions")
        return DirectionScores(
            torch.cat([p.min for p in parts]), torch.cat([p.max for p in parts]), cols
        )

    def subset(self, index: torch.Tensor | Sequence[int] | slice) -> DirectionScores:
        """The scores of some inputs."""
        return DirectionScores(self.min[index], self.max[index], self.columns)


def token_cosines(hidden: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    """``cos(h_t, u_j)`` for hidden ``[..., hidden]`` and unit rows ``[n, hidden]`` → ``[..., n]``."""
    h = hidden.float()
    u = vectors.to(device=h.device, dtype=torch.float32)
    return (h @ u.T) / h.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def direction_cosines(
    hidden_states: Sequence[torch.Tensor],
    directions: Directions,
    attention_mask: torch.Tensor | None = None,
    *,
    role_mask: torch.Tensor | None = None,
    role_names: Sequence[str] = ROLE_NAMES,
) -> DirectionScores:
    """Min and max over valid tokens of ``cos(h_{l+1,t}, u)`` for every direction ``u`` of layer ``l``.

    ``hidden_states`` is the ``num_layers + 1`` list of ``[batch, seq, hidden]`` residual states
    (embeddings first), as ``output_hidden_states=True`` or ``monitor_forward`` returns it;
    ``attention_mask`` ``[batch, seq]`` marks valid tokens (all valid when ``None``).

    With ``role_mask`` (``[batch, seq]`` ints, ``0`` = user, ``1`` = assistant, indices into
    ``role_names``), each direction gets one column per role, extremes taken over that role's
    tokens only; columns are role-major (all user columns, then all assistant columns).
    """
    if len(hidden_states) < directions.num_layers + 1:
        raise ValueError(
            f"{len(hidden_states)} hidden states for {directions.num_layers} layers; "
            "expected the embeddings plus one per layer"
        )
    batch, seq = hidden_states[0].shape[:2]
    valid = (
        torch.ones(batch, seq, dtype=torch.bool)
        if attention_mask is None
        else attention_mask.to(torch.bool).cpu()
    )
    masks = [valid]
    if role_mask is not None:
        roles = role_mask.cpu()
        masks = [valid & (roles == r) for r in range(len(role_names))]

    mins: list[list[torch.Tensor]] = [[] for _ in masks]
    maxs: list[list[torch.Tensor]] = [[] for _ in masks]
    for layer in directions.layers:
        cos = token_cosines(hidden_states[layer + 1], directions.vectors[layer]).cpu()
        for r, m in enumerate(masks):
            if bool(m.all()):
                lo, hi = torch.aminmax(cos, dim=1)
            else:
                keep = m[..., None]
                lo = cos.masked_fill(~keep, float("inf")).amin(dim=1)
                hi = cos.masked_fill(~keep, float("-inf")).amax(dim=1)
            mins[r].append(lo)
            maxs[r].append(hi)

    names, layers, rows, role_idx = [], [], [], []
    for r in range(len(masks)):
        for layer in directions.layers:
            for i, name in enumerate(directions.names[layer]):
                names.append(name if role_mask is None else f"{name}@{role_names[r]}")
                layers.append(layer)
                rows.append(i)
                role_idx.append(-1 if role_mask is None else r)
    cols = Columns(
        names,
        torch.tensor(layers, dtype=torch.long),
        torch.tensor(rows, dtype=torch.long),
        torch.tensor(role_idx, dtype=torch.long),
        directions.num_layers,
        tuple(role_names) if role_mask is not None else (),
    )
    empty = torch.empty(batch, 0)
    return DirectionScores(
        torch.cat([t for per_role in mins for t in per_role], dim=1) if names else empty,
        torch.cat([t for per_role in maxs for t in per_role], dim=1) if names else empty,
        cols,
    )


@torch.no_grad()
def monitor_forward(
    model: torch.nn.Module,
    batch: Mapping[str, torch.Tensor],
    *,
    blocks: Sequence[torch.nn.Module] | None = None,
) -> list[torch.Tensor]:
    """One forward pass of ``model(**batch)`` returning the residual stream after every block.

    Without ``blocks`` this is ``output_hidden_states=True`` (works for encoders such as
    ``BertModel`` and for causal LMs; note that Hugging Face decoders replace the last entry by
    the final-norm output). With ``blocks`` (the per-layer modules, ``layout.block_modules``), the
    states are read by hooks: the input of block 0, then each block's output, so the last entry
    is the pre-norm residual, and any ``SteeringHooks`` registered earlier are already applied.
    """
    if blocks is None:
        out = model(**batch, output_hidden_states=True)
        return list(out.hidden_states)

    captured: list[torch.Tensor | None] = [None] * (len(blocks) + 1)

    def pre_hook(module, args, kwargs):
        captured[0] = args[0] if args else kwargs["hidden_states"]

    def make_hook(i: int):
        def hook(module, args, output):
            captured[i + 1] = output[0] if isinstance(output, tuple) else output

        return hook

    handles = [blocks[0].register_forward_pre_hook(pre_hook, with_kwargs=True)]
    handles += [b.register_forward_hook(make_hook(i)) for i, b in enumerate(blocks)]
    try:
        model(**batch)
    finally:
        for h in handles:
            h.remove()
    missing = [i for i, c in enumerate(captured) if c is None]
    if missing:
        raise RuntimeError(f"blocks did not run during the forward pass: states {missing}")
    return captured  # type: ignore[return-value]


def score_inputs(
    model: torch.nn.Module,
    batch: Mapping[str, torch.Tensor],
    directions: Directions,
    *,
    blocks: Sequence[torch.nn.Module] | None = None,
    role_mask: torch.Tensor | None = None,
) -> DirectionScores:
    """``monitor_forward`` then ``direction_cosines`` with the batch's attention mask."""
    states = monitor_forward(model, batch, blocks=blocks)
    return direction_cosines(states, directions, batch.get("attention_mask"), role_mask=role_mask)


@dataclass
class Calibration:
    """The benign range of every score column, kept as a running min/max (optionally trimmed).

    ``lower[j]``/``upper[j]`` are the smallest per-input minimum and the largest per-input maximum
    seen on benign inputs, or, with ``trim_percentile = p > 0``, the p-th percentile of the
    per-input minima and the (100 − p)-th percentile of the per-input maxima (to trade a few
    benign flags for tighter ranges). Every benign input's extremes are kept (``history_*``) so
    ``update`` can refit percentiles. Columns of the last ``drop_last_layers`` layers never flag:
    the released code drops them for numerical stability, and in Hugging Face decoders the last
    hidden state is taken after the final norm. A column never observed (a role absent from all
    benign inputs) has the empty range ``[+inf, -inf]``: any value there is new and flags.
    """

    columns: Columns
    history_min: torch.Tensor
    history_max: torch.Tensor
    trim_percentile: float = 0.0
    epsilon: float = 0.0
    drop_last_layers: int = 0
    lower: torch.Tensor = field(init=False)
    upper: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        if not 0.0 <= self.trim_percentile < 50.0:
            raise ValueError(f"trim_percentile must be in [0, 50), got {self.trim_percentile}")
        if self.drop_last_layers < 0:
            raise ValueError("drop_last_layers must be non-negative")
        self._refit()

    @classmethod
    def fit(
        cls,
        scores_benign: DirectionScores,
        *,
        trim_percentile: float = 0.0,
        epsilon: float = 0.0,
        drop_last_layers: int = 0,
    ) -> Calibration:
        """Ranges from benign scores (see the class docstring for the options)."""
        return cls(
            scores_benign.columns,
            scores_benign.min.float().clone(),
            scores_benign.max.float().clone(),
            trim_percentile,
            epsilon,
            drop_last_layers,
        )

    def _refit(self) -> None:
        lo, hi = self.history_min, self.history_max
        n = len(self.columns)
        if lo.shape[0] == 0:
            self.lower = torch.full((n,), float("inf"))
            self.upper = torch.full((n,), float("-inf"))
        elif self.trim_percentile == 0.0:
            self.lower, self.upper = lo.amin(0), hi.amax(0)
        else:
            p = self.trim_percentile / 100.0
            # Absent roles are ±inf; nanquantile skips them, and all-absent columns stay empty.
            lower = torch.nanquantile(torch.where(lo.isfinite(), lo, torch.nan), p, dim=0)
            upper = torch.nanquantile(torch.where(hi.isfinite(), hi, torch.nan), 1.0 - p, dim=0)
            self.lower = torch.nan_to_num(lower, nan=float("inf"))
            self.upper = torch.nan_to_num(upper, nan=float("-inf"))

    @property
    def active(self) -> torch.Tensor:
        """Columns that can flag (``[n_columns]`` bool): those not in the dropped last layers."""
        return self.columns.layers < self.columns.num_layers - self.drop_last_layers

    @property
    def n_seen(self) -> int:
        return self.history_min.shape[0]

    def _check(self, scores: DirectionScores) -> None:
        if not scores.columns.same_as(self.columns):
            raise ValueError("scores were computed for other directions than this calibration")

    def flags(self, scores: DirectionScores) -> torch.Tensor:
        """``[n_inputs, n_columns]``: min below ``lower − ε`` or max above ``upper + ε``."""
        self._check(scores)
        out = (scores.min < self.lower - self.epsilon) | (scores.max > self.upper + self.epsilon)
        return out & self.active

    def detect(self, scores: DirectionScores) -> torch.Tensor:
        """``[n_inputs]``: whether any column of the input is flagged."""
        return self.flags(scores).any(dim=1)

    def flagged_names(self, scores: DirectionScores, i: int) -> list[str]:
        """Names of the columns flagged for input ``i``."""
        f = self.flags(scores.subset(slice(i, i + 1)))[0]
        return [n for n, x in zip(self.columns.names, f.tolist(), strict=True) if x]

    def update(self, scores: DirectionScores) -> torch.Tensor:
        """Add inputs to the running range, one after another; returns first-sight detection.

        Input ``i`` is checked against the range as it stood before it was added (calibration
        plus inputs ``0..i-1``), which is how a live running monitor sees a stream.
        """
        self._check(scores)
        smin, smax = scores.min.float(), scores.max.float()
        if len(scores) == 0:
            return torch.zeros(0, dtype=torch.bool)
        if self.trim_percentile == 0.0:
            # Exclusive running extremes: the range seen before each input.
            prev_lo = torch.cat([self.lower[None], torch.cummin(smin, 0).values[:-1]])
            prev_hi = torch.cat([self.upper[None], torch.cummax(smax, 0).values[:-1]])
            prev_lo = torch.minimum(prev_lo, self.lower)
            prev_hi = torch.maximum(prev_hi, self.upper)
            flags = (smin < prev_lo - self.epsilon) | (smax > prev_hi + self.epsilon)
            detected = (flags & self.active).any(dim=1)
            self.history_min = torch.cat([self.history_min, smin])
            self.history_max = torch.cat([self.history_max, smax])
            self._refit()
            return detected
        detected = torch.zeros(len(scores), dtype=torch.bool)
        for i in range(len(scores)):
            detected[i] = self.detect(scores.subset(slice(i, i + 1)))[0]
            self.history_min = torch.cat([self.history_min, smin[i : i + 1]])
            self.history_max = torch.cat([self.history_max, smax[i : i + 1]])
            self._refit()
        return detected

    def column_margins(self, scores: DirectionScores) -> torch.Tensor:
        """``[n_inputs, n_columns]``: how far each input goes past each column's benign range
        (0 inside it, and for inactive columns).

        A role absent from an input never flags (its column margin is 0); a column no benign
        input ever reached gives an infinite margin where the input has it."""
        self._check(scores)
        below = self.lower - scores.min.float()
        above = scores.max.float() - self.upper
        m = torch.maximum(below.nan_to_num(0.0), above.nan_to_num(0.0)).clamp_min(0.0)
        return torch.where(self.active, m, torch.zeros_like(m))

    def margins(self, scores: DirectionScores) -> torch.Tensor:
        """``[n_inputs]``: the smallest ε at which each input would not be flagged (0 in range);
        the largest of its ``column_margins``."""
        return self.column_margins(scores).amax(dim=1)

    def with_options(self, **options: float | int) -> Calibration:
        """A copy with other ``trim_percentile``/``epsilon``/``drop_last_layers``, refitted."""
        return replace(self, **options)

    def layer_bounds(
        self, layer: int, role: str | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(rows, lower, upper)`` of the active columns of one layer (and role).

        ``rows`` index ``Directions.vectors[layer]``; empty when the layer is dropped or has no
        directions. For role-split calibrations ``role`` names the role to use.
        """
        cols = self.columns
        sel = (cols.layers == layer) & self.active
        if cols.role_names:
            if role is None:
                raise ValueError(f"this calibration is split by role {cols.role_names}; name one")
            sel &= cols.roles == cols.role_names.index(role)
        idx = sel.nonzero().flatten()
        return cols.rows[idx], self.lower[idx], self.upper[idx]

    def save(self, path: str | Path) -> None:
        """Write the calibration (benign history and options) to one safetensors file."""
        meta = {
            "columns": self.columns.to_json(),
            "trim_percentile": str(self.trim_percentile),
            "epsilon": str(self.epsilon),
            "drop_last_layers": str(self.drop_last_layers),
        }
        save_state_dict(
            {"history_min": self.history_min, "history_max": self.history_max}, path, metadata=meta
        )

    @classmethod
    def load(cls, path: str | Path) -> Calibration:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
            hmin, hmax = f.get_tensor("history_min"), f.get_tensor("history_max")
        return cls(
            Columns.from_json(meta["columns"]),
            hmin,
            hmax,
            float(meta["trim_percentile"]),
            float(meta["epsilon"]),
            int(meta["drop_last_layers"]),
        )


def epsilon_for_fpr(margins: torch.Tensor, target_fpr: float) -> float:
    """The smallest ε at which at most ``target_fpr`` of the held-out benign inputs whose
    ``margins`` are given would be flagged (``Calibration.margins``): the ``k+1``-th largest
    margin, ``k = ⌊target_fpr · n⌋`` (0 when ``k ≥ n``; inf when that margin is infinite)."""
    if not 0.0 <= target_fpr < 1.0:
        raise ValueError(f"target_fpr must be in [0, 1), got {target_fpr}")
    n = margins.numel()
    if n == 0:
        raise ValueError("choosing ε for a target FPR needs held-out benign inputs")
    k = int(target_fpr * n + 1e-9)
    if k >= n:
        return 0.0
    return float(margins.float().sort(descending=True).values[k])
