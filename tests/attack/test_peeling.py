"""Batches recovered sentence by sentence: the checks, the peel test, the search, the baseline."""

import pytest
import torch

from gilib.attack import SpanConfig, span_attack
from gilib.attack.span import verifier_weight
from gilib.attack.checks import SKETCH, ForwardCheck, _outside_map, _sketch_map, reads_of
from gilib.attack.searches import _diverse, beam_search, completed_beam, enumerate_batch
from gilib.attack.peeling import (
    PEELED,
    peel_test,
    sentence_gradients,
)
from gilib.attack.positions import bag_shares
from gilib.attack.rowspace import check_positions, row_space
from gilib.attack.tokens import TokenSpace
from gilib.client import client_update
from gilib.data import load_split
from gilib.metrics import true_token_ids
from gilib.models import encode
from gilib.selection import select

QUERY0 = "bert.encoder.layer.0.attention.self.query.weight"
QUERY1 = "bert.encoder.layer.1.attention.self.query.weight"


def _batch(tokenizer, examples):
    return encode(tokenizer, [e.text for e in examples], [e.label for e in examples])


def _shared(model, tokenizer, layers, examples, component="attention.query"):
    """The client's selection (layer 0's query, or layers 0 and 1), its private batch and its message."""
    selection = select(model, component, layers)
    true_batch = _batch(tokenizer, examples)
    return selection, true_batch, client_update(model, selection, true_batch).shared


def _layer1_check(minilm):
    """Three bundled sentences' message of layers 0 and 1's queries, and the layer-1 check of that batch."""
    model, tokenizer = minilm
    selection, true_batch, update = _shared(model, tokenizer, [0, 1], load_split("sample")[:3])
    check = ForwardCheck(model, row_space(update.shared_grads[selection.names.index(QUERY1)],
                                         max_rank=sum(update.lengths)))
    return true_batch, update, check


def test_a_weak_direction_under_numpys_tolerance_stays_in_the_row_space():
    torch.manual_seed(0)
    basis = torch.linalg.qr(torch.randn(64, 6))[0]
    weights = torch.tensor([1.0, 0.5, 0.2, 0.1, 0.05, 3e-6])  # the last under 64 * eps(float32) = 7.6e-6
    gradient = (torch.randn(32, 6) * weights) @ basis.T
    gradient = gradient + 1e-9 * torch.randn(32, 64)  # round-off
    assert row_space(gradient).rank == 5
    # The caller's bound (6 tokens) says where the noise is: the weak direction is real.
    assert row_space(gradient, max_rank=6).rank == 6


def test_the_local_score_is_the_layer1_residual_at_the_current_tokens(minilm):
    true_batch, update, check = _layer1_check(minilm)
    n = update.lengths[0]
    h = true_batch["input_ids"][0, :n]
    positions = torch.arange(1, n - 1)
    local = check.local(h, h[1:-1], positions)
    torch.testing.assert_close(local, check.position_residuals(h[None])[0], rtol=0.3, atol=1e-6)
    # True sentences lie in the span; a shuffled one does not.
    assert float(check.loss(h[None])[0]) < 1e-5
    shuffled = h.clone()
    shuffled[1:-1] = h[1:-1].flip(0)
    assert float(check.loss(shuffled[None])[0]) > 1e-3


def test_the_appended_score_is_the_prefix_residual_at_its_new_position(minilm):
    true_batch, update, check = _layer1_check(minilm)
    prefixes = true_batch["input_ids"][:2, :4]
    options = true_batch["input_ids"][:, 4]
    cheap = check.appended(prefixes, options)
    assert cheap.shape == (2, 3)
    for i in range(2):
        extended = torch.cat([prefixes[i].expand(3, -1), options[:, None]], 1)
        torch.testing.assert_close(cheap[i], check.prefix_residuals(extended)[:, -1], rtol=1e-4, atol=1e-9)


