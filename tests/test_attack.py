import inspect

import numpy as np
import pytest
import torch

from gilib.attack import AttackConfig, TokenSpace, gradient_distance, optimization_attack
from gilib.attack.optimization import _random_reorder
from gilib.metrics import rouge_scores
from gilib.models import encode
from gilib.slicing import client_gradient, select

SENTENCE = "the film was a quiet delight ."


def _client(model, tokenizer, texts, labels, component="full", layers=None):
    """What the server receives: shared gradients, labels and lengths."""
    true_batch = encode(tokenizer, texts, labels)
    sel = select(model, component, layers)
    shared_grads = client_gradient(model, sel, true_batch)
    lengths = true_batch["attention_mask"].sum(dim=1).tolist()
    return sel, shared_grads, true_batch["labels"], lengths


def test_tiny_model_recovers_a_short_sentence_exactly(tiny):
    model, tokenizer = tiny
    sel, shared_grads, labels, lengths = _client(model, tokenizer, [SENTENCE], [1])
    cfg = AttackConfig(steps=250, init_candidates=10, seed=1, progress=False)
    result = optimization_attack(model, tokenizer, shared_grads, sel, labels, lengths, cfg)
    assert result.texts == ["the film was a quiet delight."]
    assert result.token_ids[0] == tokenizer(SENTENCE)["input_ids"]
    assert len(result.loss_history) == 250
    # The right tokens have the client's gradient: the distance is round-off.
    assert result.final_loss == pytest.approx(0.0, abs=1e-5)
    assert result.loss_history[0] > 0.05


def test_same_seed_same_result_and_other_seed_differs(tiny):
    model, tokenizer = tiny
    sel, shared_grads, labels, lengths = _client(model, tokenizer, [SENTENCE], [1], "attention.query", 0)
    runs = [
        optimization_attack(model, tokenizer, shared_grads, sel, labels, lengths,
                            AttackConfig(steps=30, init_candidates=3, swap_every=10, seed=seed, progress=False))
        for seed in (3, 3, 4)
    ]
    assert runs[0].token_ids == runs[1].token_ids
    assert runs[0].loss_history == runs[1].loss_history
    assert runs[0].loss_history != runs[2].loss_history


def test_special_tokens_lengths_and_vocabulary_are_respected(tiny):
    model, tokenizer = tiny
    texts = ["a cat sat", "the long film was a quiet delight"]
    sel, shared_grads, labels, lengths = _client(model, tokenizer, texts, [0, 1], "layer", 0)
    cfg = AttackConfig(objective="l2", steps=5, init_candidates=2, swap_every=2, progress=False)
    result = optimization_attack(model, tokenizer, shared_grads, sel, labels, lengths, cfg)
    allowed = TokenSpace(model, tokenizer).allowed
    assert [len(ids) for ids in result.token_ids] == lengths
    for ids in result.token_ids:
        assert ids[0] == tokenizer.cls_token_id and ids[-1] == tokenizer.sep_token_id
        assert all(allowed[i] for i in ids[1:-1])
    assert result.method == "optimization/l2"


def test_prior_is_consulted_in_reordering_rounds(tiny):
    model, tokenizer = tiny
    sel, shared_grads, labels, lengths = _client(model, tokenizer, [SENTENCE], [1], "attention.value", 0)
    seen = []

    def prior(ids):
        seen.append(list(ids))
        return 0.0

    cfg = AttackConfig(steps=6, init_candidates=1, swap_every=2, swap_burnin=0.0, swap_candidates=5, progress=False)
    optimization_attack(model, tokenizer, shared_grads, sel, labels, lengths, cfg, prior=prior)
    assert len(seen) == 2 * 5  # rounds at steps 2 and 4, five candidates each
    assert all(len(ids) == lengths[0] - 2 for ids in seen)


def test_attack_sees_only_what_the_server_has():
    params = list(inspect.signature(optimization_attack).parameters)
    assert params == ["model", "tokenizer", "shared_grads", "selection", "labels", "lengths", "config", "prior"]


def test_layer0_gradient_of_pretrained_minilm_leaks_the_words(minilm):
    model, tokenizer = minilm
    sel, shared_grads, labels, lengths = _client(model, tokenizer, [SENTENCE], [1], "layer", 0)
    cfg = AttackConfig(steps=60, init_candidates=5, seed=0, progress=False)
    result = optimization_attack(model, tokenizer, shared_grads, sel, labels, lengths, cfg)
    assert rouge_scores(result.texts[0], SENTENCE)["rouge1"] >= 0.6


def test_gradient_distances_on_known_values():
    a = [torch.tensor([3.0, 4.0]), torch.tensor([1.0])]
    b = [torch.tensor([3.0, 0.0]), torch.tensor([-1.0])]
    assert gradient_distance(a, a, "cos").item() == pytest.approx(0.0, abs=1e-6)
    # cos: ((1 - 9/15) + (1 - (-1))) / 2
    assert gradient_distance(a, b, "cos").item() == pytest.approx((0.4 + 2.0) / 2)
    assert gradient_distance(a, b, "l2").item() == pytest.approx(16.0 + 4.0)
    assert gradient_distance(a, b, "tag", tag_l1_weight=0.5).item() == pytest.approx(20.0 + 0.5 * 6.0)


@pytest.mark.parametrize("kind", range(4))
def test_random_reorders_are_permutations(kind):
    rng = np.random.RandomState(0)
    for n in (2, 3, 9):
        for _ in range(20):
            assert sorted(_random_reorder(n, kind, rng)) == list(range(n))


def test_nearest_token_of_a_word_embedding_is_that_word(tiny):
    model, tokenizer = tiny
    space = TokenSpace(model, tokenizer)
    ids = torch.tensor(tokenizer("the quiet film")["input_ids"][1:-1])
    assert torch.equal(space.nearest(space.embed(ids)), ids)
    assert not space.allowed[tokenizer.cls_token_id]
    assert not space.allowed[tokenizer.convert_tokens_to_ids("[unused5]")]


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda g, lab, n: (g[:-1], lab, n), "gradient tensors for a selection"),
        (lambda g, lab, n: ([g[0][:, :3], g[1]], lab, n), "has shape"),
        (lambda g, lab, n: (g, [0, 1], n), "2 labels for 1 sentence lengths"),
        (lambda g, lab, n: (g, lab, [2]), "lengths count \\[CLS\\] and \\[SEP\\]"),
        (lambda g, lab, n: (g, lab, [100]), "between 3 and 64"),
    ],
)
def test_bad_attack_inputs_raise_clear_errors(tiny, change, message):
    model, tokenizer = tiny
    sel, shared_grads, labels, lengths = _client(model, tokenizer, ["a cat sat"], [1], "attention.query", [0, 1])
    grads, labels, lengths = change(shared_grads, labels.tolist(), lengths)
    with pytest.raises(ValueError, match=message):
        optimization_attack(model, tokenizer, grads, sel, labels, lengths, AttackConfig(steps=1, progress=False))


def test_bad_config_raises_clear_errors():
    with pytest.raises(ValueError, match="Unknown objective 'cosine'. Choose one of: cos, l2, tag"):
        AttackConfig(objective="cosine")
    with pytest.raises(ValueError, match="steps must be at least 1"):
        AttackConfig(steps=0)
