"""The exact span check on a GPT-2-style decoder: candidates from layer 0, a causal left-to-right search.

DAGER (Petrov et al., "DAGER: Exact Gradient Inversion for Large Language
Models", NeurIPS 2024) recovers a batch exactly from a decoder's gradients
in two steps, which this module follows:

1. **Candidates.** Layer 0's fused query/key/value weight (GPT-2's
   ``attn.c_attn``, a ``Conv1D`` stored ``(in, out)``) has the gradient
   ``G = X^T Delta``: its *columns* lie in the span of its inputs, and the
   input at position ``p`` is ``ln_1(wte[t] + wpe[p])`` (GPT-2 is
   pre-LayerNorm), a function of the token and the position alone. Every
   vocabulary token is scored at every position by its residual against the
   row space of ``G^T`` (:func:`gilib.attack.rowspace.token_residuals`); a
   position's candidates are the tokens inside it, up to one per sentence
   that reaches the position, and in a batch a few impostors.
2. **A causal search.** The causal mask makes every prefix its own exact
   check: position ``p``'s activations depend on the tokens ``<= p`` only,
   so a true prefix's activations are *exactly* the client's (float32
   round-off), whatever follows, and lie in the row space of the gradient
   of any weight that reads them. The search starts from the start token
   and extends each surviving prefix by each candidate at the next
   position, keeping the extensions whose newest position lies in that span
   (:class:`CausalCheck`): a tree search in which wrong branches die at
   once, several sentences may share a prefix, and a sentence of length
   ``n`` is a surviving prefix of ``n - 1`` tokens with the end token added.

What does and does not depend on trained weights. Both steps are linear
algebra on activations the attacker computes from the weights it holds, and
the search is exact for any weights (the causal mask). The candidate sets'
size is not: with ``ln_1``'s initial gain 1 and bias 0, ``sigma x = z -
mean(z)`` is linear in ``z = wte[t] + wpe[p]``, so up to each input's own
scale (which a span ignores) a batch's inputs are sums of a token's and a
position's vector, and every word of the batch at every position of its
token-position graph's component lies exactly in the span: at random
weights a batch's candidates are its bag of words, and the search does all
the sorting (``tests/attack/test_decoder.py`` checks the rank this
predicts). A trained ``ln_1`` bias breaks that linearity, trained position
embeddings are smooth (chapter 5's impostors): the candidate sets, and so
the seconds, change with trained weights; the exactness does not.

The end token's own activations are never in any span: the last position
predicts nothing and no position attends to it, so its output gradient is
zero. That is why :func:`gilib.models.encode_lm` ends every sentence with
one: every word is then a predicting position that the gradient sees.

The check of step 2 reads one of these weights, the first the selection
shares (:data:`VERIFIERS`): layer 0's FFN input weight (``mlp.c_fc``, reads
``ln_2`` of the residual stream), its attention output weight
(``attn.c_proj``, reads the heads' mixed values), its FFN output weight
(``mlp.c_proj``, reads the GELU activations, 4 d wide) or layer 1's
``c_attn`` (reads ``ln_1`` of layer 0's output). ``select(model, "layer",
0)`` shares the first three. Without any of them a single sentence is read off step 1 directly
(each position's best token); a batch needs one.

**LoRA on the decoder** (Hu et al., ICLR 2022; :func:`gilib.lora.lora_victim`).
A LoRA client shares its adapters alone. peft's adapter on layer 0's
``c_attn`` is an ``nn.Linear`` pair even on a ``Conv1D`` (``A`` ``(r, d)``,
``B`` ``(3 d, r)``; ``fan_in_fan_out`` only transposes the merged update),
and with ``G = Delta^T X`` the frozen weight's gradient in ``(out, in)``
orientation, ``grad A = s B^T G = s (Delta B)^T X``: ``A``'s rows lie in the
span of the same inputs ``ln_1(wte[t] + wpe[p])`` and span ``min(r, n)``
of its ``n`` dimensions, ``n`` the batch's predicting positions (its tokens
less each end token, less the shared start token's repeats). Step 1 reads
the stacked ``A`` rows of layer-0 ``c_attn`` adapters (and of several rounds'
messages, :func:`gilib.attack.adapters.stacked_adapter_rows`) instead of
``G``: exact candidates when ``r`` times the blocks stacked reaches ``n``
(the rank rule of :mod:`gilib.attack.adapters`), a subspace of the span
beyond, where each position's true token is only the likeliest, not a
certain one. Step 2 needs no new code either: an adapter's ``A`` gradient on
a weight that reads layer 0's activations (layer 0's ``mlp.c_fc``,
``attn.c_proj``, ``mlp.c_proj``, layer 1's ``c_attn``) has its rows in the
span of those activations, so its rows are a :class:`CausalCheck`'s space,
exact when they reach ``n`` (:func:`adapter_verifier`); with fewer a true
prefix falls outside that subspace and the check would reject it, so such
an adapter is not used. Unlike layer 0's inputs, those activations depend
on the adapters (``c_attn``'s moves the attention), so they are the
client's only at the weights the server attacks with: of several rounds'
messages the check reads the first (its global model must be ``model``),
while step 1 stacks every round's. Without a verifier, a single sentence is
read off step 1 (each position's best token) and a batch is refused. What
the weights decide, as above: a sentence whose inputs fit the rows is
exact for any weights; below the rule, how often a position's best token
is still the true one (uncertified) depends on how close other tokens'
inputs come, which random embeddings keep far apart and trained ones bring
near (``bench/lora_decoder.py`` measures it at random weights).

:func:`decoder_span_attack` runs the attack; :func:`gilib.attack.span_attack`
(and :func:`gilib.attack.adapter_span_attack` for several rounds) hands a
decoder to it.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Sequence

import torch

from ..models import is_decoder, lm_special_ids
from ..selection import DECODER_LORA_MODULES, Selection
from ..update import SharedUpdate, checked_update
from .adapters import layer0_adapter_names, stacked_adapter_rows, stacked_label
from .checks import relative_residual
from .config import SpanConfig, checked_config
from .result import AttackResult, SpanDiagnostics
from .rowspace import RowSpace, candidate_sets, position_counts, row_space, token_residuals
from .tokens import TokenSpace

QKV = "attn.c_attn.weight"
"""Layer 0's fused query/key/value weight, relative to ``transformer.h.0.``: the span check's weight."""

VERIFIERS = (("0.mlp.c_fc.weight", "mlp"), ("0.attn.c_proj.weight", "attention"), ("0.mlp.c_proj.weight", "ffn"),
             ("1.attn.c_attn.weight", "layer"))
"""The weights that check a prefix, in order of preference (relative to ``transformer.h.``), each
with what it reads (:data:`READS`). All four separate true prefixes from wrong ones by five orders
of magnitude on GPT-2 small's shape (true at most 3e-6, wrong at least 8e-2, batches of 8); the
order is by cost and by what the activations carry: ``mlp.c_fc`` reads the residual stream, which
holds the newest token's own embedding besides the attention's mix, 768 wide; ``attn.c_proj``
reads the attention's mix alone; ``mlp.c_proj`` and layer 1's ``c_attn`` cost a 4 d wide FFN more."""

READS = {"ffn": "layer 0's FFN activations (GELU, 4 d wide)", "mlp": "ln_2 of layer 0's residual stream",
         "layer": "ln_1 of layer 0's output (layer 1's input)", "attention": "layer 0's mixed attention values"}
"""What a :class:`CausalCheck` computes, by the weight whose gradient it checks against."""


def _adapter_verifiers() -> tuple[tuple[int, str, str], ...]:
    """:data:`VERIFIERS` as LoRA modules: ``(layer, module of DECODER_LORA_MODULES, reads)``, same order."""
    short = {path: name for name, path in DECODER_LORA_MODULES.items()}
    out = []
    for suffix, reads in VERIFIERS:
        layer, path = suffix.removesuffix(".weight").split(".", 1)
        out.append((int(layer), short[path], reads))
    return tuple(out)


ADAPTER_VERIFIERS = _adapter_verifiers()
"""The adapters whose ``A`` gradient can check a prefix (:func:`adapter_verifier`), in :data:`VERIFIERS`' order."""

