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
from ..metrics import interval_text
from .grids import batch_axis, intervals, layers_text, on_shared_sentences, paired, summarize
from .store import read_lines
from .study import Study, Table, markdown_table, option

RESULTS = Path("data") / "results"
FILES = {
    "layers": "ch2_layers.jsonl",
    "components": "ch3_components.jsonl",
    "dp": "ch4_dp.jsonl",
    "utility": "ch4_utility.jsonl",
    "finetuned": "ch2_finetuned.jsonl",
    "prior": "headline_prior.jsonl",
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


def _scores(row: pd.Series, spans: dict[str, pd.DataFrame]) -> dict:
    """A summary row's scores, with the 95 % bootstrap interval of each mean (``spans``: score -> intervals)."""
    scores = {"share_pct": round(100 * float(row["fraction"]), 2)}
    for score in ("rouge1", "rouge2"):
        span = _row(spans[score], component=row["component"], layers=row["layers"])
        scores.update({score: round(float(row[score]), 4), f"{score}_std": round(float(row[f"{score}_std"]), 4),
                       f"{score}_low": round(float(span["low"]), 4), f"{score}_high": round(float(span["high"]), 4)})
    scores["n"] = int(row["n"])
    return scores


def _most_leaky(rows: list[dict], table: pd.DataFrame, keep: pd.Series, lowest: bool = False) -> pd.Series:
    """The row of ``table[keep]`` with the highest (``lowest``: lowest) mean ROUGE-1 on the sentences all its cells share.

    Cells may hold different numbers of sentences (a headline cell a longer
    prefix of the same sample): ranking them on their common sentences
    (:func:`gilib.studies.grids.on_shared_sentences`) keeps a cell from
    winning on its extra ones.
    """
    candidates = table[keep]
    chosen = {(c, str(l)) for c, l in zip(candidates["component"], candidates["layers"])}
    lines = [r for r in rows if r["cell"].get("batch_size", 1) == 1
             and (r["cell"]["component"], layers_text(r["cell"]["layers"])) in chosen]
    shared = summarize(on_shared_sentences(lines), by=["component", "layers"], where=BATCH_ONE)
    pick = shared.loc[shared["rouge1"].idxmin() if lowest else shared["rouge1"].idxmax()]
    return _row(candidates, component=pick["component"], layers=pick["layers"])


def headline_numbers(root: str | Path | None = None) -> dict:
    """Every number the headline table and the conclusion quote.

    Returns:
        A dict of plain values: ``model``, ``full``, ``layer0``,
        ``best_layer`` / ``worst_layer`` (with ``layer``), ``query0``,
        ``best_weight`` (with ``component`` and ``layer``), ``last_layer_weight_max_rouge1``,
        ``batch`` (``full``, ``layer0``, ``query0``: batch size -> ROUGE-1
        and ROUGE-2 over the same sentences, client batches of that size),
        ``finetuned`` and ``prior`` (each headline selection on the
        fine-tuned victims, or attacked with the n-gram prior, paired with
        the plain attack on the pretrained victim), ``dp`` (per selection: ``sigma0`` and ``max_noisy`` ROUGE-1, the
        largest over every sigma > 0), ``dp_sigmas``, ``utility``
        (sigma -> accuracy and epsilon) and ``steps`` / ``paper_steps``.
    """
    layer_rows = read_lines(_path("layers", root))
    component_rows = read_lines(_path("components", root))
    layers = summarize(layer_rows, by=["component", "layers"], where=BATCH_ONE)
    single = (layers["component"] == "layer") & ~layers["layers"].astype(str).str.contains("[+]")
    best_layer = _most_leaky(layer_rows, layers, single)
    worst_layer = _most_leaky(layer_rows, layers, single, lowest=True)
    layer_spans = {score: intervals(layer_rows, where=BATCH_ONE, score=score) for score in ("rouge1", "rouge2")}

    components = summarize(component_rows, by=["component", "layers"], where=BATCH_ONE)
    component_spans = {score: intervals(component_rows, where=BATCH_ONE, score=score)
                       for score in ("rouge1", "rouge2")}
    best_weight = _most_leaky(component_rows, components, components["rouge1"].notna())
    last = components["layers"].astype(int).max()
    last_layer = components[components["layers"].astype(int) == last]

    batches = batch_axis([*layer_rows, *component_rows])
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
    headline = {
        "full": _scores(_row(layers, component="full"), layer_spans),
        "layer0": _scores(_row(layers, component="layer", layers=0), layer_spans),
        "best_layer": {"layer": str(best_layer["layers"]), **_scores(best_layer, layer_spans)},
        "query0": _scores(_row(components, component="attention.query", layers=0), component_spans),
        "best_weight": {"component": best_weight["component"], "layer": str(best_weight["layers"]),
                        **_scores(best_weight, component_spans)},
    }
    return {
        "model": attack["model"],
        "steps": attack["steps"],
        "paper_steps": 2000,
        **headline,
        "worst_layer": {"layer": str(worst_layer["layers"]), **_scores(worst_layer, layer_spans)},
        "last_layer": int(last),
        "last_layer_weight_max_rouge1": round(float(last_layer["rouge1"].max()), 4),
        "batch": batch,
        "dp": dp,
        "dp_sigma": DP_SIGMA,
        "dp_sigmas": sorted(float(s) for s in dp_table["noise_multiplier"].unique()),
        "utility": utility,
        "finetuned": _finetuned(headline, layer_rows + component_rows, root),
        "prior": _with_prior(headline, layer_rows + component_rows, root),
    }


HEADLINE_KEYS = ("full", "layer0", "best_layer", "query0", "best_weight")
"""The headline rows, in the table's order."""


def _selection(key: str, scores: dict) -> tuple[str, object]:
    """A headline row's selection as a cell describes it: ``(component, layers)``."""
    if key == "full":
        return "full", None
    if key in ("layer0", "best_layer"):
        return "layer", int(scores.get("layer", 0))
    if key == "query0":
        return "attention.query", 0
    return scores["component"], int(scores["layer"])


def _finetuned(headline: dict, pretrained: list[dict], root) -> dict:
    """Each headline selection on the fine-tuned victims, paired with the pretrained victim on the same sentences.

    Returns:
        headline key -> ``rouge1``/``rouge2`` on the fine-tuned victims,
        ``base_rouge1``/``base_rouge2`` (the pretrained victim) on the same sentences,
        ``diff_rouge1``/``diff_rouge2`` (fine-tuned minus pretrained) with
        95 % bootstrap intervals, ``n`` and ``victims``; a selection the
        fine-tuned grid has not run is left out, and so is everything
        without ``ch2_finetuned.jsonl``.
    """
    path = _path("finetuned", root)
    if not path.is_file():
        return {}
    tuned = read_lines(path)
    out = _paired_rows(headline, tuned, pretrained)
    for row in out.values():
        row["victims"] = sorted({r["cell"]["model"] for r in tuned})
    return out


def _with_prior(headline: dict, without: list[dict], root) -> dict:
    """Each headline selection attacked with the n-gram prior, paired with the same attack without it.

    Returns:
        headline key -> ``rouge1``/``rouge2`` with the prior,
        ``base_rouge1``/``base_rouge2`` without it (the same
        victim and sentences), ``diff_*`` (with minus without) with 95 %
        bootstrap intervals and ``n``; empty without ``headline_prior.jsonl``.
    """
    path = _path("prior", root)
    return _paired_rows(headline, read_lines(path), without) if path.is_file() else {}


def _paired_rows(headline: dict, lines: list[dict], base: list[dict]) -> dict:
    """Each headline selection in ``lines``, paired sentence by sentence with ``base`` (see :func:`_finetuned`)."""
    ran = {(r["cell"]["component"], r["cell"]["layers"]) for r in lines}
    base = [r for r in base if r["cell"].get("batch_size", 1) == 1]
    out = {}
    for key in HEADLINE_KEYS:
        selection = _selection(key, headline[key])
        if selection not in ran:
            continue
        row = {}
        for score in ("rouge1", "rouge2"):
            both = paired(lines, base, [selection], score=score).iloc[0]
            row.update({score: round(float(both["first"]), 4), f"base_{score}": round(float(both["second"]), 4),
                        f"diff_{score}": round(float(both["difference"]), 4),
                        f"diff_{score}_low": round(float(both["low"]), 4),
                        f"diff_{score}_high": round(float(both["high"]), 4)})
            row["n"] = int(both["n"])
        out[key] = row
    return out


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
    rows = [[row["the server sees"], f"{row['share_pct']:.2f} %",
             interval_text(row["rouge1"], row["rouge1_low"], row["rouge1_high"]),
             interval_text(row["rouge2"], row["rouge2_low"], row["rouge2_high"]), int(row["n"])]
            for _, row in headline_table(h).iterrows()]
    key = f"sigma{h['dp_sigma']}"
    query, full = h["dp"]["query0"], h["dp"]["full"]
    rows.append([f"DP-SGD's message (σ = {h['dp_sigma']}): layer 0's query / every parameter",
                 f"{h['query0']['share_pct']:.2f} % / {h['full']['share_pct']:.2f} %",
                 f"{query[key]:.2f} / {full[key]:.2f}", f"{query[key + '_rouge2']:.2f} / {full[key + '_rouge2']:.2f}",
                 query["n"]])
    return markdown_table(["the server sees", "share of parameters", "ROUGE-1 [95 %]", "ROUGE-2 [95 %]",
                           "sentences"], rows)


def finetuned_markdown(numbers: dict | None = None) -> str:
    """The headline selections on the fine-tuned victims beside the pretrained one, as Markdown."""
    return _paired_markdown(numbers or headline_numbers(), "finetuned", ("pretrained", "fine-tuned"))


def prior_markdown(numbers: dict | None = None) -> str:
    """The headline selections attacked with and without the n-gram prior, as Markdown."""
    return _paired_markdown(numbers or headline_numbers(), "prior", ("no prior", "n-gram prior"))


def _paired_markdown(h: dict, name: str, names: tuple[str, str]) -> str:
    """A paired block of :func:`headline_numbers` (``finetuned`` or ``prior``) as Markdown.

    Raises:
        ValueError: without the block's results file, naming the command that makes it.
    """
    block = h[name]
    if not block:
        stem = Path(FILES[name]).stem
        raise ValueError(f"No results in data/results/{FILES[name]}: run python -m gilib.studies grids run "
                         f"data/results/{stem}.yaml --out data/results/{FILES[name]} --jobs 2")
    labels = dict(zip(HEADLINE_KEYS, headline_table(h)["the server sees"]))
    rows = []
    for key, row in block.items():
        rows.append([labels[key], f"{row['base_rouge1']:.2f} / {row['base_rouge2']:.2f}",
                     f"{row['rouge1']:.2f} / {row['rouge2']:.2f}",
                     interval_text(row["diff_rouge1"], row["diff_rouge1_low"], row["diff_rouge1_high"]),
                     interval_text(row["diff_rouge2"], row["diff_rouge2_low"], row["diff_rouge2_high"]), row["n"]])
    return markdown_table(["the server sees", f"{names[0]} ROUGE-1 / 2", f"{names[1]} ROUGE-1 / 2",
                           "ROUGE-1 difference [95 %]", "ROUGE-2 difference [95 %]", "sentences"], rows)


STUDY = Study(
    name="headlines",
    description="the headline numbers of the README and the conclusion, read from the cached results",
    tables=(Table("table", "the headline table as Markdown (--json: every number, as JSON)",
                  lambda args: json.dumps(headline_numbers(args.root), indent=2) if args.json
                  else markdown(headline_numbers(args.root)),
                  (option("--json", action="store_true", help="every number as JSON instead of the table"),
                   option("--root", type=Path, default=None,
                          help="the repository whose data/results to read (default: this one)"))),
            Table("finetuned", "the headline selections on the fine-tuned victims, paired with the pretrained one",
                  lambda args: finetuned_markdown(headline_numbers(args.root)),
                  (option("--root", type=Path, default=None,
                          help="the repository whose data/results to read (default: this one)"),)),
            Table("prior", "the headline selections attacked with the n-gram prior, paired with the plain attack",
                  lambda args: prior_markdown(headline_numbers(args.root)),
                  (option("--root", type=Path, default=None,
                          help="the repository whose data/results to read (default: this one)"),))),
)
"""The headline numbers as a study with tables only (``python -m gilib.studies headlines table|finetuned|prior``)."""
