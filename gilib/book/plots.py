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

Intervals: every function that draws means takes optional ``low``/``high``
column names (``"{}"`` in a name stands for the score, e.g.
``low="{}_low"``); bars get asymmetric whiskers, lines a shaded band. A
:func:`gilib.studies.grids.intervals` table has them as ``low``/``high``.

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

__all__ = ["PALETTE", "set_style", "loss_curves", "rouge_bars", "layer_bars", "heatmap", "noise_curves", "batch_curves",
           "batch_panels", "residual_curves", "residual_map", "threat_model", "leakage_summary"]

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
    legend: bool | str = False,
    legend_title: str | None = None,
) -> Axes:
    """Label the axes, add the title and (optionally) the legend.

    ``legend="below"`` puts it under the axes, in two columns, for figures
    whose data reach the top of the plot.
    """
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title is not None:
        ax.set_title(title)
    if legend == "below":
        ax.legend(title=legend_title, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, frameon=False)
    elif legend:
        ax.legend(title=legend_title, frameon=False)
    return ax


def _bounds(table: pd.DataFrame, low: str | None, high: str | None, value: str) -> tuple | None:
    """The ``(low, high)`` arrays of ``value``'s interval, or None when no columns are named.

    ``"{}"`` in a column name stands for ``value`` (``"{}_low"`` -> ``"rouge1_low"``).
    """
    if low is None and high is None:
        return None
    if low is None or high is None:
        raise ValueError("name both interval columns, low and high, or neither")
    names = [low.format(value), high.format(value)]
    missing = [c for c in names if c not in table.columns]
    if missing:
        raise ValueError(f"table has no interval column(s) {missing}; it has {list(table.columns)}")
    return tuple(table[c].to_numpy(dtype=float) for c in names)


def _whiskers(mean: np.ndarray, bounds: tuple) -> np.ndarray:
    """Asymmetric error-bar lengths ``[mean - low, high - mean]`` for ``yerr``/``xerr``."""
    low, high = bounds
    return np.vstack([mean - low, high - mean])


def _band(ax: Axes, xs: np.ndarray, bounds: tuple | None, color: str) -> None:
    """The interval as a shaded band of the line's colour (nothing if ``bounds`` is None)."""
    if bounds is not None:
        ax.fill_between(xs, bounds[0], bounds[1], color=color, alpha=0.15, linewidth=0)


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
    low: str | None = None,
    high: str | None = None,
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
        low, high: the interval's columns (``"{}"`` stands for the metric,
            e.g. ``"{}_low"``): asymmetric whiskers from ``low`` to ``high``,
            e.g. a 95 % bootstrap interval. Not together with ``errors``.

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
    if errors is not None and (low is not None or high is not None):
        raise ValueError("give errors or an interval (low, high), not both")

    ax = _get_ax(ax)
    x = np.arange(len(table))
    width = 0.8 / len(metrics)
    for k, metric in enumerate(metrics):
        offset = (k - (len(metrics) - 1) / 2) * width
        mean = table[metric].to_numpy(dtype=float)
        bounds = _bounds(table, low, high, metric)
        yerr = None if errors is None else table[metric + errors].to_numpy(dtype=float)
        if bounds is not None:
            yerr = _whiskers(mean, bounds)
        ax.bar(
            x + offset,
            mean,
            width,
            yerr=yerr,
            capsize=3 if yerr is not None else 0,
            label=_metric_label(metric),
            color=_color(k),
        )
    ax.set_xticks(x, [str(v) for v in table[group]])
    ax.set_ylim(0, 1)
    ax.grid(axis="x", visible=False)
    return _finish(ax, xlabel=group, ylabel="ROUGE F1", title=title, legend=len(metrics) > 1)


