"""The sentences the cached studies attack: LAMP's seeded sample of three benchmarks.

The attack grids of chapters 2 to 4 (``data/results/ch*_*.yaml``) draw
their sentences with LAMP's protocol (:func:`gilib.data.sample_batches`,
seed :data:`SAMPLE_SEED`) from the splits of :data:`GRID_SPLITS`; the span
check's study (chapter 5) and the federated study (chapter 6) attack the
same sentences, so that their numbers compare with the grids' sentence for
sentence. :func:`sample` is that draw, written once.
"""

from __future__ import annotations

from ..data import load_split, sample_batches

SAMPLE_SEED = 101
"""LAMP's default seed, the ``sample_seed`` of every cached grid."""

GRID_SPLITS = {"cola": "train", "sst2": "validation", "rotten_tomatoes": "train"}
"""The split each dataset's sample comes from: SST-2's validation split holds
whole sentences (its train split is mostly short phrases)."""


def sample(dataset: str, count: int, size: int = 1, *, split: str | None = None, offset: int = 0) -> list[list]:
    """``count`` batches of ``size`` sentences: the seeded sample from its ``offset``-th sentence on.

    Args:
        dataset: ``"cola"``, ``"sst2"`` or ``"rotten_tomatoes"``.
        count: batches.
        size: sentences per batch, consecutive in the sample.
        split: the split to draw from (default: :data:`GRID_SPLITS`).
        offset: sentences of the sample to skip first (a later study's
            sentences follow an earlier one's).

    Returns:
        ``count`` lists of ``size`` :class:`~gilib.data.Example` s.
    """
    if offset < 0:
        raise ValueError(f"offset must be 0 or more, got {offset}.")
    examples = load_split(dataset, split or GRID_SPLITS.get(dataset, "train"))
    (flat,) = zip(*sample_batches(examples, offset + count * size, 1, seed=SAMPLE_SEED))
    flat = list(flat)[offset:]
    return [flat[i * size:(i + 1) * size] for i in range(count)]
