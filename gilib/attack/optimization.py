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

The ``[CLS]`` / ``[SEP]`` tokens and each sentence's length are known to the
attacker and held fixed. The attack receives only what the server has: the
model, the selection and the client's message, a
:class:`~gilib.slicing.SharedUpdate` (gradients, labels, lengths).

:func:`attack_clients` is three steps, each a function of this module:
:func:`prepare` (check the messages, lay out every client's problem),
:func:`optimise` (random starts, Adam steps and reordering rounds) and
:func:`finish` (projection, polishing, results). Between them an engine does
the costly work: :class:`FastEngine` (batched ``vmap`` calls, all clients in
one step) or :class:`PlainEngine` (the reference's algorithm, one candidate
and one client at a time); both give the same tokens.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from torch.func import grad_and_value, vmap
from tqdm import tqdm

from ..slicing import Selection, SharedUpdate, checked_update
from . import ghost
from .objectives import OBJECTIVES, GradientMatcher, Target
from .tokens import TokenSpace

Prior = Callable[[Sequence[int]], float]
"""A language-model prior: token ids of one sentence (no special tokens) to a
score, lower meaning more natural (e.g. mean negative log-likelihood)."""

TIMINGS = ("init", "optimisation", "reordering", "polish")
"""The phases :attr:`AttackResult.timings` reports, in seconds."""


@dataclass
class AttackConfig:
    """Settings of the optimisation attack.

    The defaults are cheap settings for a CPU; the paper's are
    ``steps=2000, init_candidates=500, lr=0.01, lr_decay=0.89,
    lr_decay_every=50, reg_weight=1.0, prior_weight=0.2`` with cosine.

    Attributes:
        objective: ``"cos"`` (LAMP), ``"l2"`` (DLG) or ``"tag"`` (TAG).
        steps: Adam steps.
        lr: Adam's learning rate.
        lr_decay: factor applied every ``lr_decay_every`` steps, in (0, 1].
        lr_decay_every: steps between decays.
        init_candidates: random starts scored before optimising.
        reg_weight: weight of the embedding-norm regulariser.
        tag_l1_weight: weight of TAG's L1 term.
        swap_every: steps between reordering rounds (0 disables them).
        swap_burnin: fraction of ``steps`` before the first round, in [0, 1].
        swap_candidates: orders tried per sentence and round.
        prior_weight: weight of the language-model prior in a round.
        polish_rounds: rounds of greedy token substitution after the
            projection (0: off, as in the paper). Each round scores every
            single substitution among the ``polish_top_k`` nearest tokens of
            every free position and applies the best one, if it lowers the
            loss.
        polish_top_k: alternatives per position in a polishing round.
        grad_clip: clip the embeddings' gradient norm (``None``: off).
        seed: seeds initialisation and reordering (client ``i`` of a
            multi-client attack uses ``seed + i``).
        batched: the fast path (:class:`FastEngine`): score random starts
            and reorderings in batched ``vmap`` calls, optimise all clients
            of :func:`attack_clients` in one batched step, and look up
            nearest tokens only when reordering and at the end. ``False``
            runs the plain path (:class:`PlainEngine`), the reference's
            algorithm step by step (sequential starts, reorderings and
            clients); both return the same tokens.
        ghost: on the fast path, compute cosine and L2 distances from
            per-token activations instead of per-candidate gradients
            (:mod:`gilib.attack.ghost`; BERT-family classifiers), which is
            several times cheaper for large selections and gives the same
            losses up to round-off. Ignored where unsupported.
        chunk_size: candidates per batched call; ``None`` picks one from
            the selection's and the model's size to bound memory.
        progress: show a tqdm bar.

    Raises:
        ValueError: for an unknown objective, a count that is not a whole
            number (a bool or a float) or is below its minimum, a weight or
            rate that is not a finite number in its range (NaN, infinite,
            negative, a zero learning rate), or a switch that is not a bool.
    """

    objective: str = "cos"
    steps: int = 200
    lr: float = 0.01
    lr_decay: float = 0.89
    lr_decay_every: int = 50
    init_candidates: int = 20
    reg_weight: float = 1.0
    tag_l1_weight: float = 0.01
    swap_every: int = 75
    swap_burnin: float = 0.1
    swap_candidates: int = 40
    prior_weight: float = 0.2
    polish_rounds: int = 0
    polish_top_k: int = 8
    grad_clip: float | None = None
    seed: int = 0
    batched: bool = True
    ghost: bool = True
    chunk_size: int | None = None
    progress: bool = True

    @classmethod
    def paper(cls, **overrides) -> "AttackConfig":
        """The settings Li et al. (2024) ran, after LAMP's BERT settings."""
        settings = dict(
            objective="cos", steps=2000, lr=0.01, lr_decay=0.89, lr_decay_every=50,
            init_candidates=500, reg_weight=1.0, swap_every=75, swap_burnin=0.1,
            swap_candidates=200, prior_weight=0.2, polish_rounds=0,
        )
        return cls(**{**settings, **overrides})

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ValueError(
                f"Unknown objective {self.objective!r}. Choose one of: {', '.join(OBJECTIVES)}."
            )
        for name in ("steps", "init_candidates", "lr_decay_every", "swap_candidates", "polish_top_k"):
            self._whole(name, 1)
        self._whole("swap_every", 0, " (0 turns reordering off)")
        self._whole("polish_rounds", 0, " (0 turns polishing off)")
        self._whole("seed", 0, maximum=2**31 - 1)  # NumPy's RandomState takes seed + i < 2**32
        if self.chunk_size is not None:
            self._whole("chunk_size", 1, " (or None to pick one)")
        for name, (rule, in_range) in _REAL_RANGES.items():
            if name != "grad_clip" or self.grad_clip is not None:
                self._real(name, rule, in_range)
        for name in ("batched", "ghost", "progress"):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}.")
            setattr(self, name, bool(getattr(self, name)))

    def _whole(self, name: str, minimum: int, hint: str = "", maximum: int | None = None) -> None:
        """Check that setting ``name`` is a whole number in ``minimum .. maximum``; store it as an int."""
        value = getattr(self, name)
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
            raise ValueError(f"{name} must be a whole number, got {value!r} ({type(value).__name__}).")
        if value < minimum:
            raise ValueError(f"{name} must be at least {minimum}{hint}, got {value}.")
        if maximum is not None and value > maximum:
            raise ValueError(f"{name} must be at most {maximum}, got {value}.")
        setattr(self, name, int(value))

    def _real(self, name: str, rule: str, in_range: Callable[[float], bool]) -> None:
        """Check that setting ``name`` is a finite real number for which ``in_range`` holds."""
        value = getattr(self, name)
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real) \
                or not math.isfinite(value) or not in_range(value):
            raise ValueError(f"{name} must be a finite number {rule}, got {value!r}.")


