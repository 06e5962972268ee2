"""The cached results the chapters' tables and figures are drawn from, as the claims tests read them.

The thresholds say how the prose's words read as numbers (ROUGE-1 unless
said otherwise); the helpers read ``data/results`` once per test session.
"""

from __future__ import annotations

import functools
from pathlib import Path

import pandas as pd

from gilib.studies import grids, sample, store

ROOT = Path(__file__).resolve().parents[2]
CHAPTERS = ROOT / "chapters"
RESULTS = ROOT / "data" / "results"

DATASETS = {"cola", "sst2", "rotten_tomatoes"}
SIGMAS = ["0.0", "0.01", "0.05", "0.1", "0.2", "0.5"]
COMPONENTS = ["attention.query", "attention.key", "attention.value", "attention.output",
              "ffn.intermediate", "ffn.output"]
LARGE_PART = 0.3    # "a large part of the words"
CLOSE = 0.1         # "comes close to" / "almost as much as" the full model
MATCH = 0.02        # "matches" the full model
NOTHING = 0.02      # "leaks nothing" / "protects": at most a stray word in 12 sentences
BARELY = 0.2        # "barely at all" / "almost nothing"
SELECTIONS = ("full", "layer_0", "layer-0_query")


@functools.lru_cache(maxsize=None)
def cached(name: str) -> tuple[dict, ...]:
    """The lines of a cached results file (a tuple: shared between tests, never mutated)."""
    rows = store.read_lines(RESULTS / name)
    assert rows, f"data/results/{name} is empty"
    return tuple(rows)


def summary(name: str, by: list[str]) -> pd.DataFrame:
    """A cached grid's summary; one sentence per client unless ``by`` holds ``batch_size``."""
    where = None if "batch_size" in by else {"batch_size": 1}
    table = grids.summarize(list(cached(name)), by=by, where=where)
    if "layers" in table:
        table["layers"] = table["layers"].astype(str)
    return table


def sentences(rows) -> set[tuple[str, int]]:
    return {(r["dataset"], r["row_id"]) for r in rows}


def first_sentences(count: int) -> set[tuple[str, int]]:
    """The first ``count`` sentences of each dataset's seeded sample (:mod:`gilib.studies.sample`)."""
    return {(dataset, example.row_id) for dataset in sample.GRID_SPLITS
            for (example,) in sample.sample(dataset, count)}


def attack_settings(row: dict) -> dict:
    """A grid line's attack settings: its cell without the selection and the DP protocol."""
    return {k: v for k, v in row["cell"].items() if k not in ("component", "layers", "dp", "batch_size")}


def ch2_rouge1(layers: str, component: str = "layer") -> float:
    table = summary("ch2_layers.jsonl", ["component", "layers"])
    return float(table.query("component == @component and layers == @layers")["rouge1"].iloc[0])


def batch_table(name: str) -> pd.DataFrame:
    """A cached grid's batch axis: (component, layers) x batch size."""
    table = grids.batch_axis(list(cached(name)))
    table["layers"] = table["layers"].astype(str)
    return table.set_index(["component", "layers", "batch_size"])


def ch3_pivot(metric: str = "rouge1") -> pd.DataFrame:
    """The heatmap: one row per weight, one column per layer ("0" to "5"), on the sentences every cell holds."""
    table = grids.summarize(grids.on_shared_sentences(list(cached("ch3_components.jsonl"))),
                            by=["component", "layers"], where={"batch_size": 1})
    table["layers"] = table["layers"].astype(str)
    return table.pivot_table(index="component", columns="layers", values=metric)


def ch3_marginal(over: str, first, second, metric: str = "rouge1") -> dict:
    """Two rows (weights) or columns (layers) of the heatmap, paired sentence by sentence."""
    return grids.marginal_difference(list(cached("ch3_components.jsonl")), over, first, second, metric)


def span_lines(study: str) -> pd.DataFrame:
    return pd.DataFrame([r for r in cached("ch5_span.jsonl") if r.get("study") == study])


def fl_lines(study: str) -> pd.DataFrame:
    return pd.DataFrame([r for r in cached("ch6_federated.jsonl") if r.get("study") == study])


def ch2_paired(first: tuple[str, str], second: tuple[str, str], metric: str = "rouge1") -> dict:
    """Two cells of chapter 2's grid, ``(component, layers text)``, paired over the sentences both attacked alone.

    ``first`` minus ``second`` with its 95 % bootstrap interval
    (:func:`gilib.studies.grids.cell_difference`, as the chapter's ``paired_gap``).
    """
    return grids.cell_difference(list(cached("ch2_layers.jsonl")), first, second, metric)
