"""The span check under DP-SGD's noise: each position's smallest residual against the most likely sentence.

What it measures
----------------
Chapter 5's DP setting: one sentence per client, layer 0's query weight
shared, DP-SGD with clipping norm ``C = 1`` (over every parameter) and noise
multiplier ``sigma`` (:class:`gilib.client.DPSGD`, seeded by the sentence's
row id, as ``gilib.studies.span``'s ``dp`` part). For each sentence and
``sigma``, the share of interior positions rebuilt (token accuracy) and
whether the whole sentence is, for

* **old**: :func:`gilib.attack.span_attack` without a noise model: each
  position's token of smallest residual (chapter 5's check);
* **new**: the same with the message's noise
  (``noise=DPSGD(...).noise_std(1)``): the most likely sentence under
  Gaussian noise (:func:`gilib.attack.likelihood.likely_sentence`).

* **prior**: the new check with a language prior
  (:class:`gilib.attack.NgramPrior`, counted from every local split but
  the attacked one, :func:`gilib.data.prior_texts`), weighted by
  ``--prior-weight`` (:data:`gilib.attack.config.PRIOR_WEIGHT`): the most
  probable sentence rather than the most likely, then, where it sits above
  the noise floor, repaired under the model's own likelihood and kept if
  that reaches the floor (``gilib.attack.span._repaired``).

``--tune W1 W2 ...`` chooses that weight: it runs the prior check alone at
each weight on sentences no study attacks (the seeded sample from position
:data:`TUNE_OFFSET` on, ``--sentences`` per dataset).

For the new checks, ``floor_z``: how far the found sentence sits above the
noise floor of the model's likelihood, in the floor's standard deviations
(``diagnostics.floor_z``): whether the server can tell, without the truth,
that the sentence it found is the client's (near 0) or not.

Sentences: chapter 5's, the seeded sample's first four per dataset (those of
``data/results/ch5_span.jsonl``). Nothing is asserted; the seconds are for
one machine.

Usage::

    python bench/dp_span.py [--sigmas 1e-6 3e-6 1e-5 3e-5 5e-5 1e-4 3e-4 1e-3] [--sentences 4]
                            [--checks old new prior] [--prior-weight 16] [--datasets ...]
                            [--tune 2 4 8 16 32 64 128]
                            [--out data/bench/dp_span.csv]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Iterator, NamedTuple

import pandas as pd
import torch

from gilib.attack import SpanConfig, span_attack
from gilib.attack.config import PRIOR_WEIGHT
from gilib.client import DPSGD, client_update
from gilib.data import write_settings
from gilib.models import cached_model, encode
from gilib.selection import select
from gilib.update import SharedUpdate
from gilib.studies.grids import ngram_prior
from gilib.studies.sample import GRID_SPLITS, sample
from gilib.studies.span import DATASETS

SIGMAS = (1e-6, 3e-6, 1e-5, 3e-5, 5e-5, 1e-4, 3e-4, 1e-3)
CHECKS = ("old", "new", "prior")
TUNE_OFFSET = 200
"""Where the sentences that choose the prior's weight start in the seeded sample (no study reaches it)."""


class Message(NamedTuple):
    """One sentence's DP-SGD message and, for the comparison only, its truth."""

    dataset: str
    row_id: int
    truth: list
    sigma: float
    protocol: DPSGD
    message: SharedUpdate


def messages(model, tokenizer, selection, sigmas, sentences: int, offset: int = 0,
             datasets=DATASETS) -> Iterator[Message]:
    """Every chapter-5 sentence's DP-SGD message of ``selection`` at every ``sigma`` (seeded by its row id).

    ``offset``: start that far into the seeded sample instead (other
    sentences); ``datasets``: only these (a run split across processes).
    """
    for dataset in datasets:
        for (example,) in sample(dataset, sentences, offset=offset):
            true_batch = encode(tokenizer, [example.text], [example.label])
            n = int(true_batch["attention_mask"].sum())
            truth = true_batch["input_ids"][0, :n].tolist()
            for sigma in sigmas:
                protocol = DPSGD(sigma, 1.0, seed=int(example.row_id))
                # The server needs no labels; the truth reaches only the comparisons.
                message = client_update(model, selection, true_batch, protocol).shared._replace(labels=None)
                yield Message(dataset, example.row_id, truth, sigma, protocol, message)


