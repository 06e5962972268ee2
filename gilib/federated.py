"""The book's client and server inside a real federated-learning stack: Flower.

Flower (``flwr``, Beutel et al., 2020) runs federated rounds between a
``ServerApp`` and many ``ClientApp`` instances; its simulation engine runs
the clients in Ray actors on one machine, and the ``ServerApp`` in the
calling process. This module plugs the book's threat model into it:

* :func:`client_app`: every client holds one private batch (``true_batch``)
  and answers the server's training request with
  :func:`gilib.client.client_update` on a selection of parameters
  (:func:`gilib.selection.select`): the gradient (FedSGD) or, for a
  :class:`gilib.client.FedAvg` client, the weight difference after ``E``
  local steps divided by ``lr * E`` (McMahan et al., AISTATS 2017). Its
  reply carries those arrays and, in the clear, the batch's labels and
  token counts: what LAMP's threat model grants the server.
* :class:`CuriousFedAvg`: Flower's ``FedAvg`` strategy, honest but curious.
  It aggregates as usual (the weighted mean of the replies, applied to the
  global weights) and hands what it received, as a
  :class:`~gilib.update.SharedUpdate`, to a callback: that is where the
  server runs gilib's attacks.
* secure aggregation: with ``secure=True`` the round runs Flower's SecAgg+
  workflow and client mod (Bell et al., CCS 2020): each client masks its
  quantised reply, and the server can unmask only the weighted mean over
  all clients. The callback then receives one message, the mean update,
  with every client's lengths and labels; for FedSGD clients it is the
  gradient of all their sentences together, one big batch.
* LoRA clients (Hu et al., ICLR 2022): with ``lora=LoraRecipe(...)``
  (:class:`gilib.lora.LoraRecipe`) the server and every client build the
  same LoRA victim (seeded adapters, the public warm-up), the selection
  names adapters (``"lora", 0``, ``"lora.A", 0``, ...), and each reply is
  the adapters' update, computed by the same
  :func:`gilib.client.client_update` (FedSGD, :class:`~gilib.client.FedAvg`
  or one-or-more :class:`~gilib.client.AdamW` steps); the frozen base
  weights never travel.
* :func:`global_model`: the model the server holds at the start of the
  first round (what an attack in its hook reads), built as the clients
  build it.
* :func:`run_round`: one simulation, sandboxed: telemetry off, Flower's and
  Ray's files in a temporary folder that is removed afterwards, Flower's
  and Ray's log lines silenced unless asked for, Ray shut down (a test
  checks that no process survives), and a failing start or client turned
  into a clear error or a logged skip.

Flower is an optional dependency of gilib (``pip install
"flwr[simulation]"``); ``make`` installs it for chapter 6.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import re
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch

try:
    from flwr.client import ClientApp, NumPyClient
    from flwr.client.mod import secaggplus_mod
    from flwr.common import Context, ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.server import LegacyContext, ServerApp, ServerAppComponents, ServerConfig
    from flwr.server.strategy import FedAvg as FlowerFedAvg
    from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
    from flwr.simulation import run_simulation
except ImportError as err:  # pragma: no cover - the message is the point
    raise ImportError(
        'gilib.federated needs Flower and its simulation engine: pip install "flwr[simulation]" '
        "(make installs it; Ray needs Python 3.11 or newer)."
    ) from err

from .client import AdamW, FedAvg, Protocol, client_update
from .data import environment
from .lora import LoraRecipe
from .models import cached_model, encode
from .secure import SecAgg
from .selection import select
from .update import SharedUpdate

log = logging.getLogger(__name__)

SERVER_LR = 1e-4
"""The server's learning rate for FedSGD rounds (``theta -= SERVER_LR * mean gradient``)."""


@dataclass(frozen=True)
class Reply:
    """What the server holds after a round: one client's reply, or the securely aggregated mean.

    Attributes:
        round: the server round (from 1).
        client: the client's partition number, or ``None`` for the
            aggregate of a secure round.
        clients: how many clients' replies it holds (1, or all of a secure
            round's).
        update: the message as every gilib attack takes it; its tensors are
            the arrays Flower delivered, on the CPU.
        num_examples: the sentences behind it.
    """

    round: int
    client: int | None
    clients: int
    update: SharedUpdate
    num_examples: int


