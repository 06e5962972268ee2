"""The span check on a LoRA client's adapter gradients: the rank rule, measured on MiniLM."""

import pytest
import torch

from gilib.attack import Round, adapter_span_attack, span_attack
from gilib.attack.adapters import b_check, stacked_adapter_rows
from gilib.attack.rowspace import layer0_inputs
from gilib.client import client_update
from gilib.lora import lora_victim
from gilib.models import encode
from gilib.selection import select

TEXT = "the cat sat on a warm mat"  # 7 words: 9 distinct layer-0 inputs with [CLS] and [SEP]


@pytest.fixture(scope="module")
def true_batch(minilm):
    return encode(minilm[1], [TEXT], [1])


@pytest.fixture(scope="module")
def victims(minilm):
    """LoRA victims of MiniLM, adapters on layer 0 only, after three warm-up rounds (B off zero)."""
    model = minilm[0]
    return {(r, targets): lora_victim(model, targets, r=r, layers=0, warmup=3)
            for r, targets in [(16, ("query", "value")), (4, ("query",)), (8, ("query",)), (16, ("query",))]}


def _attack(victim, tokenizer, true_batch, component="lora"):
    selection = select(victim, component, 0)
    shared = client_update(victim, selection, true_batch).shared
    # The check needs no labels; the truth stays with the test.
    return shared, selection, span_attack(victim, tokenizer, shared._replace(labels=None), selection)


def test_rank_16_query_and_value_recover_the_sentence_exactly(minilm, victims, true_batch):
    truth = true_batch["input_ids"][0].tolist()
    _, _, result = _attack(victims[(16, ("query", "value"))], minilm[1], true_batch)
    assert result.token_ids[0] == truth and result.texts == [TEXT]
    assert result.diagnostics.rank == len(truth) == 9  # 32 stacked rows, rank capped by the 9 inputs
    assert result.diagnostics.weight.count(".lora_A.") == 2
    assert result.final_loss < 1e-4  # the chosen tokens lie in the stacked span


@pytest.mark.parametrize("r, exact", [(4, False), (8, False), (16, True)])
def test_the_rank_rule_one_query_adapter_is_exact_only_when_r_reaches_the_token_count(minilm, victims, true_batch,
                                                                                      r, exact):
    truth = true_batch["input_ids"][0].tolist()
    _, _, result = _attack(victims[(r, ("query",))], minilm[1], true_batch, "lora.query.A")
    assert result.diagnostics.rank == min(r, len(truth))
    assert (result.token_ids[0] == truth) is exact
    if not exact:
        # Below the rank rule true inputs leave the subspace: the best residual is far above round-off.
        assert result.final_loss > 1e-2


def test_the_stacked_a_rows_lie_in_the_inputs_span(minilm, victims, true_batch):
    victim = victims[(16, ("query", "value"))]
    selection = select(victim, "lora", 0)
    shared = client_update(victim, selection, true_batch).shared
    names, stacked = stacked_adapter_rows(victim, selection, shared.shared_grads)
    assert [n.split(".")[-4] for n in names] == ["query", "value"] and stacked.shape == (32, 384)
    # The client's own inputs (the truth, read here only to test the claim).
    inputs = torch.stack([layer0_inputs(victim, p, token_ids=[t])[0]
                          for p, t in enumerate(true_batch["input_ids"][0].tolist())]).double()
    basis = torch.linalg.qr(inputs.T).Q  # (384, 9)
    rows = stacked.double()
    outside = (rows - rows @ basis @ basis.T).norm() / rows.norm()
    assert outside < 1e-5


def test_stacking_rounds_lifts_a_rank_4_adapter_over_the_rank_rule(minilm, true_batch):
    """Three rounds of one rank-4 query adapter (the global B moves between rounds): 12 rows, rank 9, exact."""
    model, tokenizer = minilm
    truth = true_batch["input_ids"][0].tolist()
    rounds = [lora_victim(model, ("query",), r=4, layers=0, warmup=w) for w in (2, 3, 4)]
    updates = [client_update(v, select(v, "lora.A", 0), true_batch).shared._replace(labels=None) for v in rounds]
    one = adapter_span_attack(rounds[0], tokenizer, updates[:1], select(rounds[0], "lora.A", 0))
    two = adapter_span_attack(rounds[0], tokenizer, updates[:2], select(rounds[0], "lora.A", 0))
    three = adapter_span_attack(rounds[0], tokenizer, updates, select(rounds[0], "lora.A", 0))
    assert (one.diagnostics.rank, two.diagnostics.rank, three.diagnostics.rank) == (4, 8, 9)
    assert one.token_ids[0] != truth
    # One direction short, the chosen tokens may still be right, but the check cannot
    # certify them: their residuals stay far above float32 round-off (1e-7 to 1e-6).
    assert one.final_loss > 1e-2 and two.final_loss > 1e-3
    # Rounds a warm-up step apart have similar B: the stack's 9th direction is weak (4e-5 of the
    # first), so round-off tilts the span more than for one well-conditioned weight.
    assert three.token_ids[0] == truth and three.final_loss < 1e-3
    print(f"residuals: one round {one.final_loss:.2e}, two {two.final_loss:.2e}, three {three.final_loss:.2e}; "
          f"two rounds exact: {two.token_ids[0] == truth}")


