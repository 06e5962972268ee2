import dataclasses
import inspect
import math

import numpy as np
import pytest
import torch

from gilib.attack import AttackConfig, OptimizationDiagnostics, attack_clients, optimization_attack, span_attack
from gilib.attack.engines import _random_reorder
from gilib.attack.objectives import gradient_distance
from gilib.attack.tokens import TokenSpace
from gilib.update import SharedUpdate
from gilib.client import client_update
from gilib.metrics import rouge_scores
from gilib.models import encode
from gilib.selection import select

SENTENCE = "the film was a quiet delight ."


def _client(model, tokenizer, texts, labels, component="full", layers=None):
    """The selection and what the server receives for it."""
    sel = select(model, component, layers)
    return sel, client_update(model, sel, encode(tokenizer, texts, labels)).shared


def test_tiny_model_recovers_a_short_sentence_exactly(tiny):
    model, tokenizer = tiny
    sel, update = _client(model, tokenizer, [SENTENCE], [1])
    cfg = AttackConfig(steps=250, init_candidates=10, seed=1, progress=False)
    result = optimization_attack(model, tokenizer, update, sel, cfg)
    assert result.texts == ["the film was a quiet delight."]
    assert result.token_ids[0] == tokenizer(SENTENCE)["input_ids"]
    assert len(result.diagnostics.loss_history) == 250
    # The right tokens have the client's gradient: the distance is round-off.
    assert result.final_loss == pytest.approx(0.0, abs=1e-5)
    assert result.diagnostics.loss_history[0] > 0.05


def test_the_result_keeps_settings_timings_and_diagnostics_apart(tiny):
    model, tokenizer = tiny
    sel, update = _client(model, tokenizer, [SENTENCE], [1], "attention.query", 0)
    config = AttackConfig(steps=6, init_candidates=2, swap_every=3, progress=False)
    result = optimization_attack(model, tokenizer, update, sel, config)
    assert result.config == dataclasses.asdict(config)  # settings only
    assert set(result.timings) == {"init", "optimization", "reordering", "polish"}
    assert sum(result.timings.values()) <= result.seconds
    assert isinstance(result.diagnostics, OptimizationDiagnostics) and len(result.diagnostics.loss_history) == 6
    assert result.diagnostics.seconds_per_step == pytest.approx(result.seconds / 6)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.steps = 7  # a config is a value: the result's copy cannot drift from it


def test_same_seed_same_result_and_other_seed_differs(tiny):
    model, tokenizer = tiny
    sel, update = _client(model, tokenizer, [SENTENCE], [1], "attention.query", 0)
    runs = [
        optimization_attack(model, tokenizer, update, sel,
                            AttackConfig(steps=30, init_candidates=3, swap_every=10, seed=seed, progress=False))
        for seed in (3, 3, 4)
    ]
    assert runs[0].token_ids == runs[1].token_ids
    assert runs[0].diagnostics.loss_history == runs[1].diagnostics.loss_history
    assert runs[0].diagnostics.loss_history != runs[2].diagnostics.loss_history


def test_special_tokens_lengths_and_vocabulary_are_respected(tiny):
    model, tokenizer = tiny
    texts = ["a cat sat", "the long film was a quiet delight"]
    sel, update = _client(model, tokenizer, texts, [0, 1], "layer", 0)
    cfg = AttackConfig(objective="l2", steps=5, init_candidates=2, swap_every=2, progress=False)
    result = optimization_attack(model, tokenizer, update, sel, cfg)
    allowed = TokenSpace(model, tokenizer).allowed
    assert [len(ids) for ids in result.token_ids] == update.lengths
    for ids in result.token_ids:
        assert ids[0] == tokenizer.cls_token_id and ids[-1] == tokenizer.sep_token_id
        assert all(allowed[i] for i in ids[1:-1])
    assert result.method == "optimization/l2"


def test_prior_is_consulted_in_reordering_rounds(tiny):
    model, tokenizer = tiny
    sel, update = _client(model, tokenizer, [SENTENCE], [1], "attention.value", 0)
    seen = []

    def prior(ids):
        seen.append(list(ids))
        return 0.0

    cfg = AttackConfig(steps=6, init_candidates=1, swap_every=2, swap_burnin=0.0, swap_candidates=5, progress=False)
    optimization_attack(model, tokenizer, update, sel, cfg, prior=prior)
    assert len(seen) == 2 * 5  # rounds at steps 2 and 4, five candidates each
    assert all(len(ids) == update.lengths[0] - 2 for ids in seen)