@dataclass
class FederatedRun:
    """The outcome of :func:`run_round`.

    Attributes:
        replies: every :class:`Reply` the server received, in arrival order.
        skipped: one line per client that sent no reply (its error).
        global_weights: the selection's global weights after the last round.
        seconds: wall-clock seconds of the simulation (Ray's start included).
        secure: whether the rounds ran Flower's SecAgg+.
        temp_dir: the folder that held Flower's and Ray's files (removed).
        log: Flower's warnings and errors of the run, kept when ``quiet``
            hides them.
    """

    replies: list[Reply]
    skipped: list[str]
    global_weights: list[torch.Tensor]
    seconds: float
    secure: bool
    temp_dir: str = ""
    log: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class _ClientSpec:
    """What every client process needs to rebuild its side (picklable, for Ray)."""

    model: str
    component: str
    layers: object
    protocol: Protocol
    batches: tuple[tuple[tuple[str, int], ...], ...]
    seed: int
    secure: bool = False
    lora: LoraRecipe | None = None


def _victim(model: str, seed: int, lora: LoraRecipe | None) -> torch.nn.Module:
    """The global model as the server and every client build it: the plain victim, or its LoRA victim.

    The plain victim is the shared cached model (callers copy it before
    training); a LoRA victim is a new model, rebuilt from its recipe.
    """
    pristine, _ = cached_model(model, seed)
    return pristine if lora is None else lora.victim(pristine)


def global_model(model: str = "minilm", *, seed: int = 0, lora: LoraRecipe | None = None) -> torch.nn.Module:
    """The global model the server of :func:`run_round` holds at the start of round 1: what its attacks read.

    :func:`run_round`'s server and every client build this model, each in
    its own process: the server sends the selection's weights of it, and
    each client trains from them. A curious server's ``on_reply`` hook
    attacks a round-1 reply with this model (a LoRA victim's adapters
    after the recipe's warm-up, which moved ``B``, and the frozen weights
    that never travel). After round 1 the selection's weights move;
    :attr:`FederatedRun.global_weights` holds them after the last round.

    Args:
        model: the victim's name, as in :func:`run_round`.
        seed: the seed of :func:`run_round` (the victim's fresh weights).
        lora: ``None`` (the plain victim) or the round's
            :class:`gilib.lora.LoraRecipe`.

    Returns:
        A new model in ``eval()`` mode (never the shared cached victim):
        changing it changes no round.

    Raises:
        ValueError: for a ``lora`` that is not a :class:`~gilib.lora.LoraRecipe`,
            or a recipe that does not fit the model (:func:`gilib.lora.lora_victim`).
        RuntimeError: for a model name that cannot be loaded here
            (:func:`gilib.models.load_model` names the offline choices).
    """
    _check_lora(lora)
    victim = _victim(model, seed, lora)
    return copy.deepcopy(victim) if lora is None else victim


def _check_lora(lora) -> None:
    if lora is not None and not isinstance(lora, LoraRecipe):
        raise ValueError(f"lora must be None or a gilib.lora.LoraRecipe(targets, r, alpha, layers, seed, warmup), "
                         f"got {lora!r}.")


def client_batches(batches: Sequence[Sequence]) -> tuple[tuple[tuple[str, int], ...], ...]:
    """Each client's private batch as ``((text, label), ...)``, checked.

    Args:
        batches: one batch per client; a batch is a list of
            :class:`gilib.data.Example` or ``(text, label)`` pairs.

    Raises:
        ValueError: for no clients, a client with an empty batch, an empty
            sentence or a label that is not an integer.
    """
    if len(batches) == 0:
        raise ValueError("No clients: pass one batch of sentences per client.")
    checked = []
    for i, batch in enumerate(batches):
        if isinstance(batch, (str, tuple)) and len(batch) == 2 and isinstance(batch[0], str):
            raise ValueError(f"Client {i}'s batch is one (text, label) pair: wrap it in a list, [(text, label)].")
        pairs = []
        for item in batch:
            text, label = (item.text, item.label) if hasattr(item, "text") else item
            if not isinstance(text, str) or not text.strip():
                raise ValueError(f"Client {i} holds an empty sentence: every sentence needs at least one word.")
            if isinstance(label, bool) or not isinstance(label, (int, np.integer)):
                raise ValueError(f"Client {i}'s label {label!r} is not a class index.")
            pairs.append((text, int(label)))
        if not pairs:
            raise ValueError(
                f"Client {i} has an empty batch: it has nothing to train on. Give every client at least one "
                f"sentence, or leave it out of the round."
            )
        checked.append(tuple(pairs))
    return tuple(checked)


