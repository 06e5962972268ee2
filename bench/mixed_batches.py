"""The span check on FedSGD batches of 16 sentences mixed from the three datasets: whole bag vs position split.

What it measures
----------------
Batches of 16 held-out sentences, 6 CoLA, 5 SST-2 and 5 Rotten Tomatoes
(the seeded sample, seed 101, from position ``--offset`` on, the next
batch 6 sentences further; a sentence already in the batch is skipped),
each under MiniLM's width of 384 tokens. The client shares all of layer 0
(FedSGD, one gradient); the server runs :func:`gilib.attack.span_attack`
with a time budget per batch:

* **old**: ``SpanConfig(positions=False)``: the searches over each
  position's candidate set, which in batches this large is the batch's bag
  of words (every token of the batch lies in the row space at every
  position);
* **new**: ``SpanConfig()``: each position's set narrowed to the tokens the
  gradient's position parts hold (:mod:`gilib.attack.positions`).

One line per batch and check: sentences recovered exactly, seconds, and
whether the budget ran out. Nothing is asserted; the figures are for one
machine (one torch thread).

Usage::

    python bench/mixed_batches.py [--batches 6] [--checks old new] [--time-budget 300]
                                  [--out data/bench/mixed_batches.csv]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pandas as pd
import torch

from gilib.attack import SpanConfig, span_attack
from gilib.client import client_update
from gilib.data import write_settings
from gilib.models import cached_model, encode
from gilib.selection import select
from gilib.studies.federated import mixed_summary
from gilib.studies.sample import sample

MIX = (("cola", 6), ("sst2", 5), ("rotten_tomatoes", 5))
"""Sentences per dataset in a batch of 16."""
OFFSET = 300
"""Where the held-out sentences start in the seeded sample (after every cached study's)."""
WIDTH = 384
"""MiniLM's hidden width: a batch must hold fewer tokens (the span check's premise)."""


def batch(index: int, offset: int = OFFSET) -> list:
    """The ``index``-th mixed batch: each dataset's next sentences, repeats skipped."""
    chosen, texts = [], set()
    for dataset, count in MIX:
        pool = sample(dataset, 1, count + 4, offset=offset + 6 * index)[0]
        # SST-2 and Rotten Tomatoes share sentences (up to a trailing space).
        taken = [e for e in pool if " ".join(e.text.lower().split()) not in texts][:count]
        texts |= {" ".join(e.text.lower().split()) for e in taken}
        chosen += taken
    return chosen


def measure(index: int, checks, time_budget: float, offset: int = OFFSET) -> list[dict]:
    """Both checks on one batch's FedSGD gradient of layer 0."""
    model, tokenizer = cached_model("minilm")
    selection = select(model, "layer", 0)
    examples = batch(index, offset)
    true_batch = encode(tokenizer, [e.text for e in examples], [e.label for e in examples])
    lengths = true_batch["attention_mask"].sum(1).tolist()
    truths = [true_batch["input_ids"][i, :n].tolist() for i, n in enumerate(lengths)]
    if sum(lengths) >= WIDTH:
        print(f"batch {index}: {sum(lengths)} tokens, not under the width; skipped", flush=True)
        return []
    # The server needs no labels; the truth reaches only the comparison below.
    message = client_update(model, selection, true_batch).shared._replace(labels=None)
    rows = []
    for check in checks:
        config = SpanConfig(time_budget=time_budget, positions=check == "new")
        start = time.perf_counter()
        result = span_attack(model, tokenizer, message, selection, config)
        seconds = time.perf_counter() - start
        found, exact = list(result.token_ids), 0
        for truth in truths:
            if truth in found:
                found.remove(truth)
                exact += 1
        rows.append({"batch": index, "check": check, "sentences": len(truths), "tokens": sum(lengths),
                     "longest": max(lengths), "exact": exact, "seconds": seconds,
                     "timed_out": result.diagnostics.timed_out})
        print(rows[-1], flush=True)
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", type=int, default=6)
    parser.add_argument("--first", type=int, default=0, help="index of the first batch")
    parser.add_argument("--checks", nargs="+", default=["old", "new"], choices=["old", "new"])
    parser.add_argument("--time-budget", type=float, default=300.0, help="seconds per batch (SpanConfig)")
    parser.add_argument("--out", type=Path, default=None, help="also write every batch's line here (CSV)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    for index in range(args.first, args.first + args.batches):
        rows += measure(index, args.checks, args.time_budget)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        pd.DataFrame(rows).to_csv(args.out, index=False)
        write_settings(args.out, "bench/mixed_batches.py", argv,
                       mix=dict(MIX), offset=OFFSET, time_budget=args.time_budget)
    if rows:
        print(mixed_summary(pd.DataFrame(rows))[0].to_string(index=False))


if __name__ == "__main__":
    main()