def test_the_local_score_of_several_hypotheses_is_each_ones_own(minilm):
    true_batch, update, check = _layer1_check(minilm)
    n = update.lengths[0]
    hypotheses = true_batch["input_ids"][0, :n].repeat(3, 1)
    hypotheses[1, 2], hypotheses[2, 3] = 2000, 3000
    options, positions = torch.tensor([1996, 2000, 3000, 4000]), torch.full((4,), 4)
    together = check.local(hypotheses, options, positions)
    assert together.shape == (3, 4)
    for h, row in zip(hypotheses, together):
        torch.testing.assert_close(row, check.local(h, options, positions), rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("width, rank, kind", [(1536, 300, "sketch"), (384, 320, "complement"), (1536, 40, "exact")])
def test_each_residual_map_measures_the_distance_to_the_span(width, rank, kind):
    generator = torch.Generator().manual_seed(1)
    basis = torch.linalg.qr(torch.randn(width, rank, generator=generator, dtype=torch.float64))[0]
    # The sketch only where both exact maps are wide; the complement where it is narrower than the span.
    assert (_sketch_map(basis) is None) == (kind != "sketch")
    outside = _sketch_map(basis) if kind == "sketch" else _outside_map(basis)
    assert (outside is None) == (kind == "exact")
    if outside is None:
        return
    assert outside.shape == (width, SKETCH if kind == "sketch" else width - rank)
    inside = torch.randn(50, rank, generator=generator, dtype=torch.float64) @ basis.T
    off = torch.randn(50, width, generator=generator, dtype=torch.float64)
    vectors = inside + 0.01 * off
    exact = (vectors - (vectors @ basis) @ basis.T).norm(dim=-1)
    mapped = (vectors @ outside).norm(dim=-1)
    # The complement is the distance itself; the sketch is within a few times 1 / sqrt(SKETCH).
    tolerance = 1e-10 if kind == "complement" else 0.35
    torch.testing.assert_close(mapped / exact, torch.ones(50, dtype=torch.float64), rtol=tolerance, atol=0.0)
    assert float((inside @ outside).norm(dim=-1).max()) < 1e-9 * float(inside.norm(dim=-1).max())


def _sixteen(model, tokenizer):
    """The 16 bundled sentences' layer-0 and layer-1 query message: its layer-0 sets and the layer-1 check."""
    selection, true_batch, update = _shared(model, tokenizer, [0, 1], load_split("sample")[:16])
    grads = dict(zip(selection.names, update.shared_grads))
    _, layer0, candidates = check_positions(model, TokenSpace(model, tokenizer), grads[QUERY0], update.lengths,
                                            shift_invariant=False, threshold=1e-4, capped=False)
    check = ForwardCheck(model, row_space(grads[QUERY1], max_rank=sum(update.lengths)))
    return true_batch, update, grads, layer0, candidates, check


@pytest.mark.slow
def test_the_beam_closes_the_true_sentences_of_a_bag(minilm):
    # Sixteen sentences: the candidate sets hold more tokens than there are sentences.
    model, tokenizer = minilm
    true_batch, update, _, layer0, candidates, check = _sixteen(model, tokenizer)
    assert min(len(c) for c in candidates[:6]) > 16
    hits, best = beam_search(check, candidates, update.lengths, tokenizer, layer0=layer0)
    truth = true_token_ids(true_batch)
    assert hits and all(list(h) in truth for h in hits)
    assert set(best) == set(update.lengths)
    assert all(len(h) == n for n, (h, _) in best.items())


def test_the_completed_beam_closes_a_sentence_of_the_length_it_is_given(minilm):
    # Sixteen sentences, the bag at every position. The fill is the position split's likeliest token at
    # each position, which is not the true sentence: the sentence must come from the search.
    model, tokenizer = minilm
    true_batch, update, grads, layer0, candidates, check = _sixteen(model, tokenizer)
    truth = true_token_ids(true_batch)
    bag, shares = bag_shares(model, grads[QUERY0], candidates, (tokenizer.cls_token_id, tokenizer.sep_token_id),
                             max(update.lengths))
    n = min(update.lengths)
    fill = [max(candidates[p - 1], key=lambda t: float(shares[bag.index(int(t)), p])) for p in range(1, n - 1)]
    assert not any(t[1:-1] == fill for t in truth)
    hits = completed_beam(check, candidates, n, fill, tokenizer, width=16, layer0=layer0)
    assert hits and all(list(h) in truth and len(h) == n for h in hits)
    with pytest.raises(ValueError, match="fill must hold"):
        completed_beam(check, candidates, n, fill[:-1], tokenizer)


def test_each_verifier_weight_reads_its_own_activations(minilm):
    model, _ = minilm
    stem = "bert.encoder.layer."
    assert reads_of(QUERY1) == reads_of(stem + "1.attention.self.value.weight") == "layer"
    assert reads_of(stem + "0.intermediate.dense.weight") == "attention"
    assert reads_of(stem + "0.output.dense.weight") == "ffn"
    assert reads_of(stem + "0.attention.output.dense.weight") == "layer"  # not a verifier: never chosen
    assert verifier_weight(model, select(model, "layer", 0)) == stem + "0.output.dense.weight"
    assert verifier_weight(model, select(model, "ffn.intermediate", 0)) == stem + "0.intermediate.dense.weight"
    assert verifier_weight(model, select(model, "layer", [0, 1])) == QUERY1
    assert verifier_weight(model, select(model, "attention.query", 0)) is None
    with pytest.raises(ValueError, match="reads must be one of"):
        ForwardCheck(model, row_space(torch.ones(4, 384)), "ffn.output")


def test_the_beam_keeps_more_than_one_sentence_start():
    score = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.9, 1.0])
    starts = torch.tensor([5, 5, 5, 5, 7, 8])
    # Half the beam at most for one first word: the others' best fill the rest.
    assert _diverse(score, starts, 4).tolist() == [0, 1, 4, 5]
    # With one start only, the cap leaves room that the best of the rest fill.
    assert _diverse(score, torch.full((6,), 5), 4).tolist() == [0, 1, 2, 3]


