"""Is the DP search's miss a search failure? The true sentence's likelihood against the sentence found.

What it measures
----------------
``bench/dp_span.py``'s DP-SGD messages (chapter 5's sentences, layer 0's
query weight, clipping norm 1, noise multiplier ``sigma``), read with the
noise model (``span_attack(..., noise=DPSGD(...).noise_std(1))``): the
most likely sentence under Gaussian noise is the one whose layer-0 inputs'
span captures the most of the message's energy, ``tr(P_X G^T G)``
(:mod:`gilib.attack.likelihood`). For each sentence and ``sigma``, the
found sentence's token accuracy and the relative difference between the
energy the *true* sentence's span captures and the found one's. A positive
difference means the search missed a likelier sentence (a better search
would help); a negative one means the likelihood itself prefers the wrong
sentence, and no search over it can find the truth.

The span's likelihood leaves the inputs' output gradients ``Delta`` free
(``G = Delta^T X``). The server also knows the model, so it can compute
each candidate's own gradient and compare it with the message: the
**model's likelihood**, the message's squared distance to the candidate's
gradient scaled by its least-squares clipping factor (what
:func:`gilib.attack.completion.polish` minimises with ``clipped=True``,
DP's noise being the same in every entry), at the label that fits best.
``model_truth_minus_found`` is the truth's distance minus the found
sentence's, over the found one's: negative where the model's likelihood
prefers the truth.

Why a search over the model's likelihood is not one token at a time
(``--single-changes``, at the given sigmas): at each position the found
sentence has wrong, with every other token as found, the true token's
rank among the vocabulary by the energy it adds to the others' span
(``true_rank_median``), whether the true token alone lowers the model's
distance (``fix_lowers``), and whether it is the best of the
:data:`CANDIDATES` tokens of most energy there (``fix_best``: the best
change at that position, when it is among them; ``in_candidates``). The
truth reaches only these comparisons.

How narrow the model's likelihood is around the truth (``--basin``, at
the given sigmas): the noise alone puts every sentence's distance at least
near ``(sigma C)^2`` per entry (the *floor*); what a sentence adds above it
is its *excess*. For each missed sentence, the found sentence's excess
over the floor (``excess_found``, a share of the floor), and, as shares of
the found sentence's excess, the truth's (``excess_truth``, near 0), the
truth's with one of the found sentence's wrong tokens put back
(``excess_one_wrong``, the mean over those positions) and with half of
them put back (``excess_half_wrong``, the mean over :data:`SUBSETS` seeded
draws). Near 1 at one wrong token: the likelihood rewards the truth only
once (nearly) every token is right, so no descent from a sentence half
right is led to it. Nothing is asserted.

Usage::

    python bench/dp_energy.py [--sigmas 3e-5 1e-4] [--sentences 4] [--single-changes 3e-5]
                              [--basin 3e-5] [--out data/bench/dp_energy.csv]
"""

from __future__ import annotations

import math
import random
import time

import pandas as pd
import torch

from dp_span import messages, options  # bench/: the script's own folder
from gilib.attack import span_attack
from gilib.attack.completion import model_distance, sentence_inputs, stacked_projections
from gilib.attack.rowspace import layer0_inputs
from gilib.attack.tokens import TokenSpace
from gilib.data import write_settings
from gilib.models import cached_model
from gilib.selection import select

SIGMAS = (3e-5, 1e-4)
"""Where token accuracy crosses one half with the noise model (bench/dp_span.py)."""

CANDIDATES = 64
"""Tokens per wrong position tried by ``--single-changes``, by the energy they add to the others' span."""

SUBSETS = 8
"""Seeded draws of half the wrong positions, per sentence, for ``--basin``."""


def captured_energy(model: torch.nn.Module, ids, gram: torch.Tensor) -> float:
    """``tr(P_X M)``: the energy of ``M = G^T G`` (``(d, d)``) in the span of sentence ``ids``'s layer-0 inputs."""
    basis = torch.linalg.qr(sentence_inputs(model, ids).T).Q
    return float(torch.trace(basis.T @ gram @ basis))


