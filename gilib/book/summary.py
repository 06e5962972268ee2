"""The book on one page: what the server receives against what an attack recovers.

:func:`leakage_table` reads the cached per-sentence results of chapters 2
to 5 (``data/results/``) and gives one row per (what is shared, attack):
the mean ROUGE-1 with its 95 % bootstrap interval
(:func:`gilib.metrics.bootstrap_interval`, one sentence per resampled unit,
as in :func:`gilib.studies.grids.intervals`), the exact-recovery rate and
the number of sentences. :func:`gilib.book.plots.leakage_summary` draws it;
the introduction and the conclusion show that figure::

    from gilib.book import plots, summary
    plots.leakage_summary(summary.leakage_table())

The rows attack one sentence per client (batch size 1) on the offline
victim: the optimisation attack of chapters 2 and 3 ("cosine (LAMP's
objective, no prior)") on every parameter, on layer 0 and on layer 0's
attention query; the span check of chapter 5 on the same query weight; and
the optimisation attack on what a DP-SGD client sends (chapter 4, at the
grid's smallest non-zero noise multiplier).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ..data import repo_root
from ..metrics import bootstrap_interval
from ..studies.store import read_lines

RESULTS = Path("data") / "results"

COSINE = "cosine (LAMP's objective, no prior)"
"""The optimisation attack of the cached grids, by its book name."""
SPAN = "span check"
"""Chapter 5's exact attack."""

DP_SIGMA = 0.01
"""The noise multiplier of the DP rows: the smallest non-zero one of chapter 4's grid."""

COLUMNS = ["shared", "attack", "share (%)", "rouge1", "low", "high", "exact", "sentences", "source"]
"""The table's columns: ``share (%)`` is the shared parameters' share of the model; ``rouge1``
its mean ROUGE-1, ``low``/``high`` the 95 % bootstrap interval; ``exact`` the share of
sentences recovered exactly; ``source`` the results file."""


def _layers(value) -> str:
    return "None" if value is None else str(value)


def _grid_lines(path: Path, component: str, layers, **dp) -> list[dict]:
    """A grid's lines of one selection at batch size 1 (and, for ``dp``, one noise setting)."""
    out = []
    for line in read_lines(path):
        cell = line["cell"]
        if cell["component"] != component or _layers(cell.get("layers")) != _layers(layers):
            continue
        if cell.get("batch_size", 1) != 1:
            continue
        if dp and any(cell.get("dp", {}).get(k) != v for k, v in dp.items()):
            continue
        out.append(line)
    return out


def _exact(line: dict) -> bool:
    """Whether a line's reconstruction is the sentence.

    The span check's lines record token-level exactness (``exact``); the
    optimisation grids record ROUGE scores only, and a ROUGE-L F-measure of
    1 means the same words in the same order (up to case and punctuation).
    """
    if "exact" in line:
        return bool(line["exact"])
    return bool(np.isclose(line["rougeL"], 1.0))


def _row(shared: str, attack: str, lines: list[dict], source: str, share: float | None) -> dict:
    if not lines:
        raise ValueError(f"No cached lines for {shared!r} ({attack}) in {source}.")
    scores = [float(line["rouge1"]) for line in lines]
    low, high = bootstrap_interval(scores)
    return {"shared": shared, "attack": attack,
            "share (%)": None if share is None else round(100 * share, 2),
            "rouge1": float(np.mean(scores)), "low": low, "high": high,
            "exact": float(np.mean([_exact(line) for line in lines])),
            "sentences": len(lines), "source": source}


def leakage_table(root: str | Path | None = None) -> pd.DataFrame:
    """What the server receives against what an attack recovers, from the cached results.

    Args:
        root: the repository whose ``data/results`` to read (default: this one).

    Returns:
        One row per (what is shared, attack), in the book's order, with the
        columns of :data:`COLUMNS`.

    Raises:
        ValueError: when a results file lacks one of the rows.
    """
    results = Path(root or repo_root()) / RESULTS
    layers, components = results / "ch2_layers.jsonl", results / "ch3_components.jsonl"
    dp, span = results / "ch4_dp.jsonl", results / "ch5_span.jsonl"

    def grid(shared, path, component, layer, attack=COSINE, **dp_cell):
        lines = _grid_lines(path, component, layer, **dp_cell)
        share = lines[0].get("fraction") if lines else None
        return _row(shared, attack, lines, path.name, share)

    query = grid("one linear weight: layer 0's query", components, "attention.query", 0)
    span_lines = [line for line in read_lines(span)
                  if line["study"] == "comparison" and line["component"] == "attention.query"
                  and line["layers"] == 0]
    rows = [
        grid("every parameter but the word embeddings", layers, "full", None),
        grid("one layer: layer 0", layers, "layer", 0),
        query,
        _row("one linear weight: layer 0's query", SPAN, span_lines, span.name, query["share (%)"] / 100),
        grid(f"DP-SGD's message (σ = {DP_SIGMA}): every parameter", dp, "full", None,
             noise_multiplier=DP_SIGMA, reading="privatised"),
        grid(f"DP-SGD's message (σ = {DP_SIGMA}): layer 0's query", dp, "attention.query", 0,
             noise_multiplier=DP_SIGMA, reading="privatised"),
    ]
    return pd.DataFrame(rows, columns=COLUMNS)