class _VictimClient(NumPyClient):
    """One client: loads the global weights of the selection, trains on its batch, replies with its update."""

    def __init__(self, spec: _ClientSpec, partition: int) -> None:
        self.spec = spec
        self.partition = partition

    def fit(self, parameters, config):
        torch.set_num_threads(1)
        _, tokenizer = cached_model(self.spec.model, self.spec.seed)
        model = _victim(self.spec.model, self.spec.seed, self.spec.lora)
        if self.spec.lora is None:
            model = copy.deepcopy(model)  # the cached model is shared; a LoRA victim is already a copy
        selection = select(model, self.spec.component, self.spec.layers)
        with torch.no_grad():
            for p, array in zip(selection.parameters(model), parameters):
                p.copy_(torch.from_numpy(np.asarray(array)).to(p.dtype))
        texts, labels = zip(*self.spec.batches[self.partition])
        true_batch = encode(tokenizer, list(texts), list(labels),
                            max_tokens=model.config.max_position_embeddings)
        shared = client_update(model, selection, true_batch, self.spec.protocol).shared
        metrics = {"client": self.partition, "labels": json.dumps([int(y) for y in shared.labels]),
                   "lengths": json.dumps([int(n) for n in shared.lengths])}
        # SecAgg+ quantises in the arrays' own dtype: float32 would keep only 24 of its 30 bits.
        dtype = np.float64 if self.spec.secure else None
        return [g.cpu().numpy().astype(dtype) for g in shared.shared_grads], len(texts), metrics


def client_app(
    batches: Sequence[Sequence],
    component: str = "attention.query",
    layers=0,
    *,
    model: str = "minilm",
    protocol: Protocol = None,
    secure: bool = False,
    seed: int = 0,
    lora: LoraRecipe | None = None,
) -> ClientApp:
    """The ClientApp of a round: client ``i`` (Flower's ``partition-id``) holds ``batches[i]``.

    Each client loads ``model`` (seeded with ``seed``, as the server does),
    sets the selection's weights to the global ones it receives, and replies
    with :func:`gilib.client.client_update` under ``protocol``: one array
    per parameter of the selection, the batch's size, and its labels and
    token counts as JSON in the reply's metrics. With ``secure`` it runs
    Flower's SecAgg+ client mod and sends float64 arrays.

    Args:
        batches, component, layers, model, protocol, secure, seed, lora: as
            in :func:`run_round`, which builds this app.

    Raises:
        ValueError: for no clients or a client with an empty batch
            (:func:`client_batches`).
    """
    spec = _ClientSpec(model, component, layers, protocol, client_batches(batches), seed, secure, lora)

    def client_fn(context: Context):
        return _VictimClient(spec, int(context.node_config["partition-id"])).to_client()

    return ClientApp(client_fn=client_fn, mods=[secaggplus_mod] if secure else None)


