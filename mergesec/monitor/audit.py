"""Auditing: which inputs drive each weight direction hardest, written up for reading.

For each direction (score column) the inputs with the highest maximum cosine and those with the
lowest minimum cosine are collected; a reader (or a summarising model) then describes what the
direction responds to. Both ends matter because a singular vector's sign is arbitrary.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from mergesec.monitor.scoring import DirectionScores

Audit = dict[str, dict[str, list[dict[str, Any]]]]


def top_activating(
    scores: DirectionScores,
    texts: Sequence[str],
    *,
    n: int = 5,
    names: Sequence[str] | None = None,
) -> Audit:
    """Per direction, the ``n`` inputs with the highest max cosine and the ``n`` with the lowest min.

    Returns ``{name: {"top": [...], "bottom": [...]}}``, each entry ``{"index", "cosine",
    "text"}``, most extreme first. Inputs without a valid token for the column (absent role)
    are skipped. ``names`` restricts the audit to some columns.
    """
    if len(texts) != len(scores):
        raise ValueError(f"{len(texts)} texts for {len(scores)} scored inputs")
    wanted = set(names) if names is not None else None
    audit: Audit = {}
    for j, name in enumerate(scores.columns.names):
        if wanted is not None and name not in wanted:
            continue
        audit[name] = {
            "top": _extremes(scores.max[:, j], texts, n, largest=True),
            "bottom": _extremes(scores.min[:, j], texts, n, largest=False),
        }
    return audit


def _extremes(
    values: torch.Tensor, texts: Sequence[str], n: int, *, largest: bool
) -> list[dict[str, Any]]:
    idx = values.isfinite().nonzero().flatten()
    if idx.numel() == 0:
        return []
    order = torch.argsort(values[idx], descending=largest, stable=True)[:n]
    return [
        {"index": int(i), "cosine": float(values[i]), "text": texts[int(i)]}
        for i in idx[order].tolist()
    ]


def _cell(text: str, max_chars: int) -> str:
    text = " ".join(text.split())
    if len(text) > max_chars:
        text = text[: max_chars - 1] + "…"
    return text.replace("\\", "\\\\").replace("|", "\\|")


def write_audit_markdown(
    audit: Mapping[str, Mapping[str, Sequence[Mapping[str, Any]]]],
    path: str | Path,
    *,
    title: str = "Weight-direction audit",
    max_chars: int = 300,
) -> Path:
    """Write ``audit`` (from ``top_activating``) as a Markdown page, one section per direction."""
    lines = [f"# {title}", ""]
    lines.append(
        "Each direction is a top left singular vector of a residual writer's weight difference. "
        "Listed are the inputs with the highest maximum and the lowest minimum token cosine."
    )
    lines.append("")
    for name, ends in audit.items():
        lines += [f"## `{name}`", ""]
        for key, heading in (("top", "Highest max cosine"), ("bottom", "Lowest min cosine")):
            lines += [f"**{heading}**", "", "| # | input | cosine | text |", "|---|---|---|---|"]
            for rank, e in enumerate(ends.get(key, []), 1):
                lines.append(
                    f"| {rank} | {e['index']} | {e['cosine']:+.4f} | {_cell(str(e['text']), max_chars)} |"
                )
            lines.append("")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines), encoding="utf-8")
    return path
