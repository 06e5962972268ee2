"""The exact attack: the span check at batch size 1, peeling for batches, and on LoRA adapters.

:func:`span_attack` is the entry point of the optimisation-free attack of
chapter 5. It checks the server's message, runs the row-space check of
:mod:`gilib.attack.rowspace` on a layer-0 query, key or value weight (DAGER,
Petrov et al., NeurIPS 2024), reads a single sentence off directly and
hands a batch to :func:`gilib.attack.peeling.peel`. On a LoRA victim it
checks the stacked layer-0 ``A`` adapter gradients instead
(:mod:`gilib.attack.adapters`), and :func:`adapter_span_attack` stacks
several rounds' messages of one sentence.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict
from typing import Iterable, Sequence

import torch

from ..models import is_decoder
from ..selection import Selection, adapter_parameters
from ..update import SharedUpdate, checked_update
from .adapters import layer0_adapter_names, stacked_adapter_rows, stacked_label
from .config import SpanConfig, checked_config
from .decoder import decoder_span_attack
from .likelihood import likely_sentence
from .objectives import GradientMatcher
from .optimization import Round
from .peeling import peel
from .priors import NgramPrior
from .result import AttackResult, SpanDiagnostics
from .completion import (CANDIDATES, ITERATIONS, MASK_ITERATIONS, PAIRS, REFIT_ITERATIONS, REFITS, SHARP, balanced,
                         completed_space, distinct_neighbours, floor_z, floored, model_distance, outside_share, polish,
                         sentence_inputs, stacked_adapter_entries, stacked_projections)
from .rowspace import check_positions, token_residuals
from .tokens import TokenSpace

_LAYER0_INPUTS = ("attention.self.query.weight", "attention.self.key.weight", "attention.self.value.weight")
_LAYER1_INPUTS = ("attention.self.query.weight", "attention.self.value.weight")
_LAYER0_FFN = ("output.dense.weight", "intermediate.dense.weight")
_NOISY_ADAPTERS = ("query", "value")
"""The adapters whose ``A`` gradients the weighted check stacks: as for full weights
(:data:`gilib.attack.completion.LAYER0_PROJECTIONS`), the key's is left out."""


def _layer0_weight(model: torch.nn.Module, selection: Selection, shared_grads: Sequence[torch.Tensor]):
    """The first layer-0 query, key or value weight in a selection: ``(name, gradient)``.

    Raises:
        ValueError: if the selection has none, with what to select instead.
    """
    stem = f"{model.base_model_prefix}.encoder.layer.0."
    wanted = {stem + s for s in _LAYER0_INPUTS}
    for name, gradient in zip(selection.names, shared_grads):
        if name in wanted:
            return name, gradient
    if layer0_adapter_names(model, selection):
        # A LoRA victim: every layer-0 query/key/value A gradient, stacked
        # (:mod:`gilib.attack.adapters`); their rows lie in the inputs' span.
        names, stacked = stacked_adapter_rows(model, selection, shared_grads)
        return stacked_label(names), stacked
    raise ValueError(
        f"The span check needs the gradient of layer 0's query, key or value weight (or, on a LoRA victim, of "
        f"a layer-0 query, key or value A adapter), and {selection.label} has none: select e.g. "
        f"select(model, 'attention.query', 0), 'layer', 0, or select(model, 'lora.A', 0) on a LoRA victim."
    )


def _shift_invariant(name: str) -> bool:
    """Whether the checked weight (or every stacked adapter) is a key's: its rows span ``x_i - x_[CLS]``."""
    return all(part.endswith("self.key.weight") or ".self.key.lora_A." in part for part in name.split("+"))


def _is_adapter(name: str) -> bool:
    return ".lora_A." in name


def _checked(model, update: SharedUpdate, selection: Selection) -> tuple[SharedUpdate, str, torch.Tensor]:
    """What the server holds, checked before any linear algebra: ``(update, weight name, its gradient)``.

    The message itself is checked by :meth:`~gilib.update.SharedUpdate.validated`;
    here only what the span check adds: a BERT, and a batch with fewer
    tokens than the weight's input dimensions.
    """
    if getattr(model.config, "model_type", None) != "bert":
        raise ValueError(f"The span check enumerates BERT's layer-0 inputs; got a {model.config.model_type!r} model.")
    update = checked_update(update, model, selection)
    name, gradient = _layer0_weight(model, selection, update.shared_grads)
    _adapter_batch(name, update.lengths)
    tokens, hidden = sum(update.lengths), gradient.shape[1]
    if tokens >= hidden:
        raise ValueError(
            f"The batch has {tokens} tokens, at least the weight's {hidden} input dimensions: its row "
            f"space can hold every input, so the check cannot tell tokens apart. Attack fewer or shorter "
            f"sentences, or use the optimisation attack."
        )
    return update, name, gradient


def _adapter_batch(name: str, lengths: Sequence[int]) -> None:
    """Adapters' A gradients are checked at batch size 1 (peeling reads a plain weight's output gradients)."""
    if _is_adapter(name) and len(lengths) != 1:
        raise ValueError(f"The span check on LoRA adapters runs at batch size 1; this message holds {len(lengths)} "
                         f"sentences. Attack one client's sentence at a time.")