def layer_bars(
    table: pd.DataFrame,
    *,
    layer: str = "layers",
    metrics: Sequence[str] = ("rouge1", "rouge2"),
    baseline: Mapping[str, float] | None = None,
    baseline_label: str = "full model",
    ax: Axes | None = None,
    title: str | None = None,
    low: str | None = None,
    high: str | None = None,
    xlabel: str = "encoder layer attacked",
) -> Axes:
    """Per-layer ROUGE bars with their interval or spread, against a baseline.

    Args:
        table: one row per layer (e.g. :func:`gilib.studies.grids.summarize`
            of a per-layer grid), with columns ``layer``, each metric and
            ``<metric>_std``.
        layer: column holding the layer (or layer-combination) label.
        metrics: metric columns to draw.
        baseline: metric -> value drawn as a dashed line per metric (e.g. the
            full-model attack); None: no line.
        baseline_label: legend text of the baseline.
        ax: Axes to draw on; a new figure is created if None.
        title: Optional title.
        low, high: the interval's columns, as in :func:`rouge_bars` (e.g.
            ``"{}_low"``, ``"{}_high"``); None: one standard deviation.
        xlabel: label of the x axis.

    Returns:
        The Axes drawn on (error bars: the interval, else one standard deviation).
    """
    interval = low is not None or high is not None
    ax = rouge_bars(table, group=layer, metrics=metrics, ax=ax, title=title, errors=None if interval else "_std",
                    low=low, high=high)
    if baseline:
        for k, metric in enumerate(metrics):
            if metric in baseline:
                ax.axhline(float(baseline[metric]), color=_color(k), linestyle="--", linewidth=1.2,
                           label=f"{baseline_label}, {_metric_label(metric)}")
    # Below the axes: error bars reach the top of the plot.
    return _finish(ax, xlabel=xlabel, ylabel="ROUGE F1", title=title, legend="below")


def heatmap(
    table: pd.DataFrame,
    *,
    rows: str,
    cols: str,
    value: str = "rouge1",
    ax: Axes | None = None,
    title: str | None = None,
    row_order: Sequence | None = None,
    col_order: Sequence | None = None,
    fmt: str = ".2f",
    xlabel: str | None = None,
    ylabel: str | None = None,
    annot: str | None = None,
    colorbar: bool = True,
) -> Axes:
    """A ``rows`` x ``cols`` grid of one score, annotated with its values.

    Args:
        table: long format, one row per (``rows``, ``cols``) pair, e.g.
            :func:`gilib.studies.grids.summarize` by component and layer.
        rows: column whose values label the heatmap's rows.
        cols: column whose values label its columns.
        value: the score to colour by (0 to 1).
        ax: Axes to draw on; a new figure is created if None.
        title: Optional title.
        row_order: order of the rows (default: first appearance).
        col_order: order of the columns (default: first appearance).
        fmt: number format of the annotations.
        xlabel: x label (default: ``cols``).
        ylabel: y label (default: ``rows``).
        annot: a column of text to write in each cell instead of the value
            (e.g. ``"0.54\\n[0.48, 0.61]"``, a mean and its interval).
        colorbar: draw the colour bar (off for all but one panel of a row).

    Returns:
        The Axes drawn on.

    Raises:
        ValueError: if a column is missing or a (row, col) pair repeats.
    """
    missing = [c for c in (rows, cols, value, *([annot] if annot else [])) if c not in table.columns]
    if missing:
        raise ValueError(f"table has no column(s) {missing}; it has {list(table.columns)}")
    if table.duplicated([rows, cols]).any():
        raise ValueError(f"each ({rows}, {cols}) pair must appear once; summarize by exactly these two")
    grid = table.pivot(index=rows, columns=cols, values=value)
    order = dict(index=list(row_order or pd.unique(table[rows])), columns=list(col_order or pd.unique(table[cols])))
    grid = grid.reindex(**order)
    text = True
    if annot is not None:
        text = table.pivot(index=rows, columns=cols, values=annot).reindex(**order).to_numpy(dtype=object)
    ax = _get_ax(ax, figsize=(1.0 + 0.9 * grid.shape[1], 0.8 + 0.5 * grid.shape[0]))
    sns.heatmap(grid.astype(float), ax=ax, annot=text, fmt="" if annot else fmt, vmin=0, vmax=1, cmap="viridis",
                cbar=colorbar, cbar_kws={"label": _metric_label(value)} if colorbar else None, linewidths=0.5,
                annot_kws={"fontsize": 8} if annot else None)
    ax.tick_params(axis="y", rotation=0)
    ax.grid(False)
    return _finish(ax, xlabel=xlabel or cols, ylabel=ylabel or rows, title=title)