ACCEPT = 1e-3
"""Relative residual under which a prefix's newest position counts as inside the verifier's span.
True prefixes measure 1e-7 to 1e-5 (float32 round-off of the client's
gradient), a wrong token 1e-2 or more (``tests/attack/test_decoder.py``)."""

WIDEN = 256
"""Where every extension of a prefix dies, the search retries it with this many of the position's
best tokens by the layer-0 residual: a true token the candidate threshold missed."""


def _decoder_weight(selection: Selection, suffix: str) -> str | None:
    name = f"transformer.h.{suffix}"
    return name if name in selection.names else None


def verifier_of(selection: Selection) -> tuple[str, str] | None:
    """The weight that checks prefixes, and what it reads: the first of :data:`VERIFIERS` shared, or ``None``."""
    for suffix, reads in VERIFIERS:
        name = _decoder_weight(selection, suffix)
        if name is not None:
            return name, reads
    return None


def predicting_inputs(lengths: Sequence[int]) -> int:
    """The most distinct inputs a batch gives a layer that the loss reads: ``sum(n - 1) - (B - 1)``.

    Every position but the last predicts a token (the last one's output
    gradient is zero), and position 0 holds the same start token in every
    sentence. At batch size 1, the token count less one.
    """
    lengths = [int(n) for n in lengths]
    return sum(n - 1 for n in lengths) - (len(lengths) - 1)


