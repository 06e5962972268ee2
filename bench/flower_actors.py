"""Seconds a Flower round takes with one Ray actor or more, alone and beside other work.

What it measures
----------------
:func:`gilib.federated.run_round` runs its clients in Ray actors
(``actors=``). Every actor is a fresh process that imports torch,
transformers, Flower and gilib and loads the victim before its first client:
a few seconds of CPU time each, which parallel actors pay side by side. This
bench times the book's kind of round (the tests' three clients of chapter 6's
shape: MiniLM, layer 0's query weight; FedSGD, or SecAgg+ over layer 0) at
each actor count, once on an otherwise idle machine and once beside ``--busy``
processes that each spin one core (as a second test worker or a second
chapter does during ``make test`` and ``make book``). The settings alternate
within each repeat, so that a drifting machine loads them alike.

One line per round: the setting and its seconds. Nothing is asserted; the
figures are for one machine.

Usage::

    python bench/flower_actors.py [--actors 1 2] [--busy 0 1] [--rounds fedsgd secure]
                                  [--repeats 2] [--out data/bench/flower_actors.csv]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import torch

from gilib import federated
from gilib.data import write_settings

CLIENTS = [[("the cat sat on the mat", 1)], [("a dog barked at night", 0)],
           [("rain fell on the quiet town", 1), ("we walked home", 0)]]
"""The tests' three clients (tests/test_federated.py): four sentences, the third client two."""

ROUNDS = {"fedsgd": dict(component="attention.query", layers=0),
          "secure": dict(component="layer", layers=0, secure=True)}
"""The rounds timed: FedSGD on layer 0's query weight, and SecAgg+ over layer 0."""


def timed_round(kind: str, actors: int) -> float:
    """Seconds of one MiniLM round of :data:`CLIENTS` with ``actors`` Ray actors."""
    start = time.perf_counter()
    run = federated.run_round(CLIENTS, model="minilm", actors=actors, **ROUNDS[kind])
    seconds = time.perf_counter() - start
    if not run.replies:
        raise RuntimeError(f"the {kind} round with {actors} actor(s) returned no reply")
    return seconds


def spinning(count: int) -> list[subprocess.Popen]:
    """``count`` processes that each keep one core busy until terminated."""
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]


def measure(kinds, actor_counts, busy_counts, repeats: int) -> list[dict]:
    """Every (round, busy, actors) setting, ``repeats`` times, the actor counts alternating."""
    rows = []
    for repeat in range(repeats):
        for busy in busy_counts:
            spinners = spinning(busy)
            try:
                for kind in kinds:
                    for actors in actor_counts:
                        seconds = timed_round(kind, actors)
                        rows.append({"round": kind, "busy": busy, "actors": actors, "repeat": repeat,
                                     "seconds": seconds})
                        print(rows[-1], flush=True)
            finally:
                for process in spinners:
                    process.terminate()
                    process.wait()
    return rows


def main(argv=None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--actors", nargs="+", type=int, default=[1, 2], help="actor counts to time")
    parser.add_argument("--busy", nargs="+", type=int, default=[0, 1],
                        help="processes spinning one core each beside the round")
    parser.add_argument("--rounds", nargs="+", default=list(ROUNDS), choices=list(ROUNDS))
    parser.add_argument("--repeats", type=int, default=2, help="times each setting runs")
    parser.add_argument("--out", type=Path, default=None, help="also write every line here (CSV)")
    args = parser.parse_args(argv)
    if min(args.actors) < 1 or min(args.busy) < 0 or args.repeats < 1:
        parser.error(f"--actors needs counts of at least 1, --busy of at least 0 and --repeats at least 1, "
                     f"got {args.actors}, {args.busy} and {args.repeats}")
    torch.set_num_threads(1)
    frame = pd.DataFrame(measure(args.rounds, args.actors, args.busy, args.repeats))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        frame.to_csv(args.out, index=False)
        write_settings(args.out, "bench/flower_actors.py", argv, clients=len(CLIENTS), model="minilm",
                       rounds={k: ROUNDS[k] for k in args.rounds})
    summary = frame.groupby(["round", "busy", "actors"])["seconds"].agg(["median", "min", "max"]).round(1)
    print(summary.to_string())
    return frame


if __name__ == "__main__":
    main()
