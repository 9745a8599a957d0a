"""Plotting helpers shared by the report and the steps that draw figures: a headless pyplot, PNG
bytes of a figure, and the scale-curve figure.

A leaf module: matplotlib is imported on first use, and nothing here imports mergesec.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence


def pyplot():
    """``matplotlib.pyplot`` on the non-interactive Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def png_bytes(fig) -> bytes:
    """The figure as PNG bytes (tight layout, 120 dpi); the figure is closed."""
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=120)
    pyplot().close(fig)
    return buf.getvalue()


def plot_scale_curves(curves: Mapping[str, Sequence[Mapping[str, float]]]) -> bytes:
    """Loss (left) and accuracy (right) against the scale s of the task vector, one line per label.

    ``curves`` maps a label to points ``{"s", "loss", "accuracy"}``. A dashed line marks s = 1
    (the released model) and a dotted one s = 0 (the base).
    """
    plt = pyplot()
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(9, 3.6))
    for label, curve in curves.items():
        pts = sorted(curve, key=lambda p: float(p["s"]))
        xs = [float(p["s"]) for p in pts]
        ax_loss.plot(xs, [float(p["loss"]) for p in pts], marker=".", label=label)
        ax_acc.plot(xs, [float(p["accuracy"]) for p in pts], marker=".", label=label)
    for ax, name in ((ax_loss, "validation loss"), (ax_acc, "validation accuracy")):
        ax.axvline(1.0, color="grey", linestyle="--", linewidth=0.8)
        ax.axvline(0.0, color="grey", linestyle=":", linewidth=0.8)
        ax.set_xlabel("scale s of the task vector (W₀ + s·τ)")
        ax.set_ylabel(name)
    ax_loss.set_yscale("log")
    ax_acc.set_ylim(0, 1.02)
    if curves:
        ax_acc.legend(fontsize=7)
    fig.suptitle("Loss landscape along the scaling direction", fontsize=10)
    return png_bytes(fig)
