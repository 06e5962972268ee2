"""Flower rounds of LoRA clients (gilib.federated with a LoraRecipe): each reply is the adapters' update.

Each round starts Ray (5 to 10 s); a round that cannot start fails the test with run_round's RuntimeError.
"""

import dataclasses

import pytest
import torch

from gilib import federated
from gilib.attack import span_attack
from gilib.client import AdamW, client_update
from gilib.lora import LoraRecipe, lora_victim
from gilib.models import cached_model, encode
from gilib.selection import select

CLIENTS = [[("the cat sat on the mat", 1)], [("a dog barked at night", 0)]]
RECIPE = LoraRecipe(targets=("query", "value"), r=16, alpha=32, layers=0, seed=0, warmup=3)
"""Two rank-16 adapters on layer 0: 32 stacked A rows, more than either sentence's 8 tokens (the rank rule)."""

pytestmark = pytest.mark.slow


def _truth(victim, tokenizer, client, protocol=None):
    texts, labels = zip(*CLIENTS[client])
    return client_update(victim, select(victim, "lora", 0), encode(tokenizer, list(texts), list(labels)),
                         protocol).shared


def test_a_lora_fedsgd_round_sends_the_adapters_gradient_and_the_curious_server_reads_it(minilm):
    model, tokenizer = minilm
    victim = federated.global_model("minilm", lora=RECIPE)  # the server's global model: it built and sent it
    selection = select(victim, "lora", 0)
    rebuilt = {}

    def attack(reply):
        # The span check needs no labels; it reads the stacked layer-0 A gradients.
        rebuilt[reply.client] = span_attack(victim, tokenizer, reply.update._replace(labels=None), selection)

    run = federated.run_round(CLIENTS, "lora", 0, lora=RECIPE, on_reply=attack)
    assert sorted(r.client for r in run.replies) == [0, 1] and run.skipped == []
    for reply in run.replies:
        truth = _truth(RECIPE.victim(model), tokenizer, reply.client)  # the client's own model, rebuilt
        # Only the four adapter matrices travel: A (16 x 384) and B (384 x 16) of query and value.
        assert [tuple(g.shape) for g in reply.update.shared_grads] == [(16, 384), (384, 16)] * 2
        for got, want in zip(reply.update.shared_grads, truth.shared_grads):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-9)
        ((text, _),) = CLIENTS[reply.client]
        assert rebuilt[reply.client].texts == [text]
    # The global adapters moved by SERVER_LR times the mean gradient; the base weights never travelled.
    mean = [sum(r.update.shared_grads[i] for r in run.replies) / 2 for i in range(4)]
    for weight, start, step in zip(run.global_weights, selection.parameters(victim), mean):
        torch.testing.assert_close(weight, start.detach() - federated.SERVER_LR * step, rtol=0, atol=1e-7)


def test_a_lora_adamw_round_sends_the_normalised_adapter_difference(minilm):
    model, tokenizer = minilm
    protocol = AdamW(local_steps=1, lr=5e-5)
    run = federated.run_round(CLIENTS, "lora.A", 0, lora=RECIPE, protocol=protocol)
    victim = RECIPE.victim(model)
    selection = select(victim, "lora.A", 0)
    for reply in run.replies:
        texts, labels = zip(*CLIENTS[reply.client])
        truth = client_update(victim, selection, encode(tokenizer, list(texts), list(labels)), protocol).shared
        for got, want in zip(reply.update.shared_grads, truth.shared_grads):
            torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)
        # One AdamW step: each entry is weight_decay * theta_0 + g / (|g| + eps), at most about 1 in size.
        assert max(float(g.abs().max()) for g in reply.update.shared_grads) < 1.1


@pytest.mark.parametrize("kwargs, message", [
    (dict(component="lora", layers=0, lora={"r": 8}), "LoraRecipe"),
    (dict(component="attention.query", layers=0, lora=RECIPE), "base_layer"),
    (dict(component="lora", layers=0), "has none"),
])
def test_bad_lora_rounds_are_refused_before_flower_starts(kwargs, message):
    with pytest.raises(ValueError, match=message):
        federated.run_round(CLIENTS, **kwargs)


def test_a_recipe_rebuilds_the_same_victim_and_checks_its_targets(minilm):
    model = minilm[0]
    one, two = RECIPE.victim(model), lora_victim(model, ("value", "query"), r=16, alpha=32, layers=0, warmup=3)
    for (name, a), (_, b) in zip(one.named_parameters(), two.named_parameters()):
        assert torch.equal(a, b), name
    assert RECIPE.targets == ("query", "value")
    with pytest.raises(ValueError, match="Unknown LoRA target"):
        LoraRecipe(targets=("querry",))


def test_the_global_model_is_the_warmed_up_victim_every_client_builds(minilm):
    # What the server's hook attacks with: the recipe's victim of the seeded model, B moved by the warm-up.
    server = federated.global_model("minilm", lora=RECIPE)
    client = RECIPE.victim(minilm[0])
    for (name, a), (_, b) in zip(server.named_parameters(), client.named_parameters()):
        assert torch.equal(a, b), name
    params = dict(server.named_parameters())
    b_names = [n for n in params if ".lora_B." in n]
    assert len(b_names) == 2 and not server.training
    # Three AdamW steps at 1e-3 move each entry by at most about 3e-3, and the largest that far.
    for name in b_names:
        assert 2.9e-3 < float(params[name].detach().abs().max()) < 3.1e-3, name
    fresh = federated.global_model("minilm", lora=dataclasses.replace(RECIPE, warmup=0))
    assert all(float(p.detach().abs().max()) == 0.0 for n, p in fresh.named_parameters() if ".lora_B." in n)


def test_the_plain_global_model_is_a_copy_and_bad_recipes_are_refused():
    plain, cached = federated.global_model("minilm"), cached_model("minilm", 0)[0]
    assert plain is not cached
    with torch.no_grad():
        next(plain.parameters()).add_(1.0)
    assert not torch.equal(next(plain.parameters()), next(cached.parameters()))
    with pytest.raises(ValueError, match="LoraRecipe"):
        federated.global_model(lora={"r": 8})
    with pytest.raises(ValueError, match="r must be a whole number in 1..384"):
        federated.global_model(lora=dataclasses.replace(RECIPE, r=500))