_REAL_RANGES: dict[str, tuple[str, Callable[[float], bool]]] = {
    "lr": ("greater than 0", lambda v: v > 0),
    "lr_decay": ("in (0, 1] (1: no decay)", lambda v: 0 < v <= 1),
    "reg_weight": ("of at least 0", lambda v: v >= 0),
    "tag_l1_weight": ("of at least 0", lambda v: v >= 0),
    "prior_weight": ("of at least 0", lambda v: v >= 0),
    "swap_burnin": ("in [0, 1] (a fraction of the steps)", lambda v: 0 <= v <= 1),
    "grad_clip": ("greater than 0 (or None: off)", lambda v: v > 0),
}
"""The real-valued settings of :class:`AttackConfig`: what each must be, and the check."""


@dataclass
class AttackResult:
    """What an attack rebuilt, and what it cost.

    Attributes:
        texts: one reconstructed sentence per input, without special tokens.
        token_ids: the reconstructed token ids, ``[CLS]`` and ``[SEP]``
            included, one list per sentence (its known length).
        loss_history: reconstruction loss at every optimisation step.
        final_loss: reconstruction loss of the returned tokens.
        seconds: wall-clock time of the attack, per client when several
            clients were attacked together.
        seconds_per_step: ``seconds`` divided by the optimisation steps.
        timings: seconds spent in initialisation, optimisation,
            reordering and polishing (per client, like ``seconds``).
        method: a short name of the attack.
        config: the settings it ran with.
    """

    texts: list[str]
    token_ids: list[list[int]]
    loss_history: list[float]
    final_loss: float
    seconds: float
    seconds_per_step: float
    method: str = "optimization"
    config: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)


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
        TypeError: if ``update`` is not a :class:`~gilib.slicing.SharedUpdate`.
        ValueError: if the update does not fit the model and the selection
            (:meth:`~gilib.slicing.SharedUpdate.validated`: tensor count,
            shape, dtype, device, NaN or infinite values, an all-zero
            gradient, lengths, labels), or carries no labels.
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

    Returns:
        One :class:`AttackResult` per client, in order.

    Raises:
        TypeError, ValueError: as :func:`optimization_attack`, for any
            update; ValueError also for no update or clients of different
            batch sizes.
    """
    start = time.perf_counter()
    cfg = AttackConfig() if config is None else config
    if not isinstance(cfg, AttackConfig):
        raise TypeError(f"config must be an AttackConfig (or None for the defaults), got a {type(cfg).__name__}.")
    problem = prepare(model, tokenizer, updates, selection, cfg)
    engine = (FastEngine if cfg.batched else PlainEngine)(problem, cfg, prior)
    return finish(engine, optimise(engine), start)


# --------------------------------------------------------------------------
# The three steps of an attack
# --------------------------------------------------------------------------


@dataclass
class Problem:
    """Every client's attack problem, checked and laid out for an engine.

    Attributes:
        model: the victim.
        matcher: the reconstruction loss, over the tensors that carry a
            direction (:meth:`GradientMatcher.matched`).
        space: the victim's token space.
        layouts: per client, which positions are known and which searched.
        targets: per client, what it sent, in the form the loss consumes.
    """

    model: torch.nn.Module
    matcher: GradientMatcher
    space: TokenSpace
    layouts: list["_Layout"]
    targets: list[Target]

    @property
    def clients(self) -> list[tuple["_Layout", Target]]:
        """``(layout, target)`` of every client, in order."""
        return list(zip(self.layouts, self.targets))


@dataclass
class Run:
    """Where the optimisation left every client.

    Attributes:
        x: ``(N, B, T, d)`` the clients' final embeddings.
        history: ``(steps, N)`` reconstruction losses, on the CPU.
        timings: seconds per phase (:data:`TIMINGS`), all clients together.
    """

    x: torch.Tensor
    history: torch.Tensor
    timings: dict[str, float]


def prepare(
    model: torch.nn.Module,
    tokenizer,
    updates: Sequence[SharedUpdate],
    selection: Selection,
    cfg: AttackConfig,
) -> Problem:
    """Check what the clients sent and lay out their problems.

    Every update is checked with :meth:`~gilib.slicing.SharedUpdate.validated`
    before anything is computed from it, so a malformed message fails here
    with a message that says what to do.

    Raises:
        TypeError: for an update that is not a :class:`~gilib.slicing.SharedUpdate`.
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
    layouts = [_Layout(u.lengths, width, tokenizer, space, device) for u in updates]
    matcher = GradientMatcher(model, selection.names, cfg.objective, cfg.tag_l1_weight)
    matcher = matcher.matched([u.shared_grads for u in updates])
    targets = [
        matcher.target(u.shared_grads, selection.names, u.labels, layout.attention_mask)
        for u, layout in zip(updates, layouts)
    ]
    return Problem(model, matcher, space, layouts, targets)


