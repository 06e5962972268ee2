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
* ``batch``: batch sizes 1, 2, 4 and 8 (the full attack: candidate sets
  and assembly, up to :data:`ASSEMBLE_MAX_TOKENS` tokens), 16, 32 and 64
  (check only), up to batches with more tokens than the hidden size (rank
  against hidden size).
* ``dp``: the client's DP-SGD step (:class:`gilib.client.DPSGD`), the
  residual gap between true and false tokens as sigma grows.

Every client update comes from :func:`gilib.client.client_update`; the
truth (``true_batch``) reaches only the measurements, never the attack.
Lines keep dataset row ids, never dataset text. Command line::

    python -m gilib.span_study run --out data/results/ch5_span.jsonl [--sentences 5] [--jobs 2]
    python -m gilib.span_study run --out ... --scheduler tcp://host:8786   # on a Dask cluster

A killed run resumes (:func:`gilib.results.run`): tasks already in the
output are skipped.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time
from pathlib import Path

import pandas as pd
import torch

from . import results
from .attack import span_attack
from .attack.span import DEFAULT_THRESHOLD, candidate_sets, position_counts, row_space, token_residuals
from .attack.tokens import TokenSpace
from .client import DPSGD, client_update
from .data import load_split, sample_batches
from .metrics import rouge_scores, score_batch, token_accuracy
from .models import encode, load_model
from .slicing import select

DATASETS = ("cola", "sst2", "rotten_tomatoes")
SPAN_WEIGHTS = ("attention.query", "attention.key", "attention.value")
OTHER_WEIGHTS = (("attention.output", 0), ("ffn.intermediate", 0), ("ffn.output", 0)) + tuple(
    ("attention.query", layer) for layer in range(1, 6)
)
BATCH_SIZES = (1, 2, 4, 8)
CHECK_ONLY_BATCH_SIZES = (16, 32, 64)
ASSEMBLE_MAX_TOKENS = 160
"""Larger batches run the check only: assembling 8 Rotten Tomatoes sentences
(about 250 tokens, polluted candidate sets) took over 15 minutes per batch
on one thread."""
NOISE_MULTIPLIERS = (0.0, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 0.1)
SAMPLE_SEED = 101  # the seed of the cached optimisation grids


@functools.lru_cache(maxsize=1)
def _victim():
    return load_model("minilm", seed=0)


def _sentences(dataset: str, n: int, batch_size: int = 1) -> list[list]:
    return sample_batches(load_split(dataset, "train"), n, batch_size, seed=SAMPLE_SEED)


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
    model, tokenizer = _victim()
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
                      "rank": result.timings["rank"], "min_gap": result.timings["min_gap"],
                      "seconds": result.seconds})
    return lines


def measure_components(dataset: str, example) -> list[dict]:
    """The check's premise, tested on weights whose inputs are not enumerable."""
    model, tokenizer = _victim()
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


def measure_batch(dataset: str, batch: list) -> list[dict]:
    """The span attack on a batch (layer 0's query weight); check only for the large sizes."""
    model, tokenizer = _victim()
    selection = select(model, "attention.query", 0)
    true_batch = encode(tokenizer, [e.text for e in batch], [e.label for e in batch])
    update = client_update(model, selection, true_batch).shared
    lengths = update.lengths
    truth = [true_batch["input_ids"][i, :n].tolist() for i, n in enumerate(lengths)]
    line = {"study": "batch", "component": "attention.query", "layers": 0, "dataset": dataset,
            "row_ids": [e.row_id for e in batch], "batch_size": len(batch), "tokens": sum(lengths),
            "hidden": model.config.hidden_size}
    start = time.perf_counter()
    space, residuals = _check(model, tokenizer, update.shared_grads[0], lengths)
    line.update(rank=space.rank, full=space.full, **_batch_residuals(residuals, truth),
                tokens_under_threshold=float((residuals < DEFAULT_THRESHOLD).double().sum(1).mean()))
    if len(batch) in CHECK_ONLY_BATCH_SIZES or sum(lengths) > ASSEMBLE_MAX_TOKENS:
        line.update(assembled=False, **_set_quality(candidate_sets(residuals, position_counts(lengths)), truth))
        return [{**line, "seconds": time.perf_counter() - start}]
    result = span_attack(model, tokenizer, update, selection)
    scores = score_batch(result.texts, [e.text for e in batch])
    line.update(final_loss=result.final_loss, assembled=True,
                exact=sum(t in result.token_ids for t in truth) / len(batch),
                rouge1=statistics.fmean(s["rouge1"] for s in scores),
                rouge2=statistics.fmean(s["rouge2"] for s in scores),
                check_seconds=result.timings["check"], assembly_seconds=result.timings["assembly"],
                **_set_quality(result.config["candidates"], truth))
    return [{**line, "seconds": result.seconds}]


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
    model, tokenizer = _victim()
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
        clipped = step.raw[weight] * min(1.0, 1.0 / float(step.per_example_norms[0]))
        lines.append({"study": "dp", "component": "attention.query", "layers": 0, "dataset": dataset,
                      "row_id": example.row_id, "tokens": lengths[0], "noise_multiplier": sigma,
                      "max_grad_norm": 1.0, "rank": space.rank, "signal_norm": float(clipped.norm()),
                      "noise_norm": float((gradient - clipped).norm()),
                      **residual_profile(residuals, true_batch["input_ids"][0, 1:-1])})
    return lines


