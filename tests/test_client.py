"""The client side of the threat model: what each protocol sends, and what it refuses."""

import pytest
import torch

from gilib.client import DPSGD, AdamW, CentralDP, FedAvg, client_update, replay_mismatch
from gilib.dp import batch_inputs, dp_sgd_step
from gilib.models import encode, encode_lm, load_model
from gilib.selection import select
from gilib.update import SharedUpdate

TEXTS = ["the film was a quiet delight .", "a cat sat on the mat"]


@pytest.fixture
def client(tiny):
    model, tokenizer = tiny
    return model, tokenizer, encode(tokenizer, TEXTS, [1, 0])


def test_the_plain_update_is_the_batch_gradient_with_labels_and_lengths(client):
    model, _, true_batch = client
    selection = select(model, "attention.value", 0)
    update = client_update(model, selection, true_batch)
    assert update.dp is None
    (shared,) = update.shared.shared_grads
    model.zero_grad()
    model(**true_batch).loss.backward()
    torch.testing.assert_close(shared, model.bert.encoder.layer[0].attention.self.value.weight.grad)
    model.zero_grad(set_to_none=True)
    assert not shared.requires_grad
    assert update.shared.labels.tolist() == [1, 0]
    assert update.shared.lengths == true_batch["attention_mask"].sum(1).tolist() == [9, 8]


def test_dp_sgd_sends_the_reading_it_names(client):
    model, _, true_batch = client
    selection = select(model, "attention.query", 0)
    plain = client_update(model, selection, true_batch).shared.shared_grads[0]
    raw = client_update(model, selection, true_batch, DPSGD(0.5, 1.0, seed=3, reading="raw"))
    private = client_update(model, selection, true_batch, DPSGD(0.5, 1.0, seed=3))
    step = dp_sgd_step(model, selection, true_batch, noise_multiplier=0.5, max_grad_norm=1.0, seed=3)
    torch.testing.assert_close(raw.shared.shared_grads[0], plain, rtol=1e-4, atol=1e-7)
    assert torch.equal(private.shared.shared_grads[0], step.privatised[0])
    assert not torch.allclose(private.shared.shared_grads[0], plain)
    assert private.dp.cosine() < 0.5  # the client's own view of what the noise left


def _clipped_sum_by_hand(model, batch, names, clip):
    """sum_i clip_C(g_i) over the batch, one example at a time, clipped over every parameter (as DP-SGD does)."""
    params = dict(model.named_parameters())
    total = None
    for i in range(batch["labels"].shape[0]):
        one = {k: v[i : i + 1] for k, v in batch.items()}
        grads = torch.autograd.grad(model(**batch_inputs(one), labels=one["labels"]).loss, list(params.values()))
        factor = min(1.0, clip / (float(torch.sqrt(sum(g.square().sum() for g in grads))) + 1e-6))
        picked = [g * factor for n, g in zip(params, grads) if n in names]
        total = picked if total is None else [a + b for a, b in zip(total, picked)]
    return total


def test_central_dp_sends_the_clipped_per_example_sum_without_noise(client):
    model, tokenizer, _ = client
    true_batch = encode(tokenizer, TEXTS + ["rain fell on the old town all night"], [1, 0, 1])
    selection = select(model, "layer", 0)
    update = client_update(model, selection, true_batch, CentralDP(0.7, max_grad_norm=0.5, seed=3))
    expected = _clipped_sum_by_hand(model, true_batch, set(selection.names), 0.5)
    for got, want in zip(update.shared.shared_grads, expected):
        # The message is the batch mean of the clipped gradients: B times it is the clipped sum.
        torch.testing.assert_close(got * 3, want, rtol=1e-4, atol=1e-7)
    assert (update.dp.per_example_norms > 0.5).all()  # clipping acted on every sentence
    # No noise on the client: the message does not depend on the server's sigma, nor on the seed.
    quiet = client_update(model, selection, true_batch, CentralDP(0.0, max_grad_norm=0.5, seed=9))
    assert all(torch.equal(a, b) for a, b in zip(update.shared.shared_grads, quiet.shared.shared_grads))
    # Local DP at the same sigma sends something else: its own noise.
    local = client_update(model, selection, true_batch, DPSGD(0.7, 0.5, seed=3))
    assert not torch.allclose(local.shared.shared_grads[0], update.shared.shared_grads[0], atol=1e-3)
    assert update.shared.labels.tolist() == [1, 0, 1] and len(update.shared.lengths) == 3


