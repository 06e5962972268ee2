"""A batch's sentences, found one at a time and peeled off the shared gradient.

At batch size B > 1 the span check (:mod:`gilib.attack.span`) gives each
position's candidate tokens. In a large batch those sets stop pinning
positions: the inputs of the batch's tokens span most of the learned
position embeddings' directions, so every token of the batch lies in the
row space at *every* position (measured in chapter 5's batch study: the
sets are the batch's bag of words, true tokens and impostors both at
1e-7 to 1e-6). Which token sits where must come from a check of whole
sentences, and there are two:

* :class:`ForwardCheck` (DAGER, Petrov et al., "DAGER: Exact Gradient
  Inversion for Large Language Models", NeurIPS 2024), when the client also
  shares a weight of layer 1 that reads the layer's input (query or value):
  a hypothesis is right when its own layer-1 inputs, computed by running it
  alone through the embeddings and layer 0 (the attention mask keeps the
  batch's sentences apart), lie in that weight gradient's row space. Layer
  0's FFN weights, when the client shares the whole layer, read activations
  that attention has mixed as well and serve the same way. It
  needs no labels, and a position's residual can be recomputed for every
  candidate token at once (:meth:`ForwardCheck.local`), which is what makes
  the search fast.
* :class:`OutputCheck`, from the layer-0 weight alone: ``G = Delta^T X``, so
  the *columns* of ``G`` span the output gradients ``delta_i`` of the
  batch's tokens, and a right hypothesis's own output gradients (one
  forward and backward pass, for each class) lie in that column space.

With a :class:`ForwardCheck`, the search is a beam over prefixes
(:func:`beam_search`): layer 0's attention is mostly local, so a prefix
run alone already lies close to the check's row space, and one
left-to-right pass closes sentences of every length; :func:`sweep`
repairs the beam's typical mistake, two sentences joined. With the
:class:`OutputCheck` it is an iterated local search (:func:`search_sentence`). DAGER enumerates the product of the sets
instead (:func:`enumerate_batch`), which grows as (set size)^length;
chapter 5's batch study (:mod:`gilib.span_study`) runs both.

A found sentence is then *peeled*: the client's gradient is the mean over
its batch, so a sentence ``s`` with label ``y`` adds exactly
``grad CE(s, y) / B`` to every shared weight gradient. Subtracting the right
sentence with the right label leaves the gradient of the other sentences,
whose rank is smaller (:func:`peel_test`): this verifies the sentence
exactly, tells its label (so the client's labels are not needed), and
shrinks the row space, so that the candidate sets of the remaining
sentences are cleaner at every round. The attacker must know the batch's
token counts (``lengths``, as in LAMP's threat model) and the client's loss
(mean cross-entropy), and nothing else.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import torch

from .span import RowSpace, check_positions, row_space
from .tokens import TokenSpace

FOUND = 1e-4
"""Mean residual of a hypothesis under which the search stops. True
sentences measure 1e-7 to 4e-5 (longer ones higher), a hypothesis with one
wrong token 1e-3 or more."""
MAX_EFFORT = 4
"""By default, a round that finds no sentence is rerun with twice the
beam, restarts and kicks, up to this factor, before the sentences left are
returned as they stand."""
BEAM = 16
"""Default width of :func:`beam_search`: the prefixes kept at each position."""
NEW_TOKEN_WEIGHT = 3.0
"""Weight of a prefix's newest position in its beam score. That position
has no right neighbour yet, so its residual is less sure than the earlier
ones'; still, it decides most steps (after the true prefix, the true token
was among the 4 best of a bag of 144 at 89 % of the steps and among the 16
best at 93 %, in an SST-2 batch of eight; measured while developing, not
cached)."""
LAYER0_WEIGHT = 0.1
"""Weight of the newest token's layer-0 span residual (its logarithm) in
the beam score: weak evidence of its position (true tokens rank 3rd to
30th in the bag), but independent of the missing right context."""
PEELED = 1e-5
"""Relative singular value at the gradient's numerical rank less one, after
a sentence's gradient is subtracted, under which the sentence (and its
label) is right (:func:`_peel_label`). Without noise the right subtraction leaves float32 round-off
(1e-7 to 1e-6); a wrong sentence or label leaves its own directions, 1e-4
and more."""


READS = {"layer": "layer 0's output (layer 1's input)", "attention": "layer 0's attention block output",
         "ffn": "layer 0's FFN activations"}
"""What a :class:`ForwardCheck` computes, by the weight whose gradient it checks against."""


def reads_of(weight: str) -> str:
    """Which activations a verifier weight reads: a key of :data:`READS`.

    Layer 1's query or value weight reads layer 0's output; layer 0's FFN
    input weight (``intermediate.dense``) the attention block's output;
    its FFN output weight (``output.dense``, 1536 wide in MiniLM) the
    FFN's activations.
    """
    if weight.endswith("intermediate.dense.weight"):
        return "attention"
    if weight.endswith(".output.dense.weight") and ".attention." not in weight:
        return "ffn"
    return "layer"


@dataclass
class ForwardCheck:
    """A hypothesis's own activations after layer 0's attention against the row space of a weight reading them.

    DAGER's check uses layer 1's query or value weight, whose inputs are
    layer 0's outputs. Layer 0's own FFN weights read activations that
    already mix the sentence through attention as well, so a client that
    shares all of layer 0 (the paper's single-layer setting) gives the
    same kind of check without layer 1.

    Attributes:
        model: the victim (a BERT).
        space: row space of the verifier weight's gradient.
        reads: which activations the verifier weight reads (:data:`READS`).
    """

    model: torch.nn.Module
    space: RowSpace
    reads: str = "layer"

    def __post_init__(self) -> None:
        if self.reads not in READS:
            raise ValueError(f"reads must be one of {sorted(READS)}, got {self.reads!r}.")
        base = self.model.base_model
        self.embeddings, self.layer = base.embeddings, base.encoder.layer[0]
        self.basis = self.space.basis.float().to(next(self.model.parameters()).device)

    def _finish(self, attended: torch.Tensor) -> torch.Tensor:
        """Layer 0 from its attention block's output on, as far as :attr:`reads`."""
        if self.reads == "attention":
            return attended
        activations = self.layer.intermediate(attended)
        return activations if self.reads == "ffn" else self.layer.output(activations, attended)

    def _forward(self, ids: torch.Tensor) -> torch.Tensor:
        """``(K, n)`` ids, each sentence alone, to ``(K, n, width)`` activations."""
        with torch.no_grad():
            attended = self.layer.attention(self.embeddings(input_ids=ids.to(self.basis.device)))[0]
            return self._finish(attended)

    def _heads(self, vectors: torch.Tensor, *projections: str) -> list[torch.Tensor]:
        """Layer 0's ``query`` / ``key`` / ``value`` of ``(..., d)`` vectors, split by head: ``(..., heads, size)``."""
        attention = self.layer.attention.self
        shape = (*vectors.shape[:-1], attention.num_attention_heads, attention.attention_head_size)
        return [getattr(attention, name)(vectors).view(shape) for name in projections]

    def _residual(self, vectors: torch.Tensor) -> torch.Tensor:
        vectors = vectors.double()
        basis = self.basis.double()
        inside = (vectors @ basis) @ basis.T
        return (vectors - inside).norm(dim=-1) / vectors.norm(dim=-1).clamp_min(1e-30)

    def position_residuals(self, hypotheses: torch.Tensor) -> torch.Tensor:
        """``(K, n)`` ids to ``(K, n - 2)`` relative residuals of the interior positions' activations."""
        return self._residual(self._forward(hypotheses)[:, 1:-1]).cpu()

    def loss(self, hypotheses: torch.Tensor) -> torch.Tensor:
        """``(K, n)`` ids to ``(K,)``: the mean residual over interior positions."""
        return self.position_residuals(hypotheses).mean(-1)

    def prefix_residuals(self, prefixes: torch.Tensor) -> torch.Tensor:
        """``(K, k)`` prefixes (``[CLS]`` first, no ``[SEP]``) to ``(K, k - 1)``: positions ``1 ..``, the rest cut off.

        A prefix is run as if the sentence ended there: its positions
        attend to one another only. Layer 0's heads look mostly at nearby
        tokens, so a true prefix's positions stay close to the row space,
        except the last one or two, which miss their right neighbours.
        """
        return self._residual(self._forward(prefixes)[:, 1:]).cpu()

    def appended(self, prefixes: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
        """Each token's residual at the end of each prefix, the prefix's own positions left out: ``(K, C)``.

        The cheap first stage of :func:`beam_search`: one query, key and
        value per candidate against the prefix's keys and values, as
        :meth:`local` does for a replaced token.

        Args:
            prefixes: ``(K, k)`` token ids, ``[CLS]`` first.
            token_ids: ``(C,)`` candidates for position ``k``.
        """
        device = self.basis.device
        size = self.layer.attention.self.attention_head_size
        k_, k = prefixes.shape
        with torch.no_grad():
            context_in = self.embeddings(input_ids=prefixes.to(device))  # (K, k, d)
            x = self._inputs(token_ids.to(device), torch.full_like(token_ids, k).to(device))  # (C, d)
            c = len(x)
            keys, values = self._heads(context_in, "key", "value")  # (K, k, heads, size)
            query, own_key, own_value = self._heads(x, "query", "key", "value")  # (C, heads, size)
            scores = torch.einsum("chd,knhd->kchn", query, keys) / math.sqrt(size)
            own = ((query * own_key).sum(-1) / math.sqrt(size))[None, :, :, None].expand(k_, c, query.shape[1], 1)
            weights = torch.cat([scores, own], -1).softmax(-1)  # (K, C, heads, k + 1)
            mixed = torch.einsum("kchn,knhd->kchd", weights[..., :k], values) + weights[..., k:] * own_value
            x = x.expand(k_, c, -1).reshape(k_ * c, -1)
            out = self._finish(self.layer.attention.output(mixed.reshape(k_ * c, -1), x))
        return self._residual(out).view(k_, c).cpu()

    def local(self, hypothesis: torch.Tensor, token_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Each candidate's residual at its own position, the rest of the hypothesis kept: ``(C,)``.

        Layer 0 is rerun for one position per candidate: its query, and its
        key and value replacing the old token's among the others'. The
        candidate's effect on the *other* positions is left out, so this
        only ranks moves; :meth:`loss` decides them.

        Args:
            hypothesis: ``(n,)`` token ids.
            token_ids: ``(C,)`` candidate tokens.
            positions: ``(C,)`` the position each one would take.
        """
        device = self.basis.device
        size = self.layer.attention.self.attention_head_size
        with torch.no_grad():
            context_in = self.embeddings(input_ids=hypothesis[None].to(device))[0]  # (n, d)
            x = self._inputs(token_ids.to(device), positions.to(device))  # (C, d)
            c = len(x)
            keys, values = self._heads(context_in, "key", "value")  # (n, heads, size)
            query, own_key, own_value = self._heads(x, "query", "key", "value")  # (C, heads, size)
            at = positions.to(device).view(c, 1, 1).expand(c, query.shape[1], 1)
            scores = torch.einsum("chd,nhd->chn", query, keys) / math.sqrt(size)
            scores = scores.scatter(2, at, ((query * own_key).sum(-1) / math.sqrt(size)).unsqueeze(-1))
            weights = scores.softmax(-1)
            mixed = torch.einsum("chn,nhd->chd", weights, values)
            mixed = mixed + weights.gather(2, at) * (own_value - values[positions.to(device)])
            out = self._finish(self.layer.attention.output(mixed.reshape(c, -1), x))
        return self._residual(out).cpu()

    def _inputs(self, token_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        emb = self.embeddings
        z = emb.word_embeddings.weight[token_ids] + emb.position_embeddings.weight[positions] \
            + emb.token_type_embeddings.weight[0]
        return emb.LayerNorm(z)


@dataclass
class OutputCheck:
    """A hypothesis's own output gradients at a layer-0 weight against that gradient's column space.

    Attributes:
        model: the victim.
        module: the layer-0 linear layer whose weight gradient is shared.
        space: the column space of that gradient (the row space of its transpose).
        classes: the labels tried; the loss is the smallest over them.
    """

    model: torch.nn.Module
    module: torch.nn.Module
    space: RowSpace
    classes: Sequence[int] = field(default_factory=lambda: (0, 1))
    local = None  # no cheap per-position score: every move costs a backward pass

    def position_residuals(self, hypotheses: torch.Tensor) -> torch.Tensor:
        """``(K, n)`` ids to ``(K, n - 2)``: interior positions' residuals, under the best class."""
        basis = self.space.basis.double()
        best = None
        for label in self.classes:
            delta = output_gradients(self.model, self.module, hypotheses, label)[:, 1:-1].double()
            inside = (delta @ basis) @ basis.T
            residual = (delta - inside).norm(dim=-1) / delta.norm(dim=-1).clamp_min(1e-30)
            best = residual if best is None else torch.where(
                residual.median(-1, keepdim=True).values < best.median(-1, keepdim=True).values, residual, best)
        return best

    def loss(self, hypotheses: torch.Tensor) -> torch.Tensor:
        """``(K, n)`` ids to ``(K,)``: the median residual over interior positions.

        The median, because where two sentences hold the same token at the
        same position, ``G`` holds only the *sum* of their output gradients
        (one input, ``(delta_a + delta_b) x^T``): at those positions even the
        true sentence's own output gradient leaves the column space.
        """
        return self.position_residuals(hypotheses).median(-1).values


def output_gradients(model: torch.nn.Module, module: torch.nn.Module, ids: torch.Tensor, label: int) -> torch.Tensor:
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


def search_sentence(
    length: int,
    candidates: Sequence[Sequence[int]],
    check,
    tokenizer,
    generator: torch.Generator,
    *,
    restarts: int = 1,
    kicks: int = 15,
    kick_size: int = 2,
    top: int = 3,
    found: float = FOUND,
    avoid: Sequence[torch.Tensor] = (),
    start: torch.Tensor | None = None,
) -> tuple[torch.Tensor, float]:
    """One sentence of ``length`` tokens, by iterated local search over the candidates.

    From a seeded random start, each step scores the moves (one position
    changed to another candidate) with ``check.loss`` and takes the best,
    until none improves; then a *kick* redraws ``kick_size`` positions,
    picked at random in proportion to their check residual (where the
    hypothesis is wrong), and the descent runs again, kept if it ends lower. Where the
    check has cheap per-position scores (:meth:`ForwardCheck.local`), a step
    scores only each position's ``top`` candidates by that score, plus the
    hypothesis that takes every position's best at once; otherwise each
    position's first ``2 * top`` candidates (by span-check residual).

    Args:
        length: the sentence's token count, ``[CLS]`` and ``[SEP]`` included.
        candidates: token ids for positions ``1 ..`` (at least ``length - 2`` of them).
        check: a :class:`ForwardCheck` or :class:`OutputCheck`.
        tokenizer: the victim's tokenizer (special tokens).
        generator: seeds the starts and kicks.
        restarts: random starts.
        kicks: perturbations per start.
        kick_size: positions a kick changes.
        top: moves per position under a local score.
        found: loss under which the search stops.
        avoid: sentences already peeled; a search ending on one counts as failed.
        start: the first start's hypothesis (e.g. the beam's best); random when ``None``.

    Returns:
        ``(ids, loss)``: the best ``(length,)`` hypothesis and its loss.
    """
    options = [list(c) for c in candidates[: length - 2]]
    ends = (tokenizer.cls_token_id, tokenizer.sep_token_id)
    token_ids = torch.tensor([v for c in options for v in c])
    positions = torch.tensor([p for p, c in enumerate(options, start=1) for _ in c])
    offsets = [0]
    for c in options:
        offsets.append(offsets[-1] + len(c))

    def draw(h: torch.Tensor, where: Sequence[int]) -> torch.Tensor:
        h = h.clone()
        for p in where:
            c = options[p - 1]
            h[p] = c[int(torch.randint(len(c), (1,), generator=generator))]
        return h

    def descend(h: torch.Tensor, current: float) -> tuple[torch.Tensor, float]:
        for _ in range(4 * length):
            if current < found:
                break
            trials = []
            if check.local is not None:
                scores = check.local(h, token_ids, positions)
                jump = h.clone()
                for p in range(1, length - 1):
                    order = scores[offsets[p - 1]:offsets[p]].argsort()
                    jump[p] = options[p - 1][int(order[0])]
                    moves = [options[p - 1][int(i)] for i in order[: top + 1] if options[p - 1][int(i)] != int(h[p])]
                    trials += [(p, v) for v in moves[:top]]
                hypotheses = [jump] if not torch.equal(jump, h) else []
            else:
                # Every move costs a backward pass: each position's first candidates by span residual.
                trials = [(p, v) for p in range(1, length - 1) for v in options[p - 1][: 2 * top] if v != int(h[p])]
                hypotheses = []
            for p, v in trials:
                moved = h.clone()
                moved[p] = v
                hypotheses.append(moved)
            if not hypotheses:
                break
            stacked = torch.stack(hypotheses)
            losses = check.loss(stacked)
            k = int(losses.argmin())
            if float(losses[k]) >= current - 1e-12:
                break
            h, current = stacked[k], float(losses[k])
        return h, current

    best, best_loss = None, math.inf
    interior = list(range(1, length - 1))
    for attempt in range(restarts):
        if attempt == 0 and start is not None:
            h = start.clone()
        else:
            h = draw(torch.tensor([ends[0]] + [0] * (length - 2) + [ends[1]]), interior)
        h, current = descend(h, float(check.loss(h[None])[0]))
        for _ in range(kicks):
            if current < found and not any(torch.equal(h, a) for a in avoid):
                break
            # Kick where the check says the hypothesis is wrong: positions drawn by their residual.
            weights = check.position_residuals(h[None])[0].clamp_min(1e-12)
            chosen = torch.multinomial(weights, min(kick_size, length - 2), generator=generator) + 1
            kicked, kicked_loss = descend(*_scored(draw(h, chosen.tolist()), check))
            if kicked_loss < current or any(torch.equal(h, a) for a in avoid):
                h, current = kicked, kicked_loss
        if current < best_loss and not any(torch.equal(h, a) for a in avoid):
            best, best_loss = h, current
        if best_loss < found:
            break
    if best is None:
        best, best_loss = h, current
    return best, best_loss


def beam_search(
    check: ForwardCheck,
    candidates: Sequence[Sequence[int]],
    lengths: Sequence[int],
    tokenizer,
    *,
    width: int = BEAM,
    layer0: torch.Tensor | None = None,
    found: float = FOUND,
) -> tuple[dict[tuple[int, ...], float], dict[int, tuple[torch.Tensor, float]]]:
    """Sentences of every length at once, left to right, from one beam of prefixes.

    Layer 0's attention is mostly local, so a prefix cut off from the rest
    of its sentence keeps its positions near the row space of layer 1's
    gradient (:meth:`ForwardCheck.prefix_residuals`), and a wrong token
    shows at once. At each position every prefix of the beam is extended
    by every candidate; a cheap score (:meth:`ForwardCheck.appended`, the
    new position only) keeps ``4 * width`` extensions, the prefix's full
    residuals rank them, and ``width`` survive. Whenever the position
    reached is the end of some sentence, the beam closed with ``[SEP]`` is
    checked whole: a true sentence measures about ``1e-6``.

    Args:
        check: the forward check (layer 1's weight or layer 0's FFN).
        candidates: token ids for positions ``1 ..`` (at least ``max(lengths) - 2`` of them).
        lengths: the token counts of the sentences sought.
        tokenizer: the victim's tokenizer (special tokens).
        width: prefixes kept per position.
        layer0: ``(P, V)`` layer-0 span residuals of positions ``1 ..``
            (:func:`~gilib.attack.span.check_positions`): the newest token's
            adds :data:`LAYER0_WEIGHT` times its logarithm to the score.
        found: mean residual under which a closed prefix is a sentence.

    Returns:
        ``(hits, best)``: every closed prefix under ``found`` with its loss,
        and per length the best closed prefix ``((n,) ids, loss)``.
    """
    lengths = sorted({int(n) for n in lengths})
    cls_id, sep_id = tokenizer.cls_token_id, tokenizer.sep_token_id
    beams = torch.tensor([[cls_id]])
    past = torch.zeros(1, dtype=torch.float64)  # each prefix's residuals summed, the newest weighted as the rest
    hits: dict[tuple[int, ...], float] = {}
    best: dict[int, tuple[torch.Tensor, float]] = {}
    for k in range(1, lengths[-1] - 1):
        options = torch.tensor(list(candidates[k - 1]))
        prior = torch.zeros(len(options), dtype=torch.float64)
        if layer0 is not None:
            prior = LAYER0_WEIGHT * layer0[k - 1, options].double().clamp_min(1e-12).log()
        # Stage 1: the new position alone, for every prefix and candidate.
        cheap = past[:, None] + NEW_TOKEN_WEIGHT * check.appended(beams, options) + prior[None]
        keep = cheap.flatten().topk(min(4 * width, cheap.numel()), largest=False).indices
        parents, children = keep // len(options), keep % len(options)
        extended = torch.cat([beams[parents], options[children, None]], 1)
        # Stage 2: every position of the kept prefixes.
        residuals = check.prefix_residuals(extended)
        score = residuals[:, :-1].sum(-1) + NEW_TOKEN_WEIGHT * residuals[:, -1] + prior[children]
        order = _diverse(score, extended[:, 1], width)
        beams, past = extended[order], residuals[order].sum(-1)
        if k + 2 in lengths:
            closed = torch.cat([beams, torch.full((len(beams), 1), sep_id)], 1)
            losses = check.loss(closed)
            i = int(losses.argmin())
            best[k + 2] = (closed[i], float(losses[i]))
            hits.update({tuple(h.tolist()): float(v) for h, v in zip(closed, losses) if v < found})
    return hits, best


def _diverse(score: torch.Tensor, starts: torch.Tensor, width: int) -> torch.Tensor:
    """The ``width`` best indices by ``score``, at most half of them sharing a first word.

    One beam serves every sentence, and the sentence it follows best
    would otherwise take all of it: the others' prefixes must survive
    too. The cap keeps at least two sentence starts in the beam (more
    when the beam is wider than the best start's share); the best of the
    rest fills what the cap leaves empty.
    """
    order = score.argsort().tolist()
    cap, kept, taken, rest = max(1, width // 2), [], {}, []
    for i in order:
        start = int(starts[i])
        if taken.get(start, 0) < cap:
            kept.append(i)
            taken[start] = taken.get(start, 0) + 1
        else:
            rest.append(i)
        if len(kept) == width:
            break
    kept += rest[: width - len(kept)]
    return torch.tensor(sorted(kept, key=lambda i: float(score[i])), dtype=torch.long)


def sweep(
    check: ForwardCheck,
    candidates: Sequence[Sequence[int]],
    start: torch.Tensor,
    *,
    width: int = BEAM,
    reverse: bool = False,
    found: float = FOUND,
) -> tuple[torch.Tensor, float]:
    """A beam over one whole sentence, position by position, from a start hypothesis.

    Where :func:`beam_search` goes wrong, its best hypothesis is often two
    true sentences joined (one's first half, another's second): every
    position but those near the joint has the right neighbours. The sweep
    keeps ``width`` whole hypotheses and at each position in turn tries
    every candidate there (ranked cheaply by :meth:`ForwardCheck.local`,
    then ``4 * width`` checked whole), so the joint can travel to the
    sentence's end, one position at a time, while the rest stays fixed.

    Args:
        check: the forward check (layer 1's weight or layer 0's FFN).
        candidates: token ids for positions ``1 ..``.
        start: ``(n,)`` the hypothesis to improve.
        width: hypotheses kept.
        reverse: sweep from the last position to the first.
        found: loss under which the sweep stops.

    Returns:
        ``(ids, loss)``: the best ``(n,)`` hypothesis met and its loss.
    """
    n = len(start)
    beams = start[None].clone()
    residuals = check.position_residuals(beams)
    best, best_loss = beams[0], float(residuals.mean())
    positions = range(n - 2, 0, -1) if reverse else range(1, n - 1)
    for p in positions:
        if best_loss < found:
            break
        options = torch.tensor(list(candidates[p - 1]))
        cheap = torch.stack([r.sum() - r[p - 1] + check.local(h, options, torch.full_like(options, p))
                             for h, r in zip(beams, residuals)])
        keep = cheap.flatten().topk(min(4 * width, cheap.numel()), largest=False).indices
        moved = beams[keep // len(options)].clone()
        moved[:, p] = options[keep % len(options)]
        moved = torch.unique(torch.cat([beams, moved]), dim=0)
        scored = check.position_residuals(moved)
        order = scored.sum(-1).argsort()[:width]
        beams, residuals = moved[order], scored[order]
        if float(residuals[0].mean()) < best_loss:
            best, best_loss = beams[0], float(residuals[0].mean())
    return best, best_loss


def _scored(h: torch.Tensor, check) -> tuple[torch.Tensor, float]:
    return h, float(check.loss(h[None])[0])


def sentence_gradients(model: torch.nn.Module, names: Sequence[str], ids: torch.Tensor, label: int,
                       batch_size: int) -> list[torch.Tensor]:
    """What one sentence adds to a batch's mean-loss gradient: ``grad CE(ids, label) / batch_size``."""
    params = dict(model.named_parameters())
    device = next(model.parameters()).device
    ids = ids.reshape(1, -1).to(device)
    with torch.enable_grad():
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        loss = torch.nn.functional.cross_entropy(logits, torch.tensor([label], device=device)) / batch_size
        grads = torch.autograd.grad(loss, [params[n] for n in names])
    return [g.detach() for g in grads]


def peel_test(gradient: torch.Tensor, contribution: torch.Tensor, rank: int) -> float:
    """How far ``gradient - contribution`` is from rank ``rank``: its ``rank``-th singular value, relative.

    Args:
        gradient: ``(d_out, d_in)`` what is left of the shared weight gradient.
        contribution: one sentence's part of it (:func:`sentence_gradients`).
        rank: the remaining sentences' token count (an upper bound of their rank).
    """
    values = torch.linalg.svdvals((gradient - contribution).double())
    if rank >= len(values):
        raise ValueError(f"Cannot test rank {rank} of a gradient with {len(values)} singular values.")
    return float(values[rank] / torch.linalg.svdvals(gradient.double())[0])


@dataclass
class Peeled:
    """The outcome of :func:`peel`.

    Attributes:
        ids: ``(B, T)`` token ids, padded with ``[PAD]``, in the order of ``lengths``.
        found: per sentence, whether it was verified by peeling.
        labels: per sentence, the label its peeling showed (``None`` if not found).
        uncertain: per sentence, the positions whose check residual stayed
            above :data:`FOUND` (empty for a found sentence).
        rounds: the peeling rounds run.
    """

    ids: torch.Tensor
    found: list[bool]
    labels: list[int | None]
    uncertain: list[list[int]]
    rounds: int


def peel(
    model: torch.nn.Module,
    tokenizer,
    names: Sequence[str],
    shared_grads: Sequence[torch.Tensor],
    weight: str,
    verifier: str | None,
    lengths: Sequence[int],
    *,
    threshold: float,
    restarts: int = 1,
    kicks: int = 15,
    max_effort: int = MAX_EFFORT,
    beam: int = BEAM,
    seed: int = 0,
) -> Peeled:
    """Recover a batch sentence by sentence, peeling each off the shared gradients.

    Every round: candidate sets from what is left of the layer-0 weight's
    gradient (:func:`~gilib.attack.span.token_residuals`); with a
    :class:`ForwardCheck`, one :func:`beam_search` for every remaining length at once, and
    each sentence it closes that passes :func:`peel_test` for some class
    is subtracted from every shared weight gradient. Where that peels
    nothing, :func:`sweep` from the beam's best of each length, shortest
    first, and at full effort (or with the :class:`OutputCheck`, at once)
    :func:`search_sentence` until one sentence passes. Each peel cleans the next round's candidate sets and
    check. A round that finds none is rerun with more search (up to
    ``max_effort`` times as much); then the sentences left get the
    searches' best hypotheses, with their uncertain positions.

    Args:
        model: the victim, as the server holds it.
        tokenizer: its tokenizer.
        names: the parameter names of ``shared_grads``.
        shared_grads: what the client sent, one gradient per name.
        weight: the layer-0 query, key or value weight to take candidates from.
        verifier: the weight for :class:`ForwardCheck` (layer 1's query or
            value weight, or layer 0's FFN weights: :func:`reads_of`),
            or ``None`` for :class:`OutputCheck` on ``weight``.
        lengths: the B token counts.
        threshold: span-check residual under which a token is a candidate.
        restarts: random starts per search.
        kicks: perturbations per start.
        max_effort: the most a fruitless round's search is multiplied by.
        beam: the beam's width (with a verifier).
        seed: seeds the searches.
    """
    lengths = [int(n) for n in lengths]
    batch = len(lengths)
    grads = {n: g.detach().clone() for n, g in zip(names, shared_grads) if n.endswith(".weight")}
    shift_invariant = weight.endswith("key.weight")
    tokens = TokenSpace(model, tokenizer)
    generator = torch.Generator().manual_seed(seed)
    classes = list(range(int(getattr(model.config, "num_labels", 2))))
    module = model.get_submodule(weight.rsplit(".", 1)[0])
    remaining = list(range(batch))
    ids = torch.full((batch, max(lengths)), tokenizer.pad_token_id)
    found, labels = [False] * batch, [None] * batch
    uncertain: list[list[int]] = [[] for _ in range(batch)]
    peeled: list[torch.Tensor] = []
    last: dict[int, tuple[torch.Tensor, float]] = {}
    rounds, effort = 0, 1

    def _peel_one(h: torch.Tensor) -> bool:
        """Peel ``h`` off the gradients if it passes the peel test for some class."""
        n = len(h)
        slots = [i for i in remaining if lengths[i] == n]
        if not slots:
            return False
        label, parts = _peel_label(model, grads, weight, h, classes, batch, sum(lengths[i] for i in remaining))
        if label is None:
            return False
        for name, part in zip(grads, parts):
            grads[name] = grads[name] - part.to(grads[name].device)
        remaining.remove(slots[0])
        ids[slots[0], :n], found[slots[0]], labels[slots[0]] = h, True, label
        peeled.append(h)
        return True

    while remaining:
        rounds += 1
        left = [lengths[i] for i in remaining]
        tokens_left = sum(left)
        _, layer0, candidates = check_positions(model, tokens, grads[weight], left,
                                                shift_invariant=shift_invariant, threshold=threshold, capped=False)
        if verifier is not None:
            check = ForwardCheck(model, row_space(grads[verifier], max_rank=tokens_left), reads_of(verifier))
            hits, best = beam_search(check, candidates, left, tokenizer, width=beam * effort, layer0=layer0)
        else:
            check = OutputCheck(model, module, row_space(grads[weight].T, max_rank=tokens_left), classes)
            hits, best = {}, {}
        for n, (h, loss) in best.items():
            last[n] = (h, loss)
        progress = False
        for h in sorted(hits, key=hits.get):  # every sentence the beam closed, best first
            progress |= _peel_one(torch.tensor(h))
        if not progress and verifier is not None:
            # Sweeps, forth and back, from the beam's best of each length, shortest first.
            for n in sorted(set(left)):
                h, loss = best[n]
                for reverse in (False, True):
                    h, loss = sweep(check, candidates, h, width=beam * effort, reverse=reverse)
                    if loss < last[n][1]:
                        last[n] = (h, loss)
                    if loss < FOUND:
                        break
                if loss < 100 * FOUND and _peel_one(h):
                    progress = True
                    break
        if not progress and (verifier is None or effort == max_effort):
            # The local search, from the beam's best where there is one, shortest length first.
            for n in sorted(set(left)):
                h, loss = search_sentence(n, candidates, check, tokenizer, generator, restarts=restarts * effort,
                                          kicks=kicks * effort, avoid=peeled, start=best.get(n, (None,))[0])
                if loss < last.get(n, (None, math.inf))[1]:
                    last[n] = (h, loss)
                if loss < 100 * FOUND and _peel_one(h):
                    progress = True
                    break
        if progress:
            effort = 1
        elif effort < max_effort:
            effort *= 2  # a round that found nothing is run again, searching longer
        else:
            break
    for i in remaining:
        n = lengths[i]
        h, _ = last.get(n) or search_sentence(n, candidates, check, tokenizer, generator, restarts=restarts,
                                              kicks=kicks, avoid=peeled)
        ids[i, :n] = h
        per_position = check.position_residuals(h[None])[0]
        uncertain[i] = [p + 1 for p, r in enumerate(per_position.tolist()) if r >= FOUND]
    return Peeled(ids, found, labels, uncertain, rounds)


def _peel_label(model, grads, weight, h, classes, batch, tokens_left) -> tuple[int | None, list[torch.Tensor]]:
    """The class whose subtraction lowers the gradient's rank, if one does (under :data:`PEELED`).

    The rank tested is the gradient's own numerical rank, less one, not
    the token count: in a large batch whose words repeat (``[CLS]`` in
    every sentence, "the" at position 1 in many) the rank sits far below
    the token count (134 for 202 tokens in a CoLA batch of 16), and at
    the token count every label passes. A sentence shares at least one
    input with no other (its ``[CLS]`` aside), so the right label lowers
    the rank by one or more, and a wrong label leaves its sentence's
    directions in. Every class is tested and the best kept.

    Returns:
        ``(label, parts)``: the class (``None`` if none passes) and the
        sentence's gradient for it on every weight of ``grads``, in order.
    """
    names = list(grads)
    rank = row_space(grads[weight], max_rank=tokens_left).rank - 1
    scores, parts = {}, {}
    for label in classes:
        parts[label] = sentence_gradients(model, names, h, label, batch)
        part = parts[label][names.index(weight)]
        scores[label] = peel_test(grads[weight], part.to(grads[weight].device), rank)
    best = min(scores, key=scores.get)
    return (best, parts[best]) if scores[best] < PEELED else (None, [])



def enumerate_batch(
    model: torch.nn.Module,
    tokenizer,
    names: Sequence[str],
    shared_grads: Sequence[torch.Tensor],
    weight: str,
    verifier: str,
    lengths: Sequence[int],
    *,
    threshold: float,
    budget: int = 5000,
    seed: int = 0,
    chunk: int = 500,
) -> torch.Tensor:
    """DAGER's search for encoders, as a baseline: enumerate, score with layer 1, keep the best.

    For each length, every sentence in the product of the positions'
    candidate sets is scored by :class:`ForwardCheck` when the product holds
    at most ``budget`` sentences; otherwise ``budget`` seeded random draws
    from it are (DAGER's own cap on combinations). The best distinct
    hypotheses fill the sentences of that length. No peeling: the
    candidate sets are those of the whole batch.

    Args:
        model, tokenizer, names, shared_grads, weight, lengths, threshold:
            as for :func:`peel`.
        verifier: the weight for :class:`ForwardCheck` (required).
        budget: sentences scored per length at most.
        seed: seeds the random draws.
        chunk: sentences scored per call.

    Returns:
        ``(B, T)`` token ids in the order of ``lengths``, padded with ``[PAD]``.
    """
    lengths = [int(n) for n in lengths]
    grads = dict(zip(names, shared_grads))
    _, _, candidates = check_positions(model, TokenSpace(model, tokenizer), grads[weight], lengths,
                                       shift_invariant=weight.endswith("key.weight"), threshold=threshold,
                                       capped=False)
    check = ForwardCheck(model, row_space(grads[verifier], max_rank=sum(lengths)), reads_of(verifier))
    generator = torch.Generator().manual_seed(seed)
    ids = torch.full((len(lengths), max(lengths)), tokenizer.pad_token_id)
    for n in sorted(set(lengths)):
        options = [torch.tensor(c) for c in candidates[: n - 2]]
        size = math.prod(len(c) for c in options)
        if size <= budget:
            grid = torch.cartesian_prod(*options) if len(options) > 1 else options[0][:, None]
            grid = grid.reshape(-1, n - 2)
        else:
            grid = torch.stack([c[torch.randint(len(c), (budget,), generator=generator)] for c in options], 1)
        ends = torch.tensor([tokenizer.cls_token_id, tokenizer.sep_token_id])
        hypotheses = torch.cat([ends[0].expand(len(grid), 1), grid, ends[1].expand(len(grid), 1)], 1)
        losses = torch.cat([check.loss(part) for part in hypotheses.split(chunk)])
        slots = [i for i, m in enumerate(lengths) if m == n]
        chosen: list[torch.Tensor] = []
        for k in losses.argsort().tolist():
            if len(chosen) == len(slots):
                break
            if not any(torch.equal(hypotheses[k], c) for c in chosen):
                chosen.append(hypotheses[k])
        for i, h in zip(slots, chosen):
            ids[i, :n] = h
    return ids