def test_peeling_the_right_sentence_with_the_right_label_lowers_the_rank(minilm):
    model, tokenizer = minilm
    examples = load_split("sample")[:3]
    selection, true_batch, update = _shared(model, tokenizer, 0, examples)
    (gradient,) = update.shared_grads
    n, label = update.lengths[0], int(update.labels[0])
    h = true_batch["input_ids"][0, :n]
    rest = sum(update.lengths) - n
    (right,) = sentence_gradients(model, [QUERY0], h, label, batch_size=3)
    (wrong_label,) = sentence_gradients(model, [QUERY0], h, 1 - label, batch_size=3)
    other = h.clone()
    other[2] = tokenizer.convert_tokens_to_ids("banana")
    (wrong_sentence,) = sentence_gradients(model, [QUERY0], other, label, batch_size=3)
    assert peel_test(gradient, right, rest) < PEELED
    assert peel_test(gradient, wrong_label, rest) > 100 * PEELED
    assert peel_test(gradient, wrong_sentence, rest) > 100 * PEELED
    # What is left is the gradient of the other two sentences.
    others = client_update(model, selection, _batch(tokenizer, examples[1:])).shared.shared_grads[0]
    torch.testing.assert_close(gradient - right, others * 2 / 3, rtol=0, atol=1e-5 * float(gradient.abs().max()))


@pytest.mark.parametrize("component, layers, verifier, size, first", [
    ("attention.query", [0, 1], QUERY1, 4, 4),
    ("attention.query", [0, 1], QUERY1, 8, 0),
    # The whole of layer 0, no layer 1 (batches of long review sentences: the cached study, tests/claims).
    ("layer", [0], "bert.encoder.layer.0.output.dense.weight", 8, 16),
    ("attention.query", [0], None, 2, 4),
])
def test_a_batch_comes_back_exactly_with_and_without_layer_1(minilm, component, layers, verifier, size, first):
    model, tokenizer = minilm
    selection, true_batch, update = _shared(model, tokenizer, layers, load_split("sample")[first:first + size],
                                            component)
    result = span_attack(model, tokenizer, update._replace(labels=None), selection, SpanConfig(seed=1))
    truth = true_token_ids(true_batch)
    assert sorted(result.token_ids) == sorted(truth)
    assert result.diagnostics.found == [True] * size and result.diagnostics.uncertain == [[]] * size
    # Peeling told every sentence's label.
    by_text = {tuple(t): int(y) for t, y in zip(truth, update.labels)}
    assert [by_text[tuple(t)] for t in result.token_ids] == result.diagnostics.labels
    assert result.diagnostics.verifier == (verifier or f"{QUERY0} (output gradients)")


