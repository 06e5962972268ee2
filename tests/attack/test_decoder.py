"""The span check on a GPT-2-style decoder: exact recovery, the causal check's premise, and clear refusals."""

import pytest
import torch

from gilib.attack import AttackConfig, SpanConfig, SpanDiagnostics, optimization_attack, span_attack
from gilib.attack.decoder import ACCEPT, CausalCheck, decoder_span_attack, input_space, verifier_of
from gilib.attack.objectives import GradientMatcher
from gilib.attack.tokens import TokenSpace
from gilib.attack.rowspace import layer0_inputs
from gilib.client import client_update
from gilib.data import load_split
from gilib.metrics import true_token_ids
from gilib.models import encode, encode_lm, load_model
from gilib.selection import select

SENTENCES = [e.text for e in load_split("sample")[:12]]
"""The bundled sample's first sentences (SST-2-like, CoLA-like and longer ones, 6 to 25 words)."""


@pytest.fixture(scope="module")
def gpt2_tiny():
    return load_model("gpt2-tiny", seed=0)


@pytest.fixture(scope="module")
def gpt2_shape():
    return load_model("gpt2-shape", seed=0)


def _attack(victim, texts, component="layer", layers=0, config=None):
    """A decoder client's message for ``texts`` and the span check on it: ``(truth, result, update)``."""
    model, tokenizer = victim
    selection = select(model, component, layers)
    true_batch = encode_lm(tokenizer, texts)
    update = client_update(model, selection, true_batch).shared
    return true_token_ids(true_batch), span_attack(model, tokenizer, update, selection, config), update


def _same_batch(truth, found):
    return sorted(map(tuple, truth)) == sorted(map(tuple, found))


@pytest.mark.parametrize("size", [1, 2, 4])
def test_exact_recovery_on_the_tiny_decoder(gpt2_tiny, size):
    for start in range(0, 8, size):
        texts = SENTENCES[start:start + size]
        truth, result, update = _attack(gpt2_tiny, texts)
        assert update.labels is None  # a decoder has no classes
        assert _same_batch(truth, result.token_ids), (texts, result.texts)
        assert result.diagnostics.found == [True] * size
        assert result.final_loss < 1e-5  # float32 round-off, against ACCEPT = 1e-3


@pytest.mark.parametrize("size", [1, 2, 4])
def test_exact_recovery_on_gpt2_small_shape(gpt2_shape, size):
    texts = SENTENCES[12 - size:12] if size < 4 else SENTENCES[8:12]  # the longest ones: 10 to 25 words
    truth, result, _ = _attack(gpt2_shape, texts)
    assert _same_batch(truth, result.token_ids)
    d = result.diagnostics
    assert isinstance(d, SpanDiagnostics) and d.weight == "transformer.h.0.attn.c_attn.weight"
    assert d.verifier == "transformer.h.0.mlp.c_fc.weight" and not d.timed_out
    assert d.rank == _input_rank(truth)


def _input_rank(truth) -> int:
    """The rank of the layer-0 inputs of a batch's predicting positions (all but the end token), at random weights.

    With ``ln_1``'s initial gain 1 and bias 0, ``sigma x = z - mean(z)`` is
    linear in ``z = wte[t] + wpe[p]``: up to each input's own scale, which a
    span ignores, the inputs are sums of a token's and a position's vector.
    Their span is that of the pairs of a spanning forest of the bipartite
    token-position graph: tokens plus positions, less its components (a
    cycle such as ``the@1, it@1, it@24, .@24, .@11, the@11`` adds none).
    """
    pairs = {(t, p) for row in truth for p, t in enumerate(row[:-1])}
    parent = {}

    def root(node):
        while parent.setdefault(node, node) != node:
            node = parent[node]
        return node

    for t, p in pairs:
        parent[root(("token", t))] = root(("position", p))
    return len(parent) - len({root(node) for node in list(parent)})
    assert not any("[CLS]" in text or "[SEP]" in text for text in result.texts)  # decoded without them


@pytest.mark.parametrize("texts", [
    ["the film was good", "the film was good and long", "the film was bad"],  # shared prefixes, one inside another
    ["the dog ran far away", "a cat sat", "the dog ran far away"],  # a sentence twice: one leaf, taken twice
])
def test_shared_prefixes_a_sentence_inside_another_and_a_duplicate(gpt2_tiny, texts):
    truth, result, _ = _attack(gpt2_tiny, texts)
    assert _same_batch(truth, result.token_ids)
    assert all(result.diagnostics.found)


