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
* Batch size B > 1: the check gives the set of tokens at each position (up
  to B of them) but not which sentence each belongs to. With the inputs
  known, the weight gradient also gives every token's output gradient
  exactly (:func:`item_gradients`), and a token's output gradient depends
  on its own sentence only: :func:`assemble` searches each sentence on its
  own for the candidates whose output gradients match.

A key weight's gradient spans the differences of the inputs from the known
``[CLS]`` input instead (softmax is shift invariant), which the check
accounts for. The check breaks where its premise does: for weights whose
inputs are not enumerable (deeper layers, the attention output, the FFN),
when the batch holds as many tokens as the layer has input dimensions
(the row space is then everything), and under DP noise, which fills the
remaining directions.
"""

from __future__ import annotations

import math
import numbers
import time
from dataclasses import dataclass
from typing import Sequence

import torch

from ..slicing import Selection, SharedUpdate, checked_update
from .objectives import GradientMatcher
from .optimization import AttackResult
from .tokens import TokenSpace

FOUND = 1e-6  # assembly loss (1 - cosine of output gradients) below which a sentence is found
_LAYER0_INPUTS = ("attention.self.query.weight", "attention.self.key.weight", "attention.self.value.weight")
DEFAULT_THRESHOLD = 1e-4
"""Relative residual below which a token counts as inside the row space.

