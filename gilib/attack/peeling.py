"""A batch's sentences, found one at a time and peeled off the shared gradient.

The client's gradient is the mean over its batch, so a sentence ``s`` with
label ``y`` adds exactly ``grad CE(s, y) / B`` to every shared weight
gradient. Subtracting the right sentence with the right label leaves the
gradient of the other sentences, whose rank is smaller (:func:`peel_test`):
this verifies the sentence exactly, tells its label (so the client's labels
are not needed), and shrinks the row space, so that the candidate sets of
the remaining sentences are cleaner at every round. :func:`peel` finds the
sentences with the searches of :mod:`gilib.attack.searches` and the checks
of :mod:`gilib.attack.checks`. The attacker must know the batch's token
counts (``lengths``, as in LAMP's threat model) and the client's loss (mean
cross-entropy), and nothing else.
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass
from typing import Sequence

import torch

from .checks import FOUND, ForwardCheck, OutputCheck, SentenceCheck, reads_of
from .config import SpanConfig
from .positions import bag_filled, bag_shares, position_sets
from .rowspace import check_positions, row_space
from .searches import beam_search, completed_beam, search_sentence, sweep
from .tokens import TokenSpace

SWEEP_SHARE = 4.0
"""Below full effort, the sweeps of a round stop once they have run this
many times as many token positions through the check as the round's beam
search did (:attr:`~gilib.attack.checks.ForwardCheck.forwarded`). A count,
not a clock, so that the same batch gives the same sentences on any machine
and under any load; the two searches run about as many positions a second,
so this is about as many times the beam's time."""

PEELED = 1e-5
"""Relative singular value at the gradient's numerical rank less one, after
a sentence's gradient is subtracted, under which the sentence (and its
label) is right (:func:`_peel_label`). Without noise the right subtraction leaves float32 round-off
(1e-7 to 1e-6); a wrong sentence or label leaves its own directions, 1e-4
and more."""


def sentence_gradients(model: torch.nn.Module, names: Sequence[str], ids: torch.Tensor, label: int,
                       batch_size: int) -> list[torch.Tensor]:
    """What one sentence adds to a batch's mean-loss gradient: ``grad CE(ids, label) / batch_size``."""
    params = dict(model.named_parameters())
    device = next(model.parameters()).device
    ids = ids.reshape(1, -1).to(device)
    with torch.enable_grad():
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        loss = torch.nn.functional.cross_entropy(logits, torch.tensor([label], device=device)) / batch_size
        grads = torch.autograd.grad(loss, [params[n] for n in names])
    return [g.detach() for g in grads]


def peel_test(gradient: torch.Tensor, contribution: torch.Tensor, rank: int) -> float:
    """How far ``gradient - contribution`` is from rank ``rank``: its ``rank``-th singular value, relative.

    Args:
        gradient: ``(d_out, d_in)`` what is left of the shared weight gradient.
        contribution: one sentence's part of it (:func:`sentence_gradients`).
        rank: the remaining sentences' token count (an upper bound of their rank).
    """
    values = torch.linalg.svdvals((gradient - contribution).double())
    if rank >= len(values):
        raise ValueError(f"Cannot test rank {rank} of a gradient with {len(values)} singular values.")
    return float(values[rank] / torch.linalg.svdvals(gradient.double())[0])


@dataclass
class Peeled:
    """The outcome of :func:`peel`.

    Attributes:
        ids: ``(B, T)`` token ids, padded with ``[PAD]``, in the order of ``lengths``.
        found: per sentence, whether it was verified by peeling.
        labels: per sentence, the label its peeling showed (``None`` if not found).
        uncertain: per sentence, the positions whose check residual stayed
            above :data:`FOUND` (empty for a found sentence).
        rounds: the peeling rounds run.
        timed_out: whether the time budget ended the peeling early.
    """

    ids: torch.Tensor
    found: list[bool]
    labels: list[int | None]
    uncertain: list[list[int]]
    rounds: int
    timed_out: bool = False


