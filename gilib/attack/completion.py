"""The span check for a message whose entries are rounded or lost: float32 FedAvg, one AdamW step.

A FedSGD client sends its gradient ``G = sum_i delta_i x_i^T`` to float32
round-off, and the row-space check of :mod:`gilib.attack.rowspace` reads the
inputs ``x_i`` off it exactly. A FedAvg client sends ``(theta_0 - theta_E) /
(lr E)`` instead: every SGD step is rounded to the float32 grid of the
weights, so an entry whose step is below half a grid spacing never moves
and a moved one is known only to a spacing. At the learning rates clients
use, most entries of the layer-0 weights are lost or coarse, the message is
no longer a rank-n matrix, and its top singular vectors miss the inputs.
The information is still there: the message is a *low-rank matrix seen
through known noise*, and the server knows the noise entry by entry (the
float32 spacing of each weight it sent, the learning rate and the steps).

Three steps, each a standard tool:

1. **Stack** layer 0's query and value weights, whichever the client
   shares: all their rows lie in the span of the same inputs, so the
   stack is a taller rank-n matrix with more entries to estimate it from.
   (The key weight's rows do too, but its gradient is small, softmax's
   shift invariance cancels most of it, and in float32 most of it is lost:
   on the bench's 18 sentences at lr 1e-4 adding it lowered the exact share.)
2. **Complete**: a weighted rank-n fit ``M ~ U V^T`` by alternating least
   squares, each entry weighted by the inverse square of its noise (the
   protocol's, plus a floor for what it does not model, :func:`floored`)
   (:func:`completed_space`; weighted low-rank approximation, Srebro and
   Jaakkola, ICML 2003), from the plain SVD. ``V`` spans the estimated
   inputs; the check's residuals rank the vocabulary against it.
3. **Search** (:func:`polish`): starting from each position's best token,
   the server computes candidate sentences' own gradients and judges them
   on the message itself, entry by entry under the noise model: each
   position's best few tokens are tried against ``sum w (M - G(sentence))^2``
   with the label that fits best, and the single best change is made
   until none helps. At batch size 1 this repairs the positions whose true
   token ranked second to fourth.

The noise model comes from the protocol (:meth:`gilib.client.FedAvg.entry_weights`,
:meth:`gilib.client.AdamW.entry_weights`); the attack is
:func:`gilib.attack.span_attack` with ``weights=``.
"""

from __future__ import annotations

import time
from typing import Sequence

import torch

from .peeling import sentence_gradients
from .rowspace import RowSpace, layer0_inputs

LAYER0_PROJECTIONS = ("attention.self.query.weight", "attention.self.value.weight")
"""The layer-0 input projections stacked (see the module docstring for the key weight)."""

ITERATIONS = 30
"""Alternating least-squares sweeps of :func:`completed_space`."""

CANDIDATES = 4
"""Tokens per position :func:`polish` tries, by increasing residual."""


def stacked_projections(model: torch.nn.Module, names: Sequence[str], tensors: Sequence[torch.Tensor]
                        ) -> tuple[list[str], torch.Tensor]:
    """Every tensor of :data:`LAYER0_PROJECTIONS` in ``names``, stacked row-wise in float64.

    Returns:
        ``(stacked names, (k * d_out, d_in) matrix)``; no names and an empty
        matrix when the selection has none.
    """
    stem = f"{model.base_model_prefix}.encoder.layer.0."
    wanted = {stem + s for s in LAYER0_PROJECTIONS}
    chosen = [(n, t) for n, t in zip(names, tensors) if n in wanted]
    if not chosen:
        return [], torch.empty(0, 0, dtype=torch.float64)
    return [n for n, _ in chosen], torch.cat([t.detach().double() for _, t in chosen])


def completed_space(matrix: torch.Tensor, weights: torch.Tensor, rank: int,
                    iterations: int = ITERATIONS) -> RowSpace:
    """The row space of the weighted rank-``rank`` fit of ``matrix``.

    Minimises ``sum_ij w_ij (M_ij - (U V^T)_ij)^2`` by alternating least
    squares from the plain SVD's leading ``rank`` directions. Entries of
    weight 0 are missing (matrix completion).

    Args:
        matrix: ``(m, d)`` the stacked message.
        weights: ``(m, d)`` non-negative entry weights, ``1 / noise^2``.
        rank: ``n``, the number of inputs (the token count at batch size 1).
        iterations: alternating sweeps.

    Returns:
        A :class:`~gilib.attack.rowspace.RowSpace` of ``rank`` orthonormal
        directions (``singular_values`` those of the plain message).
    """
    matrix, weights = matrix.double(), weights.double()
    _, values, vh = torch.linalg.svd(matrix, full_matrices=False)
    v = vh[:rank].T.clone()
    weighted = weights * matrix
    # A ridge far below any real entry's weight keeps rows with no weight solvable.
    ridge = 1e-12 * float(weights[weights > 0].median()) * torch.eye(rank, dtype=matrix.dtype)
    for _ in range(iterations):
        u = torch.linalg.solve(_normal(weights, v) + ridge, weighted @ v)
        v = torch.linalg.solve(_normal(weights.T, u) + ridge, weighted.T @ u)
    basis, _ = torch.linalg.qr(v)
    return RowSpace(basis.contiguous(), values, rank, 0.0)


