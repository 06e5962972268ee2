"""Gradient distances without per-candidate gradients ("ghost" scoring).

Scoring K candidate inputs with :func:`torch.func.vmap` materialises K
copies of the selected gradient: 11 M floats per candidate for all of
MiniLM's parameters. The cosine and L2 objectives need less than that.
They need, per parameter tensor, the inner product ``<G, S>`` of the
candidate's gradient ``G`` with the shared one ``S`` and the squared norm
``||G||^2``. For the weights that make up almost all of a Transformer, both
follow from per-token quantities:

* A linear layer ``y = x W^T + b`` over the M tokens of a candidate has
  ``G = Delta^T X``, with ``X`` its ``(M, d_in)`` inputs and ``Delta`` the
  ``(M, d_out)`` gradients of the loss at its outputs. Then

  ``<G, S> = sum(Delta * (X S^T))`` and
  ``||G||^2 = sum((Delta Delta^T) * (X X^T))``,

  an ``(M, d_out)`` product and two ``M x M`` Gram matrices instead of a
  ``d_out x d_in`` gradient. This is the trick behind Opacus's "ghost
  clipping" (Li et al., "Large Language Models Can Be Strong Differentially
  Private Learners", ICLR 2022), which needs only the norm.
* An embedding table is a linear layer on one-hot inputs: ``X X^T`` is the
  matrix of equal token ids and ``X S^T`` picks rows of ``S``.
* Biases and LayerNorm scales are small: their per-candidate gradients are
  sums over tokens and are formed directly.

One batched forward and one backward to the module outputs then score K
candidates, and the same formulas, differentiated once more, give the
attack's optimisation step. The results equal those of
:class:`~gilib.attack.objectives.GradientMatcher` up to floating-point
round-off (tested). Supported: BERT-family sequence classifiers (linear,
LayerNorm and embedding parameters, single-label cross-entropy) with the
``"cos"`` and ``"l2"`` objectives; :func:`supports` says when. LoRA
adapters (Hu et al., ICLR 2022) are covered as they are: peft's ``lora_A``
(``r x d_in``) and ``lora_B`` (``d_out x r``) are ``Linear`` modules that
the forward calls inside the adapted projection, so their hooks see their
own inputs (``x`` and ``A x``) and output gradients. Several rounds'
messages of one batch (each round's at its own model) are scored by
:class:`RoundsGhostMatcher`, the mean of one ghost matcher per round.
"""

from __future__ import annotations

import copy
from typing import Sequence

import torch
import torch.nn.functional as F

from transformers import BertForSequenceClassification
from transformers.activations import ACT2FN

from .objectives import Target, round_targets

GHOST_OBJECTIVES = ("cos", "l2")
PRECISIONS = ("float32", "bfloat16")
PACK_TOKENS = 128
"""Tokens per packed row, at least (a longer sentence gets a row of its own):
short enough that a row's attention scores, quadratic in its length, stay a
small part of the work."""


def _owners(model: torch.nn.Module, names: Sequence[str]) -> dict[str, tuple[torch.nn.Module, str]]:
    modules = dict(model.named_modules())
    owners = {}
    for name in names:
        module_name, _, attr = name.rpartition(".")
        owners[name] = (modules[module_name], attr)
    return owners


def supports(model: torch.nn.Module, names: Sequence[str], objective: str) -> bool:
    """Whether :class:`GhostMatcher` can score this selection exactly.

    Args:
        model: the victim.
        names: exact names of the selected parameters.
        objective: the gradient distance.

    Returns:
        True for ``"cos"``/``"l2"`` on a single-label BERT sequence
        classifier (``BertForSequenceClassification`` with its pooler)
        whose selected parameters all belong to ``Linear``, ``LayerNorm``
        or ``Embedding`` modules, with absolute position embeddings.
    """
    config = getattr(model, "config", None)
    if objective not in GHOST_OBJECTIVES or not isinstance(model, BertForSequenceClassification):
        return False  # the packed forward is BERT's (_packed_logits)
    if getattr(model.bert, "pooler", None) is None or config.hidden_act not in ACT2FN:
        return False
    if getattr(config, "num_labels", 0) < 2 or getattr(config, "problem_type", None) not in (
        None,
        "single_label_classification",
    ):
        return False
    if getattr(config, "position_embedding_type", "absolute") != "absolute":
        return False
    for module, _ in _owners(model, names).values():
        if not isinstance(module, (torch.nn.Linear, torch.nn.LayerNorm, torch.nn.Embedding)):
            return False
    return True


