"""The book's headline numbers, read from the cached results in ``data/results``.

One place computes what the README's headline table and the conclusion page
quote, so that neither types a number by hand::

    python -m gilib.studies headlines table           # the headline table, as Markdown
    python -m gilib.studies headlines table --json    # every number, as JSON

The files and the commands that produced them are listed in
``data/results/README.md``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd

from ..data import repo_root
from .grids import batch_axis, summarize
from .store import read_lines
from .study import Study, Table, markdown_table, mean_sd, option

RESULTS = Path("data") / "results"
FILES = {
    "layers": "ch2_layers.jsonl",
    "components": "ch3_components.jsonl",
    "dp": "ch4_dp.jsonl",
    "utility": "ch4_utility.jsonl",
}
"""The cached results each number comes from (chapters 2, 3 and 4)."""

BATCH_ONE = {"batch_size": 1}
"""The headline rows attack one sentence per client, as chapters 2 and 3's main grids do."""

DP_SIGMA = 0.01
"""The smallest non-zero noise multiplier of chapter 4's grid: the headline DP row."""


def _path(name: str, root: str | Path | None) -> Path:
    return Path(root or repo_root()) / RESULTS / FILES[name]


def _row(table: pd.DataFrame, **where) -> pd.Series:
    mask = pd.Series(True, index=table.index)
    for column, value in where.items():
        mask &= table[column].astype(str) == str(value)
    hits = table[mask]
    if len(hits) != 1:
        raise ValueError(f"Expected one summary row for {where}, found {len(hits)}.")
    return hits.iloc[0]


def _scores(row: pd.Series) -> dict:
    return {
        "share_pct": round(100 * float(row["fraction"]), 2),
        "rouge1": round(float(row["rouge1"]), 4),
        "rouge1_std": round(float(row["rouge1_std"]), 4),
        "rouge2": round(float(row["rouge2"]), 4),
        "rouge2_std": round(float(row["rouge2_std"]), 4),
        "n": int(row["n"]),
    }


def headline_numbers(root: str | Path | None = None) -> dict:
    """Every number the headline table and the conclusion quote.

    Returns:
        A dict of plain values: ``model``, ``full``, ``layer0``,
        ``best_layer`` / ``worst_layer`` (with ``layer``), ``query0``,
        ``best_weight`` (with ``component`` and ``layer``), ``last_layer_weight_max_rouge1``,
        ``batch`` (``full``, ``layer0``, ``query0``: batch size -> ROUGE-1
        and ROUGE-2 over the same sentences, client batches of that size),
        ``dp`` (per selection: ``sigma0`` and ``max_noisy`` ROUGE-1, the
        largest over every sigma > 0), ``dp_sigmas``, ``utility``
        (sigma -> accuracy and epsilon) and ``steps`` / ``paper_steps``.
    """
    layer_rows = read_lines(_path("layers", root))
    layers = summarize(layer_rows, by=["component", "layers"], where=BATCH_ONE)
    single = layers[(layers["component"] == "layer") & ~layers["layers"].astype(str).str.contains("[+]")]
    best_layer = single.loc[single["rouge1"].idxmax()]
    worst_layer = single.loc[single["rouge1"].idxmin()]

    components = summarize(_path("components", root), by=["component", "layers"], where=BATCH_ONE)
    best_weight = components.loc[components["rouge1"].idxmax()]
    last = components["layers"].astype(int).max()
    last_layer = components[components["layers"].astype(int) == last]

    batches = batch_axis([*layer_rows, *read_lines(_path("components", root))])
    batch = {}
    for key, component in (("full", "full"), ("layer0", "layer"), ("query0", "attention.query")):
        part = batches[(batches["component"] == component) & batches["layers"].astype(str).isin(["all", "0"])]
        batch[key] = {str(int(size)): {"rouge1": round(float(r1), 4), "rouge2": round(float(r2), 4)}
                      for size, r1, r2 in zip(part["batch_size"], part["rouge1"], part["rouge2"])}

    dp_table = summarize(_path("dp", root), by=["component", "noise_multiplier"])
    names = {"full": "full", "layer": "layer0", "attention.query": "query0"}
    dp = {}
    for component, key in names.items():
        part = dp_table[dp_table["component"] == component]
        noisy = part[part["noise_multiplier"] > 0]
        dp[key] = {
            "sigma0": round(float(_row(part, noise_multiplier=0.0)["rouge1"]), 4),
            f"sigma{DP_SIGMA}": round(float(_row(part, noise_multiplier=DP_SIGMA)["rouge1"]), 4),
            f"sigma{DP_SIGMA}_rouge2": round(float(_row(part, noise_multiplier=DP_SIGMA)["rouge2"]), 4),
            "max_noisy": round(float(noisy["rouge1"].max()), 4),
            "n": int(part["n"].min()),
        }
    utility = {}
    for line in read_lines(_path("utility", root)):
        eps = line["epsilon"]
        utility[str(line["noise_multiplier"])] = {
            "accuracy": round(float(line["accuracy"]), 4),
            "epsilon": None if eps is None or math.isinf(eps) else round(float(eps), 1),
        }
    attack = layer_rows[0]["cell"]
    return {
        "model": attack["model"],
        "steps": attack["steps"],
        "paper_steps": 2000,
        "full": _scores(_row(layers, component="full")),
        "layer0": _scores(_row(layers, component="layer", layers=0)),
        "best_layer": {"layer": str(best_layer["layers"]), **_scores(best_layer)},
        "worst_layer": {"layer": str(worst_layer["layers"]), **_scores(worst_layer)},
        "query0": _scores(_row(components, component="attention.query", layers=0)),
        "best_weight": {"component": best_weight["component"], "layer": str(best_weight["layers"]),
                        **_scores(best_weight)},
        "last_layer": int(last),
        "last_layer_weight_max_rouge1": round(float(last_layer["rouge1"].max()), 4),
        "batch": batch,
        "dp": dp,
        "dp_sigma": DP_SIGMA,
        "dp_sigmas": sorted(float(s) for s in dp_table["noise_multiplier"].unique()),
        "utility": utility,
    }


