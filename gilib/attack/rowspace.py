"""Exact recovery from one linear weight of layer 0: the row-space ("span") check.

For a linear layer ``y = x W^T + b`` applied to the n tokens of a batch, the
weight gradient is ``G = sum_i delta_i x_i^T``: every row of ``G`` is a
combination of the inputs ``x_i``, so the inputs lie in ``G``'s row space,
whose rank is at most n. For layer 0's query, key and value weights the
inputs are ``LayerNorm(word + position + segment embedding)``, which the
attacker can compute for every vocabulary token at every position: a
candidate belongs to the batch exactly when it lies (up to round-off) in
the row space. This follows DAGER (Petrov et al., "DAGER: Exact Gradient
Inversion for Large Language Models", NeurIPS 2024); the partial-gradient
paper (Li et al., EMNLP 2024) only optimises.

* Batch size 1: each position's token is the candidate with the smallest
  residual.
* Batch size B > 1: the check gives the set of tokens at each position but
  not which sentence each belongs to, and in a large batch not even which
  position (the sets become the batch's bag of words):
  :mod:`gilib.attack.peeling` finds the sentences one at a time, and
  :mod:`gilib.attack.positions` gives a bag-of-words batch its positions
  back from the gradient's position parts. With the
  inputs known, ``G = Delta^T X`` also gives every token's output gradient
  (:func:`item_gradients`, chapter 5's derivation).

:func:`gilib.attack.span.span_attack` runs the whole attack.

A key weight's gradient spans the differences of the inputs from the known
``[CLS]`` input instead (softmax is shift invariant), which the check
accounts for. The check breaks where its premise does: for weights whose
inputs are not enumerable (deeper layers, the attention output, the FFN),
when the batch holds as many tokens as the layer has input dimensions
(the row space is then everything), and under DP noise, which fills the
remaining directions.

Noise the server knows (SecAgg+'s rounding, :mod:`gilib.secure`) or can read
off the spectrum past the token count is judged rather than thresholded
(:func:`row_space`'s ``noise``): the rank counts the directions above the
noise's largest singular value, and a token's residual is divided by what
the noise alone would leave it were it true (:meth:`RowSpace.noise_residual`,
first-order perturbation of the singular vectors), a z-score near 1 for the
true tokens whatever the noise's size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from .tokens import TokenSpace

DEFAULT_THRESHOLD = 1e-4
"""Relative residual below which a token counts as inside the row space.

