"""The engines of the optimisation attack: where its costly operations run.

:func:`gilib.attack.optimization_attack` lays every client's problem out as
a :class:`Problem` (which positions are known and which searched, what the
client sent) and hands it to an :class:`Engine`, which provides the two
costly operations, every client's objective gradient
(:meth:`Engine.step_gradients`) and the losses of many candidates for one
client (:meth:`Engine.scores`); the random starts, LAMP's reordering rounds
and the polishing are built on those two, identically for every engine:

* :class:`FastEngine`: batched ``vmap`` calls, all clients in one step, and
  "ghost" scoring from per-token activations where it applies
  (:mod:`gilib.attack.ghost`);
* :class:`PlainEngine`: the reference's algorithm step by step, one
  candidate and one client at a time.

Both give the same tokens (``tests/attack/test_fast_path.py``). A subclass
may change how an operation is computed and pass itself to
:func:`gilib.attack.attack_clients` (``engine=``): ``bench/reference_comparison.py``
does, to run the paper's reference code's choices through the same loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch
from torch.func import grad_and_value, vmap

from . import ghost
from .objectives import GradientMatcher, Target
from .priors import Prior
from .tokens import TokenSpace

if TYPE_CHECKING:  # annotations only: the config module does not need the engines
    from .config import AttackConfig


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
    layouts: list["Layout"]
    targets: list[Target]

    @property
    def clients(self) -> list[tuple["Layout", Target]]:
        """``(layout, target)`` of every client, in order."""
        return list(zip(self.layouts, self.targets))



class Layout:
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



class Engine:
    """The attack's costly operations for a :class:`Problem`; subclasses say how to compute them.

    A subclass provides :meth:`step_gradients` (every client's objective
    gradient) and :meth:`scores` (the losses of many candidates for one
    client); the random starts, reordering rounds and polishing are built
    on them here, identically for every engine.
    """

    def __init__(self, problem: Problem, cfg: "AttackConfig", prior: Prior | None = None) -> None:
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

    def best_start(self, layout: Layout, target: Target, gen: torch.Generator) -> torch.Tensor:
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

    def reorder(self, x: torch.Tensor, layout: Layout, target: Target, rng: np.random.RandomState) -> torch.Tensor:
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

    def _prior_penalty(self, ids: torch.Tensor, layout: Layout) -> float:
        """The prior's score of ``(B, T)`` token ids, summed over sentences (0 without a prior)."""
        if self.prior is None:
            return 0.0
        return sum(self.prior(ids[b, layout.interior(b)].tolist()) for b in range(ids.shape[0]))

    def polish(self, x: torch.Tensor, layout: Layout, target: Target) -> torch.Tensor:
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

    def __init__(self, problem: Problem, cfg: "AttackConfig", prior: Prior | None = None) -> None:
        super().__init__(problem, cfg, prior)
        batch, width = problem.layouts[0].free.shape
        models = getattr(self.matcher, "models", [problem.model])  # each round's model (RoundsMatcher)
        if cfg.ghost and all(ghost.supports(m, self.matcher.names, cfg.objective) for m in models):
            ghosts = [ghost.GhostMatcher(m, self.matcher.names, cfg.objective, cfg.precision) for m in models]
            self.ghost_matcher = ghosts[0] if len(ghosts) == 1 else ghost.RoundsGhostMatcher(ghosts)
            self.chunk = cfg.chunk_size or _ghost_chunk(problem.model.config, batch, width)
        else:
            self.ghost_matcher = None
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
        if self.ghost_matcher is not None:
            return self._ghost_step(x)
        grads, (_, rec) = self._batched_step(x, self._fixed, self._free, self._target)
        return grads, rec

    def _ghost_step(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`step_gradients` from per-token activations: all clients in one forward and backward."""
        x = x.detach().requires_grad_(True)
        embeds = torch.where(self._free[..., None], x, self._fixed)
        rec = self.ghost_matcher.losses(embeds, self._target, per_candidate_target=True, create_graph=True)
        reg = self._norm_regulariser(embeds, self._free)
        # Clients are independent, so the gradient of the sum is each client's own.
        (grads,) = torch.autograd.grad((rec + self.cfg.reg_weight * reg).sum(), x)
        return grads, rec.detach()

    def scores(self, candidates: torch.Tensor, target: Target) -> torch.Tensor:
        """Losses of ``(K, B, T, d)`` candidates in batched calls of ``chunk`` candidates."""
        return (self.ghost_matcher or self.matcher).score(candidates, target, chunk_size=self.chunk)


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