def test_attack_sees_only_what_the_server_has():
    params = list(inspect.signature(optimization_attack).parameters)
    assert params == ["model", "tokenizer", "update", "selection", "config", "prior"]
    assert list(inspect.signature(attack_clients).parameters) == [
        "model", "tokenizer", "updates", "selection", "config", "prior", "engine"]
    # weights, clipped, noise: the public protocol's noise model, never the client's truth; prior: public text.
    assert list(inspect.signature(span_attack).parameters) == ["model", "tokenizer", "update", "selection", "config",
                                                                "weights", "clipped", "noise", "prior"]
    assert SharedUpdate._fields == ("shared_grads", "labels", "lengths")


def test_an_engine_that_is_not_an_engine_class_is_refused(tiny):
    model, tokenizer = tiny
    sel, update = _client(model, tokenizer, [SENTENCE], [1], "attention.query", 0)
    with pytest.raises(TypeError, match="engine must be a subclass of gilib.attack.engines.Engine"):
        attack_clients(model, tokenizer, [update], sel, AttackConfig(steps=1), engine=object)


def test_the_plain_path_looks_up_nearest_tokens_only_to_project(tiny, monkeypatch):
    """The library does no discarded work: the reference's per-step lookup lives in the benchmark."""
    model, tokenizer = tiny
    sel, update = _client(model, tokenizer, [SENTENCE], [1], "attention.query", 0)
    calls = []
    nearest = TokenSpace.nearest
    monkeypatch.setattr(TokenSpace, "nearest", lambda self, x, k=None: calls.append(1) or nearest(self, x, k))
    for batched in (True, False):
        calls.clear()
        cfg = AttackConfig(steps=8, init_candidates=2, swap_every=0, batched=batched, progress=False)
        optimization_attack(model, tokenizer, update, sel, cfg)
        assert len(calls) == 1  # the final projection


def test_layer0_gradient_of_pretrained_minilm_leaks_the_words(minilm):
    model, tokenizer = minilm
    sel, update = _client(model, tokenizer, [SENTENCE], [1], "layer", 0)
    cfg = AttackConfig(steps=60, init_candidates=5, seed=0, progress=False)
    result = optimization_attack(model, tokenizer, update, sel, cfg)
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


def _nan(grads):
    bad = grads[0].clone()
    bad[0, 0] = float("nan")
    return [bad, grads[1]]


def _inf(grads):
    bad = grads[1].clone()
    bad[-1, -1] = -float("inf")
    return [grads[0], bad]


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda u: u._replace(shared_grads=u.shared_grads[:-1]), "Got 1 gradient tensors for the 2 of"),
        (lambda u: u._replace(shared_grads=[*u.shared_grads, u.shared_grads[0]]), "Got 3 gradient tensors"),
        (lambda u: u._replace(shared_grads=[u.shared_grads[0][:, :3], u.shared_grads[1]]), "has shape"),
        (lambda u: u._replace(shared_grads=_nan(u.shared_grads)), "NaN or infinite"),
        (lambda u: u._replace(shared_grads=_inf(u.shared_grads)), "NaN or infinite"),
        (lambda u: u._replace(shared_grads=[torch.zeros_like(g) for g in u.shared_grads]), "is zero"),
        (lambda u: u._replace(shared_grads=[g.double() for g in u.shared_grads]), "torch.float64 but the model is"),
        (lambda u: u._replace(shared_grads=[torch.zeros(g.shape, device="meta") for g in u.shared_grads]),
         "is on meta but the model on cpu"),
        (lambda u: u._replace(labels=[0, 1]), "has 1 sentence length\\(s\\) but 2 label\\(s\\)"),
        (lambda u: u._replace(lengths=[5, 5]), "has 2 sentence length\\(s\\) but 1 label\\(s\\)"),
        (lambda u: u._replace(labels=[2]), "class indices in 0..1"),
        (lambda u: u._replace(labels=[-1]), "class indices in 0..1"),
        (lambda u: u._replace(labels=[0.5]), "class indices"),
        (lambda u: u._replace(labels=None), "needs the batch's labels"),
        (lambda u: u._replace(lengths=[2]), "lie between 3 and 64"),
        (lambda u: u._replace(lengths=[100]), "lie between 3 and 64"),
        (lambda u: u._replace(lengths=[]), "No sentence lengths"),
    ],
)
def test_bad_attack_inputs_raise_clear_errors(tiny, change, message):
    model, tokenizer = tiny
    sel, update = _client(model, tokenizer, ["a cat sat"], [1], "attention.query", [0, 1])
    with pytest.raises(ValueError, match=message):
        optimization_attack(model, tokenizer, change(update), sel, AttackConfig(steps=1, progress=False))


