"""The span check on a LoRA decoder's adapter gradients: the rank rule counts predicting inputs, the prefix check."""

import pytest
import torch

from gilib.attack import adapter_span_attack, span_attack
from gilib.attack.adapters import stacked_adapter_rows
from gilib.attack.decoder import adapter_verifier, predicting_inputs
from gilib.attack.rowspace import layer0_inputs, row_space
from gilib.client import client_update
from gilib.data import load_split
from gilib.lora import lora_victim
from gilib.metrics import true_token_ids
from gilib.models import encode_lm, load_model
from gilib.selection import select

TEXT = "the cat sat on a warm mat"  # 7 words: 9 tokens with the start and end tokens, 8 predicting inputs
SENTENCES = [e.text for e in load_split("sample")[:4]]


@pytest.fixture(scope="module")
def gpt2_tiny():
    return load_model("gpt2-tiny", seed=0)


@pytest.fixture(scope="module")
def true_batch(gpt2_tiny):
    return encode_lm(gpt2_tiny[1], [TEXT])


def _victim(gpt2_tiny, r, targets=("c_attn",), warmup=3):
    return lora_victim(gpt2_tiny[0], targets, r=r, alpha=2 * r, layers=0, warmup=warmup)


def _attack(victim, tokenizer, true_batch, component="lora.A"):
    selection = select(victim, component, 0)
    message = client_update(victim, selection, true_batch).shared
    return message, selection, span_attack(victim, tokenizer, message, selection)


@pytest.mark.parametrize("r, exact", [(4, False), (7, None), (8, True), (16, True)])
def test_the_rank_rule_counts_the_predicting_inputs(gpt2_tiny, true_batch, r, exact):
    """Certified (every chosen token inside the span) exactly when r reaches the 8 predicting inputs.

    Below the rule each position's best token is only the likeliest: at r = 7 of 8 it may still be every
    true token (``exact`` None: not asserted), at r = 4 it is not.
    """
    truth = true_batch["input_ids"][0].tolist()
    assert predicting_inputs([len(truth)]) == len(truth) - 1 == 8  # the end token's output gradient is zero
    _, _, result = _attack(_victim(gpt2_tiny, r), gpt2_tiny[1], true_batch)
    d = result.diagnostics
    assert d.rank == min(r, 8) and d.weight == "transformer.h.0.attn.c_attn.lora_A.default.weight"
    assert d.verifier is None and d.found is None  # c_attn's adapter alone: the sentence is read off step 1
    if exact is not None:
        assert (result.token_ids[0] == truth) is exact
    if r >= 8:
        assert result.final_loss < 1e-4  # the chosen tokens lie in the A rows' span
    else:
        assert result.final_loss > 1e-2  # below the rule true inputs leave the subspace: nothing certified
    if exact is False:
        right = sum(a == b for a, b in zip(result.token_ids[0][1:-1], truth[1:-1]))
        assert 0 < right < len(truth) - 2  # partial: some positions still right


def test_the_a_rows_lie_in_the_span_of_layer_0s_inputs(gpt2_tiny, true_batch):
    victim = _victim(gpt2_tiny, 16)
    selection = select(victim, "lora", 0)
    message = client_update(victim, selection, true_batch).shared
    _, rows = stacked_adapter_rows(victim, selection, message.shared_grads)
    ids = true_batch["input_ids"][0]
    inputs = torch.stack([layer0_inputs(victim, p, token_ids=[int(t)])[0] for p, t in enumerate(ids[:-1])])
    inside = row_space(inputs).residual(rows.double())
    outside = row_space(inputs).residual(layer0_inputs(victim, 8, token_ids=[int(ids[-1])]).double())
    assert float(inside.max()) < 1e-5 and float(outside.min()) > 1e-2  # not the end token's input


def test_an_mlp_adapter_checks_prefixes_when_its_rows_reach_the_inputs(gpt2_tiny, true_batch):
    truth = true_batch["input_ids"][0].tolist()
    wide = _victim(gpt2_tiny, 16, ("c_attn", "mlp.c_fc"))
    _, _, result = _attack(wide, gpt2_tiny[1], true_batch)
    assert result.token_ids[0] == truth
    assert result.diagnostics.verifier == "transformer.h.0.mlp.c_fc.lora_A.default.weight"
    assert result.diagnostics.found == [True] and result.final_loss < 1e-3
    # Rank 4 < 8 predicting inputs: a true prefix would leave the subspace, so the adapter is passed over.
    narrow = _victim(gpt2_tiny, 4, ("c_attn", "mlp.c_fc"))
    message, selection, result = _attack(narrow, gpt2_tiny[1], true_batch)
    assert result.diagnostics.verifier is None and result.token_ids[0] != truth
    assert adapter_verifier(narrow, selection, [message.shared_grads], message.lengths) is None


def test_a_batch_needs_an_adapter_verifier_and_then_comes_back_whole(gpt2_tiny):
    batch = encode_lm(gpt2_tiny[1], SENTENCES[:2])
    victim = _victim(gpt2_tiny, 32, ("c_attn", "mlp.c_fc"))
    _, _, result = _attack(victim, gpt2_tiny[1], batch)
    assert sorted(map(tuple, true_token_ids(batch))) == sorted(map(tuple, result.token_ids))
    assert result.diagnostics.found == [True, True]
    alone = _victim(gpt2_tiny, 32)
    with pytest.raises(ValueError, match=r"needs a weight that reads layer 0's activations.*reach the batch's "
                                         r"\d+ predicting inputs"):
        _attack(alone, gpt2_tiny[1], batch)


