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

The ``[CLS]`` / ``[SEP]`` tokens and each sentence's length are known to the
attacker and held fixed. The attack receives only what the server has: the
model, the shared gradients, the selection, the labels and the lengths.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
from tqdm import tqdm

from ..slicing import Selection
from .objectives import OBJECTIVES, GradientMatcher
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
        grad_clip: clip the embeddings' gradient norm (``None``: off).
        seed: seeds initialisation and reordering.
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
    grad_clip: float | None = None
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ValueError(
                f"Unknown objective '{self.objective}'. Choose one of: {', '.join(OBJECTIVES)}."
            )
        for name in ("steps", "init_candidates", "lr_decay_every"):
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
        seconds: wall-clock time of the whole attack.
        seconds_per_step: ``seconds`` divided by the optimisation steps.
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
    """Rebuild a batch of sentences from the gradient of a selection.

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
    cfg = config or AttackConfig()
    start = time.perf_counter()
    device = next(model.parameters()).device
    params = selection.parameters(model)
    _check_inputs(params, shared_grads, selection, labels, lengths, model)

    space = TokenSpace(model, tokenizer)
    labels = torch.as_tensor(labels, dtype=torch.long, device=device)
    layout = _Layout(lengths, tokenizer, space, device)
    matcher = GradientMatcher(
        model,
        params,
        [g.to(device) for g in shared_grads],
        labels,
        layout.attention_mask,
        cfg.objective,
        cfg.tag_l1_weight,
    )
    gen = torch.Generator().manual_seed(cfg.seed)
    rng = np.random.RandomState(cfg.seed)

    x = _best_random_start(matcher, layout, space, cfg.init_candidates, gen)
    x.requires_grad_(True)
    opt = torch.optim.Adam([x], lr=cfg.lr)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=cfg.lr_decay_every, gamma=cfg.lr_decay)
    first_swap = int(cfg.swap_burnin * cfg.steps)
    history: list[float] = []

    for step in tqdm(range(cfg.steps), disable=not cfg.progress, desc=f"attack ({cfg.objective})"):
        if cfg.swap_every and step >= first_swap and step > 0 and step % cfg.swap_every == 0:
            reordered = _reorder(x.detach(), matcher, layout, space, cfg, rng, prior)
            with torch.no_grad():
                x.copy_(reordered)
        opt.zero_grad(set_to_none=True)
        embeds = layout.compose(x)
        rec = matcher.loss(embeds, create_graph=True)
        reg = (embeds[layout.free].norm(dim=-1).mean() - space.mean_norm).square()
        (rec + cfg.reg_weight * reg).backward()
        if cfg.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_([x], cfg.grad_clip)
        opt.step()
        sched.step()
        history.append(rec.item())

    ids = layout.compose_ids(space.nearest(x.detach()))
    final = matcher.loss(space.embed(ids), create_graph=False).item()
    seconds = time.perf_counter() - start
    return AttackResult(
        texts=[space.decode(row[:n]) for row, n in zip(ids.tolist(), layout.lengths)],
        token_ids=[row[:n] for row, n in zip(ids.tolist(), layout.lengths)],
        loss_history=history,
        final_loss=final,
        seconds=seconds,
        seconds_per_step=seconds / cfg.steps,
        method=f"optimization/{cfg.objective}",
        config=asdict(cfg),
    )


class _Layout:
    """Which positions of the ``(B, T)`` batch are known and which are searched.

    Position 0 is ``[CLS]``, position ``L_b - 1`` is ``[SEP]`` and positions
    past ``L_b`` are ``[PAD]``; the rest are free.
    """

    def __init__(self, lengths: Sequence[int], tokenizer, space: TokenSpace, device) -> None:
        self.lengths = [int(n) for n in lengths]
        batch, width = len(self.lengths), max(self.lengths)
        ids = torch.full((batch, width), tokenizer.pad_token_id, dtype=torch.long)
        self.free = torch.zeros(batch, width, dtype=torch.bool)
        for b, n in enumerate(self.lengths):
            ids[b, 0] = tokenizer.cls_token_id
            ids[b, n - 1] = tokenizer.sep_token_id
            self.free[b, 1 : n - 1] = True
        self.fixed_ids = ids.to(device)
        self.free = self.free.to(device)
        self.attention_mask = (torch.arange(width)[None, :] < torch.tensor(self.lengths)[:, None]).long().to(device)
        self.fixed = space.embed(self.fixed_ids)

    def compose(self, x: torch.Tensor) -> torch.Tensor:
        """Free positions from ``x``, the rest from the known tokens: ``(B, T, d)``."""
        return torch.where(self.free[..., None], x, self.fixed)

    def compose_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """Free positions from ``ids``, the rest from the known tokens: ``(B, T)``."""
        return torch.where(self.free, ids, self.fixed_ids)

    def interior(self, b: int) -> slice:
        """The free positions of sentence ``b``."""
        return slice(1, self.lengths[b] - 1)


def _best_random_start(
    matcher: GradientMatcher, layout: _Layout, space: TokenSpace, candidates: int, gen: torch.Generator
) -> torch.Tensor:
    """The lowest-loss of ``candidates`` Gaussian starts, ``(B, T, d)``.

    Each start is scaled so that its expected norm matches the mean norm of
    the vocabulary's embeddings.
    """
    shape = layout.fixed.shape
    scale = space.mean_norm / space.dim**0.5
    best, best_loss = None, float("inf")
    for _ in range(candidates):
        x = (torch.randn(shape, generator=gen) * scale).to(layout.fixed.device)
        loss = matcher.loss(layout.compose(x), create_graph=False).item()
        if loss < best_loss:
            best, best_loss = x, loss
    return best


def _reorder(
    x: torch.Tensor,
    matcher: GradientMatcher,
    layout: _Layout,
    space: TokenSpace,
    cfg: AttackConfig,
    rng: np.random.RandomState,
    prior: Prior | None,
) -> torch.Tensor:
    """One LAMP reordering round: keep, per sentence, the best of random reorderings.

    Candidates permute the continuous embeddings; the prior, when given,
    scores the nearest tokens of the permuted sentence.
    """
    for b in range(x.shape[0]):
        span = layout.interior(b)
        n = span.stop - span.start
        if n < 2:
            continue
        ids = space.nearest(x[b, span]).tolist()
        best_x, best_score = x, None
        for k in range(cfg.swap_candidates):
            perm = np.arange(n) if k == 0 else _random_reorder(n, k, rng)
            cand = x.clone()
            cand[b, span] = x[b, span][torch.as_tensor(perm)]
            score = matcher.loss(layout.compose(cand), create_graph=False).item()
            if prior is not None:
                score += cfg.prior_weight * prior([ids[i] for i in perm])
            if best_score is None or score < best_score:
                best_x, best_score = cand, score
        x = best_x
    return x


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


def _check_inputs(params, shared_grads, selection, labels, lengths, model) -> None:
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
