"""The fast path is a pure speed-up: same tokens as the plain, reference-style path."""

import pytest
import torch

from gilib.attack import AttackConfig, attack_clients, optimization_attack
from gilib.attack.objectives import GradientMatcher
from gilib.attack.ghost import GhostMatcher, supports
from gilib.client import client_update
from gilib.models import encode
from gilib.selection import select

TEXTS = ["the film was a quiet delight .", "a cat sat on the mat", "them went to the market ."]
SETTINGS = dict(steps=40, init_candidates=12, swap_every=10, swap_candidates=9, seed=5, progress=False)


def _updates(model, tokenizer, selection, texts=TEXTS):
    return [client_update(model, selection, encode(tokenizer, text, 1)).shared for text in texts]


@pytest.mark.parametrize("component, layers", [("attention.query", 0), ("full", None)])
def test_fast_and_plain_paths_give_identical_tokens(tiny, component, layers):
    model, tokenizer = tiny
    selection = select(model, component, layers)
    updates = _updates(model, tokenizer, selection)
    fast = attack_clients(model, tokenizer, updates, selection, AttackConfig(batched=True, **SETTINGS))
    for i, u in enumerate(updates):
        plain = optimization_attack(model, tokenizer, u, selection,
                                    AttackConfig(**{**SETTINGS, "batched": False, "seed": SETTINGS["seed"] + i}))
        assert fast[i].token_ids == plain.token_ids
        torch.testing.assert_close(torch.tensor(fast[i].diagnostics.loss_history), torch.tensor(plain.diagnostics.loss_history),
                                   rtol=1e-4, atol=1e-5)


def test_clients_attacked_together_equal_clients_attacked_alone(tiny):
    model, tokenizer = tiny
    selection = select(model, "layer", 1)
    updates = _updates(model, tokenizer, selection)
    together = attack_clients(model, tokenizer, updates, selection, AttackConfig(**SETTINGS))
    alone = optimization_attack(model, tokenizer, updates[2], selection,
                                AttackConfig(**{**SETTINGS, "seed": SETTINGS["seed"] + 2}))
    assert together[2].token_ids == alone.token_ids
    assert set(together[2].timings) == {"init", "optimization", "reordering", "polish"}