def input_space(gradient: torch.Tensor, lengths: Sequence[int], *, rows: bool = False) -> RowSpace:
    """The span of the inputs of a ``Conv1D`` weight (stored ``(in, out)``) from its gradient ``X^T Delta``.

    The inputs span the gradient's columns: the row space of its
    transpose. Its rank is at most :func:`predicting_inputs`.

    Args:
        gradient: the ``Conv1D`` weight's gradient ``(in, out)``; with
            ``rows=True``, a matrix whose *rows* lie in the inputs' span
            (stacked LoRA ``A`` gradients, ``(m, in)``).
        lengths: the batch's token counts.
        rows: whether ``gradient`` is given row-wise.
    """
    return row_space(gradient if rows else gradient.T, max_rank=predicting_inputs(lengths))


def adapter_verifier(model: torch.nn.Module, selection: Selection, messages: Sequence[Sequence[torch.Tensor]],
                     lengths: Sequence[int]) -> tuple[str, str, RowSpace] | None:
    """A LoRA decoder's prefix check: the first :data:`VERIFIERS` module whose shared ``A`` rows reach ``n``.

    ``grad A = s B^T G`` of an adapter on a weight that reads layer 0's
    activations has its rows in those activations' span, but spans only
    ``min(m, n)`` of its dimensions (``m``: the ``A`` rows stacked over
    rounds, ``n`` = :func:`predicting_inputs`). With ``m >= n`` the rows span
    it all and the check is as exact as the frozen weight's gradient's; with
    fewer a true prefix's activation leaves the subspace, so the adapter is
    passed over (its capacity ``m``, not its numerical rank, decides: a
    shared prefix repeats activations and lowers the rank, never the need).

    Args:
        model: the LoRA decoder.
        selection: the shared selection.
        messages: one message's tensors per round (one per name of ``selection``).
        lengths: the batch's token counts.

    Returns:
        ``(stacked names, what it reads, its row space)``, or ``None``.
    """
    need = predicting_inputs(lengths)
    for layer, module, reads in ADAPTER_VERIFIERS:
        if not layer0_adapter_names(model, selection, modules=(module,), layer=layer):
            continue
        try:
            names, stacked = stacked_adapter_rows(model, selection, messages, modules=(module,), layer=layer)
        except ValueError:  # every block zero (B = 0, a fresh adapter): nothing to check against
            continue
        if stacked.shape[0] >= need:
            return stacked_label(names), reads, input_space(stacked, lengths, rows=True)
    return None


