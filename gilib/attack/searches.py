"""Searches for one sentence of a batch among the span check's candidates.

Every search scores hypotheses with a :class:`~gilib.attack.checks.SentenceCheck`:

* :func:`beam_search`, with a :class:`~gilib.attack.checks.ForwardCheck`: a
  beam over prefixes. Layer 0's attention is mostly local, so a prefix run
  alone already lies close to the check's row space, and one left-to-right
  pass closes sentences of every length;
* :func:`sweep` repairs the beam's typical mistake, two sentences joined,
  one position at a time;
* :func:`search_sentence`: an iterated local search, the only search the
  :class:`~gilib.attack.checks.OutputCheck` (no cheap per-position score)
  affords;
* :func:`enumerate_batch`: DAGER's search for encoders (Petrov et al.,
  NeurIPS 2024), as a baseline: the product of the candidate sets,
  enumerated and scored, which grows as (set size)^length. Chapter 5's
  batch study (:mod:`gilib.studies.span`) runs it beside peeling.

:func:`gilib.attack.peeling.peel` runs the first three, round after round.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

from .checks import FOUND, ForwardCheck, SentenceCheck, reads_of
from .config import BEAM
from .rowspace import check_positions, row_space
from .tokens import TokenSpace

NEW_TOKEN_WEIGHT = 3.0
"""Weight of a prefix's newest position in its beam score. That position
has no right neighbour yet, so its residual is less sure than the earlier
ones'; still, it decides most steps (after the true prefix, the true token
was among the 4 best of a bag of 144 at 89 % of the steps and among the 16
best at 93 %, in an SST-2 batch of eight; measured while developing, not
cached)."""
LAYER0_WEIGHT = 0.1
"""Weight of the newest token's layer-0 span residual (its logarithm) in
the beam score: weak evidence of its position (true tokens rank 3rd to
30th in the bag), but independent of the missing right context."""


def search_sentence(
    length: int,
    candidates: Sequence[Sequence[int]],
    check: SentenceCheck,
    tokenizer,
    generator: torch.Generator,
    *,
    restarts: int = 1,
    kicks: int = 15,
    kick_size: int = 2,
    top: int = 3,
    found: float = FOUND,
    avoid: Sequence[torch.Tensor] = (),
    start: torch.Tensor | None = None,
    stop: Callable[[], bool] | None = None,
) -> tuple[torch.Tensor, float]:
    """One sentence of ``length`` tokens, by iterated local search over the candidates.

    From a seeded random start, each step scores the moves (one position
    changed to another candidate) with ``check.loss`` and takes the best,
    until none improves; then a *kick* redraws ``kick_size`` positions,
    picked at random in proportion to their check residual (where the
    hypothesis is wrong), and the descent runs again, kept if it ends lower. Where the
    check has cheap per-position scores (:meth:`ForwardCheck.local`), a step
    scores only each position's ``top`` candidates by that score, plus the
    hypothesis that takes every position's best at once; otherwise each
    position's first ``2 * top`` candidates (by span-check residual).

    Args:
        length: the sentence's token count, ``[CLS]`` and ``[SEP]`` included.
        candidates: token ids for positions ``1 ..`` (at least ``length - 2`` of them).
        check: a :class:`ForwardCheck` or :class:`OutputCheck`.
        tokenizer: the victim's tokenizer (special tokens).
        generator: seeds the starts and kicks.
        restarts: random starts.
        kicks: perturbations per start.
        kick_size: positions a kick changes.
        top: moves per position under a local score.
        found: loss under which the search stops.
        avoid: sentences already peeled; a search ending on one counts as failed.
        start: the first start's hypothesis (e.g. the beam's best); random when ``None``.
        stop: called between steps; once it returns ``True`` the search
            ends with the best hypothesis so far (a time budget).

    Returns:
        ``(ids, loss)``: the best ``(length,)`` hypothesis and its loss.
    """
    stopped = stop if stop is not None else (lambda: False)
    options = [list(c) for c in candidates[: length - 2]]
    ends = (tokenizer.cls_token_id, tokenizer.sep_token_id)
    token_ids = torch.tensor([v for c in options for v in c])
    positions = torch.tensor([p for p, c in enumerate(options, start=1) for _ in c])
    offsets = [0]
    for c in options:
        offsets.append(offsets[-1] + len(c))

    def draw(h: torch.Tensor, where: Sequence[int]) -> torch.Tensor:
        h = h.clone()
        for p in where:
            c = options[p - 1]
            h[p] = c[int(torch.randint(len(c), (1,), generator=generator))]
        return h

    def descend(h: torch.Tensor, current: float) -> tuple[torch.Tensor, float]:
        for _ in range(4 * length):
            if current < found or stopped():
                break
            trials = []
            if check.local is not None:
                scores = check.local(h, token_ids, positions)
                jump = h.clone()
                for p in range(1, length - 1):
                    order = scores[offsets[p - 1]:offsets[p]].argsort()
                    jump[p] = options[p - 1][int(order[0])]
                    moves = [options[p - 1][int(i)] for i in order[: top + 1] if options[p - 1][int(i)] != int(h[p])]
                    trials += [(p, v) for v in moves[:top]]
                hypotheses = [jump] if not torch.equal(jump, h) else []
            else:
                # Every move costs a backward pass: each position's first candidates by span residual.
                trials = [(p, v) for p in range(1, length - 1) for v in options[p - 1][: 2 * top] if v != int(h[p])]
                hypotheses = []
            for p, v in trials:
                moved = h.clone()
                moved[p] = v
                hypotheses.append(moved)
            if not hypotheses:
                break
            stacked = torch.stack(hypotheses)
            losses = check.loss(stacked)
            k = int(losses.argmin())
            if float(losses[k]) >= current - 1e-12:
                break
            h, current = stacked[k], float(losses[k])
        return h, current

    best, best_loss = None, math.inf
    interior = list(range(1, length - 1))
    for attempt in range(restarts):
        if attempt == 0 and start is not None:
            h = start.clone()
        else:
            h = draw(torch.tensor([ends[0]] + [0] * (length - 2) + [ends[1]]), interior)
        h, current = descend(h, float(check.loss(h[None])[0]))
        for _ in range(kicks):
            if current < found and not any(torch.equal(h, a) for a in avoid) or stopped():
                break
            # Kick where the check says the hypothesis is wrong: positions drawn by their residual.
            weights = check.position_residuals(h[None])[0].clamp_min(1e-12)
            chosen = torch.multinomial(weights, min(kick_size, length - 2), generator=generator) + 1
            kicked, kicked_loss = descend(*_scored(draw(h, chosen.tolist()), check))
            if kicked_loss < current or any(torch.equal(h, a) for a in avoid):
                h, current = kicked, kicked_loss
        if current < best_loss and not any(torch.equal(h, a) for a in avoid):
            best, best_loss = h, current
        if best_loss < found or stopped():
            break
    if best is None:
        best, best_loss = h, current
    return best, best_loss


def beam_search(
    check: ForwardCheck,
    candidates: Sequence[Sequence[int]],
    lengths: Sequence[int],
    tokenizer,
    *,
    width: int = BEAM,
    layer0: torch.Tensor | None = None,
    found: float = FOUND,
    stop: Callable[[], bool] | None = None,
) -> tuple[dict[tuple[int, ...], float], dict[int, tuple[torch.Tensor, float]]]:
    """Sentences of every length at once, left to right, from one beam of prefixes.

    Layer 0's attention is mostly local, so a prefix cut off from the rest
    of its sentence keeps its positions near the row space of layer 1's
    gradient (:meth:`ForwardCheck.prefix_residuals`), and a wrong token
    shows at once. At each position every prefix of the beam is extended
    by every candidate; a cheap score (:meth:`ForwardCheck.appended`, the
    new position only) keeps ``4 * width`` extensions, the prefix's full
    residuals rank them, and ``width`` survive. Whenever the position
    reached is the end of some sentence, the beam closed with ``[SEP]`` is
    checked whole: a true sentence measures about ``1e-6``.

    Args:
        check: the forward check (layer 1's weight or layer 0's FFN).
        candidates: token ids for positions ``1 ..`` (at least ``max(lengths) - 2`` of them).
        lengths: the token counts of the sentences sought.
        tokenizer: the victim's tokenizer (special tokens).
        width: prefixes kept per position.
        layer0: ``(P, V)`` layer-0 span residuals of positions ``1 ..``
            (:func:`~gilib.attack.rowspace.check_positions`): the newest token's
            adds :data:`LAYER0_WEIGHT` times its logarithm to the score.
        found: mean residual under which a closed prefix is a sentence.
        stop: called before each position; once it returns ``True`` the
            search ends (``best`` then lacks the lengths not reached).

    Returns:
        ``(hits, best)``: every closed prefix under ``found`` with its loss,
        and per length the best closed prefix ``((n,) ids, loss)``.
    """
    lengths = sorted({int(n) for n in lengths})
    cls_id, sep_id = tokenizer.cls_token_id, tokenizer.sep_token_id
    beams = torch.tensor([[cls_id]])
    past = torch.zeros(1, dtype=torch.float64)  # each prefix's residuals summed, the newest weighted as the rest
    hits: dict[tuple[int, ...], float] = {}
    best: dict[int, tuple[torch.Tensor, float]] = {}
    for k in range(1, lengths[-1] - 1):
        if stop is not None and stop():
            break
        options = torch.tensor(list(candidates[k - 1]))
        prior = torch.zeros(len(options), dtype=torch.float64)
        if layer0 is not None:
            prior = LAYER0_WEIGHT * layer0[k - 1, options].double().clamp_min(1e-12).log()
        # Stage 1: the new position alone, for every prefix and candidate.
        cheap = past[:, None] + NEW_TOKEN_WEIGHT * check.appended(beams, options) + prior[None]
        keep = cheap.flatten().topk(min(4 * width, cheap.numel()), largest=False).indices
        parents, children = keep // len(options), keep % len(options)
        extended = torch.cat([beams[parents], options[children, None]], 1)
        # Stage 2: every position of the kept prefixes.
        residuals = check.prefix_residuals(extended)
        score = residuals[:, :-1].sum(-1) + NEW_TOKEN_WEIGHT * residuals[:, -1] + prior[children]
        order = _diverse(score, extended[:, 1], width)
        beams, past = extended[order], residuals[order].sum(-1)
        if k + 2 in lengths:
            closed = torch.cat([beams, torch.full((len(beams), 1), sep_id)], 1)
            losses = check.loss(closed)
            i = int(losses.argmin())
            best[k + 2] = (closed[i], float(losses[i]))
            hits.update({tuple(h.tolist()): float(v) for h, v in zip(closed, losses) if v < found})
    return hits, best


def _diverse(score: torch.Tensor, starts: torch.Tensor, width: int) -> torch.Tensor:
    """The ``width`` best indices by ``score``, at most half of them sharing a first word.

    One beam serves every sentence, and the sentence it follows best
    would otherwise take all of it: the others' prefixes must survive
    too. The cap keeps at least two sentence starts in the beam (more
    when the beam is wider than the best start's share); the best of the
    rest fills what the cap leaves empty.
    """
    order = score.argsort().tolist()
    cap, kept, taken, rest = max(1, width // 2), [], {}, []
    for i in order:
        start = int(starts[i])
        if taken.get(start, 0) < cap:
            kept.append(i)
            taken[start] = taken.get(start, 0) + 1
        else:
            rest.append(i)
        if len(kept) == width:
            break
    kept += rest[: width - len(kept)]
    return torch.tensor(sorted(kept, key=lambda i: float(score[i])), dtype=torch.long)


COMPLETED_STAGE = 16
"""Extensions per kept prefix that :func:`completed_beam`'s cheap first stage passes to its full check."""


def completed_beam(
    check: ForwardCheck,
    candidates: Sequence[Sequence[int]],
    length: int,
    fill: Sequence[int],
    tokenizer,
    *,
    width: int = BEAM,
    stage: int = COMPLETED_STAGE,
    layer0: torch.Tensor | None = None,
    found: float = FOUND,
    stop: Callable[[], bool] | None = None,
) -> dict[tuple[int, ...], float]:
    """A beam over the prefixes of one sentence length, each checked *completed* to that length.

    :func:`beam_search` checks a prefix cut off from the rest of its
    sentence, so its last positions miss their right neighbours' keys and
    values; in long sentences under noise a true token's newest position
    can measure worse than a wrong one's, and the beam drops the true
    prefix early. Here each prefix of ``k`` tokens is completed to
    ``length`` with ``fill`` (a guess per undecided position: the position
    split's likeliest token, :mod:`gilib.attack.positions`) and ``[SEP]``,
    and scored by the whole hypothesis's residuals at positions ``1 .. k``:
    the decided positions see a right context close to the true one.
    Dearer than :func:`beam_search` (a full forward per extension, one
    length at a time), so peeling runs it at full effort only.

    Args:
        check: the forward check.
        candidates: token ids for positions ``1 ..``.
        length: the sentence length sought (``[CLS]`` and ``[SEP]`` included).
        fill: ``length - 2`` token ids, a guess for positions ``1 .. length - 2``.
        tokenizer: the victim's tokenizer (special tokens).
        width: prefixes kept per position.
        stage: extensions per kept prefix that the cheap score
            (:meth:`ForwardCheck.appended`) passes to the full check.
        layer0: ``(P, V)`` layer-0 span residuals (a prior, as in :func:`beam_search`).
        found: mean residual under which a closed hypothesis is a sentence.
        stop: called before each position; once it returns ``True`` the search ends.

    Returns:
        Every closed hypothesis under ``found``, with its loss.
    """
    if len(fill) != length - 2:
        raise ValueError(f"fill must hold length - 2 = {length - 2} token ids, got {len(fill)}.")
    cls_id, sep_id = tokenizer.cls_token_id, tokenizer.sep_token_id
    beams = torch.tensor([[cls_id]])
    tail = torch.tensor([*map(int, fill), sep_id])  # tail[p - 1]: the guess at position p
    for k in range(1, length - 1):
        if stop is not None and stop():
            return {}
        options = torch.tensor(list(candidates[k - 1]))
        prior = torch.zeros(len(options), dtype=torch.float64)
        if layer0 is not None:
            prior = LAYER0_WEIGHT * layer0[k - 1, options].double().clamp_min(1e-12).log()
        cheap = check.appended(beams, options).double() + prior[None]
        keep = cheap.flatten().topk(min(stage * width, cheap.numel()), largest=False).indices
        parents, children = keep // len(options), keep % len(options)
        extended = torch.cat([beams[parents], options[children, None]], 1)
        completed = torch.cat([extended, tail[k:].expand(len(extended), -1)], 1)
        residuals = check.position_residuals(completed)  # (K, length - 2): positions 1 .. length - 2
        score = residuals[:, :k].sum(-1) + prior[children]
        beams = extended[_diverse(score, extended[:, 1], width)]
    closed = torch.cat([beams, torch.full((len(beams), 1), sep_id)], 1)
    losses = check.loss(closed)
    return {tuple(h.tolist()): float(v) for h, v in zip(closed, losses) if v < found}


def sweep(
    check: ForwardCheck,
    candidates: Sequence[Sequence[int]],
    start: torch.Tensor,
    *,
    width: int = BEAM,
    reverse: bool = False,
    found: float = FOUND,
    stop: Callable[[], bool] | None = None,
) -> tuple[torch.Tensor, float]:
    """A beam over one whole sentence, position by position, from a start hypothesis.

    Where :func:`beam_search` goes wrong, its best hypothesis is often two
    true sentences joined (one's first half, another's second): every
    position but those near the joint has the right neighbours. The sweep
    keeps ``width`` whole hypotheses and at each position in turn tries
    every candidate there (ranked cheaply by :meth:`ForwardCheck.local`,
    then ``4 * width`` checked whole), so the joint can travel to the
    sentence's end, one position at a time, while the rest stays fixed.

    Args:
        check: the forward check (layer 1's weight or layer 0's FFN).
        candidates: token ids for positions ``1 ..``.
        start: ``(n,)`` the hypothesis to improve.
        width: hypotheses kept.
        reverse: sweep from the last position to the first.
        found: loss under which the sweep stops.
        stop: called before each position; once it returns ``True`` the
            sweep ends with the best hypothesis met.

    Returns:
        ``(ids, loss)``: the best ``(n,)`` hypothesis met and its loss.
    """
    n = len(start)
    beams = start[None].clone()
    residuals = check.position_residuals(beams)
    best, best_loss = beams[0], float(residuals.mean())
    positions = range(n - 2, 0, -1) if reverse else range(1, n - 1)
    for p in positions:
        if best_loss < found or (stop is not None and stop()):
            break
        options = torch.tensor(list(candidates[p - 1]))
        cheap = (residuals.sum(-1) - residuals[:, p - 1])[:, None] \
            + check.local(beams, options, torch.full_like(options, p))
        keep = cheap.flatten().topk(min(4 * width, cheap.numel()), largest=False).indices
        moved = beams[keep // len(options)].clone()
        moved[:, p] = options[keep % len(options)]
        moved = torch.unique(torch.cat([beams, moved]), dim=0)
        scored = check.position_residuals(moved)
        order = scored.sum(-1).argsort()[:width]
        beams, residuals = moved[order], scored[order]
        if float(residuals[0].mean()) < best_loss:
            best, best_loss = beams[0], float(residuals[0].mean())
    return best, best_loss


def _scored(h: torch.Tensor, check) -> tuple[torch.Tensor, float]:
    return h, float(check.loss(h[None])[0])


def enumerate_batch(
    model: torch.nn.Module,
    tokenizer,
    names: Sequence[str],
    shared_grads: Sequence[torch.Tensor],
    weight: str,
    verifier: str,
    lengths: Sequence[int],
    *,
    threshold: float,
    budget: int = 5000,
    seed: int = 0,
    chunk: int = 500,
) -> torch.Tensor:
    """DAGER's search for encoders, as a baseline: enumerate, score with layer 1, keep the best.

    For each length, every sentence in the product of the positions'
    candidate sets is scored by :class:`ForwardCheck` when the product holds
    at most ``budget`` sentences; otherwise ``budget`` seeded random draws
    from it are (DAGER's own cap on combinations). The best distinct
    hypotheses fill the sentences of that length. No peeling: the
    candidate sets are those of the whole batch.

    Args:
        model, tokenizer, names, shared_grads, weight, lengths, threshold:
            as for :func:`peel`.
        verifier: the weight for :class:`ForwardCheck` (required).
        budget: sentences scored per length at most.
        seed: seeds the random draws.
        chunk: sentences scored per call.

    Returns:
        ``(B, T)`` token ids in the order of ``lengths``, padded with ``[PAD]``.
    """
    lengths = [int(n) for n in lengths]
    grads = dict(zip(names, shared_grads))
    _, _, candidates = check_positions(model, TokenSpace(model, tokenizer), grads[weight], lengths,
                                       shift_invariant=weight.endswith("key.weight"), threshold=threshold,
                                       capped=False)
    check = ForwardCheck(model, row_space(grads[verifier], max_rank=sum(lengths)), reads_of(verifier))
    generator = torch.Generator().manual_seed(seed)
    ids = torch.full((len(lengths), max(lengths)), tokenizer.pad_token_id)
    for n in sorted(set(lengths)):
        options = [torch.tensor(c) for c in candidates[: n - 2]]
        size = math.prod(len(c) for c in options)
        if size <= budget:
            grid = torch.cartesian_prod(*options) if len(options) > 1 else options[0][:, None]
            grid = grid.reshape(-1, n - 2)
        else:
            grid = torch.stack([c[torch.randint(len(c), (budget,), generator=generator)] for c in options], 1)
        ends = torch.tensor([tokenizer.cls_token_id, tokenizer.sep_token_id])
        hypotheses = torch.cat([ends[0].expand(len(grid), 1), grid, ends[1].expand(len(grid), 1)], 1)
        losses = torch.cat([check.loss(part) for part in hypotheses.split(chunk)])
        slots = [i for i, m in enumerate(lengths) if m == n]
        chosen: list[torch.Tensor] = []
        for k in losses.argsort().tolist():
            if len(chosen) == len(slots):
                break
            if not any(torch.equal(hypotheses[k], c) for c in chosen):
                chosen.append(hypotheses[k])
        for i, h in zip(slots, chosen):
            ids[i, :n] = h
    return ids
