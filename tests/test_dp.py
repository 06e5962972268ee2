"""Which gradient a DP-SGD client sends, and its privacy budget (gilib.dp)."""

import copy
import math
import warnings

import pytest
import torch
from opacus.accountants.utils import get_noise_multiplier

from gilib import dp
from gilib.client import DPSGD, client_update
from gilib.models import encode
from gilib.selection import select

TEXTS = ["the film was a quiet delight .", "a cat sat on the mat", "rain fell on the old town all night"]


@pytest.fixture
def client(tiny):
    model, tokenizer = tiny
    return model, tokenizer, encode(tokenizer, TEXTS, [1, 0, 1])


def _per_example_clipped_mean(model, batch, names, clip):
    """DP-SGD's clipped mean, computed by hand: one example at a time, clipped over the trainable parameters."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    total = None
    for i in range(batch["labels"].shape[0]):
        one = {k: v[i : i + 1] for k, v in batch.items()}
        one = {**dp.batch_inputs(one), "labels": one["labels"]}
        grads = torch.autograd.grad(model(**one).loss, list(params.values()))
        norm = torch.sqrt(sum(g.square().sum() for g in grads))
        factor = (clip / (norm + 1e-6)).clamp(max=1.0)  # Opacus's flat clipping
        picked = [g * factor for n, g in zip(params, grads) if n in names]
        total = picked if total is None else [a + b for a, b in zip(total, picked)]
    return [t / batch["labels"].shape[0] for t in total]


def test_without_noise_the_privatised_gradient_is_the_clipped_mean(client):
    model, _, batch = client
    selection = select(model, "layer", 0)
    out = dp.dp_sgd_step(model, selection, batch, noise_multiplier=0.0, max_grad_norm=0.5)
    # Raw: exactly the plain client's gradient.
    for raw, plain in zip(out.raw, client_update(model, selection, batch).shared.shared_grads):
        torch.testing.assert_close(raw, plain, rtol=1e-4, atol=1e-7)
    # Privatised with sigma = 0: the mean of per-example clipped gradients.
    expected = _per_example_clipped_mean(model, batch, set(selection.names), 0.5)
    for got, want in zip(out.privatised, expected):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)
    assert (out.per_example_norms > 0.5).all()  # so clipping did act, and the two differ
    assert out.cosine() < 1.0


def test_a_dp_client_step_prints_no_opacus_hook_notice(client):
    # Opacus warns that the token ids need no gradient; every chapter with a DP client printed it.
    model, _, batch = client
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dp.dp_sgd_step(model, select(model, "attention.query", 0), batch, noise_multiplier=0.3, max_grad_norm=1.0)
    assert [str(w.message) for w in caught if "Full backward hook" in str(w.message)] == []


def test_the_privatised_gradient_is_what_the_dp_optimizer_applies(client):
    model, _, batch = client
    selection = select(model, "attention.query", 0)
    out = dp.dp_sgd_step(model, selection, batch, noise_multiplier=0.3, max_grad_norm=1.0, seed=7)
    # An independent DP-SGD step with lr = 1 and the same noise seed: the
    # weights must move by exactly minus the privatised gradient.
    twin = dp._without_dropout(copy.deepcopy(model))
    inputs = dp.batch_inputs(batch)
    dataset = torch.utils.data.TensorDataset(*inputs.values(), batch["labels"])
    wrapped, optimizer, _ = dp._private(twin, dataset, 3, 0.3, 1.0, seed=7, lr=1.0, poisson=False)
    before = [p.detach().clone() for p in selection.parameters(twin)]
    wrapped(**inputs, labels=batch["labels"]).loss.backward()
    optimizer.step()
    for b, p, priv in zip(before, selection.parameters(twin), out.privatised):
        torch.testing.assert_close(b - p.detach(), priv, rtol=1e-5, atol=1e-7)


def test_noise_makes_raw_and_privatised_differ_and_has_the_right_scale(client):
    model, _, batch = client
    selection = select(model, "ffn.intermediate", 1)
    quiet = dp.dp_sgd_step(model, selection, batch, noise_multiplier=0.0, max_grad_norm=1.0)
    noisy = dp.dp_sgd_step(model, selection, batch, noise_multiplier=0.5, max_grad_norm=1.0, seed=3)
    assert not torch.allclose(noisy.raw[0], noisy.privatised[0])
    torch.testing.assert_close(noisy.raw[0], quiet.raw[0])
    noise = (noisy.privatised[0] - quiet.privatised[0]) * 3  # the batch mean divides the noise by B = 3
    assert noise.std().item() == pytest.approx(0.5 * 1.0, rel=0.1)  # sigma * C
    again = dp.dp_sgd_step(model, selection, batch, noise_multiplier=0.5, max_grad_norm=1.0, seed=3)
    torch.testing.assert_close(again.privatised[0], noisy.privatised[0])  # seeded


def test_the_callers_model_is_untouched(client):
    model, _, batch = client
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    dp.dp_sgd_step(model, select(model, "full"), batch, noise_multiplier=1.0)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
        assert getattr(p, "grad_sample", None) is None, n  # no Opacus hook left behind


def test_epsilon_falls_with_noise_and_matches_opacus():
    eps = [dp.epsilon(s, 0.01, 1000, 1e-5) for s in (0.5, 1.0, 2.0)]
    assert eps[0] > eps[1] > eps[2] > 0
    assert dp.epsilon(0.0, 0.01, 1000) == math.inf
    sigma = get_noise_multiplier(target_epsilon=3.0, target_delta=1e-5, sample_rate=0.01, steps=1000,
                                 accountant="rdp")
    assert dp.epsilon(sigma, 0.01, 1000, 1e-5) == pytest.approx(3.0, abs=0.05)
    with pytest.raises(ValueError, match="sample_rate"):
        dp.epsilon(1.0, 0.0, 10)


@pytest.mark.parametrize("sigma, clip, message", [
    (-0.1, 1.0, "noise_multiplier"), (float("nan"), 1.0, "noise_multiplier"), (0.1, 0.0, "max_grad_norm"),
    (0.1, -1.0, "max_grad_norm"), (0.1, float("inf"), "max_grad_norm"), ("0.1", 1.0, "must be a number"),
])
def test_bad_dp_settings_are_refused(client, sigma, clip, message):
    model, _, batch = client
    with pytest.raises(ValueError, match=message):
        dp.dp_sgd_step(model, select(model, "full"), batch, noise_multiplier=sigma, max_grad_norm=clip)
    with pytest.raises(ValueError, match=message):
        DPSGD(sigma, clip)


def test_the_clip_factor_is_opacus_s(client):
    # One sentence without noise: the privatised gradient is the raw one times the clip factor, exactly.
    model, _, batch = client
    one = {k: v[:1] for k, v in batch.items()}
    selection = select(model, "attention.query", 0)
    for clip in (1.0, 1e-3):
        step = dp.dp_sgd_step(model, selection, one, noise_multiplier=0.0, max_grad_norm=clip)
        factor = dp.clip_factors(step.per_example_norms, clip)
        torch.testing.assert_close(step.privatised[0], step.raw[0] * factor[0], rtol=1e-6, atol=0)
    assert dp.clip_factors(torch.tensor([0.5, 4.0, 0.0]), 2.0).tolist() == pytest.approx([1.0, 0.5, 1.0])


def test_central_aggregate_is_the_batch_weighted_mean_plus_noise_of_sigma_c_on_the_sum():
    generator = torch.Generator().manual_seed(0)
    a = [torch.randn(40, 50, generator=generator), torch.randn(7, generator=generator)]
    b = [torch.randn(40, 50, generator=generator), torch.randn(7, generator=generator)]
    # Without noise: the clipped sums added and divided by the examples, (2 a + 3 b) / 5.
    quiet = dp.central_aggregate([a, b], [2, 3], noise_multiplier=0.0, max_grad_norm=0.5)
    for got, x, y in zip(quiet, a, b):
        torch.testing.assert_close(got, (2 * x + 3 * y) / 5, rtol=1e-6, atol=1e-7)
    # With noise: N(0, sigma^2 C^2) on the sum, so (aggregate - quiet) * 5 has std sigma * C.
    noisy = dp.central_aggregate([a, b], [2, 3], noise_multiplier=0.8, max_grad_norm=0.5, seed=4)
    noise = torch.cat([(n - q).flatten() * 5 for n, q in zip(noisy, quiet)])
    assert noise.std().item() == pytest.approx(0.8 * 0.5, rel=0.05)
    assert abs(noise.mean().item()) < 0.05
    again = dp.central_aggregate([a, b], [2, 3], noise_multiplier=0.8, max_grad_norm=0.5, seed=4)
    assert all(torch.equal(x, y) for x, y in zip(again, noisy))  # seeded
    other = dp.central_aggregate([a, b], [2, 3], noise_multiplier=0.8, max_grad_norm=0.5, seed=5)
    assert not torch.equal(other[0], noisy[0])


@pytest.mark.parametrize("call, message", [
    (lambda u: dp.central_aggregate([u], [1], noise_multiplier=-0.1), "noise_multiplier"),
    (lambda u: dp.central_aggregate([u], [1], noise_multiplier=0.1, max_grad_norm=0.0), "max_grad_norm"),
    (lambda u: dp.central_aggregate([u], [0], noise_multiplier=0.1), "batch size is a whole number, at least 1"),
    (lambda u: dp.central_aggregate([u], [1.5], noise_multiplier=0.1), "batch size is a whole number"),
    (lambda u: dp.central_aggregate([u, u], [1], noise_multiplier=0.1), "2 client updates but 1 batch sizes"),
    (lambda u: dp.central_aggregate([], [], noise_multiplier=0.1), "No client updates"),
    (lambda u: dp.central_aggregate([u, [torch.zeros(3)]], [1, 1], noise_multiplier=0.1), "same selection"),
])
def test_central_aggregate_refuses_bad_inputs(call, message):
    with pytest.raises(ValueError, match=message):
        call([torch.zeros(4, 4)])