def test_central_dp_at_one_sentence_is_the_raw_gradient_times_its_clip_factor(client):
    # Why the paper's "raw gradient" reading is the right one for a server under central DP.
    model, tokenizer, _ = client
    one = encode(tokenizer, TEXTS[0], 1)
    selection = select(model, "attention.query", 0)
    raw = client_update(model, selection, one).shared.shared_grads[0]
    sent = client_update(model, selection, one, CentralDP(0.5, max_grad_norm=1e-3))
    factor = 1e-3 / (float(sent.dp.per_example_norms[0]) + 1e-6)
    torch.testing.assert_close(sent.shared.shared_grads[0], raw * factor, rtol=1e-4, atol=1e-10)
    assert torch.nn.functional.cosine_similarity(sent.shared.shared_grads[0].flatten(), raw.flatten(), dim=0) \
        > 0.9999


def test_the_central_dp_server_adds_noise_of_sigma_c_to_the_clients_sum(client):
    model, tokenizer, _ = client
    selection = select(model, "ffn.intermediate", 0)
    batches = [encode(tokenizer, TEXTS, [1, 0]), encode(tokenizer, ["a long road home"], [0])]
    protocol = CentralDP(0.6, max_grad_norm=0.5, seed=11)
    updates = [client_update(model, selection, b, protocol).shared for b in batches]
    noisy = protocol.aggregate(updates)
    quiet = CentralDP(0.0, max_grad_norm=0.5).aggregate(updates)
    # Without noise: the clipped sums of the two clients over their 3 sentences.
    for q, a, b in zip(quiet, updates[0].shared_grads, updates[1].shared_grads):
        torch.testing.assert_close(q, (2 * a + b) / 3, rtol=1e-6, atol=1e-9)
    noise = (noisy[0] - quiet[0]) * 3  # the noise on the sum
    assert noise.numel() > 5_000 and noise.std().item() == pytest.approx(0.6 * 0.5, rel=0.05)


