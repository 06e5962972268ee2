"""The settings of the two attacks, validated when they are made.

:class:`AttackConfig` configures the optimisation attack
(:func:`gilib.attack.optimization_attack`), :class:`SpanConfig` the exact
span check (:func:`gilib.attack.span_attack`). Both refuse, with a message
that names the setting and its range, a count that is not a whole number
(a bool or a float) or is below its minimum, a weight or rate that is not a
finite number in its range, and a switch that is not a bool; both hand
their fields to :attr:`~gilib.attack.AttackResult.config` unchanged.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Callable

import numpy as np

from .ghost import PRECISIONS
from .objectives import OBJECTIVES
from .rowspace import DEFAULT_THRESHOLD

MAX_EFFORT = 4
"""By default, a round of peeling that finds no sentence is rerun with twice
the beam, restarts and kicks, up to this factor, before the sentences left
are returned as they stand."""
BEAM = 16
"""Default width of the span check's beam search over prefixes."""


@dataclass(frozen=True)
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
        precision: ``"float32"`` (the reference's arithmetic) or
            ``"bfloat16"``: on the ghost path, the model's forward and
            backward run under bfloat16 autocast (matrix products in
            bfloat16, accumulated in float32; softmax, LayerNorm, the loss
            and the gradient distances in float32), several times faster on
            CPUs and GPUs with bfloat16 units, at about three significant
            digits per product. Changes the results, not the algorithm
            (``bench/reference_comparison.py`` shows ROUGE at equal seconds).
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
    precision: str = "float32"
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
            _whole(self, name, 1)
        _whole(self, "swap_every", 0, " (0 turns reordering off)")
        _whole(self, "polish_rounds", 0, " (0 turns polishing off)")
        _whole(self, "seed", 0, maximum=2**31 - 1)  # NumPy's RandomState takes seed + i < 2**32
        if self.chunk_size is not None:
            _whole(self, "chunk_size", 1, " (or None to pick one)")
        for name, (rule, in_range) in _REAL_RANGES.items():
            if name != "grad_clip" or self.grad_clip is not None:
                _real(self, name, rule, in_range)
        for name in ("batched", "ghost", "progress"):
            _switch(self, name)
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(map(repr, PRECISIONS))}, got {self.precision!r}.")


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


def _whole(config, name: str, minimum: int, hint: str = "", maximum: int | None = None) -> None:
    """Check that setting ``name`` is a whole number in ``minimum .. maximum``; store it as an int."""
    value = getattr(config, name)
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be a whole number, got {value!r} ({type(value).__name__}).")
    if value < minimum:
        raise ValueError(f"{name} must be at least {minimum}{hint}, got {value}.")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be at most {maximum}, got {value}.")
    object.__setattr__(config, name, int(value))  # frozen configs too


def _real(config, name: str, rule: str, in_range: Callable[[float], bool]) -> None:
    """Check that setting ``name`` is a finite real number for which ``in_range`` holds; store it as a float."""
    value = getattr(config, name)
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real) \
            or not math.isfinite(value) or not in_range(value):
        raise ValueError(f"{name} must be a finite number {rule}, got {value!r}.")


def _switch(config, name: str) -> None:
    """Check that setting ``name`` is a bool; store it as one."""
    value = getattr(config, name)
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name} must be True or False, got {value!r}.")
    object.__setattr__(config, name, bool(value))


PRIOR_WEIGHT = 16.0
"""The language prior's weight in the span check's search under noise
(:func:`gilib.attack.likelihood.likely_sentence`). Bayes' rule would give
1 if the likelihood were the model's own; the search's likelihood lets each
token's input take any gradient row, so it credits a wrong token with the
noise it happens to explain, and the prior must count for more. Chosen on
sentences that no study attacks, the best of a doubling grid
(``bench/dp_span.py --tune``, ``data/bench/dp_prior_tune.csv``)."""


@dataclass(frozen=True)
class SpanConfig:
    """Settings of the span check (:func:`gilib.attack.span_attack`).

    At batch size 1 only ``threshold`` matters; the rest steer peeling, the
    search for a batch's sentences (:mod:`gilib.attack.peeling`).

    Attributes:
        threshold: relative residual under which a token is in the row space
            (:data:`~gilib.attack.rowspace.DEFAULT_THRESHOLD`).
        restarts: random starts of each local sentence search.
        kicks: perturbations per start.
        max_effort: a round of peeling that finds no sentence is rerun with
            twice the beam, restarts and kicks, up to this factor.
        beam: the width of the beam search over prefixes (with a verifier
            weight: layer 1's query or value, or layer 0's FFN).
        seed: seeds the searches.
        time_budget: seconds the whole attack may take, or ``None`` for no
            limit. Once spent, peeling stops where it is and the attack
            returns its best partial result, with
            ``diagnostics.timed_out`` set: every study stays bounded,
            however hard the batch.
        positions: where a large batch's candidate sets have become its
            bag of words, narrow each position's set to the tokens the
            gradient's position parts hold
            (:func:`gilib.attack.positions.position_sets`), the repeated
            words added after a fruitless round and the whole bag again at
            ``max_effort``; ``False`` runs the searches on the whole bag
            (chapter 6's earlier check).
        prior_weight: with a language prior (``span_attack``'s ``prior``):
            the prior's weight against the noisy message's log-likelihood
            (:data:`PRIOR_WEIGHT`).

    Raises:
        ValueError: for a count that is not a whole number or is below its
            minimum, a threshold that is not a finite number above 0, a
            time budget that is not ``None`` or a finite number of seconds
            above 0, ``positions`` that is not a bool, or a prior weight that
            is not a finite number of at least 0.
    """

    threshold: float = DEFAULT_THRESHOLD
    restarts: int = 1
    kicks: int = 15
    max_effort: int = MAX_EFFORT
    beam: int = BEAM
    seed: int = 0
    time_budget: float | None = None
    positions: bool = True
    prior_weight: float = PRIOR_WEIGHT

    def __post_init__(self) -> None:
        _real(self, "threshold", "greater than 0", lambda v: v > 0)
        _real(self, "prior_weight", "of at least 0", lambda v: v >= 0)
        _switch(self, "positions")
        if self.time_budget is not None:
            _real(self, "time_budget", "of seconds above 0 (or None for no limit)", lambda v: v > 0)
            object.__setattr__(self, "time_budget", float(self.time_budget))
        for name, least in (("restarts", 1), ("kicks", 0), ("max_effort", 1), ("beam", 1)):
            _whole(self, name, least)
        _whole(self, "seed", 0, maximum=2**63 - 1)  # torch.Generator's seeds are 64-bit


def checked_config(config, kind: type):
    """``config``, or ``kind()`` for ``None``: a :class:`AttackConfig` or :class:`SpanConfig` an attack runs with.

    Raises:
        TypeError: for anything but ``None`` or a ``kind``.
    """
    cfg = kind() if config is None else config
    if not isinstance(cfg, kind):
        article = "an" if kind.__name__[0] in "AEIOU" else "a"
        raise TypeError(f"config must be {article} {kind.__name__} (or None for the defaults), "
                        f"got a {type(cfg).__name__}.")
    return cfg