def single_changes(model: torch.nn.Module, tokens: TokenSpace, names, matrix: torch.Tensor, found, truth
                   ) -> dict:
    """At each position ``found`` has wrong: the true token's energy rank and whether fixing it alone helps.

    Returns:
        ``wrong``, ``fix_lowers`` (the true token alone lowers the model's
        distance), ``in_candidates`` (it is among the :data:`CANDIDATES`
        tokens adding the most energy to the other tokens' span), ``fix_best``
        (and is the best change of those there) and ``true_rank_median``.
    """
    gram = matrix.T @ matrix
    inputs = sentence_inputs(model, found)
    current = model_distance(model, names, matrix, found)
    counts = dict.fromkeys(("wrong", "fix_lowers", "in_candidates", "fix_best"), 0)
    ranks = []
    for p in range(1, len(found) - 1):
        if found[p] == truth[p]:
            continue
        others = torch.linalg.qr(torch.cat([inputs[:p], inputs[p + 1:]]).T).Q
        x = layer0_inputs(model, p).double()
        r = x - (x @ others) @ others.T
        added = (((r @ gram) * r).sum(1) / r.square().sum(1).clamp_min(1e-12)).masked_fill(~tokens.allowed,
                                                                                          -float("inf"))
        ranks.append(int((added > added[truth[p]]).sum()))
        fixed = model_distance(model, names, matrix, found[:p] + [truth[p]] + found[p + 1:])
        counts["wrong"] += 1
        counts["fix_lowers"] += fixed < current
        top = added.topk(CANDIDATES).indices.tolist()
        if truth[p] in top:
            counts["in_candidates"] += 1
            others_best = min(model_distance(model, names, matrix, found[:p] + [t] + found[p + 1:])
                              for t in top if t not in (truth[p], found[p]))
            counts["fix_best"] += fixed < others_best
    return {**counts, "true_rank_median": float(torch.tensor(ranks, dtype=torch.float).median()) if ranks
            else float("nan")}


def basin(model: torch.nn.Module, names, matrix: torch.Tensor, found, truth, floor: float, seed: int) -> dict:
    """The model's likelihood between the truth and ``found``: excess over the noise floor, as shares.

    Args:
        model: the victim.
        names: the stacked tensors' names.
        matrix: ``(m, d)`` the stacked message.
        found: the sentence found, ``[CLS]`` and ``[SEP]`` included.
        truth: the client's sentence, as long as ``found``.
        floor: the noise's expected squared size per entry, ``(sigma C / B)^2``.
        seed: seeds the draws of half the wrong positions.

    Returns:
        ``excess_found`` (over ``floor``, a share of it), then ``excess_truth``,
        ``excess_one_wrong`` and ``excess_half_wrong`` as shares of the found
        sentence's excess (the module docstring says what each is); NaN
        shares where the found sentence has no excess (at or below the floor).
    """
    wrong = [p for p in range(1, len(found) - 1) if found[p] != truth[p]]
    excess = {"excess_found": float("nan"), "excess_truth": float("nan"),
              "excess_one_wrong": float("nan"), "excess_half_wrong": float("nan")}
    if not wrong:
        return excess
    found_excess = model_distance(model, names, matrix, found) - floor
    if found_excess <= 0:
        # The found sentence explains the message as well as the noise allows:
        # no excess to take shares of (the truth's would divide by zero or flip sign).
        return {**excess, "excess_found": found_excess / floor}

    def share(put_back) -> float:
        ids = [found[p] if p in put_back else t for p, t in enumerate(truth)]
        return (model_distance(model, names, matrix, ids) - floor) / found_excess

    draws = random.Random(seed)
    half = math.ceil(len(wrong) / 2)
    return {"excess_found": found_excess / floor if floor > 0 else float("inf"),
            "excess_truth": share(()),
            "excess_one_wrong": sum(share({p}) for p in wrong) / len(wrong),
            "excess_half_wrong": sum(share(set(draws.sample(wrong, half))) for _ in range(SUBSETS)) / SUBSETS}


