"""Federated rounds in Flower (gilib.federated): what the curious server receives, and how a round fails.

The rounds run Flower's simulation engine, which starts Ray (5 to 10 s).
If Ray cannot start on this machine, ``run_round`` raises a RuntimeError
that says so, and the tests that need a round fail with it: they never
pass without a round.
"""

import copy
import json
import os
import time
from pathlib import Path

import psutil
import pytest
import torch

from gilib import federated
from gilib.attack import span_attack
from gilib.client import DPSGD, FedAvg, client_update
from gilib.models import encode
from gilib.secure import secure_mean
from gilib.selection import select

CLIENTS = [[("the cat sat on the mat", 1)], [("a dog barked at night", 0)],
           [("rain fell on the quiet town", 1), ("we walked home", 0)]]

pytestmark = pytest.mark.slow


def _survivors(temp_dir: str, wait: float = 15.0) -> list[str]:
    """Processes (Ray's) whose command line names the round's temporary folder, after a grace period."""
    deadline = time.monotonic() + wait
    while True:
        found = []
        for proc in psutil.process_iter(["pid", "cmdline"]):
            cmdline = proc.info["cmdline"] or []
            if any(temp_dir in part for part in cmdline):
                found.append(f"{proc.info['pid']}: {' '.join(cmdline)[:120]}")
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(0.5)


@pytest.fixture(scope="module")
def plain_round(minilm):
    """One FedSGD round of three clients sharing layer 0's query weight, attacked as the replies arrive."""
    model, tokenizer = minilm
    selection = select(model, "attention.query", 0)
    rebuilt = {}

    def attack(reply):
        rebuilt[reply.client] = span_attack(model, tokenizer, reply.update, selection)

    home = Path.home() / ".flwr"
    existed = home.exists()
    run = federated.run_round(CLIENTS, "attention.query", 0, on_reply=attack)
    return run, rebuilt, existed, home


def test_each_reply_is_the_clients_gradient_with_its_labels_and_lengths(plain_round, minilm):
    run, _, _, _ = plain_round
    model, tokenizer = minilm
    selection = select(model, "attention.query", 0)
    assert sorted(r.client for r in run.replies) == [0, 1, 2] and run.skipped == []
    for reply in run.replies:
        texts, labels = zip(*CLIENTS[reply.client])
        truth = client_update(model, selection, encode(tokenizer, list(texts), list(labels))).shared
        assert reply.round == 1 and reply.clients == 1 and reply.num_examples == len(texts)
        assert reply.update.lengths == truth.lengths and list(reply.update.labels) == list(labels)
        # The client ran in a Ray actor on one thread: the same gradient up to the summation order.
        torch.testing.assert_close(reply.update.shared_grads[0], truth.shared_grads[0], rtol=1e-4, atol=1e-8)


def test_the_server_attack_in_the_callback_rebuilds_every_client_exactly(plain_round, minilm):
    _, rebuilt, _, _ = plain_round
    tokenizer = minilm[1]
    for client in (0, 1):
        ((text, _),) = CLIENTS[client]
        assert rebuilt[client].texts == [text]
        assert rebuilt[client].token_ids[0] == tokenizer(text)["input_ids"]
    # The third client's two sentences, peeled from the query weight alone.
    assert sorted(rebuilt[2].texts) == sorted(t for t, _ in CLIENTS[2])


def test_the_strategy_aggregates_as_usual(plain_round, minilm):
    run, _, _, _ = plain_round
    model = minilm[0]
    (weight,) = select(model, "attention.query", 0).parameters(model)
    sizes = [r.num_examples for r in run.replies]
    mean = sum(n * r.update.shared_grads[0] for n, r in zip(sizes, run.replies)) / sum(sizes)
    torch.testing.assert_close(run.global_weights[0], weight.detach() - federated.SERVER_LR * mean,
                               rtol=0, atol=1e-7)


def test_the_round_leaves_no_process_and_no_file_behind(plain_round):
    run, _, existed, home = plain_round
    assert run.temp_dir and not os.path.exists(run.temp_dir)
    assert _survivors(run.temp_dir) == []
    assert home.exists() == existed  # Flower's files went to the temporary folder
    assert os.environ.get("FLWR_HOME") is None or "gilib-fl-" not in os.environ["FLWR_HOME"]