def _batch_distance(model, shared_grads, selection, ids, lengths, labels) -> float:
    """Cosine gradient distance between a rebuilt ``(B, T)`` batch and the shared gradient."""
    device = shared_grads[0].device
    matcher = GradientMatcher(model, selection.names, "cos").matched([shared_grads])
    mask = (torch.arange(ids.shape[1])[None] < torch.tensor(list(lengths))[:, None]).long().to(device)
    labels = torch.as_tensor(labels).reshape(len(ids)).to(device)
    target = matcher.target(shared_grads, selection.names, labels, mask)
    with torch.no_grad():
        return float(matcher.loss(model.get_input_embeddings().weight[ids.to(device)], target))


def verifier_weight(model: torch.nn.Module, selection: Selection) -> str | None:
    """The weight whose gradient checks a batch's sentences, if the selection holds one.

    Layer 1's query or value weight (DAGER's check), else layer 0's FFN
    output or input weight (:func:`gilib.attack.peeling.reads_of`); ``None``
    leaves peeling the layer-0 weight's own output gradients.
    """
    prefix = f"{model.base_model_prefix}.encoder.layer."
    wanted = [prefix + "1." + s for s in _LAYER1_INPUTS] + [prefix + "0." + s for s in _LAYER0_FFN]
    return next((name for name in wanted if name in selection.names), None)