def measure(sigmas, sentences: int, diagnosed=(), basins=()) -> list[dict]:
    """Every sentence's DP-SGD message at every ``sigma``: accuracy and the truth's energy against the found one's."""
    model, tokenizer = cached_model("minilm")
    selection = select(model, "attention.query", 0)
    tokens = TokenSpace(model, tokenizer)
    rows = []
    for dataset, row_id, truth, sigma, protocol, message in messages(model, tokenizer, selection, sigmas, sentences):
        start = time.perf_counter()
        found = span_attack(model, tokenizer, message, selection, noise=protocol.noise_std(1)).token_ids[0]
        seconds = time.perf_counter() - start
        gradient = message.shared_grads[0].double()
        gram = gradient.T @ gradient
        true_energy, found_energy = captured_energy(model, truth, gram), captured_energy(model, found, gram)
        names, matrix = stacked_projections(model, selection.names, message.shared_grads)
        true_distance, found_distance = (model_distance(model, names, matrix, ids) for ids in (truth, found))
        rows.append({"dataset": dataset, "row_id": row_id, "tokens": len(truth), "sigma": sigma,
                     "token_accuracy": sum(a == b for a, b in zip(found[1:-1], truth[1:-1])) / (len(truth) - 2),
                     "exact": found == truth, "truth_minus_found": (true_energy - found_energy) / abs(found_energy),
                     "model_truth_minus_found": (true_distance - found_distance) / found_distance,
                     "seconds": seconds})
        if sigma in diagnosed:
            rows[-1].update(single_changes(model, tokens, names, matrix, found, truth))
        if sigma in basins:
            rows[-1].update(basin(model, names, matrix, found, truth, protocol.noise_std(1) ** 2, int(row_id)))
        print(rows[-1], flush=True)
    return rows


def main(argv=None) -> None:
    parser = options(__doc__.split("\n")[0], SIGMAS)
    parser.add_argument("--single-changes", nargs="*", type=float, default=[],
                        help="sigmas at which to measure the wrong positions' single changes")
    parser.add_argument("--basin", nargs="*", type=float, default=[],
                        help="sigmas at which to measure the excess of sentences between the truth and the found one")
    args = parser.parse_args(argv)
    for flag, chosen in (("--single-changes", args.single_changes), ("--basin", args.basin)):
        if set(chosen) - set(args.sigmas):
            parser.error(f"{flag} {sorted(set(chosen) - set(args.sigmas))} are not among --sigmas {args.sigmas}: "
                         f"it is measured on those sigmas' messages only.")
    torch.set_num_threads(1)
    frame = pd.DataFrame(measure(args.sigmas, args.sentences, args.single_changes, args.basin))
    missed = frame[~frame["exact"]]
    print(missed.groupby("sigma")["truth_minus_found"].agg(
        missed="size", truth_likelier=lambda s: int((s > 0).sum()), median="median").to_string())
    print("the model's likelihood:")
    print(missed.groupby("sigma")["model_truth_minus_found"].agg(
        missed="size", truth_likelier=lambda s: int((s < 0).sum()), median="median").to_string())
    if args.single_changes:
        print("single changes at the found sentence's wrong positions:")
        print(frame.groupby("sigma")[["wrong", "fix_lowers", "in_candidates", "fix_best"]].sum().to_string())
    if args.basin:
        print("the model's likelihood between the truth and the found sentence (medians over missed sentences):")
        print(missed.groupby("sigma")[["excess_found", "excess_truth", "excess_one_wrong",
                                       "excess_half_wrong"]].median().dropna().round(3).to_string())
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        frame.to_csv(args.out, index=False)
        write_settings(args.out, "bench/dp_energy.py", argv, sigmas=args.sigmas, sentences=args.sentences,
                       max_grad_norm=1.0, selection="layer 0's query weight",
                       single_changes=args.single_changes, candidates=CANDIDATES, basin=args.basin,
                       subsets=SUBSETS)


if __name__ == "__main__":
    main()