def test_a_secure_round_shows_the_server_only_the_mean_the_gradient_of_all_sentences(minilm):
    model, tokenizer = minilm
    clients = CLIENTS[:2] + [[("rain fell on the quiet town", 1)]]
    run = federated.run_round(clients, "layer", 0, secure=True)
    (reply,) = run.replies
    assert reply.client is None and reply.clients == 3 and reply.num_examples == 3
    assert sorted(reply.update.lengths) == [7, 8, 8]
    selection = select(model, "layer", 0)
    texts = [t for batch in clients for t, _ in batch]
    union = client_update(model, selection, encode(tokenizer, texts, [1, 0, 1])).shared
    for got, want in zip(reply.update.shared_grads, union.shared_grads):
        # SecAgg+ quantises to 2 / 2**30 of its clipping range.
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)
    # gilib.secure reproduces the round's arithmetic: the same noise, of the size SecAgg.noise_std says.
    errors = torch.cat([(got.double() - want.double()).flatten()
                        for got, want in zip(reply.update.shared_grads, union.shared_grads)])
    alone = [client_update(model, selection, encode(tokenizer, [t], [y])).shared
             for batch in clients for t, y in batch]
    simulated = secure_mean(alone, federated.SecAgg(), seed=0)
    simulated_errors = torch.cat([(got.double() - want.double()).flatten()
                                  for got, want in zip(simulated.shared_grads, union.shared_grads)])
    expected = federated.SecAgg().noise_std([1, 1, 1])
    assert 0.8 < float(errors.std()) / expected < 1.25
    assert 0.8 < float(simulated_errors.std()) / expected < 1.25
    result = span_attack(model, tokenizer, reply.update._replace(labels=None), selection)
    assert sorted(result.texts) == sorted(texts)
    assert _survivors(run.temp_dir) == []


def test_a_fedavg_client_sends_its_normalised_weight_difference(minilm):
    model, tokenizer = minilm
    protocol = FedAvg(local_steps=2, lr=1e-3)
    run = federated.run_round(CLIENTS[:2], "attention.query", 0, protocol=protocol)
    selection = select(model, "attention.query", 0)
    for reply in run.replies:
        texts, labels = zip(*CLIENTS[reply.client])
        truth = client_update(model, selection, encode(tokenizer, list(texts), list(labels)), protocol).shared
        torch.testing.assert_close(reply.update.shared_grads[0], truth.shared_grads[0], rtol=1e-3, atol=1e-6)
    (weight,) = selection.parameters(model)
    mean = sum(r.update.shared_grads[0] for r in run.replies) / 2
    # The default server step lr * E makes the global weights the mean of the local models.
    torch.testing.assert_close(run.global_weights[0], weight.detach() - 2e-3 * mean, rtol=0, atol=1e-7)


def test_a_failing_client_is_a_logged_skip_and_flowers_noise_stays_quiet(capfd, caplog):
    clients = [[("the cat sat on the mat", 1)], [("a dog barked at night", 7)]]
    with caplog.at_level("WARNING", logger="gilib.federated"):
        run = federated.run_round(clients, "attention.query", 0, model="tiny")
    assert [r.client for r in run.replies] == [0]
    (skip,) = run.skipped
    assert "sent no reply" in skip and "Labels must be 1 class indices" in skip
    assert any("sent no reply" in r.getMessage() for r in caplog.records)
    out, err = capfd.readouterr()
    assert "DEPRECATED" not in out + err and "[ROUND 1]" not in out + err
    assert any("deprecated" in line for line in run.log)  # kept, not shown


def test_a_round_with_no_reply_is_an_error_that_names_the_clients_errors():
    with pytest.raises(RuntimeError, match="without a single reply.*Labels must be"):
        federated.run_round([[("a b", 9)], [("c d", 9)]], "attention.query", 0, model="tiny")


def test_a_callback_error_reaches_the_caller():
    def broken(reply):
        raise KeyError("the attack failed")

    with pytest.raises(KeyError, match="the attack failed"):
        federated.run_round(CLIENTS[:1], "attention.query", 0, model="tiny", on_reply=broken)


