"""Tests for gilib.metrics."""

import math

import numpy as np
import pytest
import torch

from gilib.metrics import (
    ROUGE_TYPES,
    aggregate,
    bootstrap_interval,
    interval_text,
    match_batch,
    matthews,
    mean_interval,
    rouge_scores,
    score_batch,
    token_accuracy,
)

SENTENCES = [
    "the cat sat on the mat",
    "a quick brown fox jumps over the lazy dog",
    "colourless green ideas sleep furiously",
]


# --------------------------------------------------------------------------- #
# rouge_scores
# --------------------------------------------------------------------------- #


def test_identical_strings_score_one():
    scores = rouge_scores(SENTENCES[0], SENTENCES[0])
    assert set(scores) == set(ROUGE_TYPES)
    for name in ROUGE_TYPES:
        assert scores[name] == pytest.approx(1.0)


def test_disjoint_strings_score_zero():
    scores = rouge_scores("alpha beta gamma", "delta epsilon zeta")
    for name in ROUGE_TYPES:
        assert scores[name] == 0.0


def test_hand_computed_prefix():
    # Prediction is the first three words of the reference.
    # ROUGE-1: 3 of 3 predicted unigrams match, 3 of 6 reference unigrams:
    #   P = 1, R = 1/2, F = 2PR / (P + R) = 2/3.
    # ROUGE-2: 2 of 2 predicted bigrams, 2 of 5 reference bigrams:
    #   P = 1, R = 2/5, F = 4/7.
    # ROUGE-L: LCS = 3 tokens, same as ROUGE-1.
    scores = rouge_scores("the cat sat", "the cat sat on the mat")
    assert scores["rouge1"] == pytest.approx(2 / 3)
    assert scores["rouge2"] == pytest.approx(4 / 7)
    assert scores["rougeL"] == pytest.approx(2 / 3)


def test_fmeasure_is_symmetric():
    # F is symmetric, so swapping arguments leaves it unchanged.
    a, b = "the cat sat", "the cat sat on the mat"
    assert rouge_scores(a, b) == pytest.approx(rouge_scores(b, a))


def test_special_tokens_inflate_rouge():
    # The reason callers must strip [CLS]/[SEP] before scoring.
    clean = rouge_scores("alpha beta", "gamma delta")
    marked = rouge_scores("[CLS] alpha beta [SEP]", "[CLS] gamma delta [SEP]")
    assert clean["rouge1"] == 0.0
    assert marked["rouge1"] > 0.0


# --------------------------------------------------------------------------- #
# match_batch / score_batch
# --------------------------------------------------------------------------- #


def test_match_batch_recovers_known_permutation():
    perm = [2, 0, 1]
    # predictions[perm[i]] must be references[i].
    predictions = [None] * len(SENTENCES)
    for i, j in enumerate(perm):
        predictions[j] = SENTENCES[i]
    assert match_batch(predictions, SENTENCES) == perm


def test_match_batch_with_noisy_predictions():
    references = SENTENCES
    predictions = [
        "ideas sleep green furiously",  # ~ reference 2
        "cat the mat sat",  # ~ reference 0
        "lazy dog quick fox",  # ~ reference 1
    ]
    assert match_batch(predictions, references) == [1, 2, 0]


def test_matching_beats_positional_order():
    # Scoring in the given order would pair each prediction with the wrong
    # reference; matching must not be worse than that.
    predictions = list(reversed(SENTENCES))
    matched = score_batch(predictions, SENTENCES)
    unmatched = score_batch(predictions, SENTENCES, match=False)
    assert all(s["rouge1"] == pytest.approx(1.0) for s in matched)
    assert sum(s["rouge1"] for s in unmatched) < sum(s["rouge1"] for s in matched)


def test_match_batch_empty():
    assert match_batch([], []) == []


def test_score_batch_is_per_reference():
    scores = score_batch(["the cat sat", "xyz"], ["qqq", "the cat sat on the mat"])
    assert len(scores) == 2
    assert scores[0]["rouge1"] == 0.0  # "qqq" vs "xyz"
    assert scores[1]["rouge1"] == pytest.approx(2 / 3)


@pytest.mark.parametrize("func", [match_batch, score_batch])
def test_batch_length_mismatch_raises(func):
    with pytest.raises(ValueError, match="same length"):
        func(["a", "b"], ["a"])


# --------------------------------------------------------------------------- #
# aggregate
# --------------------------------------------------------------------------- #


def test_aggregate_mean_std_and_n():
    scores = [
        {"rouge1": 0.2, "rouge2": 0.0},
        {"rouge1": 0.4, "rouge2": 0.5},
        {"rouge1": 0.9, "rouge2": 1.0},
    ]
    out = aggregate(scores)
    assert out["n"] == 3
    assert out["rouge1"] == pytest.approx(0.5)
    assert out["rouge2"] == pytest.approx(0.5)
    # Population std: sqrt(mean((x - mean)^2)).
    assert out["rouge1_std"] == pytest.approx(np.sqrt((0.09 + 0.01 + 0.16) / 3))
    assert out["rouge2_std"] == pytest.approx(np.sqrt((0.25 + 0.0 + 0.25) / 3))
    assert set(out) == {"rouge1", "rouge1_std", "rouge2", "rouge2_std", "n"}


def test_aggregate_single_entry_has_zero_std():
    out = aggregate([{"rouge1": 0.7}])
    assert out == {"rouge1": pytest.approx(0.7), "rouge1_std": 0.0, "n": 1}


