"""Which position each token of a large batch holds: the LayerNorm split of a layer-0 gradient.

Layer 0's input for token ``t`` at position ``p`` is
``x = gamma * (w_t + p_p + tau - mu) / sigma + beta`` (word, position and
segment embeddings, then LayerNorm with mean ``mu`` and spread ``sigma``),
so every input is a combination of ``gamma * w_t`` (its token),
``gamma * p_p`` (its position), ``gamma * tau``, ``gamma`` and ``beta``. In
a batch whose token count reaches its distinct tokens plus its positions
plus three, the inputs (nearly) fill that structure: every token of the
batch at every position lies in the row space, to within round-off (the
structure's weakest directions), and the span check's candidate sets
become the batch's bag of words (:mod:`gilib.attack.rowspace`), which
leaves the sentence searches the whole bag at every position.

The gradient itself still tells positions apart. With ``G = sum_i delta_i
x_i^T``,

``G = A_w (gamma * W_bag)^T + A_p (gamma * P)^T + (three more terms)``,

and where the bag's and the positions' vectors are linearly independent
(``|bag| + positions + 3 <= d``) the split is unique: ``A_w``'s column for a
token is ``sum delta_i / sigma_i`` over its occurrences, ``A_p``'s column
for a position the same sum over the tokens at that position. A token that
occurs once is therefore one column of ``A_w`` inside one column of
``A_p``: solving ``A_p = A_w C`` gives its row of ``C`` (its *shares*) 1 at
its position and 0 elsewhere; every row of ``C`` sums to 1, and a token
that repeats spreads its 1 over its positions. :func:`position_sets` keeps,
at each position, the tokens with a share there and, on request, the
tokens that spread (repeated words such as "the") where the pinned tokens
leave room. Our own derivation, written for
this book; DAGER (Petrov et al., NeurIPS 2024) and its encoder search stop
at the bag of words.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .rowspace import position_counts

POSITION_SHARE = 0.01
"""Share of a token at a position (:func:`position_shares`) above which the
position keeps it. A token that occurs once has 1 at its position; the
repeated tokens' own occurrences, which no column of ``A_w`` holds alone,
leave the others' shares a few hundredths of noise."""
PINNED = 0.9
"""A token whose share stays under this at every position is not pinned
to one: it repeats in the batch (or its split is unclear), and
:func:`position_sets` (with ``repeated``) adds it wherever the pinned
tokens leave room."""


def position_shares(model: torch.nn.Module, gradient: torch.Tensor, bag: Sequence[int],
                    positions: int) -> torch.Tensor | None:
    """Each bag token's share of each position's part of a layer-0 gradient: ``C`` of ``A_p = A_w C``.

    Args:
        model: the victim (BERT embeddings: word, position, segment, LayerNorm).
        gradient: ``(d_out, d)`` a layer-0 query, key or value weight's
            gradient (or what is left of it after peeling).
        bag: the token ids the batch may hold, special tokens included.
        positions: positions ``0 .. positions - 1`` the batch spans.

    Returns:
        ``(len(bag), positions)`` shares in float64, each row summing to 1;
        ``None`` where the split is not unique (``len(bag) + positions + 3``
        reaches the input width ``d``).
    """
    emb = model.base_model.embeddings
    gamma, beta = emb.LayerNorm.weight.detach().double(), emb.LayerNorm.bias.detach().double()
    words = emb.word_embeddings.weight.detach().double()[list(bag)]
    places = emb.position_embeddings.weight.detach().double()[:positions]
    segment = emb.token_type_embeddings.weight.detach().double()[0]
    basis = torch.cat([(gamma * words).T, (gamma * places).T, torch.stack([gamma, gamma * segment, beta], 1)], 1)
    if basis.shape[1] >= basis.shape[0]:
        return None
    parts = torch.linalg.lstsq(basis, gradient.detach().double().T).solution.T  # G = parts basis^T
    tokens, places = parts[:, : len(bag)], parts[:, len(bag): len(bag) + positions]
    return torch.linalg.lstsq(tokens, places).solution


def bag_shares(model: torch.nn.Module, gradient: torch.Tensor, sets: Sequence[Sequence[int]],
               specials: Sequence[int], positions: int) -> tuple[list[int], torch.Tensor | None]:
    """The bag of ``sets`` and ``specials`` (sorted token ids) and its :func:`position_shares` (``None``: not unique)."""
    bag = sorted({int(t) for s in sets for t in s} | {int(t) for t in specials})
    return bag, position_shares(model, gradient, bag, positions)


def bag_filled(sets: Sequence[Sequence[int]], lengths: Sequence[int]) -> bool:
    """Whether the candidate sets have become the batch's bag of words.

    True when the sets hold, on average, more than twice as many tokens as
    sentences reach the fullest position: the span check then carries no
    word order, and :func:`position_sets` supplies it.
    """
    counts = position_counts(lengths)
    return len(lengths) > 1 and sum(map(len, sets)) / max(len(sets), 1) > 2 * max(counts, default=0)


def position_sets(model: torch.nn.Module, gradient: torch.Tensor, sets: Sequence[Sequence[int]],
                  lengths: Sequence[int], specials: Sequence[int], *, share: float = POSITION_SHARE,
                  pinned: float = PINNED, repeated: bool = True) -> list[list[int]]:
    """The candidate sets narrowed to the tokens each position's part of the gradient holds.

    Args:
        model: the victim.
        gradient: ``(d_out, d)`` the layer-0 weight's gradient the sets came from.
        sets: the span check's sets of positions ``1 ..`` (:func:`~gilib.attack.rowspace.candidate_sets`).
        lengths: the token counts of the sentences sought.
        specials: ``[CLS]`` and ``[SEP]`` (in the bag, never a candidate).
        share: :data:`POSITION_SHARE`.
        pinned: :data:`PINNED`.
        repeated: add the tokens pinned nowhere (repeated words) at every
            position that the pinned tokens do not fill. Most of their
            occurrences already have a share above ``share``; the rest are
            what this adds, at the price of larger sets.

    Returns:
        For each interior position, the tokens with a share above ``share``
        there, by decreasing share (at least as many as sentences reach
        it), then, with ``repeated``, the tokens pinned nowhere where the
        pinned ones leave room; the sets unchanged where the split is not
        unique.
    """
    positions = max(lengths)
    bag, shares = bag_shares(model, gradient, sets, specials, positions)
    if shares is None:
        return [list(s) for s in sets]
    special = {int(t) for t in specials}
    interior = shares[:, 1:positions - 1]
    spread = [bag[j] for j in (interior.max(1).values < pinned).nonzero()[:, 0].tolist()]
    # Where the tokens pinned to a position already fill it (one per sentence reaching it), no repeated word is there.
    owners = interior.argmax(1)[interior.max(1).values >= pinned] + 1
    narrowed = []
    for p, count in enumerate(position_counts(lengths), start=1):
        column = shares[:, p]
        keep = max(int((column > share).sum()), count)
        chosen = [bag[j] for j in column.argsort(descending=True)[:keep].tolist() if bag[j] not in special]
        if repeated and int((owners == p).sum()) < count:
            chosen += [t for t in spread if t not in chosen and t not in special]
        narrowed.append(chosen or list(sets[p - 1]))
    return narrowed