class GhostMatcher:
    """Reconstruction losses of many candidates from per-token activations.

    The drop-in fast counterpart of
    :class:`~gilib.attack.objectives.GradientMatcher` for the objectives and
    models :func:`supports` accepts: same names, same targets, same losses.

    Args:
        model: the victim, in ``eval()`` mode.
        names: exact names of the matched parameters (after
            :meth:`GradientMatcher.matched`).
        objective: ``"cos"`` or ``"l2"``.
    """

    def __init__(
        self, model: torch.nn.Module, names: Sequence[str], objective: str = "cos", precision: str = "float32"
    ) -> None:
        if not supports(model, names, objective):
            raise ValueError(
                "Ghost scoring covers cos/L2 on BERT-style classifiers (Linear, LayerNorm and Embedding "
                "parameters); use GradientMatcher for this selection."
            )
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}.")
        self.bfloat16 = precision == "bfloat16"
        # Autocast would cast every linear weight to bfloat16 at every call
        # (its cache lasts one autocast region, here one scoring or step):
        # cast them once instead, into a copy, for the same arithmetic.
        self.model = _with_bfloat16_linears(model) if self.bfloat16 else model
        model = self.model
        self.names = list(names)
        self.objective = objective
        self._device = next(model.parameters()).device
        self._packings: dict = {}
        self._shared_cache: dict = {}
        # Modules the packed forward runs at each sentence's [CLS] only
        # (_packed_logits): their tensors are (S, .), one row per sentence.
        # Their submodules too: a LoRA adapter on the last layer's query
        # (peft's lora_A / lora_B / base_layer inside the wrapped module) runs
        # at [CLS] only as well.
        last = model.bert.encoder.layer[-1]
        self._per_sentence = {
            id(sub) for m in (model.bert.pooler.dense, model.classifier, last.attention.self.query,
                              last.attention.output.dense, last.attention.output.LayerNorm,
                              last.intermediate.dense, last.output.dense, last.output.LayerNorm)
            for sub in m.modules()
        }
        owners = _owners(model, self.names)
        # Each module is hooked once, whatever number of its parameters is selected.
        self._modules: dict[int, torch.nn.Module] = {}
        self._params: list[tuple[int, str]] = []  # (module key, attribute), one per name
        for name in self.names:
            module, attr = owners[name]
            self._modules[id(module)] = module
            self._params.append((id(module), attr))

    # ------------------------------------------------------------------ forward

    def _forward(self, embeds: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor):
        """Run ``(K, B, T, d)`` candidates packed; the summed loss and each hooked module's tensors.

        Only each sentence's real tokens are run (:class:`Packing`); the
        captured token-level tensors are laid back out as ``(K, B * T, .)``
        with zeros at the padding, which adds nothing to any inner product.
        """
        k, b, t, d = embeds.shape
        packing = self._packing(_lengths(mask, k, b), t)
        captured: dict[int, list] = {}

        def hook(module, args, output):
            captured[id(module)] = [args[0], output]

        handles = [m.register_forward_hook(hook) for m in self._modules.values()]
        try:
            logits = _packed_logits(self.model, packing.pack(embeds.reshape(k * b * t, d)), packing)
        finally:
            for h in handles:
                h.remove()
        # The client's loss is the mean over its batch; candidates are
        # independent, so the sum of their losses has each candidate's
        # gradient at its own activations.
        per_sentence = F.cross_entropy(logits.float(), labels.reshape(-1), reduction="none")
        return per_sentence.view(k, b).mean(dim=1).sum(), captured, packing

    def _packing(self, lengths: tuple[int, ...], width: int) -> "Packing":
        """The (cached) :class:`Packing` of sentences of these lengths, padded to ``width``."""
        key = (lengths, width)
        if key not in self._packings:
            if len(self._packings) > 64:
                self._packings.clear()
            self._packings[key] = Packing(lengths, width, self._device)
        return self._packings[key]

    # ------------------------------------------------------------------ losses

    def losses(
        self, embeds: torch.Tensor, target: Target, *, per_candidate_target: bool = False, create_graph: bool = False
    ) -> torch.Tensor:
        """Gradient distance of every candidate.

        Args:
            embeds: ``(K, B, T, d)`` candidate word embeddings.
            target: what the client sent. With ``per_candidate_target`` every
                field has a leading ``K`` (one client per candidate, as in a
                multi-client optimisation step).
            create_graph: keep the graph, to differentiate the losses with
                respect to ``embeds``.

        Returns:
            ``(K,)`` losses.
        """
        k, b = embeds.shape[:2]
        labels, mask = target.labels, target.mask
        if not per_candidate_target:
            labels = labels.expand(k, *labels.shape)
            mask = mask.expand(k, *mask.shape)
        with torch.enable_grad():
            if not embeds.requires_grad:
                embeds = embeds.detach().requires_grad_(True)
            with torch.autocast(embeds.device.type, dtype=torch.bfloat16, enabled=self.bfloat16):
                loss, captured, packing = self._forward(embeds, labels, mask)
                keys = list(captured)
                outputs = [captured[key][1] for key in keys]
                deltas = torch.autograd.grad(loss, outputs, create_graph=create_graph, allow_unused=True)
            delta = {key: d if d is not None else torch.zeros_like(o) for key, d, o in zip(keys, deltas, outputs)}
            # Token-level tensors back in the candidates' layout (the modules
            # run at [CLS] only give one row per sentence already).
            def layout(key, tensor):
                return tensor if key in self._per_sentence else packing.unpack(tensor)

            inputs = {key: layout(key, inp) for key, (inp, _) in captured.items()}
            delta = {key: layout(key, d) for key, d in delta.items()}

            total = embeds.new_zeros(k)
            for (key, attr), shared in zip(self._params, target.shared_grads):
                module = self._modules[key]
                low, s_norm, s_sq = self._constants(shared, per_candidate_target)
                dot, norm2 = self._dot_and_norm(module, attr, inputs[key], delta[key], shared, low, k,
                                                per_candidate_target)
                if self.objective == "cos":
                    total = total + 1.0 - dot / (norm2.clamp_min(0).sqrt() * s_norm + 1e-12)
                else:
                    total = total + norm2 - 2 * dot + s_sq
            if self.objective == "cos":
                total = total / len(self._params)
        return total

    def _constants(self, shared: torch.Tensor, per_candidate: bool):
        """What the losses need of one shared tensor, computed once per tensor.

        Returns:
            ``shared`` in the dtype of the matrix products (bfloat16 with
            :attr:`bfloat16`), its norm and its squared norm (per client
            with ``per_candidate``).
        """
        key = id(shared)
        hit = self._shared_cache.get(key)
        if hit is None or hit[0] is not shared:
            if len(self._shared_cache) > 4096:
                self._shared_cache.clear()
            flat = shared.flatten(int(per_candidate))
            sq = flat.square().sum(dim=-1)
            low = shared.to(torch.bfloat16) if self.bfloat16 else shared
            hit = self._shared_cache[key] = (shared, low, sq.sqrt(), sq)
        return hit[1:]

    @staticmethod
    def _dot_and_norm(module, attr, inp, delta, shared, low, k, per_candidate):
        """``<G_k, S_k>`` and ``||G_k||^2`` for one parameter, each ``(K,)``.

        ``low`` is ``shared`` in the dtype of the forward's matrix products:
        with bfloat16 a linear weight's products run as the forward's do
        (bfloat16 in, float32 accumulation); every elementwise product and
        sum is in float32.
        """
        if isinstance(module, torch.nn.Linear) and attr == "weight":
            x = inp.reshape(k, -1, inp.shape[-1])  # (K, M, d_in)
            dl = delta.reshape(k, -1, delta.shape[-1])  # (K, M, d_out)
            tokens, d_in, d_out = x.shape[1], x.shape[2], dl.shape[2]
            if low.dtype != x.dtype or low.dtype != dl.dtype:
                x, dl = x.to(low.dtype), dl.to(low.dtype)
            if tokens * (d_in + d_out) >= d_in * d_out:
                # Many tokens: forming the gradient is cheaper than Gram matrices.
                g = torch.matmul(dl.transpose(1, 2), x).float()  # (K, d_out, d_in)
                return (g * shared).flatten(1).sum(1), g.flatten(1).square().sum(1)
            xs = torch.matmul(x, low.transpose(-1, -2))  # (K, M, d_out)
            grams = torch.matmul(dl, dl.transpose(1, 2)).float() * torch.matmul(x, x.transpose(1, 2)).float()
            return (dl.float() * xs.float()).flatten(1).sum(1), grams.flatten(1).sum(1)
        delta = delta.float()
        if isinstance(module, torch.nn.Embedding):
            ids = inp.reshape(k, -1)  # (K, M)
            dl = delta.reshape(k, -1, delta.shape[-1])  # (K, M, d)
            rows = shared[ids] if not per_candidate else torch.stack([s[i] for s, i in zip(shared, ids)])
            dot = (dl * rows).flatten(1).sum(1)
            same = (ids[:, :, None] == ids[:, None, :]).to(dl.dtype)
            norm2 = ((dl @ dl.transpose(1, 2)) * same).flatten(1).sum(1)
            return dot, norm2
        inp = inp.float()
        # Biases and LayerNorm scales: small, so form each candidate's gradient.
        dl = delta.reshape(k, -1, delta.shape[-1])
        if isinstance(module, torch.nn.LayerNorm) and attr == "weight":
            x_hat = F.layer_norm(inp, module.normalized_shape, eps=module.eps).reshape(dl.shape)
            g = (dl * x_hat).sum(1)
        else:  # a bias: Linear or LayerNorm
            g = dl.sum(1)
        return (g * shared).sum(1), g.square().sum(1)

    # ------------------------------------------------------------------ API of GradientMatcher

    def loss(self, embeds: torch.Tensor, target: Target) -> torch.Tensor:
        """Loss of one ``(B, T, d)`` candidate (differentiable)."""
        return self.losses(embeds[None], target, create_graph=embeds.requires_grad)[0]

    def score(self, candidates: torch.Tensor, target: Target, chunk_size: int | None = None) -> torch.Tensor:
        """Losses of ``(K, B, T, d)`` candidates for one client, ``chunk_size`` at a time."""
        chunk = chunk_size or candidates.shape[0]
        return torch.cat(
            [self.losses(c, target).detach() for c in candidates.split(chunk)]
        )


