"""Seconds to peel chapter 6's batches of eight: the searches over the bag of words or over the position split.

What it measures
----------------
Chapter 6's batch study's batches of 8 sentences (one per dataset, the
seeded sample after the protocol study's sentences; the Rotten Tomatoes one
holds 269 tokens), the whole of layer 0 shared, as two messages:

* **FedSGD**: the client's gradient of the batch (exact);
* **SecAgg+**: the mean of 8 one-sentence FedSGD clients as Flower's
  SecAgg+ unmasks it (:func:`gilib.secure.secure_mean`, Flower's own
  quantisation without the network: chapter 6's secure study), attacked
  with the protocol's noise model (``noise=SecAgg().noise_std(...)``).

Each message is attacked by :func:`gilib.attack.span_attack` twice:

* **bag**: ``SpanConfig(positions=False)``: each position's candidate set is
  what the span check leaves, in batches this large the batch's bag of words;
* **split**: ``SpanConfig()``: the sets narrowed by the gradient's position
  parts (:mod:`gilib.attack.positions`).

One line per message and search: sentences rebuilt token for token,
seconds, peeling rounds and whether the time budget ran out. Run it at two
commits to time a change to peeling. Nothing is asserted; the figures are
for one machine (one torch thread).

Usage::

    python bench/peel_speed.py [--messages fedsgd secagg] [--searches bag split]
                               [--datasets cola sst2 rotten_tomatoes] [--time-budget 300]
                               [--out data/bench/peel_speed.csv]
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
from gilib.metrics import exact_rate
from gilib.models import cached_model, encode
from gilib.selection import select
from gilib.studies.federated import DATASETS, SENTENCES
from gilib.studies.sample import sample
from noisy_span import secure_message  # bench/: the script's own folder

SIZE = 8
"""Sentences per batch (chapter 6's largest batch and most clients)."""


def messages(dataset: str, kinds) -> list[tuple[str, object, float | None, list[list[int]]]]:
    """``(kind, message, noise, truths)`` for chapter 6's batch of :data:`SIZE` from ``dataset``."""
    model, tokenizer = cached_model("minilm")
    selection = select(model, "layer", 0)
    (examples,) = sample(dataset, 1, SIZE, offset=SENTENCES)
    true_batch = encode(tokenizer, [e.text for e in examples], [e.label for e in examples])
    truths = [ids[: int(mask.sum())].tolist() for ids, mask in
              zip(true_batch["input_ids"], true_batch["attention_mask"])]
    chosen = []
    if "fedsgd" in kinds:
        chosen.append(("FedSGD", client_update(model, selection, true_batch).shared, None, truths))
    if "secagg" in kinds:
        message, noise, _, _ = secure_message(model, tokenizer, selection, examples)
        chosen.append((f"SecAgg+ {SIZE} clients", message, noise, truths))
    return chosen


def measure(dataset: str, kinds, searches, time_budget: float) -> list[dict]:
    """Every search on each message of one dataset's batch."""
    model, tokenizer = cached_model("minilm")
    selection = select(model, "layer", 0)
    rows = []
    for kind, message, noise, truths in messages(dataset, kinds):
        # The span check needs no labels: peeling finds them; the truth reaches only the count below.
        message = message._replace(labels=None)
        for search in searches:
            config = SpanConfig(time_budget=time_budget, positions=search == "split")
            start = time.perf_counter()
            result = span_attack(model, tokenizer, message, selection, config, noise=noise)
            seconds = time.perf_counter() - start
            exact = round(exact_rate(result.token_ids, truths) * len(truths))
            rows.append({"message": kind, "dataset": dataset, "search": search, "sentences": len(truths),
                         "tokens": sum(map(len, truths)), "exact": exact, "seconds": seconds,
                         "rounds": result.diagnostics.rounds, "timed_out": result.diagnostics.timed_out})
            print(rows[-1], flush=True)
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", nargs="+", default=["fedsgd", "secagg"], choices=["fedsgd", "secagg"])
    parser.add_argument("--searches", nargs="+", default=["bag", "split"], choices=["bag", "split"])
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--time-budget", type=float, default=300.0, help="seconds per attack (SpanConfig)")
    parser.add_argument("--out", type=Path, default=None, help="also write every line here (CSV)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    for dataset in args.datasets:
        rows += measure(dataset, args.messages, args.searches, args.time_budget)
    frame = pd.DataFrame(rows)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        frame.to_csv(args.out, index=False)
        write_settings(args.out, "bench/peel_speed.py", argv, size=SIZE, offset=SENTENCES,
                       time_budget=args.time_budget)
    print(frame.round(1).to_string(index=False))


if __name__ == "__main__":
    main()