def span_attack(
    model: torch.nn.Module,
    tokenizer,
    update: SharedUpdate,
    selection: Selection,
    config: SpanConfig | None = None,
    *,
    weights: Sequence[torch.Tensor] | None = None,
    clipped: bool = False,
    noise: float | str | None = None,
    prior: NgramPrior | None = None,
) -> AttackResult:
    """Recover a batch from the gradient of a layer-0 query, key or value weight.

    A GPT-2-style decoder (:func:`gilib.models.is_decoder`) is handed to
    :func:`gilib.attack.decoder.decoder_span_attack`: layer 0's fused
    ``c_attn`` weight gives the candidates and the causal mask an exact
    left-to-right search (``weights``, ``clipped`` and ``noise`` do not
    apply to it).

    At batch size 1 each position's token is the one with the smallest
    residual. A batch is recovered sentence by sentence
    (:func:`gilib.attack.peeling.peel`): candidates from the span check,
    a beam search checked by a weight that reads layer 0's activations
    when the selection holds one (:func:`verifier_weight`: layer 1's query
    or value weight, DAGER's check, or layer 0's FFN weights), a local
    search checked by the layer-0 weight's own output gradients otherwise,
    and each found sentence peeled off the shared gradients.

    Args:
        model: the victim, as the server holds it.
        tokenizer: its tokenizer.
        update: what the client sent, e.g.
            ``gilib.client.client_update(...).shared``: one gradient per name
            of ``selection`` and the batch's token counts (``[CLS]`` and
            ``[SEP]`` included), which the server must know, as in LAMP's
            threat model. The labels are not used: peeling finds each
            sentence's label (``diagnostics.labels``).
        selection: must contain layer 0's query, key or value weight (the
            first one is used), or, on a LoRA victim (:mod:`gilib.lora`),
            layer 0's query, key or value ``A`` adapters (``select(model,
            "lora.A", 0)``, ``"lora", 0``), whose gradients are stacked
            (:mod:`gilib.attack.adapters`; batch size 1, no ``noise`` or
            ``clipped``; exact when the stacked rank reaches the token count,
            ``diagnostics.rank``); add layer 1's query or value weight (e.g.
            ``select(model, "attention.query", [0, 1])``) or share all of
            layer 0 (``select(model, "layer", 0)``) for the faster, sharper
            check of batches.
        config: the settings (defaults: :class:`~gilib.attack.SpanConfig`).
        weights: for a message seen through known noise, one non-negative
            tensor per shared tensor: each entry's weight, ``1 / noise^2``,
            0 for a lost entry (``FedAvg(...).entry_weights(update, model,
            selection)`` for float32 FedAvg), or a 0/1 mask of the entries
            to trust, which carries no noise scale, so that every row of
            the fit then counts alike (``AdamW(...).entry_weights`` beside
            ``AdamW(...).gradient``). The check then stacks every
            layer-0 query and value weight shared, fits the weighted
            rank-n matrix nearest to them, refits it from the sentence it
            points at and searches each position's candidates against the
            message (:mod:`gilib.attack.completion`); batch
            size 1 only. ``diagnostics.outside`` is the stacked message's
            share outside the found inputs' span. On a LoRA selection the
            layer-0 query and value ``A`` gradients are stacked instead,
            with their weights, and fitted at rank ``min(n, rows)``: below
            the rank rule the fit is the stack's own subspace and the refits
            (which start from a sentence's ``n`` inputs) are skipped. For DP-SGD's Gaussian
            noise, ``DPSGD(...).entry_weights(update)``: every entry alike.
        clipped: with ``weights``: the message is the gradient times an
            unknown factor in ``[0, 1]``, as DP-SGD's per-example clipping
            over every parameter leaves it; the search fits the factor for
            each candidate sentence.
        noise: for a batch seen through noise the protocol adds to every
            entry alike: its per-entry standard deviation (SecAgg+'s
            rounding, ``gilib.secure.SecAgg().noise_std(examples)``), or
            ``"spectrum"`` to read it off the singular values past the
            token count. The rank is then read against the noise, each
            token's residual becomes a z-score against what the noise
            alone would leave it (:data:`~gilib.attack.rowspace.INSIDE_Z`),
            and the peel test's rank drop is judged against the noise floor.
            At batch size 1 (a query or value weight) the sentence is then
            the most likely one under the noise, not each position's
            smallest residual (:func:`gilib.attack.likelihood.likely_sentence`:
            for DP-SGD, ``noise=DPSGD(...).noise_std(1)``).
            ``None``: float32 round-off, the fixed thresholds.
        prior: with ``noise`` at batch size 1 (a query or value weight): a
            language prior (:class:`~gilib.attack.NgramPrior`, counted from
            text other than the attacked split, ``gilib.data.prior_texts``):
            the sentence is then the most *probable* one, the likelihood
            times the prior to the power ``config.prior_weight``.

    Returns:
        An :class:`~gilib.attack.AttackResult` with ``method="span"``, in
        the order of ``update.lengths`` (sentences of equal length in an
        order of their own: compare with :func:`gilib.metrics.match_batch`).
        ``final_loss`` is the largest residual among the chosen tokens at
        batch size 1, the rebuilt batch's gradient distance otherwise.
        ``timings`` holds the seconds of the check and of the assembly,
        ``config`` the settings, and ``diagnostics`` a
        :class:`~gilib.attack.result.SpanDiagnostics`: the weight and
        verifier used, the rank, the smallest gap between a position's last
        chosen and first rejected residual, each interior position's
        candidate tokens, and for a batch the peeling rounds, ``found``
        (each sentence verified by peeling), ``labels`` (the label each
        one's peeling showed), ``uncertain`` (each unverified sentence's
        positions whose check residual stayed high) and ``timed_out``
        (``config.time_budget`` ran out): where a batch is not fully
        resolved, the result is the best partial assembly.

    Raises:
        TypeError: if ``update`` is not a :class:`~gilib.update.SharedUpdate`
            or ``config`` not a :class:`~gilib.attack.SpanConfig`.
        ValueError: if the model is not a BERT (a decoder: as
            :func:`~gilib.attack.decoder.decoder_span_attack`, and for any of
            ``weights``, ``clipped`` or ``noise``), the update does not fit the
            model and the selection (:meth:`~gilib.update.SharedUpdate.validated`:
            tensor count, shape, dtype, device, NaN or infinite values, an
            all-zero gradient, lengths, labels), no layer-0 query/key/value
            weight is selected, or the batch has at least as many tokens as
            the weight has input dimensions (its row space can then hold
            every input), or ``weights`` do not fit the message (count,
            shapes, negative or non-finite values, none positive) or come
            with a batch, or ``noise`` is neither ``"spectrum"`` nor a
            positive number below the message's largest entry, or comes
            with ``weights``, or ``prior`` is not an n-gram prior or comes
            without a numeric ``noise`` or with a batch.
    """
    if is_decoder(model):
        if weights is not None or clipped or noise is not None or prior is not None:
            raise ValueError("weights, clipped, noise and prior describe a noisy message, which the decoder's span "
                             "check does not model: attack a decoder's plain message without them.")
        return decoder_span_attack(model, tokenizer, update, selection, config)
    start = time.perf_counter()
    cfg = checked_config(config, SpanConfig)
    update, name, gradient = _checked(model, update, selection)
    if _is_adapter(name) and (noise is not None or clipped):
        raise ValueError("The span check on LoRA adapters models a noisy message by its entry weights alone "
                         "(weights=, e.g. AdamW(...).entry_weights(...)): noise and clipped are a plain "
                         "weight's. Pass neither.")
    if prior is not None:
        if not isinstance(prior, NgramPrior):
            raise ValueError(f"prior must be an NgramPrior (the search scores the whole vocabulary at a position "
                             f"at once), got a {type(prior).__name__}: use gilib.attack.NgramPrior.from_texts("
                             f"tokenizer, gilib.data.prior_texts((dataset, split))[0]).")
        if isinstance(noise, str) or noise is None or weights is not None or len(update.lengths) != 1 \
                or _shift_invariant(name):
            raise ValueError("A prior steers the search for the most likely sentence under known noise: pass it "
                             "with noise= (the per-entry standard deviation, e.g. DPSGD(...).noise_std(1)) for one "
                             "sentence's query or value weight, not with weights, a batch, a key weight or "
                             '"spectrum".')
    return _span_check(model, tokenizer, update, selection, cfg, name, gradient, start, weights=weights,
                       clipped=clipped, noise=noise, prior=prior)


