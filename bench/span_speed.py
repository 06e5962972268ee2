"""Seconds per sentence of the span check (:func:`gilib.attack.span_attack`) at batch size 1.

What it measures
----------------
The exact attack of chapter 5 on held-out sentences of natural length, one
torch thread, the offline MiniLM victim, layer 0's query weight:

* **batch size 1**: 20 sentences each of SST-2 validation, CoLA validation
  and Rotten Tomatoes test (LAMP's seed-101 shuffle), plus the 10 longest
  Rotten Tomatoes test sentences of at most 64 tokens (the worst case the
  speed target names); seconds per sentence (median, 90th percentile,
  maximum), the share recovered exactly, and the split between the check
  (row space and residuals) and the rest.

Batches are timed by chapter 5's batch study (``gilib.studies.span``: seconds
per batch of 2 to 16 held-out sentences, by method, in
``data/results/ch5_span.jsonl``); the bundled B=2 batch of ``--quick`` only
checks that the batch path runs.

Each attack is timed on its own (wall clock around ``span_attack``; the
client's gradient is computed before the clock starts). Figures for one
machine, never assertions; the test that runs this script in ``--quick``
mode checks only that it runs and that what it recovers is exact.

Usage::

    python bench/span_speed.py                       # the full run (a few minutes on one core)
    python bench/span_speed.py --out data/bench/span_speed.json
    python bench/span_speed.py --quick               # bundled sentences only (the test)
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

from gilib.attack import span_attack
from gilib.client import client_update
from gilib.data import default_data_dir, load_split, sample_batches
from gilib.metrics import exact_rate, true_token_ids
from gilib.models import encode, load_model
from gilib.selection import select

HELD_OUT = (("sst2", "validation"), ("cola", "validation"), ("rotten_tomatoes", "test"))
SEED = 101


def _sets(tokenizer, quick: bool, per_set: int) -> dict[str, list[list]]:
    """Named lists of batches of examples to attack."""
    if quick or default_data_dir() is None:
        sample = load_split("sample")
        return {"sample B=1": [[e] for e in sample[:4]], "sample B=2": [sample[4:6]]}
    sets = {}
    for dataset, split in HELD_OUT:
        sets[f"{dataset}/{split} B=1"] = sample_batches(load_split(dataset, split), per_set, 1, seed=SEED)
    reviews = load_split("rotten_tomatoes", "test")
    lengths = [len(tokenizer(e.text)["input_ids"]) for e in reviews]
    longest = sorted((n, i) for i, n in enumerate(lengths) if n <= 64)[-10:]
    sets["rotten_tomatoes/test longest B=1"] = [[reviews[i]] for _, i in longest]
    return sets


def measure(model, tokenizer, batch: list) -> dict:
    """One attack on one batch: seconds, check seconds, tokens, exact sentences."""
    selection = select(model, "attention.query", 0)
    true_batch = encode(tokenizer, [e.text for e in batch], [e.label for e in batch])
    update = client_update(model, selection, true_batch).shared
    start = time.perf_counter()
    result = span_attack(model, tokenizer, update, selection)
    seconds = time.perf_counter() - start
    exact = exact_rate(result.token_ids, true_token_ids(true_batch))
    return {"seconds": seconds, "check_seconds": result.timings["check"], "tokens": sum(update.lengths),
            "longest": max(update.lengths), "exact": round(exact * len(batch)), "sentences": len(batch)}


def summarize(name: str, runs: list[dict]) -> dict:
    seconds = sorted(r["seconds"] for r in runs)
    return {
        "set": name,
        "batches": len(runs),
        "mean tokens": round(statistics.fmean(r["tokens"] for r in runs) / runs[0]["sentences"], 1),
        "longest": max(r["longest"] for r in runs),
        "median s": round(statistics.median(seconds), 2),
        "p90 s": round(seconds[min(len(seconds) - 1, int(0.9 * len(seconds)))], 2),
        "max s": round(seconds[-1], 2),
        "check share": round(sum(r["check_seconds"] for r in runs) / sum(seconds), 2),
        "exact": f"{sum(r['exact'] for r in runs)}/{sum(r['sentences'] for r in runs)}",
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="bundled sentences only")
    parser.add_argument("--per-set", type=int, default=20, help="sentences per held-out set at batch size 1")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None, help="write the table and settings as JSON")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model("minilm", seed=0)
    measure(model, tokenizer, [load_split("sample")[0]])  # warm-up: first-call costs are not the attack's
    rows = []
    for name, batches in _sets(tokenizer, args.quick, args.per_set).items():
        rows.append(summarize(name, [measure(model, tokenizer, batch) for batch in batches]))
        print(" | ".join(f"{k} {v}" for k, v in rows[-1].items()), file=sys.stderr, flush=True)
    header = list(rows[0])
    print("| " + " | ".join(header) + " |\n| " + " | ".join("---" for _ in header) + " |")
    for row in rows:
        print("| " + " | ".join(str(row[k]) for k in header) + " |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({
            "command": "python bench/span_speed.py " + shlex.join(argv if argv is not None else sys.argv[1:]),
            "settings": {"model": "minilm", "selection": "attention.query L0", "threads": args.threads,
                         "per_set": args.per_set, "seed": SEED, "quick": args.quick},
            "machine": {"cpus": torch.get_num_threads(), "processor": platform.processor() or platform.machine(),
                        "torch": torch.__version__},
            "rows": rows,
        }, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