@dataclass
class CausalCheck:
    """The newest position of each prefix, run through layer 0, against a verifier weight's span.

    Layer 0 is run for one new position per (prefix, candidate) pair: its
    query against the prefix's cached keys and values and its own, then as
    far as :attr:`reads`. By the causal mask this *is* the client's
    activation at that position, were the prefix true.

    Attributes:
        model: the decoder (``GPT2LMHeadModel``), in ``eval()`` mode.
        space: row space of the verifier weight's inputs (:func:`input_space`).
        reads: a key of :data:`READS`.
    """

    model: torch.nn.Module
    space: RowSpace
    reads: str
    basis: torch.Tensor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.reads not in READS:
            raise ValueError(f"reads must be one of {sorted(READS)}, got {self.reads!r}.")
        base = self.model.base_model
        self.words, self.positions, self.block = base.wte.weight, base.wpe.weight, base.h[0]
        self.next_norm = base.h[1].ln_1 if len(base.h) > 1 else base.ln_f
        attention = self.block.attn
        self.heads, self.size = attention.num_heads, attention.head_dim
        self.width = self.words.shape[1]
        self.basis = self.space.basis.float().to(self.words.device)

    def _hidden(self, token_ids: torch.Tensor, position: int) -> torch.Tensor:
        """``wte[t] + wpe[position]``: ``(C,)`` ids to ``(C, d)`` (the residual stream before block 0)."""
        return self.words[token_ids.to(self.words.device)] + self.positions[position]

    def projections(self, token_ids: torch.Tensor, position: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Layer 0's query, key and value of ``(C,)`` tokens at one position, each ``(C, heads, size)``."""
        with torch.no_grad():
            mixed = self.block.attn.c_attn(self.block.ln_1(self._hidden(token_ids, position)))
        shape = (len(token_ids), self.heads, self.size)
        return tuple(part.reshape(shape) for part in mixed.split(self.width, dim=-1))

    def activations(self, keys: torch.Tensor, values: torch.Tensor,
                    token_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """What the verifier weight reads at position ``k``, for every candidate appended to every prefix.

        Args:
            keys: ``(K, k, heads, size)`` the prefixes' cached keys (positions ``0 .. k - 1``).
            values: ``(K, k, heads, size)`` their values.
            token_ids: ``(C,)`` candidates for position ``k``.

        Returns:
            ``(K, C, width)`` activations, and the candidates' own key and
            value ``(C, heads, size)``, to extend a surviving prefix's cache.
        """
        k_, k = keys.shape[:2]
        c = len(token_ids)
        query, key, value = self.projections(token_ids, k)
        with torch.no_grad():
            scale = 1 / math.sqrt(self.size)
            scores = torch.einsum("chd,knhd->kchn", query, keys) * scale  # (K, C, heads, k)
            own = ((query * key).sum(-1) * scale)[None, :, :, None].expand(k_, c, self.heads, 1)
            weights = torch.cat([scores, own], -1).softmax(-1)
            mixed = torch.einsum("kchn,knhd->kchd", weights[..., :k], values) + weights[..., k:] * value
            mixed = mixed.reshape(k_ * c, self.width)
            hidden = self._hidden(token_ids, k).expand(k_, c, self.width).reshape(k_ * c, self.width)
            out = self._finish(mixed, hidden)
        return out.view(k_, c, -1), key, value

    def extend(self, keys: torch.Tensor, values: torch.Tensor, token_ids: torch.Tensor) -> dict:
        """Every candidate appended to every prefix: ``(K, C)`` residuals and the candidates' keys and values.

        Args:
            keys, values, token_ids: as :meth:`activations`.

        Returns:
            ``residual`` ``(K, C)`` (relative, against the verifier's span),
            and ``key`` / ``value`` ``(C, heads, size)`` of the candidates.
        """
        out, key, value = self.activations(keys, values, token_ids)
        return {"residual": self._residual(out).cpu(), "key": key, "value": value}

    def _finish(self, mixed: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """Layer 0 from the heads' mixed values on, as far as :attr:`reads`: ``(N, d)`` to ``(N, width)``."""
        if self.reads == "attention":
            return mixed
        stream = hidden + self.block.attn.c_proj(mixed)
        normed = self.block.ln_2(stream)
        if self.reads == "mlp":
            return normed
        mlp = self.block.mlp
        activations = mlp.act(mlp.c_fc(normed))
        if self.reads == "ffn":
            return activations
        return self.next_norm(stream + mlp.c_proj(activations))

    def _residual(self, vectors: torch.Tensor) -> torch.Tensor:
        # In float32, the activations' own precision: the projection's
        # round-off (1e-7) is far under ACCEPT.
        return relative_residual(vectors, self.basis)


@dataclass
class _Prefix:
    """A surviving prefix: its ids, layer 0's cached keys and values ``(k, heads, size)``, its worst residual."""

    ids: list[int]
    keys: torch.Tensor
    values: torch.Tensor
    worst: float
    children: int = 0


def decoder_span_attack(
    model: torch.nn.Module,
    tokenizer,
    update: SharedUpdate | Sequence[SharedUpdate],
    selection: Selection,
    config: SpanConfig | None = None,
) -> AttackResult:
    """Recover a decoder client's batch from layer 0's ``c_attn`` gradient (or its LoRA ``A``'s), exactly.

    Args:
        model: the decoder (``GPT2LMHeadModel``), as the server holds it;
            or a LoRA decoder (:func:`gilib.lora.lora_victim`).
        tokenizer: its tokenizer.
        update: what the client sent (``gilib.client.client_update(...).shared``):
            one gradient per name of ``selection``, ``labels`` ``None`` (a
            decoder has no classes; unused anyway) and the batch's token
            counts, start and end tokens included, which the server must
            know, as in LAMP's threat model. On a LoRA decoder also a list
            of several rounds' messages of the same batch, whose ``c_attn``
            ``A`` gradients are stacked (:func:`gilib.attack.adapter_span_attack`);
            the first round's global model must be ``model`` (the prefix
            check reads that round's message).
        selection: must hold layer 0's ``attn.c_attn.weight``, or on a LoRA
            decoder a layer-0 ``c_attn`` ``A`` adapter (``select(model,
            "lora.A", 0)``); for a batch also a weight that checks prefixes
            (:data:`VERIFIERS`; ``select(model, "layer", 0)`` shares all of
            them), or an ``A`` adapter on one of them whose stacked rows
            reach the batch's predicting inputs (:func:`adapter_verifier`).
        config: the settings (:class:`~gilib.attack.SpanConfig`): ``threshold``
            (layer-0 candidates), ``beam`` (at most ``max(beam, 2 B)``
            prefixes kept per position) and ``time_budget``; the others
            steer BERT's peeling and are unused.

    Returns:
        An :class:`~gilib.attack.AttackResult` with ``method="span"``, one
        sentence per entry of ``update.lengths`` in that order (sentences of
        equal length in an order of their own). ``final_loss`` is the
        largest check residual among the chosen sentences' positions (the
        layer-0 residual without a verifier). ``diagnostics`` is a
        :class:`~gilib.attack.result.SpanDiagnostics`: ``weight``,
        ``verifier``, ``rank``, ``min_gap``, ``candidates`` (each interior
        position's layer-0 candidates), ``rounds`` (positions searched),
        ``found`` (per sentence: found whole by the search; ``None``
        without a verifier), ``uncertain`` (per sentence, positions filled
        by the fallback: each one's best token, unverified) and
        ``timed_out``.

    Raises:
        TypeError: as :func:`gilib.attack.span_attack`.
        ValueError: for a model that is not a GPT-2 decoder, an update that
            does not fit the model and the selection, a selection without
            layer 0's ``c_attn`` (or its ``A`` adapter), a batch with at least
            as many predicting tokens as the model is wide, a batch with no
            verifier weight (or only adapters too short for it), or several
            rounds of different lengths or without adapters.
    """
    start = time.perf_counter()
    cfg = checked_config(config, SpanConfig)
    updates, name, rows, verifier = _checked(model, update, selection)
    update = updates[0]
    lengths = list(update.lengths)
    deadline = None if cfg.time_budget is None else start + cfg.time_budget
    tokens = TokenSpace(model, tokenizer)
    bos, eos, _ = lm_special_ids(tokenizer)
    space = input_space(rows, lengths, rows=True)
    positions = range(1, max(lengths) - 1)
    residuals = token_residuals(model, tokens, space, positions)
    counts = position_counts(lengths)
    sets = candidate_sets(residuals, counts, cfg.threshold, capped=len(lengths) == 1)
    ordered = residuals.topk(min(max(map(len, sets), default=0) + 1, residuals.shape[1]), dim=1,
                             largest=False).values
    gaps = [float(row[len(s)] - row[len(s) - 1]) for row, s in zip(ordered, sets)] or [0.0]
    check_seconds = time.perf_counter() - start
    diagnostics = SpanDiagnostics(weight=name, verifier=None if verifier is None else verifier[0], rank=space.rank,
                                  min_gap=min(gaps), candidates=sets)
    if verifier is None:
        # A single sentence: each position's best token, as BERT's check at batch size 1.
        ids = [bos, *residuals.argmin(dim=1).tolist(), eos]
        final = float(residuals.min(dim=1).values.max()) if len(residuals) else 0.0
        return _result([ids], tokens, final, cfg, start, check_seconds, diagnostics)
    _, reads, verifier_space = verifier
    check = CausalCheck(model, verifier_space, reads)
    search = _search(check, residuals, sets, lengths, bos, beam=max(cfg.beam, 2 * len(lengths)), deadline=deadline)
    rows, found, uncertain, final = _assemble(check, residuals, search, lengths, bos, eos, deadline)
    diagnostics.rounds, diagnostics.found, diagnostics.uncertain = search.depth, found, uncertain
    diagnostics.timed_out = search.timed_out
    return _result(rows, tokens, final, cfg, start, check_seconds, diagnostics)


def _verifier(model, selection: Selection, updates: list[SharedUpdate],
              lengths: list[int]) -> tuple[str, str, RowSpace] | None:
    """The prefix check's ``(name, reads, space)``: a shared verifier weight, else an adapter's ``A`` rows."""
    found = verifier_of(selection)
    if found is not None:
        name, reads = found
        return name, reads, input_space(updates[0].shared_grads[selection.names.index(name)], lengths)
    # The first round's only: the activations a verifier reads move with the adapters from round to round,
    # and CausalCheck computes them at model's weights, the first round's global model.
    return adapter_verifier(model, selection, [updates[0].shared_grads], lengths)


def _checked(model, update: SharedUpdate | Sequence[SharedUpdate],
             selection: Selection) -> tuple[list[SharedUpdate], str, torch.Tensor, tuple | None]:
    """The messages checked, rows in layer 0's input span and the prefix check: ``(updates, name, (m, d) rows,
    verifier)`` (:func:`_verifier`'s, ``None`` without one).

    The rows are ``c_attn``'s gradient transposed (``Conv1D`` stores ``(in, out)``), or on a LoRA decoder the
    stacked ``A`` gradients of layer 0's ``c_attn`` adapter (every round's).
    """
    if not is_decoder(model):
        raise ValueError(f"decoder_span_attack reads a GPT-2 decoder's layer 0; got a "
                         f"{getattr(model.config, 'model_type', type(model).__name__)!r} model: use span_attack.")
    if isinstance(update, SharedUpdate):
        updates = [checked_update(update, model, selection)]
    else:
        updates = [checked_update(u, model, selection) for u in update]
        if not updates:
            raise ValueError("No update given: pass one SharedUpdate per round.")
        if len({tuple(u.lengths) for u in updates}) != 1:
            raise ValueError(f"The rounds' lengths differ ({[u.lengths for u in updates]}): stack the messages of "
                             f"one batch only.")
    lengths = updates[0].lengths
    name = _decoder_weight(selection, "0." + QKV)
    if name is not None and len(updates) > 1:
        raise ValueError("Several rounds' messages are stacked for a LoRA decoder's A adapters; a plain "
                         "c_attn gradient already spans every input: attack one round.")
    if name is not None:
        rows = updates[0].shared_grads[selection.names.index(name)].T
    elif layer0_adapter_names(model, selection, modules=("c_attn",)):
        # A LoRA decoder: grad A = s B^T G, rows in the span of layer 0's inputs.
        names, rows = stacked_adapter_rows(model, selection, [u.shared_grads for u in updates], modules=("c_attn",))
        name = stacked_label(names)
    else:
        raise ValueError(
            f"The span check needs the gradient of layer 0's query/key/value weight (attn.c_attn), or on a LoRA "
            f"decoder of its A adapter, and {selection.label} has none: select e.g. select(model, "
            f"'attention.qkv', 0) or 'layer', 0 (on a LoRA decoder select(model, 'lora.c_attn.A', 0))."
        )
    predicting, width = sum(lengths) - len(lengths), rows.shape[1]
    if predicting >= width:
        raise ValueError(
            f"The batch has {predicting} predicting tokens, at least the model's {width} dimensions: the span "
            f"can then hold every input, so the check cannot tell tokens apart. Attack fewer or shorter sentences."
        )
    verifier = _verifier(model, selection, updates, lengths)
    if len(lengths) > 1 and verifier is None:
        raise ValueError(
            f"A batch of {len(lengths)} sentences needs a weight that reads layer 0's activations to tell "
            f"its sentences apart, and {selection.label} has none: share all of layer 0 "
            f"(select(model, 'layer', 0)), or one of layer 0's attn.c_proj, mlp.c_fc, mlp.c_proj or layer 1's "
            f"attn.c_attn beside layer 0's attn.c_attn (on a LoRA decoder, an A adapter on one of them whose "
            f"rows, r times the rounds, reach the batch's {predicting_inputs(lengths)} predicting inputs)."
        )
    return updates, name, rows, verifier


@dataclass
class _Search:
    """Where the causal search ended.

    Attributes:
        complete: per sentence length ``n``, the surviving prefixes of ``n - 1`` tokens.
        dead: prefixes that died before any sentence length (the fallback's starts).
        depth: positions searched.
        timed_out: whether the time budget stopped it.
    """

    complete: dict[int, list[_Prefix]]
    dead: list[_Prefix]
    depth: int
    timed_out: bool


def _search(check: CausalCheck, residuals: torch.Tensor, sets: list[list[int]], lengths: list[int], bos: int, *,
            beam: int, deadline: float | None) -> _Search:
    """The left-to-right tree search: every surviving prefix extended by every candidate at the next position."""
    wanted = set(lengths)
    _, key, value = check.projections(torch.tensor([bos]), 0)
    alive = [_Prefix([bos], key, value, 0.0)]
    complete: dict[int, list[_Prefix]] = {}
    dead: list[_Prefix] = []
    depth, timed_out = 0, False
    for position in range(1, max(lengths) - 1):
        if position + 1 in wanted:
            complete[position + 1] = list(alive)
        alive = [p for p in alive if any(n > position + 1 for n in wanted)]
        if not alive:
            break
        if deadline is not None and time.perf_counter() > deadline:
            timed_out = True
            break
        depth += 1
        survivors = []
        candidates = torch.tensor(sets[position - 1])
        grown = check.extend(torch.stack([p.keys for p in alive]), torch.stack([p.values for p in alive]),
                             candidates)
        for i, prefix in enumerate(alive):
            kept = _kept(prefix, grown, i, candidates)
            if not kept:
                # Every listed candidate failed: the true token may sit above the candidate threshold.
                wider = residuals[position - 1].topk(min(WIDEN, residuals.shape[1]), largest=False).indices
                wider = wider[~torch.isin(wider, candidates)]
                more = check.extend(prefix.keys[None], prefix.values[None], wider)
                kept = _kept(prefix, more, 0, wider)
            if kept:
                prefix.children = len(kept)
                survivors += kept
            else:
                dead.append(prefix)
        survivors.sort(key=lambda p: p.worst)
        alive = survivors[:beam]
    if not timed_out and max(lengths) not in complete:
        complete[max(lengths)] = list(alive)
    return _Search(complete, dead, depth, timed_out)


def _kept(prefix: _Prefix, grown: dict, row: int, candidates: torch.Tensor) -> list[_Prefix]:
    """The extensions of ``prefix`` (row ``row`` of :meth:`CausalCheck.extend`) inside the verifier's span."""
    kept = []
    for j in torch.nonzero(grown["residual"][row] < ACCEPT).flatten().tolist():
        kept.append(_Prefix(prefix.ids + [int(candidates[j])],
                            torch.cat([prefix.keys, grown["key"][j:j + 1]]),
                            torch.cat([prefix.values, grown["value"][j:j + 1]]),
                            max(prefix.worst, float(grown["residual"][row, j]))))
    return kept


def _assemble(check: CausalCheck, residuals: torch.Tensor, search: _Search, lengths: list[int], bos: int,
              eos: int, deadline: float | None) -> tuple[list[list[int]], list[bool], list[list[int]], float]:
    """One sentence per length, from the search's complete prefixes, the rest by the fallback.

    A complete prefix that no longer sentence continues (a leaf of the
    tree) must be a sentence; one that continues may be one too (a
    sentence that is another's prefix), and is taken after the leaves of
    its length. A length with more sentences than complete prefixes holds
    a sentence twice, and a leaf is repeated. Spans carry no multiplicity,
    so where a length has more candidates than sentences *and* a sentence
    may repeat, no span tells the two apart: ``a cat sat`` twice beside
    ``the dog ran far away`` gives the spans of ``a cat sat``, ``the dog
    ran`` and ``the dog ran far away``; distinct sentences are preferred.
    A length with none (the search lost it) is filled greedily from the
    deepest dead prefix: each next position's best token by the check
    (past the deadline, by the layer-0 residual alone).

    Returns:
        ``(token rows, found, uncertain positions, largest residual)``.
    """
    need = Counter(lengths)
    chosen: dict[int, list[_Prefix]] = {}
    for n in sorted(need):
        pool = sorted(search.complete.get(n, []), key=lambda p: (p.children > 0, p.worst))
        picked = pool[:need[n]]
        leaves = [p for p in picked if p.children == 0] or picked
        while picked and len(picked) < need[n]:  # a sentence twice: the same leaf again
            picked.append(leaves[len(picked) % len(leaves)])
        chosen[n] = picked
    rows, found, uncertain, worst = [], [], [], 0.0
    taken = Counter()
    for n in lengths:
        if taken[n] < len(chosen[n]):
            prefix = chosen[n][taken[n]]
            rows.append(prefix.ids + [eos])
            found.append(True)
            uncertain.append([])
            worst = max(worst, prefix.worst)
        else:
            ids, guessed, residual = _fallback(check, residuals, search.dead, n, bos, deadline)
            rows.append(ids + [eos])
            found.append(False)
            uncertain.append(guessed)
            worst = max(worst, residual)
        taken[n] += 1
    return rows, found, uncertain, worst


def _fallback(check: CausalCheck, residuals: torch.Tensor, dead: list[_Prefix], n: int, bos: int,
              deadline: float | None) -> tuple[list[int], list[int], float]:
    """A sentence of length ``n`` the search did not find: its deepest dead prefix, then each position's best token.

    Each next token is the best of the position's :data:`WIDEN` best
    layer-0 tokens by the check; past the deadline, the best layer-0 token
    itself (the check's residual then counts as 1: unverified).

    Returns:
        ``(ids without the end token, positions guessed, largest residual)``.
    """
    starts = [p for p in dead if len(p.ids) <= n - 1]
    if starts:
        prefix = max(starts, key=lambda p: (len(p.ids), -p.worst))
    else:
        _, key, value = check.projections(torch.tensor([bos]), 0)
        prefix = _Prefix([bos], key, value, 0.0)
    guessed, worst = [], prefix.worst
    while len(prefix.ids) < n - 1:
        position = len(prefix.ids)
        if deadline is not None and time.perf_counter() > deadline:
            rest = residuals[position - 1:n - 2].argmin(dim=1).tolist()
            return prefix.ids + rest, guessed + list(range(position, n - 1)), 1.0
        options = residuals[position - 1].topk(min(WIDEN, residuals.shape[1]), largest=False).indices
        grown = check.extend(prefix.keys[None], prefix.values[None], options)
        j = int(grown["residual"][0].argmin())
        residual = float(grown["residual"][0, j])
        prefix = _Prefix(prefix.ids + [int(options[j])], torch.cat([prefix.keys, grown["key"][j:j + 1]]),
                         torch.cat([prefix.values, grown["value"][j:j + 1]]), max(prefix.worst, residual))
        guessed.append(position)
        worst = max(worst, residual)
    return prefix.ids, guessed, worst


def _result(rows: list[list[int]], tokens: TokenSpace, final: float, cfg: SpanConfig, start: float,
            check_seconds: float, diagnostics: SpanDiagnostics) -> AttackResult:
    seconds = time.perf_counter() - start
    return AttackResult(texts=[tokens.decode(row) for row in rows], token_ids=rows, final_loss=final,
                        seconds=seconds, method="span", config=asdict(cfg),
                        timings={"check": check_seconds, "assembly": seconds - check_seconds},
                        diagnostics=diagnostics)
