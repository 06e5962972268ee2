"""Measurements of the span check (chapter 5): where it works, and where it breaks.

The attack itself is :func:`gilib.attack.span_attack`. This module runs it
(and its building blocks) on the same seeded sentences as the cached
optimisation grids, and writes one JSON line per measurement:

* ``comparison``: the span check at batch size 1 on layer 0's query, key
  and value weights, on the sentences of ``ch3_components.jsonl``, for the
  comparison table against the optimisation attack (:func:`comparison_table`).
* ``components``: the same check applied to weights whose inputs are *not*
  layer 0's enumerable inputs (layer 0's attention output and FFN input,
  the query weight of deeper layers): rank, residual of the true tokens and
  of the best false ones, token accuracy of the smallest residual.
* ``batch``: batches of 2, 4, 8 and 16 held-out sentences
  (:data:`BATCH_SPLITS`), each attacked by the methods of :data:`METHODS`:
  peeling checked by layer 1's gradient, by layer 0's FFN weight (the
  whole of layer 0 shared), from the layer-0 query weight alone, and
  DAGER's enumeration (:func:`gilib.attack.peeling.enumerate_batch`)
  on the same batches. A batch with at least as many tokens as the hidden
  size is recorded as refused.
* ``dp``: the client's DP-SGD step (:class:`gilib.client.DPSGD`), the
  residual gap between true and false tokens as sigma grows.

Every client update comes from :func:`gilib.client.client_update`; the
truth (``true_batch``) reaches only the measurements, never the attack.
Lines keep dataset row ids, never dataset text. Command line::

    python -m gilib.studies span run --out data/results/ch5_span.jsonl [--sentences 4] [--jobs 2]
    python -m gilib.studies span run --out ... --scheduler tcp://host:8786   # on a Dask cluster
    python -m gilib.studies span table data/results/ch5_span.jsonl data/results/ch3_components.jsonl
    python -m gilib.studies span batches data/results/ch5_span.jsonl

A killed run resumes (:func:`gilib.studies.runner.run`): tasks already in the
output are skipped.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import pandas as pd
import torch

from ..attack import SpanConfig, span_attack
from ..attack.config import MAX_EFFORT
from ..attack.rowspace import DEFAULT_THRESHOLD, row_space, token_residuals
from ..attack.searches import enumerate_batch
from ..attack.tokens import TokenSpace
from ..client import DPSGD, client_update
from ..dp import clip_factors
from ..metrics import (exact_rate, interval_text, mean_interval, rouge_scores, score_batch, share_interval,
                       token_accuracy, true_token_ids)
from ..models import cached_model, encode
from ..selection import select
from .sample import GRID_SPLITS, sample
from .store import read_lines, study_frame
from .study import Measurements, Study, Table, frame_markdown, markdown_table, option

DATASETS = tuple(GRID_SPLITS)
"""The batch-1 studies attack the cached optimisation grids' sentences
(``data/results/ch3_components.yaml``, :mod:`gilib.studies.sample`)."""
SPAN_WEIGHTS = ("attention.query", "attention.key", "attention.value")
OTHER_WEIGHTS = (("attention.output", 0), ("ffn.intermediate", 0), ("ffn.output", 0)) + tuple(
    ("attention.query", layer) for layer in range(1, 6)
)
BATCH_SPLITS = {"sst2": "validation", "cola": "validation", "rotten_tomatoes": "test"}
"""Held-out sentences of natural length for the batch study."""
BATCHES = {2: 2, 4: 2, 8: 2, 16: 2}
"""Batches per dataset for each batch size."""
METHODS = {
    "peel, layer 0+1": (("attention.query", [0, 1]), "peel", (2, 4, 8, 16)),
    "peel, whole layer 0": (("layer", [0]), "peel", (2, 4, 8, 16)),
    "peel, layer 0": (("attention.query", [0]), "peel", (2,)),
    "enumerate, layer 0+1": (("attention.query", [0, 1]), "enumerate", (2, 4, 8)),
}
"""Each batch method: the client's selection, the search, the batch sizes it
runs at. "layer 0+1" shares the query weights of layers 0 and 1 (layer 1's
checks the search), "whole layer 0" every weight of layer 0 (its FFN
output weight checks the search: no layer 1), "layer 0" its query weight
alone: peeling then scores every move with a backward pass per class, and
past batch size 2 it outruns the study's CPU budget."""
ENUMERATION_BUDGET = 2000  # sentences DAGER's enumeration scores per length
NOISE_MULTIPLIERS = (0.0, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 0.1)
MODEL = "minilm"


def residual_profile(residuals, true_ids) -> dict[str, float]:
    """How the true tokens' residuals compare with the best false ones.

    Args:
        residuals: ``(P, V)`` residuals of positions ``1..P`` (batch size 1).
        true_ids: the P true token ids at those positions.

    Returns:
        ``true_max`` (the worst true token), ``false_min`` (the best false
        token anywhere), their medians over positions, ``gap`` =
        ``false_min - true_max`` (> 0: the smallest residual is right at every
        position) and ``token_accuracy`` of the smallest residual.
    """
    true_ids = torch.as_tensor(true_ids)
    rows = torch.arange(len(true_ids))
    true = residuals[rows, true_ids]
    others = residuals.clone()
    others[rows, true_ids] = float("inf")
    false = others.min(dim=1).values
    return {
        "true_max": float(true.max()),
        "true_median": float(true.median()),
        "false_min": float(false.min()),
        "false_median": float(false.median()),
        "gap": float(false.min() - true.max()),
        "token_accuracy": token_accuracy(residuals.argmin(dim=1), true_ids),
    }