def optimise(engine: "Engine") -> Run:
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
        with _timed(timings, "optimisation"):
            history.append(_adam_step(engine, x, opt, sched))
    return Run(x.detach(), torch.stack(history).cpu(), timings)  # one device sync, at the end


def finish(engine: "Engine", run: Run, start: float) -> list[AttackResult]:
    """Project (and polish) every client's embeddings to tokens; one result per client.

    Args:
        engine: the engine that ran the optimisation.
        run: what :func:`optimise` returned.
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
                loss_history=run.history[:, i].tolist(),
                final_loss=problem.matcher.loss(problem.space.embed(ids), target).item(),
                seconds=seconds,
                seconds_per_step=seconds / cfg.steps,
                method=f"optimization/{cfg.objective}",
                config=asdict(cfg),
                timings={k: v / n for k, v in run.timings.items()},
            )
        )
    return results


def _validated(update: SharedUpdate, model: torch.nn.Module, selection: Selection) -> SharedUpdate:
    """One client's message, checked and in canonical form, with labels (the attack needs them)."""
    update = checked_update(update, model, selection)
    if update.labels is None:
        raise ValueError(
            "The optimisation attack needs the batch's labels (the candidate's gradient is taken at them); "
            "the update has none. Pass the labels the server knows, one per sentence."
        )
    return update