def noise_curves(
    table: pd.DataFrame,
    *,
    series: str,
    value: str = "rouge1",
    x: str = "noise_multiplier",
    baselines: Mapping[str, float] | None = None,
    baseline_label: str = "raw gradient",
    ax: Axes | None = None,
    ylabel: str | None = None,
    title: str | None = None,
    low: str | None = None,
    high: str | None = None,
) -> Axes:
    """One line per series of a score against the DP noise multiplier.

    Args:
        table: long format: columns ``series``, ``x``, ``value`` and,
            when present and no interval is named, ``<value>_std`` (drawn
            as a band).
        series: column whose values are the lines (e.g. the selection).
        value: the score on the y axis.
        x: the noise column; sigma = 0 is drawn at the left edge of a
            symmetric-log axis.
        baselines: series value -> a level drawn as a dashed line of the
            series' colour (e.g. the attack on the raw gradient).
        baseline_label: legend suffix of the dashed lines.
        ax: Axes to draw on; a new figure is created if None.
        ylabel: y label (default: the metric's name).
        title: Optional title.
        low, high: the interval's columns (``"{}"`` stands for ``value``),
            drawn as a band of the line's colour, e.g. a 95 % bootstrap
            interval.

    Returns:
        The Axes drawn on.
    """
    missing = [c for c in (series, x, value) if c not in table.columns]
    if missing:
        raise ValueError(f"table has no column(s) {missing}; it has {list(table.columns)}")
    if table.empty:
        raise ValueError("table is empty: nothing to plot")
    _bounds(table, low, high, value)  # the columns exist
    ax = _get_ax(ax)
    for i, (name, part) in enumerate(table.groupby(series, sort=False)):
        part = part.sort_values(x)
        xs, ys = part[x].to_numpy(dtype=float), part[value].to_numpy(dtype=float)
        ax.plot(xs, ys, marker="o", color=_color(i), label=str(name))
        if low is not None:
            _band(ax, xs, _bounds(part, low, high, value), _color(i))
        elif f"{value}_std" in part.columns:
            spread = part[f"{value}_std"].to_numpy(dtype=float)
            ax.fill_between(xs, ys - spread, ys + spread, color=_color(i), alpha=0.15, linewidth=0)
        if baselines and name in baselines:
            ax.axhline(float(baselines[name]), color=_color(i), linestyle="--", linewidth=1.2,
                       label=f"{name}, {baseline_label}")
    positive = table[x][table[x] > 0]
    if len(positive):
        ax.set_xscale("symlog", linthresh=float(positive.min()))
    ax.set_xlim(left=0)
    # Below the axes: the lines start at the top of the plot.
    return _finish(ax, xlabel="noise multiplier $\\sigma$", ylabel=ylabel or _metric_label(value), title=title,
                   legend="below")


