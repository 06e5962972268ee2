"""LAMP's optimisation attack on a GPT-2-style decoder: exact share, ROUGE-1/2 and seconds, batch sizes 1 to 8.

What it measures
----------------
The client and the message of ``bench/decoder_span.py`` (GPT-2 small's
shape, ``gpt2-shape``: random seeded weights over bert-base-uncased's
vocabulary; a next-token fine-tuning step; all of layer 0 shared), attacked
by LAMP's gradient matching (Balunović et al., 2022, "LAMP: Extracting Text
from Gradients with Language Model Priors"), :func:`gilib.attack.optimization_attack`:
the candidate's layer-0 gradient is taken at the next-token loss, at the
labels its own nearest words give (:class:`gilib.attack.objectives.GradientMatcher`).
One line per sentence: whether it came back token for token (a multiset
match within its batch, :func:`decoder_span.exact_sentences`), its ROUGE-1
and ROUGE-2 (:func:`gilib.metrics.score_batch`, matched within the batch),
and its batch's seconds and final gradient distance.

Settings (:data:`ATTACK`): chapter 6's (:data:`gilib.studies.federated.ATTACK`:
cosine, reordering rounds) with a smaller budget, so that the whole bench
runs in one sitting on one thread (each Adam step runs the whole 12-layer
model forward and twice backward; the JSON has the wall time): ``--steps``
Adam steps (100), ``--starts``
random starts (20), two reordering rounds of 10 orders per sentence; and a smaller
learning rate, 0.003, for GPT-2's smaller word embeddings (initialised
with standard deviation 0.02), chosen in a trial at batch size 1 on the
attack's own gradient distance (no truth read).

Sentences: those of ``bench/decoder_span.py`` (:func:`decoder_span.attacked`),
``--batches`` per dataset and size (default 1: three batches per size).
Nothing is asserted; the seconds are for one machine, one thread.

What the random weights leave out: the attack matches gradients that every
layer above layer 0 shapes, so how close it gets depends on the weights;
a trained GPT-2 may give other numbers either way.

Usage::

    python bench/decoder_optimization.py [--sizes 1 2 4 8] [--batches 1] [--offset 300] [--steps 100]
                                         [--starts 20] [--out data/bench/decoder_optimization.csv]
"""

from __future__ import annotations

import dataclasses
import statistics
import time

import pandas as pd
import torch

from decoder_span import attacked, exact_sentences, options, save  # bench/: the script's own folder
from gilib.attack import optimization_attack
from gilib.metrics import score_batch
from gilib.studies.federated import ATTACK as CHAPTER6_ATTACK
from gilib.studies.partial import decoder_optimization_summary

ATTACK = dataclasses.replace(CHAPTER6_ATTACK, steps=100, init_candidates=20, swap_every=40, swap_candidates=10,
                             lr=0.003)
"""Chapter 6's settings with the budget cut to fit the bench (see the module's docstring)."""


def measure(sizes, count: int, offset: int, config=ATTACK) -> list[dict]:
    """One line per sentence: exact or not, ROUGE-1/2, its batch's seconds and final gradient distance."""
    rows = []
    for batch in attacked(sizes, count, offset, lambda *message: optimization_attack(*message, config)):
        result = batch.result
        # The client's truth reaches only these comparisons.
        hits = exact_sentences(result.token_ids, batch.true_batch)
        scores = score_batch(result.texts, [e.text for e in batch.examples])
        for example, tokens, hit, score in zip(batch.examples, batch.message.lengths, hits, scores):
            rows.append({**batch.line(), "row_id": example.row_id, "tokens": tokens, "exact": hit,
                         "rouge1": score["rouge1"], "rouge2": score["rouge2"], "seconds": batch.seconds,
                         "loss": result.diagnostics.loss_history[-1], "steps": config.steps})
        print(batch.size, batch.dataset, batch.index, sum(batch.message.lengths), sum(hits),
              round(statistics.fmean(s["rouge1"] for s in scores), 2), round(batch.seconds, 1), flush=True)
    return rows


def main(argv=None) -> None:
    parser = options(__doc__.split("\n")[0], batches=1)
    parser.add_argument("--steps", type=int, default=ATTACK.steps, help="Adam steps per attack")
    parser.add_argument("--starts", type=int, default=ATTACK.init_candidates,
                        help="random starts scored per sentence before the descent")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.starts < 1:
        parser.error("--steps and --starts must be at least 1")
    torch.set_num_threads(1)
    config = dataclasses.replace(ATTACK, steps=args.steps, init_candidates=args.starts)
    started = time.perf_counter()
    frame = pd.DataFrame(measure(args.sizes, args.batches, args.offset, config))
    table, _ = decoder_optimization_summary(frame)
    save(frame, table, args, argv, "bench/decoder_optimization.py", started, attack=dataclasses.asdict(config))


if __name__ == "__main__":
    main()