@pytest.mark.parametrize("kwargs, message", [
    (dict(batches=[]), "No clients"),
    (dict(batches=[[("a cat", 1)], []]), "Client 1 has an empty batch"),
    (dict(batches=[[("  ", 1)]]), "Client 0 holds an empty sentence"),
    (dict(batches=[("a cat", 1)]), "wrap it in a list"),
    (dict(batches=CLIENTS, component="attention.quer"), "Unknown component 'attention.quer'"),
    (dict(batches=CLIENTS, layers=7), "Layer 7 is out of range"),
    (dict(batches=CLIENTS, protocol=DPSGD(0.1)), "FedSGD .* or FedAvg"),
    (dict(batches=CLIENTS[:1], secure=True), "at least 2 clients"),
    (dict(batches=CLIENTS, rounds=0), "rounds must be"),
    (dict(batches=CLIENTS, actors=0), "actors must be a whole number of at least 1, got 0"),
    (dict(batches=CLIENTS, actors=1.5), "actors must be"),
], ids=["no clients", "empty batch", "empty sentence", "bare pair", "misspelt component", "layer",
        "dp", "secure alone", "rounds", "no actor", "half an actor"])
def test_bad_rounds_are_refused_before_flower_starts(kwargs, message, monkeypatch):
    def no_simulation(**_):
        raise AssertionError("the simulation must not start")

    monkeypatch.setattr(federated, "run_simulation", no_simulation)
    kwargs.setdefault("component", "attention.query")
    kwargs.setdefault("layers", 0)
    with pytest.raises(ValueError, match=message):
        federated.run_round(kwargs.pop("batches"), kwargs.pop("component"), kwargs.pop("layers"),
                            model="tiny", **kwargs)


def test_fedavg_needs_a_local_step():
    with pytest.raises(ValueError, match="local_steps >= 1"):
        FedAvg(local_steps=0)


def test_a_simulation_that_cannot_start_ray_says_so(monkeypatch):
    def exits(**_):
        raise SystemExit(1)  # what flwr_exit does when the backend cannot start

    monkeypatch.setattr(federated, "run_simulation", exits)
    with pytest.raises(RuntimeError, match="Ray could not start"):
        federated.run_round(CLIENTS[:1], "attention.query", 0, model="tiny")


def test_secagg_settings_are_checked():
    with pytest.raises(ValueError, match="quantization_range"):
        federated.SecAgg(quantization_range=2**32)
    with pytest.raises(ValueError, match="clipping_range"):
        federated.SecAgg(clipping_range=0.0)
    with pytest.raises(ValueError, match="reconstruction_threshold"):
        federated.SecAgg(reconstruction_threshold=1.5)


def test_client_batches_accept_examples_and_pairs():
    from gilib.data import load_split

    example = load_split("sample")[0]
    assert federated.client_batches([[example], [("a cat", 1)]]) == (((example.text, example.label),),
                                                                      (("a cat", 1),))
    assert json.loads(json.dumps(federated.client_batches(CLIENTS)))  # plain, picklable data


def test_a_second_round_trains_at_the_weights_the_first_round_left(tiny):
    model, tokenizer = tiny
    clients = [[("the cat sat on the mat", 1)], [("a dog barked at night", 0)]]
    # Two actors, one client each: both must receive the weights the server moved.
    run = federated.run_round(clients, "attention.value", 1, model="tiny", rounds=2, server_lr=0.5, actors=2)
    assert sorted((r.round, r.client) for r in run.replies) == [(1, 0), (1, 1), (2, 0), (2, 1)]
    selection = select(model, "attention.value", 1)
    first = [r for r in run.replies if r.round == 1]
    mean = sum(r.update.shared_grads[0] for r in first) / 2
    moved = copy.deepcopy(model)
    (weight,) = selection.parameters(moved)
    with torch.no_grad():
        weight -= 0.5 * mean
    for reply in (r for r in run.replies if r.round == 2):
        (text, label), = clients[reply.client]
        want = client_update(moved, selection, encode(tokenizer, text, label)).shared.shared_grads[0]
        torch.testing.assert_close(reply.update.shared_grads[0], want, rtol=1e-4, atol=1e-7)
    second = sum(r.update.shared_grads[0] for r in run.replies if r.round == 2) / 2
    torch.testing.assert_close(run.global_weights[0], weight.detach() - 0.5 * second, rtol=0, atol=1e-6)
