"""What a LoRA client's adapter gradients leak: the span check's rank rule.

With LoRA (Hu et al., ICLR 2022) on a layer-0 projection ``W`` (``y = W x +
s B A x``, ``s = alpha / r``, ``A`` ``r x d_in``, ``B`` ``d_out x r``) and
``G = sum_i delta_i x_i^T`` the frozen weight's gradient over the ``n``
inputs ``x_i`` of the batch:

* ``grad A = s B^T G = sum_i (s B^T delta_i) x_i^T``: its ``r`` rows lie in
  ``span{x_i}``, as the rows of ``G`` do (:mod:`gilib.attack.rowspace`), but
  span at most ``r`` dimensions of it. Several adapters' ``A`` gradients
  (query and value, several rounds' messages of the same sentence) stack
  into one matrix whose row space is still a subspace ``S`` of ``span{x_i}``
  (:func:`stacked_adapter_rows`). The span check is exact when ``S`` is the
  whole span, that is when the stacked rank reaches the number of distinct
  inputs ``n`` (at batch size 1, the sentence's token count): **the rank
  rule**. Below it, true inputs lie outside ``S`` and the check keeps only
  what ``S`` lets through. :func:`gilib.attack.span_attack` takes a
  selection of layer-0 ``A`` adapters (``select(model, "lora.A", 0)``) and
  :func:`gilib.attack.span.adapter_span_attack` several rounds' messages.
* ``grad B = s G A^T = sum_i s delta_i (A x_i)^T``: its rows lie in the
  span of the projected inputs ``A x_i`` in ``R^r`` (:func:`b_check`). When
  ``n >= r`` that span is all of ``R^r`` and every token passes; when
  ``n < r`` a random token's ``A x`` rarely falls in an ``n``-dimensional
  subspace of ``R^r``: the opposite rank rule, ``B`` alone leaks when the
  rank is *large*.

On a GPT-2-style decoder the same holds for the fused ``c_attn``'s adapter
(peft's ``A`` is ``r x d_in`` on a ``Conv1D`` too, and its rows lie in the
span of the block's inputs ``ln_1(wte[t] + wpe[p])``), with ``n`` the
sentence's *predicting* positions (its token count less the end token,
whose output gradient is zero: :mod:`gilib.attack.decoder`), for ``A``'s
rule and for ``B``'s alike (:func:`b_check` reads the ``c_attn`` adapter's
``B``: ``B`` alone pins the tokens once ``r`` exceeds the predicting
positions, a rank one smaller than a BERT sentence of as many tokens
needs); the decoder's
attack takes the stacked rows for its candidates and, where an adapter on a
weight that reads layer 0's activations is shared with rank enough, its
``A`` rows for the causal prefix check (:func:`gilib.attack.decoder.decoder_span_attack`).

The server knows ``A`` and ``B``: they are the global model it sent.
Adapter names come from :func:`gilib.selection.adapter_parameters` (exact
patterns, never substrings), so this module needs nothing of peft.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ..models import is_decoder, lm_special_ids
from ..selection import Selection, adapter_parameters
from .rowspace import DEFAULT_THRESHOLD, layer0_inputs, row_space
from .tokens import TokenSpace

INPUT_MODULES = ("query", "key", "value", "c_attn")
"""The adapted modules whose input is layer 0's (enumerable) input: their ``A`` gradients feed the span check
(a BERT's query, key and value; a decoder's fused ``c_attn``)."""
BERT_INPUT_MODULES = ("query", "key", "value")
DECODER_INPUT_MODULES = ("c_attn",)
"""Of :data:`INPUT_MODULES`, a BERT's and a GPT-2 decoder's (:func:`b_check`'s ``module``)."""


def layer0_adapter_names(model: torch.nn.Module, selection: Selection, half: str = "A", *,
                         modules: Sequence[str] = INPUT_MODULES, layer: int = 0) -> list[str]:
    """The selection's adapter weights (``A`` or ``B``) on ``modules`` of ``layer``, in selection order.

    By default layer 0's query, key and value (a decoder's ``c_attn``): the span check's; the decoder's
    prefix check asks for one other module (e.g. ``modules=("mlp.c_fc",)``).
    """
    wanted = {name for (at, module, ab), name in adapter_parameters(model).items()
              if at == layer and module in modules and ab == half}
    return [name for name in selection.names if name in wanted]


def stacked_adapter_rows(model: torch.nn.Module, selection: Selection,
                         shared_grads: Sequence[torch.Tensor] | Sequence[Sequence[torch.Tensor]], *,
                         modules: Sequence[str] = INPUT_MODULES, layer: int = 0
                         ) -> tuple[list[str], torch.Tensor]:
    """The layer-0 ``A`` gradients of one message or several rounds' messages, stacked: ``(names, (m, d_in))``.

    Every block's rows lie in ``span{x_i}`` of the sentence's layer-0 inputs,
    so the stack's row space is a subspace of it, of dimension at most
    ``min(m, n)`` with ``m = r * blocks``. Each block is scaled to unit norm
    (a row's direction, not its length, carries the inputs; blocks of
    rounds with a small ``B`` would otherwise fall under the rank's
    tolerance).

    Args:
        model: the LoRA victim, as the server holds it.
        selection: the shared selection (one name per tensor of a message).
        shared_grads: one message's tensors (one per name of ``selection``)
            or a list of such messages, one per round, all of the same
            selection and sentence.
        modules, layer: whose ``A`` gradients to stack (:func:`layer0_adapter_names`):
            by default layer 0's query, key and value (a decoder's ``c_attn``).

    Returns:
        The names of the stacked ``A`` weights (each round's in turn, once
        per round) and the ``(m, d_in)`` stack, in the messages' dtype.

    Raises:
        ValueError: if the selection holds no such ``A`` adapter, or a
            message has the wrong number of tensors.
    """
    names = layer0_adapter_names(model, selection, modules=modules, layer=layer)
    if not names:
        what = "query, key or value (a decoder's c_attn)" if tuple(modules) == INPUT_MODULES else " or ".join(modules)
        raise ValueError(f"The span check on adapters needs the gradient of a layer-{layer} {what} LoRA A weight, "
                         f"and {selection.label} has none: select e.g. select(model, 'lora.A', {layer}).")
    rounds = [shared_grads] if isinstance(shared_grads[0], torch.Tensor) else list(shared_grads)
    blocks, stacked_names = [], []
    for grads in rounds:
        grads = list(grads)
        if len(grads) != len(selection.names):
            raise ValueError(f"A message holds {len(grads)} tensors for the {len(selection.names)} of "
                             f"{selection.label}: pass one tensor per name, in the selection's order.")
        by_name = dict(zip(selection.names, grads))
        for name in names:
            block = by_name[name].detach()
            norm = block.norm()
            if norm > 0:  # a zero block (B = 0: a fresh adapter) adds nothing
                blocks.append(block / norm)
                stacked_names.append(name)
    if not blocks:
        raise ValueError(f"Every layer-{layer} A gradient is zero: B was zero when the client computed them (a fresh "
                         "adapter), so A's gradient carries nothing. Attack a later round (lora_victim(..., warmup=)) "
                         "or the B gradients (gilib.attack.adapters.b_check).")
    return stacked_names, torch.cat(blocks)


def stacked_label(names: Sequence[str]) -> str:
    """A short name for a stack of adapter weights, for diagnostics: the names joined by ``+``."""
    return "+".join(names)


@dataclass
class BCheck:
    """What one ``B`` gradient alone says of each position's token.

    Attributes:
        weight: the ``B`` adapter weight read.
        rank: the numerical rank of its gradient (at most ``min(r, n)``,
            ``n`` the sentence's inputs the loss reads: its token count on
            a BERT, its predicting positions, one fewer, on a decoder).
        r: the adapter's rank; ``rank == r`` means the projected inputs'
            span is all of ``R^r`` and every token passes.
        residuals: ``(P, V)`` relative residual of each token's projected
            input ``A x`` against the gradient's row space, per interior
            position (``inf`` for tokens that never occur in text).
        passing: per position, how many allowed tokens lie within
            ``threshold`` of the span (1 would pin the token).
        ids: each position's smallest-residual token, between ``[CLS]``
            and ``[SEP]`` (a decoder's start and end tokens).
    """

    weight: str
    rank: int
    r: int
    residuals: torch.Tensor
    passing: list[int]
    ids: list[int]


def b_check(model: torch.nn.Module, tokenizer, shared_grads: Sequence[torch.Tensor], selection: Selection,
            length: int, *, module: str | None = None, threshold: float = DEFAULT_THRESHOLD) -> BCheck:
    """Test every token's projected layer-0 input ``A x`` against one ``B`` gradient's row space in ``R^r``.

    ``grad B = s sum_i delta_i (A x_i)^T`` (``d_out x r``): its rows span the
    projected inputs, at most ``min(r, n)`` dimensions of ``R^r``. A token at
    a position passes when its ``A x`` lies in that span.

    On a GPT-2-style decoder (:func:`gilib.models.is_decoder`) the adapter is
    the fused ``c_attn``'s (peft's ``B`` is ``(3 d, r)`` there too:
    ``fan_in_fan_out`` only transposes the merged update), ``x`` is block 0's
    input ``ln_1(wte[t] + wpe[p])`` and ``n`` counts the predicting
    positions (the token count less the end token, whose output gradient is
    zero: :func:`gilib.attack.decoder.predicting_inputs`), so ``B`` pins the
    tokens once ``r`` exceeds the token count less one.

    Args:
        model: the LoRA victim, a BERT or a decoder (the server knows ``A``: it sent it).
        tokenizer: its tokenizer.
        shared_grads: one message, one tensor per name of ``selection``.
        selection: must hold a layer-0 query, key or value ``B`` adapter
            (a decoder's: layer 0's ``c_attn`` ``B``).
        length: the sentence's token count (``[CLS]`` and ``[SEP]``, a
            decoder's start and end tokens, included; batch size 1).
        module: ``"query"``, ``"key"`` or ``"value"`` (a decoder's:
            ``"c_attn"``): whose ``B`` to read (default: the first the
            selection holds).
        threshold: relative residual under which a token passes.

    Returns:
        A :class:`BCheck`.

    Raises:
        ValueError: for a ``module`` the model's layer-0 input does not
            feed, a selection without that ``B`` adapter, a message with
            another tensor count than the selection, or ``length`` not
            3 .. the model's positions.
    """
    decoder = is_decoder(model)
    modules = DECODER_INPUT_MODULES if decoder else BERT_INPUT_MODULES
    kind = "a GPT-2 decoder" if decoder else "a BERT"
    if module is not None and module not in modules:
        reads = ("its fused query/key/value; the other adapted modules (attn.c_proj, mlp.c_fc, mlp.c_proj) do not "
                 "read layer 0's input" if decoder else "the projections that read layer 0's input")
        raise ValueError(f"module must be {' or '.join(map(repr, modules))} on {kind} ({reads}), got {module!r}.")
    names = layer0_adapter_names(model, selection, "B", modules=modules)
    adapters = adapter_parameters(model)
    if module is not None:
        names = [n for n in names if n == adapters.get((0, module, "B"))]
    if not names:
        if decoder:
            raise ValueError(f"{selection.label} holds no layer-0 c_attn LoRA B weight: on a GPT-2 decoder only the "
                             f"fused c_attn's adapter reads layer 0's input; select e.g. "
                             f"select(model, 'lora.c_attn.B', 0) on a victim with c_attn adapters "
                             f"(lora_victim(model, ('c_attn',), layers=0)).")
        raise ValueError(f"{selection.label} holds no layer-0 {module or 'query, key or value'} LoRA B weight: "
                         f"select e.g. select(model, 'lora.query.B', 0).")
    shared_grads = list(shared_grads)
    if len(shared_grads) != len(selection.names):
        raise ValueError(f"The message holds {len(shared_grads)} tensors for the {len(selection.names)} of "
                         f"{selection.label}: pass one tensor per name, in the selection's order.")
    most = model.config.max_position_embeddings
    if isinstance(length, bool) or not isinstance(length, int) or not 3 <= length <= most:
        tokens_with = "its start and end tokens" if decoder else "[CLS] and [SEP]"
        raise ValueError(f"length must be the sentence's token count with {tokens_with}, 3..{most}, "
                         f"got {length!r}.")
    name = names[0]
    gradient = dict(zip(selection.names, shared_grads))[name]
    a_name = name.replace(".lora_B.", ".lora_A.")
    a = dict(model.named_parameters())[a_name].detach().double()  # (r, d_in), the server's own weight
    if tuple(gradient.shape) != tuple(model.get_parameter(name).shape):
        raise ValueError(f"The gradient of {name} is {tuple(gradient.shape)}, the weight "
                         f"{tuple(model.get_parameter(name).shape)}: the message does not fit the model.")
    # The inputs the loss reads: every token on a BERT; on a decoder all but the end token.
    inputs = length - 1 if decoder else length
    space = row_space(gradient, max_rank=inputs)
    tokens = TokenSpace(model, tokenizer)
    allowed = tokens.allowed.cpu()
    rows = []
    for position in range(1, length - 1):
        projected = layer0_inputs(model, position).double() @ a.T  # (V, r)
        residual = space.residual(projected).cpu()
        residual[~allowed] = float("inf")
        rows.append(residual)
    residuals = torch.stack(rows) if rows else torch.empty(0, len(allowed), dtype=torch.float64)
    passing = [int((row < threshold).sum()) for row in residuals]
    start, end = lm_special_ids(tokenizer)[:2] if decoder else (tokenizer.cls_token_id, tokenizer.sep_token_id)
    ids = [start, *residuals.argmin(dim=1).tolist(), end]
    return BCheck(weight=name, rank=space.rank, r=a.shape[0], residuals=residuals, passing=passing, ids=ids)
