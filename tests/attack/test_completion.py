"""The span check on messages seen through known noise: float32 FedAvg, one AdamW step (issue 25)."""

import copy
import math
import time

import pytest
import torch

from gilib.attack import span_attack
from gilib.attack import completion
from gilib.attack.completion import (balanced, candidate_gradients, completed_space, outside_share, polish,
                                     sentence_inputs,
                                     stacked_projections)
from gilib.attack.peeling import sentence_gradients
from gilib.client import AdamW, FedAvg, client_update, float32_spacing
from gilib.data import load_split
from gilib.models import encode
from gilib.selection import select


@pytest.fixture(scope="module")
def fedavg_message(minilm):
    """A float32 FedAvg client (one local step at lr 1e-4) sharing layer 0, on a bundled sentence."""
    model, tokenizer = minilm
    selection = select(model, "layer", 0)
    example = load_split("sample")[0]
    true_batch = encode(tokenizer, [example.text], [example.label])
    protocol = FedAvg(1, 1e-4)
    # The server's message carries no label: the search finds the one that fits.
    shared = client_update(model, selection, true_batch, protocol).shared._replace(labels=None)
    truth = true_batch["input_ids"][0].tolist()
    return protocol, selection, shared, truth


def test_the_weighted_check_recovers_a_float32_fedavg_sentence_the_plain_check_misses(minilm, fedavg_message):
    model, tokenizer = minilm
    protocol, selection, shared, truth = fedavg_message
    # Most of the query weight's entries never moved: the plain row space misses the inputs.
    query = shared.shared_grads[selection.names.index("bert.encoder.layer.0.attention.self.query.weight")]
    assert 0.2 < float((query != 0).double().mean()) < 0.6
    assert span_attack(model, tokenizer, shared, selection).token_ids[0] != truth
    result = span_attack(model, tokenizer, shared, selection, weights=protocol.entry_weights(shared, model, selection))
    assert result.token_ids[0] == truth
    assert result.diagnostics.weight.endswith("query.weight+bert.encoder.layer.0.attention.self.value.weight")
    # The message's part outside the true inputs' span is the rounding's, a few per cent.
    assert 0 < result.diagnostics.outside < 0.1 and result.diagnostics.timed_out is False


def test_the_noise_model_bounds_every_entry_of_the_message(minilm, fedavg_message):
    model, _ = minilm
    protocol, selection, shared, _ = fedavg_message
    plain = client_update(model, selection, encode(minilm[1], [load_split("sample")[0].text],
                                                   [load_split("sample")[0].label])).shared.shared_grads
    for message, gradient, bound in zip(shared.shared_grads, plain, protocol.noise(shared, model, selection)):
        # |message - gradient| <= spacing / (2 lr), up to the gradient's own round-off
        assert bool(((message.double() - gradient.double()).abs() <= bound * 1.01 + 1e-9).all())
    assert float(float32_spacing(torch.tensor([1.0]))[0]) == 2.0 ** -23


def test_completion_recovers_a_low_rank_row_space_from_a_third_of_its_entries():
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(3, 40, generator=generator, dtype=torch.float64)
    matrix = torch.randn(60, 3, generator=generator, dtype=torch.float64) @ inputs
    seen = (torch.rand(60, 40, generator=generator) < 0.35).double()
    space = completed_space(matrix * seen, seen, 3, iterations=200)
    # Every input lies in the completed row space; the SVD of the zero-filled matrix misses them.
    assert float(space.residual(inputs).max()) < 1e-6
    _, _, vh = torch.linalg.svd(matrix * seen, full_matrices=False)
    plain = vh[:3].T
    assert float(((inputs - inputs @ plain @ plain.T).norm(dim=1) / inputs.norm(dim=1)).max()) > 0.1
    assert outside_share(matrix, inputs) < 1e-20


