"""Tables of report rows (Markdown, CSV) and the writer of a study's report files."""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping
from typing import Any

from mergesec.orchestrator.plan import Plan
from mergesec.orchestrator.store import Store


def fmt_cell(x: Any) -> str:
    """A table cell: ``-`` for a missing value, floats to three decimals."""
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.3f}"
    return str(x)


def markdown_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """``rows`` as a Markdown table of ``columns``; the ``variant`` column only when some row has
    a variant."""
    cols = [c for c in columns if c != "variant" or any(r.get("variant") for r in rows)]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(fmt_cell(r.get(c)) for c in cols) + " |")
    return "\n".join(lines) + "\n"


def csv_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """``rows`` as CSV with a header of ``columns`` (other keys are left out)."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({c: r.get(c) for c in columns})
    return buf.getvalue()


def write_files(plan: Plan, store: Store, files: Mapping[str, str | bytes]) -> dict[str, str]:
    """Write each file into ``<store>/studies/<study>/``; returns ``{file name: location}``."""
    out = {}
    for name, data in files.items():
        rel = store.study_rel(plan.study, name)
        if isinstance(data, bytes):
            store.write_bytes(rel, data)
        else:
            store.write_text(rel, data)
        out[name] = store.location(rel)
    return out