def test_b_alone_pins_the_tokens_when_r_exceeds_the_token_count(minilm, victims, true_batch):
    truth = true_batch["input_ids"][0].tolist()
    victim = victims[(16, ("query", "value"))]
    selection = select(victim, "lora.B", 0)
    shared = client_update(victim, selection, true_batch).shared
    check = b_check(victim, minilm[1], shared.shared_grads, selection, len(truth), module="query")
    assert (check.rank, check.r) == (9, 16)
    assert check.passing == [1] * 7 and check.ids == truth


def test_b_alone_lets_the_vocabulary_through_when_r_is_below_the_token_count(minilm, victims, true_batch):
    victim = victims[(4, ("query",))]
    selection = select(victim, "lora.query.B", 0)
    shared = client_update(victim, selection, true_batch).shared
    check = b_check(victim, minilm[1], shared.shared_grads, selection, 9)
    allowed = int(torch.isfinite(check.residuals[0]).sum())
    assert check.rank == check.r == 4  # the projected inputs fill R^4
    assert all(p == allowed for p in check.passing) and allowed > 29000


def test_adapter_messages_are_refused_where_the_check_cannot_read_them(minilm, victims, true_batch):
    model, tokenizer = minilm
    victim = victims[(16, ("query", "value"))]
    selection = select(victim, "lora", 0)
    pair = encode(tokenizer, [TEXT, "a dog ran"], [1, 0])
    with pytest.raises(ValueError, match="runs at batch size 1"):
        span_attack(victim, tokenizer, client_update(victim, selection, pair).shared, selection)
    shared = client_update(victim, selection, true_batch).shared
    with pytest.raises(ValueError, match="noise and clipped are a plain weight"):
        span_attack(victim, tokenizer, shared, selection, noise=1e-6)
    b_only = select(victim, "lora.B", 0)
    with pytest.raises(ValueError, match="or, on a LoRA victim, of a layer-0 query, key or value A adapter"):
        span_attack(victim, tokenizer, client_update(victim, b_only, true_batch).shared, b_only)
    with pytest.raises(ValueError, match="holds no layer-0 query, key or value LoRA B weight"):
        b_check(victim, tokenizer, shared.shared_grads[:1], select(victim, "lora.query.A", 0), 9)
    fresh = lora_victim(model, ("query",), r=4, layers=0)
    fresh_selection = select(fresh, "lora", 0)
    with pytest.raises(ValueError, match="B was zero when the client computed them"):
        span_attack(fresh, tokenizer, client_update(fresh, fresh_selection, true_batch).shared, fresh_selection)
    with pytest.raises(ValueError, match="lengths differ"):
        other = client_update(victim, selection, encode(tokenizer, ["a dog ran"], [0])).shared
        adapter_span_attack(victim, tokenizer, [shared, other], selection)


def test_at_the_boundary_a_rank_equal_to_the_token_count_is_enough_for_a_but_not_for_b(minilm, victims):
    """8 tokens, one rank-8 query adapter: A's rows span all 8 inputs (exact); B's fill R^8 (nothing pinned)."""
    model, tokenizer = minilm
    true_batch = encode(tokenizer, ["the cat sat on a mat"], [1])
    truth = true_batch["input_ids"][0].tolist()
    assert len(truth) == 8
    victim = victims[(8, ("query",))]
    selection = select(victim, "lora.query", 0)
    shared = client_update(victim, selection, true_batch).shared
    result = span_attack(victim, tokenizer, shared._replace(labels=None), selection)
    assert result.diagnostics.rank == 8 and result.token_ids[0] == truth
    check = b_check(victim, tokenizer, shared.shared_grads, selection, len(truth))
    assert check.rank == check.r == 8 and min(check.passing) > 29000


def test_candidate_gradients_read_a_lora_a_weight_as_the_client_computes_it(minilm, victims, true_batch):
    from gilib.attack.completion import candidate_gradients

    victim = victims[(16, ("query", "value"))]
    selection = select(victim, "lora", 0)
    shared = client_update(victim, selection, true_batch).shared
    names = [n for n in selection.names if ".lora_A." in n]
    own = candidate_gradients(victim, names, true_batch["input_ids"], 1)[0]  # (2 r, d_in), query's rows first
    by_name = dict(zip(selection.names, shared.shared_grads))
    want = torch.cat([by_name[n].double() for n in names])
    assert own.shape == (32, 384)
    assert float((own - want).norm() / want.norm()) < 1e-5