def peel(
    model: torch.nn.Module,
    tokenizer,
    names: Sequence[str],
    shared_grads: Sequence[torch.Tensor],
    weight: str,
    verifier: str | None,
    lengths: Sequence[int],
    config: SpanConfig = SpanConfig(),
    *,
    deadline: float | None = None,
    noise: float | str | None = None,
) -> Peeled:
    """Recover a batch sentence by sentence, peeling each off the shared gradients.

    Every round: candidate sets from what is left of the layer-0 weight's
    gradient (:func:`~gilib.attack.rowspace.token_residuals`); with a
    :class:`~gilib.attack.checks.ForwardCheck`, one
    :func:`~gilib.attack.searches.beam_search` for every remaining length
    at once, and each sentence it closes that passes :func:`peel_test` for
    some class is subtracted from every shared weight gradient. Where that
    peels nothing: at full effort, :func:`~gilib.attack.searches.completed_beam`
    for each length left, shortest first; then
    :func:`~gilib.attack.searches.sweep` from the beam's best of each
    length (below full effort for at most :data:`SWEEP_SHARE` times the
    beam's work); then, at full effort (or with the
    :class:`~gilib.attack.checks.OutputCheck`, at once),
    :func:`~gilib.attack.searches.search_sentence` until one sentence
    passes. Each peel cleans the next round's candidate sets and check. A
    round that finds none is rerun with more search (up to
    ``config.max_effort`` times as much); then the sentences left get the
    searches' best hypotheses, with their uncertain positions.

    Args:
        model: the victim, as the server holds it.
        tokenizer: its tokenizer.
        names: the parameter names of ``shared_grads``.
        shared_grads: what the client sent, one gradient per name.
        weight: the layer-0 query, key or value weight to take candidates from.
        verifier: the weight for a :class:`~gilib.attack.checks.ForwardCheck`
            (layer 1's query or value weight, or layer 0's FFN weights:
            :func:`~gilib.attack.checks.reads_of`), or ``None`` for an
            :class:`~gilib.attack.checks.OutputCheck` on ``weight``.
        lengths: the B token counts.
        config: the span check's settings (threshold, restarts, kicks,
            max_effort, beam, seed).
        deadline: a :func:`time.perf_counter` reading after which the
            searches stop and the sentences left get their best guesses
            (``Peeled.timed_out``); ``None`` for no limit.
        noise: a noise model of the message (:func:`~gilib.attack.rowspace.row_space`):
            each round's candidate sets are then z-scores against it, and
            the peel test's rank drop is judged against its floor.
    """
    return _Peeler(model, tokenizer, names, shared_grads, weight, verifier, lengths, config, deadline,
                   noise).run()