def test_stacking_keeps_the_query_and_value_weights_in_selection_order(minilm, fedavg_message):
    model, _ = minilm
    _, selection, shared, truth = fedavg_message
    names, matrix = stacked_projections(model, selection.names, shared.shared_grads)
    assert [n.rsplit(".", 2)[-2] for n in names] == ["query", "value"] and matrix.shape == (768, 384)
    assert stacked_projections(model, ["bert.encoder.layer.0.attention.self.key.weight"],
                               [torch.zeros(384, 384)])[0] == []
    assert sentence_inputs(model, truth).shape == (len(truth), 384)


def _weights(protocol, shared, model, selection):
    return protocol.entry_weights(shared, model, selection)


@pytest.mark.parametrize("change, message", [
    (lambda w: w[:-1], "weights has .* tensors but the message"),
    (lambda w: [w[0][:2], *w[1:]], r"weights\[0\] must be a tensor of the message's shape"),
    (lambda w: [-w[0], *w[1:]], r"weights\[0\] holds negative or non-finite"),
    (lambda w: [w[0] * math.nan, *w[1:]], r"weights\[0\] holds negative or non-finite"),
    (lambda w: [torch.zeros_like(t) for t in w], "Every entry weight is 0"),
])
def test_weights_that_do_not_fit_the_message_are_refused(minilm, fedavg_message, change, message):
    model, tokenizer = minilm
    protocol, selection, shared, _ = fedavg_message
    with pytest.raises(ValueError, match=message):
        span_attack(model, tokenizer, shared, selection, weights=change(_weights(protocol, shared, model, selection)))


def test_weights_need_one_sentence_and_a_query_or_value_weight(minilm):
    model, tokenizer = minilm
    examples = load_split("sample")[:2]
    batch = encode(tokenizer, [e.text for e in examples], [e.label for e in examples])
    layer = select(model, "layer", 0)
    two = client_update(model, layer, batch, FedAvg(1, 1e-3)).shared
    with pytest.raises(ValueError, match="batch size 1; this message holds 2 sentences"):
        span_attack(model, tokenizer, two, layer, weights=FedAvg(1, 1e-3).entry_weights(two, model, layer))
    key = select(model, "attention.key", 0)
    one = client_update(model, key, encode(tokenizer, [examples[0].text], [examples[0].label]), FedAvg(1, 1e-3)).shared
    with pytest.raises(ValueError, match="query or value weight"):
        span_attack(model, tokenizer, one, key, weights=FedAvg(1, 1e-3).entry_weights(one, model, key))


def test_a_noise_model_that_does_not_fit_the_message_is_refused(minilm, fedavg_message):
    model, _ = minilm
    _, selection, shared, _ = fedavg_message
    # The client trained at lr 1e-4; a server assuming 1e-6 claims steps a hundred times too coarse.
    with pytest.raises(ValueError, match="does not fit FedAvg.*lr=1e-06"):
        FedAvg(1, 1e-6).noise(shared, model, selection)
    for several in (AdamW(2, 2e-5).entry_weights, AdamW(5, 2e-5).gradient):
        with pytest.raises(ValueError, match="Only one AdamW step is invertible"):
            several(shared, model, selection)


def test_adamw_entry_weights_keep_only_what_the_inversion_resolves(minilm):
    model, tokenizer = minilm
    selection = select(model, "attention.query", 0)
    example = load_split("sample")[0]
    true_batch = encode(tokenizer, [example.text], [example.label])
    for precision in ("float32", "float64"):
        # The reference is the gradient in the client's own arithmetic: float32's
        # is itself off in the last digits of its tiniest entries.
        client = model if precision == "float32" else copy.deepcopy(model).double()
        gradient = client_update(client, selection, true_batch).shared.shared_grads[0].double()
        protocol = AdamW(1, 2e-5, precision=precision)
        message = client_update(model, selection, true_batch, protocol).shared
        (weight,) = protocol.entry_weights(message, model, selection)
        (estimate,) = protocol.gradient(message, model, selection).shared_grads
        kept = weight > 0
        error = ((estimate.double() - gradient).abs() / gradient.abs().clamp_min(1e-30))[kept]
        # What the weights keep is resolved to within a fifth of its size (median far better).
        assert float(error.median()) < 0.1 and float(error.quantile(0.99)) < 0.2 and float(error.max()) < 0.5
        if precision == "float64":
            assert float(kept.double().mean()) > 0.99
        else:
            assert 0.3 < float(kept.double().mean()) < 0.95