def headline_table(numbers: dict | None = None) -> pd.DataFrame:
    """The headline rows: what the server sees, its share of the parameters, ROUGE-1/2."""
    h = numbers or headline_numbers()
    rows = [
        ("every parameter but the word embeddings", h["full"]),
        ("one layer: layer 0", h["layer0"]),
        (f"one layer: the most leaky, layer {h['best_layer']['layer']}", h["best_layer"]),
        ("one linear weight: layer 0's attention query", h["query0"]),
        (f"one linear weight: the most leaky, {h['best_weight']['component']} of layer {h['best_weight']['layer']}",
         h["best_weight"]),
    ]
    table = pd.DataFrame([{"the server sees": name, **scores} for name, scores in rows])
    return table


def markdown(numbers: dict | None = None) -> str:
    """The headline table as Markdown, as the README prints it."""
    h = numbers or headline_numbers()
    rows = [[row["the server sees"], f"{row['share_pct']:.2f} %", mean_sd(row["rouge1"], row["rouge1_std"]),
             mean_sd(row["rouge2"], row["rouge2_std"]), int(row["n"])]
            for _, row in headline_table(h).iterrows()]
    key = f"sigma{h['dp_sigma']}"
    query, full = h["dp"]["query0"], h["dp"]["full"]
    rows.append([f"DP-SGD's message (σ = {h['dp_sigma']}): layer 0's query / every parameter",
                 f"{h['query0']['share_pct']:.2f} % / {h['full']['share_pct']:.2f} %",
                 f"{query[key]:.2f} / {full[key]:.2f}", f"{query[key + '_rouge2']:.2f} / {full[key + '_rouge2']:.2f}",
                 query["n"]])
    return markdown_table(["the server sees", "share of parameters", "ROUGE-1", "ROUGE-2", "sentences"], rows)


STUDY = Study(
    name="headlines",
    description="the headline numbers of the README and the conclusion, read from the cached results",
    tables=(Table("table", "the headline table as Markdown (--json: every number, as JSON)",
                  lambda args: json.dumps(headline_numbers(args.root), indent=2) if args.json
                  else markdown(headline_numbers(args.root)),
                  (option("--json", action="store_true", help="every number as JSON instead of the table"),
                   option("--root", type=Path, default=None,
                          help="the repository whose data/results to read (default: this one)"))),),
)
"""The headline numbers as a study with tables only (``python -m gilib.studies headlines table``)."""
