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
from typing import Iterator, Sequence

import numpy as np
import torch
from tqdm import tqdm

from ..models import is_decoder
from ..selection import Selection
from ..update import SharedUpdate, checked_update
from .config import AttackConfig, checked_config
from .engines import Engine, FastEngine, Layout, PlainEngine, Problem
from .objectives import GradientMatcher
from .priors import Prior
from .result import AttackResult, OptimizationDiagnostics
from .tokens import TokenSpace

TIMINGS = ("init", "optimization", "reordering", "polish")
"""The phases :attr:`AttackResult.timings` reports, in seconds."""


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
) -> Problem:
    """Check what the clients sent and lay out their problems.

    Every update is checked with :meth:`~gilib.update.SharedUpdate.validated`
    before anything is computed from it, so a malformed message fails here
    with a message that says what to do.

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
    matcher = GradientMatcher(model, selection.names, cfg.objective, cfg.tag_l1_weight, space)
    matcher = matcher.matched([u.shared_grads for u in updates])
    targets = [
        matcher.target(u.shared_grads, selection.names, u.labels, layout.attention_mask)
        for u, layout in zip(updates, layouts)
    ]
    return Problem(model, matcher, space, layouts, targets)


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