def measure(sigmas, sentences: int, checks=CHECKS, prior_weights=(PRIOR_WEIGHT,), offset: int = 0,
            datasets=DATASETS) -> list[dict]:
    """Each check's reading of every sentence's DP-SGD message at every ``sigma`` (the prior's at each weight)."""
    model, tokenizer = cached_model("minilm")
    selection = select(model, "attention.query", 0)
    # The attacker's n-gram prior: every local split but the attacked one.
    priors = {d: ngram_prior("minilm", d, GRID_SPLITS[d]) for d in datasets} if "prior" in checks else {}
    rows = []
    for dataset, row_id, truth, sigma, protocol, message in messages(model, tokenizer, selection, sigmas, sentences,
                                                                     offset, datasets):
        n = len(truth)
        runs = [(c, None, {} if c == "old" else {"noise": protocol.noise_std(1)}) for c in checks if c != "prior"]
        runs += [("prior", w, {"noise": protocol.noise_std(1), "prior": priors[dataset],
                               "config": SpanConfig(prior_weight=w)}) for w in prior_weights if "prior" in checks]
        for check, weight, extra in runs:
            start = time.perf_counter()
            result = span_attack(model, tokenizer, message, selection, **extra)
            got = result.token_ids[0]
            rows.append({"dataset": dataset, "row_id": row_id, "tokens": n, "sigma": sigma,
                         "check": check, "prior_weight": weight,
                         "token_accuracy": sum(a == b for a, b in zip(got[1:-1], truth[1:-1])) / (n - 2),
                         "exact": got == truth, "seconds": time.perf_counter() - start,
                         "floor_z": result.diagnostics.floor_z})
        print(dataset, row_id, n, sigma,
              *(round(r["token_accuracy"], 2) for r in rows[-len(runs):]), round(rows[-1]["seconds"], 1),
              flush=True)
    return rows


def options(description: str, sigmas) -> argparse.ArgumentParser:
    """The DP benches' command line: ``--sigmas`` (default ``sigmas``), ``--sentences``, ``--out``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--sigmas", nargs="+", type=float, default=list(sigmas), help="DP-SGD noise multipliers")
    parser.add_argument("--sentences", type=int, default=4, help="sentences per dataset (chapter 5: 4)")
    parser.add_argument("--out", type=Path, default=None, help="also write every line here (CSV)")
    return parser


def tune(args, argv) -> None:
    """``--tune``: the prior check's token accuracy at each weight, on sentences no study attacks."""
    frame = pd.DataFrame(measure(args.sigmas, args.sentences, ("prior",), args.tune, offset=TUNE_OFFSET,
                                 datasets=args.datasets))
    print(frame.pivot_table(index="prior_weight", columns="sigma", values="token_accuracy").round(3).to_string())
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        frame.to_csv(args.out, index=False)
        write_settings(args.out, "bench/dp_span.py", argv, sigmas=args.sigmas, sentences=args.sentences,
                       prior_weights=args.tune, offset=TUNE_OFFSET, max_grad_norm=1.0,
                       selection="layer 0's query weight")


def main(argv=None) -> None:
    parser = options(__doc__.split("\n")[0], SIGMAS)
    parser.add_argument("--checks", nargs="+", choices=CHECKS, default=list(CHECKS), help="the checks to run")
    parser.add_argument("--prior-weight", type=float, default=PRIOR_WEIGHT, help="the prior check's weight")
    parser.add_argument("--datasets", nargs="+", choices=DATASETS, default=list(DATASETS),
                        help="only these datasets' sentences (to split a run across processes)")
    parser.add_argument("--tune", nargs="+", type=float, default=None,
                        help="only choose the prior's weight: these weights, on the tuning sentences")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.tune:
        return tune(args, argv)
    rows = measure(args.sigmas, args.sentences, args.checks, (args.prior_weight,), datasets=args.datasets)
    frame = pd.DataFrame(rows)
    print(frame.groupby(["sigma", "check"])[["token_accuracy", "exact", "seconds"]].mean().round(3).to_string())
    for check in ("new", "prior"):
        new = frame[frame["check"] == check]
        if new.empty:
            continue
        print(f"the {check} check's floor_z (exact sentences near 0, misses above):")
        print(new.groupby("sigma").apply(lambda part: pd.Series({
            "exact": int(part["exact"].sum()), "exact_max_abs_z": part.loc[part["exact"], "floor_z"].abs().max(),
            "missed_min_z": part.loc[~part["exact"], "floor_z"].min(),
            "missed_under_3": int((part.loc[~part["exact"], "floor_z"] < 3).sum())}),
            include_groups=False).to_string())
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        frame.to_csv(args.out, index=False)
        write_settings(args.out, "bench/dp_span.py", argv,
                       sigmas=args.sigmas, sentences=args.sentences, checks=args.checks, datasets=args.datasets,
                       prior_weight=args.prior_weight, max_grad_norm=1.0, selection="layer 0's query weight")


if __name__ == "__main__":
    main()