def _check(model, tokenizer, gradient, lengths):
    """Row space and residuals of positions 1..max-2 for a weight gradient (any input width = hidden)."""
    space = row_space(gradient, max_rank=sum(lengths))
    residuals = token_residuals(model, TokenSpace(model, tokenizer), space, range(1, max(lengths) - 1))
    return space, residuals


def measure_comparison(dataset: str, example) -> list[dict]:
    """The span attack at batch size 1 on each layer-0 input projection."""
    model, tokenizer = cached_model(MODEL)
    true_batch = encode(tokenizer, example.text, example.label)
    lines = []
    for component in SPAN_WEIGHTS:
        selection = select(model, component, 0)
        update = client_update(model, selection, true_batch).shared
        result = span_attack(model, tokenizer, update, selection)
        scores = rouge_scores(result.texts[0], example.text)
        lines.append({"study": "comparison", "component": component, "layers": 0, "dataset": dataset,
                      "row_id": example.row_id, "tokens": update.lengths[0], **scores,
                      "exact": result.token_ids[0] == true_batch["input_ids"][0].tolist(),
                      "rank": result.diagnostics.rank, "min_gap": result.diagnostics.min_gap,
                      "seconds": result.seconds})
    return lines


def measure_components(dataset: str, example) -> list[dict]:
    """The check's premise, tested on weights whose inputs are not enumerable."""
    model, tokenizer = cached_model(MODEL)
    hidden = model.config.hidden_size
    true_batch = encode(tokenizer, example.text, example.label)
    true_ids = true_batch["input_ids"][0, 1:-1]
    lines = []
    for component, layer in (("attention.query", 0),) + OTHER_WEIGHTS:
        selection = select(model, component, layer)
        update = client_update(model, selection, true_batch).shared
        lengths = update.lengths
        weight = next(n for n in selection.names if n.endswith(".weight"))
        (gradient,) = [g for n, g in zip(selection.names, update.shared_grads) if n == weight]
        line = {"study": "components", "component": component, "layers": layer, "dataset": dataset,
                "row_id": example.row_id, "tokens": lengths[0], "input_width": gradient.shape[1]}
        if gradient.shape[1] != hidden:
            # ffn.output reads the 1536-wide FFN activation: nothing to compare the embeddings with.
            lines.append({**line, "applicable": False})
            continue
        start = time.perf_counter()
        space, residuals = _check(model, tokenizer, gradient, lengths)
        lines.append({**line, "applicable": True, "rank": space.rank, **residual_profile(residuals, true_ids),
                      "seconds": time.perf_counter() - start})
    return lines


def measure_batch(dataset: str, item, time_budget: float | None = None) -> list[dict]:
    """One batch attacked by one method of :data:`METHODS`: ``item = (method, batch)``; peeling stops after
    ``time_budget`` seconds (``None``: no limit) and the line records ``timed_out``."""
    method, batch = item
    (component, layers), search, _ = METHODS[method]
    model, tokenizer = cached_model(MODEL)
    selection = select(model, component, layers)
    true_batch = encode(tokenizer, [e.text for e in batch], [e.label for e in batch])
    update = client_update(model, selection, true_batch).shared
    lengths = update.lengths
    truth = true_token_ids(true_batch)
    hidden = model.config.hidden_size
    line = {"study": "batch", "method": method, "dataset": dataset, "split": BATCH_SPLITS.get(dataset),
            "row_ids": [e.row_id for e in batch], "batch_size": len(batch), "tokens": sum(lengths),
            "lengths": lengths, "hidden": hidden}
    if search == "peel":
        line["max_effort"] = MAX_EFFORT
    if sum(lengths) >= hidden:
        return [{**line, "refused": True}]
    start = time.perf_counter()
    weight = selection.names[0]
    if search == "peel":
        # The attacker's message carries no labels: peeling finds them.
        result = span_attack(model, tokenizer, update._replace(labels=None), selection,
                             SpanConfig(max_effort=line["max_effort"], time_budget=time_budget))
        token_ids, found = result.token_ids, result.diagnostics
        by_text = {tuple(t): int(y) for t, y in zip(truth, update.labels)}
        extra = {"found": sum(found.found) / len(batch),
                 "labels_right": sum(by_text.get(tuple(t)) == y for t, y in zip(token_ids, found.labels)
                                     if y is not None) / len(batch),
                 "uncertain_positions": sum(len(u) for u in found.uncertain),
                 "rounds": found.rounds, "rank": found.rank, "timed_out": found.timed_out,
                 **_set_quality(found.candidates, truth),
                 "set_size": statistics.fmean(len(c) for c in found.candidates),
                 # True tokens against impostors in the whole batch's span check.
                 **_batch_residuals(_check(model, tokenizer, update.shared_grads[0], lengths)[1], truth)}
    else:
        ids = enumerate_batch(model, tokenizer, selection.names, update.shared_grads, weight,
                              selection.names[-1], lengths, threshold=DEFAULT_THRESHOLD,
                              budget=ENUMERATION_BUDGET)
        token_ids = [ids[i, :n].tolist() for i, n in enumerate(lengths)]
        extra = {"budget": ENUMERATION_BUDGET}
    texts = [tokenizer.decode(t, skip_special_tokens=True) for t in token_ids]
    scores = score_batch(texts, [e.text for e in batch])
    return [{**line, "refused": False, "exact": exact_rate(token_ids, truth),
             "rouge1": statistics.fmean(s["rouge1"] for s in scores),
             "rouge2": statistics.fmean(s["rouge2"] for s in scores), **extra,
             "seconds": time.perf_counter() - start}]


