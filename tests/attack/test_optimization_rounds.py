"""The optimisation attack over several rounds' messages of one batch (optimization_rounds_attack)."""

import copy

import pytest
import torch

from gilib.attack import AttackConfig, Round, optimization_attack, optimization_rounds_attack
from gilib.attack.engines import Layout
from gilib.attack.ghost import GhostMatcher, RoundsGhostMatcher, supports
from gilib.attack.objectives import GradientMatcher, RoundsMatcher, round_targets
from gilib.attack.tokens import TokenSpace
from gilib.client import client_update
from gilib.models import encode
from gilib.selection import select

SENTENCE = "the film was a quiet delight ."
QUICK = AttackConfig(steps=30, init_candidates=3, swap_every=10, seed=0, progress=False)


@pytest.fixture(scope="module")
def rounds(tiny):
    """Two rounds of one sentence: the tiny BERT and a copy moved by seeded noise (another global model)."""
    model, tokenizer = tiny
    later = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in later.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=generator))
    selection = select(model, "attention.query", 0)
    batch = encode(tokenizer, [SENTENCE], [1])
    return selection, [Round(m, client_update(m, selection, batch).shared) for m in (model, later)]


def test_two_rounds_objective_is_the_mean_of_the_rounds_objectives(tiny, rounds):
    model, tokenizer = tiny
    selection, (first, second) = rounds
    space = TokenSpace(model, tokenizer)
    layout = Layout(first.update.lengths, max(first.update.lengths), tokenizer, space, "cpu")
    singles = [GradientMatcher(r.model, selection.names).matched([r.update.shared_grads]) for r in rounds[1]]
    targets = [m.target(r.update.shared_grads, selection.names, r.update.labels, layout.attention_mask)
               for m, r in zip(singles, rounds[1])]
    both = RoundsMatcher(singles).matched([r.update.shared_grads for r in rounds[1]])
    target = both.target([r.update.shared_grads for r in rounds[1]], selection.names, first.update.labels,
                         layout.attention_mask)
    assert len(target.shared_grads) == 2 * len(both.names) and len(round_targets(target, 2)) == 2
    embeds = layout.compose(0.05 * torch.randn(1, 9, space.dim, generator=torch.Generator().manual_seed(1)))
    want = [float(m.loss(embeds, t)) for m, t in zip(singles, targets)]
    assert want[0] != pytest.approx(want[1])  # the rounds' models differ, so do their distances
    assert float(both.loss(embeds, target)) == pytest.approx((want[0] + want[1]) / 2, rel=1e-6)
    # Each round's candidate gradient is taken at its own model.
    for got, own in zip(both.gradients(embeds, target)[len(both.names):], singles[1].gradients(embeds, targets[1])):
        torch.testing.assert_close(got, own)
    # Ghost scoring over rounds gives the same numbers.
    assert all(supports(r.model, both.names, "cos") for r in rounds[1])
    ghost = RoundsGhostMatcher([GhostMatcher(r.model, both.names) for r in rounds[1]])
    torch.testing.assert_close(ghost.score(embeds[None], target), both.score(embeds[None], target), rtol=1e-4,
                               atol=1e-6)


def test_one_round_is_the_one_round_attack(tiny, rounds):
    model, tokenizer = tiny
    selection, (first, _) = rounds
    alone = optimization_attack(model, tokenizer, first.update, selection, QUICK)
    one = optimization_rounds_attack(tokenizer, [first], selection, QUICK)
    assert one.token_ids == alone.token_ids and one.final_loss == alone.final_loss


def test_two_rounds_are_seeded_and_the_plain_engine_agrees(tiny, rounds):
    _, tokenizer = tiny
    selection, both = rounds
    runs = [optimization_rounds_attack(tokenizer, both, selection, QUICK) for _ in range(2)]
    plain = optimization_rounds_attack(tokenizer, both, selection, AttackConfig(**{**QUICK.__dict__,
                                                                                     "batched": False}))
    assert runs[0].token_ids == runs[1].token_ids == plain.token_ids
    assert runs[0].final_loss == pytest.approx(plain.final_loss, rel=1e-4)
    history = runs[0].diagnostics.loss_history
    assert len(history) == QUICK.steps and history[-1] < history[0]
    # The final loss is the mean of the two rounds' distances of the rebuilt tokens.
    model, _ = tiny
    ids = torch.tensor(runs[0].token_ids)
    embeds = model.get_input_embeddings().weight[ids].detach()
    mask = torch.ones_like(ids)
    own = []
    for r in both:
        matcher = GradientMatcher(r.model, selection.names).matched([x.update.shared_grads for x in both])
        own.append(float(matcher.loss(embeds, matcher.target(r.update.shared_grads, selection.names,
                                                             r.update.labels, mask))))
    assert runs[0].final_loss == pytest.approx(sum(own) / 2, rel=1e-4)


def test_bad_rounds_are_refused_with_what_to_do(tiny, minilm, rounds):
    model, tokenizer = tiny
    selection, (first, second) = rounds
    with pytest.raises(ValueError, match="No round given"):
        optimization_rounds_attack(tokenizer, [], selection, QUICK)
    with pytest.raises(TypeError, match="Round"):
        optimization_rounds_attack(tokenizer, first, selection, QUICK)
    with pytest.raises(TypeError, match=r"rounds\[1\]"):
        optimization_rounds_attack(tokenizer, [first, (second.model, second.update)], selection, QUICK)
    # Another architecture: MiniLM's layer-0 query has another shape than the tiny BERT's.
    with pytest.raises(ValueError, match="another shape"):
        optimization_rounds_attack(tokenizer, [first, Round(minilm[0], second.update)], selection, QUICK)
    # A message of another selection (the value weight's) does not fit the query's.
    value = select(model, "attention.value", 0)
    other = client_update(model, value, encode(tokenizer, [SENTENCE], [1])).shared
    with pytest.raises(ValueError):
        optimization_rounds_attack(tokenizer, [first, Round(model, other._replace(shared_grads=[
            torch.zeros(3, 3)]))], selection, QUICK)
    longer = client_update(second.model, selection, encode(tokenizer, [SENTENCE + " again"], [1])).shared
    with pytest.raises(ValueError, match="lengths"):
        optimization_rounds_attack(tokenizer, [first, Round(second.model, longer)], selection, QUICK)
    with pytest.raises(ValueError, match="labels differ"):
        optimization_rounds_attack(tokenizer, [first, Round(second.model, second.update._replace(
            labels=torch.tensor([0])))], selection, QUICK)