def test_aggregate_empty_raises():
    with pytest.raises(ValueError, match="empty"):
        aggregate([])


def test_aggregate_mismatched_keys_raises():
    with pytest.raises(ValueError, match="same keys"):
        aggregate([{"rouge1": 0.1}, {"rouge2": 0.1}])


# --------------------------------------------------------------------------- #
# token_accuracy
# --------------------------------------------------------------------------- #


def test_token_accuracy_lists():
    assert token_accuracy([101, 7, 8, 102], [101, 7, 9, 102]) == pytest.approx(0.75)
    assert token_accuracy([1, 2, 3], [1, 2, 3]) == 1.0
    assert token_accuracy([1, 2, 3], [4, 5, 6]) == 0.0


def test_token_accuracy_tensors_and_arrays():
    assert token_accuracy(torch.tensor([1, 2, 3, 4]), torch.tensor([1, 0, 3, 0])) == 0.5
    assert token_accuracy(np.array([5, 6]), [5, 7]) == 0.5


def test_token_accuracy_length_mismatch_raises():
    with pytest.raises(ValueError, match="same length"):
        token_accuracy([1, 2, 3], [1, 2])


def test_token_accuracy_empty_raises():
    with pytest.raises(ValueError, match="empty"):
        token_accuracy([], [])


@pytest.mark.parametrize(
    "bad", [torch.tensor([[1, 2], [3, 4]]), torch.tensor(3), [[1, 2], [3, 4]]]
)
def test_token_accuracy_not_1d_raises(bad):
    with pytest.raises(ValueError, match="one-dimensional"):
        token_accuracy(bad, bad)


def test_matthews_correlation():
    assert matthews([1, 0, 1, 0], [1, 0, 1, 0]) == 1.0
    assert matthews([0, 1, 0, 1], [1, 0, 1, 0]) == -1.0
    assert matthews([1, 1, 1, 1], [1, 0, 1, 0]) == 0.0
    assert matthews([1, 0, 1, 0], [1, 0, 0, 0]) == pytest.approx(1 / math.sqrt(3))
    with pytest.raises(ValueError, match="one length"):
        matthews([1, 0], [1, 0, 1])


def test_bootstrap_interval_covers_the_mean_and_narrows_with_more_values():
    from gilib.metrics import bootstrap_interval
    rng = np.random.default_rng(0)
    few, many = rng.normal(0.5, 0.2, 12), rng.normal(0.5, 0.2, 120)
    low, high = bootstrap_interval(few)
    assert low < few.mean() < high
    assert bootstrap_interval(few) == (low, high)  # seeded: the same interval twice
    m_low, m_high = bootstrap_interval(many)
    assert (m_high - m_low) < 0.5 * (high - low)  # ~ 1/sqrt(10) as wide
    assert bootstrap_interval([0.3]) == (0.3, 0.3)
    with pytest.raises(ValueError, match="at least one"):
        bootstrap_interval([])
    with pytest.raises(ValueError, match="finite"):
        bootstrap_interval([0.1, float("nan")])
    with pytest.raises(ValueError, match="level"):
        bootstrap_interval([0.1, 0.2], level=1.5)


# --------------------------------------------------------------------------- #
# mean_interval, interval_text
# --------------------------------------------------------------------------- #


def test_mean_interval_is_the_mean_and_the_bootstrap_interval():
    values = [0.2, 0.4, 0.9, 0.5]
    mean, low, high = mean_interval(values)
    assert mean == pytest.approx(0.5)
    assert (low, high) == bootstrap_interval(values)
    assert 0.2 <= low < mean < high <= 0.9
    assert mean_interval([0.7]) == (0.7, 0.7, 0.7)
    with pytest.raises(ValueError, match="at least one value"):
        mean_interval([])


def test_interval_text_prints_the_books_format():
    assert interval_text(0.5412, 0.48, 0.6123) == "0.54 [0.48, 0.61]"
    assert interval_text(0.5, 0.125, 0.75, digits=3) == "0.500 [0.125, 0.750]"
    assert interval_text(0.5, 0.25, 0.75, 0, percent=True) == "50% [25%, 75%]"
    assert interval_text(0.1, -0.02, 0.21, signed=True) == "+0.10 [-0.02, +0.21]"


def test_share_interval_is_wilsons_and_honest_at_the_edges():
    from gilib.metrics import share_interval

    # Wilson's 95 % interval of 5 of 10 (textbook value: 0.237 to 0.763).
    share, low, high = share_interval(5, 10)
    assert share == 0.5 and low == pytest.approx(0.2366, abs=1e-4) and high == pytest.approx(0.7634, abs=1e-4)
    # All of 12 exact: the share is 1 but the interval leaves room for failures.
    share, low, high = share_interval(12, 12)
    assert share == high == 1.0 and low == pytest.approx(0.7575, abs=1e-4)
    assert share_interval(0, 12)[1:] == (0.0, pytest.approx(1 - 0.7575, abs=1e-4))
    # More tries, a narrower interval; a fractional sum of per-batch shares is accepted.
    assert share_interval(120, 120)[1] > low
    assert share_interval(2.5, 4)[0] == 0.625


@pytest.mark.parametrize("hits, n", [(3, 2), (-1, 4), (1, 0), (1, 2.5), (float("nan"), 3), (True, 2)])
def test_share_interval_refuses_what_is_not_a_share(hits, n):
    from gilib.metrics import share_interval

    with pytest.raises(ValueError, match="hits|n must"):
        share_interval(hits, n)