def _batch_residuals(residuals, truth) -> dict[str, float]:
    """The worst true token's residual and the best impostor's (a token no sentence has there)."""
    true_max, impostor_min = 0.0, float("inf")
    for p, row in enumerate(residuals, start=1):
        true = sorted({t[p] for t in truth if p < len(t) - 1})
        true_max = max(true_max, float(row[true].max()))
        others = row.clone()
        others[true] = float("inf")
        impostor_min = min(impostor_min, float(others.min()))
    return {"true_max": true_max, "impostor_min": impostor_min}


def _set_quality(sets, truth) -> dict[str, float]:
    """Recall and precision of the candidate sets against the true tokens per position."""
    true_items = {(p, t[p]) for t in truth for p in range(1, len(t) - 1)}
    found = {(p, v) for p, s in enumerate(sets, start=1) for v in s}
    hits = len(true_items & found)
    return {"set_recall": hits / len(true_items), "set_precision": hits / max(1, len(found))}


def measure_dp(dataset: str, example) -> list[dict]:
    """The residuals under the client's DP-SGD step, for each noise multiplier (layer 0's query)."""
    model, tokenizer = cached_model(MODEL)
    selection = select(model, "attention.query", 0)
    weight = selection.names.index(next(n for n in selection.names if n.endswith("query.weight")))
    true_batch = encode(tokenizer, example.text, example.label)
    lines = []
    for sigma in NOISE_MULTIPLIERS:
        update = client_update(model, selection, true_batch, DPSGD(sigma, 1.0, seed=int(example.row_id)))
        step, lengths = update.dp, update.shared.lengths
        gradient = update.shared.shared_grads[weight]
        space, residuals = _check(model, tokenizer, gradient, lengths)
        # Batch size 1: the privatised gradient is the clipped one plus the noise.
        clipped = step.raw[weight] * float(clip_factors(step.per_example_norms, step.max_grad_norm)[0])
        lines.append({"study": "dp", "component": "attention.query", "layers": 0, "dataset": dataset,
                      "row_id": example.row_id, "tokens": lengths[0], "noise_multiplier": sigma,
                      "max_grad_norm": 1.0, "rank": space.rank, "signal_norm": float(clipped.norm()),
                      "noise_norm": float((gradient - clipped).norm()),
                      **residual_profile(residuals, true_batch["input_ids"][0, 1:-1])})
    return lines


def plan(sentences: int, time_budget: float | None = None) -> list[tuple]:
    """Every task of the study: ``(function name, dataset, example or (method, batch)[, time budget])``.

    Raises:
        ValueError: for a time budget that is not a number of seconds above 0.
    """
    SpanConfig(time_budget=time_budget)  # checked before the first task runs
    tasks = []
    for dataset in DATASETS:
        for (example,) in sample(dataset, sentences):
            tasks += [("measure_comparison", dataset, example), ("measure_components", dataset, example),
                      ("measure_dp", dataset, example)]
    for size, count in BATCHES.items():
        for dataset, split in BATCH_SPLITS.items():
            for batch in sample(dataset, count, size, split=split):
                tasks += [("measure_batch", dataset, (method, batch), time_budget)
                          for method, (*_, sizes) in METHODS.items()
                          if size in sizes]
    return tasks


run_task = Measurements(measure_comparison, measure_components, measure_batch, measure_dp)
"""One task of the study (runs in a worker): ``run_task("measure_dp", dataset, example)``."""


def _key(study: str, dataset: str, ids) -> str:
    return json.dumps([study, dataset, ids])


def _task_key(name: str, dataset: str, item, time_budget: float | None = None) -> list[str]:
    if isinstance(item, tuple):  # (method, batch)
        return [_key("batch", dataset, [item[0], [e.row_id for e in item[1]]])]
    return [_key(name.removeprefix("measure_"), dataset, item.row_id)]


def _line_key(line: dict) -> str:
    if line["study"] == "batch":
        return _key("batch", line["dataset"], [line["method"], line["row_ids"]])
    return _key(line["study"], line["dataset"], line["row_id"])


def run(out: str | Path, sentences: int = 4, jobs: int = 1, scheduler: str | None = None,
        progress: bool = True, time_budget: float | None = None) -> list[dict]:
    """Run (or resume) the whole study, appending its lines to ``out``.

    A task whose lines are already in ``out`` is skipped, so a killed run
    resumes where it stopped. Lines keep the commit that wrote them; delete
    the file to regenerate every line at one commit.

    Args:
        out: the results file.
        sentences: sentences per dataset in the batch-1 studies.
        jobs, scheduler: the engine (:func:`gilib.studies.runner.run`).
        progress: print a line per finished task.
        time_budget: seconds each batch's peeling may take (``None``: no limit).
    """
    return STUDY.run(out, plan(sentences, time_budget), jobs=jobs, scheduler=scheduler, progress=progress)