def _adamw(victim, selection, true_batch):
    """One AdamW step's message (lr 5e-5), the server's inversion of it and the inversion's entry weights."""
    from gilib.client import AdamW

    adamw = AdamW(local_steps=1, lr=5e-5)
    message = client_update(victim, selection, true_batch, adamw).shared
    return adamw.gradient(message, victim, selection)._replace(labels=None), adamw.entry_weights(message, victim,
                                                                                                    selection)


@pytest.mark.slow
def test_an_adamw_reading_of_fitting_adapters_is_exact_with_the_noise_model(minilm, victims, true_batch):
    """r = 16 on query and value (32 rows, 9 tokens): the plain check misreads the AdamW inversion, the weighted
    fit and search read it exactly, for one message and for two rounds stacked."""
    model, tokenizer = minilm
    victim = victims[(16, ("query", "value"))]
    selection = select(victim, "lora", 0)
    reading, weights = _adamw(victim, selection, true_batch)
    truth = true_batch["input_ids"][0].tolist()
    assert 0.3 < float(torch.cat([w.reshape(-1) for w in weights]).mean()) < 1  # some entries lost
    found = span_attack(victim, tokenizer, reading, selection, weights=weights)
    assert found.token_ids[0] == truth
    assert found.diagnostics.rank == 9 and found.diagnostics.outside < 0.5
    later = lora_victim(model, ("query", "value"), r=16, layers=0, warmup=4)
    second, second_weights = _adamw(later, selection, true_batch)
    both = adapter_span_attack(victim, tokenizer, [reading, second], selection, weights=[weights, second_weights])
    assert both.token_ids[0] == truth
    # With each round's global model the search judges candidates on both blocks: still exact.
    rounds = adapter_span_attack(victim, tokenizer, [Round(victim, reading), Round(later, second)], selection,
                                 weights=[weights, second_weights])
    assert rounds.token_ids[0] == truth and rounds.diagnostics.rank == 9


def test_adapter_noise_models_that_do_not_fit_are_refused(minilm, victims, true_batch):
    model, tokenizer = minilm
    victim = victims[(16, ("query", "value"))]
    selection = select(victim, "lora", 0)
    reading, weights = _adamw(victim, selection, true_batch)
    with pytest.raises(ValueError, match="weights holds 1 lists for 2 rounds"):
        adapter_span_attack(victim, tokenizer, [reading, reading], selection, weights=[weights])
    with pytest.raises(ValueError, match=r"weights\[0\] must be a tensor of the message's shape"):
        span_attack(victim, tokenizer, reading, selection, weights=[torch.ones(3)] + list(weights[1:]))
    with pytest.raises(ValueError, match="Every entry weight is 0"):
        span_attack(victim, tokenizer, reading, selection, weights=[torch.zeros_like(w) for w in weights])
    with pytest.raises(ValueError, match="noise and clipped are a plain weight"):
        span_attack(victim, tokenizer, reading, selection, weights=weights, clipped=True)


@pytest.mark.slow
def test_one_round_as_a_round_gives_exactly_the_bare_messages_result(minilm, victims, true_batch):
    model, tokenizer = minilm
    victim = victims[(16, ("query", "value"))]
    selection = select(victim, "lora", 0)
    reading, weights = _adamw(victim, selection, true_batch)
    bare = adapter_span_attack(victim, tokenizer, [reading], selection, weights=[weights])
    as_round = adapter_span_attack(victim, tokenizer, [Round(victim, reading)], selection, weights=[weights])
    assert as_round.token_ids == bare.token_ids == true_batch["input_ids"].tolist()
    assert as_round.final_loss == bare.final_loss
    d, b = as_round.diagnostics, bare.diagnostics
    assert (d.weight, d.rank, d.min_gap, d.outside, d.candidates) == (b.weight, b.rank, b.min_gap, b.outside,
                                                                    b.candidates)