class CuriousFedAvg(FlowerFedAvg):
    """Flower's FedAvg that aggregates as usual and shows each reply to a callback.

    The replies are updates (gradients, or FedAvg's normalised weight
    differences), so the aggregate is their weighted mean, and the global
    weights move by ``server_lr`` times it.

    Args:
        initial: the selection's global weights, as NumPy arrays.
        on_reply: called with every :class:`Reply`, in the ServerApp's
            thread of the calling process.
        secure: the round runs SecAgg+: every result then holds the same
            unmasked mean, which the callback receives once.
        server_lr: the step the server takes along the mean update.
        clients: how many clients each round waits for.
    """

    def __init__(self, initial: list[np.ndarray], on_reply: Callable[[Reply], None], *, secure: bool,
                 server_lr: float, clients: int) -> None:
        super().__init__(fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=clients,
                         min_available_clients=clients, min_evaluate_clients=0,
                         initial_parameters=ndarrays_to_parameters(initial))
        self.weights = [np.array(a, copy=True) for a in initial]
        self.on_reply = on_reply
        self.secure = secure
        self.server_lr = server_lr
        self.skipped: list[str] = []

    def aggregate_fit(self, server_round, results, failures):
        for failure in failures:
            self.skipped.append(f"round {server_round}: a client sent no reply ({_reason(failure)}); skipped")
            log.warning(self.skipped[-1])
        if not results:
            return None, {}
        replies = [(fit_res.metrics, fit_res.num_examples, parameters_to_ndarrays(fit_res.parameters))
                   for _, fit_res in results]
        if self.secure:
            # Every result carries the same unmasked mean; only the metrics differ.
            metrics = sorted((m for m, _, _ in replies), key=lambda m: m["client"])
            self.on_reply(_reply(server_round, None, len(replies), replies[0][2],
                                 [y for m in metrics for y in json.loads(m["labels"])],
                                 [n for m in metrics for n in json.loads(m["lengths"])],
                                 sum(n for _, n, _ in replies)))
        else:
            for metrics, n, arrays in replies:
                self.on_reply(_reply(server_round, int(metrics["client"]), 1, arrays, json.loads(metrics["labels"]),
                                     json.loads(metrics["lengths"]), n))
        mean, aggregated_metrics = super().aggregate_fit(server_round, results, failures)
        # Flower averages in float64; the global weights keep the model's dtype.
        self.weights = [(w - self.server_lr * u).astype(w.dtype)
                        for w, u in zip(self.weights, parameters_to_ndarrays(mean))]
        return ndarrays_to_parameters(self.weights), aggregated_metrics


def _reason(failure) -> str:
    """The client's own error message out of what Flower and Ray wrapped around it."""
    text = str(failure if isinstance(failure, BaseException) else getattr(failure[1], "status", failure))
    found = re.findall(r"occurred\. Message: (.+?)(?:'>|\n|$)", text, flags=re.S)
    return found[-1].strip() if found else text.strip().splitlines()[-1][:300]


def _reply(server_round, client, clients, arrays, labels, lengths, num_examples) -> Reply:
    grads = [torch.from_numpy(np.array(a, dtype=np.float32, copy=True)) for a in arrays]
    return Reply(server_round, client, clients, SharedUpdate(grads, labels, lengths), num_examples)