At batch size 1 true tokens measure 1e-7 to 1e-6 in float32 (round-off of
the client's gradient), false ones 1e-2 or more. In batches the two meet:
in ``data/results/ch5_span.jsonl`` the worst true token and the best
impostor measure 8e-6 and 8e-6 at batch size 4 (about 90 tokens), 9e-4 and
2e-6 at batch size 8 (medians over batches); see :func:`candidate_sets`."""


RANK_EDGE = 2.0
"""Under a noise model (:func:`row_space`'s ``noise``), a direction belongs to
the row space when its singular value exceeds this many times the largest
one noise alone would give, ``sigma (sqrt(m) + sqrt(d))`` for an ``(m, d)``
matrix of independent entries of standard deviation ``sigma``."""

INSIDE_Z = 3.0
"""Under a noise model, a token is inside the span when its residual is at
most this many times what the noise alone leaves a true input
(:meth:`RowSpace.noise_residual`): the residuals become z-scores, and true
tokens score about 1 whatever the noise."""


@dataclass
class RowSpace:
    """An orthonormal basis of a gradient's row space.

    Attributes:
        basis: ``(d_in, r)`` orthonormal columns.
        singular_values: all singular values of the gradient, descending.
        rank: ``r``: the number of singular values above :attr:`tolerance`,
            at most the ``max_rank`` the caller knows.
        tolerance: ``s_max * max(shape) * eps``: NumPy's ``matrix_rank`` rule
            for the float type of the gradient; under a noise model,
            :data:`RANK_EDGE` times the noise's largest singular value.
        noise: the per-entry standard deviation of the gradient's noise,
            under a noise model; 0 without one (float32 round-off only).
    """

    basis: torch.Tensor
    singular_values: torch.Tensor
    rank: int
    tolerance: float
    noise: float = 0.0

    @property
    def full(self) -> bool:
        """True when the span is the whole input space: every vector lies in it."""
        return self.rank >= self.basis.shape[0]

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        """Relative distance of each row of ``x`` ``(..., d_in)`` to the span: 0 inside it."""
        x = x.to(self.basis.dtype)
        inside = (x @ self.basis) @ self.basis.T
        return (x - inside).norm(dim=-1) / x.norm(dim=-1).clamp_min(1e-12)

    def noise_residual(self, x: torch.Tensor) -> torch.Tensor:
        """The relative residual the noise alone leaves each row of ``x`` ``(..., d_in)`` lying in the true span.

        The noise ``N`` tilts the estimated directions: to first order the
        ``i``-th moves by ``N^T u_i / s_i`` off the span, so an input with
        coordinates ``c = V^T x`` leaves it by about
        ``sigma sqrt(d_in - r) ||c / s||`` (Stewart and Sun, "Matrix
        Perturbation Theory", 1990, ch. V). Dividing a residual by it gives
        a z-score: about 1 for a true input, whatever the noise.
        """
        x = x.to(self.basis.dtype)
        values = self.singular_values[: self.rank].to(self.basis.dtype)
        spread = ((x @ self.basis) / values).norm(dim=-1)
        return self.noise_scale * spread / x.norm(dim=-1).clamp_min(1e-12)

    @property
    def noise_scale(self) -> float:
        """``sigma sqrt(d_in - r)``: :meth:`noise_residual` of an input with ``||S^-1 V^T x|| / ||x|| = 1``."""
        return self.noise * math.sqrt(max(self.basis.shape[0] - self.rank, 1))


def spectrum_noise(singular_values: torch.Tensor, shape: Sequence[int], rank: int) -> float:
    """The per-entry noise standard deviation read off the singular values past ``rank``.

    Past the inputs' rank (at most the token count, which the attacker
    knows) a gradient's singular values are noise alone; their squares
    sum to about ``sigma^2 (m - rank) (d - rank)`` for an ``(m, d)`` matrix.
    """
    m, d = int(shape[0]), int(shape[1])
    if rank >= min(m, d):
        raise ValueError(f"Cannot read the noise off the spectrum: the rank bound {rank} leaves no singular "
                         f"value of a {m} x {d} gradient past it. Give the protocol's noise instead.")
    tail = float(singular_values[rank:].double().square().sum())
    return math.sqrt(tail / ((m - rank) * (d - rank)))


def row_space(gradient: torch.Tensor, max_rank: int | None = None, noise: float | str | None = None) -> RowSpace:
    """The row space of a ``(d_out, d_in)`` weight gradient, by SVD in float64.

    The rank is NumPy's ``matrix_rank`` rule (singular values above
    ``s_max * max(shape) * eps``), extended down to ten times the noise
    floor where the caller gives ``max_rank`` below the gradient's size
    (the rank cannot exceed it, so the singular value at index ``max_rank``
    measures the round-off), but not below ``s_max * eps``. In a batch the weakest real directions fall
    under NumPy's tolerance (1e-5 relative, against a float32 floor near
    1e-7), and without them up to a tenth of the true tokens leave the span;
    after peeling (:mod:`gilib.attack.peeling`) the floor rises.

    Args:
        gradient: the weight's gradient.
        max_rank: an upper bound the attacker knows, the batch's token count:
            without noise the numerical rank never exceeds it; with DP noise
            (full rank) the leading ``max_rank`` directions are the best
            estimate of the inputs' span.
        noise: a noise model: the per-entry standard deviation of the
            gradient's noise (a protocol's, e.g.
            :meth:`gilib.secure.SecAgg.noise_std`), or ``"spectrum"`` to read
            it off the singular values past ``max_rank``
            (:func:`spectrum_noise`). The rank is then the directions above
            :data:`RANK_EDGE` times the noise's largest singular value, and
            the space can turn residuals into z-scores
            (:meth:`RowSpace.noise_residual`).
    """
    g = gradient.detach().double()
    _, s, vh = torch.linalg.svd(g, full_matrices=False)
    if noise is not None:
        if noise == "spectrum":
            if max_rank is None:
                raise ValueError('noise="spectrum" reads the noise past the rank bound: give max_rank.')
            sigma = spectrum_noise(s, g.shape, int(max_rank))
        else:
            sigma = float(noise)
        edge = RANK_EDGE * sigma * (math.sqrt(g.shape[0]) + math.sqrt(g.shape[1]))
        rank = int((s > edge).sum())
        if max_rank is not None:
            rank = min(rank, int(max_rank))
        return RowSpace(vh[:rank].T.contiguous(), s, rank, edge, sigma)
    eps = torch.finfo(gradient.dtype).eps
    tolerance = float(s[0]) * max(g.shape) * eps if len(s) else 0.0
    rank = int((s > tolerance).sum())
    if max_rank is not None and rank <= max_rank < len(s):
        # Ten times the noise at index max_rank, and never below float32's
        # resolution of the largest direction (round-off spreads over a band).
        floor = max(10 * float(s[int(max_rank)]), float(s[0]) * eps)
        rank = max(rank, int((s > floor).sum()))
    if max_rank is not None:
        rank = min(rank, int(max_rank))
    return RowSpace(vh[:rank].T.contiguous(), s, rank, tolerance)


def layer0_parts(model: torch.nn.Module, token_type: int = 0):
    """What layer 0's input projections read, before their LayerNorm: ``(words, positions, segment, norm)``.

    A BERT's input is ``LayerNorm(word + position + segment embedding)``
    (the embeddings' own LayerNorm); a GPT-2 decoder's is its first block's
    ``ln_1(wte + wpe)`` (pre-LayerNorm, no segments: ``segment`` is 0).

    Returns:
        ``words`` ``(V, d)``, ``positions`` ``(P_max, d)``, ``segment``
        ``(d,)`` and the ``LayerNorm`` module.
    """
    if getattr(model.config, "model_type", None) == "gpt2":
        base = model.base_model
        words = base.wte.weight
        return words, base.wpe.weight, torch.zeros_like(words[0]), base.h[0].ln_1
    emb = model.base_model.embeddings
    return (emb.word_embeddings.weight, emb.position_embeddings.weight, emb.token_type_embeddings.weight[token_type],
            emb.LayerNorm)


def layer0_inputs(model: torch.nn.Module, position: int, token_type: int = 0,
                  token_ids: torch.Tensor | Sequence[int] | None = None) -> torch.Tensor:
    """The input a token would give layer 0 at ``position``: ``(V, d)``, or ``(K, d)`` for ``K`` token ids.

    Args:
        model: the victim (a BERT, or a GPT-2 decoder: :func:`layer0_parts`).
        position: the token's position.
        token_type: its segment (a BERT's).
        token_ids: the tokens to compute (default: the whole vocabulary).
    """
    words, positions, segment, norm = layer0_parts(model, token_type)
    with torch.no_grad():
        if token_ids is not None:
            words = words[torch.as_tensor(token_ids, device=words.device)]
        return norm(words + positions[position] + segment)


def token_residuals(
    model: torch.nn.Module,
    tokens: TokenSpace,
    space: RowSpace,
    positions: Sequence[int],
    *,
    shift_invariant: bool = False,
    refine: int = 64,
) -> torch.Tensor:
    """Residual of every vocabulary token at every position: ``(P, V)``.

    Tokens that never occur in text (special tokens, ``[unusedN]``) get
    ``inf``. Every token is scored by :class:`_ClosedForm`, which never
    forms the ``(V, d)`` inputs; each position's ``refine`` smallest
    residuals (the candidates, the true tokens among them) are then
    recomputed directly from the inputs, as :meth:`RowSpace.residual` does,
    so the values that decide the attack carry no cancellation error.
    Under a noise model (``space.noise > 0``) every residual is divided by
    what the noise alone would leave that token were it true
    (:meth:`RowSpace.noise_residual`): z-scores, about 1 for true tokens.

    Args:
        model: the victim.
        tokens: its token space.
        space: the row space of a layer-0 input projection's gradient.
        positions: the positions to test.
        shift_invariant: test ``x - x_[CLS]`` instead of ``x`` (a key weight).
        refine: residuals per position recomputed directly.
    """
    positions = list(positions)
    vocab = tokens.table.shape[0]
    if not positions:
        return torch.empty(0, vocab, dtype=torch.float64)
    cls_id = tokens.tokenizer.cls_token_id
    anchor = layer0_inputs(model, 0, token_ids=[cls_id])[0] if shift_invariant else None
    residuals = _ClosedForm(model, space.basis, anchor).residuals(positions)
    if space.noise > 0:
        # ||(V / s)^T x|| / ||x|| for every token by the same closed form.
        values = space.singular_values[: space.rank].to(space.basis.device, torch.float64)
        spread = _ClosedForm(model, space.basis.double() / values, anchor).inside(positions)
        residuals = residuals / (space.noise_scale * spread).clamp_min(1e-300)
    residuals[:, ~tokens.allowed.to(residuals.device)] = float("inf")
    best = residuals.topk(min(refine, vocab), dim=1, largest=False).indices
    for row, position, ids in zip(residuals, positions, best):
        direct = layer0_inputs(model, position, token_ids=ids)
        inputs = direct if anchor is None else direct - anchor
        value = space.residual(inputs)
        if space.noise > 0:
            value = value / space.noise_residual(inputs).clamp_min(1e-300)
        row[ids] = value.to(row.device)
    return residuals.cpu()


class _ClosedForm:
    """Every vocabulary token's residual at given positions, without forming its layer-0 input.

    Layer 0's input is ``x = gamma * (z - mu) / s + beta`` with
    ``z = e_v + q_p`` (word embedding plus the position's and segment's
    embedding), ``mu`` and ``s^2`` the mean and variance of ``z``. With
    ``u = A z - mu A 1`` and ``A = V^T diag(gamma)`` (a GPT-2 decoder's
    ``ln_1(wte + wpe)`` alike, with no segment: :func:`layer0_parts`), the projection is
    ``V^T x = u / s + V^T beta``; every term of ``||x||^2`` and
    ``||V^T x||^2`` expands into a per-token constant (computed once), a
    per-position constant and a token-position dot product (one matrix
    product for all of them). Scoring ``P`` positions costs
    ``O(V (d + r) P)`` instead of the ``O(V d r P)`` of projecting ``V * P``
    inputs. Residual squared ``= ||x||^2 - ||V^T x||^2`` (of ``x - a`` for
    an anchor ``a``), in float64; its cancellation error, about ``1e-7``
    relative, is far below what separates a true token from a false one, and
    :func:`token_residuals` recomputes the smallest ones directly.
    """

    def __init__(self, model: torch.nn.Module, basis: torch.Tensor, anchor: torch.Tensor | None) -> None:
        words, positions, segment, norm = layer0_parts(model)
        self.words = words.detach().double()
        self.device = self.words.device
        self.eps = float(norm.eps)
        self.gamma = norm.weight.detach().double()
        self.beta = norm.bias.detach().double()
        self.shift = (positions.detach().double(), segment.detach().double())
        basis = basis.to(self.device, torch.float64)
        self.dim = self.words.shape[1]
        self.g2, self.gb = self.gamma.square(), self.gamma * self.beta
        words, g2, gb = self.words, self.g2, self.gb
        # Per token: sums and dot products with the fixed vectors.
        self.word_sum, self.word_sq = words.sum(1), words.square().sum(1)
        self.word_g2, self.word_g2_sq, self.word_gb = words @ g2, words.square() @ g2, words @ gb
        self.project = basis.T * self.gamma  # (r, d): A = V^T diag(gamma)
        projected = words @ self.project.T  # (V, r): A e_v
        self.a_one = self.project.sum(1)  # (r,): A 1
        self.v_beta = basis.T @ self.beta  # (r,): V^T beta
        self.projected = projected
        self.p_sq, self.p_one, self.p_beta = projected.square().sum(1), projected @ self.a_one, projected @ self.v_beta
        self.anchor = None
        if anchor is not None:
            a = anchor.detach().to(self.device, torch.float64)
            ga, v_a = self.gamma * a, basis.T @ a
            self.anchor = (a, ga, words @ ga, v_a, projected @ v_a)

    def residuals(self, positions: Sequence[int]) -> torch.Tensor:
        """Relative residuals ``(P, V)`` of every token at each position."""
        xx, inside = self._parts(positions)
        residual = (xx - inside).clamp_min(0.0).sqrt() / xx.clamp_min(1e-30).sqrt()
        return residual.T.contiguous()

    def inside(self, positions: Sequence[int]) -> torch.Tensor:
        """``||B^T x|| / ||x||`` ``(P, V)`` for the basis ``B`` given (any matrix, not only an orthonormal one)."""
        xx, inside = self._parts(positions)
        return (inside.clamp_min(0.0) / xx.clamp_min(1e-30)).sqrt().T.contiguous()

    def _parts(self, positions: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(||x||^2, ||B^T x||^2)``, each ``(V, P)``."""
        g2, gb = self.g2, self.gb
        q = self.shift[0][list(positions)] + self.shift[1]  # (P, d)
        cross = self.words @ torch.cat([q, g2 * q]).T  # (V, 2P): e.q and e.(gamma^2 q)
        e_q, e_g2q = cross[:, : len(q)], cross[:, len(q):]
        mu = (self.word_sum[:, None] + q.sum(1)) / self.dim  # (V, P)
        var = (self.word_sq[:, None] + q.square().sum(1) + 2 * e_q) / self.dim - mu.square()
        inv = (var + self.eps).rsqrt()
        # ||x||^2 = inv^2 sum gamma^2 (z - mu)^2 + 2 inv sum gamma beta (z - mu) + ||beta||^2
        g2z2 = self.word_g2_sq[:, None] + (g2 * q.square()).sum(1) + 2 * e_g2q
        g2z = self.word_g2[:, None] + q @ g2
        gbz = self.word_gb[:, None] + q @ gb
        xx = inv.square() * (g2z2 - 2 * mu * g2z + mu.square() * g2.sum()) \
            + 2 * inv * (gbz - mu * gb.sum()) + self.beta.square().sum()
        # ||V^T x||^2 = inv^2 ||u||^2 + 2 inv u.V^T beta + ||V^T beta||^2, u = A e_v + A q_p - mu A 1
        w = q @ self.project.T  # (P, r): A q_p
        uu = self.p_sq[:, None] + w.square().sum(1) + mu.square() * self.a_one.square().sum() \
            + 2 * (self.projected @ w.T) - 2 * mu * self.p_one[:, None] - 2 * mu * (w @ self.a_one)
        ub = self.p_beta[:, None] + w @ self.v_beta - mu * (self.a_one @ self.v_beta)
        inside = inv.square() * uu + 2 * inv * ub + self.v_beta.square().sum()
        if self.anchor is not None:  # residual of x - a: subtract a from x and V^T a from V^T x
            a, ga, word_ga, v_a, p_a = self.anchor
            xa = inv * (word_ga[:, None] + q @ ga - mu * ga.sum()) + a @ self.beta
            xx = xx - 2 * xa + a.square().sum()
            ua = p_a[:, None] + w @ v_a - mu * (self.a_one @ v_a)
            inside = inside - 2 * (inv * ua + self.v_beta @ v_a) + v_a.square().sum()
        return xx, inside


def position_counts(lengths: Sequence[int]) -> list[int]:
    """How many sentences have a word at each interior position ``1 .. max(lengths) - 2``."""
    return [sum(p < n - 1 for n in lengths) for p in range(1, max(lengths) - 1)]


def candidate_sets(residuals: torch.Tensor, counts: Sequence[int], threshold: float = DEFAULT_THRESHOLD, *,
                   capped: bool = True) -> list[list[int]]:
    """The tokens each position holds, from its residuals.

    Learned position embeddings are smooth, so a token that the batch holds
    at a *nearby* position lies almost in the span too, and float32
    round-off resolves the weak directions of a large batch less sharply:
    in batches an impostor can outrank a true token (see
    :data:`DEFAULT_THRESHOLD`), which is where chapter 5's batch-size
    measurements see the check degrade.

    Args:
        residuals: ``(P, V)`` from :func:`token_residuals`.
        counts: how many sentences have a word at each position
            (:func:`position_counts` of the known lengths): a position holds
            at most that many distinct tokens.
        threshold: residual below which a token is in the span
            (:data:`DEFAULT_THRESHOLD`).
        capped: keep at most ``count`` tokens per position. Without the cap
            (for :func:`gilib.attack.peeling.peel`, whose sentence check
            sorts true tokens from impostors) every token under the
            threshold is kept, and at least the ``count`` best.

    Returns:
        For each position, token ids by increasing residual: those under the
        threshold (at most ``count`` when capped); the best one(s) when none
        passes (noise), so that every position keeps a guess. At batch size
        1, capped, that is the smallest residual, whatever the threshold.
    """
    sets = []
    for row, count in zip(residuals, counts):
        if capped:
            best = row.topk(max(1, int(count)), largest=False)
            chosen = [int(i) for i, r in zip(best.indices, best.values) if r < threshold]
            sets.append(chosen or [int(best.indices[0])])
        else:
            under = int((row < threshold).sum())
            sets.append([int(i) for i in row.argsort()[: max(under, int(count), 1)]])
    return sets


def item_gradients(gradient: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    """Each input's output gradient, from a weight gradient and the inputs that produced it.

    ``G = sum_i delta_i x_i^T = Delta^T X``; when the rows of ``X`` are linearly
    independent (distinct tokens at distinct positions), ``Delta`` is unique
    and this least-squares solve recovers it exactly.

    Args:
        gradient: ``(d_out, d_in)`` weight gradient.
        inputs: ``(m, d_in)`` the inputs (rows of ``X``).

    Returns:
        ``(m, d_out)`` output gradients ``delta_i`` (float64).
    """
    return torch.linalg.lstsq(inputs.double().T, gradient.double().T).solution


def check_positions(model: torch.nn.Module, tokens: TokenSpace, gradient: torch.Tensor, lengths: Sequence[int], *,
                    shift_invariant: bool, threshold: float, capped: bool,
                    noise: float | str | None = None) -> tuple[RowSpace, torch.Tensor, list[list[int]]]:
    """The span check of a batch's interior positions: ``(space, residuals, candidate sets)``.

    Args:
        model: the victim.
        tokens: its token space.
        gradient: a layer-0 query, key or value weight's gradient.
        lengths: the batch's token counts (bound the rank and the positions).
        shift_invariant: a key weight (one direction fewer per sentence; residuals of ``x - x_[CLS]``).
        threshold, capped: as for :func:`candidate_sets`.
        noise: a noise model (:func:`row_space`): the rank is then read
            against the noise, the residuals are z-scores
            (:func:`token_residuals`) and ``threshold`` gives way to
            :data:`INSIDE_Z`.
    """
    lengths = [int(n) for n in lengths]
    space = row_space(gradient, max_rank=sum(lengths) - (len(lengths) if shift_invariant else 0), noise=noise)
    residuals = token_residuals(model, tokens, space, range(1, max(lengths) - 1), shift_invariant=shift_invariant)
    threshold = INSIDE_Z if space.noise > 0 else threshold
    return space, residuals, candidate_sets(residuals, position_counts(lengths), threshold, capped=capped)