def adapter_span_attack(
    model: torch.nn.Module,
    tokenizer,
    updates: Sequence[SharedUpdate] | Sequence[Round],
    selection: Selection,
    config: SpanConfig | None = None,
    *,
    weights: Sequence[Sequence[torch.Tensor]] | None = None,
) -> AttackResult:
    """The span check on several rounds' LoRA messages of one sentence, their layer-0 ``A`` gradients stacked.

    Each round's ``A`` gradient lies in the span of the sentence's layer-0
    inputs and spans at most ``r`` of its dimensions; stacking rounds (and
    query with value) raises the rank (:func:`gilib.attack.adapters.stacked_adapter_rows`).
    The sentence is recovered exactly once the stacked rank reaches its
    token count (the rank rule; ``diagnostics.rank``); below it, each
    position's best token within what the stacked subspace lets through.
    A LoRA decoder's rounds go to :func:`gilib.attack.decoder.decoder_span_attack`
    (layer 0's ``c_attn`` ``A`` rows stacked; the rank rule counts its
    predicting inputs, the token count less the end token; a prefix check
    reads the first round's message, computed at ``model``'s weights).

    Args:
        model: the LoRA victim as the server holds it: the first round's
            global model. The rounds' messages may come from different
            global weights (``B`` moves from round to round, which is what
            lifts the stacked rank): the check reads only the rows' span,
            which every round shares, and the embeddings, which a LoRA
            client never trains.
        tokenizer: its tokenizer.
        updates: one :class:`~gilib.update.SharedUpdate` per round, each of
            ``selection`` and of the same single sentence (same length);
            or one :class:`~gilib.attack.Round` per round (``Round(its
            global model, its message)``, as
            :func:`~gilib.attack.optimization_rounds_attack` takes them),
            the first round's model being ``model``. Every round's model
            must be the same victim (the same parameters and adapters, in
            the same shapes), its weights moved. The models matter only
            with ``weights``, to the search (below); the plain check reads
            the rows' span alone.
        selection: holds layer-0 query, key or value ``A`` adapters
            (e.g. ``select(model, "lora.A", 0)`` or ``select(model, "lora", 0)``).
        config: the settings (defaults: :class:`~gilib.attack.SpanConfig`).
        weights: for messages seen through known noise (e.g. the AdamW
            inversion's, ``AdamW(...).entry_weights(update, round_model,
            selection)``), one list of entry weights per round, shaped as
            that round's message, as :func:`span_attack`'s ``weights``. The
            rounds' layer-0 query and value ``A`` gradients and their
            weights are stacked and fitted together (the span every round
            shares). The search that judges candidate sentences on the
            message itself computes each candidate's gradient at a global
            model: given :class:`~gilib.attack.Round` s, every round's block
            at its own round's model, the distance summed over all blocks;
            given bare messages, the first round's block only, at ``model``
            (a later round's block needs its own global model). One round
            gives the same result either way. BERT only.

    Returns:
        An :class:`~gilib.attack.AttackResult` as :func:`span_attack`'s at batch size 1.

    Raises:
        TypeError: as :func:`span_attack`; for ``updates`` that are not a
            list, or that mix :class:`~gilib.attack.Round` s with bare messages.
        ValueError: for no update, messages that do not fit the model and
            the selection (a :class:`~gilib.attack.Round`'s: its own model),
            rounds of different lengths or of several sentences, or a
            selection without layer-0 ``A`` adapters; for rounds whose first
            model is not ``model``'s weights, or whose models are not
            ``model``'s architecture (parameter names, adapters, shapes);
            for ``weights`` that are not one list per round fitting its
            message (count, shapes, negative or non-finite values, none
            positive), or with a decoder.
    """
    updates, models = _round_messages(model, updates)
    if is_decoder(model):
        if weights is not None:
            raise ValueError("weights describe a noisy message, which the decoder's span check does not model: "
                             "attack a decoder's plain messages without them.")
        # A LoRA decoder: the stacked c_attn A rows give the candidates, the causal search the order.
        return decoder_span_attack(model, tokenizer, list(updates), selection, config)
    start = time.perf_counter()
    cfg = checked_config(config, SpanConfig)
    checked = [_checked(m, u, selection)[0] for m, u in zip(models or [model] * len(updates), updates)]
    if len({tuple(u.lengths) for u in checked}) != 1:
        raise ValueError(f"The rounds' lengths differ ({[u.lengths for u in checked]}): stack the messages of one "
                         f"sentence only.")
    names, stacked = stacked_adapter_rows(model, selection, [u.shared_grads for u in checked])
    if weights is not None:
        weights = list(weights)
        if len(weights) != len(checked):
            raise ValueError(f"weights holds {len(weights)} lists for {len(checked)} rounds: give one list of "
                             f"entry weights per round's message.")
        weights = [_checked_weights(w, u) for w, u in zip(weights, checked)]
        return _noisy_attack(model, tokenizer, checked, selection, cfg, weights, start, models=models)
    return _span_check(model, tokenizer, checked[0], selection, cfg, stacked_label(names), stacked, start)


