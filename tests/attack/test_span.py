"""The span check: exact recovery from one layer-0 linear weight, and clear refusals."""

import dataclasses
import math

import pytest
import torch

from gilib.update import SharedUpdate
from gilib.attack import SpanConfig, SpanDiagnostics, span_attack
from gilib.attack.checks import output_gradients
from gilib.attack.rowspace import item_gradients, layer0_inputs, row_space
from gilib.client import client_update
from gilib.data import load_split
from gilib.metrics import true_token_ids
from gilib.models import encode
from gilib.selection import select


def _update(model, tokenizer, selection, texts, labels) -> SharedUpdate:
    """What the server receives from a client holding ``texts``."""
    return client_update(model, selection, encode(tokenizer, texts, labels)).shared


def _attack_batch(victim, component, examples):
    """The span check on a client's batch of ``examples`` sharing layer 0's ``component``: ``(truth, result)``."""
    model, tokenizer = victim
    selection = select(model, component, 0)
    true_batch = encode(tokenizer, [e.text for e in examples], [e.label for e in examples])
    update = client_update(model, selection, true_batch).shared
    return true_token_ids(true_batch), span_attack(model, tokenizer, update, selection)


@pytest.mark.parametrize("component", ["attention.query", "attention.key", "attention.value"])
def test_exact_recovery_of_bundled_sentences_at_batch_size_one(minilm, component):
    model, tokenizer = minilm
    selection = select(model, component, 0)
    for example in load_split("sample")[:5]:
        true_batch = encode(tokenizer, example.text, example.label)
        update = client_update(model, selection, true_batch).shared
        # At batch size 1 the check needs no labels.
        result = span_attack(model, tokenizer, update._replace(labels=None), selection)
        assert result.token_ids[0] == true_batch["input_ids"][0].tolist()
        assert result.method == "span" and result.diagnostics.min_gap > 0.01


def test_the_result_keeps_settings_timings_and_diagnostics_apart(minilm):
    model, tokenizer = minilm
    selection = select(model, "attention.query", 0)
    update = _update(model, tokenizer, selection, "a cat sat on the mat", 1)
    result = span_attack(model, tokenizer, update, selection, SpanConfig(threshold=1e-3))
    assert result.config == dataclasses.asdict(SpanConfig(threshold=1e-3))  # settings only
    assert set(result.timings) == {"check", "assembly"} and all(v >= 0 for v in result.timings.values())
    assert result.seconds == pytest.approx(sum(result.timings.values()))
    d = result.diagnostics
    assert isinstance(d, SpanDiagnostics) and d.weight.endswith("query.weight") and d.verifier is None
    assert d.rank == update.lengths[0] and len(d.candidates) == update.lengths[0] - 2 and d.rounds == 0
    assert d.found is None and d.labels is None and d.uncertain is None  # no peeling at batch size 1
    with pytest.raises(TypeError, match="config must be a SpanConfig"):
        span_attack(model, tokenizer, update, selection, {"threshold": 1e-3})


def test_the_rank_is_the_number_of_tokens(minilm):
    model, tokenizer = minilm
    selection = select(model, "attention.value", 0)
    true_batch = encode(tokenizer, "a cat sat on the mat", 1)
    (gradient,) = client_update(model, selection, true_batch).shared.shared_grads
    space = row_space(gradient)
    assert space.rank == true_batch["input_ids"].shape[1]  # 8 tokens with [CLS] and [SEP]
    torch.testing.assert_close(space.basis.T @ space.basis, torch.eye(space.rank, dtype=torch.float64))


@pytest.mark.parametrize("component, layers", [("attention.query", 1), ("ffn.output", 0), ("attention.output", 0)])
def test_a_selection_without_a_layer0_input_projection_is_refused(minilm, component, layers):
    model, tokenizer = minilm
    selection = select(model, component, layers)
    update = _update(model, tokenizer, selection, "a cat sat on the mat", 1)
    with pytest.raises(ValueError, match="layer 0's query, key or value weight"):
        span_attack(model, tokenizer, update, selection)


@pytest.mark.slow
def test_a_batch_of_four_bundled_sentences_is_recovered_exactly(minilm):
    # From the value weight alone: peeling's output-gradient check (the query weight's: tests/attack/test_peeling.py).
    truth, result = _attack_batch(minilm, "attention.value", load_split("sample")[:4])
    # The gradient does not depend on the order of the batch's sentences.
    assert sorted(result.token_ids) == sorted(truth)
    assert result.diagnostics.rank < 384 and result.final_loss < 1e-4
    # Every true token is in its position's candidate set.
    for p, candidates in enumerate(result.diagnostics.candidates, start=1):
        assert {t[p] for t in truth if p < len(t) - 1} <= set(candidates)


def test_the_output_gradients_of_known_inputs_are_recovered_exactly(minilm):
    model, tokenizer = minilm
    selection = select(model, "attention.value", 0)
    true_batch = encode(tokenizer, "a cat sat on the mat", 1)
    (gradient,) = client_update(model, selection, true_batch).shared.shared_grads
    ids = true_batch["input_ids"][0]
    inputs = torch.stack([layer0_inputs(model, p)[int(v)] for p, v in enumerate(ids)])
    module = model.get_submodule(selection.names[0].rsplit(".", 1)[0])
    own = output_gradients(model, module, ids[None], 1)[0]
    torch.testing.assert_close(item_gradients(gradient, inputs), own.double(), rtol=1e-4, atol=1e-9)