def batch_curves(
    table: pd.DataFrame,
    *,
    series: str,
    value: str = "rouge1",
    x: str = "batch_size",
    ax: Axes | None = None,
    ylabel: str | None = None,
    title: str | None = None,
    xlabel: str | None = None,
    low: str | None = None,
    high: str | None = None,
) -> Axes:
    """One line per series of a score against the client batch size.

    Args:
        table: long format, one row per (``series``, ``x``) pair, e.g.
            :func:`gilib.studies.grids.batch_axis` with a selection column.
        series: column whose values are the lines (e.g. the selection).
        value: the score on the y axis (0 to 1).
        x: the batch-size column; drawn on a log-2 axis with a tick at
            every size present.
        ax: Axes to draw on; a new figure is created if None.
        ylabel: y label (default: the metric's name).
        title: Optional title.
        xlabel: x label (default: the client batch size).
        low, high: the interval's columns (``"{}"`` stands for ``value``),
            drawn as a band of the line's colour, e.g. a 95 % bootstrap
            interval.

    Returns:
        The Axes drawn on.

    Raises:
        ValueError: if a column is missing, the table is empty or a
            (series, x) pair repeats.
    """
    missing = [c for c in (series, x, value) if c not in table.columns]
    if missing:
        raise ValueError(f"table has no column(s) {missing}; it has {list(table.columns)}")
    if table.empty:
        raise ValueError("table is empty: nothing to plot")
    if table.duplicated([series, x]).any():
        raise ValueError(f"each ({series}, {x}) pair must appear once; summarize by exactly these two")
    _bounds(table, low, high, value)  # the columns exist
    ax = _get_ax(ax)
    for i, (name, part) in enumerate(table.groupby(series, sort=False)):
        part = part.sort_values(x)
        xs = part[x].to_numpy(dtype=float)
        ax.plot(xs, part[value].to_numpy(dtype=float), marker="o", color=_color(i), label=str(name))
        _band(ax, xs, _bounds(part, low, high, value), _color(i))
    sizes = sorted(int(size) for size in table[x].unique())
    ax.set_xscale("log", base=2)
    ax.set_xticks(sizes, [str(size) for size in sizes])
    ax.minorticks_off()
    ax.set_ylim(0, 1)
    return _finish(ax, xlabel=xlabel or "client batch size (sentences in one gradient)",
                   ylabel=ylabel or _metric_label(value),
                   title=title, legend=table[series].nunique() > 1)


def batch_panels(
    table: pd.DataFrame,
    *,
    series: str,
    values: Sequence[str] = ("exact", "seconds"),
    ylabels: Sequence[str | None] | None = None,
    titles: Sequence[str | None] | None = None,
    log: Sequence[str] = ("seconds",),
    x: str = "batch_size",
    xlabel: str | None = None,
    figsize: tuple[float, float] = (12, 4.2),
    intervals: Sequence[str] = (),
    low: str = "{}_low",
    high: str = "{}_high",
) -> plt.Figure:
    """Side-by-side :func:`batch_curves`, one panel per value, against the batch size.

    Args:
        table: as for :func:`batch_curves`.
        series: the column whose values are the lines.
        values: one panel per column (a share in [0, 1], or seconds).
        ylabels, titles: one per panel (``None``: the defaults).
        log: the values drawn on a log scale (times span decades).
        x, xlabel: as for :func:`batch_curves`.
        figsize: the figure's size, in inches.
        intervals: the values whose panel draws an interval band, from
            the columns ``low`` and ``high`` (``"{}"`` stands for the value).

    Returns:
        The Figure, its panels in ``fig.axes``.
    """
    fig, axes = plt.subplots(1, len(values), figsize=figsize, squeeze=False)
    ylabels = list(ylabels or [None] * len(values))
    titles = list(titles or [None] * len(values))
    for ax, value, ylabel, title in zip(axes[0], values, ylabels, titles):
        band = value in intervals
        batch_curves(table, series=series, value=value, x=x, ax=ax, ylabel=ylabel, title=title, xlabel=xlabel,
                     low=low if band else None, high=high if band else None)
        if value in log:
            ax.set_yscale("log")
            ax.autoscale(axis="y")
    fig.tight_layout()
    return fig