def load(path: str | Path, study: str) -> pd.DataFrame:
    """The lines of one part of the study (``comparison``, ``components``, ``batch``, ``dp``), as a table."""
    return study_frame(path, study, f"python -m gilib.studies span run --out {path}")


def comparison_table(span_path: str | Path, optimization_path: str | Path) -> pd.DataFrame:
    """Span check against the optimisation attack on the same sentences and weights.

    Args:
        span_path: a results file with ``comparison`` lines (this module).
        optimisation_path: the optimisation grid of the same sentences
            (``ch3_components.jsonl``, :mod:`gilib.studies.grids`).

    Returns:
        One row per weight and attack: ROUGE-1, ROUGE-2, share of sentences
        recovered exactly (span check), seconds per sentence, sentences.
    """
    span = load(span_path, "comparison")
    span = span.assign(attack="span check (batch 1)")
    # Only the sentences the span check measured: the optimisation grid may
    # hold more (a longer prefix of the same sample).
    measured = set(zip(span["dataset"], span["row_id"]))
    optimization = pd.DataFrame(
        [{"component": r["cell"]["component"], "layers": r["cell"]["layers"], "rouge1": r["rouge1"],
          "rouge2": r["rouge2"], "seconds": r["seconds"], "exact": None,
          "attack": f"optimisation ({r['cell']['steps']} steps)"}
         for r in read_lines(optimization_path)
         if r["cell"]["component"] in SPAN_WEIGHTS and r["cell"]["layers"] == 0
         and r["cell"].get("batch_size", 1) == 1 and (r["dataset"], r["row_id"]) in measured]
    )
    both = pd.concat([span, optimization], ignore_index=True)
    table = both.groupby(["component", "attack"], sort=True).agg(
        rouge1=("rouge1", "mean"), rouge2=("rouge2", "mean"), exact=("exact", "mean"),
        seconds=("seconds", "mean"), sentences=("rouge1", "size")).reset_index()
    return _with_intervals(table, both, ["component", "attack"])


def _with_intervals(table: pd.DataFrame, lines: pd.DataFrame, by: list[str]) -> pd.DataFrame:
    """Add each group's 95 % intervals: ROUGE-1's bootstrap (``rouge1_low/high``) and the exact share's Wilson
    interval (``exact_low/high``, left empty where the attack does not name exact tokens).

    One line of ``lines`` is one independent try: a sentence attacked alone, or a batch (its ``exact`` is then
    the share of its sentences recovered exactly).
    """
    bounds = []
    for _, row in table.iterrows():
        part = lines
        for column in by:
            part = part[part[column] == row[column]]
        _, r_low, r_high = mean_interval(part["rouge1"])
        exact = part["exact"].dropna().astype(float)
        e_low = e_high = float("nan")
        if len(exact):
            _, e_low, e_high = share_interval(float(exact.sum()), len(exact))
        bounds.append((r_low, r_high, e_low, e_high))
    return table.assign(**{name: [b[i] for b in bounds]
                           for i, name in enumerate(("rouge1_low", "rouge1_high", "exact_low", "exact_high"))})


def batch_table(path: str | Path) -> pd.DataFrame:
    """The batch study by method and batch size.

    Returns:
        One row per (method, batch size): batches attacked, sentences, the
        share recovered exactly, ROUGE-1, median and largest seconds per
        batch, and batches refused (at least as many tokens as the hidden
        size; those are not attacked, hence not in the other columns).
    """
    lines = load(path, "batch")
    attacked = lines[~lines["refused"]]
    table = attacked.groupby(["method", "batch_size"], sort=False).agg(
        batches=("exact", "size"), exact=("exact", "mean"), rouge1=("rouge1", "mean"),
        seconds=("seconds", "median"), seconds_max=("seconds", "max")).reset_index()
    table["sentences"] = table["batches"] * table["batch_size"]
    refused = lines[lines["refused"]].groupby(["method", "batch_size"]).size().rename("refused")
    table = table.join(refused, on=["method", "batch_size"]).fillna({"refused": 0})
    table["refused"] = table["refused"].astype(int)
    table = _with_intervals(table, attacked, ["method", "batch_size"])
    order = {m: i for i, m in enumerate(METHODS)}
    return table.sort_values(["method", "batch_size"], key=lambda c: c.map(order) if c.name == "method" else c,
                             ignore_index=True)


def _exact_text(row: pd.Series) -> str:
    if pd.isna(row["exact"]):
        return "–"
    return interval_text(row["exact"], row["exact_low"], row["exact_high"], 0, percent=True)


def _rouge1_text(row: pd.Series) -> str:
    return interval_text(row["rouge1"], row["rouge1_low"], row["rouge1_high"])