def test_stacking_two_rounds_lifts_rank_4_over_the_rule(gpt2_tiny, true_batch):
    truth = true_batch["input_ids"][0].tolist()
    victims = [_victim(gpt2_tiny, 4, warmup=w) for w in (3, 5)]  # B moves between rounds: new directions
    selection = select(victims[0], "lora.A", 0)
    messages = [client_update(v, selection, true_batch).shared for v in victims]
    one = adapter_span_attack(victims[0], gpt2_tiny[1], messages[:1], selection)
    both = adapter_span_attack(victims[0], gpt2_tiny[1], messages, selection)
    assert one.diagnostics.rank == 4 and one.token_ids[0] != truth
    assert both.diagnostics.rank == 8 and both.token_ids[0] == truth
    assert both.diagnostics.weight.count(".lora_A.") == 2


def test_lora_decoder_messages_are_refused_where_the_check_cannot_read_them(gpt2_tiny, true_batch):
    victim = _victim(gpt2_tiny, 8)
    with pytest.raises(ValueError, match="or on a LoRA decoder of its A adapter.*lora.c_attn.A"):
        _attack(victim, gpt2_tiny[1], true_batch, "lora.B")
    fresh = _victim(gpt2_tiny, 8, warmup=0)
    with pytest.raises(ValueError, match="Every layer-0 A gradient is zero"):
        _attack(fresh, gpt2_tiny[1], true_batch, "lora")  # B moves, A does not (B = 0)
    selection = select(victim, "lora.A", 0)
    messages = [client_update(victim, selection, encode_lm(gpt2_tiny[1], [t])).shared for t in (TEXT, "a dog")]
    with pytest.raises(ValueError, match="The rounds' lengths differ"):
        adapter_span_attack(victim, gpt2_tiny[1], messages, selection)
    with pytest.raises(ValueError, match="No update given"):
        adapter_span_attack(victim, gpt2_tiny[1], [], selection)


@pytest.mark.parametrize("r", [4, 8, 9, 16])
def test_b_alone_on_the_decoder_pins_the_tokens_once_r_exceeds_the_predicting_inputs(gpt2_tiny, true_batch, r):
    """c_attn's B gradient spans the 8 predicting inputs' projections A x in R^r (a BERT sentence of 9 tokens
    would need r = 10). At r = 9 (the token count) every position's smallest residual is the true token, with a
    few impostors under the threshold (one spare dimension); at r = 16 the true token alone passes. At r = 8 (the
    predicting inputs) and 4 the span fills R^r and the whole vocabulary passes."""
    from gilib.attack.adapters import b_check

    truth = true_batch["input_ids"][0].tolist()
    victim = _victim(gpt2_tiny, r)
    selection = select(victim, "lora.B", 0)
    message = client_update(victim, selection, true_batch).shared
    check = b_check(victim, gpt2_tiny[1], message.shared_grads, selection, len(truth))
    assert check.weight == "transformer.h.0.attn.c_attn.lora_B.default.weight" and check.r == r
    assert check.rank == min(r, 8)  # the end token's output gradient is zero: 8 inputs, not 9
    true_residuals = [float(row[t]) for row, t in zip(check.residuals, truth[1:-1])]
    assert max(true_residuals) < 1e-5  # every true token's A x lies in the span
    allowed = int(torch.isfinite(check.residuals[0]).sum())
    second = check.residuals.topk(2, dim=1, largest=False).values[:, 1]  # each position's runner-up
    if r == 9:
        assert check.ids == truth  # the truth is each position's smallest residual ...
        assert all(1 < p < 30 for p in check.passing)  # ... with a few impostors under the threshold
        assert float(second.min()) > 10 * max(true_residuals)
    elif r == 16:
        # Eight of sixteen dimensions: B alone pins the sentence, the runner-up far outside.
        assert check.ids == truth and check.passing == [1] * 7 and float(second.min()) > 1e-2
    else:
        assert check.passing == [allowed] * 7 and allowed > 29000


def test_b_check_on_the_decoder_refuses_what_it_cannot_read(gpt2_tiny, true_batch):
    from gilib.attack.adapters import b_check

    tokenizer = gpt2_tiny[1]
    victim = _victim(gpt2_tiny, 16, ("c_attn", "mlp.c_fc"))
    selection = select(victim, "lora", 0)
    message = client_update(victim, selection, true_batch).shared
    with pytest.raises(ValueError, match="module must be 'c_attn' on a GPT-2 decoder"):
        b_check(victim, tokenizer, message.shared_grads, selection, 9, module="query")
    with pytest.raises(ValueError, match="module must be 'c_attn' on a GPT-2 decoder"):
        b_check(victim, tokenizer, message.shared_grads, selection, 9, module="mlp.c_fc")
    a_only = select(victim, "lora.A", 0)
    with pytest.raises(ValueError, match=r"holds no layer-0 c_attn LoRA B weight.*lora\.c_attn\.B"):
        b_check(victim, tokenizer, message.shared_grads[:2], a_only, 9)
    mlp_only = select(victim, "lora.mlp.c_fc.B", 0)
    with pytest.raises(ValueError, match="only the fused c_attn's adapter reads layer 0's input"):
        b_check(victim, tokenizer, message.shared_grads[:1], mlp_only, 9)
    with pytest.raises(ValueError, match="with its start and end tokens, 3..128"):
        b_check(victim, tokenizer, message.shared_grads, selection, 2)
    with pytest.raises(ValueError, match="The message holds 3 tensors for the 4"):
        b_check(victim, tokenizer, message.shared_grads[:3], selection, 9)