def residual_curves(
    table: pd.DataFrame,
    *,
    true: str = "true",
    false: str = "false",
    x: str = "noise_multiplier",
    ax: Axes | None = None,
    title: str | None = None,
) -> Axes:
    """The true tokens' residual and the best false token's against the noise, on a log scale.

    Where the two lines meet, one threshold no longer separates the tokens
    of the sentence from the rest of the vocabulary.

    Args:
        table: one row per noise level, with the columns ``x``, ``true``
            and ``false`` (e.g. :func:`gilib.studies.span.dp_summary`'s).
        true, false: the residual columns.
        x: the noise column.
        ax: Axes to draw on; a new figure is created if None.
        title: Optional title.

    Returns:
        The Axes drawn on.
    """
    long = pd.concat([table.assign(tokens="true token (median over positions)", residual=table[true]),
                      table.assign(tokens="best false token (median over positions)", residual=table[false])])
    ax = noise_curves(long, series="tokens", value="residual", x=x, ax=ax,
                      ylabel="residual (median over sentences)", title=title)
    ax.set_yscale("log")
    return ax


def rank_rule(
    lines: pd.DataFrame,
    *,
    ax: Axes | None = None,
    title: str | None = None,
) -> Axes:
    """LoRA's rank rule: each attacked sentence's residual against the stacked rank's share of its tokens.

    One point per sentence and setting: x is the stacked ``A`` rows'
    capacity (``r`` times the adapters) over the sentence's ``n`` distinct
    layer-0 inputs, on a log-2 axis with a line at 1 (the rule's
    threshold); y is the largest residual among the chosen tokens, on a
    log scale. Exact sentences and the others get their own marker.

    Args:
        lines: ``bench/lora_rank.py``'s lines (``capacity``, ``tokens``,
            ``residual``, ``exact``).
        ax: Axes to draw on; a new figure is created if None.
        title: Optional title.

    Returns:
        The Axes drawn on.

    Raises:
        ValueError: if a column is missing or there are no lines.
    """
    missing = [c for c in ("capacity", "tokens", "residual", "exact") if c not in lines.columns]
    if missing:
        raise ValueError(f"lines have no column(s) {missing}; they have {list(lines.columns)}")
    if lines.empty:
        raise ValueError("no lines: nothing to plot")
    ax = _get_ax(ax)
    ratio = lines["capacity"] / lines["tokens"]
    exact = lines["exact"].astype(bool)
    for i, (mask, label, marker) in enumerate(((exact, "rebuilt exactly", "o"),
                                               (~exact, "not exact", "x"))):
        if mask.any():
            ax.scatter(ratio[mask], lines.loc[mask, "residual"], marker=marker, color=_color(i),
                       label=label, alpha=0.8)
    ax.axvline(1.0, color="0.4", linestyle="--", linewidth=1)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    return _finish(ax, xlabel="stacked rank capacity r × adapters / tokens n",
                   ylabel="largest residual of the chosen tokens", title=title, legend=True)


def residual_map(
    residuals: np.ndarray,
    tokens: Sequence[Sequence[str]],
    *,
    positions: Sequence[int] | None = None,
    row_labels: Sequence[str] | None = None,
    ax: Axes | None = None,
    title: str | None = None,
) -> Axes:
    """The span check's view of a sentence: positions x best candidates, by residual.

    Args:
        residuals: ``(P, k)`` residuals of each position's ``k`` best
            candidates, smallest first (:func:`gilib.attack.rowspace.token_residuals`
            then a ``topk``).
        tokens: ``P`` lists of the ``k`` candidates' strings, the cell labels.
        positions: the positions (default ``1..P``).
        row_labels: labels of the rows (default: ``position p``).
        ax: Axes to draw on; a new figure is created if None.
        title: Optional title.

    Returns:
        The Axes drawn on. Colour is ``log10`` of the residual (round-off
        sits near -6, a false token above -2).
    """
    residuals = np.asarray(residuals, dtype=float)
    if residuals.ndim != 2 or len(tokens) != residuals.shape[0]:
        raise ValueError(f"residuals must be (P, k) with one token list per row; got {residuals.shape} "
                         f"and {len(tokens)} token lists")
    positions = list(positions or range(1, residuals.shape[0] + 1))
    labels = list(row_labels or [f"position {p}" for p in positions])
    ax = _get_ax(ax, figsize=(1.6 + 1.25 * residuals.shape[1], 0.8 + 0.42 * residuals.shape[0]))
    sns.heatmap(np.log10(np.clip(residuals, 1e-12, None)), ax=ax, annot=np.asarray(tokens, dtype=object),
                fmt="", cmap="viridis_r", vmin=-8, vmax=0, linewidths=0.5,
                cbar_kws={"label": "log$_{10}$ residual"}, yticklabels=labels,
                xticklabels=[f"#{i + 1}" for i in range(residuals.shape[1])])
    ax.tick_params(axis="y", rotation=0)
    ax.grid(False)
    return _finish(ax, xlabel="candidate rank at the position (smallest residual first)", ylabel="position",
                   title=title)


