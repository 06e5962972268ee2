"""Checks of whole sentences: is a hypothesis one of the batch's sentences?

At batch size B > 1 the span check (:mod:`gilib.attack.rowspace`) gives each
position's candidate tokens, but in a large batch not which token sits
where: the sets become the batch's bag of words (chapter 5's batch study:
true tokens and impostors both at 1e-7 to 1e-6). A check of whole sentences
decides, and there are two, both :class:`SentenceCheck` s:

* :class:`ForwardCheck` (DAGER, Petrov et al., "DAGER: Exact Gradient
  Inversion for Large Language Models", NeurIPS 2024), when the client also
  shares a weight that reads layer 0's activations: layer 1's query or
  value weight (layer 0's output), or layer 0's own FFN weights, when the
  client shares the whole layer. A hypothesis is right when its own
  activations, computed by running it alone through the embeddings and
  layer 0 (the attention mask keeps the batch's sentences apart), lie in
  that weight gradient's row space. It needs no labels, and a position's
  residual can be recomputed for every candidate token at once
  (:meth:`ForwardCheck.local`), which is what makes the searches fast.
* :class:`OutputCheck`, from the layer-0 weight alone: ``G = Delta^T X``, so
  the *columns* of ``G`` span the output gradients ``delta_i`` of the
  batch's tokens, and a right hypothesis's own output gradients (one
  forward and backward pass, for each class) lie in that column space.

The searches (:mod:`gilib.attack.searches`) and peeling
(:mod:`gilib.attack.peeling`) use either through :class:`SentenceCheck`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence

import torch

from .rowspace import RowSpace

FOUND = 1e-4
"""Mean residual of a hypothesis under which the search stops. True
sentences measure 1e-7 to 4e-5 (longer ones higher), a hypothesis with one
wrong token 1e-3 or more."""


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


class SentenceCheck(Protocol):
    """What the searches need of a check of whole sentences.

    Attributes:
        local: ``local(hypothesis, token_ids, positions)``, each candidate's
            residual at its own position with the rest of the hypothesis
            kept, ``(C,)``: a cheap score that ranks moves; ``None`` where a
            check has none (every move then costs a full check).
    """

    local: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None

    def position_residuals(self, hypotheses: torch.Tensor) -> torch.Tensor:
        """``(K, n)`` token ids to ``(K, n - 2)`` residuals of the interior positions."""

    def loss(self, hypotheses: torch.Tensor) -> torch.Tensor:
        """``(K, n)`` token ids to ``(K,)``: one number per hypothesis, near 0 for a true sentence."""


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
        sketch: whether the cheap first stages (:meth:`appended`,
            :meth:`local`), which only pick what the exact residuals then
            rank, may measure a wide span's residual through a random
            sketch of its complement (:func:`_sketch_map`). The sketch's
            10 % passes every near-true candidate on to the exact stage
            when the message is exact (a true sentence measures round-off);
            under noise (SecAgg+'s rounding) true and near-true differ by
            less, and every stage projects exactly. Whole hypotheses and
            prefixes (:meth:`position_residuals`, :meth:`prefix_residuals`,
            :meth:`loss`) are always measured exactly: ranked through the
            sketch, the beam of a large batch loses true prefixes, and
            peeling needs more rounds and more effort (``bench/peel_speed.py``).
        forwarded: token positions run through layer 0 so far (every
            hypothesis and prefix checked whole): the searches' work, a
            count rather than a clock (:data:`gilib.attack.peeling.SWEEP_SHARE`).
    """

    model: torch.nn.Module
    space: RowSpace
    reads: str = "layer"
    sketch: bool = True
    forwarded: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        if self.reads not in READS:
            raise ValueError(f"reads must be one of {sorted(READS)}, got {self.reads!r}.")
        base = self.model.base_model
        self.embeddings, self.layer = base.embeddings, base.encoder.layer[0]
        device = next(self.model.parameters()).device
        self.basis = self.space.basis.float().to(device)
        # Two maps of the residual: the exact one ranks, the cheap one only preselects.
        basis = self.space.basis.double()
        exact = _outside_map(basis)
        self.outside = None if exact is None else exact.float().to(device)
        sketched = _sketch_map(basis) if self.sketch else None
        self.cheap = self.outside if sketched is None else sketched.float().to(device)

    def _finish(self, attended: torch.Tensor) -> torch.Tensor:
        """Layer 0 from its attention block's output on, as far as :attr:`reads`."""
        if self.reads == "attention":
            return attended
        activations = self.layer.intermediate(attended)
        return activations if self.reads == "ffn" else self.layer.output(activations, attended)

    def _forward(self, ids: torch.Tensor) -> torch.Tensor:
        """``(K, n)`` ids, each sentence alone, to ``(K, n, width)`` activations."""
        self.forwarded += ids.numel()
        with torch.no_grad():
            attended = self.layer.attention(self.embeddings(input_ids=ids.to(self.basis.device)))[0]
            return self._finish(attended)

    def _heads(self, vectors: torch.Tensor, *projections: str) -> list[torch.Tensor]:
        """Layer 0's ``query`` / ``key`` / ``value`` of ``(..., d)`` vectors, split by head: ``(..., heads, size)``."""
        attention = self.layer.attention.self
        shape = (*vectors.shape[:-1], attention.num_attention_heads, attention.attention_head_size)
        return [getattr(attention, name)(vectors).view(shape) for name in projections]

    def _residual(self, vectors: torch.Tensor, cheap: bool = False) -> torch.Tensor:
        # Through the cheapest exact map of the residual (:func:`_outside_map`), or with ``cheap``
        # the sketch where allowed: the searches of large batches spend most of their time here.
        return relative_residual(vectors, self.basis, self.cheap if cheap else self.outside)

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
        return self._residual(out, cheap=True).view(k_, c).cpu()

    def local(self, hypothesis: torch.Tensor, token_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Each candidate's residual at its own position, the rest of the hypothesis kept: ``(C,)``.

        Layer 0 is rerun for one position per candidate: its query, and its
        key and value replacing the old token's among the others'. The
        candidate's effect on the *other* positions is left out, so this
        only ranks moves; :meth:`loss` decides them.

        Args:
            hypothesis: ``(n,)`` token ids, or ``(K, n)`` for several
                hypotheses at once (the candidates' own projections are
                then computed once for all of them).
            token_ids: ``(C,)`` candidate tokens.
            positions: ``(C,)`` the position each one would take.

        Returns:
            ``(C,)``, or ``(K, C)`` for ``(K, n)`` hypotheses.
        """
        device = self.basis.device
        size = self.layer.attention.self.attention_head_size
        single = hypothesis.dim() == 1
        hypotheses = hypothesis[None] if single else hypothesis
        positions = positions.to(device)
        with torch.no_grad():
            context_in = self.embeddings(input_ids=hypotheses.to(device))  # (K, n, d)
            x = self._inputs(token_ids.to(device), positions)  # (C, d)
            k_, c = len(hypotheses), len(x)
            keys, values = self._heads(context_in, "key", "value")  # (K, n, heads, size)
            query, own_key, own_value = self._heads(x, "query", "key", "value")  # (C, heads, size)
            heads = query.shape[1]
            at = positions.view(1, c, 1, 1).expand(k_, c, heads, 1)
            scores = torch.einsum("chd,knhd->kchn", query, keys) / math.sqrt(size)
            own = ((query * own_key).sum(-1) / math.sqrt(size))[None, :, :, None].expand(k_, c, heads, 1)
            weights = scores.scatter(3, at, own).softmax(-1)  # (K, C, heads, n)
            mixed = torch.einsum("kchn,knhd->kchd", weights, values)
            mixed = mixed + weights.gather(3, at) * (own_value[None] - values[:, positions])
            x = x.expand(k_, c, -1).reshape(k_ * c, -1)
            out = self._finish(self.layer.attention.output(mixed.reshape(k_ * c, -1), x))
        residuals = self._residual(out, cheap=True).view(k_, c).cpu()
        return residuals[0] if single else residuals

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


def relative_residual(vectors: torch.Tensor, basis: torch.Tensor, outside: torch.Tensor | None = None) -> torch.Tensor:
    """Each vector's distance to the span of ``basis``, relative to its length: ``(..., d)`` to ``(...,)`` float64.

    Computed in the activations' own float32: the projection adds float32
    round-off (about 1e-7), far under the checks' thresholds.

    Args:
        vectors: ``(..., d)`` activations.
        basis: ``(d, r)`` orthonormal columns, float32.
        outside: a map whose output's norm is the distance (:func:`_outside_map` or :func:`_sketch_map`),
            or ``None`` for the two projections onto ``basis``.
    """
    vectors = vectors.float()
    if outside is None:
        distance = (vectors - (vectors @ basis) @ basis.T).norm(dim=-1)
    else:
        distance = (vectors @ outside).norm(dim=-1)
    return (distance / vectors.norm(dim=-1).clamp_min(1e-30)).double()


SKETCH = 128
"""Columns of the random sketch that measures a residual where the span is
too wide for an exact projection to be cheap (:func:`_sketch_map`)."""


def _outside_map(basis: torch.Tensor) -> torch.Tensor | None:
    """A ``(d, d - r)`` map whose output's norm is a vector's distance to the span of ``basis``, or ``None``.

    The distance of ``v`` to the span of ``r`` orthonormal columns ``Q``
    costs two ``(d, r)`` products as ``|v - Q Q^T v|``. Where ``d - r < 2 r``
    (a large batch in a narrow layer) the span's orthogonal complement
    ``C`` is cheaper: ``|C^T v|`` is the distance itself, in one
    ``(d, d - r)`` product and without cancellation. (Where both are wide,
    :func:`_sketch_map` gives a cheaper, approximate map.)

    Args:
        basis: ``(d, r)`` orthonormal columns, in float64.

    Returns:
        ``(d, d - r)``, or ``None`` where the exact projection is the cheapest.
    """
    width, rank = basis.shape
    if width - rank < 2 * rank:
        q, _ = torch.linalg.qr(basis, mode="complete")
        return q[:, rank:]
    return None


def _sketch_map(basis: torch.Tensor) -> torch.Tensor | None:
    """The seeded ``(d, SKETCH)`` Gaussian sketch of the span's complement, or ``None`` where an exact map is as cheap.

    ``P = (I - Q Q^T) S / sqrt(k)`` (``k`` = :data:`SKETCH`): ``|P^T v|`` is
    ``v``'s distance to the span of ``Q`` to within about ``1 / sqrt(k)``
    (Johnson and Lindenstrauss, 1984), enough to preselect hypotheses, and a
    true sentence still measures its float32 floor, far under :data:`FOUND`.
    ``None`` unless both exact maps (two projections onto the ``r`` columns,
    or the ``d - r`` columns of the complement, :func:`_outside_map`) are
    wider than ``2 k`` (the FFN's 1536 activations with hundreds of tokens).
    """
    width, rank = basis.shape
    if min(2 * rank, width - rank) <= 2 * SKETCH:
        return None
    generator = torch.Generator().manual_seed(0)
    gaussian = torch.randn(width, SKETCH, generator=generator, dtype=basis.dtype) / math.sqrt(SKETCH)
    return gaussian - basis @ (basis.T @ gaussian)