def test_a_batch_needs_no_labels_peeling_finds_them(minilm):
    model, tokenizer = minilm
    selection = select(model, "attention.query", 0)
    update = _update(model, tokenizer, selection, ["a cat sat", "the dog ran home"], [1, 0])
    result = span_attack(model, tokenizer, update._replace(labels=None), selection)
    assert result.texts == ["a cat sat", "the dog ran home"]
    assert result.diagnostics.labels == [1, 0] and result.diagnostics.found == [True, True]
    assert result.diagnostics.verifier.endswith("(output gradients)")


def test_a_batch_with_as_many_tokens_as_input_dimensions_is_refused(minilm):
    model, tokenizer = minilm
    selection = select(model, "attention.query", 0)
    examples = load_split("sample")
    update = _update(model, tokenizer, selection, [e.text for e in examples], [e.label for e in examples])
    assert sum(update.lengths) >= 384  # the whole bundled sample: more tokens than MiniLM's hidden size
    with pytest.raises(ValueError, match="at least the weight's 384 input dimensions"):
        span_attack(model, tokenizer, update, selection)


def test_the_key_weight_batch_path_recovers_two_sentences(minilm):
    truth, result = _attack_batch(minilm, "attention.key", load_split("sample")[:2])
    assert sorted(result.token_ids) == sorted(truth)
    # One direction per distinct (position, token) input but [CLS]: x - x_[CLS] spans the key's gradient.
    assert result.diagnostics.rank == len({(p, t[p]) for t in truth for p in range(1, len(t))})


@pytest.mark.parametrize("lengths, labels, settings, message", [
    ([2], None, {}, "lie between 3 and 512"),
    ([600], None, {}, "lie between 3 and 512"),
    ([], None, {}, "No sentence lengths"),
    ([8, 9], [0, 5], {}, "class indices in 0..1"),
    ([8, 9], [0, -1], {}, "class indices in 0..1"),
    ([8, 9], [0.0, 1.0], {}, "class indices"),
    ([8, 9], [1], {}, "has 2 sentence length\\(s\\) but 1 label\\(s\\)"),
    ([8], [7], {}, "class indices in 0..1"),
    ([8], None, dict(restarts=0), "restarts must be at least 1, got 0"),
    ([8], None, dict(restarts=1.5), "restarts must be a whole number, got 1.5"),
    ([8], None, dict(kicks=-1), "kicks must be at least 0, got -1"),
    ([8], None, dict(kicks=True), "kicks must be a whole number, got True"),
    ([8], None, dict(max_effort=0), "max_effort must be at least 1, got 0"),
    ([8], None, dict(beam=0), "beam must be at least 1, got 0"),
    ([8], None, dict(seed=-1), "seed must be at least 0"),
    ([8], None, dict(threshold=0.0), "threshold must be a finite number greater than 0"),
    ([8], None, dict(threshold=math.nan), "threshold must be a finite number greater than 0"),
    ([8], None, dict(time_budget=0), "time_budget must be a finite number of seconds above 0"),
    ([8], None, dict(time_budget=-5.0), "time_budget must be a finite number of seconds above 0"),
    ([8], None, dict(time_budget=math.nan), "time_budget must be a finite number of seconds above 0"),
    ([8], None, dict(time_budget=True), "time_budget must be a finite number of seconds above 0"),
    ([8], None, dict(time_budget="60"), "time_budget must be a finite number of seconds above 0"),
    ([8], None, dict(prior_weight=-1.0), "prior_weight must be a finite number of at least 0"),
    ([8], None, dict(prior_weight=math.inf), "prior_weight must be a finite number of at least 0"),
    ([8], None, dict(prior_weight="6"), "prior_weight must be a finite number of at least 0"),
])
def test_bad_lengths_labels_and_settings_are_refused_clearly(minilm, lengths, labels, settings, message):
    model, tokenizer = minilm
    selection = select(model, "attention.query", 0)
    update = _update(model, tokenizer, selection, "a cat sat on the mat", 1)
    with pytest.raises(ValueError, match=message):
        span_attack(model, tokenizer, update._replace(lengths=lengths, labels=labels), selection, SpanConfig(**settings))


def _with_nan(grads):
    bad = grads[0].clone()
    bad[3, 5] = math.nan
    return [bad]


@pytest.mark.parametrize("change, message", [
    (lambda g: [g[0], g[0]], "Got 2 gradient tensors for the 1 of"),
    (lambda g: [], "Got 0 gradient tensors for the 1 of"),
    (lambda g: [g[0].T[:100]], "has shape"),
    (lambda g: _with_nan(g), "NaN or infinite values"),
    (lambda g: [torch.zeros_like(g[0])], "is zero"),
    (lambda g: [g[0].double()], "is torch.float64 but the model is torch.float32"),
    (lambda g: [torch.zeros(g[0].shape, device="meta")], "is on meta but the model on cpu"),
])
def test_gradients_that_do_not_fit_the_selection_are_refused(minilm, change, message):
    model, tokenizer = minilm
    selection = select(model, "attention.query", 0)
    update = _update(model, tokenizer, selection, "a cat sat", 1)
    with pytest.raises(ValueError, match=message):
        span_attack(model, tokenizer, update._replace(shared_grads=change(update.shared_grads)), selection)


def test_a_message_that_is_not_a_shared_update_is_refused(minilm):
    model, tokenizer = minilm
    selection = select(model, "attention.query", 0)
    update = _update(model, tokenizer, selection, "a cat sat", 1)
    with pytest.raises(TypeError, match="client_update"):
        span_attack(model, tokenizer, list(update.shared_grads), selection)