def floored(weights: torch.Tensor, matrix: torch.Tensor, rank: int) -> torch.Tensor:
    """Entry weights with the message's unmodelled noise added: ``1 / (noise^2 + floor^2)``.

    A noise model covers what the protocol implies (float32 rounding), not
    everything: after ``E`` local steps the message also mixes gradients
    taken at different weights. What no rank-``rank`` matrix explains is
    the spectrum's tail past ``rank``; its mean square per entry is the
    floor. Missing entries (weight 0) stay missing.
    """
    values = torch.linalg.svdvals(matrix.double())
    floor = float(values[rank:].square().sum()) / matrix.numel()
    noise = torch.where(weights > 0, 1 / weights.clamp_min(1e-300), torch.zeros_like(weights))
    return torch.where(weights > 0, 1 / (noise + floor), torch.zeros_like(weights))


def _normal(weights: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``A_i = sum_j w_ij f_j f_j^T`` for every row ``i``: ``(m, r, r)``, as one matrix product."""
    r = factor.shape[1]
    outer = (factor[:, :, None] * factor[:, None, :]).reshape(len(factor), r * r)
    return (weights @ outer).reshape(len(weights), r, r)


def outside_share(matrix: torch.Tensor, inputs: torch.Tensor) -> float:
    """The share of ``matrix``'s squared norm outside the span of ``inputs``' rows: 0 for the true inputs
    of a noiseless message, the noise's share for a noisy one."""
    basis, _ = torch.linalg.qr(inputs.double().T)
    total = float(matrix.square().sum())
    return (total - float((matrix @ basis).square().sum())) / max(total, 1e-300)


def sentence_inputs(model: torch.nn.Module, ids: Sequence[int]) -> torch.Tensor:
    """Layer 0's inputs of a sentence's tokens, one row per position: ``(n, d)``."""
    return torch.stack([layer0_inputs(model, p, token_ids=[t])[0] for p, t in enumerate(ids)]).double()


def polish(model: torch.nn.Module, names: Sequence[str], matrix: torch.Tensor, weights: torch.Tensor,
           ids: Sequence[int], residuals: torch.Tensor, candidates: int = CANDIDATES, sweeps: int = 8,
           deadline: float | None = None) -> tuple[list[int], float]:
    """Judge each position's best few tokens on the message itself, under its noise model.

    Args:
        model: the victim.
        names: the stacked tensors' parameter names (:func:`stacked_projections`).
        matrix: ``(m, d)`` the stacked message.
        weights: ``(m, d)`` its entry weights.
        ids: the sentence so far, ``[CLS]`` and ``[SEP]`` included.
        residuals: ``(n - 2, V)`` every token's residual at each interior position.
        candidates: tokens tried per position, by increasing residual.
        sweeps: moves at most: each pass tries every position's candidates
            and makes the single best change (stops when none helps).
        deadline: a :func:`time.perf_counter` time to stop at.

    Returns:
        ``(ids, distance)``: the sentence and its weighted squared distance
        to the message, per entry of positive weight.
    """
    scale = weights / weights[weights > 0].mean()
    entries = int((weights > 0).sum())

    def distance(sentence: list[int], label: int) -> float:
        grads = sentence_gradients(model, names, torch.tensor(sentence), label, 1)
        own = torch.cat([g.double() for g in grads])
        return float((scale * (matrix - own).square()).sum()) / entries

    ids = list(ids)
    options = residuals.topk(min(candidates, residuals.shape[1]), dim=1, largest=False).indices.tolist()
    # The label that fits the starting sentence best, kept for the search
    # (one backward pass per move instead of one per class).
    current, label = min((distance(ids, y), y) for y in range(model.config.num_labels))
    # Best improvement, not first: one wrong token changes the sentence's
    # gradient everywhere (attention mixes positions), so from a sentence
    # with one wrong token, fixing it is the one move that drops the
    # distance by orders of magnitude, while a first-improvement search
    # takes whichever small gain elsewhere it meets first.
    for _ in range(sweeps):
        best = (current, None)
        for position, tokens in enumerate(options, start=1):
            for token in tokens:
                if token == ids[position] or (deadline is not None and time.perf_counter() > deadline):
                    continue
                trial = ids[:position] + [token] + ids[position + 1:]
                value = distance(trial, label)
                if value < best[0]:
                    best = (value, trial)
        if best[1] is None:
            break
        current, ids = best
    current = min(distance(ids, y) for y in range(model.config.num_labels))
    return ids, current
