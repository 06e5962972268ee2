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

Four steps, each a standard tool:

1. **Stack** layer 0's query and value weights, whichever the client
   shares: all their rows lie in the span of the same inputs, so the
   stack is a taller rank-n matrix with more entries to estimate it from.
   (The key weight's rows do too, but its gradient is small, softmax's
   shift invariance cancels most of it, and in float32 most of it is lost:
   on the bench's 18 sentences at lr 1e-4 adding it lowered the exact share.)
2. **Complete**: a weighted rank-n fit ``M ~ U V^T`` by alternating least
   squares, each entry weighted by the inverse square of its noise (the
   protocol's, plus a floor for what it does not model, :func:`floored`),
   and, where the weights are a 0/1 mask with no noise scale (AdamW's),
   each row's weights rescaled so that every row counts alike
   (:func:`balanced`: each row is one vector of the inputs' span, and
   where the noise is relative the small rows are the ones seen whole;
   with FedAvg's absolute noise the small rows are mostly noise)
   (:func:`completed_space`; weighted low-rank approximation, Srebro and
   Jaakkola, ICML 2003), from the plain SVD. ``V`` spans the estimated
   inputs; the check's residuals rank the vocabulary against it.
3. **Refit** from the sentence the residuals point at
   (:func:`completed_space` with ``start``): the inputs of its right
   tokens hold the fit near the true span, so the next residuals rank
   more true tokens first; repeated until the sentence stops changing.
   (A search from a sentence with many wrong tokens stalls; the refit
   does not need the search.) On AdamW's messages the sentence repeats no
   token at neighbouring positions (:func:`distinct_neighbours`): a thin
   message lets a token's copy stand for its short neighbour.
4. **Search** (:func:`polish`): starting from each position's best token,
   the server computes candidate sentences' own gradients
   (:func:`candidate_gradients`, a position's candidates in one batched
   pass) and judges them on the message itself, entry by entry under the
   noise model: each position's best 8 tokens are tried against
   ``sum w (M - G(sentence))^2`` with the label that fits best, and the
   single best change is made until none helps. If the result is not a
   sharp minimum (:data:`SHARP`) the server refits once more from it and
   searches again, then widens to each position's 32 best tokens, and
   last tries pairs of neighbouring positions at once (:data:`PAIRS`) and
   then shifts of a short window by one position (:func:`shift_moves`).
   That last stage sweeps the :func:`suspects` first, each with its
   :data:`SUSPECT_TOKENS` best tokens, and makes a change that helps there
   before sweeping the other positions; after a pair or shift move the
   single stages run again from the narrow width. On AdamW's messages
   (``polish``'s ``eager``) every stage sweeps the suspects first, each
   with its :data:`EAGER_SUSPECT_TOKENS` best tokens, then the other
   positions a few at a time, most doubtful first, and stops at the first
   group with a change that helps (:data:`EAGER_CHUNK`); a sweep also tries
   its helpful changes made together (:func:`combined`): a long sentence
   left many tokens off then needs fewer and cheaper sweeps.
   Several rounds' LoRA messages of one sentence
   (:func:`gilib.attack.adapter_span_attack` given each round's global
   model) are judged block by block, each round's candidate gradient at
   that round's model, the distances summed (``polish``'s ``later``).

The noise model comes from the protocol (:meth:`gilib.client.FedAvg.entry_weights`,
:meth:`gilib.client.AdamW.entry_weights`); the attack is
:func:`gilib.attack.span_attack` with ``weights=``.
"""

from __future__ import annotations

import math
import time
from typing import Callable, NamedTuple, Sequence

import torch

from .rowspace import RowSpace, layer0_inputs

LAYER0_PROJECTIONS = ("attention.self.query.weight", "attention.self.value.weight")
"""The layer-0 input projections stacked (see the module docstring for the key weight)."""

ITERATIONS = 100
"""Alternating least-squares sweeps of :func:`completed_space`."""

MASK_ITERATIONS = 40
"""The first fit's sweeps for a 0/1 mask (one AdamW step's message of layer
0's own weights, rows balanced; not a LoRA victim's adapters): it settles
sooner, and a long sentence's search needs the time."""

CANDIDATES = (8, 32)
"""Tokens per position :func:`polish` tries, by increasing residual: the
first number until no single change helps, then one wider pass with the
second (a true token that ranked ninth to thirty-second)."""

PAIRS = 16
"""Tokens per position of the pair moves that end :func:`polish` when single
changes leave the sentence short of a sharp minimum: two neighbouring wrong
tokens (a word split differently, "##iche street" for "##s ,") can each
make the other's fix look worse, and only both at once lower the distance."""

PAIR_POSITIONS = 4
"""Positions whose neighbourhoods the pair moves try: those whose token is
furthest down its own residual ranking (a position the residuals disagree
with), each with its left and right neighbour."""

SHIFT_WINDOW = 4
"""Longest window :func:`shift_moves` shifts by one position (0: no shift
moves). A search from residuals can settle on a stretch of the sentence one
position off ("hackney ##ed movie" where the truth is "##y hackney ##ed"):
every token of it is wrong where it stands, so no single or pair change
helps, and only the whole stretch moved back does."""

SHIFT_TOKENS = 8
"""Tokens :func:`shift_moves` tries at the position a shift frees, by increasing residual."""

SUSPECT_TOKENS = 64
"""Tokens per position the last stage of :func:`polish` (the one with pair
moves) tries first at the :func:`suspects`, by increasing residual. A long
sentence far from the truth (59 tokens, one AdamW step at lr 2e-5) can hold
a true token that ranks past the widest stage's 32 where it stands ("##s"
33rd behind "##iche", the token of its neighbour); trying it at every
position would double that stage's cost, at the few suspects it is cheap."""

EAGER_SUSPECT_TOKENS = 16
"""Tokens per position an eager :func:`polish` (one AdamW step's message) tries
at the :func:`suspects` in its stages before the last, by increasing residual.
Where a neighbour's token was copied over a short true one ("##iche ##iche"
for "##iche ##s") the true token can rank just past the narrow stage's 8
there, and only the widest stage, after the slowest sweeps, would try it."""

EAGER_CHUNK = 8
"""Positions per group an eager :func:`polish` sweeps after the suspects,
most doubtful first (the largest residual of the token they hold): a group
with a change that helps ends the sweep, and only a sweep that finds nothing
reaches every position. On a long sentence a full sweep costs seconds, and
its helpful changes are mostly at the doubtful positions."""

REFITS = 4
"""Times :func:`gilib.attack.span_attack` refits the span from the sentence
the residuals point at (:func:`completed_space`'s ``start``), until that
sentence stops changing."""

REFIT_ITERATIONS = 30
"""Alternating sweeps of a refit (it starts near the answer)."""

SHARP = 3.0
""":func:`polish` widens its candidates only while the sentence is not a
sharp minimum: some single change tried came within this factor of its
distance. Any change to a true sentence moves its gradient far from the
message; a sentence with one wrong token has neighbours (other wrong
tokens there) about as far from it as itself."""


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


def stacked_adapter_entries(selection_names: Sequence[str], messages: Sequence[Sequence[torch.Tensor]], weights: Sequence[Sequence[torch.Tensor]],
                            adapter_names: Sequence[str]) -> tuple[list[list[str]], torch.Tensor, torch.Tensor]:
    """Layer-0 ``A`` adapter gradients of one or several rounds and their entry weights, stacked row-wise.

    The weighted counterpart of :func:`gilib.attack.adapters.stacked_adapter_rows`:
    every ``A`` gradient's rows lie in the span of the sentence's layer-0
    inputs, so the stack is a low-rank matrix seen through the noise its
    weights describe, as :func:`stacked_projections`' is. Blocks are kept
    at their own scale (the weights carry it: scaling a block would scale
    its noise too); a zero block (``B = 0``) adds nothing and is left out.

    Args:
        selection_names: the selection's names, one per tensor of a message.
        messages: one list of tensors per round (one per selection name).
        weights: one list of entry weights per round, the messages' shapes.
        adapter_names: the ``A`` weights to stack (query and value of layer 0).

    Returns:
        ``(names per round, (m, d_in) matrix, (m, d_in) weights)`` in float64.
    """
    names, blocks, block_weights = [], [], []
    for message, entry in zip(messages, weights):
        by_name, by_weight = dict(zip(selection_names, message)), dict(zip(selection_names, entry))
        own = [n for n in adapter_names if bool(by_name[n].detach().abs().max() > 0)]
        names.append(own)
        blocks += [by_name[n].detach().double() for n in own]
        block_weights += [by_weight[n].detach().double() for n in own]
    if not blocks:
        return names, torch.empty(0, 0, dtype=torch.float64), torch.empty(0, 0, dtype=torch.float64)
    return names, torch.cat(blocks), torch.cat(block_weights)


def completed_space(matrix: torch.Tensor, weights: torch.Tensor, rank: int,
                    iterations: int = ITERATIONS, start: torch.Tensor | None = None,
                    deadline: float | None = None) -> RowSpace:
    """The row space of the weighted rank-``rank`` fit of ``matrix``.

    Minimises ``sum_ij w_ij (M_ij - (U V^T)_ij)^2`` by alternating least
    squares from the plain SVD's leading ``rank`` directions. Entries of
    weight 0 are missing (matrix completion).

    Args:
        matrix: ``(m, d)`` the stacked message.
        weights: ``(m, d)`` non-negative entry weights, ``1 / noise^2``.
        rank: ``n``, the number of inputs (the token count at batch size 1).
        iterations: alternating sweeps.
        start: ``(rank, d)`` rows spanning the first guess (a candidate
            sentence's inputs); ``None`` starts from the plain SVD.
        deadline: a :func:`time.perf_counter` time after which no further
            sweep starts (the fit so far is returned; at least one sweep runs).

    Returns:
        A :class:`~gilib.attack.rowspace.RowSpace` of ``rank`` orthonormal
        directions (``singular_values`` those of the plain message).
    """
    matrix, weights = matrix.double(), weights.double()
    _, values, vh = torch.linalg.svd(matrix, full_matrices=False)
    v = vh[:rank].T.clone() if start is None else torch.linalg.qr(start.double().T)[0]
    weighted = weights * matrix
    # A ridge far below any real entry's weight keeps rows with no weight solvable.
    ridge = 1e-12 * float(weights[weights > 0].median()) * torch.eye(rank, dtype=matrix.dtype)
    for sweep in range(iterations):
        if sweep and deadline is not None and time.perf_counter() > deadline:
            break
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


def balanced(weights: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """Entry weights rescaled so that every row of ``matrix`` counts alike in the fit.

    Row ``j`` of a layer-0 projection's gradient is ``sum_i delta_ij x_i``:
    each row is one vector of the inputs' span, and its size is the size
    of that output's ``delta``. Under entry weights alone the few largest
    rows decide the fitted span; but where the noise is relative (one
    AdamW step resolves small gradients and loses large ones) the small
    rows are the ones seen whole. Dividing each row's weights by its
    weighted mean square makes every row one equal vote. Rows with no
    weight stay at 0.
    """
    total = weights.sum(dim=1)
    square = (weights * matrix.square()).sum(dim=1) / total.clamp_min(1e-300)
    scale = torch.where((total > 0) & (square > 0), 1 / square.clamp_min(1e-300), torch.zeros_like(square))
    return weights * scale[:, None]


def candidate_gradients(model: torch.nn.Module, names: Sequence[str], sentences: torch.Tensor,
                        label: int) -> torch.Tensor:
    """Each sentence's own gradient of the stacked layer-0 projections, in one batched pass.

    A linear layer's weight gradient is ``sum_t delta_t x_t^T`` over a
    sentence's tokens; with the layer's inputs ``x`` and output gradients
    ``delta`` captured for a whole batch, one einsum gives every
    sentence's gradient (the batch's sentences do not interact: no padding,
    the loss a sum). The same numbers as
    :func:`gilib.attack.peeling.sentence_gradients` sentence by sentence.
    A LoRA adapter's ``A`` (Hu et al., ICLR 2022) is such a linear layer
    too (peft's ``lora_A``, whose input is the projection's input ``x``
    and output ``A x``), so the same einsum gives its gradient.

    Args:
        model: the victim (a BERT, or a LoRA victim of one).
        names: parameter names from :func:`stacked_projections`, or
            layer-0 ``lora_A`` weights (:func:`stacked_adapter_entries`).
        sentences: ``(B, T)`` token ids, every sentence the same length.
        label: the class every sentence is scored with.

    Returns:
        ``(B, k * d_out, d_in)`` in float64, stacked as :func:`stacked_projections` does.
    """
    # Each weight's own module: the projection, or the adapter's lora_A inside it.
    modules = [model.get_submodule(name.rsplit(".", 1)[0]) for name in names]
    seen: dict[int, tuple] = {}
    hooks = [m.register_forward_hook(lambda _m, inputs, output, k=k: seen.__setitem__(k, (inputs[0], output)))
             for k, m in enumerate(modules)]
    device = next(model.parameters()).device
    sentences = sentences.to(device)
    try:
        with torch.enable_grad():
            logits = model(input_ids=sentences, attention_mask=torch.ones_like(sentences)).logits
            labels = torch.full((len(sentences),), label, device=device)
            loss = torch.nn.functional.cross_entropy(logits, labels, reduction="sum")
            deltas = torch.autograd.grad(loss, [seen[k][1] for k in range(len(modules))])
    finally:
        for hook in hooks:
            hook.remove()
    return torch.cat([torch.einsum("bto,bti->boi", d.double(), seen[k][0].detach().double())
                      for k, d in enumerate(deltas)], dim=1)


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


class Polished(NamedTuple):
    """What :func:`polish` returns."""

    ids: list[int]
    """The sentence, ``[CLS]`` and ``[SEP]`` included."""
    distance: float
    """Its weighted squared distance to the message, per entry of positive weight."""
    sharp: bool
    """Whether every single change tried at least :data:`SHARP`-folds the distance."""
    judged: int = 0
    """Candidate sentences whose gradient the search computed (each label's counted)."""


def polish(model: torch.nn.Module, names: Sequence[str], matrix: torch.Tensor, weights: torch.Tensor,
           ids: Sequence[int], residuals: torch.Tensor, candidates: Sequence[int] = CANDIDATES,
           sweeps: int = 16, deadline: float | None = None, clipped: bool = False, pairs: int = 0,
           later: Sequence[tuple[torch.nn.Module, Sequence[str]]] = (), eager: bool = False,
           judged: int | None = None) -> Polished:
    """Judge each position's best few tokens on the message itself, under its noise model.

    Args:
        model: the victim (the first round's global model, with ``later``).
        names: the stacked tensors' parameter names (:func:`stacked_projections`).
        matrix: ``(m, d)`` the stacked message: ``names``' rows, then each
            ``later`` round's.
        weights: ``(m, d)`` its entry weights.
        ids: the sentence so far, ``[CLS]`` and ``[SEP]`` included.
        residuals: ``(n - 2, V)`` every token's residual at each interior position.
        candidates: tokens tried per position, by increasing residual, in
            widening stages: each stage runs until no single change helps,
            and the next runs only if the result is not a sharp minimum
            (:data:`SHARP`).
        sweeps: moves at most over all stages: each pass tries every
            position's candidates and makes the single best change.
        deadline: a :func:`time.perf_counter` time to stop at. The result
            then depends on the machine and its load; ``judged`` does not.
        clipped: the message is the gradient times an unknown factor in
            ``[0, 1]`` (DP-SGD clips each example's gradient over every
            parameter, which the server does not see): each candidate's
            gradient is scaled by its least-squares factor before the
            distance is taken.
        pairs: after the single changes, if the sentence is still not a
            sharp minimum, try changing two neighbouring positions at once,
            each to one of its ``pairs`` best tokens, around the
            :data:`PAIR_POSITIONS` positions whose token ranks lowest by
            its residual; a pair that helps is made and the single stages
            run again (the narrow width first, then ``candidates``' last).
            0: no pair moves. If no pair helps either, :func:`shift_moves`
            tries shifting a short window around the same positions (or a
            repeated token) by one (:data:`SHIFT_WINDOW`); a shift that
            helps is made and the single stages run again. With ``pairs``,
            each sweep of the single stages first tries the
            :func:`suspects`' :data:`SUSPECT_TOKENS` best tokens, and makes
            the best change that helps there before sweeping the rest.
        later: several rounds' messages of one sentence (LoRA ``A``
            adapters, :func:`gilib.attack.adapter_span_attack`): per later
            round, ``(its global model, its stacked names)``, in the order
            of ``matrix``'s blocks (:func:`stacked_adapter_entries`). A
            candidate's gradient is then every round's block, each taken at
            its own round's model, and the distance sums over all of them
            (with ``clipped``, each round's block gets its own factor: each
            round's client clipped its own gradient). Empty: one message,
            ``names`` at ``model``.
        eager: for a long sentence far from the truth, where a sweep costs
            a batched pass per position and each sweep makes one change:
            every stage (not only the last) sweeps the :func:`suspects`
            first (before the last stage with their
            :data:`EAGER_SUSPECT_TOKENS` best tokens), then the other
            positions in groups of :data:`EAGER_CHUNK`, the largest residual
            of the token they hold first, and makes the best change as soon
            as a group has one that helps; a sweep also tries its helpful
            changes made together (:func:`combined`), keeping the best
            single change or group.
        judged: candidate sentences judged at most (each one a gradient
            computed), over all stages: the search stops where it stands
            once it has judged as many (the batch under way finishes).
            Machine-independent, so the same message gives the same
            sentence anywhere. ``None``: no limit.

    Returns:
        A :class:`Polished`: the sentence, its weighted squared distance to
        the message per entry of positive weight, whether it is a sharp
        minimum, and how many candidate sentences it judged.

    Raises:
        ValueError: ``judged`` is not a whole number >= 0 (or ``None``).
    """
    if judged is not None and (isinstance(judged, bool) or not isinstance(judged, int) or judged < 0):
        raise ValueError(f"judged must be how many candidate sentences the search may judge, a whole number "
                         f">= 0 (or None for no limit), got {judged!r}.")
    scale = weights / weights[weights > 0].mean()
    entries = int((weights > 0).sum())
    # Each round's block: its global model, its names and its rows of ``matrix``.
    blocks, row = [], 0
    for block_model, block_names in [(model, names), *later]:
        block_names = list(block_names)
        rows = sum(block_model.get_parameter(n).shape[0] for n in block_names)
        if block_names:
            blocks.append((block_model, block_names, slice(row, row + rows)))
        row += rows
    if row != len(matrix):
        raise ValueError(f"The message stacks {len(matrix)} rows, and the rounds' names {row}: give each round's "
                         f"(model, names) in the order its block was stacked.")

    spent = 0  # candidate sentences judged so far

    def stopped() -> bool:
        """Whether the deadline has passed or ``judged`` sentences have been judged."""
        return (deadline is not None and time.perf_counter() > deadline) or (judged is not None and spent >= judged)

    def left() -> int | None:
        """What is left of ``judged`` for a search started from here."""
        return None if judged is None else max(judged - spent, 0)

    def distances(sentences: list[list[int]], label: int) -> list[float]:
        nonlocal spent
        spent += len(sentences)
        batch = torch.tensor(sentences)
        parts = []
        for block_model, block_names, rows in blocks:
            own = candidate_gradients(block_model, block_names, batch, label)
            if clipped:
                # The least-squares factor in [0, 1] that the client's clipping applied.
                seen, noise = matrix[rows], scale[rows]
                factor = (noise * seen * own).sum(dim=(1, 2)) / (noise * own.square()).sum(dim=(1, 2))
                own = own * factor.clamp(0.0, 1.0).nan_to_num(0.0)[:, None, None]
            parts.append(own)
        own = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        return ((scale * (matrix - own).square()).sum(dim=(1, 2)) / entries).tolist()

    ids = list(ids)
    classes = range(model.config.num_labels)
    # The label that fits the starting sentence best, kept for the search
    # (one backward pass per move instead of one per class).
    current, label = min((distances([ids], y)[0], y) for y in classes)
    # Best improvement, not first: one wrong token changes the sentence's
    # gradient everywhere (attention mixes positions), so from a sentence
    # with one wrong token, fixing it is the one move that drops the
    # distance by orders of magnitude, while a first-improvement search
    # takes whichever small gain elsewhere it meets first.
    moves, runner_up = 0, 0.0
    # The last stage (the one with pair moves; with eager, every stage) sweeps the
    # suspects first, in the last stage each with its SUSPECT_TOKENS best tokens, and
    # makes a change that helps there before sweeping the rest: on a long sentence a
    # sweep costs seconds per position.
    # Eager, the stages before the last try EAGER_SUSPECT_TOKENS there.
    ahead_width = SUSPECT_TOKENS if pairs else EAGER_SUSPECT_TOKENS if eager else 0
    for width in candidates:
        options = residuals.topk(min(width, residuals.shape[1]), dim=1, largest=False).indices.tolist()
        front = residuals.topk(min(ahead_width, residuals.shape[1]), dim=1, largest=False).indices.tolist() \
            if ahead_width > width else options  # the suspects' tokens
        while moves < sweeps:
            best, runner_up = (current, None), float("inf")
            changes: dict[int, tuple[float, int]] = {}  # each position's best change that helps
            ahead = suspects(ids, residuals) if pairs or eager else []
            rest = [p for p in range(1, len(ids) - 1) if p not in ahead]
            if eager:
                # The other positions most doubtful first, in groups of EAGER_CHUNK.
                rest.sort(key=lambda p: -float(residuals[p - 1, ids[p]]))
            size = EAGER_CHUNK if eager else max(len(rest), 1)
            groups = [[(p, front[p - 1]) for p in ahead]]
            groups += [[(p, options[p - 1]) for p in rest[i:i + size]] for i in range(0, len(rest), size)]
            for group in groups:
                if best[1] is not None:
                    break  # a change helps: made before the later groups are swept
                for position, tokens in group:
                    if stopped():
                        break
                    trials = [ids[:position] + [t] + ids[position + 1:] for t in tokens if t != ids[position]]
                    for value, trial in zip(distances(trials, label), trials):
                        runner_up = min(runner_up, value)
                        if value < changes.get(position, (current,))[0]:
                            changes[position] = (value, trial[position])
                        if value < best[0]:
                            best = (value, trial)
            if best[1] is None:
                break
            # With eager, the sweep's other helpful changes too, together, where that fits better still.
            late = stopped()
            together = combined(ids, changes) if eager and not late else []
            for value, trial in zip(distances(together, label) if together else [], together):
                if value < best[0]:
                    best = (value, trial)
            (current, ids), moves = best, moves + 1
        if runner_up >= SHARP * current:
            break
    # After a pair or shift move, the single stages run again from the narrow
    # width: a move that reached the truth leaves a sharp minimum that one
    # narrow sweep shows (a wide sweep of a long sentence costs tens of seconds).
    confirm = tuple(sorted({min(CANDIDATES[0], candidates[-1]), candidates[-1]})) if candidates else ()
    if pairs and runner_up < SHARP * current:
        spans = sorted({(a, a + 1) for p in suspects(ids, residuals, repeats=False) for a in (p - 1, p)
                        if 1 <= a and a + 1 <= len(ids) - 2})
        options = residuals.topk(min(pairs, residuals.shape[1]), dim=1, largest=False).indices.tolist()
        best = (current, None)
        for a, b in spans:
            if stopped():
                break
            trials = [ids[:a] + [s, t] + ids[b + 1:] for s in options[a - 1] for t in options[b - 1]
                      if s != ids[a] and t != ids[b]]
            for value, trial in zip(distances(trials, label), trials):
                if value < best[0]:
                    best = (value, trial)
        if best[1] is not None:
            # Made; then the single stages once more from it, the narrow one first.
            again = polish(model, names, matrix, weights, best[1], residuals, candidates=confirm, sweeps=sweeps,
                           deadline=deadline, clipped=clipped, pairs=pairs, later=later, eager=eager, judged=left())
            kept = again if again.distance < best[0] else Polished(best[1], best[0], False)
            return kept._replace(judged=spent + again.judged)
    if pairs and runner_up < SHARP * current:
        # Still not a sharp minimum after the pair moves: try shifting a stretch by one position.
        shifted = shift_moves(lambda trials: distances(trials, label), ids, current, residuals, stop=stopped)
        if shifted.ids != ids:
            # Made; then the single stages once more from it, the narrow one first.
            again = polish(model, names, matrix, weights, shifted.ids, residuals, candidates=confirm, sweeps=sweeps,
                           deadline=deadline, clipped=clipped, pairs=pairs, later=later, eager=eager, judged=left())
            kept = again if again.distance < shifted.distance else shifted
            return kept._replace(judged=spent + again.judged)
    current = min(distances([ids], y)[0] for y in classes)
    return Polished(ids, current, runner_up >= SHARP * current, spent)


def model_distance(model: torch.nn.Module, names: Sequence[str], matrix: torch.Tensor, ids: Sequence[int],
                   clipped: bool = True, weights: torch.Tensor | None = None) -> float:
    """The model's likelihood of one sentence: the message's distance to the sentence's own gradient.

    :func:`polish` with no moves returns its start's distance: the mean
    squared difference per entry between ``matrix`` and the sentence's
    gradient (times its least-squares factor in ``[0, 1]`` with ``clipped``),
    at the label that fits best. Under Gaussian noise of standard deviation
    ``s`` per entry the client's sentence sits at about ``s^2`` (the noise
    floor, :func:`floor_z`); a sentence with a wrong token sits above it.

    Args:
        model: the victim.
        names: the stacked tensors' parameter names (:func:`stacked_projections`).
        matrix: ``(m, d)`` the stacked message.
        ids: the sentence, ``[CLS]`` and ``[SEP]`` included.
        clipped: fit the clipping factor (DP-SGD's messages).
        weights: ``(m, d)`` entry weights, as :func:`polish` reads them
            (the noise model's, e.g. :func:`floored`); ``None``: every entry
            alike. Two sentences' distances under the same weights say which
            one the message prefers: the client's sentence above a wrong one
            means the message, read through this noise model, cannot tell
            them apart.
    """
    unused = torch.zeros(len(ids) - 2, 1)  # no moves: no candidates are read
    weights = torch.ones_like(matrix) if weights is None else weights
    return polish(model, names, matrix, weights, ids, unused, sweeps=0, clipped=clipped).distance


def floor_z(distance: float, noise: float, entries: int) -> float:
    """How far a sentence's :func:`model_distance` sits above the noise floor, in the floor's standard deviations.

    With Gaussian noise of standard deviation ``noise`` in each of
    ``entries`` entries, the client's sentence leaves the noise alone: a
    mean square of ``noise^2`` with standard deviation
    ``noise^2 sqrt(2 / entries)`` (a chi-square). About 0 (within 3) for the
    client's sentence; a sentence with a wrong token sits higher, by as
    much as the model's gradient tells the two apart.

    Raises:
        ValueError: ``noise`` is not a positive finite number (without
            noise there is no floor to stand above), or ``entries`` < 1.
    """
    if isinstance(noise, bool) or not isinstance(noise, (int, float)) or not math.isfinite(noise) or noise <= 0:
        raise ValueError(f"noise must be the message's per-entry noise standard deviation, a positive number, "
                         f"got {noise!r}: a noiseless message has no floor to measure against.")
    if isinstance(entries, bool) or not isinstance(entries, int) or entries < 1:
        raise ValueError(f"entries must be the message's entry count, a whole number of at least 1, got {entries!r}.")
    floor = noise ** 2
    return (distance - floor) / (floor * math.sqrt(2 / entries))


def combined(ids: Sequence[int], changes: dict[int, tuple[float, int]]) -> list[list[int]]:
    """Sentences that make several of one sweep's helpful single changes at once.

    On a long sentence far from the truth one sweep of :func:`polish` costs
    a batched pass per position, and each sweep used to make one change:
    a sentence with many wrong tokens took as many sweeps. Most of the
    wrong tokens' fixes each help on their own (the true token lowers the
    distance wherever it stands), so the sweep's other helpful changes are
    made too, as a few candidates judged like any other: the best two,
    four, eight and so on, and all of them (the caller keeps whichever,
    single change or group, is closest to the message). Neighbouring
    positions are never changed together: their changes are often two
    fixes of one error (a token copied onto its neighbour can be replaced
    at either end), and only one of them is right.

    Args:
        ids: the sentence, ``[CLS]`` and ``[SEP]`` included.
        changes: per position, the distance its best helpful change reaches and that change's token.

    Returns:
        Sentences with 2 or more changes, fewest first (none if fewer than two can be combined).
    """
    chosen: list[int] = []
    for position in sorted(changes, key=lambda p: changes[p][0]):
        if all(abs(position - other) > 1 for other in chosen):
            chosen.append(position)
    sizes = sorted({min(2 ** k, len(chosen)) for k in range(1, max(len(chosen), 2).bit_length() + 1)})
    sentences = []
    for size in (s for s in sizes if s >= 2):
        sentence = list(ids)
        for position in chosen[:size]:
            sentence[position] = changes[position][1]
        sentences.append(sentence)
    return sentences


def distinct_neighbours(ids: Sequence[int], residuals: torch.Tensor) -> list[int]:
    """The sentence with no token repeated by its neighbour: each repeat's worse-fitting copy replaced.

    Where the message is thin (one AdamW step at a small learning rate) a
    short true token ("s", "to", ",") often ranks behind its neighbour's
    token, whose input differs from the neighbour's own only by a position:
    the residuals then read "tough tough" for "s tough". Of the two copies
    the wrong one is most often the one whose residual is the larger (the
    token fits its own position better), and it takes its best token (of
    the narrow stage's :data:`CANDIDATES`) that repeats neither neighbour.
    A refit started from such a sentence spans one more of the inputs'
    directions per repeat than from the repeats themselves.
    A true repeat ("- -") is lost here, and its token still ranks first at
    that position for the search to put back.

    Args:
        ids: the sentence, ``[CLS]`` and ``[SEP]`` included.
        residuals: ``(n - 2, V)`` every token's residual at each interior position.

    Returns:
        The sentence, left to right with no interior token equal to the one before it (a
        copy none of whose best tokens differs from both neighbours is kept).
    """
    ids = list(ids)
    for position in range(1, len(ids) - 2):
        if ids[position] != ids[position + 1]:
            continue
        token = ids[position]
        worse = max((position, position + 1), key=lambda p: float(residuals[p - 1, token]))
        width = min(CANDIDATES[0], residuals.shape[1])
        ranked = residuals[worse - 1].topk(width, largest=False).indices.tolist()
        ids[worse] = next((t for t in ranked if t not in (ids[worse - 1], ids[worse + 1])), token)
    return ids


def suspects(ids: Sequence[int], residuals: torch.Tensor, repeats: bool = True) -> list[int]:
    """The positions a search from residuals most likely got wrong.

    The :data:`PAIR_POSITIONS` positions whose token ranks lowest by its own
    residual (ties: the earlier first), then, with ``repeats``, every
    position whose token repeats a neighbour's. A shifted stretch's tokens
    can each rank well where they stand (neighbouring positions' inputs
    differ little), and so can a neighbour's token copied over a short true
    one ("##iche ##iche" for "##iche ##s"): its seam repeats a token.

    Args:
        ids: the sentence, ``[CLS]`` and ``[SEP]`` included.
        residuals: ``(n - 2, V)`` every token's residual at each interior position.
        repeats: add the positions that repeat a neighbour's token.

    Returns:
        Interior positions, lowest-ranked first, each once.
    """
    last = len(ids) - 2
    ranks = [int((residuals[p - 1] < residuals[p - 1, t]).sum()) for p, t in enumerate(ids[1:-1], start=1)]
    chosen = sorted(range(1, last + 1), key=lambda p: -ranks[p - 1])[:PAIR_POSITIONS]
    if repeats:
        chosen += [p for p in range(1, last + 1) if ids[p] in (ids[p - 1], ids[p + 1]) and p not in chosen]
    return chosen


def shift_moves(distances: Callable[[list[list[int]]], list[float]], ids: Sequence[int], current: float,
                residuals: torch.Tensor, window: int | None = None, tokens: int = SHIFT_TOKENS,
                stop: Callable[[], bool] | None = None) -> Polished:
    """Best-improvement descent over shifts of a short window by one position, the last stage of :func:`polish`.

    For each window ``[a, b]`` of 2 to ``window`` positions around a suspect
    position (one of the :data:`PAIR_POSITIONS` whose token ranks lowest by
    its residual, as the pair stage picks them, or a token that repeats its
    neighbour), two moves are tried, each with every one of the ``tokens``
    best tokens ``t`` (by residual) of the position it frees, and with the
    token it drops (a rotation of the window; two neighbours swapped):

    * left: drop ``ids[a]``, move ``ids[a + 1 .. b]`` one to the left, put ``t`` at ``b``;
    * right: drop ``ids[b]``, move ``ids[a .. b - 1]`` one to the right, put ``t`` at ``a``.

    Tokens outside the window keep their positions, so the sentence keeps
    its length (the rank fixed it). The single best move is made, the
    suspects are found again, and the search repeats until no move helps or
    ``stop`` says so. A shifted stretch is a local minimum that single
    and pair changes cannot leave: every one of its tokens is wrong where
    it stands, and fixing one alone puts it next to a wrong neighbour.

    Args:
        distances: a batch of candidate sentences' distances to the message
            (:func:`polish`'s, with its label).
        ids: the sentence, ``[CLS]`` and ``[SEP]`` included.
        current: its distance.
        residuals: ``(n - 2, V)`` every token's residual at each interior position.
        window: the longest window shifted; ``None``: :data:`SHIFT_WINDOW`.
        tokens: tokens tried at the freed position.
        stop: called before each window's moves are judged; ``True``
            stops the search where it stands (:func:`polish`'s deadline or
            count of sentences judged). ``None``: never.

    Returns:
        A :class:`Polished` with the sentence after the moves made (``ids``
        if none helped), its distance, and ``sharp`` False (the caller
        judges sharpness with its single stage).
    """
    window = SHIFT_WINDOW if window is None else window
    ids, last = list(ids), len(ids) - 2
    options = residuals.topk(min(tokens, residuals.shape[1]), dim=1, largest=False).indices.tolist()
    improved = True
    while improved and window >= 2:
        improved = False
        windows = sorted({(a, a + size - 1) for p in suspects(ids, residuals) for size in range(2, window + 1)
                          for a in range(p - size + 1, p + 1) if 1 <= a and a + size - 1 <= last})
        # The dropped token is tried at the freed position too: a rotation (a swap, for two positions).
        groups = [[ids[:a] + ids[a + 1:b + 1] + [t] + ids[b + 1:] for t in options[b - 1] + [ids[a]]]
                  + [ids[:a] + [t] + ids[a:b] + ids[b + 1:] for t in options[a - 1] + [ids[b]]]
                  for a, b in windows]
        best, seen = (current, None), {tuple(ids)}
        for group in groups:
            if stop is not None and stop():
                break
            trials = []
            for trial in group:
                if tuple(trial) not in seen:
                    seen.add(tuple(trial))
                    trials.append(trial)
            for value, trial in zip(distances(trials) if trials else [], trials):
                if value < best[0]:
                    best = (value, trial)
        if best[1] is not None:
            (current, ids), improved = best, True
    return Polished(ids, current, False)
