"""One house style for every figure of the book.

Call :func:`set_style` once at the top of a chapter; then every plotting
function here draws with the same colour-blind-friendly palette
(:data:`PALETTE`), labels both axes, adds a legend whenever there is more than
one series, and returns the :class:`~matplotlib.axes.Axes` it drew on. No
function calls ``plt.show()``: Jupyter renders the figure, and scripts save it.

Every plotting function takes an optional ``ax`` so that figures can be
composed into panels::

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.5))
    loss_curves(histories, ax=left)
    rouge_bars(table, group="layer", ax=right)

Adding a figure type: draw on ``_get_ax(ax)``, colour series with
``_color(i)``, and finish with ``_finish(ax, xlabel=..., ylabel=...)`` so the
labelling rules stay in one place.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.axes import Axes
from matplotlib.ticker import MaxNLocator

__all__ = ["PALETTE", "set_style", "loss_curves", "rouge_bars"]

PALETTE: list[str] = sns.color_palette("colorblind").as_hex()
"""Series colours, in order: seaborn's ten-colour "colorblind" palette."""

FIGSIZE: tuple[float, float] = (6.4, 4.0)
"""Default size of a single-panel figure, in inches."""

DPI: int = 110
"""Resolution of figures, in dots per inch."""

METRIC_LABELS: dict[str, str] = {
    "rouge1": "ROUGE-1",
    "rouge2": "ROUGE-2",
    "rougeL": "ROUGE-L",
}
"""Display names of the metric columns produced by :mod:`gilib.metrics`."""


def set_style() -> None:
    """Apply the book's matplotlib/seaborn theme.

    A white grid, readable font sizes, :data:`PALETTE` as the colour cycle,
    ``dpi=110`` and a default figure size of :data:`FIGSIZE`. Calling it again
    has no further effect.
    """
    sns.set_theme(
        context="notebook",
        style="whitegrid",
        palette=PALETTE,
        rc={
            "figure.figsize": FIGSIZE,
            "figure.dpi": DPI,
            "savefig.dpi": DPI,
            "savefig.bbox": "tight",
            "font.size": 11,
            "axes.titlesize": 12,
            "axes.labelsize": 11,
            "xtick.labelsize": 10,
            "ytick.labelsize": 10,
            "legend.fontsize": 10,
            "legend.title_fontsize": 10,
            "axes.spines.top": False,
            "axes.spines.right": False,
            "lines.linewidth": 1.8,
        },
    )


# --------------------------------------------------------------------------- #
# Private helpers shared by every figure type.
# --------------------------------------------------------------------------- #


def _get_ax(ax: Axes | None = None, figsize: tuple[float, float] | None = None) -> Axes:
    """Return ``ax``, or the Axes of a new figure if ``ax`` is None."""
    if ax is not None:
        return ax
    _, new_ax = plt.subplots(figsize=figsize or FIGSIZE)
    return new_ax


def _color(i: int) -> str:
    """Colour of the ``i``-th series, cycling through :data:`PALETTE`."""
    return PALETTE[i % len(PALETTE)]


def _metric_label(name: str) -> str:
    """Display name of a metric column, e.g. ``"rouge1"`` -> ``"ROUGE-1"``."""
    return METRIC_LABELS.get(name, name)


def _finish(
    ax: Axes,
    *,
    xlabel: str,
    ylabel: str,
    title: str | None = None,
    legend: bool = False,
    legend_title: str | None = None,
) -> Axes:
    """Label the axes, add the title and (optionally) the legend."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title is not None:
        ax.set_title(title)
    if legend:
        ax.legend(title=legend_title, frameon=False)
    return ax


# --------------------------------------------------------------------------- #
# Figure types.
# --------------------------------------------------------------------------- #


def loss_curves(
    histories: Mapping[str, Sequence[float]],
    ax: Axes | None = None,
    *,
    ylabel: str = "reconstruction loss",
    logy: bool = False,
    title: str | None = None,
) -> Axes:
    """Plot one loss curve per run against the attack step.

    Args:
        histories: Maps a series label (e.g. ``"layer 6"``) to the loss at
            each attack step, starting from step 0.
        ax: Axes to draw on; a new figure is created if None.
        ylabel: Label of the y axis.
        logy: Use a logarithmic y axis (losses must then be positive).
        title: Optional title.

    Returns:
        The Axes drawn on.

    Raises:
        ValueError: If ``histories`` is empty.
    """
    if not histories:
        raise ValueError("histories is empty: nothing to plot")
    ax = _get_ax(ax)
    for i, (label, history) in enumerate(histories.items()):
        y = np.asarray(history, dtype=float)
        ax.plot(np.arange(len(y)), y, label=label, color=_color(i))
    if logy:
        ax.set_yscale("log")
    ax.set_xlim(left=0)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return _finish(ax, xlabel="attack step", ylabel=ylabel, title=title, legend=len(histories) > 1)


def rouge_bars(
    table: pd.DataFrame,
    *,
    group: str,
    metrics: Sequence[str] = ("rouge1", "rouge2"),
    ax: Axes | None = None,
    title: str | None = None,
    errors: str | None = None,
) -> Axes:
    """Grouped bar chart of ROUGE F-measures.

    One group of bars per row of ``table`` (labelled by its ``group``
    column), one bar per metric within a group.

    Args:
        table: One row per group, with a column ``group`` and one column per
            metric, e.g. the output of :func:`gilib.metrics.aggregate` for
            each setting, collected into a DataFrame.
        group: Column whose values label the groups (and the x axis).
        metrics: Metric columns to draw, in order.
        ax: Axes to draw on; a new figure is created if None.
        title: Optional title.
        errors: Suffix of the error columns, e.g. ``"_std"``: the bar of
            metric ``m`` gets an error bar of half-length ``table[m + errors]``.
            No error bars if None.

    Returns:
        The Axes drawn on.

    Raises:
        ValueError: If ``table`` is empty, a needed column is missing, the
            ``group`` column has repeated values, or ``metrics`` is empty.
    """
    metrics = list(metrics)
    if not metrics:
        raise ValueError("metrics is empty: nothing to plot")
    needed = [group, *metrics, *(m + errors for m in metrics if errors is not None)]
    missing = [c for c in needed if c not in table.columns]
    if missing:
        raise ValueError(f"table has no column(s) {missing}; it has {list(table.columns)}")
    if table.empty:
        raise ValueError("table is empty: nothing to plot")
    if table[group].duplicated().any():
        raise ValueError(f"column {group!r} must have one row per group, found repeated values")

    ax = _get_ax(ax)
    x = np.arange(len(table))
    width = 0.8 / len(metrics)
    for k, metric in enumerate(metrics):
        offset = (k - (len(metrics) - 1) / 2) * width
        ax.bar(
            x + offset,
            table[metric].to_numpy(dtype=float),
            width,
            yerr=None if errors is None else table[metric + errors].to_numpy(dtype=float),
            capsize=3 if errors is not None else 0,
            label=_metric_label(metric),
            color=_color(k),
        )
    ax.set_xticks(x, [str(v) for v in table[group]])
    ax.set_ylim(0, 1)
    ax.grid(axis="x", visible=False)
    return _finish(ax, xlabel=group, ylabel="ROUGE F1", title=title, legend=len(metrics) > 1)