def batch_markdown(table: pd.DataFrame) -> str:
    """:func:`batch_table` as Markdown (the README repeats it): exact share and ROUGE-1 with 95 % intervals over
    batches (Wilson's and the bootstrap's)."""
    rows = ([r["method"], r["batch_size"], r["sentences"], _exact_text(r), _rouge1_text(r),
             f"{r['seconds']:.1f}", f"{r['seconds_max']:.1f}", r["refused"]] for _, r in table.iterrows())
    return markdown_table(["method", "batch size", "sentences", "exact [95 %]", "ROUGE-1 [95 %]",
                          "s / batch (median)", "s / batch (max)", "batches refused"], rows)


def markdown(table: pd.DataFrame) -> str:
    """:func:`comparison_table` as Markdown (the README repeats it): ROUGE-1 and the exact share with 95 %
    intervals over sentences (the bootstrap's and Wilson's)."""
    rows = ([r["component"], r["attack"], _rouge1_text(r), f"{r['rouge2']:.2f}", _exact_text(r),
             f"{r['seconds']:.1f}", r["sentences"]] for _, r in table.iterrows())
    return markdown_table(["weight (layer 0)", "attack", "ROUGE-1 [95 %]", "ROUGE-2", "exact [95 %]",
                          "s / sentence", "sentences"], rows)


# --------------------------------------------------------------------------
# Chapter 5's tables, each with the facts its prose quotes (the chapter
# records them; tests/chapters read them back)
# --------------------------------------------------------------------------


def comparison_summary(span_path: str | Path, optimization_path: str | Path) -> tuple[pd.DataFrame, dict]:
    """:func:`comparison_table` and the facts the chapter quotes from it.

    Returns:
        ``(table, facts)``: the lowest ROUGE-1 and exact share (and the
        lowest bound of the exact share's Wilson interval) and the
        largest seconds of the span check over the three weights, the
        highest ROUGE-1 and lowest seconds of the optimisation attack, and
        the table as Markdown (``comparison_markdown``).
    """
    table = comparison_table(span_path, optimization_path)
    span = table[table["attack"].str.startswith("span")]
    other = table[~table["attack"].str.startswith("span")]
    facts = {
        "span_rouge1_min": round(float(span["rouge1"].min()), 4),
        "span_exact_min": round(float(span["exact"].min()), 4),
        "span_exact_low": round(float(span["exact_low"].min()), 4),
        "span_seconds_max": round(float(span["seconds"].max()), 1),
        "opt_rouge1_max": round(float(other["rouge1"].max()), 4),
        "opt_seconds_min": round(float(other["seconds"].min()), 1),
        "comparison_markdown": markdown(table),
    }
    return table, facts


def components_summary(path: str | Path) -> tuple[pd.DataFrame, dict]:
    """The ``components`` lines per weight: does the check still name the tokens outside layer 0's inputs?

    Returns:
        ``(table, facts)``: one row per (layer, weight) the check applies
        to, with its mean token accuracy, the shares of sentences named
        exactly and separated by one threshold, the median rank, tokens
        and residuals; the facts name the best weight other than layer 0's
        query and quote layers 1, 4 and 5.
    """
    lines = load(path, "components")
    usable = lines[lines["applicable"]].assign(exact=lambda t: t["token_accuracy"] == 1,
                                               separated=lambda t: t["gap"] > 0)
    table = (usable.groupby(["layers", "component"], sort=True)
             .agg(token_accuracy=("token_accuracy", "mean"), exact_share=("exact", "mean"),
                  separated_share=("separated", "mean"), rank=("rank", "median"), tokens=("tokens", "median"),
                  true_residual=("true_median", "median"), best_false_residual=("false_median", "median"),
                  sentences=("row_id", "size"))
             .reset_index())
    others = table.query("not (layers == 0 and component == 'attention.query')")
    best = others.loc[others["token_accuracy"].idxmax()]
    facts = {
        "best_other": f"layer {best['layers']}'s {best['component']}",
        "best_other_accuracy": round(float(best["token_accuracy"]), 2),
        "best_other_exact": round(float(best["exact_share"]), 4),
        "layer1_query_accuracy": round(float(table.query("layers == 1")["token_accuracy"].iloc[0]), 2),
        "layer4_query_accuracy": round(float(table.query("layers == 4")["token_accuracy"].iloc[0]), 2),
        "layer5_query_rank": int(table.query("layers == 5")["rank"].iloc[0]),
    }
    return table, facts


METHOD_KEYS = {"peel, layer 0+1": "peel", "peel, whole layer 0": "whole", "peel, layer 0": "peel0",
               "enumerate, layer 0+1": "enum"}
"""The short name of each batch method in the facts (``peel8_exact``, ``whole16_seconds``, ...)."""