def run_round(
    batches: Sequence[Sequence],
    component: str = "attention.query",
    layers=0,
    *,
    model: str = "minilm",
    protocol: Protocol = None,
    secure: bool = False,
    secagg: SecAgg = SecAgg(),
    on_reply: Callable[[Reply], None] | None = None,
    rounds: int = 1,
    server_lr: float | None = None,
    seed: int = 0,
    lora: LoraRecipe | None = None,
    timeout: float = 600.0,
    quiet: bool = True,
    actors: int = 1,
) -> FederatedRun:
    """Run federated rounds in Flower's simulation, the server curious.

    Args:
        batches: one private batch per client (:func:`client_batches`).
        component, layers: the selection the clients share
            (:func:`gilib.selection.select`), e.g. ``"attention.query", 0``
            or ``"layer", 0``; with ``lora``, an adapter selection such as
            ``"lora", 0`` or ``"lora.A", 0``.
        model: the victim every client and the server load (seed ``seed``).
        protocol: ``None`` (FedSGD: the gradient), :class:`gilib.client.FedAvg`
            (E local SGD steps) or :class:`gilib.client.AdamW` (E local
            AdamW steps; the message is the weight difference over
            ``lr * E``, which the server may invert with
            :meth:`~gilib.client.AdamW.gradient` at ``E = 1``).
        secure: run Flower's SecAgg+ (the server sees only the mean).
        secagg: its settings.
        on_reply: called with every :class:`Reply` as it arrives (the
            attack's hook); every reply is also in the result.
        rounds: federated rounds.
        server_lr: the server's step along the mean update; default: FedAvg's or AdamW's
            ``lr * E`` (the mean of the clients' local models), else
            :data:`SERVER_LR`.
        seed: seeds the victim's fresh weights and the quantisation's
            rounding.
        lora: ``None`` (the plain victim) or a :class:`gilib.lora.LoraRecipe`:
            the server and every client train that LoRA victim, and each
            reply is its adapters' update (the selection must name
            adapters). The server's global model is ``lora.victim(...)`` of
            the seeded model: :func:`global_model` gives it, to attack.
        timeout: seconds a round waits for its clients.
        quiet: silence Flower's and Ray's log lines.
        actors: Ray actors that run the clients, each one client at a time
            (at most one per client). Every actor is a process that first
            imports torch, transformers and gilib and loads the victim, a
            few seconds of CPU each: one actor runs the book's rounds
            (clients of one batch and a few local steps) about as fast
            as two on an idle machine and faster beside other work
            (``bench/flower_actors.py``). More pay off where each client
            trains for longer than that start, on spare cores.

    Returns:
        A :class:`FederatedRun`.

    Raises:
        ValueError: for an unknown model, selection or protocol, no clients
            or a client with an empty batch, fewer than 2 clients with
            ``secure``, fewer than 1 round or actor, a ``lora`` that is not a
            :class:`~gilib.lora.LoraRecipe`, or, on a LoRA victim, a
            selection without adapters.
        RuntimeError: if the simulation could not run (Ray failed to start)
            or no client replied; the message says which.
    """
    if not isinstance(rounds, int) or isinstance(rounds, bool) or rounds < 1:
        raise ValueError(f"rounds must be a whole number of at least 1, got {rounds!r}.")
    if not isinstance(actors, int) or isinstance(actors, bool) or actors < 1:
        raise ValueError(f"actors must be a whole number of at least 1, got {actors!r}.")
    if protocol is not None and not isinstance(protocol, (FedAvg, AdamW)):
        raise ValueError(f"A Flower client runs FedSGD (protocol=None) or FedAvg(local_steps, lr) or "
                         f"AdamW(local_steps, lr), got {protocol!r}.")
    _check_lora(lora)
    checked = client_batches(batches)
    if secure and len(checked) < 2:
        raise ValueError("Secure aggregation needs at least 2 clients: with one, the mean is its own reply.")
    server_model = _victim(model, seed, lora)
    selection = select(server_model, component, layers)
    if lora is not None and any(not p.requires_grad for p in selection.parameters(server_model)):
        raise ValueError(f"The selection {selection.label} holds frozen weights of the LoRA victim: a LoRA client "
                         f"shares its adapters alone. Select them, e.g. component='lora', layers=0.")
    if server_lr is None:
        local = isinstance(protocol, (FedAvg, AdamW))
        server_lr = protocol.lr * protocol.local_steps if local else SERVER_LR
    replies: list[Reply] = []
    callback_errors: list[BaseException] = []

    def receive(reply: Reply) -> None:
        replies.append(reply)
        if on_reply is not None:
            try:
                on_reply(reply)
            except Exception as err:  # re-raised after the simulation, which would only log it
                callback_errors.append(err)

    initial = [p.detach().cpu().numpy().copy() for p in selection.parameters(server_model)]
    strategy = CuriousFedAvg(initial, receive, secure=secure, server_lr=server_lr, clients=len(checked))
    server = _server_app(strategy, rounds, timeout, secure, secagg, max(map(len, checked)))
    start = time.perf_counter()
    with _sandbox(quiet) as (temp_dir, lines):
        backend = {"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                   # Each client asks for one CPU: Ray's CPU count is how many actors it starts.
                   "init_args": {"num_cpus": min(actors, len(checked)),
                                 "_temp_dir": os.path.join(temp_dir, "ray"),
                                 "logging_level": logging.ERROR if quiet else logging.INFO,
                                 "log_to_driver": not quiet}}
        try:
            np.random.seed(seed)  # SecAgg+ rounds stochastically with NumPy's global generator
            clients = client_app(checked, component, layers, model=model, protocol=protocol, secure=secure,
                                 seed=seed, lora=lora)
            run_simulation(server_app=server, client_app=clients, num_supernodes=len(checked),
                           backend_config=backend)
        except SystemExit as err:
            raise RuntimeError(
                f"Flower's simulation exited ({err.code}) before the round ran: Ray could not start here. "
                f"Check that 'ray' is installed (pip install \"flwr[simulation]\") and that this machine lets "
                f"Ray start its local processes."
            ) from None
    if callback_errors:
        raise callback_errors[0]
    if not replies:
        raise RuntimeError(
            "The round ended without a single reply from the clients"
            + (f" ({'; '.join(strategy.skipped)})" if strategy.skipped else
               ": Ray's actors did not run the clients (run with quiet=False to see Flower's and Ray's log)")
            + "."
        )
    return FederatedRun(replies=replies, skipped=list(strategy.skipped),
                        global_weights=[torch.from_numpy(w) for w in strategy.weights],
                        seconds=time.perf_counter() - start, secure=secure, temp_dir=temp_dir, log=lines)