def _adam_step(engine: "Engine", x: torch.Tensor, opt: torch.optim.Optimizer, sched) -> torch.Tensor:
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


class _Layout:
    """Which positions of one client's ``(B, T)`` batch are known and which are searched.

    Position 0 is ``[CLS]``, position ``L_b - 1`` is ``[SEP]`` and positions
    past ``L_b`` are ``[PAD]`` (also past the client's own longest sentence,
    when clients of different lengths are attacked together); the rest are
    free.
    """

    def __init__(self, lengths: Sequence[int], width: int, tokenizer, space: TokenSpace, device) -> None:
        self.lengths = [int(n) for n in lengths]
        self.own_width = max(self.lengths)
        batch = len(self.lengths)
        ids = torch.full((batch, width), tokenizer.pad_token_id, dtype=torch.long)
        free = torch.zeros(batch, width, dtype=torch.bool)
        for b, n in enumerate(self.lengths):
            ids[b, 0] = tokenizer.cls_token_id
            ids[b, n - 1] = tokenizer.sep_token_id
            free[b, 1 : n - 1] = True
        self.fixed_ids = ids.to(device)
        self.free = free.to(device)
        self.attention_mask = (torch.arange(width)[None, :] < torch.tensor(self.lengths)[:, None]).long().to(device)
        self.fixed = space.embed(self.fixed_ids)

    def compose(self, x: torch.Tensor) -> torch.Tensor:
        """Free positions from ``x``, the rest from the known tokens: ``(..., B, T, d)``."""
        return torch.where(self.free[..., None], x, self.fixed)

    def compose_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """Free positions from ``ids``, the rest from the known tokens: ``(B, T)``."""
        return torch.where(self.free, ids, self.fixed_ids)

    def interior(self, b: int) -> slice:
        """The free positions of sentence ``b``."""
        return slice(1, self.lengths[b] - 1)


# --------------------------------------------------------------------------
# Engines: the costly operations, on the fast or the plain path
# --------------------------------------------------------------------------