def batch_summary(path: str | Path) -> tuple[pd.DataFrame, dict]:
    """:func:`batch_table` and the facts the chapter quotes about batches.

    Returns:
        ``(table, facts)``: per method and batch size its exact share and
        median seconds (``{method key}{batch size}_exact`` and
        ``_seconds``, keys of :data:`METHOD_KEYS`), the enumeration's
        budget, the hidden size, what peeling with layer 1 found at 8 and
        its slowest batches, the bag of words' size and residuals, the
        datasets whose batches were refused, the mean sentence lengths, and
        the table as Markdown (``batch_markdown``).
    """
    lines = load(path, "batch")
    table = batch_table(path)
    facts = {}
    for _, row in table.iterrows():
        key = METHOD_KEYS[row["method"]]
        facts[f"{key}{row['batch_size']}_exact"] = round(float(row["exact"]), 4)
        facts[f"{key}{row['batch_size']}_seconds"] = round(float(row["seconds"]), 1)
    peeled = lines.query("method == 'peel, layer 0+1' and not refused")
    large = peeled.query("batch_size >= 8")
    with_layer1 = table[table["method"] == "peel, layer 0+1"].set_index("batch_size")
    refused = lines[lines["refused"]]
    tokens = lines.assign(mean=lines["tokens"] / lines["batch_size"]).groupby("dataset")["mean"].mean().round()
    facts.update({
        "enumeration_budget": ENUMERATION_BUDGET,
        "hidden": int(lines["hidden"].iloc[0]),
        "peel8_found": round(float(peeled.query("batch_size == 8")["found"].mean()), 4),
        "peel16_seconds_max": round(float(with_layer1.loc[16, "seconds_max"]), 1),
        "peel8_seconds_max": round(float(with_layer1.loc[8, "seconds_max"]), 1),
        "bag_set_size": round(float(large["set_size"].mean())),
        "bag_true_max": float(peeled["true_max"].max()),
        "bag_impostor_min": float(peeled["impostor_min"].min()),
        "refused_datasets": ", ".join(sorted(refused["dataset"].unique())),
        "cola_tokens": int(tokens["cola"]),
        "long_tokens": f"{int(tokens['sst2'])} and {int(tokens['rotten_tomatoes'])}",
        "batch_markdown": batch_markdown(table),
    })
    return table, facts


def dp_summary(path: str | Path) -> tuple[pd.DataFrame, dict]:
    """The ``dp`` lines per noise multiplier: where DP-SGD's noise breaks the check.

    Returns:
        ``(table, facts)``: per sigma the median residual of the true and
        of the best false token, the mean token accuracy, the share of
        sentences one threshold still separates, and the median norms of
        the clipped signal and of the noise; the facts give the smallest
        sigma at which the accuracy falls below one half, the share
        separated at sigma 0, the signal's norm and the accuracy at 1e-6.
    """
    lines = load(path, "dp")
    table = lines.groupby("noise_multiplier").agg(
        true=("true_median", "median"), false=("false_median", "median"), accuracy=("token_accuracy", "mean"),
        separated=("gap", lambda g: float((g > 0).mean())), signal=("signal_norm", "median"),
        noise=("noise_norm", "median")).reset_index()
    by_sigma = table.set_index("noise_multiplier")
    broken = table[table["accuracy"] < 0.5]["noise_multiplier"]
    facts = {
        "dp_half_sigma": float(broken.min()) if len(broken) else None,
        "dp_exact_sigma0": round(float(by_sigma.loc[0.0, "separated"]), 4),
        "dp_signal": float(table["signal"].median()),
        "dp_accuracy_1e-06": round(float(by_sigma.loc[1e-6, "accuracy"]), 4),
    }
    return table, facts


DP_BENCH = Path("data") / "bench" / "dp_span.csv"
"""Chapter 5's check against the most likely sentence under DP-SGD's noise (``python bench/dp_span.py``)."""
DP_ENERGY_BENCH = Path("data") / "bench" / "dp_energy.csv"
"""Where that sentence missed: the truth's likelihoods against the found one's (``python bench/dp_energy.py``)."""