def test_candidate_gradients_are_each_sentences_own_gradient(minilm):
    model, _ = minilm
    names = ["bert.encoder.layer.0.attention.self." + s for s in ("query.weight", "value.weight")]
    generator = torch.Generator().manual_seed(0)
    sentences = torch.randint(1000, 20000, (3, 9), generator=generator)
    sentences[:, 0], sentences[:, -1] = 101, 102
    batched = candidate_gradients(model, names, sentences, 1)
    assert batched.shape == (3, 768, 384)
    for row, ids in zip(batched, sentences):
        alone = torch.cat([g.double() for g in sentence_gradients(model, names, ids, 1, 1)])
        torch.testing.assert_close(row, alone, rtol=1e-4, atol=1e-6 * float(alone.abs().max()))
    # Different sentences, different gradients: the comparison above is not vacuous.
    assert float((batched[0] - batched[1]).abs().max()) > 1e-3 * float(batched[0].abs().max())


def test_balanced_weights_give_every_row_one_vote():
    matrix = torch.tensor([[1e-3, 2e-3, 0.0], [10.0, -20.0, 5.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    weights = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0], [1.0, 1.0, 1.0]], dtype=torch.float64)
    out = balanced(weights, matrix)
    # Each row's weighted mean square becomes 1; a lost entry stays lost; an all-zero row gets no vote.
    for row in range(2):
        seen = weights[row] > 0
        value = (out[row] * matrix[row].square()).sum() / weights[row].sum()
        assert math.isclose(float(value), 1.0, rel_tol=1e-12) and bool((out[row][~seen] == 0).all())
    assert float(out[2].abs().sum()) == 0.0


STACKED = ["bert.encoder.layer.0.attention.self." + s for s in ("query.weight", "value.weight")]


def _random_sentence(model, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Generator]:
    """A seeded 9-token sentence, its stacked query and value gradient (label 1), and the generator after it."""
    generator = torch.Generator().manual_seed(seed)
    truth = torch.randint(1000, 20000, (9,), generator=generator)
    truth[0], truth[-1] = 101, 102
    return truth, candidate_gradients(model, STACKED, truth[None], 1)[0], generator


def test_the_clipped_search_fits_the_factor_dp_clipping_applied(minilm):
    # DP-SGD clips each example's gradient over every parameter: the server sees
    # the layer's gradient times an unknown factor (here 0.2) plus noise.
    model, _ = minilm
    names = STACKED
    truth, gradient, generator = _random_sentence(model, 1)
    message = 0.2 * gradient + 1e-4 * float(gradient.abs().mean()) * torch.randn(gradient.shape, generator=generator,
                                                                                 dtype=gradient.dtype)
    weights = torch.ones_like(message)
    # The search starts one token off; each position's best few candidates hold the true token.
    start = truth.tolist()
    start[4] = 2000
    residuals = torch.ones(7, model.config.vocab_size)
    residuals[torch.arange(7), truth[1:-1]] = 0.0
    residuals[3, 2000] = 0.0
    clipped = polish(model, names, message, weights, start, residuals, candidates=(4,), clipped=True)
    plain = polish(model, names, message, weights, start, residuals, candidates=(4,))
    assert clipped.ids == truth.tolist()
    # Fitted, the distance is the noise's (1e-8 of a mean entry squared); unfitted, the 80 % the factor removed.
    scale = float(gradient.abs().mean()) ** 2
    assert clipped.distance < 1e-6 * scale
    assert plain.distance > 1e3 * clipped.distance