At batch size 1 true tokens measure 1e-7 to 1e-6 in float32 (round-off of
the client's gradient), false ones 1e-2 or more. In batches the two meet:
in ``data/results/ch5_span.jsonl`` the worst true token and the best
impostor measure 8e-6 and 8e-6 at batch size 4 (about 90 tokens), 9e-4 and
2e-6 at batch size 8 (medians over batches); see :func:`candidate_sets`."""


@dataclass
class RowSpace:
    """An orthonormal basis of a gradient's row space.

    Attributes:
        basis: ``(d_in, r)`` orthonormal columns.
        singular_values: all singular values of the gradient, descending.
        rank: ``r``: the number of singular values above :attr:`tolerance`,
            at most the ``max_rank`` the caller knows.
        tolerance: ``s_max * max(shape) * eps``: NumPy's ``matrix_rank`` rule
            for the float type of the gradient.
    """

    basis: torch.Tensor
    singular_values: torch.Tensor
    rank: int
    tolerance: float

    @property
    def full(self) -> bool:
        """True when the span is the whole input space: every vector lies in it."""
        return self.rank >= self.basis.shape[0]

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        """Relative distance of each row of ``x`` ``(..., d_in)`` to the span: 0 inside it."""
        x = x.to(self.basis.dtype)
        inside = (x @ self.basis) @ self.basis.T
        return (x - inside).norm(dim=-1) / x.norm(dim=-1).clamp_min(1e-12)


def row_space(gradient: torch.Tensor, max_rank: int | None = None) -> RowSpace:
    """The row space of a ``(d_out, d_in)`` weight gradient, by SVD in float64.

    Args:
        gradient: the weight's gradient.
        max_rank: an upper bound the attacker knows, the batch's token count:
            without noise the numerical rank never exceeds it; with DP noise
            (full rank) the leading ``max_rank`` directions are the best
            estimate of the inputs' span.
    """
    g = gradient.detach().double()
    _, s, vh = torch.linalg.svd(g, full_matrices=False)
    eps = torch.finfo(gradient.dtype).eps
    tolerance = float(s[0]) * max(g.shape) * eps if len(s) else 0.0
    rank = int((s > tolerance).sum())
    if max_rank is not None:
        rank = min(rank, int(max_rank))
    return RowSpace(vh[:rank].T.contiguous(), s, rank, tolerance)


def layer0_inputs(model: torch.nn.Module, position: int, token_type: int = 0,
                  token_ids: torch.Tensor | Sequence[int] | None = None) -> torch.Tensor:
    """The input a token would give layer 0 at ``position``: ``(V, d)``, or ``(K, d)`` for ``K`` token ids.

    Args:
        model: the victim.
        position: the token's position.
        token_type: its segment.
        token_ids: the tokens to compute (default: the whole vocabulary).
    """
    emb = model.base_model.embeddings
    with torch.no_grad():
        words = emb.word_embeddings.weight
        if token_ids is not None:
            words = words[torch.as_tensor(token_ids, device=words.device)]
        x = words + emb.position_embeddings.weight[position] + emb.token_type_embeddings.weight[token_type]
        return emb.LayerNorm(x)


def layer0_weight(model: torch.nn.Module, selection: Selection, shared_grads: Sequence[torch.Tensor]):
    """The first layer-0 query, key or value weight in a selection: ``(name, gradient)``.

    Raises:
        ValueError: if the selection has none, with what to select instead.
    """
    stem = f"{model.base_model_prefix}.encoder.layer.0."
    wanted = {stem + s for s in _LAYER0_INPUTS}
    for name, gradient in zip(selection.names, shared_grads):
        if name in wanted:
            return name, gradient
    raise ValueError(
        f"The span check needs the gradient of layer 0's query, key or value weight, and "
        f"{selection.label} has none: select e.g. select(model, 'attention.query', 0) or 'layer', 0."
    )


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
    residuals[:, ~tokens.allowed.to(residuals.device)] = float("inf")
    best = residuals.topk(min(refine, vocab), dim=1, largest=False).indices
    for row, position, ids in zip(residuals, positions, best):
        direct = layer0_inputs(model, position, token_ids=ids)
        row[ids] = space.residual(direct if anchor is None else direct - anchor).to(row.device)
    return residuals.cpu()


class _ClosedForm:
    """Every vocabulary token's residual at given positions, without forming its layer-0 input.

    Layer 0's input is ``x = gamma * (z - mu) / s + beta`` with
    ``z = e_v + q_p`` (word embedding plus the position's and segment's
    embedding), ``mu`` and ``s^2`` the mean and variance of ``z``. With
    ``u = A z - mu A 1`` and ``A = V^T diag(gamma)``, the projection is
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
        emb = model.base_model.embeddings
        norm = emb.LayerNorm
        self.words = emb.word_embeddings.weight.detach().double()
        self.device = self.words.device
        self.eps = float(norm.eps)
        self.gamma = norm.weight.detach().double()
        self.beta = norm.bias.detach().double()
        self.shift = (emb.position_embeddings.weight.detach().double(),
                      emb.token_type_embeddings.weight.detach().double()[0])
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
        residual = (xx - inside).clamp_min(0.0).sqrt() / xx.clamp_min(1e-30).sqrt()
        return residual.T.contiguous()


def position_counts(lengths: Sequence[int]) -> list[int]:
    """How many sentences have a word at each interior position ``1 .. max(lengths) - 2``."""
    return [sum(p < n - 1 for n in lengths) for p in range(1, max(lengths) - 1)]


def candidate_sets(residuals: torch.Tensor, counts: Sequence[int], threshold: float = DEFAULT_THRESHOLD) -> list[list[int]]:
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

    Returns:
        For each position, token ids by increasing residual: those under the
        threshold, at most ``count``; the single best one when none passes
        (noise), so that every position keeps a guess. At batch size 1 that
        is the smallest residual, whatever the threshold.
    """
    sets = []
    for row, count in zip(residuals, counts):
        best = row.topk(max(1, int(count)), largest=False)
        chosen = [int(i) for i, r in zip(best.indices, best.values) if r < threshold]
        sets.append(chosen or [int(best.indices[0])])
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


def assemble(
    model: torch.nn.Module,
    weight: str,
    gradient: torch.Tensor,
    lengths: Sequence[int],
    labels: torch.Tensor,
    candidates: Sequence[Sequence[int]],
    tokenizer,
    *,
    restarts: int = 3,
    max_moves: int = 200,
    seed: int = 0,
) -> torch.Tensor:
    """Assign each position's candidate tokens to the batch's sentences.

    Once the tokens at every position are known, so are the layer's inputs
    ``x_i``, and :func:`item_gradients` recovers every token's output
    gradient ``delta_i`` from the shared weight gradient. A token's
    ``delta_i`` depends only on its own sentence, so each sentence can be
    searched on its own: a hypothesis (one candidate per position) is right
    when the output gradients it produces itself match the recovered ones
    at its tokens. A steepest-descent search over single substitutions, with
    seeded random starts, minimises one minus their cosine (averaged over
    positions); every move is a forward and backward pass of one short
    sentence, all moves of a step in one batch. Sentences are searched
    longest first, and a token a found sentence took is withdrawn from the
    others where a position holds one distinct token per sentence.

    Args:
        model: the victim, as the server holds it.
        weight: name of the layer-0 query, key or value weight.
        gradient: its shared gradient ``(d_out, d_in)``.
        lengths: B token counts, ``[CLS]`` and ``[SEP]`` included.
        labels: ``(B,)`` class labels.
        candidates: for positions ``1 .. max(lengths) - 2``, the candidate
            token ids (:func:`candidate_sets`).
        tokenizer: the victim's tokenizer.
        restarts: seeded starts per sentence.
        max_moves: substitutions per start at most.
        seed: seeds the starts.

    Returns:
        ``(B, T)`` token ids, padded with ``[PAD]``.
    """
    lengths = [int(n) for n in lengths]
    b = len(lengths)
    cls_id, sep_id = tokenizer.cls_token_id, tokenizer.sep_token_id
    # The items: every distinct (position, token) input of the batch.
    items = [(0, cls_id)] + [(n - 1, sep_id) for n in sorted(set(lengths))]
    items += [(p, v) for p, cands in enumerate(candidates, start=1) for v in cands]
    index = {item: i for i, item in enumerate(items)}
    inputs = torch.stack([layer0_inputs(model, p, token_ids=[v])[0] for p, v in items]).cpu()
    gradient = gradient.cpu()
    if weight.endswith("key.weight"):
        # The key's gradient spans x - x_[CLS]: the [CLS] item drops out.
        deltas = torch.cat([torch.zeros(1, gradient.shape[0], dtype=torch.float64),
                            item_gradients(gradient, inputs[1:] - inputs[0])])
    else:
        deltas = item_gradients(gradient, inputs)
    counts = position_counts(lengths)
    module = model.get_submodule(weight.rsplit(".", 1)[0])
    labels = torch.as_tensor(labels).reshape(b).tolist()

    def loss_for(s: int, n: int):
        # Two sentences with the same token at a position share one input,
        # whose recovered delta is the sum of theirs: positions with fewer
        # distinct candidates than sentences are left out of the score.
        positions = [p for p in range(1, n - 1) if len(candidates[p - 1]) >= counts[p - 1]] or list(range(1, n - 1))

        def loss(hypotheses: torch.Tensor) -> torch.Tensor:  # (K, n) ids -> (K,)
            own = _output_gradients(model, module, hypotheses, labels[s])[:, positions].double()
            rows = torch.tensor([[index[(p, int(h[p]))] for p in positions] for h in hypotheses])
            wanted = deltas[rows]
            # Per position, so that a wrong token costs as much where its
            # gradient is small as where it is large.
            cosine = (own * wanted).sum(-1) / (own.norm(dim=-1) * wanted.norm(dim=-1) + 1e-30)
            return (1 - cosine).mean(-1)

        return loss

    return _search_sentences(lengths, candidates, tokenizer, loss_for, found=FOUND, restarts=restarts,
                             max_moves=max_moves, seed=seed)


def _search_sentences(lengths: Sequence[int], candidates: Sequence[Sequence[int]], tokenizer, loss_for, *,
                     found: float, restarts: int = 3, max_moves: int = 200,
                     seed: int = 0) -> torch.Tensor:
    """Each sentence of a batch, searched on its own among the candidates of its positions.

    A steepest-descent search over single substitutions, from seeded random
    starts: every step scores all hypotheses one substitution away in one
    call of the sentence's loss and takes the best, until none improves or
    the loss falls under ``found``. Sentences are searched longest first (the
    late positions' tokens can only be theirs); where a position holds as
    many distinct candidates as sentences, each token is one sentence's, and
    a certainly found sentence's tokens are withdrawn from the others.

    Args:
        lengths: B token counts, ``[CLS]`` and ``[SEP]`` included.
        candidates: for positions ``1 .. max(lengths) - 2``, candidate token ids.
        tokenizer: the victim's tokenizer (special tokens).
        loss_for: ``loss_for(sentence, length)`` returns the sentence's loss,
            ``(K, n)`` token ids to ``(K,)``, zero for the true sentence.
        found: loss under which a sentence is certainly found.
        restarts: seeded starts per sentence.
        max_moves: substitutions per start at most.
        seed: seeds the starts.

    Returns:
        ``(B, T)`` token ids padded with ``[PAD]``.
    """
    lengths = [int(n) for n in lengths]
    b, width = len(lengths), max(lengths)
    cls_id, sep_id = tokenizer.cls_token_id, tokenizer.sep_token_id
    counts = position_counts(lengths)
    generator = torch.Generator().manual_seed(seed)
    remaining = [list(c) for c in candidates]
    ids = torch.full((b, width), tokenizer.pad_token_id)
    for s in sorted(range(b), key=lambda i: -lengths[i]):
        n = lengths[s]
        loss = loss_for(s, n)
        options = remaining[: n - 2]
        best, best_loss = None, float("inf")
        for _ in range(restarts):
            h = torch.tensor([cls_id] + [c[int(torch.randint(len(c), (1,), generator=generator))]
                                         for c in options] + [sep_id])
            current = float(loss(h[None])[0])
            for _ in range(max_moves):
                moves = [(p, v) for p in range(1, n - 1) for v in options[p - 1] if v != int(h[p])]
                if not moves or current < found:
                    break
                trial = h.repeat(len(moves), 1)
                for k, (p, v) in enumerate(moves):
                    trial[k, p] = v
                losses = loss(trial)
                k = int(losses.argmin())
                if float(losses[k]) >= current - 1e-12:
                    break
                h, current = trial[k], float(losses[k])
            if current < best_loss:
                best, best_loss = h, current
            if best_loss < found:
                break
        ids[s, :n] = best
        if best_loss < found:
            for p in range(1, n - 1):
                if len(candidates[p - 1]) == counts[p - 1] and len(remaining[p - 1]) > 1:
                    remaining[p - 1].remove(int(best[p]))
    return ids


def _output_gradients(model: torch.nn.Module, module: torch.nn.Module, ids: torch.Tensor, label: int) -> torch.Tensor:
    """Gradient of each sentence's loss at ``module``'s output: ``(K, n, d_out)`` for ``(K, n)`` ids."""
    device = next(model.parameters()).device
    ids = ids.to(device)
    captured = []
    handle = module.register_forward_hook(lambda m, args, out: captured.append(out))
    try:
        with torch.enable_grad():
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
            losses = torch.nn.functional.cross_entropy(logits, torch.full((len(ids),), label, device=device),
                                                     reduction="sum")
            (delta,) = torch.autograd.grad(losses, captured[0])
    finally:
        handle.remove()
    return delta.detach().cpu()


def _checked(model, update: SharedUpdate, selection: Selection, threshold: float,
             restarts: int) -> tuple[SharedUpdate, str, torch.Tensor]:
    """What the server holds, checked before any linear algebra: ``(update, weight name, its gradient)``.

    The message itself is checked by :meth:`~gilib.slicing.SharedUpdate.validated`;
    here only what the span check adds: a BERT, its settings, labels for a
    batch, and a batch with fewer tokens than the weight's input dimensions.
    """
    if getattr(model.config, "model_type", None) != "bert":
        raise ValueError(f"The span check enumerates BERT's layer-0 inputs; got a {model.config.model_type!r} model.")
    if isinstance(restarts, bool) or not isinstance(restarts, numbers.Integral) or restarts < 1:
        raise ValueError(f"restarts must be at least 1 (a whole number), got {restarts!r}.")
    if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real) or not math.isfinite(threshold) \
            or threshold <= 0:
        raise ValueError(f"threshold must be a finite number greater than 0, got {threshold!r}.")
    update = checked_update(update, model, selection)
    batch = len(update.lengths)
    if batch > 1 and update.labels is None:
        raise ValueError(f"A batch of {batch} sentences needs its {batch} labels (one per length, "
                         f"in the same order) to assemble the sentences.")
    name, gradient = layer0_weight(model, selection, update.shared_grads)
    tokens, hidden = sum(update.lengths), gradient.shape[1]
    if tokens >= hidden:
        raise ValueError(
            f"The batch has {tokens} tokens, at least the weight's {hidden} input dimensions: its row "
            f"space can hold every input, so the check cannot tell tokens apart. Attack fewer or shorter "
            f"sentences, or use the optimisation attack."
        )
    return update, name, gradient


def batch_distance(model, shared_grads, selection, ids, lengths, labels) -> float:
    """Cosine gradient distance between a rebuilt ``(B, T)`` batch and the shared gradient."""
    device = shared_grads[0].device
    matcher = GradientMatcher(model, selection.names, "cos").matched([shared_grads])
    mask = (torch.arange(ids.shape[1])[None] < torch.tensor(list(lengths))[:, None]).long().to(device)
    labels = torch.as_tensor(labels).reshape(len(ids)).to(device)
    target = matcher.target(shared_grads, selection.names, labels, mask)
    with torch.no_grad():
        return float(matcher.loss(model.get_input_embeddings().weight[ids.to(device)], target))


def span_attack(
    model: torch.nn.Module,
    tokenizer,
    update: SharedUpdate,
    selection: Selection,
    *,
    threshold: float = DEFAULT_THRESHOLD,
    restarts: int = 3,
    seed: int = 0,
) -> AttackResult:
    """Recover a batch from the gradient of a layer-0 query, key or value weight.

    Args:
        model: the victim, as the server holds it.
        tokenizer: its tokenizer.
        update: what the client sent, e.g.
            ``gilib.client.client_update(...).shared``: one gradient per name
            of ``selection``, the batch's token counts (``[CLS]`` and
            ``[SEP]`` included) and its labels, one per length in the same
            order; as in LAMP's threat model, the server knows both. Labels
            may be ``None`` at batch size 1.
        selection: must contain layer 0's query, key or value weight (the
            first one is used; ``final_loss`` of a batch matches every tensor).
        threshold: residual under which a token is in the span.
        restarts: seeded starts of the assembly (batch size > 1).
        seed: seeds the assembly.

    Returns:
        An :class:`~gilib.attack.AttackResult` with ``method="span"``.
        ``final_loss`` is the largest residual among the chosen tokens at
        batch size 1, the assembled batch's gradient distance otherwise;
        ``timings`` holds the seconds of the check and of the assembly, the
        rank, and the smallest gap between the residuals of a position's
        last chosen and first rejected token; ``config["candidates"]`` the
        token set of every interior position. The batch's sentences come
        back in an order of their own: the gradient does not depend on it,
        so compare them with :func:`gilib.metrics.match_batch`.

    Raises:
        TypeError: if ``update`` is not a :class:`~gilib.slicing.SharedUpdate`.
        ValueError: if the model is not a BERT, the update does not fit the
            model and the selection (:meth:`~gilib.slicing.SharedUpdate.validated`:
            tensor count, shape, dtype, device, NaN or infinite values, an
            all-zero gradient, lengths, labels), a batch has no labels, no
            layer-0 query/key/value weight is selected, the settings are
            out of range, or the batch has at least as many tokens as the
            weight has input dimensions (its row space can then hold every
            input).
    """
    start = time.perf_counter()
    update, name, gradient = _checked(model, update, selection, threshold, restarts)
    shared_grads, labels, lengths = update
    batch = len(lengths)
    shift_invariant = name.endswith("key.weight")
    # A key weight's gradient spans x_i - x_[CLS]: one direction fewer per sentence.
    space = row_space(gradient, max_rank=sum(lengths) - (batch if shift_invariant else 0))
    tokens = TokenSpace(model, tokenizer)
    width = max(lengths)
    residuals = token_residuals(model, tokens, space, range(1, width - 1), shift_invariant=shift_invariant)
    sets = candidate_sets(residuals, position_counts(lengths), threshold)
    # How far the split between chosen and rejected tokens sits from the next token.
    widest = max((len(c) for c in sets), default=0)
    ordered = residuals.topk(min(widest + 1, residuals.shape[1]), dim=1, largest=False).values
    gaps = [float(row[len(s)] - row[len(s) - 1]) for row, s in zip(ordered, sets)] or [0.0]
    check_seconds = time.perf_counter() - start
    if batch == 1:
        ids = torch.tensor([[tokenizer.cls_token_id, *(s[0] for s in sets), tokenizer.sep_token_id]])
        final_loss = float(max((residuals[i, s[0]] for i, s in enumerate(sets)), default=0.0))
    else:
        ids = assemble(model, name, gradient, lengths, labels, sets, tokenizer,
                       restarts=restarts, seed=seed)
        final_loss = batch_distance(model, shared_grads, selection, ids, lengths, labels)
    seconds = time.perf_counter() - start
    token_ids = [ids[i, :n].tolist() for i, n in enumerate(lengths)]
    return AttackResult(
        texts=[tokens.decode(t) for t in token_ids],
        token_ids=token_ids,
        loss_history=[],
        final_loss=final_loss,
        seconds=seconds,
        seconds_per_step=seconds,
        method="span",
        config={"weight": name, "threshold": threshold, "restarts": restarts, "seed": seed, "candidates": sets},
        timings={"check": check_seconds, "assembly": seconds - check_seconds, "rank": space.rank,
                 "min_gap": min(gaps)},
    )
