"""The most likely sentence behind a noisy layer-0 gradient: a matched-subspace search.

DP-SGD sends a layer-0 query or value weight's gradient ``G = Delta X^T``
plus Gaussian noise of the same size in every entry (``X``: ``(n, d)`` the
sentence's layer-0 inputs, ``Delta`` unknown). For a hypothesised sentence
the least-squares ``Delta`` leaves ``||G - G P_X||^2``, ``P_X`` the
projection onto the span of its inputs, so the maximum-likelihood sentence
is the one whose inputs' span captures the most of the gradient's energy,
``tr(P_X G^T G)``: the matched subspace detector (Scharf and Friedlander,
IEEE Trans. Signal Processing, 1994) over a finite set of subspaces.

The span check asks of each token alone whether its input lies in the
gradient's leading singular directions; under noise those directions tilt
and the check fails token by token. Here a token counts by the energy its
input adds to the others' span, ``r^T M r / r^T r`` with ``M = G^T G`` and
``r`` the part of its input outside the others' span: noise adds the same
energy ``s^2 d_out`` to every direction, so it cannot favour a wrong token,
only blur the margins.

The search (our own; the likelihood is standard): each position keeps its
:data:`CANDIDATES` tokens of largest energy alone; a greedy pursuit
(orthogonal matching pursuit, Pati, Rezaiifar and Krishnaprasad, 1993)
then adds, one at a time, the position and token that add the most energy
to what is chosen ([CLS] and [SEP] first), and coordinate ascent re-picks
each position given all the others until none changes.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .priors import NgramPrior
from .rowspace import layer0_inputs
from .tokens import TokenSpace

SWEEPS = 8
"""Coordinate-ascent passes over the positions at most."""
RECHECK = 16
"""Each choice's best tokens, rescored in float64 (the search itself runs in float32)."""