def test_a_pair_move_fixes_two_neighbouring_tokens_at_once(minilm):
    # Two neighbouring wrong tokens: the pair stage tries both positions' best
    # tokens together, around the positions the residuals disagree with.
    model, _ = minilm
    names = STACKED
    truth, message, _ = _random_sentence(model, 2)
    weights = torch.ones_like(message)
    start = truth.tolist()
    start[4], start[5] = 2000, 3000
    residuals = torch.ones(7, model.config.vocab_size)
    residuals[torch.arange(7), truth[1:-1]] = 0.5
    residuals[3, 2000] = residuals[4, 3000] = 0.0  # the wrong tokens rank first, the true ones second
    residuals[[0, 1, 2, 5, 6], truth[[1, 2, 3, 6, 7]]] = 0.0
    unpaired = polish(model, names, message, weights, start, residuals, candidates=())
    paired = polish(model, names, message, weights, start, residuals, candidates=(), pairs=2)
    assert unpaired.ids == start and paired.ids == truth.tolist()
    assert paired.distance < 1e-6 * unpaired.distance


def _bundled_eight(minilm):
    """A bundled 8-token sentence, its stacked gradient as the message, and uniform weights."""
    model, tokenizer = minilm
    example = load_split("sample")[4]
    truth = encode(tokenizer, [example.text], [example.label])["input_ids"][0].tolist()
    assert len(truth) == 8
    message = candidate_gradients(model, STACKED, torch.tensor([truth]), example.label)[0]
    return model, truth, message, torch.ones_like(message)


def _found_first(model, truth, start) -> torch.Tensor:
    """``(6, V)`` residuals that rank each position's ``start`` token first and its true token second."""
    residuals = torch.ones(6, model.config.vocab_size)
    residuals[torch.arange(6), truth[1:-1]] = 0.5
    residuals[torch.arange(6), start[1:-1]] = 0.0
    return residuals


@pytest.mark.slow
def test_a_shift_move_undoes_a_stretch_one_position_off(minilm, monkeypatch):
    # A bundled 8-token sentence; the search starts with positions 3-5 one to the
    # left ("b c X" where the truth is "a b c"): each position's best tokens hold
    # the true one, but no single or pair change from there lowers the distance.
    model, truth, message, weights = _bundled_eight(minilm)
    start = truth[:3] + truth[4:6] + [2000] + truth[6:]
    residuals = _found_first(model, truth, start)
    monkeypatch.setattr(completion, "SHIFT_WINDOW", 0)
    unshifted = polish(model, STACKED, message, weights, start, residuals, candidates=(4,), pairs=2)
    monkeypatch.undo()
    shifted = polish(model, STACKED, message, weights, start, residuals, candidates=(4,), pairs=2)
    assert unshifted.ids != truth and unshifted.distance > 0
    assert shifted.ids == truth and shifted.distance < 1e-6 * unshifted.distance


@pytest.mark.slow
def test_the_last_stage_reaches_a_true_token_ranked_past_its_width_at_a_repeated_position(minilm, monkeypatch):
    # A bundled 8-token sentence; the search starts with position 6 holding its
    # neighbour's token (a repeat, as a long AdamW sentence's short true tokens
    # are lost to their neighbours') and the true token ranks 40th there: past
    # every stage's width, and position 6 is not among the lowest-ranked four.
    model, truth, message, weights = _bundled_eight(minilm)
    start = truth[:6] + [truth[5]] + truth[7:]
    residuals = torch.ones(6, model.config.vocab_size)
    residuals[torch.arange(6), start[1:-1]] = 0.0  # the found tokens rank first
    decoys = [t for t in range(2000, 2100) if t not in truth][:38]
    residuals[5, decoys] = 0.5
    residuals[5, truth[6]] = 0.6  # the true token 40th at position 6
    assert int((residuals[5] < residuals[5, truth[6]]).sum()) == 39
    monkeypatch.setattr(completion, "SUSPECT_TOKENS", 4)
    narrow = polish(model, STACKED, message, weights, start, residuals, candidates=(4,), pairs=2)
    monkeypatch.undo()
    wide = polish(model, STACKED, message, weights, start, residuals, candidates=(4,), pairs=2)
    assert narrow.ids != truth and narrow.distance > 0
    assert wide.ids == truth and wide.distance < 1e-6 * narrow.distance
    assert completion.suspects(start, residuals) == [1, 2, 3, 4, 5, 6]