def dp_likelihood_summary(path: str | Path) -> tuple[pd.DataFrame, dict]:
    """Token accuracy under DP-SGD's noise: each position's smallest residual against the most likely sentence.

    Args:
        path: ``bench/dp_span.py``'s CSV (one line per sentence, sigma and check).

    Returns:
        ``(table, facts)``: per sigma, each check's mean token accuracy with
        its 95 % bootstrap interval over sentences, the paired difference
        (new - old), the sentences rebuilt exactly by the new check and its
        median seconds; the facts give each check's accuracy per sigma
        (``dpl_old_<sigma>``, ``dpl_new_<sigma>``, sigma written as
        ``1e-05``), and for each check the largest sigma whose accuracy is
        still at least one half and the smallest below it
        (``dpl_<check>_above``, ``dpl_<check>_below``; ``None`` where no
        sigma measured is), ``dpl_ratio``: the new check's first sigma
        below one half over the old one's, and ``dpl_<check>_half``: the
        sigma where the accuracy crosses one half, interpolated
        log-linearly between those two (``dpl_half_ratio``: new over old).
        Where the CSV has ``floor_z`` (the found sentence above the noise
        floor of the model's likelihood), the table counts the misses it
        tells apart (above 3) and ``dpl_exact_z_max`` is the largest
        ``|floor_z|`` of a sentence rebuilt exactly.
    """
    frame = pd.read_csv(path)
    rows, facts = [], {}
    for sigma, part in frame.groupby("sigma"):
        old = part[part["check"] == "old"].set_index(["dataset", "row_id"])["token_accuracy"]
        new = part[part["check"] == "new"].set_index(["dataset", "row_id"])["token_accuracy"]
        key = f"{sigma:.0e}"
        row = {"sigma": key}
        for check, values in (("old", old), ("new", new)):
            mean = mean_interval(values.tolist())
            row[{"old": "smallest residual", "new": "most likely sentence"}[check]] = interval_text(*mean)
            facts[f"dpl_{check}_{key}"] = round(mean[0], 4)
        prior = part[part["check"] == "prior"]["token_accuracy"]
        if len(prior):  # its table is dp_prior_summary's; its crossing is computed below with the others'
            facts[f"dpl_prior_{key}"] = round(float(prior.mean()), 4)
        row["difference"] = interval_text(*mean_interval((new - old).dropna().tolist()), signed=True)
        exact = part[part["check"] == "new"]["exact"]
        row.update({"exact (new)": f"{int(exact.sum())} of {len(exact)}",
                    "s (new, median)": round(float(part[part["check"] == "new"]["seconds"].median()), 1)})
        if "floor_z" in part:
            # Whether the server can tell a miss without the truth: above the model's noise floor.
            z = part[part["check"] == "new"]["floor_z"]
            row["missed, told apart (z > 3)"] = f"{int((z[~exact] > 3).sum())} of {int((~exact).sum())}"
            if exact.any():
                facts["dpl_exact_z_max"] = max(facts.get("dpl_exact_z_max", 0.0), round(float(z[exact].abs().max()), 2))
        rows.append(row)
    table = pd.DataFrame(rows)
    checks = [c for c in ("old", "new", "prior") if (frame["check"] == c).any()]
    for check in checks:
        sigmas = sorted(frame.loc[frame["check"] == check, "sigma"].unique())  # those this check ran at
        above = [s for s in sigmas if facts[f"dpl_{check}_{s:.0e}"] >= 0.5]
        below = [s for s in sigmas if facts[f"dpl_{check}_{s:.0e}"] < 0.5]
        facts[f"dpl_{check}_above"] = float(max(above)) if above else None
        facts[f"dpl_{check}_below"] = float(min(below)) if below else None
    facts["dpl_sentences"] = int(frame[["dataset", "row_id"]].drop_duplicates().shape[0])
    if facts["dpl_old_below"] and facts["dpl_new_below"]:
        facts["dpl_ratio"] = round(facts["dpl_new_below"] / facts["dpl_old_below"], 1)
    for check in checks:
        low, high = facts[f"dpl_{check}_above"], facts[f"dpl_{check}_below"]
        if low is not None and high is not None and low < high:
            # Log-linear between the last sigma at or above one half and the next one measured.
            a, b = facts[f"dpl_{check}_{low:.0e}"], facts[f"dpl_{check}_{high:.0e}"]
            share = (a - 0.5) / (a - b)
            facts[f"dpl_{check}_half"] = float(f"{low * (high / low) ** share:.1e}")
    for check in ("new", "prior"):
        if "dpl_old_half" in facts and f"dpl_{check}_half" in facts:
            name = "dpl_half_ratio" if check == "new" else "dpl_prior_half_ratio"
            facts[name] = round(facts[f"dpl_{check}_half"] / facts["dpl_old_half"], 1)
    return table, facts


def dp_prior_summary(path: str | Path) -> tuple[pd.DataFrame, dict]:
    """Token accuracy under DP-SGD's noise: the most likely sentence against the most probable (a language prior).

    Args:
        path: ``bench/dp_span.py``'s CSV with ``prior`` lines.

    Returns:
        ``(table, facts)``: per sigma, the mean token accuracy of the most
        likely sentence and of the most probable one with 95 % bootstrap
        intervals over sentences, their paired difference (prior - likely),
        the sentences the prior check rebuilds exactly, its median seconds
        and the misses it tells apart (``floor_z`` above 3); the facts,
        ``dpl_prior_weight`` (the weight the bench ran with) only: the
        prior's accuracies and crossing are :func:`dp_likelihood_summary`'s
        (``dpl_prior_<sigma>``, ``dpl_prior_half``, ``dpl_prior_half_ratio``:
        over the old check's), which a chapter records once.

    Raises:
        ValueError: for a CSV without ``prior`` lines.
    """
    frame = pd.read_csv(path)
    if not (frame["check"] == "prior").any():
        raise ValueError(f"{path} has no prior lines: run python bench/dp_span.py with --checks old new prior.")
    rows = []
    for sigma, part in frame.groupby("sigma"):
        accuracy = {c: part[part["check"] == c].set_index(["dataset", "row_id"])["token_accuracy"]
                    for c in ("new", "prior")}
        prior = part[part["check"] == "prior"]
        exact = prior["exact"].astype(bool)
        rows.append({"sigma": f"{sigma:.0e}",
                     "most likely sentence": interval_text(*mean_interval(accuracy["new"].tolist())),
                     "with the prior, repaired": interval_text(*mean_interval(accuracy["prior"].tolist())),
                     "difference": interval_text(*mean_interval((accuracy["prior"] - accuracy["new"]).dropna()
                                                                .tolist()), signed=True),
                     "exact (prior)": f"{int(exact.sum())} of {len(exact)}",
                     "s (prior, median)": round(float(prior["seconds"].median()), 1),
                     "missed, told apart (z > 3)":
                         f"{int((prior['floor_z'][~exact] > 3).sum())} of {int((~exact).sum())}"})
    facts = {"dpl_prior_weight": float(frame.loc[frame["check"] == "prior", "prior_weight"].iloc[0])}
    return pd.DataFrame(rows), facts