def test_a_message_that_is_not_a_shared_update_is_refused(tiny):
    model, tokenizer = tiny
    sel, update = _client(model, tokenizer, ["a cat sat"], [1], "attention.query", 0)
    with pytest.raises(TypeError, match="client_update"):
        optimization_attack(model, tokenizer, list(update.shared_grads), sel, AttackConfig(steps=1, progress=False))
    with pytest.raises(TypeError, match=r"pass \[update\]"):
        attack_clients(model, tokenizer, update, sel, AttackConfig(steps=1, progress=False))
    with pytest.raises(TypeError, match="config must be an AttackConfig"):
        optimization_attack(model, tokenizer, update, sel, {"steps": 1})


def test_bad_config_raises_clear_errors():
    with pytest.raises(ValueError, match="Unknown objective 'cosine'. Choose one of: cos, l2, tag"):
        AttackConfig(objective="cosine")
    with pytest.raises(ValueError, match="steps must be at least 1"):
        AttackConfig(steps=0)


@pytest.mark.parametrize(
    "setting, message",
    [
        (dict(lr=float("nan")), "lr must be a finite number greater than 0, got nan"),
        (dict(lr=math.inf), "lr must be a finite number greater than 0, got inf"),
        (dict(lr=-0.01), "lr must be a finite number greater than 0"),
        (dict(lr=0), "lr must be a finite number greater than 0"),
        (dict(lr=True), "lr must be a finite number"),
        (dict(lr="0.01"), "lr must be a finite number"),
        (dict(lr_decay=0.0), r"lr_decay must be a finite number in \(0, 1\]"),
        (dict(lr_decay=1.5), r"lr_decay must be a finite number in \(0, 1\]"),
        (dict(lr_decay=float("nan")), "lr_decay must be a finite number"),
        (dict(reg_weight=-1.0), "reg_weight must be a finite number of at least 0"),
        (dict(reg_weight=float("inf")), "reg_weight must be a finite number"),
        (dict(prior_weight=float("nan")), "prior_weight must be a finite number of at least 0"),
        (dict(prior_weight=-0.2), "prior_weight must be a finite number of at least 0"),
        (dict(tag_l1_weight=-0.01), "tag_l1_weight must be a finite number of at least 0"),
        (dict(tag_l1_weight=float("nan")), "tag_l1_weight must be a finite number"),
        (dict(swap_burnin=1.1), r"swap_burnin must be a finite number in \[0, 1\]"),
        (dict(swap_burnin=-0.1), r"swap_burnin must be a finite number in \[0, 1\]"),
        (dict(swap_burnin=float("nan")), "swap_burnin must be a finite number"),
        (dict(grad_clip=0.0), "grad_clip must be a finite number greater than 0"),
        (dict(grad_clip=-1.0), "grad_clip must be a finite number greater than 0"),
        (dict(grad_clip=float("nan")), "grad_clip must be a finite number"),
        (dict(swap_every=-1), "swap_every must be at least 0"),
        (dict(swap_every=2.0), "swap_every must be a whole number, got 2.0"),
        (dict(steps=True), "steps must be a whole number, got True"),
        (dict(steps=10.0), "steps must be a whole number, got 10.0"),
        (dict(init_candidates=0), "init_candidates must be at least 1"),
        (dict(init_candidates=False), "init_candidates must be a whole number"),
        (dict(lr_decay_every=0), "lr_decay_every must be at least 1"),
        (dict(swap_candidates=0), "swap_candidates must be at least 1"),
        (dict(polish_top_k=0), "polish_top_k must be at least 1"),
        (dict(polish_rounds=-1), "polish_rounds must be at least 0"),
        (dict(polish_rounds=1.5), "polish_rounds must be a whole number"),
        (dict(seed=-1), "seed must be at least 0"),
        (dict(seed=2**40), "seed must be at most"),
        (dict(seed=1.0), "seed must be a whole number"),
        (dict(chunk_size=0), "chunk_size must be at least 1"),
        (dict(chunk_size=4.0), "chunk_size must be a whole number"),
        (dict(batched=1), "batched must be True or False"),
        (dict(ghost="yes"), "ghost must be True or False"),
        (dict(progress=None), "progress must be True or False"),
    ],
)
def test_bad_settings_are_refused_clearly(setting, message):
    with pytest.raises(ValueError, match=message):
        AttackConfig(**setting)


def test_good_settings_are_kept_and_numpy_numbers_accepted():
    cfg = AttackConfig(lr=1, lr_decay=1.0, reg_weight=0, swap_every=0, swap_burnin=0.0, grad_clip=2.0,
                       steps=np.int64(5), seed=np.int32(3), batched=np.bool_(False), prior_weight=np.float64(0.1))
    assert (cfg.steps, cfg.seed, cfg.batched) == (5, 3, False)
    assert type(cfg.steps) is int and type(cfg.seed) is int and type(cfg.batched) is bool
    assert AttackConfig(grad_clip=None).grad_clip is None