def _round_messages(model: torch.nn.Module, updates) -> tuple[list[SharedUpdate], list[torch.nn.Module] | None]:
    """:func:`adapter_span_attack`'s rounds: ``(messages, each round's global model or None for bare messages)``.

    Given :class:`~gilib.attack.Round` s, the first round's model must hold
    ``model``'s weights and every later one ``model``'s parameters in the
    same shapes (the same victim, adapters included: the search runs each
    round's whole forward). The messages themselves are checked later,
    each against its own round's model.
    """
    if isinstance(updates, (SharedUpdate, Round, torch.Tensor)) or not isinstance(updates, Iterable):
        raise TypeError("updates must be a list with one entry per round: SharedUpdates, or gilib.attack.Round("
                        "global model, update) to give the search each round's global model.")
    updates = list(updates)
    if not updates:
        raise ValueError("No update given: pass one SharedUpdate (or Round(model, update)) per round.")
    rounds = [isinstance(u, Round) for u in updates]
    if not any(rounds):
        return updates, None
    if not all(rounds):
        raise TypeError("updates mixes Round(model, update) entries and bare messages: give every round as "
                        "Round(its global model, its message), or every message bare (the search then reads the "
                        "first round's block only).")
    first = updates[0].model
    if first is not model:
        own, wanted = dict(first.named_parameters()), dict(model.named_parameters())
        if own.keys() != wanted.keys() or any(not torch.equal(own[n], p) for n, p in wanted.items()):
            raise ValueError("Round 0's model is not `model`: `model` is the first round's global model (the check's "
                             "token space and its first block's gradients are computed at it). Pass "
                             "Round(model, first_update) first.")
    reference = [(n, tuple(p.shape)) for n, p in model.named_parameters()]
    adapters = adapter_parameters(model)
    for j, r in enumerate(updates[1:], start=1):
        own = [(n, tuple(p.shape)) for n, p in r.model.named_parameters()]
        if own != reference:
            theirs, ours = dict(own), dict(reference)
            their_adapters = adapter_parameters(r.model)
            # The adapters first: peft renames the weights it wraps, so a missing adapter shows as a base weight too.
            missing = next((n for k, n in adapters.items() if k not in their_adapters), None)
            extra = next((n for k, n in their_adapters.items() if k not in adapters), None)
            missing = missing or next((n for n in ours if n not in theirs), None)
            extra = extra or next((n for n in theirs if n not in ours), None)
            changed = next((n for n in ours if n in theirs and theirs[n] != ours[n]), None)
            what = (f"it has no parameter {missing!r}" if missing else f"it has a parameter {extra!r} that model "
                    f"has not" if extra else f"it holds {changed!r} as {theirs[changed]}, model as {ours[changed]}")
            raise ValueError(f"Round {j}'s model is not model's architecture ({what}): every round's global model "
                             f"must be the same victim, adapters included (the same lora_victim settings), with "
                             f"its weights moved.")
    return [r.update for r in updates], [r.model for r in updates]


def _span_check(model, tokenizer, update: SharedUpdate, selection: Selection, cfg: SpanConfig, name: str,
                gradient: torch.Tensor, start: float, *, weights=None, clipped: bool = False,
                noise=None, prior: NgramPrior | None = None) -> AttackResult:
    """:func:`span_attack` after its checks: the row space of ``gradient`` (``(m, d_in)``) against every token."""
    noise = _checked_noise(noise, gradient, weights)
    if weights is not None:
        return _noisy_attack(model, tokenizer, [update], selection, cfg, [_checked_weights(weights, update)], start,
                             clipped=bool(clipped))
    if clipped:
        raise ValueError("clipped=True describes a noisy message: pass the protocol's entry weights with it "
                         "(e.g. weights=DPSGD(...).entry_weights(update)).")
    shared_grads, labels, lengths = update
    batch = len(lengths)
    tokens = TokenSpace(model, tokenizer)
    # A key weight's gradient spans x_i - x_[CLS]: one direction fewer per sentence.
    space, residuals, sets = check_positions(model, tokens, gradient, lengths,
                                             shift_invariant=_shift_invariant(name), threshold=cfg.threshold,
                                             capped=batch == 1, noise=noise)
    # How far the split between chosen and rejected tokens sits from the next token.
    widest = max((len(c) for c in sets), default=0)
    ordered = residuals.topk(min(widest + 1, residuals.shape[1]), dim=1, largest=False).values
    gaps = [float(row[len(s)] - row[len(s) - 1]) for row, s in zip(ordered, sets)] or [0.0]
    check_seconds = time.perf_counter() - start
    diagnostics = SpanDiagnostics(weight=name, verifier=None, rank=space.rank, min_gap=min(gaps), candidates=sets)
    if batch == 1 and noise is not None and not _shift_invariant(name):
        # Under noise the most likely sentence, not each position's best token
        # alone. Each position's best token, by the z-scores and by the plain
        # residuals (the better of the two at small noise), starts the search.
        _, _, plain = check_positions(model, tokens, gradient, lengths, shift_invariant=False,
                                      threshold=cfg.threshold, capped=True)
        starts = [[tokenizer.cls_token_id, *(s[0] for s in found), tokenizer.sep_token_id] for found in (sets, plain)]
        found, scores = likely_sentence(model, tokens, gradient, lengths[0], starts=starts, prior=prior,
                                        prior_weight=cfg.prior_weight, noise=noise, scores=True)
        # The server can tell whether it is right: the client's sentence leaves
        # the model's likelihood at the noise floor, a wrong one above it. (A
        # spectrum that reads no noise at all leaves no floor: None.)
        if space.noise > 0:
            names, matrix = stacked_projections(model, [name], [gradient])
            diagnostics.floor_z = floor_z(model_distance(model, names, matrix, found), space.noise, matrix.numel())
            if prior is not None and diagnostics.floor_z > FLOOR_Z:
                found, diagnostics.floor_z = _repaired(model, names, matrix, found, scores, space.noise, cfg, start,
                                                       diagnostics.floor_z)
        ids = torch.tensor([found])
        final_loss = float(max((residuals[i, t] for i, t in enumerate(found[1:-1])), default=0.0))
    elif batch == 1:
        ids = torch.tensor([[tokenizer.cls_token_id, *(s[0] for s in sets), tokenizer.sep_token_id]])
        final_loss = float(max((residuals[i, s[0]] for i, s in enumerate(sets)), default=0.0))
    else:
        verifier = verifier_weight(model, selection)
        deadline = None if cfg.time_budget is None else start + cfg.time_budget
        peeled = peel(model, tokenizer, selection.names, shared_grads, name, verifier, lengths, cfg,
                      deadline=deadline, noise=noise)
        ids = peeled.ids
        guessed = [y if y is not None else (int(labels[i]) if labels is not None else 0)
                   for i, y in enumerate(peeled.labels)]
        final_loss = _batch_distance(model, shared_grads, selection, ids, lengths, guessed)
        diagnostics.verifier = verifier or f"{name} (output gradients)"
        diagnostics.rounds, diagnostics.found = peeled.rounds, peeled.found
        diagnostics.labels, diagnostics.uncertain = peeled.labels, peeled.uncertain
        diagnostics.timed_out = peeled.timed_out
    seconds = time.perf_counter() - start
    token_ids = [ids[i, :n].tolist() for i, n in enumerate(lengths)]
    return AttackResult(
        texts=[tokens.decode(t) for t in token_ids],
        token_ids=token_ids,
        final_loss=final_loss,
        seconds=seconds,
        method="span",
        config=asdict(cfg),
        timings={"check": check_seconds, "assembly": seconds - check_seconds},
        diagnostics=diagnostics,
    )