@pytest.mark.parametrize("component, layers, rows, labels", [
    # Three copies of one sentence, checked by layer 1: one copy off leaves the others' directions in.
    ("attention.query", [0, 1], [3, 3, 3], [1, 1, 1]),
    # Two copies with different labels beside another sentence; the layer-0 weight's own output gradients.
    ("attention.query", [0], [2, 2, 1], [1, 0, 1]),
])
def test_a_sentence_the_client_holds_twice_peels_with_each_copys_label(minilm, component, layers, rows, labels):
    model, tokenizer = minilm
    sample = load_split("sample")
    selection = select(model, component, layers)
    true_batch = encode(tokenizer, [sample[i].text for i in rows], labels)
    update = client_update(model, selection, true_batch).shared
    result = span_attack(model, tokenizer, update._replace(labels=None), selection, SpanConfig(seed=1))
    assert sorted(result.token_ids) == sorted(true_token_ids(true_batch))
    assert result.diagnostics.found == [True] * len(rows)
    # Copies of one text are interchangeable: their labels come back as a multiset, per text.
    by_text = {}
    for ids, label in zip(result.token_ids, result.diagnostics.labels):
        by_text.setdefault(tuple(ids), []).append(label)
    truth = {}
    for ids, label in zip(true_token_ids(true_batch), labels):
        truth.setdefault(tuple(ids), []).append(label)
    assert {t: sorted(y) for t, y in by_text.items()} == {t: sorted(y) for t, y in truth.items()}


def _unresolvable(model, tokenizer):
    """Four bundled sentences' message of layers 0 and 1's queries, with noise on layer 1's gradient: its row
    space is no longer the inputs', so no sentence passes. Returns ``(selection, the exact update, the message)``."""
    selection, _, update = _shared(model, tokenizer, [0, 1], load_split("sample")[4:8])
    grads = list(update.shared_grads)
    i = selection.names.index(QUERY1)
    grads[i] = grads[i] + 1e-2 * grads[i].abs().max() * torch.randn(grads[i].shape,
                                                                       generator=torch.Generator().manual_seed(0))
    return selection, update, update._replace(shared_grads=grads)


@pytest.mark.slow
def test_an_unresolved_batch_returns_its_best_guess_and_the_uncertain_positions(minilm):
    model, tokenizer = minilm
    selection, update, message = _unresolvable(model, tokenizer)
    result = span_attack(model, tokenizer, message, selection, SpanConfig(kicks=2, max_effort=1))
    assert result.diagnostics.found == [False] * 4 and result.diagnostics.labels == [None] * 4
    assert all(0 < len(u) <= n - 2 for u, n in zip(result.diagnostics.uncertain, update.lengths))
    assert [len(t) for t in result.token_ids] == update.lengths


def test_the_check_counts_the_positions_it_runs_through_layer_0(minilm):
    true_batch, update, check = _layer1_check(minilm)
    n = update.lengths[0]
    h = true_batch["input_ids"][0, :n]
    assert check.forwarded == 0
    check.position_residuals(h.repeat(3, 1))
    check.loss(h[None])
    check.prefix_residuals(h[None, :4])
    assert check.forwarded == 3 * n + n + 4
    # The cheap scores rerun one position per candidate: not counted.
    check.local(h, h[1:-1], torch.arange(1, n - 1))
    check.appended(h[None, :4], h[4:6])
    assert check.forwarded == 4 * n + 4


@pytest.mark.slow
def test_the_sweeps_below_full_effort_stop_at_a_share_of_the_beams_work(minilm, monkeypatch):
    # No sentence passes (_unresolvable), so each round's beam finds nothing and the sweeps run; below
    # full effort they stop once they have run SWEEP_SHARE times the beam's positions through the check
    # (a count: the same batch gives the same searches on any machine and under any load).
    import gilib.attack.peeling as peeling

    model, tokenizer = minilm
    selection, update, message = _unresolvable(model, tokenizer)
    rounds = []
    own_beam, own_sweep = peeling._Peeler._beam, peeling._Peeler._sweep

    def beam(self, check, *args):
        work = check.forwarded
        result = own_beam(self, check, *args)
        rounds.append({"effort": self.effort, "beam": check.forwarded - work})
        return result

    def sweep(self, check, candidates, left, best, until=None):
        work = check.forwarded
        result = own_sweep(self, check, candidates, left, best, until)
        rounds[-1].update(sweeps=check.forwarded - work, capped=until is not None)
        return result

    monkeypatch.setattr(peeling._Peeler, "_beam", beam)
    monkeypatch.setattr(peeling._Peeler, "_sweep", sweep)
    config = SpanConfig(kicks=1, restarts=1, max_effort=2)
    first = span_attack(model, tokenizer, message, selection, config)
    below = [r for r in rounds if r["effort"] == 1]
    assert below and all(r["capped"] for r in below) and not any(r["capped"] for r in rounds if r["effort"] == 2)
    # Each capped sweep stops within one position's hypotheses (5 x the beam's width, whole) past its share.
    width, longest = config.beam, max(update.lengths)
    for r in below:
        assert peeling.SWEEP_SHARE * r["beam"] <= r["sweeps"] <= peeling.SWEEP_SHARE * r["beam"] + 5 * width * longest
    # The same message, the same searches and the same guesses.
    counted, rounds[:] = list(rounds), []
    again = span_attack(model, tokenizer, message, selection, config)
    assert rounds == counted and again.token_ids == first.token_ids