def leakage_summary(
    table: pd.DataFrame,
    *,
    ax: Axes | None = None,
    title: str | None = None,
) -> Axes:
    """The book on one page: ROUGE-1 per (what is shared, attack), with interval whiskers and exact rates.

    One horizontal bar per row of ``table``, top to bottom in the table's
    order, labelled by what the server receives and coloured by the attack;
    the whisker is the row's 95 % bootstrap interval, and the text at its
    right end gives the mean and the share of sentences recovered exactly.

    Args:
        table: :func:`gilib.book.summary.leakage_table`'s rows: ``shared``,
            ``attack``, ``rouge1``, ``low``, ``high``, ``exact``,
            ``sentences``.
        ax: Axes to draw on; a new figure is created if None.
        title: Optional title.

    Returns:
        The Axes drawn on.

    Raises:
        ValueError: If ``table`` is empty or lacks a column.
    """
    needed = ["shared", "attack", "rouge1", "low", "high", "exact", "sentences"]
    missing = [c for c in needed if c not in table.columns]
    if missing:
        raise ValueError(f"table has no column(s) {missing}; it has {list(table.columns)}")
    if table.empty:
        raise ValueError("table is empty: nothing to plot")
    ax = _get_ax(ax, figsize=(9.0, 0.55 * len(table) + 1.6))
    y = np.arange(len(table))[::-1]
    attacks = list(dict.fromkeys(table["attack"]))
    mean = table["rouge1"].to_numpy(dtype=float)
    whiskers = np.vstack([mean - table["low"].to_numpy(dtype=float), table["high"].to_numpy(dtype=float) - mean])
    for k, attack in enumerate(attacks):
        rows = (table["attack"] == attack).to_numpy()
        ax.barh(y[rows], mean[rows], height=0.6, color=_color(k), label=attack,
                xerr=whiskers[:, rows], capsize=3, error_kw=dict(linewidth=1.1))
    for yi, (_, row) in zip(y, table.iterrows()):
        note = f"{row['rouge1']:.2f}, exact {100 * row['exact']:.0f} % (n = {row['sentences']})"
        ax.text(float(row["high"]) + 0.02, yi, note, va="center", fontsize=8.5)
    ax.set_yticks(y, [str(s) for s in table["shared"]])
    ax.set_xlim(0, 1.4)
    ax.set_xticks(np.linspace(0, 1, 6))
    ax.grid(axis="y", visible=False)
    return _finish(ax, xlabel="ROUGE-1 (mean and 95 % bootstrap interval)", ylabel="what the server receives",
                   title=title, legend="below", legend_title="attack")


