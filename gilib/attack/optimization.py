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
model, the shared gradients, the selection, the labels and the lengths.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Callable, NamedTuple, Sequence

import numpy as np
import torch
from torch.func import grad_and_value, vmap
from tqdm import tqdm

from ..slicing import Selection
from . import ghost
from .objectives import OBJECTIVES, GradientMatcher, Target
from .tokens import TokenSpace

Prior = Callable[[Sequence[int]], float]
"""A language-model prior: token ids of one sentence (no special tokens) to a
score, lower meaning more natural (e.g. mean negative log-likelihood)."""


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
        lr_decay: factor applied every ``lr_decay_every`` steps.
        lr_decay_every: steps between decays.
        init_candidates: random starts scored before optimising.
        reg_weight: weight of the embedding-norm regulariser.
        tag_l1_weight: weight of TAG's L1 term.
        swap_every: steps between reordering rounds (0 disables them).
        swap_burnin: fraction of ``steps`` before the first round.
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
        batched: the fast path: score random starts and reorderings in
            batched ``vmap`` calls, optimise all clients of
            :func:`attack_clients` in one batched step, and look up nearest
            tokens only when reordering and at the end. ``False`` runs the
            plain path, the reference's algorithm step by step (sequential
            starts and reorderings, a nearest-token lookup every step); both
            return the same tokens.
        ghost: on the fast path, compute cosine and L2 distances from
            per-token activations instead of per-candidate gradients
            (:mod:`gilib.attack.ghost`; BERT-family classifiers), which is
            several times cheaper for large selections and gives the same
            losses up to round-off. Ignored where unsupported.
        chunk_size: candidates per batched call; ``None`` picks one from
            the selection's and the model's size to bound memory.
        progress: show a tqdm bar.
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
                f"Unknown objective '{self.objective}'. Choose one of: {', '.join(OBJECTIVES)}."
            )
        if self.polish_rounds < 0:
            raise ValueError(f"polish_rounds must be 0 (off) or more, got {self.polish_rounds}.")
        for name in ("steps", "init_candidates", "lr_decay_every", "swap_candidates", "polish_top_k"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}.")
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}.")


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


class SharedUpdate(NamedTuple):
    """What the server holds about one client: its gradient, labels and lengths.

    Attributes:
        shared_grads: one tensor per name of the attacked selection.
        labels: ``(B,)`` class labels.
        lengths: B token counts, ``[CLS]`` and ``[SEP]`` included.
    """

    shared_grads: Sequence[torch.Tensor]
    labels: Sequence[int] | torch.Tensor
    lengths: Sequence[int]