FLOOR_Z = 3.0
"""A sentence more than this many standard deviations above the noise floor
of the model's likelihood (:func:`gilib.attack.completion.floor_z`) is not
the client's: the search under a prior then tries to repair it."""

REPAIR_SENTENCES = 4000
"""How many candidate sentences the repair of :func:`_repaired` may judge
(each one a gradient computed, :func:`polish`'s ``judged``). A count, not a
time, so that the same message gives the same sentence on any machine and
under any load; ``SpanConfig.time_budget`` still bounds the whole attack.
A repair that reaches the client's sentence mostly judges it well within
this count; what it judges after that only confirms the minimum."""


def _repaired(model, names, matrix: torch.Tensor, found: list[int], scores: torch.Tensor, noise: float,
              cfg: SpanConfig, start: float, z: float) -> tuple[list[int], float]:
    """The most probable sentence, finished under the model's own likelihood where that certifies it.

    The span's likelihood brings the search near the truth but has no slope
    to it; the model's likelihood has the slope only near the truth, where
    one wrong token lifts the distance far above the noise floor. From the
    most probable sentence, :func:`polish` changes tokens against the
    message itself (each candidate's own gradient, the clipping factor
    fitted), trying each position's best tokens by the search's scores;
    the result is kept only if it reaches the floor (:data:`FLOOR_Z`),
    where the server knows it has the sentence or one its gradient cannot
    tell from it. Otherwise the most probable sentence stands.

    Args:
        matrix: ``(m, d)`` the message (:func:`stacked_projections`).
        found: the most probable sentence, ``[CLS]`` and ``[SEP]`` included.
        scores: ``(n - 2, V)`` every token's score at each interior
            position (:func:`likely_sentence`'s ``scores``: higher is better).
        noise: the message's noise per entry.
        start: the attack's :func:`time.perf_counter` start (for ``cfg.time_budget``).
        z: ``found``'s distance above the floor, in standard deviations.

    Returns:
        ``(sentence, its floor_z)``.
    """
    deadline = None if cfg.time_budget is None else start + cfg.time_budget
    repaired = polish(model, names, matrix, torch.ones_like(matrix), found, -scores, pairs=PAIRS, clipped=True,
                      deadline=deadline, judged=REPAIR_SENTENCES)
    repaired_z = floor_z(repaired.distance, noise, matrix.numel())
    return (repaired.ids, repaired_z) if repaired_z < FLOOR_Z else (found, z)


def _checked_noise(noise, gradient: torch.Tensor, weights) -> float | str | None:
    """``noise`` as :func:`span_attack` takes it, or a clear error."""
    if noise is None:
        return None
    if weights is not None:
        raise ValueError("Give either weights (a message whose noise differs entry by entry) or noise (the same "
                         "for every entry), not both.")
    if isinstance(noise, str):
        if noise != "spectrum":
            raise ValueError(f'noise must be a number or "spectrum", got {noise!r}.')
        return noise
    if isinstance(noise, bool) or not isinstance(noise, (int, float)) or not math.isfinite(noise) or noise <= 0:
        raise ValueError(f"noise must be the message's per-entry noise standard deviation, a positive number, "
                         f"got {noise!r}.")
    largest = float(gradient.detach().abs().max())
    if noise >= largest:
        raise ValueError(f"The noise model does not fit the message: a noise of {noise:.3g} per entry is larger "
                         f"than the message's largest entry ({largest:.3g}). Check the protocol's settings "
                         f"(e.g. SecAgg's clipping_range and quantization_range).")
    return float(noise)