def test_an_eager_sweep_makes_several_helpful_changes_at_once(minilm):
    # A bundled 8-token sentence with two wrong tokens apart (positions 2 and 4,
    # among the suspects: every found token ranks first, ties go to the earlier);
    # each position's residuals rank the found token first and the true one second.
    # One sweep makes one change; with eager it also tries the sweep's helpful
    # changes together (completion.combined) and fixes both.
    model, truth, message, weights = _bundled_eight(minilm)
    start = list(truth)
    start[2], start[4] = 2000, 2001
    residuals = _found_first(model, truth, start)
    one = polish(model, STACKED, message, weights, start, residuals, candidates=(4,), sweeps=1)
    eager = polish(model, STACKED, message, weights, start, residuals, candidates=(4,), sweeps=1, eager=True)
    assert sum(a != b for a, b in zip(one.ids, truth)) == 1
    assert eager.ids == truth and eager.distance < 1e-6 * one.distance
    assert completion.combined(start, {2: (1.0, truth[2]), 3: (2.0, 7), 4: (3.0, truth[4])}) == [truth]


def test_a_search_stops_after_judging_its_count_of_sentences(minilm, monkeypatch):
    # A bundled 8-token sentence with two wrong tokens (positions 2 and 4). Unbounded,
    # the search fixes both and reports every candidate sentence it judged (counted
    # here at candidate_gradients). Given fewer than one sweep's worth, it stops where
    # it stands after the batch under way: the first position only (already right),
    # so no change is made; and the count, unlike a deadline, gives the same
    # sentence every time.
    model, truth, message, weights = _bundled_eight(minilm)
    start = list(truth)
    start[2], start[4] = 2000, 2001
    residuals = _found_first(model, truth, start)
    counted = []
    gradients = completion.candidate_gradients
    monkeypatch.setattr(completion, "candidate_gradients",
                        lambda m, n, sentences, label: (counted.append(len(sentences)),
                                                        gradients(m, n, sentences, label))[1])
    free = polish(model, STACKED, message, weights, start, residuals, candidates=(4,))
    assert free.ids == truth and free.judged == sum(counted) > 2 * 6 * 3
    counted.clear()
    bounded = [polish(model, STACKED, message, weights, start, residuals, candidates=(4,), judged=4)
               for _ in range(2)]
    assert bounded[0] == bounded[1] and bounded[0].ids == start
    # The start at both labels, position 1's three other tokens (past 4 now), the result at both labels.
    assert model.config.num_labels == 2 and bounded[0].judged == sum(counted) // 2 == 2 + 3 + 2
    for bad in (-1, 2.5, True, "10"):
        with pytest.raises(ValueError, match="judged must be how many candidate sentences"):
            polish(model, STACKED, message, weights, start, residuals, candidates=(4,), judged=bad)


def test_a_mask_message_first_fit_runs_fewer_sweeps_and_fedavg_keeps_its_own(minilm, fedavg_message, monkeypatch):
    # One AdamW step's weights are a 0/1 mask: its first fit runs MASK_ITERATIONS
    # sweeps (a long sentence's search needs the time); FedAvg's 1 / noise^2
    # weights keep ITERATIONS. Both bundled sentences come back exact.
    import gilib.attack.span as span
    model, tokenizer = minilm
    first = []
    fit = span.completed_space
    monkeypatch.setattr(span, "completed_space", lambda *a, **k: (first.append(k.get("iterations")), fit(*a, **k))[1]
                        if k.get("start") is None else fit(*a, **k))
    selection = select(model, "layer", 0)
    example = load_split("sample")[4]
    true_batch = encode(tokenizer, [example.text], [example.label])
    protocol = AdamW(1, 2e-5)
    message = client_update(model, selection, true_batch, protocol).shared
    weights = protocol.entry_weights(message, model, selection)
    assert {float(v) for w in weights for v in w.unique()} == {0.0, 1.0}
    inverted = protocol.gradient(message, model, selection)._replace(labels=None)
    result = span_attack(model, tokenizer, inverted, selection, weights=weights)
    assert result.token_ids[0] == true_batch["input_ids"][0].tolist()
    fedavg, fedavg_selection, shared, truth = fedavg_message
    result = span_attack(model, tokenizer, shared, fedavg_selection,
                         weights=fedavg.entry_weights(shared, model, fedavg_selection))
    assert result.token_ids[0] == truth
    assert first == [completion.MASK_ITERATIONS, completion.ITERATIONS] and completion.MASK_ITERATIONS < 100