def test_batched_scores_equal_scores_one_by_one(tiny):
    model, tokenizer = tiny
    selection = select(model, "attention.value", 0)
    u = _updates(model, tokenizer, selection, TEXTS[:1])[0]
    matcher = GradientMatcher(model, selection.names)
    target = matcher.target(u.shared_grads, selection.names, u.labels, torch.ones(1, u.lengths[0], dtype=torch.long))
    candidates = torch.randn(7, 1, u.lengths[0], model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    batched = matcher.score(candidates, target, chunk_size=3)
    one_by_one = torch.stack([matcher.loss(c, target).detach() for c in candidates])
    torch.testing.assert_close(batched, one_by_one, rtol=1e-5, atol=1e-6)


def test_paper_settings():
    cfg = AttackConfig.paper()
    assert (cfg.objective, cfg.steps, cfg.init_candidates, cfg.lr, cfg.lr_decay, cfg.lr_decay_every,
            cfg.reg_weight, cfg.prior_weight, cfg.swap_every) == ("cos", 2000, 500, 0.01, 0.89, 50, 1.0, 0.2, 75)
    assert AttackConfig.paper(steps=10).steps == 10


def test_clients_of_different_batch_sizes_are_refused(tiny):
    model, tokenizer = tiny
    selection = select(model, "attention.query", 0)
    single = _updates(model, tokenizer, selection, TEXTS[:1])[0]
    batch = encode(tokenizer, TEXTS[:2], [1, 0])
    pair = client_update(model, selection, batch).shared
    with pytest.raises(ValueError, match="same batch size"):
        attack_clients(model, tokenizer, [single, pair], selection, AttackConfig(steps=1, progress=False))
    with pytest.raises(ValueError, match="No client updates"):
        attack_clients(model, tokenizer, [], selection)


@pytest.mark.parametrize("objective", ["cos", "l2"])
@pytest.mark.parametrize("component, layers", [("attention.query", 0), ("layer", 1), ("full", None), ("ffn.output", 0)])
def test_ghost_losses_equal_per_candidate_gradients(tiny, component, layers, objective):
    """Scoring from per-token activations gives GradientMatcher's losses and their gradients."""
    model, tokenizer = tiny
    selection = select(model, component, layers)
    batch = encode(tokenizer, TEXTS[:2], [1, 0])
    shared_grads = client_update(model, selection, batch).shared.shared_grads
    matcher = GradientMatcher(model, selection.names, objective).matched([shared_grads])
    ghost = GhostMatcher(model, matcher.names, objective)
    target = matcher.target(shared_grads, selection.names, batch["labels"], batch["attention_mask"])
    shape = (5, *batch["input_ids"].shape, model.config.hidden_size)
    candidates = 0.1 * torch.randn(shape, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(ghost.score(candidates, target, chunk_size=2), matcher.score(candidates, target),
                               rtol=1e-5, atol=1e-6)
    x = candidates[0].clone().requires_grad_(True)
    (want,) = torch.autograd.grad(matcher.loss(x, target), x)
    (got,) = torch.autograd.grad(ghost.loss(x, target), x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_ghost_scoring_refuses_what_it_cannot_compute(tiny):
    model, _ = tiny
    names = select(model, "attention.query", 0).names
    assert supports(model, names, "cos") and not supports(model, names, "tag")
    with pytest.raises(ValueError, match="use GradientMatcher"):
        GhostMatcher(model, names, "tag")


def test_polishing_only_lowers_the_loss_and_is_the_same_on_both_paths(tiny):
    model, tokenizer = tiny
    selection = select(model, "attention.query", 0)
    u = _updates(model, tokenizer, selection, TEXTS[2:])[0]
    args = (model, tokenizer, u, selection)
    plain = optimization_attack(*args, AttackConfig(**SETTINGS))
    polished = optimization_attack(*args, AttackConfig(**{**SETTINGS, "polish_rounds": 3}))
    polished_plain = optimization_attack(*args, AttackConfig(**{**SETTINGS, "polish_rounds": 3, "batched": False}))
    assert polished.final_loss < plain.final_loss  # it changed something, for the better
    assert polished.token_ids == polished_plain.token_ids
    with pytest.raises(ValueError, match="polish_rounds"):
        AttackConfig(polish_rounds=-1)


@pytest.mark.parametrize("pack_tokens", [128, 16])
def test_packed_forward_gives_the_models_logits(tiny, monkeypatch, pack_tokens):
    """Sentences laid end to end (one row, or several when rows are short) get the padded batch's logits."""
    from gilib.attack import ghost
    monkeypatch.setattr(ghost, "PACK_TOKENS", pack_tokens)
    model, tokenizer = tiny
    batch = encode(tokenizer, TEXTS, [1, 0, 1])
    embeds = model.get_input_embeddings()(batch["input_ids"])
    want = model(inputs_embeds=embeds, attention_mask=batch["attention_mask"]).logits
    lengths = batch["attention_mask"].sum(1).tolist()
    assert len(set(lengths)) > 1
    packing = ghost.Packing(lengths, embeds.shape[1], "cpu")
    assert packing.rows == (1 if pack_tokens == 128 else 2)  # lengths 9, 8, 8
    got = ghost._packed_logits(model, packing.pack(embeds.reshape(-1, embeds.shape[-1])), packing)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # The padding is dropped and comes back as zeros.
    flat = packing.pack(embeds.reshape(-1, embeds.shape[-1]))
    assert flat.shape[0] * flat.shape[1] < embeds.shape[0] * embeds.shape[1] or packing.rows > 1
    back = packing.unpack(flat).view_as(embeds)
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(back[real], embeds[real])
    assert back[~real].abs().sum() == 0


def test_bfloat16_scores_track_float32(tiny):
    """bfloat16 autocast changes losses in the third digit and keeps the step's direction."""
    model, tokenizer = tiny
    selection = select(model, "attention.query", 0)
    batch = encode(tokenizer, TEXTS[:2], [1, 0])
    shared_grads = client_update(model, selection, batch).shared.shared_grads
    matcher = GradientMatcher(model, selection.names, "cos").matched([shared_grads])
    target = matcher.target(shared_grads, selection.names, batch["labels"], batch["attention_mask"])
    candidates = 0.1 * torch.randn((6, *batch["input_ids"].shape, model.config.hidden_size),
                                   generator=torch.Generator().manual_seed(2))
    exact, fast = (GhostMatcher(model, matcher.names, "cos", p) for p in ("float32", "bfloat16"))
    diff = (fast.score(candidates, target) - exact.score(candidates, target)).abs()
    assert 0 < diff.max() < 0.02
    x = candidates[0].clone().requires_grad_(True)
    (g32,) = torch.autograd.grad(exact.loss(x, target), x)
    (g16,) = torch.autograd.grad(fast.loss(x, target), x)
    assert torch.nn.functional.cosine_similarity(g32.flatten(), g16.flatten(), dim=0) > 0.95
    with pytest.raises(ValueError, match="precision"):
        AttackConfig(precision="float16")


def test_bfloat16_linears_cast_once_give_autocasts_losses_and_steps(tiny, monkeypatch):
    """The bfloat16 path casts the linear weights once, into a copy: the victim is untouched, and
    losses and step gradients equal those of autocast casting them at every call."""
    from gilib.attack import ghost

    model, tokenizer = tiny
    selection = select(model, "full", None)
    batch = encode(tokenizer, TEXTS[:2], [1, 0])
    shared_grads = client_update(model, selection, batch).shared.shared_grads
    matcher = GradientMatcher(model, selection.names, "cos").matched([shared_grads])
    target = matcher.target(shared_grads, selection.names, batch["labels"], batch["attention_mask"])
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    once = GhostMatcher(model, matcher.names, "cos", "bfloat16")
    assert all(p.dtype == torch.float32 and torch.equal(p, before[name]) for name, p in model.named_parameters())
    copy_ = dict(once.model.named_parameters())
    for name, p in model.named_parameters():
        linear = isinstance(model.get_submodule(name.rpartition(".")[0]), torch.nn.Linear)
        assert (copy_[name].dtype == torch.bfloat16) == linear, name
        assert (copy_[name] is p) == (not linear), name  # everything else shared, not copied
        if linear:
            assert torch.equal(copy_[name], p.detach().to(torch.bfloat16))
    monkeypatch.setattr(ghost, "_with_bfloat16_linears", lambda m: m)
    every_call = GhostMatcher(model, matcher.names, "cos", "bfloat16")
    assert every_call.model is model
    candidates = 0.1 * torch.randn((5, *batch["input_ids"].shape, model.config.hidden_size),
                                   generator=torch.Generator().manual_seed(3))
    assert torch.equal(once.score(candidates, target), every_call.score(candidates, target))
    x = candidates[0].clone().requires_grad_(True)
    (a,) = torch.autograd.grad(once.loss(x, target), x)
    (b,) = torch.autograd.grad(every_call.loss(x, target), x)
    assert torch.equal(a, b)