def _argmin_sentence(tokenizer, residuals: torch.Tensor) -> list[int]:
    """Each position's best token, between ``[CLS]`` and ``[SEP]``."""
    return [tokenizer.cls_token_id, *residuals.argmin(dim=1).tolist(), tokenizer.sep_token_id]


def _checked_weights(weights, update: SharedUpdate) -> list[torch.Tensor]:
    """The entry weights, checked against the message they describe."""
    weights = list(weights)
    grads = update.shared_grads
    if len(weights) != len(grads):
        raise ValueError(f"weights has {len(weights)} tensors but the message {len(grads)}: give one weight "
                         f"tensor per shared tensor (e.g. FedAvg(...).entry_weights(update, model, selection)).")
    for i, (w, g) in enumerate(zip(weights, grads)):
        if not isinstance(w, torch.Tensor) or tuple(w.shape) != tuple(g.shape):
            raise ValueError(f"weights[{i}] must be a tensor of the message's shape {tuple(g.shape)}, got "
                             f"{tuple(w.shape) if isinstance(w, torch.Tensor) else type(w).__name__}.")
        if not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
            raise ValueError(f"weights[{i}] holds negative or non-finite values: entry weights are 1 / noise^2, "
                             f"0 for a lost entry.")
    if not any(bool((w > 0).any()) for w in weights):
        raise ValueError("Every entry weight is 0: the noise model says nothing of the message survived.")
    if len(update.lengths) != 1:
        raise ValueError(f"Entry weights are used at batch size 1; this message holds {len(update.lengths)} "
                         f"sentences. Pass weights=None to peel the batch from the raw message.")
    return [w.detach().double() for w in weights]