def test_an_eager_sweep_tries_the_most_doubtful_positions_first_and_stops_where_a_change_helps(minilm, monkeypatch):
    # A bundled 8-token sentence with two wrong tokens past the suspects (the
    # first four positions: every found token ranks first, ties go to the
    # earlier), at positions 5 and 6; position 6's token has the larger
    # residual. In groups of one position, an eager sweep reaches position 6
    # before 5, fixes it, and never tries a token at position 5.
    model, truth, message, weights = _bundled_eight(minilm)
    start = list(truth)
    start[5], start[6] = 2000, 2001
    residuals = _found_first(model, truth, start)
    residuals[4, 2000], residuals[5, 2001] = 0.1, 0.2  # still first where they stand; position 6 more doubtful
    assert completion.suspects(start, residuals) == [1, 2, 3, 4]
    tried = []
    gradients = completion.candidate_gradients
    monkeypatch.setattr(completion, "candidate_gradients",
                        lambda m, n, sentences, label: (tried.extend(sentences.tolist()), gradients(m, n, sentences,
                                                                                                   label))[1])
    monkeypatch.setattr(completion, "EAGER_CHUNK", 1)
    eager = polish(model, STACKED, message, weights, start, residuals, candidates=(4,), sweeps=1, eager=True)
    assert eager.ids == start[:6] + [truth[6]] + start[7:]
    assert not any(s[5] != start[5] for s in tried)
    tried.clear()
    # Not eager, one sweep tries every position and makes the best change of all.
    plain = polish(model, STACKED, message, weights, start, residuals, candidates=(4,), sweeps=1)
    assert any(s[5] != start[5] for s in tried) and sum(a != b for a, b in zip(plain.ids, truth)) == 1


def test_an_eager_search_tries_its_suspects_wider_than_the_narrow_stage(minilm):
    # A bundled 8-token sentence; position 3 holds its neighbour's token (a
    # repeat: a suspect) and the true token ranks tenth there, past the narrow
    # stage's 4 and within EAGER_SUSPECT_TOKENS: the eager search fixes it, the
    # plain one cannot (it can only trade the repeat for a decoy).
    model, truth, message, weights = _bundled_eight(minilm)
    start = list(truth)
    start[3] = truth[2]
    residuals = torch.ones(6, model.config.vocab_size)
    residuals[torch.arange(6), start[1:-1]] = 0.0
    decoys = [t for t in range(2000, 2100) if t not in truth][:8]
    residuals[2, decoys] = 0.5
    residuals[2, truth[3]] = 0.6
    assert int((residuals[2] < residuals[2, truth[3]]).sum()) == 9 < completion.EAGER_SUSPECT_TOKENS
    assert 3 in completion.suspects(start, residuals)
    plain = polish(model, STACKED, message, weights, start, residuals, candidates=(4,))
    eager = polish(model, STACKED, message, weights, start, residuals, candidates=(4,), eager=True)
    assert plain.ids[3] != truth[3] and plain.distance > 0
    assert eager.ids == truth and eager.distance < 1e-6 * plain.distance


def test_a_fit_past_its_deadline_stops_after_one_sweep():
    generator = torch.Generator().manual_seed(0)
    matrix = torch.randn(60, 3, generator=generator, dtype=torch.float64) @ torch.randn(3, 40, generator=generator,
                                                                                         dtype=torch.float64)
    seen = (torch.rand(60, 40, generator=generator) < 0.35).double()
    late = completed_space(matrix * seen, seen, 3, iterations=200, deadline=time.perf_counter() - 1)
    one = completed_space(matrix * seen, seen, 3, iterations=1)
    full = completed_space(matrix * seen, seen, 3, iterations=200, deadline=time.perf_counter() + 600)
    assert torch.equal(late.basis, one.basis)
    assert torch.equal(full.basis, completed_space(matrix * seen, seen, 3, iterations=200).basis)
    assert not torch.allclose(late.basis.abs(), full.basis.abs())


