"""The rank rule of LoRA messages: exact recovery from adapter gradients against the stacked rank.

What it measures
----------------
MiniLM with LoRA adapters (:func:`gilib.lora.lora_victim`, rank ``r``,
``alpha = 2 r``, layer 0 only, three warm-up AdamW rounds so that ``B`` is
off zero) on layer 0's query, value or both. Each sentence is one client's
FedSGD message of its adapters (:func:`gilib.client.client_update`), and the
span check (:func:`gilib.attack.span_attack` on ``select(victim, "lora", 0)``)
reads the stacked layer-0 ``A`` gradients. One line per sentence and
setting:

* ``tokens``: ``n``, the sentence's distinct layer-0 inputs (``[CLS]`` and
  ``[SEP]`` included); ``capacity``: ``r`` times the adapters stacked, the
  most the stacked ``A`` rows can span; ``fits``: ``capacity >= n``, the rank
  rule's condition for an exact check;
* ``rank``: the stacked gradient's numerical rank (``min(capacity, n)`` when
  the rows are in general position); ``exact``: the sentence rebuilt token
  for token; ``token_accuracy``: the share of interior positions right;
  ``residual``: the largest residual among the chosen tokens (1e-7 to 1e-4
  when certified, far more when the subspace is short of the span);
* ``b_*``: what the query (or value, if alone) adapter's ``B`` gradient
  alone says (:func:`gilib.attack.adapters.b_check`): its rank, whether each
  position's best projected input is the true token, and the median count
  of vocabulary tokens that pass per position (1 pins the token; ``n >= r``
  lets the whole vocabulary through).

Sentences: the seeded sample (:func:`gilib.studies.sample.sample`) of each
dataset from position ``--offset`` on, ``--per-dataset`` each. Nothing is
asserted; the seconds are for one machine.

Usage::

    python bench/lora_rank.py [--ranks 4 8 16 64] [--adapters query value both] [--per-dataset 3]
                              [--offset 140] [--warmup 3] [--no-b] [--out data/bench/lora_rank.csv]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pandas as pd
import torch

from gilib.attack import span_attack
from gilib.attack.adapters import b_check
from gilib.client import client_update
from gilib.data import write_settings
from gilib.lora import lora_victim
from gilib.models import cached_model, encode
from gilib.selection import select
from gilib.studies.federated import DATASETS
from gilib.studies.sample import sample

RANKS = (4, 8, 16, 64)
ADAPTERS = {"query": ("query",), "value": ("value",), "both": ("query", "value")}
OFFSET = 140
"""Sentences from this position of the seeded sample on: after the other benches' held-out sets."""


def measure(r: int, adapters: str, examples, warmup: int, with_b: bool = True) -> list[dict]:
    """One line per sentence: the span check on the stacked A gradients, and the B check."""
    model, tokenizer = cached_model("minilm")
    targets = ADAPTERS[adapters]
    victim = lora_victim(model, targets, r=r, alpha=2 * r, layers=0, warmup=warmup)
    selection = select(victim, "lora", 0)
    rows = []
    for dataset, example in examples:
        true_batch = encode(tokenizer, [example.text], [example.label])
        truth = true_batch["input_ids"][0, : int(true_batch["attention_mask"].sum())].tolist()
        message = client_update(victim, selection, true_batch).shared
        start = time.perf_counter()
        # The server's attack needs no labels; the truth reaches only the comparison below.
        result = span_attack(victim, tokenizer, message._replace(labels=None), selection)
        seconds = time.perf_counter() - start
        found = result.token_ids[0]
        interior = max(len(truth) - 2, 1)
        line = {"r": r, "adapters": adapters, "dataset": dataset, "row_id": example.row_id,
                "tokens": len(truth), "capacity": r * len(targets), "fits": r * len(targets) >= len(truth),
                "rank": result.diagnostics.rank, "exact": found == truth,
                "token_accuracy": sum(a == b for a, b in zip(found[1:-1], truth[1:-1])) / interior,
                "residual": result.final_loss, "seconds": seconds}
        if with_b:
            check = b_check(victim, tokenizer, message.shared_grads, selection, len(truth), module=targets[0])
            line.update({"b_module": targets[0], "b_rank": check.rank, "b_exact": check.ids == truth,
                         "b_passing_median": float(torch.tensor(check.passing).median()) if check.passing else 0.0})
        rows.append(line)
    return rows


def table(rows: list[dict]) -> pd.DataFrame:
    """Exact rate by setting and by whether the sentence fits the stacked rank."""
    frame = pd.DataFrame(rows)
    aggregations = {"sentences": ("exact", "size"), "exact": ("exact", "mean"),
                    "token_accuracy": ("token_accuracy", "mean"), "tokens": ("tokens", "median"),
                    "seconds": ("seconds", "mean")}
    if "b_exact" in frame:
        aggregations.update({"b_exact": ("b_exact", "mean"), "b_passing": ("b_passing_median", "median")})
    return frame.groupby(["r", "adapters", "fits"], sort=False).agg(**aggregations).reset_index().round(3)


def options(description: str, ranks=RANKS, adapters=ADAPTERS, offset: int = OFFSET) -> argparse.ArgumentParser:
    """The LoRA benches' shared command line (this one's and ``bench/lora_decoder.py``'s)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--ranks", nargs="+", type=int, default=list(ranks))
    parser.add_argument("--adapters", nargs="+", default=list(adapters), choices=list(adapters))
    parser.add_argument("--per-dataset", type=int, default=3, help="sentences per dataset")
    parser.add_argument("--offset", type=int, default=offset, help="position in the seeded sample to start at")
    parser.add_argument("--warmup", type=int, default=3, help="warm-up AdamW rounds before the attacked one")
    parser.add_argument("--out", type=Path, default=None, help="also write every sentence's line here (CSV)")
    return parser


def main(argv=None) -> None:
    parser = options(__doc__.split("\n")[0])
    parser.add_argument("--no-b", action="store_true", help="skip the B-gradient check")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    examples = [(d, b[0]) for d in DATASETS for b in sample(d, args.per_dataset, offset=args.offset)]
    rows = []
    for r in args.ranks:
        for adapters in args.adapters:
            new = measure(r, adapters, examples, args.warmup, with_b=not args.no_b)
            rows += new
            print(table(new).to_string(index=False, header=False), flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        pd.DataFrame(rows).to_csv(args.out, index=False)
        write_settings(args.out, "bench/lora_rank.py", argv,
                       model="minilm", ranks=args.ranks, alpha="2 r", adapters=args.adapters,
                       layers=[0], warmup=args.warmup, warmup_lr=1e-3, per_dataset=args.per_dataset,
                       offset=args.offset, datasets=list(DATASETS))
    print(table(rows).to_string(index=False))


if __name__ == "__main__":
    main()
