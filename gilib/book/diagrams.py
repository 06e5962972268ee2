"""Diagrams drawn by code: boxes and arrows in the book's style, no data axes.

Each function draws on an optional ``ax`` (a new figure if ``None``),
switches the axes off and returns the :class:`~matplotlib.axes.Axes`, like
the figures of :mod:`gilib.book.plots`; call :func:`gilib.book.plots.set_style`
first, as every chapter does, for the same fonts and colours
(:data:`gilib.book.plots.PALETTE`).
"""

from __future__ import annotations

import matplotlib.pyplot as plt
from matplotlib.axes import Axes

from .plots import PALETTE

__all__ = ["PEELING_STEPS", "peeling_loop"]

PEELING_STEPS: tuple[str, ...] = (
    "1. candidate sets\nspan check of layer 0's weight:\nthe tokens fitting each position",
    "2. beam search over positions\nextend the best prefixes,\nleft to right, by each candidate",
    "3. the check\nis the whole sentence in the row\nspace of layer 1's gradient?",
    "4. peel\nsubtract its gradient, each label;\nthe right one lowers the rank",
)
"""The four boxes of :func:`peeling_loop`, in order (the text drawn)."""

_NEUTRAL = "#555555"


def _box(ax: Axes, x: float, y: float, text: str, color: str, *, weight: str = "normal") -> None:
    ax.text(x, y, text, ha="center", va="center", fontsize=9.5, fontweight=weight, linespacing=1.45,
            bbox=dict(boxstyle="round,pad=0.5", facecolor=color + "22", edgecolor=color, linewidth=1.4))


def _arrow(ax: Axes, start, end, color: str, *, bend: float = 0.0) -> None:
    ax.annotate("", xy=end, xytext=start,
                arrowprops=dict(arrowstyle="-|>", color=color, linewidth=1.6, shrinkA=0, shrinkB=0,
                                connectionstyle=f"arc3,rad={bend}"))


def peeling_loop(ax: Axes | None = None, *, title: str | None = None) -> Axes:
    """How :func:`gilib.span_attack` takes a batch apart (:func:`gilib.attack.peeling.peel`), as a loop.

    The shared gradients enter at the left; each round computes candidate
    sets from what is left of layer 0's weight gradient, runs one beam
    search over positions for every remaining length, checks the closed
    sentences against layer 1's gradient, and peels each sentence that
    passes off every shared gradient (its label is the one whose
    subtraction lowers the rank). The loop repeats on what is left until
    no sentence remains; sweeps and a local search step in when the beam
    closes none, and a round that finds nothing is rerun with more search.

    Args:
        ax: Axes to draw on; a new 11 x 5 inch figure is created if None.
        title: Optional title.

    Returns:
        The Axes drawn on (axes switched off).
    """
    if ax is None:
        _, ax = plt.subplots(figsize=(11.0, 5.0))
    ax.set_xlim(0, 11)
    ax.set_ylim(0.2, 5.0)
    ax.axis("off")
    step, data, result = PALETTE[0], PALETTE[2], PALETTE[1]
    top, bottom, left, right = 3.8, 1.3, 4.1, 8.0
    # What the server holds, into the first step.
    _box(ax, 1.2, top, "shared gradients:\nlayer 0's query,\nlayer 1's query;\nthe lengths", data)
    _arrow(ax, (2.2, top), (2.6, top), data)
    # The four steps, clockwise.
    _box(ax, left, top, PEELING_STEPS[0], step)
    _box(ax, right, top, PEELING_STEPS[1], step)
    _box(ax, right, bottom, PEELING_STEPS[2], step)
    _box(ax, left, bottom, PEELING_STEPS[3], step)
    _arrow(ax, (5.6, top), (6.5, top), step)
    _arrow(ax, (right, top - 0.62), (right, bottom + 0.62), step)
    ax.text(right + 0.1, (top + bottom) / 2, "closed sentences", fontsize=9, color=step, va="center")
    _arrow(ax, (6.55, bottom), (5.7, bottom), step)
    ax.text(6.12, bottom + 0.1, "passes", fontsize=9, color=step, ha="center", va="bottom")
    # Repeat on what is left.
    _arrow(ax, (left, bottom + 0.62), (left, top - 0.62), _NEUTRAL)
    ax.text(left - 0.1, (top + bottom) / 2, "repeat on what is left:\ncleaner sets, lower rank",
            fontsize=9, color=_NEUTRAL, ha="right", va="center")
    # Fallback when no closed sentence passes.
    _arrow(ax, (9.6, bottom + 0.3), (9.6, top - 0.3), _NEUTRAL, bend=0.45)
    ax.text(10.1, (top + bottom) / 2, "none passes:\nsweeps, a local\nsearch, a wider\nbeam",
            fontsize=9, color=_NEUTRAL, ha="left", va="center")
    # The way out.
    _arrow(ax, (2.55, bottom), (2.2, bottom), result)
    _box(ax, 1.2, bottom, "each sentence\nand its label,\nverified", result, weight="bold")
    if title is not None:
        ax.set_title(title)
    return ax