class _Peeler:
    """One peeling: what is left of the gradients, the sentences found so far, and the search effort.

    :meth:`run` repeats rounds; a round takes fresh candidate sets and a
    fresh check from what is left (:meth:`_start_round`), then tries its
    searches in turn (:meth:`_beam`, :meth:`_completed`, :meth:`_sweep`, :meth:`_local_search`),
    each sentence a search closes going through :meth:`_take`; the effort
    doubles after a fruitless round (:meth:`_next_effort`) and the
    sentences left at the end get the searches' best guesses
    (:meth:`_fill_remaining`).
    """

    def __init__(self, model, tokenizer, names, shared_grads, weight, verifier, lengths, config: SpanConfig,
                 deadline: float | None = None, noise: float | str | None = None):
        self.model, self.tokenizer, self.weight, self.verifier, self.config = model, tokenizer, weight, verifier, config
        self.lengths = [int(n) for n in lengths]
        self.batch = len(self.lengths)
        self.grads = {n: g.detach().clone() for n, g in zip(names, shared_grads) if n.endswith(".weight")}
        self.tokens = TokenSpace(model, tokenizer)
        self.generator = torch.Generator().manual_seed(config.seed)
        self.classes = list(range(int(getattr(model.config, "num_labels", 2))))
        self.module = model.get_submodule(weight.rsplit(".", 1)[0])
        self.remaining = list(range(self.batch))
        self.ids = torch.full((self.batch, max(self.lengths)), tokenizer.pad_token_id)
        self.found, self.labels = [False] * self.batch, [None] * self.batch
        self.uncertain: list[list[int]] = [[] for _ in range(self.batch)]
        self.peeled: list[torch.Tensor] = []
        self.last: dict[int, tuple[torch.Tensor, float]] = {}  # per length, the best hypothesis met
        self.rounds, self.effort = 0, 1
        self.deadline, self.timed_out = deadline, False
        self.noise = noise

    def _out_of_time(self) -> bool:
        """Whether the time budget is spent (and, once it is, say so in the result)."""
        if self.deadline is not None and time.perf_counter() >= self.deadline:
            self.timed_out = True
        return self.timed_out

    def run(self) -> Peeled:
        check = candidates = None
        while self.remaining and not self._out_of_time():
            self.rounds += 1
            left, candidates, layer0, check = self._start_round()
            work = getattr(check, "forwarded", 0)  # the beam's work, a count (only a ForwardCheck sweeps)
            hits, best = self._beam(check, candidates, left, layer0)
            beam_work = getattr(check, "forwarded", 0) - work
            progress = False
            for h in sorted(hits, key=hits.get):  # every sentence the beam closed, best first
                progress |= self._take(torch.tensor(h))
            full = self.effort == self.config.max_effort
            if not progress and self.verifier is not None and full and not self._out_of_time():
                progress = self._completed(check, candidates, left, layer0)
            if not progress and self.verifier is not None and not self._out_of_time():
                # Below full effort the sweeps are a side bet: capped at a few times the beam's own work.
                cap = None if full else check.forwarded + SWEEP_SHARE * beam_work
                progress = self._sweep(check, candidates, left, best, cap)
            if not progress and (self.verifier is None or self.effort == self.config.max_effort) \
                    and not self._out_of_time():
                progress = self._local_search(check, candidates, left, best)
            if not self._next_effort(progress):
                break
        if check is None:  # out of time before the first round: candidates and a check for the guesses
            left, candidates, _, check = self._start_round()
        self._fill_remaining(check, candidates)
        # Out of time only counts if it left sentences unfound.
        return Peeled(self.ids, self.found, self.labels, self.uncertain, self.rounds,
                      self.timed_out and bool(self.remaining))

    def _start_round(self):
        """``(lengths left, candidate sets, layer-0 residuals, check)`` from what is left of the gradients."""
        left = [self.lengths[i] for i in self.remaining]
        tokens_left = sum(left)
        _, layer0, candidates = check_positions(self.model, self.tokens, self.grads[self.weight], left,
                                                shift_invariant=self.weight.endswith("key.weight"),
                                                threshold=self.config.threshold, capped=False, noise=self.noise)
        last = self.effort == self.config.max_effort > 1
        if self.config.positions and not last and bag_filled(candidates, left):
            # The sets are the bag of words: the gradient's position parts give the word order back.
            # The repeated words join every set only once a round has found nothing without them,
            # and at full effort the search has the whole bag again (a word the split missed).
            candidates = position_sets(self.model, self.grads[self.weight], candidates, left,
                                       (self.tokenizer.cls_token_id, self.tokenizer.sep_token_id),
                                       repeated=self.effort > 1)
        if self.verifier is not None:
            space = row_space(self.grads[self.verifier], max_rank=tokens_left)
            # Under noise, exact residuals: the sketch's spread would blur near-true hypotheses.
            check: SentenceCheck = ForwardCheck(self.model, space, reads_of(self.verifier),
                                                sketch=self.noise is None)
        else:
            space = row_space(self.grads[self.weight].T, max_rank=tokens_left)
            check = OutputCheck(self.model, self.module, space, self.classes)
        return left, candidates, layer0, check

    def _beam(self, check, candidates, left, layer0):
        """The beam search's closed sentences and best hypotheses (a :class:`ForwardCheck` only)."""
        if self.verifier is None:
            return {}, {}
        hits, best = beam_search(check, candidates, left, self.tokenizer, width=self.config.beam * self.effort,
                                 layer0=layer0, stop=self._out_of_time)
        for n, (h, loss) in best.items():
            self.last[n] = (h, loss)
        return hits, best

    def _completed(self, check, candidates, left, layer0) -> bool:
        """At full effort, one :func:`~gilib.attack.searches.completed_beam` per length left, shortest first.

        Each prefix is completed with the position split's likeliest token at
        every undecided position (:func:`~gilib.attack.positions.position_shares`;
        the best layer-0 residual among the candidates where the split is
        not unique).
        """
        bag, shares = bag_shares(self.model, self.grads[self.weight], candidates,
                                 (self.tokenizer.cls_token_id, self.tokenizer.sep_token_id), max(left))
        index = {t: j for j, t in enumerate(bag)}

        def likeliest(p: int) -> int:
            options = [int(t) for t in candidates[p - 1]]
            if shares is None:
                return min(options, key=lambda t: float(layer0[p - 1, t]))
            return max(options, key=lambda t: float(shares[index[t], p]))

        for n in sorted(set(left)):
            if self._out_of_time():
                return False
            hits = completed_beam(check, candidates, n, [likeliest(p) for p in range(1, n - 1)], self.tokenizer,
                                  width=max(self.config.beam * self.effort // 2, 1), layer0=layer0, stop=self._out_of_time)
            for h in sorted(hits, key=hits.get):
                if self._take(torch.tensor(h)):
                    return True
        return False

    def _sweep(self, check, candidates, left, best, until: float | None = None) -> bool:
        """Sweeps, forth and back, from the beam's best of each length, shortest first, until the check's
        :attr:`~gilib.attack.checks.ForwardCheck.forwarded` reaches ``until`` (``None``: no limit)."""

        def stop() -> bool:
            return self._out_of_time() or (until is not None and check.forwarded >= until)

        for n in sorted(set(left)):
            if n not in best:  # the beam ran out of time before this length
                continue
            h, loss = best[n]
            for reverse in (False, True):
                h, loss = sweep(check, candidates, h, width=self.config.beam * self.effort, reverse=reverse,
                                stop=stop)
                if loss < self.last[n][1]:
                    self.last[n] = (h, loss)
                if loss < FOUND:
                    break
            if loss < 100 * FOUND and self._take(h):
                return True
            if stop():
                break
        return False

    def _local_search(self, check, candidates, left, best) -> bool:
        """The local search, from the beam's best where there is one, shortest length first."""
        cfg = self.config
        for n in sorted(set(left)):
            h, loss = search_sentence(n, candidates, check, self.tokenizer, self.generator,
                                      restarts=cfg.restarts * self.effort, kicks=cfg.kicks * self.effort,
                                      avoid=self.peeled, start=best.get(n, (None,))[0], stop=self._out_of_time)
            if loss < self.last.get(n, (None, math.inf))[1]:
                self.last[n] = (h, loss)
            if loss < 100 * FOUND and self._take(h):
                return True
        return False

    def _take(self, h: torch.Tensor) -> bool:
        """Peel ``h`` off the gradients if it passes the peel test for some class (and count of copies)."""
        n = len(h)
        slots = [i for i in self.remaining if self.lengths[i] == n]
        if not slots:
            return False
        labels, parts = _peel_label(self.model, self.grads, self.weight, h, self.classes, self.batch,
                                    sum(self.lengths[i] for i in self.remaining), self.noise, copies=len(slots))
        if labels is None:
            return False
        for name, part in zip(self.grads, parts):
            self.grads[name] = self.grads[name] - part.to(self.grads[name].device)
        for slot, label in zip(slots, labels):  # a sentence the client holds twice fills two slots
            self.remaining.remove(slot)
            self.ids[slot, :n], self.found[slot], self.labels[slot] = h, True, label
        self.peeled.append(h)
        return True

    def _next_effort(self, progress: bool) -> bool:
        """Reset the effort after a peel, double it after a fruitless round; ``False`` once it is spent."""
        if progress:
            self.effort = 1
        elif self.effort < self.config.max_effort:
            self.effort *= 2  # a round that found nothing is run again, searching longer
        else:
            return False
        return True

    def _fill_remaining(self, check, candidates) -> None:
        """The sentences not found get the best hypothesis met for their length, and their uncertain positions."""
        for i in self.remaining:
            n = self.lengths[i]
            h, _ = self.last.get(n) or search_sentence(n, candidates, check, self.tokenizer, self.generator,
                                                       restarts=self.config.restarts, kicks=self.config.kicks,
                                                       avoid=self.peeled, stop=self._out_of_time)
            self.ids[i, :n] = h
            per_position = check.position_residuals(h[None])[0]
            self.uncertain[i] = [p + 1 for p, r in enumerate(per_position.tolist()) if r >= FOUND]


def _peel_label(model, grads, weight, h, classes, batch, tokens_left,
                noise=None, copies: int = 1) -> tuple[tuple[int, ...] | None, list[torch.Tensor]]:
    """The labels whose subtraction lowers the gradient's rank, if some do (under :data:`PEELED`).

    The rank tested is the gradient's own numerical rank, less one, not
    the token count: in a large batch whose words repeat (``[CLS]`` in
    every sentence, "the" at position 1 in many) the rank sits far below
    the token count (134 for 202 tokens in a CoLA batch of 16), and at
    the token count every label passes. A sentence shares at least one
    input with no other (its ``[CLS]`` aside), so the right label lowers
    the rank by one or more, and a wrong label leaves its sentence's
    directions in. Every class is tested and the best kept. Under a noise
    model the rank is read against the noise and the test passes below
    the larger of :data:`PEELED` and the rank's noise floor (relative).

    A sentence the client holds ``m`` times (a batch of one sentence
    repeated, a duplicated example) adds ``m`` times its gradient: taking
    one copy off leaves the others' directions in, and the rank never
    drops. Where one copy passes no test, ``2 .. copies`` copies are tried
    with every multiset of labels; taking off too many leaves the
    sentence's directions in as well (with the opposite sign), so only the
    true count passes.

    Args:
        copies: the most copies to try: the sentences left of ``h``'s length.

    Returns:
        ``(labels, parts)``: one class per copy peeled (``None`` if no
        count and labels pass) and the copies' summed gradient on every
        weight of ``grads``, in order.
    """
    names = list(grads)
    space = row_space(grads[weight], max_rank=tokens_left, noise=noise)
    rank = space.rank - 1
    passes = PEELED if space.noise == 0 else max(PEELED, space.tolerance / float(space.singular_values[0]))
    one = {label: sentence_gradients(model, names, h, label, batch) for label in classes}
    for count in range(1, max(int(copies), 1) + 1):
        scores, parts = {}, {}
        for labels in itertools.combinations_with_replacement(classes, count):
            parts[labels] = [sum(one[y][k] for y in labels) for k in range(len(names))]
            part = parts[labels][names.index(weight)]
            scores[labels] = peel_test(grads[weight], part.to(grads[weight].device), rank)
        best = min(scores, key=scores.get)
        if scores[best] < passes:
            return best, parts[best]
    return None, []