def _noisy_attack(model, tokenizer, updates: list[SharedUpdate], selection: Selection, cfg: SpanConfig,
                  weights: list[list[torch.Tensor]], start: float, clipped: bool = False,
                  models: list[torch.nn.Module] | None = None) -> AttackResult:
    """One sentence from messages seen through known noise (:mod:`gilib.attack.completion`).

    Args:
        updates: one message, or (LoRA ``A`` adapters) one per round of the same sentence.
        weights: per message, its entry weights (checked).
        models: per message, the global model it was computed at (checked; the first is ``model``):
            the search then judges candidates on every round's block. ``None``: on the first round's only.
    """
    (n,) = updates[0].lengths
    adapters = layer0_adapter_names(model, selection, modules=_NOISY_ADAPTERS)
    later = []  # the later rounds' (global model, stacked names) the search also reads
    if adapters:
        # A LoRA victim: the A gradients' rows, every round's, lie in the inputs' span (the rank rule:
        # the stack has rank min(n, rows), so the fit's rank is that).
        per_round, matrix, stacked_weights = stacked_adapter_entries(
            selection.names, [u.shared_grads for u in updates], weights, adapters)
        if not matrix.numel():
            raise ValueError("Every layer-0 query and value A gradient is zero: B was zero when the client computed "
                             "them (a fresh adapter). Attack a later round.")
        names = per_round[0]
        rank = min(n, len(matrix))
        if models is not None:
            # The search judges candidates on every round's block, each at its own round's model.
            later = list(zip(models[1:], per_round[1:]))
            polish_matrix = matrix
        else:
            # Without the later rounds' models, on the first round's block: the one `model` computes.
            first = sum(dict(zip(selection.names, updates[0].shared_grads))[a].shape[0] for a in names)
            polish_matrix = matrix[:first]
    else:
        if len(updates) != 1:
            raise ValueError("Several rounds' messages are stacked for LoRA A adapters only.")
        names, matrix = stacked_projections(model, selection.names, updates[0].shared_grads)
        if not names:
            raise ValueError(f"With entry weights the span check reads layer 0's query or value weight (or, on a "
                             f"LoRA victim, their A adapters), and {selection.label} has none: select e.g. "
                             f"select(model, 'layer', 0) or select(model, 'lora.A', 0).")
        _, stacked_weights = stacked_projections(model, selection.names, weights[0])
        rank = n
        polish_matrix = matrix
    if not bool((stacked_weights > 0).any()):
        raise ValueError("No entry of layer 0's query or value weight (or A adapter) survived the noise model: "
                         "nothing is left for the span check.")
    if adapters and not names and models is None:
        raise ValueError("The first round's query and value A gradients are zero (B was zero): put a round "
                         "with a moved B first, or pass Round(model, update) per round so that the search reads "
                         "every round's block.")
    tokens = TokenSpace(model, tokenizer)
    # The protocol's noise plus what no rank-n matrix explains (local steps' drift).
    # A 0/1 mask (AdamW's, with entries left out) gives no noise scale:
    # every row then counts alike. Weights of 1 / noise^2 (FedAvg's, DP's)
    # already weigh each row by its noise.
    mask = bool(((stacked_weights == 0) | (stacked_weights == 1)).all() and (stacked_weights == 0).any())
    # One AdamW step's message of layer 0's own weights (not a LoRA victim's adapters, whose
    # search chapter 7 timed as it was): a shorter first fit and an eager search (below).
    eager = mask and not adapters
    stacked_weights = floored(stacked_weights, matrix, rank)
    fit_weights = balanced(stacked_weights, matrix) if mask else stacked_weights
    polish_weights = stacked_weights[:len(polish_matrix)]  # the rows the search reads (all, for one message)
    deadline = None if cfg.time_budget is None else start + cfg.time_budget
    # A mask's balanced fit settles in fewer rounds (RT 7347, 59 tokens: the same
    # sentence after 40 as after 100, 4 s sooner).
    space = completed_space(matrix, fit_weights, rank, iterations=MASK_ITERATIONS if eager else ITERATIONS,
                            deadline=deadline)
    residuals = token_residuals(model, tokens, space, range(1, n - 1))
    check_seconds = time.perf_counter() - start
    # Refit from the sentence the residuals point at: its right tokens'
    # inputs hold the fit near the true span, so the next residuals rank
    # more true tokens first; repeat to a fixed point, then search. A fit
    # below the token count (an adapter stack short of the rank rule)
    # cannot start from a sentence's n inputs: it keeps the first fit. Past the
    # deadline no refit starts (the residuals stay), and a refit stops at it.
    def refit(sentence: list[int]) -> torch.Tensor:
        if rank < n or (deadline is not None and time.perf_counter() > deadline):
            return residuals
        space = completed_space(matrix, fit_weights, n, iterations=REFIT_ITERATIONS,
                                start=sentence_inputs(model, sentence), deadline=deadline)
        return token_residuals(model, tokens, space, range(1, n - 1))

    # One AdamW step's message (eager): no token repeated by its neighbour
    # (distinct_neighbours: the residuals often copy a token over its short neighbour).
    def sentence(residuals: torch.Tensor) -> list[int]:
        ids = _argmin_sentence(tokenizer, residuals)
        return distinct_neighbours(ids, residuals) if eager else ids

    ids = sentence(residuals)
    for _ in range(REFITS if rank == n else 0):
        residuals = refit(ids)
        ids, previous = sentence(residuals), ids
        if ids == previous or (deadline is not None and time.perf_counter() > deadline):
            break
    # AdamW's messages (the mask, layer 0's own weights) leave a long sentence many tokens off after the
    # refits, and the search makes one change per sweep: there it sweeps the
    # suspects first and makes several helpful changes at once (polish's eager),
    # and the second search goes on from the first's sentence where that is clearly
    # closer to the message than the refit's (below). Only AdamW's
    # messages were timed this way; the other protocols' and LoRA's searches are unchanged.
    found = polish(model, names, polish_matrix, polish_weights, ids, residuals, candidates=CANDIDATES[:1],
                   deadline=deadline, clipped=clipped, later=later, eager=eager)
    if not found.sharp:
        # Once more from the searched sentence, then the wider search from the better of the two.
        again = refit(found.ids)
        restart = sentence(again)
        if eager and restart != found.ids:
            # Eager, the first search can make many changes (a long sentence from 6 wrong
            # tokens to 1): it goes on from its own sentence where that is SHARP-fold
            # closer to the message than the refit's; within that factor the distance
            # does not rank them (RT 2089 at lr 2e-5: the search's sentence, 4 off, is
            # 1.9-fold closer than the refit's, 1 off), and the search starts over.
            fresh = polish(model, names, polish_matrix, polish_weights, restart, again, candidates=(),
                           clipped=clipped, later=later)
            if SHARP * found.distance < fresh.distance:
                restart = found.ids
        second = polish(model, names, polish_matrix, polish_weights, restart, again, candidates=CANDIDATES[:1],
                        deadline=deadline, clipped=clipped, later=later, eager=eager)
        if second.distance < found.distance:
            found, residuals = second, again
    if not found.sharp:
        found = polish(model, names, polish_matrix, polish_weights, found.ids, residuals, candidates=CANDIDATES[1:],
                       deadline=deadline, clipped=clipped, pairs=PAIRS, later=later, eager=eager)
    ids = found.ids
    outside = outside_share(matrix, sentence_inputs(model, ids))
    sets = [[t] for t in ids[1:-1]]
    ordered = residuals.topk(min(2, residuals.shape[1]), dim=1, largest=False).values
    gaps = [float(row[1] - row[0]) for row in ordered] or [0.0]
    weight = "+".join(n for round_names in per_round for n in round_names) if adapters else "+".join(names)
    diagnostics = SpanDiagnostics(weight=weight, verifier=None, rank=rank, min_gap=min(gaps),
                                  candidates=sets, outside=outside,
                                  timed_out=deadline is not None and time.perf_counter() > deadline)
    seconds = time.perf_counter() - start
    return AttackResult(texts=[tokens.decode(ids)], token_ids=[ids], final_loss=outside, seconds=seconds,
                        method="span", config=asdict(cfg),
                        timings={"check": check_seconds, "assembly": seconds - check_seconds},
                        diagnostics=diagnostics)