def test_distinct_neighbours_replaces_the_worse_fitting_copy_of_a_repeated_token():
    # Positions 2 and 3 both hold token 7: it fits position 3 worse (0.3 against
    # 0.1), so position 3 takes its best token that repeats neither neighbour
    # (9 repeats position 4's, 8 does not). Position 5 and 6's repeat of 4 keeps
    # position 5 (0.2 against 0.4) and gives position 6 its next best, 6.
    residuals = torch.ones(6, 12)
    ids = [101, 5, 7, 7, 9, 4, 4, 102]
    residuals[1, 7], residuals[2, 7] = 0.1, 0.3
    residuals[2, 9], residuals[2, 8] = 0.35, 0.4
    residuals[4, 4], residuals[5, 4] = 0.2, 0.4
    residuals[5, 6] = 0.5
    residuals[0, 5], residuals[3, 9] = 0.0, 0.0
    assert completion.distinct_neighbours(ids, residuals) == [101, 5, 7, 8, 9, 4, 6, 102]
    # A sentence without repeats comes back as it was.
    assert completion.distinct_neighbours([101, 5, 7, 9, 102], residuals[:3]) == [101, 5, 7, 9, 102]


def test_a_batch_noise_std_is_the_rms_of_the_rounding_bounds_on_the_checked_weight(minilm):
    # FedAvg.noise_std: the batch check takes one noise level per entry (as SecAgg+'s); for a float32
    # FedAvg client it is the RMS of each query entry's rounding bound, the error uniform within it.
    model, tokenizer = minilm
    examples = load_split("sample")[:2]
    batch = encode(tokenizer, [e.text for e in examples], [e.label for e in examples])
    layer = select(model, "layer", 0)
    protocol = FedAvg(1, 1e-4)
    shared = client_update(model, layer, batch, protocol).shared
    query = "bert.encoder.layer.0.attention.self.query.weight"
    k = layer.names.index(query)
    bound = protocol.noise(shared, model, layer)[k].double()
    std = protocol.noise_std(shared, model, layer, query)
    assert std == pytest.approx(float(bound.square().mean().div(3).sqrt()), rel=1e-12)
    # The message's actual error on that weight (against the batch's float64 gradient) is of that size.
    exact = client_update(model, layer, batch, FedAvg(1, 1e-4, "float64")).shared.shared_grads[k].double()
    error = float((shared.shared_grads[k].double() - exact).square().mean().sqrt())
    assert 0.3 * std < error < 1.2 * std
    # The value weight's entries are smaller, their float32 spacing too.
    assert protocol.noise_std(shared, model, layer, query.replace("query", "value")) < std
    with pytest.raises(ValueError, match="is not shared in"):
        protocol.noise_std(shared, model, select(model, "attention.value", 0), query)


def test_the_weighted_distance_prefers_the_clients_sentence_to_a_one_token_change(minilm, fedavg_message):
    # completion.model_distance with the search's weights: the measure bench/noisy_span.py uses to tell a
    # miss of the search (the truth closer) from one of the noise model (the wrong sentence closer).
    model, _ = minilm
    protocol, selection, shared, truth = fedavg_message
    names, matrix = stacked_projections(model, selection.names, shared.shared_grads)
    _, weights = stacked_projections(model, selection.names, protocol.entry_weights(shared, model, selection))
    floor = completion.floored(weights, matrix, len(truth))
    wrong = truth[:3] + [truth[3] + 1] + truth[4:]
    right = completion.model_distance(model, names, matrix, truth, clipped=False, weights=floor)
    assert right < 0.5 * completion.model_distance(model, names, matrix, wrong, clipped=False, weights=floor)
    # Unweighted, the same distance as polish's with no moves.
    plain = completion.model_distance(model, names, matrix, truth, clipped=False)
    assert plain == pytest.approx(polish(model, names, matrix, torch.ones_like(matrix), truth,
                                         torch.zeros(len(truth) - 2, 1), sweeps=0).distance)