def _server_app(strategy: CuriousFedAvg, rounds: int, timeout: float, secure: bool, secagg: SecAgg,
                max_batch: int) -> ServerApp:
    config = ServerConfig(num_rounds=rounds, round_timeout=timeout)
    if not secure:
        return ServerApp(server_fn=lambda context: ServerAppComponents(strategy=strategy, config=config))
    app = ServerApp()

    @app.main()
    def main(grid, context) -> None:
        workflow = SecAggPlusWorkflow(
            # Shares and threshold as proportions of the clients (Flower's integer form needs more than 2).
            num_shares=1.0, reconstruction_threshold=secagg.reconstruction_threshold,
            max_weight=secagg.max_weight or max_batch, clipping_range=secagg.clipping_range,
            quantization_range=secagg.quantization_range, modulus_range=secagg.modulus_range, timeout=timeout)
        DefaultWorkflow(fit_workflow=workflow)(grid, LegacyContext(context=context, config=config, strategy=strategy))

    return app


class _Collect(logging.Handler):
    def __init__(self, lines: list[str]) -> None:
        super().__init__(logging.WARNING)
        self.lines = lines

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@contextlib.contextmanager
def _sandbox(quiet: bool):
    """Telemetry off, Flower's and Ray's files in a temporary folder (removed), their logs quiet."""
    temp_dir = tempfile.mkdtemp(prefix="gilib-fl-")  # short: Ray's socket paths must stay under 107 characters
    settings = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_HOME": os.path.join(temp_dir, "flwr"),
                "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0", "RAY_DEDUP_LOGS": "0"}
    with environment(settings):
        try:
            with _quiet_logs(quiet) as lines:
                yield temp_dir, lines
        finally:
            shutil.rmtree(temp_dir, ignore_errors=True)


@contextlib.contextmanager
def _quiet_logs(quiet: bool):
    """Flower's log records collected (the ``with`` value: a list of lines); with ``quiet``, nothing printed."""
    flwr_log = logging.getLogger("flwr")
    level, propagate = flwr_log.level, flwr_log.propagate
    # Ray's import logs, in a notebook, that ipywidgets is missing: not the reader's concern.
    ray_widgets = logging.getLogger("ray.widgets.util")
    ray_level = ray_widgets.level
    if quiet:
        ray_widgets.setLevel(logging.WARNING)
    lines: list[str] = []
    collector = _Collect(lines)
    flwr_log.addHandler(collector)
    handlers = [h for h in flwr_log.handlers if h is not collector]
    if quiet:
        # Flower's records would otherwise reach the root logger's handlers (which
        # some libraries configure at DEBUG).
        flwr_log.propagate = False
        for h in handlers:
            flwr_log.removeHandler(h)
    try:
        with warnings.catch_warnings():
            if quiet:
                warnings.simplefilter("ignore")
            yield lines
    finally:
        flwr_log.removeHandler(collector)
        if quiet:
            for h in handlers:
                flwr_log.addHandler(h)
        flwr_log.setLevel(level)
        flwr_log.propagate = propagate
        ray_widgets.setLevel(ray_level)
