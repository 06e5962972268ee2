"""The LayerNorm split: a large batch's word order read off the layer-0 gradient's position parts."""

from collections import Counter

import pytest
import torch

from gilib.attack import SpanConfig
from gilib.attack.positions import bag_filled, position_sets, position_shares
from gilib.attack.rowspace import check_positions
from gilib.attack.tokens import TokenSpace
from gilib.client import client_update
from gilib.data import load_split
from gilib.models import encode
from gilib.selection import select

QUERY0 = "bert.encoder.layer.0.attention.self.query.weight"


def _filled(minilm, count=16):
    """A batch of bundled sentences large enough that the span check's sets are its bag of words."""
    model, tokenizer = minilm
    examples = load_split("sample")[:count]
    true_batch = encode(tokenizer, [e.text for e in examples], [e.label for e in examples])
    lengths = true_batch["attention_mask"].sum(1).tolist()
    selection = select(model, "attention.query", 0)
    gradient = client_update(model, selection, true_batch).shared.shared_grads[0]
    ids = [true_batch["input_ids"][i, :n].tolist() for i, n in enumerate(lengths)]
    return model, tokenizer, gradient, lengths, ids


def test_a_token_that_occurs_once_owns_its_position_and_every_row_sums_to_one(minilm):
    model, tokenizer, gradient, lengths, ids = _filled(minilm)
    occurrences = Counter(t for sentence in ids for t in sentence)
    bag = sorted(occurrences)
    shares = position_shares(model, gradient, bag, max(lengths))
    assert shares is not None and shares.shape == (len(bag), max(lengths))
    torch.testing.assert_close(shares.sum(1), torch.ones(len(bag), dtype=torch.float64), rtol=0, atol=1e-5)
    once = [(t, p) for sentence in ids for p, t in enumerate(sentence) if occurrences[t] == 1]
    assert len(once) > 100
    # The repeated words' occurrences, which no column holds alone, blur a few rows.
    owned = [int(shares[bag.index(t)].argmax()) == p for t, p in once]
    assert sum(owned) >= 0.95 * len(once)
    own = torch.tensor([float(shares[bag.index(t), p]) for t, p in once])
    assert float(own.median()) > 0.98 and float(own.quantile(0.1)) > 0.8


def test_the_split_narrows_the_bag_of_words_and_keeps_every_true_token(minilm):
    model, tokenizer, gradient, lengths, ids = _filled(minilm)
    _, _, sets = check_positions(model, TokenSpace(model, tokenizer), gradient, lengths,
                                 shift_invariant=False, threshold=SpanConfig().threshold, capped=False)
    assert bag_filled(sets, lengths)
    bag = {t for s in sets for t in s}
    # The span check alone: every position holds nearly the whole bag.
    assert min(len(s) for s in sets[:10]) > 0.9 * len(bag)
    narrowed = position_sets(model, gradient, sets, lengths, (tokenizer.cls_token_id, tokenizer.sep_token_id))
    assert sum(map(len, narrowed)) < 0.5 * sum(map(len, sets))
    missing = [(i, p) for i, sentence in enumerate(ids) for p in range(1, len(sentence) - 1)
               if sentence[p] not in narrowed[p - 1]]
    assert missing == []


def test_small_batches_keep_their_sets_and_a_split_that_is_not_unique_changes_nothing(minilm):
    model, tokenizer, gradient, lengths, ids = _filled(minilm, count=2)
    _, _, sets = check_positions(model, TokenSpace(model, tokenizer), gradient, lengths,
                                 shift_invariant=False, threshold=SpanConfig().threshold, capped=False)
    assert not bag_filled(sets, lengths)
    # More columns than the 384 input dimensions: no unique split, the sets come back as they were.
    too_many = list(range(1000, 1400))
    assert position_shares(model, gradient, too_many, max(lengths)) is None
    assert position_sets(model, gradient, [too_many] * len(sets), lengths, (101, 102)) == [too_many] * len(sets)


def test_the_switch_must_be_a_bool():
    with pytest.raises(ValueError, match="positions must be True or False"):
        SpanConfig(positions="yes")
    assert SpanConfig(positions=False).positions is False


@pytest.mark.slow
def test_a_batch_whose_sets_are_its_bag_is_rebuilt_exactly_with_the_split(minilm):
    from gilib.attack import span_attack

    model, tokenizer = minilm
    examples = load_split("sample")[:16]
    true_batch = encode(tokenizer, [e.text for e in examples], [e.label for e in examples])
    selection = select(model, "layer", 0)
    message = client_update(model, selection, true_batch).shared._replace(labels=None)
    result = span_attack(model, tokenizer, message, selection, SpanConfig(time_budget=600))
    lengths = true_batch["attention_mask"].sum(1).tolist()
    truths = [true_batch["input_ids"][i, :n].tolist() for i, n in enumerate(lengths)]
    assert sorted(result.token_ids) == sorted(truths) and all(result.diagnostics.found)
    assert not result.diagnostics.timed_out
