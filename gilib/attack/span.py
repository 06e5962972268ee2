"""Exact recovery from one linear weight of layer 0: the row-space ("span") check.

For a linear layer ``y = x W^T + b`` applied to the n tokens of a batch, the
weight gradient is ``G = sum_i delta_i x_i^T``: every row of ``G`` is a
combination of the inputs ``x_i``, so the inputs lie in ``G``'s row space,
whose rank is at most n. For layer 0's query, key and value weights the
inputs are ``LayerNorm(word + position + segment embedding)``, which the
attacker can compute for every vocabulary token at every position: a
candidate belongs to the sentence exactly when it lies (up to round-off) in
the row space. This follows DAGER (Petrov et al., "DAGER: Exact Gradient
Inversion for Large Language Models", NeurIPS 2024); the partial-gradient
paper (Li et al., EMNLP 2024) only optimises.

This module handles batch size 1, where each position's token is the
candidate with the smallest residual. A key weight's gradient spans the
differences of the inputs from the known ``[CLS]`` input instead (softmax is
shift invariant), which the check accounts for.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence

import torch

from ..slicing import Selection
from .optimization import AttackResult
from .tokens import TokenSpace

_LAYER0_INPUTS = ("attention.self.query.weight", "attention.self.key.weight", "attention.self.value.weight")


@dataclass
class RowSpace:
    """An orthonormal basis of a gradient's row space.

    Attributes:
        basis: ``(d_in, r)`` orthonormal columns.
        singular_values: all singular values of the gradient, descending.
        rank: ``r``, the number above :attr:`tolerance`.
        tolerance: ``s_max * max(shape) * eps``: NumPy's ``matrix_rank`` rule
            for the float type of the gradient.
    """

    basis: torch.Tensor
    singular_values: torch.Tensor
    rank: int
    tolerance: float

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        """Relative distance of each row of ``x`` ``(..., d_in)`` to the span: 0 inside it."""
        x = x.to(self.basis.dtype)
        inside = (x @ self.basis) @ self.basis.T
        return (x - inside).norm(dim=-1) / x.norm(dim=-1).clamp_min(1e-12)


def row_space(gradient: torch.Tensor) -> RowSpace:
    """The row space of a ``(d_out, d_in)`` weight gradient, by SVD in float64."""
    g = gradient.detach().double()
    _, s, vh = torch.linalg.svd(g, full_matrices=False)
    eps = torch.finfo(gradient.dtype).eps
    tolerance = float(s[0]) * max(g.shape) * eps if len(s) else 0.0
    rank = int((s > tolerance).sum())
    return RowSpace(vh[:rank].T.contiguous(), s, rank, tolerance)


def layer0_inputs(model: torch.nn.Module, position: int, token_type: int = 0) -> torch.Tensor:
    """The input every vocabulary token would give layer 0 at ``position``: ``(V, d)``."""
    emb = model.base_model.embeddings
    with torch.no_grad():
        x = emb.word_embeddings.weight + emb.position_embeddings.weight[position] \
            + emb.token_type_embeddings.weight[token_type]
        return emb.LayerNorm(x)


def span_attack(
    model: torch.nn.Module,
    tokenizer,
    shared_grads: Sequence[torch.Tensor],
    selection: Selection,
    lengths: Sequence[int],
) -> AttackResult:
    """Recover a sentence from the gradient of a layer-0 query, key or value weight.

    Args:
        model: the victim, as the server holds it.
        tokenizer: its tokenizer.
        shared_grads: the client's gradient, one tensor per name of ``selection``.
        selection: must contain layer 0's query, key or value weight.
        lengths: the batch's token counts (batch size 1: one length).

    Returns:
        An :class:`~gilib.attack.AttackResult` (``method="span"``; ``final_loss``
        is the largest residual among the chosen tokens, ``timings`` has the
        rank and the residual gap between chosen and runner-up tokens).

    Raises:
        ValueError: if no layer-0 query/key/value weight is selected, or the
            batch holds more than one sentence.
    """
    start = time.perf_counter()
    stem = f"{model.base_model_prefix}.encoder.layer.0."
    usable = [(n, g) for n, g in zip(selection.names, shared_grads) if n in {stem + s for s in _LAYER0_INPUTS}]
    if not usable:
        raise ValueError(
            f"The span check needs the gradient of layer 0's query, key or value weight, and "
            f"{selection.label} has none: select e.g. select(model, 'attention.query', 0) or 'layer', 0."
        )
    if len(lengths) != 1:
        raise ValueError(f"This span check recovers one sentence (batch size 1); got {len(lengths)} lengths.")
    n = int(lengths[0])
    space = row_space(usable[0][1])
    tokens = TokenSpace(model, tokenizer)
    allowed = tokens.allowed
    ids, worst, gaps = [tokenizer.cls_token_id], 0.0, []
    # Softmax ignores a shift shared by a row of scores, so a key weight's
    # output gradients sum to zero over the keys: its row space holds the
    # differences x_i - x_0, not the x_i. The [CLS] input x_0 is known.
    anchor = layer0_inputs(model, 0)[tokenizer.cls_token_id] if usable[0][0].endswith("key.weight") else 0.0
    for position in range(1, n - 1):
        residual = space.residual(layer0_inputs(model, position) - anchor)
        residual[~allowed] = float("inf")
        best2 = residual.topk(2, largest=False)
        ids.append(int(best2.indices[0]))
        worst = max(worst, float(best2.values[0]))
        gaps.append(float(best2.values[1] - best2.values[0]))
    ids.append(tokenizer.sep_token_id)
    seconds = time.perf_counter() - start
    return AttackResult(
        texts=[tokens.decode(ids)],
        token_ids=[ids],
        loss_history=[],
        final_loss=worst,
        seconds=seconds,
        seconds_per_step=seconds,
        method="span",
        config={"weight": usable[0][0]},
        timings={"rank": space.rank, "min_gap": min(gaps) if gaps else 0.0},
    )