def plan(sentences: int) -> list[tuple]:
    """Every task of the study: ``(function name, dataset, example or batch)``."""
    tasks = []
    for dataset in DATASETS:
        for (example,) in _sentences(dataset, sentences):
            tasks += [("measure_comparison", dataset, example), ("measure_components", dataset, example),
                      ("measure_dp", dataset, example)]
    # Batches of whole sentences: Rotten Tomatoes and CoLA (SST-2's train rows are phrases).
    for dataset in ("rotten_tomatoes", "cola"):
        for size in BATCH_SIZES + CHECK_ONLY_BATCH_SIZES:
            # Batches of 8 take a minute each to assemble on one thread: fewer of them.
            n = 1 if size in CHECK_ONLY_BATCH_SIZES else sentences if size < 8 else max(1, (sentences + 1) // 2)
            tasks += [("measure_batch", dataset, batch) for batch in _sentences(dataset, n, size)]
    return tasks


def run_task(name: str, dataset: str, item) -> list[dict]:
    """One task of the study (runs in a worker): ``measure_<study>(dataset, item)``."""
    torch.set_num_threads(1)
    return MEASUREMENTS[name](dataset, item)


MEASUREMENTS = {f.__name__: f for f in (measure_comparison, measure_components, measure_batch, measure_dp)}


def _key(study: str, dataset: str, ids) -> str:
    return json.dumps([study, dataset, ids])


def _task_key(name: str, dataset: str, item) -> list[str]:
    ids = [e.row_id for e in item] if isinstance(item, list) else item.row_id
    return [_key(name.removeprefix("measure_"), dataset, ids)]


def _line_key(line: dict) -> str:
    return _key(line["study"], line["dataset"], line.get("row_ids", line.get("row_id")))


def run(out: str | Path, sentences: int = 5, jobs: int = 1, scheduler: str | None = None,
        progress: bool = True) -> list[dict]:
    """Run (or resume) the whole study, appending its lines to ``out``.

    A task whose lines are already in ``out`` is skipped, so a killed run
    resumes where it stopped. Lines keep the commit that wrote them; delete
    the file to regenerate every line at one commit.

    Args:
        out: the results file.
        sentences: sentences per dataset (and batches per size).
        jobs, scheduler: the engine (:func:`gilib.results.run`).
        progress: print a line per finished task.
    """
    report = results.print_progress(lambda lines: f"{lines[0]['study']} {lines[0]['dataset']}")
    return results.run(out, plan(sentences), run_task, task_keys=_task_key, line_key=_line_key, jobs=jobs,
                       scheduler=scheduler, progress=report if progress else None)


def load(path: str | Path, study: str) -> pd.DataFrame:
    """The lines of one study from a results file, as a table."""
    rows = [r for r in results.read_lines(path) if r.get("study") == study]
    if not rows:
        raise ValueError(f"{path} has no '{study}' lines: run python -m gilib.span_study run --out {path}")
    return pd.DataFrame(rows)


def comparison_table(span_path: str | Path, optimisation_path: str | Path) -> pd.DataFrame:
    """Span check against the optimisation attack on the same sentences and weights.

    Args:
        span_path: a results file with ``comparison`` lines (this module).
        optimisation_path: the optimisation grid of the same sentences
            (``ch3_components.jsonl``, :mod:`gilib.experiments`).

    Returns:
        One row per weight and attack: ROUGE-1, ROUGE-2, share of sentences
        recovered exactly (span check), seconds per sentence, sentences.
    """
    span = load(span_path, "comparison")
    span = span.assign(attack="span check (batch 1)")
    optimisation = pd.DataFrame(
        [{"component": r["cell"]["component"], "layers": r["cell"]["layers"], "rouge1": r["rouge1"],
          "rouge2": r["rouge2"], "seconds": r["seconds"], "exact": None,
          "attack": f"optimisation ({r['cell']['steps']} steps)"}
         for r in results.read_lines(optimisation_path)
         if r["cell"]["component"] in SPAN_WEIGHTS and r["cell"]["layers"] == 0]
    )
    both = pd.concat([span, optimisation], ignore_index=True)
    table = both.groupby(["component", "attack"], sort=True).agg(
        rouge1=("rouge1", "mean"), rouge2=("rouge2", "mean"), exact=("exact", "mean"),
        seconds=("seconds", "mean"), sentences=("rouge1", "size")).reset_index()
    return table


def markdown(table: pd.DataFrame) -> str:
    """:func:`comparison_table` as Markdown (the README repeats it)."""
    rows = ([r["component"], r["attack"], f"{r['rouge1']:.2f}", f"{r['rouge2']:.2f}",
             "–" if pd.isna(r["exact"]) else f"{r['exact']:.0%}", f"{r['seconds']:.1f}", r["sentences"]]
            for _, r in table.iterrows())
    return results.markdown_table(["weight (layer 0)", "attack", "ROUGE-1", "ROUGE-2", "exact", "s / sentence",
                                   "sentences"], rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m gilib.span_study", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run_p = sub.add_parser("run", help="run every measurement of chapter 5")
    run_p.add_argument("--out", required=True)
    run_p.add_argument("--sentences", type=int, default=5, help="sentences per dataset (and batches per size)")
    run_p.add_argument("--jobs", type=int, default=1, help="worker processes (or Dask workers with --scheduler local)")
    run_p.add_argument("--scheduler", default=None,
                       help="run on a Dask cluster: its scheduler's address (tcp://host:8786) or 'local'")
    table_p = sub.add_parser("table", help="the comparison table, in Markdown")
    table_p.add_argument("span")
    table_p.add_argument("optimisation")
    args = parser.parse_args(argv)
    try:
        if args.command == "run":
            run(args.out, args.sentences, args.jobs, args.scheduler)
        else:
            print(markdown(comparison_table(args.span, args.optimisation)))
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        parser.exit(2, f"error: {err}\n")


if __name__ == "__main__":
    # Run the imported module's main, so that worker processes find run_task under gilib.span_study.
    from gilib.span_study import main as _main

    _main()