def likely_sentence(model: torch.nn.Module, tokens: TokenSpace, gradient: torch.Tensor, length: int, *,
                    starts: Sequence[Sequence[int]] = (), sweeps: int = SWEEPS, prior: NgramPrior | None = None,
                    prior_weight: float = 0.0, noise: float | None = None,
                    scores: bool = False) -> list[int] | tuple[list[int], torch.Tensor]:
    """The sentence of ``length`` tokens whose layer-0 inputs capture the most of ``gradient``'s energy.

    Every allowed token competes at every position (a pre-selection by a
    token's energy alone loses the true tokens: every input shares much of
    its direction with the others). Each position's inputs are formed
    once and kept, ``(V, d)`` in float32 per interior position (47 MB for
    MiniLM: 2.8 GB for a sentence of 60 tokens); the pursuit extends each
    position's projections onto the chosen span by one column per step.

    Args:
        model: the victim (a BERT).
        tokens: its token space (which tokens may be output).
        gradient: ``(d_out, d)`` a layer-0 query or value weight's noisy gradient.
        length: the sentence's token count, ``[CLS]`` and ``[SEP]`` included.
        starts: other sentences to start the coordinate ascent from (e.g.
            the span check's, each position's smallest residual); the
            result is the most likely of the ascents from them and from
            the pursuit. The pursuit can commit early to a token that
            covers two true ones in part, a trap that one change at a time
            does not leave.
        sweeps: coordinate-ascent passes at most (:data:`SWEEPS`).
        prior: a language prior over token ids: the search then ends in the
            most *probable* sentence, the captured energy over ``2 noise^2``
            (the log-likelihood in nats, up to a constant) plus
            ``prior_weight`` times the sentence's log-prior, by a coordinate
            ascent from each ascent's result above (each position scores the
            whole vocabulary at once: :meth:`NgramPrior.position_log_probs`).
        prior_weight: the prior's weight (1: Bayes' rule with this
            likelihood; see :data:`gilib.attack.config.SpanConfig`).
        noise: the message's noise standard deviation per entry (with ``prior``).
        scores: also return every token's score at each interior position,
            the others as found: the energy it adds to their span, plus the
            weighted log-prior with ``prior`` (``-inf`` for tokens never
            output), from the search's last sweep.

    Returns:
        The sentence's token ids, ``[CLS]`` and ``[SEP]`` included; with
        ``scores``, ``(ids, scores)``, scores ``(length - 2, V)`` float32.
    """
    tokenizer = tokens.tokenizer
    ends = {0: tokenizer.cls_token_id, length - 1: tokenizer.sep_token_id}
    interior = list(range(1, length - 1))
    if prior is not None and (noise is None or not noise > 0 or not prior_weight >= 0):
        raise ValueError(f"A prior needs the message's noise (a positive standard deviation, got {noise!r}) and a "
                         f"weight of at least 0 (got {prior_weight!r}).")
    if not interior:
        ids = [ends[0], ends[length - 1]]
        return (ids, torch.empty(0, len(tokens.allowed))) if scores else ids
    gram = gradient.detach().double()
    gram = gram.T @ gram  # M = G^T G, (d, d)
    gram32 = gram.float()
    banned = ~tokens.allowed.to(gram.device)
    inputs = {p: layer0_inputs(model, p).to(gram.device) for p in interior}  # (V, d) float32 each
    own = {p: ((inputs[p] @ gram32) * inputs[p]).sum(1) for p in interior}  # x M x
    norms = {p: inputs[p].square().sum(1) for p in interior}

    def gains(p: int, a: torch.Tensor, b: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
        """Energy each token adds at ``p`` to the span of ``basis`` ``(d, k)``; ``a = x Q``, ``b = x M Q``."""
        inner = basis.T @ gram32 @ basis
        added = (own[p] - 2 * (a * b).sum(1) + ((a @ inner) * a).sum(1)) \
            / (norms[p] - a.square().sum(1)).clamp_min(1e-6 * float(norms[p].mean()))
        return added.masked_fill(banned, -float("inf"))

    def exact_best(p: int, scores: torch.Tensor, basis: torch.Tensor,
                   bonus: torch.Tensor | None = None) -> tuple[float, int]:
        """The best of the float32 leaders, rescored in float64 (``bonus``: ``(V,)`` added to both)."""
        if bonus is not None:
            scores = scores + bonus.to(scores)
        top = scores.topk(RECHECK).indices
        x, q = inputs[p][top].double(), basis.double()
        r = x - (x @ q) @ q.T
        exact = ((r @ gram) * r).sum(1) / r.square().sum(1)
        if bonus is not None:
            exact = exact + bonus[top]
        k = int(exact.argmax())
        return float(exact[k]), int(top[k])

    # A log-prior in the energy's units: the log-likelihood is the captured
    # energy over 2 noise^2, so a nat of prior is worth 2 noise^2 of energy.
    scale = 0.0 if prior is None else 2 * noise ** 2 * prior_weight

    def bonus(p: int, picks: dict) -> torch.Tensor:
        """The prior's weighted log-probability of every token at ``p``, the others as picked: ``(V,)``."""
        return scale * prior.position_log_probs([picks[q] for q in interior], p - 1).to(gram.device)

    def ascend(picks: dict, chosen: dict, with_prior: bool = False) -> tuple[float, dict, dict]:
        """Coordinate ascent, each position given all the others: ``(objective, picks, last scores)``.

        The objective is the captured energy, plus the weighted log-prior
        ``with_prior``; the last scores, each position's ``(V,)`` float32
        energy gains (without the prior) from the last sweep.
        """
        picks, chosen, last = dict(picks), dict(chosen), {}
        for _ in range(sweeps):
            changed = False
            for p in interior:
                others = torch.stack([v for q, v in chosen.items() if q != p]).T.double()
                basis = torch.linalg.qr(others).Q.float()
                last[p] = gains(p, inputs[p] @ basis, inputs[p] @ (gram32 @ basis), basis)
                _, t = exact_best(p, last[p], basis, bonus(p, picks) if with_prior else None)
                if t != picks[p]:
                    picks[p], chosen[p], changed = t, inputs[p][t], True
            if not changed:
                break
        span = torch.linalg.qr(torch.stack(list(chosen.values())).T.double()).Q
        energy = float(torch.trace(span.T @ gram @ span))
        if with_prior:
            energy += scale * -prior([picks[q] for q in interior]) * (len(interior) + 1)
        return energy, picks, last

    chosen = {p: layer0_inputs(model, p, token_ids=[t])[0].to(gram.device) for p, t in ends.items()}
    basis = torch.linalg.qr(torch.stack(list(chosen.values())).T.double()).Q.float()
    proj = {p: inputs[p] @ basis for p in interior}
    proj_m = {p: inputs[p] @ (gram32 @ basis) for p in interior}
    picks: dict[int, int] = {}
    while len(picks) < len(interior):  # greedy pursuit: one (position, token) per step
        _, t, p = max((*exact_best(q, gains(q, proj[q], proj_m[q], basis), basis), q)
                      for q in interior if q not in picks)
        picks[p], chosen[p] = t, inputs[p][t]
        # One new orthonormal direction: every position's projections gain a column.
        v = chosen[p].double() - (chosen[p].double() @ basis.double()) @ basis.double().T
        v = (v / v.norm()).float()
        basis, mv = torch.cat([basis, v[:, None]], 1), gram32 @ v
        for q in interior:
            if q not in picks:
                proj[q] = torch.cat([proj[q], (inputs[q] @ v)[:, None]], 1)
                proj_m[q] = torch.cat([proj_m[q], (inputs[q] @ mv)[:, None]], 1)
    ascents = [ascend(picks, chosen)]
    for start in starts:
        start = [int(t) for t in start]
        if len(start) != length:
            raise ValueError(f"A start has {len(start)} tokens; the sentence has {length}.")
        begun = {p: start[p] for p in interior}
        ascents.append(ascend(begun, {**{p: chosen[p] for p in ends},
                                      **{p: inputs[p][t] for p, t in begun.items()}}))
    if prior is not None:
        # The most probable sentence: the prior re-picks from every ascent's end.
        ascents = [ascend(picks, {**{p: chosen[p] for p in ends}, **{p: inputs[p][t] for p, t in picks.items()}},
                          with_prior=True) for _, picks, _ in ascents]
    _, picks, last = max(ascents, key=lambda a: a[0])
    ids = [ends[0], *(picks[p] for p in interior), ends[length - 1]]
    if not scores:
        return ids
    if prior is not None:
        last = {p: last[p] + bonus(p, picks).to(last[p]) for p in interior}
    return ids, torch.stack([last[p] for p in interior])