def threat_model(ax: Axes | None = None, *, title: str | None = None) -> Axes:
    """The book's threat model as one diagram that covers every chapter.

    Left to right: the client's private sentence and label and its gradient;
    what leaves the client (every parameter, one layer, one linear weight,
    adapters); the optional DP-SGD clipping and noise; the federated round
    that carries it (FedSGD, FedAvg's local steps, a secure-aggregation
    sum); the honest-but-curious server, what it knows and how it learns
    it, and its search for a sentence with the same gradient. Each box
    names the chapter that varies it. The one figure of the book without
    data axes: its axes are switched off.

    Args:
        ax: Axes to draw on; a new 12 x 4.3 inch figure is created if None.
        title: Optional title.

    Returns:
        The Axes drawn on.
    """
    ax = _get_ax(ax, figsize=(12.0, 4.3))
    ax.set_xlim(0, 12)
    ax.set_ylim(0.3, 4.6)
    ax.axis("off")
    client, shared, server, neutral, fl = _color(0), _color(2), _color(1), "#555555", _color(4)

    def box(x, y, text, color, *, weight="normal"):
        ax.text(x, y, text, ha="center", va="center", fontsize=9, fontweight=weight, linespacing=1.45,
                bbox=dict(boxstyle="round,pad=0.45", facecolor=color + "22", edgecolor=color, linewidth=1.3))

    def arrow(start, end, color, style="-|>"):
        ax.annotate("", xy=end, xytext=start,
                    arrowprops=dict(arrowstyle=style, color=color, linewidth=1.5, shrinkA=0, shrinkB=0))

    def heading(x, text, color):
        ax.text(x, 4.35, text, ha="center", fontsize=10.5, fontweight="bold", color=color)

    heading(1.2, "client (victim)", client)
    heading(3.65, "what is shared", shared)
    heading(6.0, "defence (optional)", neutral)
    heading(8.3, "federated round", fl)
    heading(10.75, "server (attacker)", server)
    # 1. The client: private data and its gradient.
    box(1.2, 3.45, "private sentence\n$x = (x_1, \\dots, x_n)$,\nlabel $y$", client)
    arrow((1.2, 2.85), (1.2, 2.5), client)
    box(1.2, 2.0, "gradient of its loss\n$g = \\nabla_\\theta \\mathcal{L}$", client)
    # 2. What leaves the client.
    arrow((2.15, 2.0), (2.55, 2.0), shared)
    box(3.65, 2.0, "part of $g$:\nall parameters (ch. 1)\none layer (ch. 2)\none linear weight $W$\n"
                   "(ch. 3, 5)\nadapters (LoRA, ch. 7)", shared)
    # 3. DP-SGD, on the client (local DP) or on the server's sum (central DP).
    arrow((4.75, 2.0), (5.0, 2.0), shared)
    box(6.0, 2.0, "DP-SGD (ch. 4):\nclip each example\nto norm $C$, add\n"
                  "$\\mathcal{N}(0, \\sigma^2 C^2)$;\nlocal or central DP", neutral)
    # 4. The federated round that carries it.
    arrow((7.0, 2.0), (7.25, 2.0), shared)
    box(8.3, 2.0, "FedSGD: $g$ itself\nFedAvg: $E$ local steps,\nlearning rate $\\eta$\n"
                  "SecAgg: only the sum\nover clients (ch. 6)", fl)
    # 5. The server: what it knows, the search, the result.
    arrow((9.4, 2.0), (9.65, 2.0), shared)
    box(10.75, 3.5, "knows $\\theta$, the loss,\nlabel $y$ (bias gradient),\n"
                    "token count $n$ (rank)", server)
    arrow((10.75, 2.95), (10.75, 2.62), server)
    box(10.75, 2.0, "searches for $\\hat x$ with\n$\\nabla_\\theta \\mathcal{L}(\\hat x, y)"
                    " \\approx g$", server)
    arrow((10.75, 1.55), (10.75, 1.0), server)
    box(10.75, 0.7, "reconstruction $\\hat x$", server, weight="bold")
    # Only the book, never the attacker, compares the two.
    ax.plot([1.2, 1.2, 9.5], [1.55, 0.7, 0.7], color=neutral, linewidth=1.1, linestyle="--")
    arrow((9.45, 0.7), (9.65, 0.7), neutral)
    ax.text(5.4, 0.8, "the book scores $\\hat x$ against $x$ (ROUGE); the attacker never sees $x$",
            ha="center", va="bottom", fontsize=9, color=neutral)
    if title is not None:
        ax.set_title(title)
    return ax
