"""The optimisation attack: search input embeddings whose gradient matches the shared one.

This is LAMP's attack (Balunovic et al., "LAMP: Extracting Text from
Gradients with Language Model Priors", NeurIPS 2022) as Li, Xu and Dras
(EMNLP 2024) run it on partial gradients:

1. **Initialise**: draw ``init_candidates`` random embedding sequences and
   keep the one with the lowest reconstruction loss.
2. **Optimise** the embeddings of the free positions with Adam and a step
   learning-rate decay, minimising the gradient distance (cos / L2 / TAG,
   see :mod:`gilib.attack.objectives`) plus LAMP's embedding-norm
   regulariser ``(mean_i ||x_i|| - mean_v ||e_v||)^2``, which keeps the
   embeddings at the scale of real words.
3. **Reorder**: every ``swap_every`` steps after a burn-in, try token
   swaps, token moves, span moves and prefix-to-end rotations and keep the
   order with the lowest reconstruction loss (plus, when a language-model
   prior is given, ``prior_weight`` times the prior's score).
4. **Project** each embedding to the nearest vocabulary token by cosine.
5. **Polish** (optional, beyond the paper; off in :meth:`AttackConfig.paper`):
   greedy token substitutions among each position's ``polish_top_k``
   nearest tokens, keeping a substitution only when it lowers the same
   score the reordering rounds use, on the discrete tokens.

The selection may be any part of the model, LoRA adapters included (Hu et
al., ICLR 2022; a victim from :func:`gilib.lora.lora_victim`): with
``select(victim, "lora", 0)``, ``"lora.A"``, ``"lora.query.B"``, ... the
candidate's gradient is taken with respect to the adapters' ``A`` and ``B``
(the frozen base weights are constants of the forward, as the client's
are), and the attack differentiates that gradient with respect to the
dummy embeddings like any other. Ghost scoring covers adapters too: peft's
``lora_A`` and ``lora_B`` are linear layers the forward calls
(:mod:`gilib.attack.ghost`).

The ``[CLS]`` / ``[SEP]`` tokens and each sentence's length are known to the
attacker and held fixed. A GPT-2-style decoder's client trains on the
next-token loss, whose labels are the text itself: a candidate's gradient
is taken at the labels its own nearest words give
(:class:`~gilib.attack.objectives.GradientMatcher`), so the attack runs on
a decoder unchanged, with no labels in the message. The attack receives only what the server has: the
model, the selection and the client's message, a
:class:`~gilib.update.SharedUpdate` (gradients, labels, lengths).

**Several rounds** (:func:`optimization_rounds_attack`): a server that sent
the same client a different global model in each of ``k`` rounds and got
back each round's message of the same batch (a LoRA client whose adapters
the other clients move between rounds, chapter 7) matches all of them at
once: the objective is the mean over rounds of the gradient distance, each
round's candidate gradient taken at that round's model
(:class:`~gilib.attack.objectives.RoundsMatcher`). Everything else (starts,
steps, reordering, polish) is the one-round attack's, on that objective;
one round gives exactly :func:`optimization_attack`'s result.

:func:`attack_clients` is three steps: check the messages and lay out
every client's problem, run the random starts, Adam steps and reordering
rounds, then project, polish and report. Between them an engine does the
costly work (:mod:`gilib.attack.engines`): :class:`~gilib.attack.engines.FastEngine`
(batched ``vmap`` calls, all clients in one step) or
:class:`~gilib.attack.engines.PlainEngine` (the reference's algorithm, one
candidate and one client at a time); both give the same tokens. The
settings are an :class:`~gilib.attack.config.AttackConfig`; the result an
:class:`~gilib.attack.result.AttackResult` whose diagnostics hold the loss
at every step.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import asdict, dataclass
from typing import Iterator, NamedTuple, Sequence

import numpy as np
import torch
from tqdm import tqdm

from ..models import is_decoder
from ..selection import Selection
from ..update import SharedUpdate, checked_update
from .config import AttackConfig, checked_config
from .engines import Engine, FastEngine, Layout, PlainEngine, Problem
from .objectives import GradientMatcher, RoundsMatcher
from .priors import Prior
from .result import AttackResult, OptimizationDiagnostics
from .tokens import TokenSpace

TIMINGS = ("init", "optimization", "reordering", "polish")
"""The phases :attr:`AttackResult.timings` reports, in seconds."""


class Round(NamedTuple):
    """One round the server observed: the global model it sent and the client's message computed at it.

    Attributes:
        model: the global model of the round, as the server sent it (``eval()`` mode).
        update: the client's :class:`~gilib.update.SharedUpdate` of that round.
    """

    model: torch.nn.Module
    update: SharedUpdate


def optimization_attack(
    model: torch.nn.Module,
    tokenizer,
    update: SharedUpdate,
    selection: Selection,
    config: AttackConfig | None = None,
    *,
    prior: Prior | None = None,
) -> AttackResult:
    """Rebuild one client's batch of sentences from the gradient of a selection.

    Args:
        model: the victim, as the server holds it (``eval()`` mode).
        tokenizer: its tokenizer (for the special tokens and decoding).
        update: what the client sent (gradients of ``selection``, labels,
            lengths), e.g. ``gilib.client.client_update(...).shared``.
        selection: which parameters the gradients belong to.
        config: attack settings (defaults: :class:`AttackConfig`).
        prior: optional language-model prior for the reordering rounds.

    Returns:
        An :class:`AttackResult`.

    Raises:
        TypeError: if ``update`` is not a :class:`~gilib.update.SharedUpdate`.
        ValueError: if the update does not fit the model and the selection
            (:meth:`~gilib.update.SharedUpdate.validated`: tensor count,
            shape, dtype, device, NaN or infinite values, an all-zero
            gradient, lengths, labels), or carries no labels (a classifier's;
            a decoder's message has none, and needs none).
    """
    return attack_clients(model, tokenizer, [update], selection, config, prior=prior)[0]


def optimization_rounds_attack(
    tokenizer,
    rounds: Sequence[Round],
    selection: Selection,
    config: AttackConfig | None = None,
    *,
    prior: Prior | None = None,
) -> AttackResult:
    """Rebuild one client's batch from its messages of several rounds, matched at once.

    Each :class:`Round` holds the global model the server sent that round
    and the client's message of the *same* batch computed at it. A
    candidate's objective is the mean over rounds of its gradient distance,
    round ``j``'s candidate gradient taken at round ``j``'s model
    (:class:`~gilib.attack.objectives.RoundsMatcher`); the embedding space
    and the token ids are the first round's (a LoRA client never trains the
    embeddings). The rounds' counterpart of
    :func:`gilib.attack.adapter_span_attack`, for LAMP's attack (Balunovic
    et al., NeurIPS 2022); with one round it is :func:`optimization_attack`.

    Args:
        tokenizer: the victim's tokenizer.
        rounds: the observed rounds, in order, at least one.
        selection: the parameters every message covers (the same names in
            every round's model).
        config: attack settings (defaults: :class:`AttackConfig`); the
            seed gives the starts and reorderings, so a seed gives one result.
        prior: optional language-model prior for the reordering rounds.

    Returns:
        An :class:`AttackResult`; ``final_loss`` and the loss history are
        the mean over rounds.

    Raises:
        TypeError: if a round is not a :class:`Round` (or its update not a
            :class:`~gilib.update.SharedUpdate`).
        ValueError: for no round; a message that does not fit its round's
            model and the selection (as :func:`optimization_attack`); rounds
            whose models hold the selection's parameters in other shapes or
            not at all; or rounds of different batches (lengths or labels).
    """
    rounds = _checked_rounds(rounds, selection)
    model = rounds[0].model
    if len(rounds) == 1:
        return optimization_attack(model, tokenizer, rounds[0].update, selection, config, prior=prior)
    start = time.perf_counter()
    cfg = checked_config(config, AttackConfig)
    problem = _prepare(model, tokenizer, [rounds[0].update], selection, cfg, later=[rounds[1:]])
    engine = (FastEngine if cfg.batched else PlainEngine)(problem, cfg, prior)
    return _finish(engine, _optimize(engine), start)[0]


def attack_clients(
    model: torch.nn.Module,
    tokenizer,
    updates: Sequence[SharedUpdate],
    selection: Selection,
    config: AttackConfig | None = None,
    *,
    prior: Prior | None = None,
    engine: type[Engine] | None = None,
) -> list[AttackResult]:
    """Rebuild the batches of several clients, attacked independently but together.

    Each client is a separate attack problem (its own gradient, start,
    optimiser state and reorderings); client ``i`` is seeded with
    ``config.seed + i``, so its result is the one :func:`optimization_attack`
    gives it alone with that seed. On the fast path the clients' steps run
    as one batched (``vmap``) call, which keeps a CPU's or GPU's arithmetic
    units busier than one small sentence can. All clients must have the
    same batch size.

    Args:
        model: the victim, as the server holds it.
        tokenizer: its tokenizer.
        updates: what each client sent.
        selection: which parameters the gradients belong to.
        config: attack settings (defaults: :class:`AttackConfig`).
        prior: optional language-model prior for the reordering rounds.
        engine: the :class:`~gilib.attack.engines.Engine` subclass that runs
            the costly operations; default :class:`~gilib.attack.engines.FastEngine`,
            or :class:`~gilib.attack.engines.PlainEngine` with
            ``config.batched=False``.

    Returns:
        One :class:`AttackResult` per client, in order.

    Raises:
        TypeError, ValueError: as :func:`optimization_attack`, for any
            update; ValueError also for no update or clients of different
            batch sizes.
    """
    start = time.perf_counter()
    cfg = checked_config(config, AttackConfig)
    if engine is not None and not (isinstance(engine, type) and issubclass(engine, Engine)):
        raise TypeError(f"engine must be a subclass of gilib.attack.engines.Engine, got {engine!r}.")
    problem = _prepare(model, tokenizer, updates, selection, cfg)
    engine = (engine or (FastEngine if cfg.batched else PlainEngine))(problem, cfg, prior)
    return _finish(engine, _optimize(engine), start)


# --------------------------------------------------------------------------
# The three steps of an attack
# --------------------------------------------------------------------------


@dataclass
class _Run:
    """Where the optimisation left every client.

    Attributes:
        x: ``(N, B, T, d)`` the clients' final embeddings.
        history: ``(steps, N)`` reconstruction losses, on the CPU.
        timings: seconds per phase (:data:`TIMINGS`), all clients together.
    """

    x: torch.Tensor
    history: torch.Tensor
    timings: dict[str, float]


def _prepare(
    model: torch.nn.Module,
    tokenizer,
    updates: Sequence[SharedUpdate],
    selection: Selection,
    cfg: AttackConfig,
    later: Sequence[Sequence[Round]] | None = None,
) -> Problem:
    """Check what the clients sent and lay out their problems.

    Every update is checked with :meth:`~gilib.update.SharedUpdate.validated`
    before anything is computed from it, so a malformed message fails here
    with a message that says what to do.

    Args:
        later: per client, its later rounds (:class:`Round`, already
            checked by :func:`_checked_rounds`), every client as many; the
            loss is then a :class:`~gilib.attack.objectives.RoundsMatcher`.

    Raises:
        TypeError: for an update that is not a :class:`~gilib.update.SharedUpdate`.
        ValueError: for no update, a malformed one, one without labels, or
            clients of different batch sizes.
    """
    if isinstance(updates, SharedUpdate):
        raise TypeError("attack_clients takes a list of updates: pass [update], or call optimization_attack.")
    if not updates:
        raise ValueError("No client updates given: pass at least one SharedUpdate.")
    updates = [_validated(update, model, selection) for update in updates]
    if len({len(u.lengths) for u in updates}) > 1:
        raise ValueError("Clients attacked together must have the same batch size; attack them in groups.")
    device = next(model.parameters()).device
    space = TokenSpace(model, tokenizer)
    width = max(max(u.lengths) for u in updates)
    layouts = [Layout(u.lengths, width, tokenizer, space, device) for u in updates]
    if later:
        # Per client its rounds' gradients; one matcher per round's model, on the tensors any round moves.
        if len({len(rs) for rs in later}) != 1 or len(later) != len(updates):
            raise ValueError("Every client attacked over rounds must come with as many later rounds.")
        models = [model, *(r.model for r in later[0])]
        matcher = RoundsMatcher([GradientMatcher(m, selection.names, cfg.objective, cfg.tag_l1_weight, space)
                                 for m in models])
        grads = [[u.shared_grads, *(r.update.shared_grads for r in rs)] for u, rs in zip(updates, later)]
        matcher = matcher.matched([g for client in grads for g in client])
    else:
        matcher = GradientMatcher(model, selection.names, cfg.objective, cfg.tag_l1_weight, space)
        matcher = matcher.matched([u.shared_grads for u in updates])
        grads = [u.shared_grads for u in updates]
    targets = [
        matcher.target(g, selection.names, u.labels, layout.attention_mask)
        for g, u, layout in zip(grads, updates, layouts)
    ]
    return Problem(model, matcher, space, layouts, targets)


def _checked_rounds(rounds: Sequence[Round], selection: Selection) -> list[Round]:
    """The rounds of one batch, checked before anything is computed from them.

    Each message is checked against its own round's model (and must carry
    labels, as :func:`optimization_attack`'s); here what rounds add: at
    least one, every model holding the selection's parameters in the first
    round's shapes, and one batch (lengths and labels) in every round.
    """
    if isinstance(rounds, Round) or not isinstance(rounds, Sequence):
        raise TypeError("rounds must be a list of gilib.attack.Round(model, update), one per observed round.")
    rounds = list(rounds)
    if not rounds:
        raise ValueError("No round given: pass at least one Round(model, update).")
    for j, r in enumerate(rounds):
        if not isinstance(r, Round):
            raise TypeError(f"rounds[{j}] must be a gilib.attack.Round(model, update), got {type(r).__name__}.")
    shapes = None
    checked = []
    for j, r in enumerate(rounds):
        params = dict(r.model.named_parameters())
        missing = [n for n in selection.names if n not in params]
        if missing:
            raise ValueError(f"Round {j}'s model has no parameter {missing[0]!r} of {selection.label}: every "
                             f"round's model must be the same architecture, adapters included.")
        own = [tuple(params[n].shape) for n in selection.names]
        if shapes is not None and own != shapes:
            bad = next(n for n, a, b in zip(selection.names, own, shapes) if a != b)
            raise ValueError(f"Round {j}'s model holds {bad!r} in another shape than round 0's "
                             f"({params[bad].shape} against {shapes[selection.names.index(bad)]}): the rounds must "
                             f"be one architecture.")
        shapes = own
        checked.append(Round(r.model, _validated(r.update, r.model, selection)))
    first = checked[0].update
    for j, r in enumerate(checked[1:], start=1):
        if list(r.update.lengths) != list(first.lengths):
            raise ValueError(f"Round {j}'s message is of sentences of lengths {list(r.update.lengths)}, round 0's "
                             f"of {list(first.lengths)}: stack the rounds of one batch only.")
        same = (first.labels is None) == (r.update.labels is None) and (
            first.labels is None or torch.equal(torch.as_tensor(first.labels).cpu(),
                                                torch.as_tensor(r.update.labels).cpu()))
        if not same:
            raise ValueError(f"Round {j}'s labels differ from round 0's: stack the rounds of one batch only.")
    return checked


def _optimize(engine: Engine) -> _Run:
    """Initialise every client, then take the Adam steps, with reordering rounds between them.

    One Adam over the stacked clients is N independent Adams: its update is
    elementwise, and the learning-rate schedule is the same for all.
    """
    cfg = engine.cfg
    timings = dict.fromkeys(TIMINGS, 0.0)
    with _timed(timings, "init"):
        x = engine.starts()
    rngs = [np.random.RandomState(cfg.seed + i) for i in range(len(x))]
    x.requires_grad_(True)
    opt = torch.optim.Adam([x], lr=cfg.lr)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=cfg.lr_decay_every, gamma=cfg.lr_decay)
    first_swap = int(cfg.swap_burnin * cfg.steps)
    history = []
    for step in tqdm(range(cfg.steps), disable=not cfg.progress, desc=f"attack ({cfg.objective})"):
        if cfg.swap_every and step >= first_swap and step > 0 and step % cfg.swap_every == 0:
            with _timed(timings, "reordering"), torch.no_grad():
                for i, ((layout, target), rng) in enumerate(zip(engine.problem.clients, rngs)):
                    x[i] = engine.reorder(x[i].detach(), layout, target, rng)
        with _timed(timings, "optimization"):
            history.append(_adam_step(engine, x, opt, sched))
    return _Run(x.detach(), torch.stack(history).cpu(), timings)  # one device sync, at the end


def _finish(engine: Engine, run: _Run, start: float) -> list[AttackResult]:
    """Project (and polish) every client's embeddings to tokens; one result per client.

    Args:
        engine: the engine that ran the optimisation.
        run: what :func:`_optimize` returned.
        start: ``time.perf_counter()`` when the attack began.
    """
    problem, cfg = engine.problem, engine.cfg
    with _timed(run.timings, "polish"):
        final_ids = [engine.polish(run.x[i], layout, target) for i, (layout, target) in enumerate(problem.clients)]
    n = len(final_ids)
    seconds = (time.perf_counter() - start) / n
    results = []
    for i, (ids, (layout, target)) in enumerate(zip(final_ids, problem.clients)):
        rows = [row[:length] for row, length in zip(ids.tolist(), layout.lengths)]
        results.append(
            AttackResult(
                texts=[problem.space.decode(row) for row in rows],
                token_ids=rows,
                final_loss=problem.matcher.loss(problem.space.embed(ids), target).item(),
                seconds=seconds,
                method=f"optimization/{cfg.objective}",
                config=asdict(cfg),
                timings={k: v / n for k, v in run.timings.items()},
                diagnostics=OptimizationDiagnostics(run.history[:, i].tolist(), seconds / cfg.steps),
            )
        )
    return results


def _validated(update: SharedUpdate, model: torch.nn.Module, selection: Selection) -> SharedUpdate:
    """One client's message, checked and in canonical form, with labels (the attack needs them)."""
    update = checked_update(update, model, selection)
    if update.labels is None and not is_decoder(model):  # a decoder's labels are its candidates' own words
        raise ValueError(
            "The optimisation attack needs the batch's labels (the candidate's gradient is taken at them); "
            "the update has none. Pass the labels the server knows, one per sentence."
        )
    return update


def _adam_step(engine: Engine, x: torch.Tensor, opt: torch.optim.Optimizer, sched) -> torch.Tensor:
    """One step of every client: gradients, optional clipping, Adam, schedule; ``(N,)`` losses."""
    x.grad, rec = engine.step_gradients(x.detach())
    clip = engine.cfg.grad_clip
    if clip is not None:
        norms = x.grad.flatten(1).norm(dim=1).clamp_min(1e-12)
        x.grad *= (clip / norms).clamp(max=1.0).view(-1, *[1] * (x.dim() - 1))
    opt.step()
    sched.step()
    return rec.detach()


@contextlib.contextmanager
def _timed(timings: dict[str, float], phase: str) -> Iterator[None]:
    """Add the seconds the block takes to ``timings[phase]``."""
    tic = time.perf_counter()
    try:
        yield
    finally:
        timings[phase] += time.perf_counter() - tic
