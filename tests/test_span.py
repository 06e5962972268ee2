"""The span check: exact recovery from one layer-0 linear weight, and clear refusals."""

import pytest
import torch

from gilib.attack.span import row_space, span_attack
from gilib.data import load_split
from gilib.models import encode
from gilib.slicing import client_gradient, select


@pytest.mark.parametrize("component", ["attention.query", "attention.key", "attention.value"])
def test_exact_recovery_of_bundled_sentences_at_batch_size_one(minilm, component):
    model, tokenizer = minilm
    selection = select(model, component, 0)
    for example in load_split("sample")[:5]:
        true_batch = encode(tokenizer, example.text, example.label)
        shared_grads = client_gradient(model, selection, true_batch)
        result = span_attack(model, tokenizer, shared_grads, selection, true_batch["attention_mask"].sum(1).tolist())
        assert result.token_ids[0] == true_batch["input_ids"][0].tolist()
        assert result.method == "span" and result.timings["min_gap"] > 0.01


def test_the_rank_is_the_number_of_tokens(minilm):
    model, tokenizer = minilm
    selection = select(model, "attention.value", 0)
    true_batch = encode(tokenizer, "a cat sat on the mat", 1)
    (gradient,) = client_gradient(model, selection, true_batch)
    space = row_space(gradient)
    assert space.rank == true_batch["input_ids"].shape[1]  # 8 tokens with [CLS] and [SEP]
    torch.testing.assert_close(space.basis.T @ space.basis, torch.eye(space.rank, dtype=torch.float64))


@pytest.mark.parametrize("component, layers", [("attention.query", 1), ("ffn.output", 0), ("attention.output", 0)])
def test_a_selection_without_a_layer0_input_projection_is_refused(minilm, component, layers):
    model, tokenizer = minilm
    selection = select(model, component, layers)
    true_batch = encode(tokenizer, "a cat sat on the mat", 1)
    with pytest.raises(ValueError, match="layer 0's query, key or value weight"):
        span_attack(model, tokenizer, client_gradient(model, selection, true_batch), selection, [8])


def test_batches_of_several_sentences_are_refused_clearly(minilm):
    model, tokenizer = minilm
    selection = select(model, "attention.query", 0)
    batch = encode(tokenizer, ["a cat sat", "the dog ran home"], [1, 0])
    with pytest.raises(ValueError, match="batch size 1"):
        span_attack(model, tokenizer, client_gradient(model, selection, batch), selection, [5, 6])