def test_the_search_scores_each_rounds_block_at_its_own_global_model(minilm, true_batch):
    """Two FedSGD rounds of a rank-4 query and value adapter (global models 3 warm-up steps apart): the true
    sentence's gradients match both blocks to round-off when each is taken at its own round's model, and the
    second block misses by far at the first round's model; one wrong token misses both."""
    from gilib.attack.completion import polish, stacked_adapter_entries

    model, tokenizer = minilm
    truth = true_batch["input_ids"][0].tolist()
    rounds = [lora_victim(model, ("query", "value"), r=4, layers=0, warmup=w) for w in (3, 6)]
    selection = select(rounds[0], "lora.A", 0)
    messages = [client_update(v, selection, true_batch).shared.shared_grads for v in rounds]
    ones = [[torch.ones_like(g) for g in m] for m in messages]
    per_round, matrix, weights = stacked_adapter_entries(selection.names, messages, ones, selection.names)
    assert matrix.shape == (16, 384)  # query and value, 4 rows each, two rounds
    residuals = torch.ones(len(truth) - 2, 30522, dtype=torch.float64)
    scale = float(matrix.square().mean())

    def distance(ids, later, rows=16):
        found = polish(rounds[0], per_round[0], matrix[:rows], weights[:rows], ids, residuals, candidates=(),
                       later=later)
        return found.distance / scale

    own = [(rounds[1], per_round[1])]
    assert distance(truth, own) < 1e-9
    assert distance(truth, [], rows=8) < 1e-9  # the first round's block alone, as without the rounds' models
    assert distance(truth, [(rounds[0], per_round[1])]) > 1e-2  # round 1's block at round 0's model
    wrong = truth[:3] + [tokenizer.convert_tokens_to_ids("dog")] + truth[4:]
    assert distance(wrong, own) > 1e-2 and distance(wrong, [], rows=8) > 1e-2
    with pytest.raises(ValueError, match="The message stacks 16 rows, and the rounds' names 8"):
        polish(rounds[0], per_round[0], matrix, weights, truth, residuals, candidates=())


def test_rounds_that_do_not_fit_the_model_are_refused(minilm, victims, true_batch):
    model, tokenizer = minilm
    victim = victims[(16, ("query", "value"))]
    selection = select(victim, "lora", 0)
    reading, weights = _adamw(victim, selection, true_batch)
    later = lora_victim(model, ("query", "value"), r=16, layers=0, warmup=4)
    second, second_weights = _adamw(later, selection, true_batch)
    both = [weights, second_weights]
    with pytest.raises(TypeError, match="must be a list with one entry per round"):
        adapter_span_attack(victim, tokenizer, reading, selection)
    with pytest.raises(TypeError, match="mixes Round"):
        adapter_span_attack(victim, tokenizer, [Round(victim, reading), second], selection, weights=both)
    with pytest.raises(ValueError, match="Round 0's model is not `model`"):
        adapter_span_attack(victim, tokenizer, [Round(later, second), Round(victim, reading)], selection,
                            weights=[second_weights, weights])
    other_rank = lora_victim(model, ("query", "value"), r=8, layers=0, warmup=4)
    with pytest.raises(ValueError, match=r"Round 1's model is not model's architecture \(it holds "
                                         r"'bert.encoder.layer.0.attention.self.query.lora_A.default.weight' as "
                                         r"\(8, 384\), model as \(16, 384\)\)"):
        adapter_span_attack(victim, tokenizer, [Round(victim, reading), Round(other_rank, second)], selection,
                            weights=both)
    query_only = victims[(16, ("query",))]
    with pytest.raises(ValueError, match="Round 1's model is not model's architecture \\(it has no parameter "
                                         "'bert.encoder.layer.0.attention.self.value.lora_A"):
        adapter_span_attack(victim, tokenizer, [Round(victim, reading), Round(query_only, second)], selection)
    with pytest.raises(ValueError, match="weights holds 1 lists for 2 rounds"):
        adapter_span_attack(victim, tokenizer, [Round(victim, reading), Round(later, second)], selection,
                            weights=[weights])


def test_an_adamw_reading_of_adapters_keeps_the_full_first_fit_and_the_plain_search(minilm, victims, true_batch,
                                                                                     monkeypatch):
    """A LoRA victim's AdamW reading is a 0/1 mask too, but the shorter first fit and the eager search are
    for layer 0's own weights (chapter 7 timed the adapters' search as it was): here every fit from the
    SVD runs ITERATIONS sweeps and no search is eager; still exact."""
    import gilib.attack.span as span
    from gilib.attack import completion

    _, tokenizer = minilm
    victim = victims[(16, ("query", "value"))]
    selection = select(victim, "lora", 0)
    reading, weights = _adamw(victim, selection, true_batch)
    assert {float(v) for w in weights for v in w.unique()} == {0.0, 1.0}
    fits, eager = [], []
    fit, search = span.completed_space, span.polish
    monkeypatch.setattr(span, "completed_space", lambda *a, **k: (
        fits.append(k.get("iterations")) if k.get("start") is None else None, fit(*a, **k))[1])
    monkeypatch.setattr(span, "polish", lambda *a, **k: (eager.append(k.get("eager", False)), search(*a, **k))[1])
    found = span_attack(victim, tokenizer, reading, selection, weights=weights)
    assert found.token_ids[0] == true_batch["input_ids"][0].tolist()
    assert fits == [completion.ITERATIONS] and eager and not any(eager)