def dp_likelihood_markdown(path: str | Path) -> str:
    """:func:`dp_likelihood_summary`'s table as Markdown (the README repeats it)."""
    table, _ = dp_likelihood_summary(path)
    return frame_markdown(table)


def dp_prior_markdown(path: str | Path) -> str:
    """:func:`dp_prior_summary`'s table as Markdown (the README repeats it)."""
    table, _ = dp_prior_summary(path)
    return frame_markdown(table)


def dp_model_summary(path: str | Path) -> tuple[pd.DataFrame, dict]:
    """Which likelihood prefers the truth where the most likely sentence missed, and how narrowly.

    Args:
        path: ``bench/dp_energy.py``'s CSV (one line per sentence and sigma;
            the ``excess_*`` columns where it ran with ``--basin``).

    Returns:
        ``(table, facts)``: per sigma with ``--basin`` lines, the sentences
        missed, in how many of them the span's energy and the model's
        likelihood each prefer the truth, and the medians over them of the
        found sentence's excess over the noise floor (a share of the floor)
        and of the truth's excess with one and with half of the found
        sentence's wrong tokens put back (shares of the found one's). The
        facts (``dpm_<name>_<sigma>``, sigma written as ``3e-05``):
        ``missed``, ``energy``, ``model``, ``found``, ``one``, ``half``.
    """
    frame = pd.read_csv(path)
    if "excess_one_wrong" not in frame:
        raise ValueError(f"{path} has no --basin lines: run python bench/dp_energy.py with --basin SIGMAS.")
    rows, facts = [], {}
    for sigma, part in frame[frame["excess_one_wrong"].notna()].groupby("sigma"):
        missed = frame[(frame["sigma"] == sigma) & ~frame["exact"].astype(bool)]
        key = f"{sigma:.0e}"
        values = {"missed": len(missed), "energy": int((missed["truth_minus_found"] > 0).sum()),
                  "model": int((missed["model_truth_minus_found"] < 0).sum()),
                  "found": float(missed["excess_found"].median()), "one": float(missed["excess_one_wrong"].median()),
                  "half": float(missed["excess_half_wrong"].median())}
        facts.update({f"dpm_{name}_{key}": value for name, value in values.items()})
        rows.append({"sigma": key, "missed": values["missed"],
                     "span's energy prefers the truth": values["energy"],
                     "model's likelihood prefers the truth": values["model"],
                     "found: excess over the floor": f"{100 * values['found']:.0f} %",
                     "truth, one found token back: share of the found's excess": f"{100 * values['one']:.0f} %",
                     "truth, half of them back": f"{100 * values['half']:.0f} %"})
    return pd.DataFrame(rows), facts


def dp_model_markdown(path: str | Path) -> str:
    """:func:`dp_model_summary`'s table as Markdown (the README repeats it)."""
    table, _ = dp_model_summary(path)
    return frame_markdown(table)


STUDY = Study(
    name="span",
    description="the span check of chapter 5: batch size 1, other weights, batches, DP noise",
    plan=lambda args: plan(args.sentences, args.time_budget),
    work=run_task,
    task_keys=_task_key,
    line_key=_line_key,
    label=lambda lines: f"{lines[0]['study']} {lines[0]['dataset']}",
    run_options=(option("--sentences", type=int, default=4, help="sentences per dataset (batch-1 studies)"),
                 option("--time-budget", type=float, default=None,
                        help="seconds each batch's peeling may take; it then returns its best partial result, "
                             "marked timed_out (default: no limit)")),
    tables=(
        Table("table", "the span check against the optimisation attack on the same sentences, as Markdown",
              lambda args: markdown(comparison_table(args.span, args.optimization)),
              (option("span", type=Path, help="this study's results (data/results/ch5_span.jsonl)"),
               option("optimization", type=Path, help="the optimisation grid of the same sentences "
                                                      "(data/results/ch3_components.jsonl)"))),
        Table("batches", "the batch study by method and batch size, as Markdown",
              lambda args: batch_markdown(batch_table(args.span)),
              (option("span", type=Path, help="this study's results (data/results/ch5_span.jsonl)"),)),
        Table("dp-noise", "token accuracy under DP-SGD's noise: chapter 5's check against the most likely "
                          "sentence (bench/dp_span.py's CSV)",
              lambda args: dp_likelihood_markdown(args.results),
              (option("results", type=Path, help="the bench's CSV (data/bench/dp_span.csv)"),)),
        Table("dp-prior", "token accuracy under DP-SGD's noise: the most likely sentence against the most "
                          "probable one, with a language prior (bench/dp_span.py's CSV)",
              lambda args: dp_prior_markdown(args.results),
              (option("results", type=Path, help="the bench's CSV (data/bench/dp_span.csv)"),)),
        Table("dp-model", "where the most likely sentence missed under DP-SGD's noise: which likelihood prefers "
                          "the truth, and how narrowly the model's does (bench/dp_energy.py's CSV)",
              lambda args: dp_model_markdown(args.results),
              (option("results", type=Path, help="the bench's CSV (data/bench/dp_energy.csv, with --basin)"),)),
    ),
)
"""Chapter 5's measurements as a study (``python -m gilib.studies span ...``)."""