@pytest.mark.parametrize("component, layers, verifier", [
    ("layer", 0, "transformer.h.0.mlp.c_fc.weight"),
    (["attention.qkv", "attention.output"], 0, "transformer.h.0.attn.c_proj.weight"),
    (["attention.qkv", "ffn.output"], 0, "transformer.h.0.mlp.c_proj.weight"),
    ("attention.qkv", [0, 1], "transformer.h.1.attn.c_attn.weight"),
])
def test_every_verifier_weight_finds_the_batch(gpt2_tiny, component, layers, verifier):
    model, tokenizer = gpt2_tiny
    if isinstance(component, list):
        parts = [select(model, c, layers) for c in component]
        selection = type(parts[0])(component="+".join(component), layers=parts[0].layers,
                                   names=tuple(n for p in parts for n in p.names),
                                   numel=sum(p.numel for p in parts), total=parts[0].total)
    else:
        selection = select(model, component, layers)
    assert verifier_of(selection)[0] == verifier
    true_batch = encode_lm(tokenizer, SENTENCES[:3])
    update = client_update(model, selection, true_batch).shared
    result = span_attack(model, tokenizer, update, selection)
    assert _same_batch(true_token_ids(true_batch), result.token_ids)
    assert result.diagnostics.verifier == verifier


@pytest.mark.parametrize("reads, module, hook", [
    ("mlp", "ln_2", "output"), ("attention", "attn.c_proj", "input"), ("ffn", "mlp.c_proj", "input"),
])
def test_the_causal_check_computes_the_clients_own_activations(gpt2_tiny, reads, module, hook):
    """The premise of the search: a prefix run alone gives the batch's activations (causal mask, right padding)."""
    model, tokenizer = gpt2_tiny
    true_batch = encode_lm(tokenizer, SENTENCES[:2])
    captured = []
    target = model.get_submodule(f"transformer.h.0.{module}")
    if hook == "output":
        handle = target.register_forward_hook(lambda m, args, out: captured.append(out))
    else:
        handle = target.register_forward_pre_hook(lambda m, args: captured.append(args[0]))
    with torch.no_grad():
        model(**true_batch)
    handle.remove()
    client = captured[0][1]  # the second sentence's activations, padded in the batch
    check = CausalCheck(model, input_space(torch.randn(128, 384), [5]), reads)
    ids = true_batch["input_ids"][1]
    _, keys, values = check.projections(ids[:1], 0)
    for position in range(1, int(true_batch["attention_mask"][1].sum()) - 1):
        out, key, value = check.activations(keys[None], values[None], ids[position:position + 1])
        torch.testing.assert_close(out[0, 0], client[position], rtol=1e-5, atol=1e-5)
        keys, values = torch.cat([keys, key]), torch.cat([values, value])


def test_true_prefixes_sit_inside_the_span_wrong_ones_far_outside(gpt2_shape):
    """ACCEPT's margin: a right next token at float32 round-off, every other one of the batch's words far off."""
    model, tokenizer = gpt2_shape
    selection = select(model, "layer", 0)
    true_batch = encode_lm(tokenizer, SENTENCES[:4])
    update = client_update(model, selection, true_batch).shared
    check = CausalCheck(model, input_space(update.shared_grads[selection.names.index(
        "transformer.h.0.mlp.c_fc.weight")], update.lengths), "mlp")
    rows = true_token_ids(true_batch)
    prefixes = {tuple(row[:k]) for row in rows for k in range(1, len(row) + 1)}
    bag = torch.tensor(sorted({t for row in rows for t in row[1:-1]}))
    ids = rows[0]
    _, keys, values = check.projections(torch.tensor(ids[:1]), 0)
    true_worst, wrong_best = 0.0, float("inf")
    for position in range(1, len(ids) - 1):
        residual = check.extend(keys[None], values[None], bag)["residual"][0]
        # Another sentence's next word can extend this prefix truly too ("the" starts three of them).
        true = torch.tensor([(*ids[:position], t) in prefixes for t in bag.tolist()])
        true_worst = max(true_worst, float(residual[true].max()))
        wrong_best = min(wrong_best, float(residual[~true].min()))
        _, key, value = check.projections(torch.tensor(ids[position:position + 1]), position)
        keys, values = torch.cat([keys, key]), torch.cat([values, value])
    assert true_worst < 1e-5 < ACCEPT < 1e-2 < wrong_best


def test_the_end_token_makes_the_last_word_visible(gpt2_tiny):
    """The last position predicts nothing: its input is outside the span, the last word's (it predicts [SEP]) inside."""
    model, tokenizer = gpt2_tiny
    selection = select(model, "attention.qkv", 0)
    true_batch = encode_lm(tokenizer, "a cat sat on the mat")
    update = client_update(model, selection, true_batch).shared
    space = input_space(update.shared_grads[0], update.lengths)
    ids = true_token_ids(true_batch)[0]
    last_word = layer0_inputs(model, len(ids) - 2, token_ids=[ids[-2]])
    end = layer0_inputs(model, len(ids) - 1, token_ids=[ids[-1]])
    assert float(space.residual(last_word)) < 1e-5 and float(space.residual(end)) > 0.5


