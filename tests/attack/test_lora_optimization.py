"""LAMP's optimisation attack on a LoRA client's adapter gradients (MiniLM, adapters on layer 0 or every layer)."""

import pytest
import torch

from gilib.attack import AttackConfig, optimization_attack
from gilib.attack.engines import Layout
from gilib.attack.ghost import GhostMatcher, supports
from gilib.attack.objectives import GradientMatcher
from gilib.attack.tokens import TokenSpace
from gilib.client import client_update
from gilib.lora import lora_victim
from gilib.metrics import rouge_scores
from gilib.models import encode
from gilib.selection import select

TEXT = "the cat sat on a warm mat"
QUICK = AttackConfig(steps=80, init_candidates=20, swap_every=40, swap_candidates=20, progress=False)
"""A small step budget: a few seconds on one core."""


@pytest.fixture(scope="module")
def true_batch(minilm):
    return encode(minilm[1], [TEXT], [1])


@pytest.fixture(scope="module")
def victim(minilm):
    return lora_victim(minilm[0], ("query", "value"), r=8, layers=0, warmup=3)


@pytest.mark.parametrize("component", ["lora", "lora.A"])
def test_the_attack_rebuilds_words_from_the_adapters_gradient_alone(minilm, victim, true_batch, component):
    selection = select(victim, component, 0)
    shared = client_update(victim, selection, true_batch).shared
    result = optimization_attack(victim, minilm[1], shared, selection, QUICK)
    history = result.diagnostics.loss_history
    # The gradient distance falls by an order of magnitude from the best random start ...
    assert history[-1] < history[0] / 10
    # ... and the words come back: a random guess of 7 words out of 30k shares none (seed 0 finds 3 or more).
    assert rouge_scores(result.texts[0], TEXT)["rouge1"] >= 2 / 7
    assert len(result.token_ids[0]) == len(true_batch["input_ids"][0])


def test_ghost_scoring_matches_the_plain_gradients_on_adapters_of_every_layer(minilm, true_batch):
    """The adapters' lora_A / lora_B are Linear modules; on the last layer they run at [CLS] alone."""
    model, tokenizer = minilm
    victim = lora_victim(model, ("query", "value"), r=4, layers="all", warmup=2)
    selection = select(victim, "lora")
    shared = client_update(victim, selection, true_batch).shared
    plain = GradientMatcher(victim, selection.names).matched([shared.shared_grads])
    assert supports(victim, plain.names, "cos")
    ghost = GhostMatcher(victim, plain.names, "cos")
    space = TokenSpace(victim, tokenizer)
    layout = Layout(shared.lengths, max(shared.lengths), tokenizer, space, "cpu")
    target = plain.target(shared.shared_grads, selection.names, shared.labels, layout.attention_mask)
    candidates = layout.compose(torch.randn(3, 1, max(shared.lengths), space.dim, generator=torch.Generator()
                                            .manual_seed(0)) * 0.05)
    candidates = torch.cat([space.embed(true_batch["input_ids"])[None], candidates])
    want, got = plain.score(candidates, target), ghost.score(candidates, target)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert float(want[0]) < 1e-4 < float(want[1:].min())  # the truth matches its own gradient