class Engine:
    """The attack's costly operations for a :class:`Problem`; subclasses say how to compute them.

    A subclass provides :meth:`step_gradients` (every client's objective
    gradient) and :meth:`scores` (the losses of many candidates for one
    client); the random starts, reordering rounds and polishing are built
    on them here, identically for every engine.
    """

    def __init__(self, problem: Problem, cfg: AttackConfig, prior: Prior | None = None) -> None:
        self.problem, self.cfg, self.prior = problem, cfg, prior
        self.matcher, self.space = problem.matcher, problem.space
        self._step = grad_and_value(self._objective, has_aux=True)

    def step_gradients(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Gradient of every client's objective with respect to its embeddings ``(N, B, T, d)``.

        Returns:
            ``(N, B, T, d)`` gradients and ``(N,)`` reconstruction losses.
        """
        raise NotImplementedError

    def scores(self, candidates: torch.Tensor, target: Target) -> torch.Tensor:
        """Reconstruction losses of ``(K, B, T, d)`` candidates for one client: ``(K,)``."""
        raise NotImplementedError

    def _objective(self, x, fixed, free, target: Target):
        """Reconstruction loss plus LAMP's embedding-norm regulariser, for one client."""
        embeds = torch.where(free[..., None], x, fixed)
        rec = self.matcher.loss(embeds, target)
        return rec + self.cfg.reg_weight * self._norm_regulariser(embeds, free), rec

    def _norm_regulariser(self, embeds: torch.Tensor, free: torch.Tensor) -> torch.Tensor:
        """LAMP's ``(mean_i ||x_i|| - mean_v ||e_v||)^2`` over the free positions of ``(..., B, T, d)``.

        One value per leading index (per client). Written without boolean
        indexing so that vmap can trace it.
        """
        mean_norm = (embeds.norm(dim=-1) * free).flatten(-2).sum(-1) / free.flatten(-2).sum(-1)
        return (mean_norm - self.space.mean_norm).square()

    def starts(self) -> torch.Tensor:
        """Every client's best random start, ``(N, B, T, d)``; client ``i`` drawn with seed ``seed + i``."""
        gens = [torch.Generator().manual_seed(self.cfg.seed + i) for i in range(len(self.problem.layouts))]
        return torch.stack([self.best_start(layout, target, gen)
                            for (layout, target), gen in zip(self.problem.clients, gens)])

    def best_start(self, layout: _Layout, target: Target, gen: torch.Generator) -> torch.Tensor:
        """The lowest-loss of ``init_candidates`` Gaussian starts, ``(B, T, d)``.

        Each start is scaled so that its expected norm matches the mean norm
        of the vocabulary's embeddings. Starts are drawn one by one, at the
        client's own width, so that the draws do not depend on the engine or
        on the other clients.
        """
        batch, width, dim = layout.fixed.shape
        scale = self.space.mean_norm / dim**0.5
        starts = torch.zeros(self.cfg.init_candidates, batch, width, dim)
        for k in range(self.cfg.init_candidates):
            starts[k, :, : layout.own_width] = torch.randn(batch, layout.own_width, dim, generator=gen) * scale
        starts = starts.to(layout.fixed.device)
        best = int(self.scores(layout.compose(starts), target).argmin())
        return starts[best]

    def reorder(self, x: torch.Tensor, layout: _Layout, target: Target, rng: np.random.RandomState) -> torch.Tensor:
        """One LAMP reordering round for one client: per sentence, the best of random reorderings.

        Candidates permute the continuous embeddings; the prior, when given,
        scores the nearest tokens of the permuted sentence. Candidate 0 is
        the current order.
        """
        for b in range(x.shape[0]):
            span = layout.interior(b)
            n = span.stop - span.start
            if n < 2:
                continue
            perms = [np.arange(n)] + [_random_reorder(n, k, rng) for k in range(1, self.cfg.swap_candidates)]
            candidates = x.expand(len(perms), *x.shape).clone()
            for k, perm in enumerate(perms):
                candidates[k, b, span] = x[b, span][torch.as_tensor(perm)]
            scores = self.scores(layout.compose(candidates), target)
            if self.prior is not None:
                ids = self.space.nearest(x[b, span]).tolist()
                penalty = [self.prior([ids[i] for i in perm]) for perm in perms]
                scores = scores + self.cfg.prior_weight * torch.tensor(penalty, device=scores.device)
            x = candidates[int(scores.argmin())]
        return x

    def _prior_penalty(self, ids: torch.Tensor, layout: _Layout) -> float:
        """The prior's score of ``(B, T)`` token ids, summed over sentences (0 without a prior)."""
        if self.prior is None:
            return 0.0
        return sum(self.prior(ids[b, layout.interior(b)].tolist()) for b in range(ids.shape[0]))

    def polish(self, x: torch.Tensor, layout: _Layout, target: Target) -> torch.Tensor:
        """Project ``(B, T, d)`` embeddings to tokens, then greedily substitute tokens.

        A round scores, in one call to :meth:`scores`, every sentence that
        differs from the current one in a single free position, taking one
        of that position's ``polish_top_k`` nearest tokens, and keeps the
        best if it beats the current score (reconstruction loss on the
        discrete tokens, plus ``prior_weight`` times the prior). With
        ``polish_rounds=0`` this is the plain projection.

        Returns:
            ``(B, T)`` token ids, known tokens included.
        """
        ids = layout.compose_ids(self.space.nearest(x))
        if not self.cfg.polish_rounds:
            return ids
        options = self.space.nearest(x, k=self.cfg.polish_top_k)  # (B, T, k)
        slots = [(b, t) for b in range(ids.shape[0]) for t in range(*layout.interior(b).indices(ids.shape[1]))]

        def score(candidates: torch.Tensor) -> torch.Tensor:
            scores = self.scores(self.space.embed(candidates), target)
            if self.prior is not None:
                penalty = [self._prior_penalty(c, layout) for c in candidates]
                scores = scores + self.cfg.prior_weight * torch.tensor(penalty, device=scores.device)
            return scores

        current = float(score(ids[None])[0])
        for _ in range(self.cfg.polish_rounds):
            candidates = []
            for b, t in slots:
                for token in options[b, t].tolist():
                    if token != int(ids[b, t]):
                        candidate = ids.clone()
                        candidate[b, t] = token
                        candidates.append(candidate)
            if not candidates:
                break
            candidates = torch.stack(candidates)
            scores = score(candidates)
            best = int(scores.argmin())
            if float(scores[best]) >= current:
                break  # a local minimum: no single substitution helps
            ids, current = candidates[best], float(scores[best])
        return ids


class FastEngine(Engine):
    """The fast path: batched ``vmap`` calls, all clients in one step, ghost scoring where it applies.

    Candidates are scored in chunks of ``chunk_size`` (or one picked to
    bound memory); with ``cfg.ghost`` and a supported model and objective,
    losses and step gradients come from per-token activations
    (:class:`~gilib.attack.ghost.GhostMatcher`).
    """

    def __init__(self, problem: Problem, cfg: AttackConfig, prior: Prior | None = None) -> None:
        super().__init__(problem, cfg, prior)
        batch, width = problem.layouts[0].free.shape
        if cfg.ghost and ghost.supports(problem.model, self.matcher.names, cfg.objective):
            self.fast = ghost.GhostMatcher(problem.model, self.matcher.names, cfg.objective)
            self.chunk = cfg.chunk_size or _ghost_chunk(problem.model.config, batch, width)
        else:
            self.fast = None
            selected = sum(t.numel() for t in problem.targets[0].shared_grads)
            self.chunk = cfg.chunk_size or _auto_chunk(selected, width, self.space.dim)
        self._batched_step = vmap(self._step)
        # The clients' constants, stacked once.
        self._fixed = torch.stack([layout.fixed for layout in problem.layouts])
        self._free = torch.stack([layout.free for layout in problem.layouts])
        self._target = Target(
            tuple(torch.stack(g) for g in zip(*(t.shared_grads for t in problem.targets))),
            torch.stack([t.labels for t in problem.targets]),
            torch.stack([t.mask for t in problem.targets]),
        )

    def step_gradients(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """All clients' gradients in one batched call (``vmap``, or ghost scoring)."""
        if self.fast is not None:
            return self._ghost_step(x)
        grads, (_, rec) = self._batched_step(x, self._fixed, self._free, self._target)
        return grads, rec

    def _ghost_step(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`step_gradients` from per-token activations: all clients in one forward and backward."""
        x = x.detach().requires_grad_(True)
        embeds = torch.where(self._free[..., None], x, self._fixed)
        rec = self.fast.losses(embeds, self._target, per_candidate_target=True, create_graph=True)
        reg = self._norm_regulariser(embeds, self._free)
        # Clients are independent, so the gradient of the sum is each client's own.
        (grads,) = torch.autograd.grad((rec + self.cfg.reg_weight * reg).sum(), x)
        return grads, rec.detach()

    def scores(self, candidates: torch.Tensor, target: Target) -> torch.Tensor:
        """Losses of ``(K, B, T, d)`` candidates in batched calls of ``chunk`` candidates."""
        return (self.fast or self.matcher).score(candidates, target, chunk_size=self.chunk)


class PlainEngine(Engine):
    """The plain path: the reference's algorithm step by step, one client and one candidate at a time."""

    def step_gradients(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each client's gradient in turn."""
        grads, recs = [], []
        for i, (layout, target) in enumerate(self.problem.clients):
            g, (_, rec) = self._step(x[i], layout.fixed, layout.free, target)
            grads.append(g)
            recs.append(rec)
        return torch.stack(grads), torch.stack(recs)

    def scores(self, candidates: torch.Tensor, target: Target) -> torch.Tensor:
        """Losses of ``(K, B, T, d)`` candidates, one at a time."""
        with torch.no_grad():
            return torch.stack([self.matcher.loss(c, target) for c in candidates])


def _auto_chunk(selected_numel: int, width: int, dim: int) -> int:
    """Candidates per batched call: per-candidate gradients of about 256 MiB in all.

    Larger chunks stop paying off once the per-candidate gradients fall out
    of cache: measured on a 2-core CPU scoring MiniLM candidates, all
    parameters (11 M) took 32 ms per candidate in chunks of 8 but 44 ms in
    chunks of 24; a 147 k-parameter weight kept improving up to 96.
    """
    per_candidate = selected_numel + 64 * width * dim  # gradient + a rough share of activations
    return int(max(1, min(128, 2**26 // per_candidate)))


def _ghost_chunk(config, batch: int, width: int) -> int:
    """Candidates per ghost-scoring call: activations of about 256 MiB in all.

    A candidate's forward keeps roughly 24 floats per token and hidden unit
    and 4 per attention score in every layer. Measured on a 2-core CPU on
    MiniLM (16 tokens, all parameters), 32 to 64 candidates per call were
    fastest (9.6 ms per candidate; 13 ms at 8).
    """
    per_layer = batch * (24 * width * config.hidden_size + 4 * config.num_attention_heads * width * width)
    return int(max(1, min(64, 2**26 // (config.num_hidden_layers * per_layer))))


def _random_reorder(n: int, kind: int, rng: np.random.RandomState) -> np.ndarray:
    """A random reordering of ``n`` tokens; ``kind % 4`` picks LAMP's move.

    0: swap two tokens; 1: move one token; 2: move a span; 3: move a prefix
    to the end.
    """
    order = list(range(n))
    move = kind % 4
    if move == 0:
        i, j = rng.randint(n, size=2)
        order[i], order[j] = order[j], order[i]
    elif move == 1:
        token = order.pop(rng.randint(n))
        order.insert(rng.randint(n), token)
    elif move == 2:
        i, j = sorted(rng.randint(n + 1, size=2))
        span, rest = order[i:j], order[:i] + order[j:]
        k = rng.randint(len(rest) + 1)
        order = rest[:k] + span + rest[k:]
    else:
        k = rng.randint(1, n)
        order = order[k:] + order[:k]
    return np.asarray(order)
