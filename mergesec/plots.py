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


# Report figures are shown in the MLflow artifact viewer and in Markdown: at most this wide.
MAX_WIDTH_PX = 1600
DPI = 120
GROUP_IN = 1.25  # inches per group of bars
Group = tuple[str, Mapping[str, float | None]]  # (tick label, series key -> value)


def bar_panels(
    panels: Mapping[str, Sequence[Group]],
    series: Sequence[tuple[str, str]],
    *,
    tick: tuple[str, str] | None = None,
    title: str | None = None,
    ylabel: str = "test accuracy",
) -> bytes:
    """Grouped bars, one panel per key of ``panels`` (stacked); a panel with more groups than fit
    in ``MAX_WIDTH_PX`` continues on the next row. ``series`` are ``(legend, key)`` bars per
    group; ``tick`` is a ``(legend, key)`` drawn as a black tick over each group."""
    plt = pyplot()
    max_w = MAX_WIDTH_PX / DPI
    per_row = max(1, int((max_w - 1.5) // GROUP_IN))
    rows = [
        (name if i == 0 else f"{name} (continued)", groups[i : i + per_row])
        for name, groups in panels.items()
        for i in range(0, max(len(groups), 1), per_row)
    ]
    widest = max(len(g) for _, g in rows)
    width_in = min(max_w, max(6.0, GROUP_IN * widest + 1.5))
    fig, axes = plt.subplots(len(rows), 1, figsize=(width_in, 0.6 + 3.0 * len(rows)), squeeze=False)
    bar = 0.8 / len(series)
    for ax, (name, groups) in zip(axes[:, 0], rows, strict=True):
        for i, (label, key) in enumerate(series):
            xs = [j + (i - (len(series) - 1) / 2) * bar for j in range(len(groups))]
            ax.bar(xs, [v.get(key) or 0.0 for _, v in groups], bar, label=label)
        if tick is not None:
            ax.scatter(
                range(len(groups)), [v.get(tick[1]) or 0.0 for _, v in groups], marker="_",
                s=500, color="black", label=tick[0], zorder=3,
            )  # fmt: skip
        ax.set_xticks(range(len(groups)), [g for g, _ in groups], fontsize=9)
        ax.set_xlim(-0.6, max(len(groups), 3) - 0.4)
        ax.set_ylim(0, 1.05)
        ax.set_ylabel(ylabel, fontsize=9)
        ax.tick_params(axis="y", labelsize=8)
        ax.grid(axis="y", alpha=0.3)
        ax.set_title(name, fontsize=10, loc="left")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=9, ncols=len(labels), loc="upper center")
    if title:
        fig.suptitle(title, fontsize=11, y=0.995, x=0.01, ha="left")
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.32 / fig.get_figheight()))
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    plt.close(fig)
    return buf.getvalue()