def test_a_spent_time_budget_returns_the_best_partial_batch_and_says_so(minilm):
    model, tokenizer = minilm
    selection, true_batch, update = _shared(model, tokenizer, [0, 1], load_split("sample")[:8])
    # A budget the candidate check alone exceeds: peeling stops before its first sentence.
    result = span_attack(model, tokenizer, update, selection, SpanConfig(seed=1, time_budget=1e-6))
    assert result.diagnostics.timed_out and result.diagnostics.rounds == 0
    assert result.diagnostics.found == [False] * 8 and result.diagnostics.labels == [None] * 8
    assert [len(t) for t in result.token_ids] == update.lengths  # a whole guess per sentence
    assert result.config["time_budget"] == 1e-6
    # Unlimited, the same batch comes back whole and the flag stays down.
    full = span_attack(model, tokenizer, update, selection, SpanConfig(seed=1))
    assert not full.diagnostics.timed_out and full.diagnostics.found == [True] * 8
    assert sorted(full.token_ids) == sorted(true_token_ids(true_batch))
    # A budget that ends mid-peeling keeps what it verified: found sentences are true ones.
    partial = span_attack(model, tokenizer, update, selection,
                          SpanConfig(seed=1, time_budget=0.6 * full.seconds))
    truth = {tuple(t) for t in true_token_ids(true_batch)}
    assert all(tuple(t) in truth for t, ok in zip(partial.token_ids, partial.diagnostics.found) if ok)
    assert partial.diagnostics.timed_out == (not all(partial.diagnostics.found))


def test_the_enumeration_baseline_finds_a_batch_of_two(minilm):
    model, tokenizer = minilm
    selection, true_batch, update = _shared(model, tokenizer, [0, 1], load_split("sample")[:2])
    ids = enumerate_batch(model, tokenizer, selection.names, update.shared_grads, QUERY0, QUERY1,
                          update.lengths, threshold=1e-4, budget=1000)
    assert sorted(ids[i, :n].tolist() for i, n in enumerate(update.lengths)) == sorted(
        true_token_ids(true_batch))


def test_a_check_ranks_exactly_and_preselects_through_the_sketch(minilm):
    # On a wide span (layer 0's FFN activations, rank 300) the cheap stages may go through the sketch, but
    # whole hypotheses and prefixes, which the searches rank, are measured exactly.
    model, _ = minilm
    generator = torch.Generator().manual_seed(3)
    gradient = torch.randn(384, 300, generator=generator) @ torch.randn(300, 1536, generator=generator)
    space = row_space(gradient, max_rank=300)
    hypothesis = torch.tensor([[101, 1996, 4937, 2938, 2006, 1996, 13523, 1012, 102]])
    exact = ForwardCheck(model, space, "ffn", sketch=False)
    sketched = ForwardCheck(model, space, "ffn")
    assert sketched.cheap.shape == (1536, SKETCH) and exact.cheap is None and sketched.outside is None
    torch.testing.assert_close(sketched.position_residuals(hypothesis), exact.position_residuals(hypothesis))
    torch.testing.assert_close(sketched.prefix_residuals(hypothesis[:, :5]), exact.prefix_residuals(hypothesis[:, :5]))
    options = torch.tensor([1996, 4937, 2938, 13523])
    cheap, true = sketched.appended(hypothesis[:, :4], options), exact.appended(hypothesis[:, :4], options)
    assert not torch.equal(cheap, true)  # through the sketch: within its spread, not equal
    torch.testing.assert_close(cheap / true, torch.ones_like(true), rtol=0.35, atol=0.0)


def test_a_check_under_noise_measures_residuals_exactly():
    # The sketch is for exact messages; a noisy one's check projects exactly.
    generator = torch.Generator().manual_seed(1)
    basis = torch.linalg.qr(torch.randn(1536, 300, generator=generator, dtype=torch.float64))[0]
    assert _sketch_map(basis).shape == (1536, SKETCH)
    assert _outside_map(basis) is None