def test_a_single_sentence_from_c_attn_alone(gpt2_shape):
    truth, result, _ = _attack(gpt2_shape, SENTENCES[10], component="attention.qkv")
    assert result.token_ids == truth
    assert result.diagnostics.verifier is None and result.diagnostics.found is None


def test_the_time_budget_returns_a_partial_batch_of_the_right_lengths(gpt2_tiny):
    truth, result, _ = _attack(gpt2_tiny, SENTENCES[:4], config=SpanConfig(time_budget=1e-6))
    assert result.diagnostics.timed_out
    assert [len(row) for row in result.token_ids] == [len(row) for row in truth]
    assert not all(result.diagnostics.found)


def test_clear_refusals(gpt2_tiny, tiny):
    model, tokenizer = gpt2_tiny
    layer = select(model, "layer", 0)
    batch = encode_lm(tokenizer, SENTENCES[:2])
    update = client_update(model, layer, batch).shared
    qkv = select(model, "attention.qkv", 0)
    with pytest.raises(ValueError, match="needs a weight that reads layer 0's activations"):
        span_attack(model, tokenizer, client_update(model, qkv, batch).shared, qkv)
    ffn = select(model, "ffn.intermediate", 0)
    with pytest.raises(ValueError, match=r"layer 0's query/key/value weight \(attn.c_attn\)"):
        span_attack(model, tokenizer, client_update(model, ffn, batch).shared, ffn)
    with pytest.raises(ValueError, match="does not model"):
        span_attack(model, tokenizer, update, layer, noise="spectrum")
    with pytest.raises(ValueError, match="use span_attack"):
        decoder_span_attack(tiny[0], tiny[1], update, layer)
    with pytest.raises(TypeError, match="config must be a SpanConfig"):
        span_attack(model, tokenizer, update, layer, {"beam": 4})
    long = encode_lm(tokenizer, [" ".join(["word"] * 70)] * 2)  # 2 x 72 tokens in 128 dimensions
    with pytest.raises(ValueError, match="at least the model's 128 dimensions"):
        span_attack(model, tokenizer, client_update(model, layer, long).shared, layer)


def test_a_bert_batch_given_to_a_decoder_is_refused(gpt2_tiny):
    model, tokenizer = gpt2_tiny
    with pytest.raises(ValueError, match="encode_lm"):
        client_update(model, select(model, "layer", 0), encode(tokenizer, ["a cat"], [1]))


def test_the_matcher_takes_a_decoders_gradient_as_its_client_does(gpt2_tiny):
    """At the true words, the candidate's labels are the true next tokens: the client's very gradient."""
    model, tokenizer = gpt2_tiny
    selection = select(model, "layer", 0)
    true_batch = encode_lm(tokenizer, SENTENCES[:2])
    update = client_update(model, selection, true_batch).shared
    matcher = GradientMatcher(model, selection.names, "cos", tokens=TokenSpace(model, tokenizer))
    target = matcher.target(update.shared_grads, selection.names, None, true_batch["attention_mask"])
    embeds = model.get_input_embeddings().weight[true_batch["input_ids"]]
    for got, sent in zip(matcher.gradients(embeds, target), update.shared_grads):
        torch.testing.assert_close(got.detach(), sent, rtol=1e-4, atol=1e-7)
    assert float(matcher.loss(embeds, target).detach()) < 1e-5
    with pytest.raises(ValueError, match="token space"):
        GradientMatcher(model, selection.names)


def test_the_optimisation_attack_runs_on_a_decoder_on_both_engines(gpt2_tiny):
    model, tokenizer = gpt2_tiny
    selection = select(model, "layer", 0)
    true_batch = encode_lm(tokenizer, ["the film was a quiet delight .", "a cat sat"])
    update = client_update(model, selection, true_batch).shared
    config = AttackConfig(steps=12, init_candidates=2, swap_every=6, progress=False)
    fast = optimization_attack(model, tokenizer, update, selection, config)
    plain = optimization_attack(model, tokenizer, update, selection, AttackConfig(**{**config.__dict__,
                                                                                    "batched": False}))
    assert fast.token_ids == plain.token_ids
    assert [len(row) for row in fast.token_ids] == update.lengths
    assert all(row[0] == 101 and row[-1] == 102 for row in fast.token_ids)  # the known start and end tokens
    history = fast.diagnostics.loss_history
    assert history[-1] < history[0]  # the next-token gradients move toward the client's