@pytest.mark.parametrize("make, message", [
    (lambda: CentralDP(-0.1), "noise_multiplier"),
    (lambda: CentralDP(0.1, max_grad_norm=0.0), "max_grad_norm"),
    (lambda: CentralDP(0.1, max_grad_norm=-2.0), "max_grad_norm"),
    (lambda: CentralDP(float("nan")), "noise_multiplier"),
])
def test_bad_central_dp_settings_are_refused(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_a_dp_client_with_no_sentences_is_refused(client):
    model, tokenizer, true_batch = client
    empty = {k: v[:0] for k, v in true_batch.items()}
    for protocol in (CentralDP(0.5), DPSGD(0.5)):
        with pytest.raises(ValueError, match="at least one sentence"):
            client_update(model, select(model, "full"), empty, protocol)


def test_fedavg_one_step_is_the_gradient_and_more_steps_follow_sgd(client):
    model, _, true_batch = client
    selection = select(model, "layer", 0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    plain = client_update(model, selection, true_batch).shared.shared_grads
    one = client_update(model, selection, true_batch, FedAvg(local_steps=1, lr=1e-2)).shared.shared_grads
    for a, b in zip(one, plain):
        # (theta_0 - theta_1) / lr in float32: round-off of |theta| * eps / lr, about 1e-6 here.
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)
    # Two steps by hand: the weight difference over lr * E.
    lr, twin = 0.05, {n: p.detach().clone().requires_grad_(True) for n, p in model.named_parameters()}
    for _ in range(2):
        loss = torch.func.functional_call(model, twin, args=(), kwargs=true_batch).loss
        grads = torch.autograd.grad(loss, list(twin.values()))
        twin = {n: (p - lr * g).detach().requires_grad_(True) for (n, p), g in zip(twin.items(), grads)}
    expected = [(before[n] - twin[n].detach()) / (2 * lr) for n in selection.names]
    two = client_update(model, selection, true_batch, FedAvg(local_steps=2, lr=lr)).shared.shared_grads
    for got, want in zip(two, expected):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    assert any(not torch.allclose(a, b, rtol=1e-3, atol=1e-6) for a, b in zip(two, plain))
    for n, p in model.named_parameters():  # the caller's model is untouched
        assert torch.equal(p, before[n])


@pytest.mark.parametrize("labels, message", [([5, 0], "class indices in 0..1"), ([-1, 0], "class indices"),
                                             ([1], "2 class indices")])
def test_a_label_outside_the_models_classes_is_refused(client, labels, message):
    model, tokenizer, _ = client
    true_batch = encode(tokenizer, TEXTS, [0, 0])
    true_batch["labels"] = torch.tensor(labels)
    with pytest.raises(ValueError, match=message):
        client_update(model, select(model, "full"), true_batch)


def test_float_labels_and_a_batch_without_labels_are_refused(client):
    model, _, true_batch = client
    with pytest.raises(ValueError, match="class indices"):
        client_update(model, select(model, "full"), {**true_batch, "labels": torch.tensor([1.0, 0.0])})
    with pytest.raises(ValueError, match=r"lacks \['labels'\].*gilib.models.encode"):
        client_update(model, select(model, "full"), {k: v for k, v in true_batch.items() if k != "labels"})


@pytest.mark.parametrize("make, message", [
    (lambda: FedAvg(local_steps=0), "local_steps >= 1"),
    (lambda: FedAvg(local_steps=1.5), "local_steps >= 1"),
    (lambda: FedAvg(lr=0.0), "positive number"),
    (lambda: FedAvg(lr=float("nan")), "positive number"),
    (lambda: DPSGD(0.1, reading="cooked"), "Unknown DP reading"),
    (lambda: AdamW(local_steps=0), "local_steps >= 1"),
    (lambda: AdamW(lr=-1e-5), "learning rate must be a positive number"),
    (lambda: AdamW(eps=0.0), "eps must be a positive number"),
    (lambda: AdamW(eps=float("nan")), "eps must be a positive number"),
    (lambda: AdamW(betas=(0.9, 1.0)), r"betas must be two numbers in \[0, 1\)"),
    (lambda: AdamW(betas=(-0.1, 0.999)), r"betas must be two numbers in \[0, 1\)"),
    (lambda: AdamW(betas=(0.9,)), r"betas must be two numbers"),
    (lambda: AdamW(weight_decay=-0.01), "weight_decay must be a number of at least 0"),
    (lambda: AdamW(precision="float16"), "Unknown precision 'float16'"),
])
def test_bad_protocol_settings_are_refused(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_an_unknown_protocol_and_a_too_long_batch_are_refused(client):
    model, _, true_batch = client
    with pytest.raises(ValueError, match="Unknown protocol"):
        client_update(model, select(model, "full"), true_batch, "fedprox")
    long = {k: v.repeat(1, 40) if v.dim() == 2 else v for k, v in true_batch.items()}
    with pytest.raises(ValueError, match="at most"):
        client_update(model, select(model, "full"), long)


def _message(model, selection, true_batch):
    return client_update(model, selection, true_batch).shared


def test_a_valid_message_comes_back_in_canonical_form(client):
    model, _, true_batch = client
    selection = select(model, "attention.query", 0)
    update = _message(model, selection, true_batch)
    checked = SharedUpdate(list(update.shared_grads), [1, 0], torch.tensor([9, 8])).validated(model, selection)
    assert isinstance(checked.shared_grads, tuple) and checked.lengths == [9, 8]
    assert checked.labels.dtype == torch.long and checked.labels.tolist() == [1, 0]
    assert SharedUpdate(update.shared_grads, None, [9, 8]).validated(model, selection).labels is None


@pytest.mark.parametrize("corrupt, message", [
    (lambda g: [g[0].clone().fill_(float("nan"))], "NaN or infinite"),
    (lambda g: [torch.full_like(g[0], float("inf"))], "NaN or infinite"),
    (lambda g: [torch.zeros_like(g[0])], "is zero: the update carries no signal"),
    (lambda g: [g[0].double()], "torch.float64 but the model is torch.float32"),
    (lambda g: [torch.zeros(g[0].shape, device="meta")], "on meta but the model on cpu"),
    (lambda g: [g[0], g[0]], "2 gradient tensors for the 1"),
    (lambda g: [g[0].T[:3]], "has shape"),
    (lambda g: [g[0].numpy()], "not a tensor"),
])
def test_a_malformed_message_is_refused_before_any_attack_math(client, corrupt, message):
    model, _, true_batch = client
    selection = select(model, "attention.query", 0)
    update = _message(model, selection, true_batch)
    with pytest.raises(ValueError, match=message):
        SharedUpdate(corrupt(list(update.shared_grads)), update.labels, update.lengths).validated(model, selection)


@pytest.mark.parametrize("labels, lengths, message", [
    ([1, 0], [], "No sentence lengths"),
    ([1, 0], [2, 8], "between 3 and"),
    ([1, 0], [9, 10_000], "between 3 and"),
    ([1, 7], [9, 8], "class indices in 0..1"),
    ([1], [9, 8], "has 2 sentence length\\(s\\) but 1 label\\(s\\)"),
    ([True, False], [9, 8], "class indices"),
    ([1, 0], [9.5, 8], "whole number"),
    ([1, 0], [True, 8], "whole number"),
])
def test_lengths_and_labels_of_a_message_are_checked(client, labels, lengths, message):
    model, _, true_batch = client
    selection = select(model, "attention.query", 0)
    update = _message(model, selection, true_batch)
    with pytest.raises(ValueError, match=message):
        SharedUpdate(update.shared_grads, labels, lengths).validated(model, selection)


def test_fedavg_in_float32_rounds_small_steps_away_and_the_float64_control_does_not(minilm):
    # Chapter 6: at lr = 1e-5 most of an SGD step is below float32's spacing near the
    # weights, so the weight difference is mostly rounding; in float64 it is the gradient.
    model, tokenizer = minilm
    selection = select(model, "attention.query", 0)
    true_batch = encode(tokenizer, "the film was a quiet delight .", 1)
    (plain,) = client_update(model, selection, true_batch).shared.shared_grads
    cosine = {}
    for precision in ("float32", "float64"):
        (update,) = client_update(model, selection, true_batch, FedAvg(1, 1e-5, precision)).shared.shared_grads
        assert update.dtype == plain.dtype
        cosine[precision] = float(torch.nn.functional.cosine_similarity(update.reshape(-1), plain.reshape(-1), dim=0))
    assert cosine["float32"] < 0.95
    assert cosine["float64"] > 0.99999


def test_a_replay_of_the_clients_sentence_reproduces_a_rounded_message_bit_for_bit(minilm):
    # At lr 1e-5 most entries never move and the rest are rounded to float32's grid: a noise model only
    # says the client's sentence is closer; replaying the client's step on it gives every bit back.
    model, tokenizer = minilm
    selection = select(model, "layer", 0)
    true_batch = encode(tokenizer, "the film was a quiet delight .", 1)
    for protocol in (FedAvg(1, 1e-5), FedAvg(2, 1e-4), AdamW(1, 2e-5), None):
        message = client_update(model, selection, true_batch, protocol).shared
        assert replay_mismatch(model, selection, true_batch, protocol, message) == 0.0
        # One token off, or the other label: a share of the entries no longer match.
        wrong = {**true_batch, "input_ids": true_batch["input_ids"].clone()}
        wrong["input_ids"][0, 3] = tokenizer.convert_tokens_to_ids("film")
        assert replay_mismatch(model, selection, wrong, protocol, message) > 0.01
        other = {**true_batch, "labels": 1 - true_batch["labels"]}
        assert replay_mismatch(model, selection, other, protocol, message) > 0.01
    # The message's own protocol, not another learning rate.
    message = client_update(model, selection, true_batch, FedAvg(1, 1e-5)).shared
    assert replay_mismatch(model, selection, true_batch, FedAvg(1, 2e-5), message) > 0.01


def test_a_replay_of_a_dp_message_or_of_another_selection_is_refused(client):
    model, _, true_batch = client
    selection = select(model, "attention.query", 0)
    protocol = DPSGD(0.5, 1.0, seed=3)
    message = client_update(model, selection, true_batch, protocol).shared
    with pytest.raises(ValueError, match="a replay cannot reproduce it"):
        replay_mismatch(model, selection, true_batch, protocol, message)
    with pytest.raises(ValueError, match="a replay cannot reproduce it"):
        replay_mismatch(model, selection, true_batch, CentralDP(0.5, 1.0), message)
    with pytest.raises(ValueError, match="Got 1 gradient tensors for the 16 of"):
        replay_mismatch(model, select(model, "layer", 0), true_batch, None, message)


def test_fedavg_refuses_an_unknown_precision():
    with pytest.raises(ValueError, match="Unknown precision 'float16'"):
        FedAvg(1, 1e-3, "float16")


def test_adamw_follows_torchs_optimizer_and_one_step_inverts_to_the_gradient(client):
    model, _, true_batch = client
    selection = select(model, "layer", 0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    plain = client_update(model, selection, true_batch).shared
    # Two steps by hand with torch's AdamW on a twin: the message is the weight difference over lr * E.
    protocol = AdamW(local_steps=2, lr=1e-3, weight_decay=0.1)
    twin = {n: p.detach().clone().requires_grad_(True) for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(twin.values(), lr=1e-3, weight_decay=0.1)
    for _ in range(2):
        optimizer.zero_grad()
        torch.func.functional_call(model, twin, args=(), kwargs=true_batch).loss.backward()
        optimizer.step()
    two = client_update(model, selection, true_batch, protocol).shared.shared_grads
    for got, name in zip(two, selection.names):
        torch.testing.assert_close(got, (before[name] - twin[name].detach()) / 2e-3, rtol=1e-4, atol=1e-4)
    for n, p in model.named_parameters():  # the caller's model is untouched
        assert torch.equal(p, before[n])
    # One step is g / (|g| + eps) plus the public weight decay: the server undoes it.
    one = AdamW(lr=1e-3, eps=1e-3, weight_decay=0.1, precision="float64")
    message = client_update(model, selection, true_batch, one).shared
    recovered = one.gradient(message, model, selection)
    for got, want in zip(recovered.shared_grads, plain.shared_grads):
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-7)
    with pytest.raises(ValueError, match="Only one AdamW step is invertible"):
        protocol.gradient(message, model, selection)


def test_adamw_in_float32_keeps_the_gradients_sign_and_loses_large_magnitudes(minilm):
    # At a fine-tuning learning rate a float32 AdamW step is lr * sign(g) for every entry far
    # above eps: the message still carries the sign of every entry that moved.
    model, tokenizer = minilm
    selection = select(model, "attention.query", 0)
    true_batch = encode(tokenizer, "the film was a quiet delight .", 1)
    (plain,) = client_update(model, selection, true_batch).shared.shared_grads
    protocol = AdamW(lr=5e-5, weight_decay=0.0)
    message = client_update(model, selection, true_batch, protocol).shared
    (step,) = message.shared_grads
    moved = step != 0
    assert moved.float().mean() > 0.5
    assert torch.equal(step[moved].sign(), plain[moved].sign())
    (recovered,) = protocol.gradient(message, model, selection).shared_grads
    assert torch.equal(recovered[moved].sign(), plain[moved].sign())


@pytest.fixture(scope="module")
def decoder():
    model, tokenizer = load_model("gpt2-tiny")
    return model, encode_lm(tokenizer, ["the film was good", "a cat sat on the mat"])


def test_a_decoder_client_sends_the_next_token_gradient_without_labels(decoder):
    model, batch = decoder
    selection = select(model, "layer", 0)
    update = client_update(model, selection, batch).shared
    assert update.labels is None and update.lengths == [6, 8]
    # The next-token loss by hand: each position predicts the next token, padding ignored.
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    targets = batch["input_ids"][:, 1:].masked_fill(batch["attention_mask"][:, 1:] == 0, -100)
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1))
    expected = torch.autograd.grad(loss, selection.parameters(model))
    for got, want in zip(update.shared_grads, expected):
        torch.testing.assert_close(got, want)


def test_a_decoder_client_runs_fedavg_and_adamw_through_the_same_loss(decoder):
    model, batch = decoder
    selection = select(model, "attention.qkv", 0)
    gradient = client_update(model, selection, batch).shared.shared_grads[0]
    fedavg = client_update(model, selection, batch, FedAvg(local_steps=1, lr=1e-3, precision="float64")).shared
    torch.testing.assert_close(fedavg.shared_grads[0], gradient, rtol=1e-4, atol=1e-7)
    adamw = AdamW(lr=1e-4, precision="float64", weight_decay=0.0)
    recovered = adamw.gradient(client_update(model, selection, batch, adamw).shared, model, selection)
    assert torch.nn.functional.cosine_similarity(recovered.shared_grads[0].flatten(), gradient.flatten(), 0) > 0.99


def test_a_decoder_client_refuses_class_labels_long_batches_and_dp(decoder):
    model, batch = decoder
    selection = select(model, "layer", 0)
    with pytest.raises(ValueError, match="has no class labels.*encode_lm"):
        client_update(model, selection, {**batch, "labels": torch.tensor([0, 1])})
    too_long = {"input_ids": torch.ones(1, 129, dtype=torch.long), "attention_mask": torch.ones(1, 129, dtype=torch.long)}
    with pytest.raises(ValueError, match="129 tokens per sentence but this model takes at most 128"):
        client_update(model, selection, too_long)
    for protocol in (DPSGD(noise_multiplier=1.0), CentralDP(noise_multiplier=1.0)):
        with pytest.raises(ValueError, match="not available for a decoder"):
            client_update(model, selection, batch, protocol)