def optimization_attack(
    model: torch.nn.Module,
    tokenizer,
    shared_grads: Sequence[torch.Tensor],
    selection: Selection,
    labels: Sequence[int] | torch.Tensor,
    lengths: Sequence[int],
    config: AttackConfig | None = None,
    *,
    prior: Prior | None = None,
) -> AttackResult:
    """Rebuild one client's batch of sentences from the gradient of a selection.

    Args:
        model: the victim, as the server holds it (``eval()`` mode).
        tokenizer: its tokenizer (for the special tokens and decoding).
        shared_grads: the gradient the client shared, one tensor per name
            in ``selection.names``.
        selection: which parameters ``shared_grads`` belong to.
        labels: ``(B,)`` class labels of the batch.
        lengths: B token counts, ``[CLS]`` and ``[SEP]`` included.
        config: attack settings (defaults: :class:`AttackConfig`).
        prior: optional language-model prior for the reordering rounds.

    Returns:
        An :class:`AttackResult`.

    Raises:
        ValueError: if the gradients do not fit the selection, or labels
            and lengths disagree.
    """
    update = SharedUpdate(shared_grads, labels, lengths)
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
    """
    cfg = config or AttackConfig()
    start = time.perf_counter()
    if not updates:
        raise ValueError("No client updates given: pass at least one SharedUpdate.")
    params = selection.parameters(model)
    for update in updates:
        _check_update(params, update, selection, model)
    if len({len(u.lengths) for u in updates}) > 1:
        raise ValueError("Clients attacked together must have the same batch size; attack them in groups.")

    device = next(model.parameters()).device
    space = TokenSpace(model, tokenizer)
    width = max(max(int(n) for n in u.lengths) for u in updates)
    layouts = [_Layout(u.lengths, width, tokenizer, space, device) for u in updates]
    matcher = GradientMatcher(model, selection.names, cfg.objective, cfg.tag_l1_weight)
    matcher = matcher.matched([u.shared_grads for u in updates])
    targets = [
        matcher.target(
            [g.to(device) for g in u.shared_grads],
            selection.names,
            torch.as_tensor(u.labels, dtype=torch.long, device=device),
            layout.attention_mask,
        )
        for u, layout in zip(updates, layouts)
    ]
    fast = None
    if cfg.batched and cfg.ghost and ghost.supports(model, matcher.names, cfg.objective):
        fast = ghost.GhostMatcher(model, matcher.names, cfg.objective)
        chunk = cfg.chunk_size or _ghost_chunk(model.config, len(layouts[0].lengths), width)
    else:
        chunk = cfg.chunk_size or _auto_chunk(sum(t.numel() for t in targets[0].shared_grads), width, space.dim)
    engine = _Engine(matcher, space, cfg, chunk, prior, fast)
    timings = {"init": 0.0, "optimisation": 0.0, "reordering": 0.0, "polish": 0.0}

    tic = time.perf_counter()
    gens = [torch.Generator().manual_seed(cfg.seed + i) for i in range(len(updates))]
    rngs = [np.random.RandomState(cfg.seed + i) for i in range(len(updates))]
    x = torch.stack([engine.best_start(layout, target, gen) for layout, target, gen in zip(layouts, targets, gens)])
    timings["init"] += time.perf_counter() - tic

    x.requires_grad_(True)
    # One Adam over the stacked clients is N independent Adams: its update
    # is elementwise, and the learning-rate schedule is the same for all.
    opt = torch.optim.Adam([x], lr=cfg.lr)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=cfg.lr_decay_every, gamma=cfg.lr_decay)
    first_swap = int(cfg.swap_burnin * cfg.steps)
    history = []
    for step in tqdm(range(cfg.steps), disable=not cfg.progress, desc=f"attack ({cfg.objective})"):
        if cfg.swap_every and step >= first_swap and step > 0 and step % cfg.swap_every == 0:
            tic = time.perf_counter()
            with torch.no_grad():
                for i, (layout, target, rng) in enumerate(zip(layouts, targets, rngs)):
                    x[i] = engine.reorder(x[i].detach(), layout, target, rng)
            timings["reordering"] += time.perf_counter() - tic
        tic = time.perf_counter()
        x.grad, rec = engine.step_gradients(x.detach(), layouts, targets)
        if cfg.grad_clip is not None:
            norms = x.grad.flatten(1).norm(dim=1).clamp_min(1e-12)
            x.grad *= (cfg.grad_clip / norms).clamp(max=1.0).view(-1, *[1] * (x.dim() - 1))
        opt.step()
        sched.step()
        history.append(rec.detach())
        timings["optimisation"] += time.perf_counter() - tic

    history = torch.stack(history).cpu()  # (steps, N): one device sync, at the end
    tic = time.perf_counter()
    final_ids = [engine.polish(x[i].detach(), layout, target) for i, (layout, target) in enumerate(zip(layouts, targets))]
    timings["polish"] += time.perf_counter() - tic
    seconds = (time.perf_counter() - start) / len(updates)
    results = []
    for i, (layout, target) in enumerate(zip(layouts, targets)):
        ids = final_ids[i]
        final = matcher.loss(space.embed(ids), target).item()
        rows = [row[:n] for row, n in zip(ids.tolist(), layout.lengths)]
        results.append(
            AttackResult(
                texts=[space.decode(row) for row in rows],
                token_ids=rows,
                loss_history=history[:, i].tolist(),
                final_loss=final,
                seconds=seconds,
                seconds_per_step=seconds / cfg.steps,
                method=f"optimization/{cfg.objective}",
                config=asdict(cfg),
                timings={k: v / len(updates) for k, v in timings.items()},
            )
        )
    return results


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


class _Engine:
    """The attack's three costly operations, on the fast or the plain path."""

    def __init__(self, matcher: GradientMatcher, space: TokenSpace, cfg: AttackConfig, chunk: int, prior,
                 fast: "ghost.GhostMatcher | None" = None) -> None:
        self.matcher, self.space, self.cfg, self.chunk, self.prior = matcher, space, cfg, chunk, prior
        self.fast = fast  # ghost scoring, where the model and objective allow it
        self._step = grad_and_value(self._objective, has_aux=True)
        self._batched_step = vmap(self._step)
        self._stacked = None

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

    def step_gradients(self, x, layouts, targets) -> tuple[torch.Tensor, torch.Tensor]:
        """Gradient of every client's objective with respect to its embeddings.

        Returns:
            ``(N, B, T, d)`` gradients and ``(N,)`` reconstruction losses.
        """
        if self.cfg.batched:
            if self._stacked is None:  # the clients' constants, stacked once
                self._stacked = (
                    torch.stack([layout.fixed for layout in layouts]),
                    torch.stack([layout.free for layout in layouts]),
                    Target(
                        tuple(torch.stack(g) for g in zip(*(t.shared_grads for t in targets))),
                        torch.stack([t.labels for t in targets]),
                        torch.stack([t.mask for t in targets]),
                    ),
                )
            if self.fast is not None:
                return self._ghost_step(x, *self._stacked)
            grads, (_, rec) = self._batched_step(x, *self._stacked)
            return grads, rec
        grads, recs = [], []
        for i, (layout, target) in enumerate(zip(layouts, targets)):
            # The reference looks up the nearest tokens of every position at
            # every step; the plain path keeps that cost to measure it.
            self.space.nearest(x[i])
            g, (_, rec) = self._step(x[i], layout.fixed, layout.free, target)
            grads.append(g)
            recs.append(rec)
        return torch.stack(grads), torch.stack(recs)

    def _ghost_step(self, x, fixed, free, target: Target) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`step_gradients` from per-token activations: all clients in one forward and backward."""
        x = x.detach().requires_grad_(True)
        embeds = torch.where(free[..., None], x, fixed)
        rec = self.fast.losses(embeds, target, per_candidate_target=True, create_graph=True)
        reg = self._norm_regulariser(embeds, free)
        # Clients are independent, so the gradient of the sum is each client's own.
        (grads,) = torch.autograd.grad((rec + self.cfg.reg_weight * reg).sum(), x)
        return grads, rec.detach()

    def _scores(self, candidates: torch.Tensor, target: Target) -> torch.Tensor:
        """Losses of ``(K, B, T, d)`` candidates: one batched call, or one at a time."""
        if self.cfg.batched:
            return (self.fast or self.matcher).score(candidates, target, chunk_size=self.chunk)
        with torch.no_grad():
            return torch.stack([self.matcher.loss(c, target) for c in candidates])

    def best_start(self, layout: _Layout, target: Target, gen: torch.Generator) -> torch.Tensor:
        """The lowest-loss of ``init_candidates`` Gaussian starts, ``(B, T, d)``.

        Each start is scaled so that its expected norm matches the mean norm
        of the vocabulary's embeddings. Starts are drawn one by one, at the
        client's own width, so that the draws do not depend on the path or
        on the other clients.
        """
        batch, width, dim = layout.fixed.shape
        scale = self.space.mean_norm / dim**0.5
        starts = torch.zeros(self.cfg.init_candidates, batch, width, dim)
        for k in range(self.cfg.init_candidates):
            starts[k, :, : layout.own_width] = torch.randn(batch, layout.own_width, dim, generator=gen) * scale
        starts = starts.to(layout.fixed.device)
        best = int(self._scores(layout.compose(starts), target).argmin())
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
            scores = self._scores(layout.compose(candidates), target)
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

        A round scores, in one batched call, every sentence that differs from
        the current one in a single free position, taking one of that
        position's ``polish_top_k`` nearest tokens, and keeps the best if it
        beats the current score (reconstruction loss on the discrete tokens,
        plus ``prior_weight`` times the prior). With ``polish_rounds=0`` this
        is the plain projection.

        Returns:
            ``(B, T)`` token ids, known tokens included.
        """
        ids = layout.compose_ids(self.space.nearest(x))
        if not self.cfg.polish_rounds:
            return ids
        options = self.space.nearest(x, k=self.cfg.polish_top_k)  # (B, T, k)
        slots = [(b, t) for b in range(ids.shape[0]) for t in range(*layout.interior(b).indices(ids.shape[1]))]

        def score(candidates: torch.Tensor) -> torch.Tensor:
            scores = self._scores(self.space.embed(candidates), target)
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


def _check_update(params, update: SharedUpdate, selection: Selection, model) -> None:
    shared_grads, labels, lengths = update
    if len(shared_grads) != len(params):
        raise ValueError(
            f"Got {len(shared_grads)} gradient tensors for a selection of {len(params)} "
            f"({selection.label}); pass the gradient of exactly that selection."
        )
    for name, p, g in zip(selection.names, params, shared_grads):
        if tuple(g.shape) != tuple(p.shape):
            raise ValueError(
                f"The gradient for {name} has shape {tuple(g.shape)}, the parameter {tuple(p.shape)}."
            )
    if len(lengths) == 0:
        raise ValueError("No sentence lengths given: pass one length per sentence of the batch.")
    if len(labels) != len(lengths):
        raise ValueError(f"Got {len(labels)} labels for {len(lengths)} sentence lengths; pass one of each per sentence.")
    max_tokens = model.config.max_position_embeddings
    for n in lengths:
        if not 3 <= int(n) <= max_tokens:
            raise ValueError(
                f"A sentence length of {n} tokens is impossible here: lengths count [CLS] and "
                f"[SEP], so they lie between 3 and {max_tokens} for this model."
            )