def _with_bfloat16_linears(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model`` whose linear layers hold bfloat16 weights and biases, frozen.

    Under bfloat16 autocast a linear layer casts its weight and bias to
    bfloat16 (round to nearest even) before the product; casting them once
    here gives the same products without the casts. Every other parameter
    (embeddings, LayerNorm) is shared with ``model``, not copied, and stays
    float32, as autocast keeps it. The copy is in ``eval()`` mode.
    """
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    own = {id(p) for m in linears for p in m.parameters(recurse=False)}
    memo = {id(p): p for p in model.parameters() if id(p) not in own}  # shared, not copied
    copy_ = copy.deepcopy(model, memo)
    for module in copy_.modules():
        if isinstance(module, torch.nn.Linear):
            for name, param in list(module.named_parameters(recurse=False)):
                setattr(module, name, torch.nn.Parameter(param.detach().to(torch.bfloat16), requires_grad=False))
    return copy_.eval()


# ---------------------------------------------------------------------- packing


def _lengths(mask: torch.Tensor, k: int, b: int) -> tuple[int, ...]:
    """Each sentence's length from the additive ``(..., B, 1, T, T)`` mask, ``K * B`` of them."""
    allowed = mask[..., 0, 0, :] == 0  # (B, T) or (K, B, T)
    lengths = allowed.sum(-1).expand(k, b) if allowed.dim() == 2 else allowed.sum(-1)
    return tuple(lengths.reshape(-1).tolist())


class Packing:
    """Sentences of different lengths laid end to end in rows, with no padding between them.

    A batch of sentences padded to a common width ``T`` wastes the padded
    positions' arithmetic (they change no real token's output: the mask
    hides them). Packing puts the real tokens of several sentences into one
    row, first-fit by decreasing length into rows of :data:`PACK_TOKENS`
    (or the longest sentence), gives each token its position within its own
    sentence, and lets a token attend only to its own sentence, so every
    sentence's outputs are those of the padded batch. Sentences that all
    have the same length are one row each, with no mask at all.

    Args:
        lengths: the real length of each of the ``S`` sentences, in order.
        width: ``T``, the padded width of the unpacked layout.
        device: where the index tensors live.

    Attributes:
        mask: ``(R, 1, C, C)`` additive mask, or ``None`` when no row holds
            two sentences.
        position_ids: ``(R, C)`` each token's position in its sentence.
        cls: ``(S,)`` flat index of each sentence's first token.
    """

    def __init__(self, lengths: Sequence[int], width: int, device) -> None:
        lengths = [int(n) for n in lengths]
        self.sentences, self.width = len(lengths), width
        capacity = max(lengths) if len(set(lengths)) == 1 else max(PACK_TOKENS, max(lengths))
        rows: list[list[int]] = []  # sentence indices per row
        room: list[int] = []
        for s in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
            row = next((r for r, free in enumerate(room) if free >= lengths[s]), None)
            if row is None:
                rows.append([])
                room.append(capacity)
                row = len(rows) - 1
            rows[row].append(s)
            room[row] -= lengths[s]
        self.rows, self.cols = len(rows), max(capacity - free for free in room)
        blank = self.sentences * width  # the zero slot of the unpacked layout
        source = torch.full((self.rows, self.cols), blank, dtype=torch.long)
        segment = torch.arange(self.rows * self.cols).view(self.rows, self.cols).neg() - 1
        positions = torch.zeros(self.rows, self.cols, dtype=torch.long)
        cls = torch.zeros(self.sentences, dtype=torch.long)
        for r, members in enumerate(rows):
            col = 0
            for s in members:
                n = lengths[s]
                source[r, col : col + n] = s * width + torch.arange(n)
                segment[r, col : col + n] = s
                positions[r, col : col + n] = torch.arange(n)
                cls[s] = r * self.cols + col
                col += n
        # target[i] = where unpacked slot i sits in the packed rows (or the zero slot).
        target = torch.full((self.sentences * width,), self.rows * self.cols, dtype=torch.long)
        flat = source.view(-1)
        real = flat < blank
        target[flat[real]] = torch.arange(flat.numel())[real]
        self._source, self._target = source.view(-1).to(device), target.to(device)
        self.position_ids, self.cls = positions.to(device), cls.to(device)
        shared = max(len(m) for m in rows) > 1
        self._allowed = (segment[:, :, None] == segment[:, None, :]).to(device) if shared else None
        self.row = (cls // self.cols).to(device)  # (S,) each sentence's row
        own = segment[cls // self.cols] == torch.arange(self.sentences)[:, None]  # (S, C)
        self._cls_allowed = own.to(device) if shared else None
        self._masks: dict = {}

    def mask(self, dtype: torch.dtype) -> torch.Tensor | None:
        """``(R, 1, C, C)`` additive mask: a token sees its own sentence only (``None``: no mask needed)."""
        return self._additive("rows", self._allowed, dtype)

    def cls_mask(self, dtype: torch.dtype) -> torch.Tensor | None:
        """``(S, 1, 1, C)`` additive mask of each ``[CLS]`` over its row (``None``: no mask needed)."""
        return self._additive("cls", self._cls_allowed, dtype)

    def _additive(self, name: str, allowed: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
        """0 where ``allowed``, the dtype's minimum elsewhere, with a head axis (and for ``cls`` a query axis).

        Built once per dtype: a packing is reused for every step of an attack.
        """
        if allowed is None:
            return None
        key = (name, dtype)
        if key not in self._masks:
            zero = torch.zeros((), dtype=dtype, device=allowed.device)
            additive = torch.where(allowed, zero, torch.finfo(dtype).min)
            self._masks[key] = additive[:, None] if name == "rows" else additive[:, None, None]
        return self._masks[key]

    def pack(self, flat: torch.Tensor) -> torch.Tensor:
        """``(S * T, d)`` padded-layout rows to ``(R, C, d)`` packed rows."""
        padded = torch.cat([flat, flat.new_zeros(1, *flat.shape[1:])])
        return padded[self._source].view(self.rows, self.cols, *flat.shape[1:])

    def unpack(self, packed: torch.Tensor) -> torch.Tensor:
        """A module's ``(R, C, .)`` packed tensor to the padded layout ``(S * T, .)``, zeros at the padding."""
        flat = packed.reshape(self.rows * self.cols, *packed.shape[2:])
        return torch.cat([flat, flat.new_zeros(1, *flat.shape[1:])])[self._target]


def _packed_logits(model: torch.nn.Module, embeds: torch.Tensor, packing: Packing) -> torch.Tensor:
    """A BERT sequence classifier's logits for packed ``(R, C, d)`` word embeddings: ``(S, labels)``.

    The forward of ``transformers``' ``BertForSequenceClassification`` in
    ``eval()`` mode, written out so that sentences can share a row: each
    token gets its own sentence's position, attends to its own sentence,
    and each sentence is pooled at its own ``[CLS]``. The model's modules
    are called as they are (so hooks see them); ``tests/attack`` checks the
    logits against the model's own.
    """
    bert, config = model.bert, model.config
    emb = bert.embeddings
    h = embeds + emb.position_embeddings(packing.position_ids)
    h = h + emb.token_type_embeddings(torch.zeros_like(packing.position_ids))
    h = emb.LayerNorm(h)
    mask = packing.mask(h.dtype)
    rows, cols = packing.rows, packing.cols
    heads = config.num_attention_heads
    act = ACT2FN[config.hidden_act]
    *inner, last = bert.encoder.layer
    for layer in inner:
        att = layer.attention.self
        size = att.attention_head_size

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(rows, cols, heads, size).transpose(1, 2)

        q, key, v = split(att.query(h)), split(att.key(h)), split(att.value(h))
        scores = torch.matmul(q, key.transpose(2, 3)) * att.scaling
        if mask is not None:
            scores = scores + mask
        ctx = torch.matmul(torch.softmax(scores, dim=-1), v).transpose(1, 2).reshape(rows, cols, heads * size)
        out = layer.attention.output
        h = out.LayerNorm(out.dense(ctx) + h)
        ffn = layer.output
        h = ffn.LayerNorm(ffn.dense(act(layer.intermediate.dense(h))) + h)
    # The loss reads each sentence's [CLS] only, so the last layer needs
    # every token's keys and values but the rest at [CLS] alone: the same
    # outputs, with most of the last layer's arithmetic skipped.
    att = last.attention.self
    size = att.attention_head_size
    n = packing.sentences
    first = h.reshape(rows * cols, -1)[packing.cls]  # (S, d)

    def rows_of(t: torch.Tensor) -> torch.Tensor:  # (R, C, d) -> each sentence's row, (S, heads, C, size)
        return t.view(rows, cols, heads, size).transpose(1, 2)[packing.row]

    q = att.query(first).view(n, heads, 1, size)
    key, v = rows_of(att.key(h)), rows_of(att.value(h))
    scores = torch.matmul(q, key.transpose(2, 3)) * att.scaling  # (S, heads, 1, C)
    cls_mask = packing.cls_mask(scores.dtype)
    if cls_mask is not None:
        scores = scores + cls_mask
    ctx = torch.matmul(torch.softmax(scores, dim=-1), v).reshape(n, heads * size)
    out = last.attention.output
    first = out.LayerNorm(out.dense(ctx) + first)
    ffn = last.output
    first = ffn.LayerNorm(ffn.dense(act(last.intermediate.dense(first))) + first)
    pooled = torch.tanh(bert.pooler.dense(first))
    return model.classifier(pooled)


class RoundsGhostMatcher:
    """Ghost scoring over several rounds: the mean of one :class:`GhostMatcher` per round's model.

    The fast counterpart of :class:`~gilib.attack.objectives.RoundsMatcher`
    (same targets, split by :func:`~gilib.attack.objectives.round_targets`).

    Args:
        matchers: one :class:`GhostMatcher` per round, over the same names.
    """

    def __init__(self, matchers: Sequence[GhostMatcher]) -> None:
        self.rounds_matchers = list(matchers)
        self.rounds = len(self.rounds_matchers)
        self.names = self.rounds_matchers[0].names

    def losses(self, embeds: torch.Tensor, target: Target, **options) -> torch.Tensor:
        """``(K,)`` mean over rounds of :meth:`GhostMatcher.losses` (same options)."""
        parts = [m.losses(embeds, t, **options) for m, t in zip(self.rounds_matchers,
                                                                 round_targets(target, self.rounds))]
        return torch.stack(parts).mean(dim=0)

    loss = GhostMatcher.loss
    score = GhostMatcher.score
