"""How close is a reconstruction to the private sentence it came from?

Text reconstructions are scored with ROUGE (Lin, 2004): ROUGE-1 and ROUGE-2
count overlapping unigrams and bigrams, ROUGE-L the longest common
subsequence. Every score here is the F-measure, in ``[0, 1]``.

A gradient of a batch of ``B`` sentences is symmetric in the order of the
sentences, so an attack recovers the batch only up to a permutation. Before
scoring, each reconstruction is therefore paired with one reference by
maximising the summed ROUGE-1 + ROUGE-2 F-measure over all one-to-one
pairings, as in LAMP (Balunovic et al., NeurIPS 2022). The assignment is
solved exactly with the Hungarian algorithm (Kuhn, 1955), via
:func:`scipy.optimize.linear_sum_assignment`.

All strings are plain text **without** the tokenizer's special tokens: the
caller strips ``[CLS]``, ``[SEP]`` and ``[PAD]`` (e.g. with
``tokenizer.decode(ids, skip_special_tokens=True)``) from both predictions and
references. Scoring strings that keep ``[CLS]``/``[SEP]`` inflates ROUGE,
because the two markers are recovered trivially and count as matched tokens
(ROUGE's tokenizer reads them as the words ``cls`` and ``sep``); the paper's
reference code scores such strings, so its numbers run slightly higher than
the ones computed here.

Example:
    >>> round(rouge_scores("the cat sat", "the cat sat on the mat")["rouge1"], 4)
    0.6667
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from statistics import NormalDist
from typing import TYPE_CHECKING, Any

import numpy as np
from rouge_score import rouge_scorer
from scipy.optimize import linear_sum_assignment

if TYPE_CHECKING:
    import torch

__all__ = [
    "ROUGE_TYPES",
    "rouge_scores",
    "match_batch",
    "score_batch",
    "aggregate",
    "token_accuracy",
    "true_token_ids",
    "exact_rate",
    "mean_interval",
    "share_interval",
    "interval_text",
    "matthews",
]

ROUGE_TYPES: tuple[str, ...] = ("rouge1", "rouge2", "rougeL")
"""The ROUGE variants reported throughout the book."""

_MATCH_TYPES: tuple[str, ...] = ("rouge1", "rouge2")
"""The variants whose F-measures are summed to pair predictions with references."""

# Building a scorer is cheap but not free; every call shares this one.
_SCORER = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=False)


def rouge_scores(prediction: str, reference: str) -> dict[str, float]:
    """ROUGE F-measures of one prediction against one reference.

    Args:
        prediction: Reconstructed sentence, plain text without special tokens.
        reference: Private (ground-truth) sentence, plain text without
            special tokens.

    Returns:
        A dict mapping each name in :data:`ROUGE_TYPES` to its F-measure in
        ``[0, 1]``.

    Example:
        >>> s = rouge_scores("the cat sat", "the cat sat on the mat")
        >>> round(s["rouge1"], 4), round(s["rouge2"], 4)
        (0.6667, 0.5714)
    """
    # rouge_score's signature is score(target, prediction).
    scores = _SCORER.score(reference, prediction)
    return {name: float(scores[name].fmeasure) for name in ROUGE_TYPES}


def _check_same_length(predictions: Sequence[str], references: Sequence[str]) -> None:
    if len(predictions) != len(references):
        raise ValueError(
            f"predictions and references must have the same length, "
            f"got {len(predictions)} predictions and {len(references)} references"
        )


def match_batch(predictions: list[str], references: list[str]) -> list[int]:
    """Pair each reference with one prediction, maximising total ROUGE.

    Solves the assignment problem whose weight for the pair (prediction
    ``j``, reference ``i``) is ROUGE-1 F + ROUGE-2 F, with the Hungarian
    algorithm.

    Args:
        predictions: Reconstructed sentences, in the attack's (arbitrary)
            order.
        references: Private sentences of the batch.

    Returns:
        A permutation ``perm`` of ``range(len(references))`` such that
        ``predictions[perm[i]]`` is matched to ``references[i]``.

    Raises:
        ValueError: If the two lists differ in length.

    Example:
        >>> match_batch(["a dog", "the cat"], ["the cat", "a dog"])
        [1, 0]
    """
    _check_same_length(predictions, references)
    if not references:
        return []
    # weight[i, j]: how well prediction j explains reference i.
    weight = np.array(
        [
            [sum(rouge_scores(pred, ref)[name] for name in _MATCH_TYPES) for pred in predictions]
            for ref in references
        ]
    )
    # For a square matrix the row indices come back as 0..n-1, so cols[i] is
    # the prediction assigned to reference i.
    _, cols = linear_sum_assignment(weight, maximize=True)
    return [int(j) for j in cols]


def score_batch(
    predictions: list[str], references: list[str], match: bool = True
) -> list[dict[str, float]]:
    """ROUGE scores of a batch of reconstructions, one dict per reference.

    Args:
        predictions: Reconstructed sentences.
        references: Private sentences of the batch.
        match: If true (the default), first pair predictions with references
            by :func:`match_batch`; if false, score them position by position.

    Returns:
        A list whose ``i``-th element is :func:`rouge_scores` of the
        prediction paired with ``references[i]``.

    Raises:
        ValueError: If the two lists differ in length.
    """
    _check_same_length(predictions, references)
    order = match_batch(predictions, references) if match else range(len(references))
    return [rouge_scores(predictions[j], ref) for j, ref in zip(order, references)]


def aggregate(scores: list[dict[str, float]]) -> dict[str, float]:
    """Mean and spread of per-sentence scores.

    Args:
        scores: Per-sentence score dicts that all share the same keys, e.g.
            the concatenated outputs of :func:`score_batch`.

    Returns:
        For every key ``k``, ``k`` maps to the mean and ``k + "_std"`` to the
        population standard deviation (``ddof=0``); ``"n"`` holds the number
        of scores aggregated.

    Raises:
        ValueError: If ``scores`` is empty or the dicts have different keys.

    Example:
        >>> aggregate([{"rouge1": 0.25}, {"rouge1": 0.75}])
        {'rouge1': 0.5, 'rouge1_std': 0.25, 'n': 2}
    """
    if not scores:
        raise ValueError("cannot aggregate an empty list of scores")
    keys = list(scores[0])
    for i, entry in enumerate(scores):
        if set(entry) != set(keys):
            raise ValueError(
                f"all score dicts must have the same keys; entry {i} has "
                f"{sorted(entry)}, expected {sorted(keys)}"
            )
    out: dict[str, float] = {}
    for key in keys:
        values = np.array([entry[key] for entry in scores], dtype=float)
        out[key] = float(values.mean())
        out[f"{key}_std"] = float(values.std())
    out["n"] = len(scores)
    return out


def _as_id_list(ids: Any, name: str) -> list[int]:
    """Flatten a 1-D sequence or tensor of token ids to a Python list."""
    if hasattr(ids, "tolist"):  # torch.Tensor (any device) or numpy.ndarray
        ids = ids.tolist()
    try:
        ids = list(ids)
    except TypeError:
        raise ValueError(f"{name} must be a one-dimensional sequence of token ids") from None
    if any(isinstance(x, (list, tuple)) for x in ids):
        raise ValueError(f"{name} must be one-dimensional")
    return ids


def token_accuracy(
    pred_ids: Sequence[int] | np.ndarray | torch.Tensor,
    true_ids: Sequence[int] | np.ndarray | torch.Tensor,
) -> float:
    """Fraction of positions at which the recovered token id is correct.

    Args:
        pred_ids: Recovered token ids; a sequence of ints or a 1-D
            ``torch.Tensor``/``numpy.ndarray``.
        true_ids: Ground-truth token ids, same length as ``pred_ids``.

    Returns:
        The fraction of positions ``t`` with ``pred_ids[t] == true_ids[t]``,
        in ``[0, 1]``.

    Raises:
        ValueError: If the inputs are empty, not one-dimensional, or of
            different lengths.

    Example:
        >>> token_accuracy([101, 7, 8, 102], [101, 7, 9, 102])
        0.75
    """
    pred = _as_id_list(pred_ids, "pred_ids")
    true = _as_id_list(true_ids, "true_ids")
    if len(pred) != len(true):
        raise ValueError(
            f"pred_ids and true_ids must have the same length, got {len(pred)} and {len(true)}"
        )
    if not true:
        raise ValueError("token_accuracy is undefined for empty sequences")
    return sum(p == t for p, t in zip(pred, true)) / len(true)


def matthews(predictions: Sequence[int], labels: Sequence[int]) -> float:
    """Matthews correlation coefficient of binary predictions (CoLA's metric; 0 when undefined).

    Example:
        >>> matthews([1, 0, 1, 0], [1, 0, 0, 0])
        0.5773502691896258
    """
    p, y = np.asarray(predictions), np.asarray(labels)
    if p.shape != y.shape or p.ndim != 1:
        raise ValueError(f"predictions and labels must be two 1-D sequences of one length, got {p.shape} and {y.shape}")
    tp, tn = float(((p == 1) & (y == 1)).sum()), float(((p == 0) & (y == 0)).sum())
    fp, fn = float(((p == 1) & (y == 0)).sum()), float(((p == 0) & (y == 1)).sum())
    denominator = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return 0.0 if denominator == 0 else (tp * tn - fp * fn) / denominator


def true_token_ids(true_batch: dict[str, "torch.Tensor"]) -> list[list[int]]:
    """The client's sentences as token ids: one list per sentence, ``[CLS]`` to ``[SEP]``, no padding.

    This reads the client's truth (its private batch), so only the metrics
    call it, never an attack.

    Args:
        true_batch: ``input_ids`` and ``attention_mask`` ``(B, T)``, as
            :func:`gilib.models.encode` returns them.
    """
    lengths = true_batch["attention_mask"].sum(dim=1).tolist()
    return [row[:n] for row, n in zip(true_batch["input_ids"].tolist(), lengths)]


def exact_rate(token_ids: Sequence[Sequence[int]], true_ids: Sequence[Sequence[int]]) -> float:
    """Share of the true sentences that a reconstruction holds token for token, in any order.

    Args:
        token_ids: the attack's sentences, e.g. ``AttackResult.token_ids``.
        true_ids: the client's sentences (:func:`true_token_ids`).

    Returns:
        A number in ``[0, 1]``: an attack returns a batch in an order of its
        own, so each true sentence counts when any reconstruction equals it.

    Example:
        >>> exact_rate([[101, 7, 102], [101, 9, 102]], [[101, 9, 102], [101, 8, 102]])
        0.5
    """
    if not true_ids:
        raise ValueError("exact_rate needs at least one true sentence.")
    found = {tuple(int(t) for t in ids) for ids in token_ids}
    return sum(tuple(int(t) for t in ids) in found for ids in true_ids) / len(true_ids)


BOOTSTRAP_RESAMPLES = 2000
"""Resamples of :func:`bootstrap_interval`."""


def bootstrap_interval(
    values: Sequence[float], *, level: float = 0.95, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0
) -> tuple[float, float]:
    """The percentile bootstrap interval of a mean, seeded (the same interval at every call).

    Resample the unit that is independent: one value per sentence attacked
    alone, one per batch when a batch's sentences share a gradient. For a
    paired comparison (two methods on the same sentences), pass the
    per-sentence differences: an interval that excludes 0 ranks them.

    Args:
        values: the n values whose mean is reported.
        level: the interval's coverage, in (0, 1).
        resamples: bootstrap resamples.
        seed: the resampling seed.

    Returns:
        ``(low, high)``; a single value gives ``(value, value)``.

    Raises:
        ValueError: for no values, a value that is not finite, or a level
            outside (0, 1).
    """
    data = np.asarray(list(values), dtype=float)
    if data.size == 0:
        raise ValueError("A bootstrap interval needs at least one value.")
    if not np.isfinite(data).all():
        raise ValueError("Bootstrap values must be finite numbers (drop or fix NaN/inf lines first).")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}.")
    means = np.random.default_rng(seed).choice(data, size=(resamples, data.size)).mean(axis=1)
    tail = (1 - level) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return float(low), float(high)


def mean_interval(values: Sequence[float], **options) -> tuple[float, float, float]:
    """A group's mean with its 95 % percentile bootstrap interval.

    Args:
        values: one value per independent unit (see :func:`bootstrap_interval`).
        **options: ``level``, ``resamples`` or ``seed`` of :func:`bootstrap_interval`.

    Returns:
        ``(mean, low, high)``.

    Example:
        >>> mean_interval([0.5, 0.5])
        (0.5, 0.5, 0.5)
    """
    data = np.asarray(list(values), dtype=float)
    low, high = bootstrap_interval(data, **options)
    return float(data.mean()), low, high


def share_interval(hits: int, n: int, *, level: float = 0.95) -> tuple[float, float, float]:
    """A share of successes with its Wilson score interval (Wilson, 1927).

    A bootstrap of 12 successes out of 12 gives ``[1, 1]``, as if one more
    try could never fail; Wilson's interval for a binomial share stays honest
    at 0 and 1 (12 of 12: about ``[0.76, 1]``). Use it for "exact" rates.

    Args:
        hits: successes, between 0 and ``n``; a sum of per-unit shares may
            be fractional (batches whose sentences are partly exact: the
            batch, not the sentence, is the independent try).
        n: independent tries (sentences attacked alone, or batches).
        level: the interval's coverage, in (0, 1).

    Returns:
        ``(share, low, high)``.

    Raises:
        ValueError: for ``n < 1``, ``hits`` outside ``[0, n]`` or a level
            outside (0, 1).

    Example:
        >>> [round(v, 3) for v in share_interval(12, 12)]
        [1.0, 0.758, 1.0]
    """
    if isinstance(hits, bool) or isinstance(n, bool) or int(n) != n or not math.isfinite(hits):
        raise ValueError(f"n must be a whole number and hits a finite number, got {hits!r} and {n!r}.")
    if n < 1 or not 0 <= hits <= n:
        raise ValueError(f"A share needs 0 <= hits <= n and n >= 1, got {hits} of {n}.")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}.")
    z = float(NormalDist().inv_cdf(0.5 + level / 2))
    share = hits / n
    centre = (share + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(share * (1 - share) / n + z * z / (4 * n * n))
    # Round-off must not put the bounds past the share they surround.
    return share, max(0.0, min(share, centre - half)), min(1.0, max(share, centre + half))


def interval_text(mean: float, low: float, high: float, digits: int = 2, *, percent: bool = False,
                  signed: bool = False) -> str:
    """A mean and its interval as the book prints them: ``"0.54 [0.48, 0.61]"``.

    Args:
        mean, low, high: the mean and its interval's bounds.
        digits: decimals (of the percentage when ``percent``).
        percent: print each number as a percentage (``"50% [25%, 75%]"``).
        signed: always print the sign (a difference: ``"+0.10 [-0.02, +0.21]"``).

    Example:
        >>> interval_text(0.5412, 0.48, 0.6123)
        '0.54 [0.48, 0.61]'
    """
    form = f"{'+' if signed else ''}.{digits}{'%' if percent else 'f'}"
    return f"{mean:{form}} [{low:{form}}, {high:{form}}]"
