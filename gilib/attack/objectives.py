"""Gradient-matching objectives: how far a candidate's gradient is from the shared one.

* ``"l2"``: squared Euclidean distance, DLG (Zhu et al., NeurIPS 2019).
* ``"tag"``: L2 plus a weighted L1 distance, TAG (Deng et al., Findings of
  EMNLP 2021).
* ``"cos"``: one minus the cosine similarity, averaged over parameter
  tensors, as LAMP (Balunovic et al., NeurIPS 2022) and the partial-gradient
  paper (Li et al., EMNLP 2024) use it. Cosine ignores the gradient's
  scale, which depends on the unknown loss value.

:class:`GradientMatcher` computes a candidate input's gradient on the
selected parameters, exactly as the client did, and its distance to
``shared_grads``. It is written with :mod:`torch.func`, so the same code
scores one candidate or, under :func:`torch.func.vmap`, many at once (each
with its own per-candidate gradient). For a GPT-2-style decoder the
client's loss is the next-token cross-entropy under a causal mask, taken at
the labels the candidate's own nearest words give.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
from torch.func import functional_call, grad, vmap

from ..models import is_decoder, lm_special_ids
from .tokens import TokenSpace

OBJECTIVES = ("cos", "l2", "tag")
_ROUND_OFF = 1e-6  # relative gradient norm below which a tensor is numerically zero
FREE = -1
"""In a decoder's label template (:meth:`GradientMatcher.target`): a label the candidate's own tokens give."""


def gradient_distance(
    grads: Sequence[torch.Tensor],
    shared_grads: Sequence[torch.Tensor],
    objective: str = "cos",
    tag_l1_weight: float = 0.01,
) -> torch.Tensor:
    """Distance between two lists of gradient tensors.

    Args:
        grads: a candidate's gradients, one tensor per selected parameter.
        shared_grads: the gradients the client shared, same shapes.
        objective: ``"cos"``, ``"l2"`` or ``"tag"``.
        tag_l1_weight: weight of the L1 term of ``"tag"``.

    Returns:
        A scalar tensor (differentiable when ``grads`` is).
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"Unknown objective '{objective}'. Choose one of: {', '.join(OBJECTIVES)}.")
    total = 0.0
    for g, s in zip(grads, shared_grads, strict=True):
        if objective == "cos":
            total = total + 1.0 - (g * s).sum() / (g.norm() * s.norm() + 1e-12)
        elif objective == "l2":
            total = total + (g - s).square().sum()
        else:
            diff = g - s
            total = total + diff.square().sum() + tag_l1_weight * diff.abs().sum()
    if objective == "cos":
        total = total / len(shared_grads)
    return total


def _additive_mask(attention_mask: torch.Tensor, dtype: torch.dtype = torch.float32, *,
                   causal: bool = False) -> torch.Tensor:
    """The ``(B, 1, T, T)`` additive attention mask BERT's eager attention adds to its scores.

    Handing the model this prepared mask, rather than the ``(B, T)`` 0/1
    mask, skips transformers' data-dependent mask construction, which
    :func:`torch.func.vmap` cannot trace. The values are the ones
    transformers would build: 0 where attention is allowed, the dtype's
    minimum where it is not. ``causal``: a decoder's mask, where position
    ``p`` also sees no position after it.
    """
    batch, width = attention_mask.shape
    blocked = (1.0 - attention_mask.to(dtype)) * torch.finfo(dtype).min
    mask = blocked[:, None, None, :].expand(batch, 1, width, width)
    if causal:
        later = torch.ones(width, width, dtype=torch.bool, device=mask.device).triu(1)
        mask = mask.masked_fill(later, torch.finfo(dtype).min)
    return mask


class Target(NamedTuple):
    """What one client sent, in the form the loss consumes.

    Attributes:
        shared_grads: one tensor per matched parameter.
        labels: ``(B,)`` class labels; for a decoder, the ``(B, T)`` label
            template of :meth:`GradientMatcher.target`.
        mask: ``(B, 1, T, T)`` additive attention mask (:func:`_additive_mask`).
    """

    shared_grads: tuple[torch.Tensor, ...]
    labels: torch.Tensor
    mask: torch.Tensor


class GradientMatcher:
    """The reconstruction loss of an optimisation attack.

    It computes a candidate input's gradient on the selected parameters,
    exactly as the client did, and its distance to what the client shared.
    The client's part (:class:`Target`) is an argument, so one matcher
    serves many clients and :func:`torch.func.vmap` can batch over clients
    as well as over candidates.

    A decoder (:func:`gilib.models.is_decoder`) is matched on the client's
    own loss, the next-token cross-entropy. Its labels are the text itself,
    which the attack is looking for: a candidate is scored with the labels
    its own nearest words give (detached: the candidate's gradient is
    taken at them, as a classifier's at its known labels), the end token
    and padding known from the lengths. That needs the token space.

    Args:
        model: the victim, in ``eval()`` mode.
        names: exact names of the selected parameters.
        objective: one of :data:`OBJECTIVES`.
        tag_l1_weight: weight of TAG's L1 term.
        tokens: the victim's token space; required for a decoder.
    """

    rounds = 1
    """Messages of one batch the loss matches (:class:`RoundsMatcher` for several)."""

    def __init__(
        self,
        model: torch.nn.Module,
        names: Sequence[str],
        objective: str = "cos",
        tag_l1_weight: float = 0.01,
        tokens: TokenSpace | None = None,
    ) -> None:
        if objective not in OBJECTIVES:
            raise ValueError(f"Unknown objective '{objective}'. Choose one of: {', '.join(OBJECTIVES)}.")
        self.decoder = is_decoder(model)
        if self.decoder and tokens is None:
            raise ValueError("A decoder's gradient is taken at its next tokens: give the matcher the token space "
                             "(tokens=TokenSpace(model, tokenizer)).")
        self.tokens = tokens
        self.model = model
        self.names = list(names)
        self.objective = objective
        self.tag_l1_weight = tag_l1_weight
        # Detached copies: the candidate's gradient is taken with respect to
        # the selected copies only, so autograd never computes the rest.
        all_params = {n: p.detach() for n, p in model.named_parameters()}
        self._selected = {n: all_params[n] for n in self.names}
        self._frozen = {n: p for n, p in all_params.items() if n not in self._selected}

    def matched(self, shared_grads_per_client: Sequence[Sequence[torch.Tensor]]) -> "GradientMatcher":
        """A matcher restricted to the tensors that carry a direction.

        For the cosine objective, a tensor whose shared gradient is zero up
        to round-off for every client has no direction: BERT's attention
        key bias is one (softmax ignores a shift shared by a whole row of
        scores), its gradient ~1e-9 against >1e-2 for the rest. Its cosine
        would only add noise around a constant 1, so it is left out.

        Returns:
            ``self`` for the other objectives, else a matcher over fewer names.
        """
        if self.objective != "cos":
            return self
        keep = set()
        for grads in shared_grads_per_client:
            norms = [float(g.norm()) for g in grads]
            keep |= {n for n, v in zip(self.names, norms) if v > _ROUND_OFF * max(norms)}
        if not keep:
            raise ValueError("Every shared gradient tensor is zero: there is nothing to match.")
        return GradientMatcher(self.model, [n for n in self.names if n in keep], self.objective, self.tag_l1_weight,
                               self.tokens)

    def target(
        self, shared_grads: Sequence[torch.Tensor], names: Sequence[str], labels: torch.Tensor, attention_mask: torch.Tensor
    ) -> Target:
        """Package one client's update for :meth:`loss`.

        Args:
            shared_grads: the client's gradients, one per name in ``names``.
            names: the names ``shared_grads`` belong to (a superset of
                :attr:`names`).
            labels: ``(B,)`` class labels (ignored for a decoder).
            attention_mask: ``(B, T)``, 1 on real tokens.

        For a decoder the labels are a ``(B, T)`` template: the end token at
        each sentence's last position, ``-100`` (ignored) on padding and
        :data:`FREE` where the candidate's own tokens give them.
        """
        by_name = dict(zip(names, shared_grads))
        grads = tuple(by_name[n].detach() for n in self.names)
        if not self.decoder:
            return Target(grads, labels, _additive_mask(attention_mask))
        _, eos, _ = lm_special_ids(self.tokens.tokenizer)
        lengths = attention_mask.sum(dim=1)
        positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)[None]
        template = torch.where(positions == (lengths[:, None] - 1), eos, FREE)
        template = torch.where(attention_mask.bool(), template, -100)
        return Target(grads, template, _additive_mask(attention_mask, causal=True))

    def _client_loss(self, selected: dict[str, torch.Tensor], embeds: torch.Tensor, target: Target) -> torch.Tensor:
        if self.decoder:
            return self._next_token_loss(selected, embeds, target)
        out = functional_call(
            self.model,
            {**self._frozen, **selected},
            args=(),
            kwargs={"inputs_embeds": embeds, "attention_mask": target.mask, "labels": target.labels},
        )
        return out.loss

    def _next_token_loss(self, selected: dict[str, torch.Tensor], embeds: torch.Tensor,
                         target: Target) -> torch.Tensor:
        """A decoder's loss, as the client computes it, at the labels the candidate's nearest words give."""
        logits = functional_call(self.model, {**self._frozen, **selected}, args=(),
                                 kwargs={"inputs_embeds": embeds, "attention_mask": target.mask}).logits
        labels = torch.where(target.labels == FREE, self.tokens.nearest(embeds.detach()), target.labels)
        # Position p predicts the token at p + 1, padding ignored: the mean over predicted tokens.
        return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                                 labels[:, 1:].reshape(-1), ignore_index=-100)

    def gradients(self, embeds: torch.Tensor, target: Target) -> list[torch.Tensor]:
        """Gradient of the classification loss on the selected parameters.

        Args:
            embeds: ``(B, T, d)`` word embeddings (position and segment
                embeddings are added by the model).
            target: the client's labels and mask (its gradients are unused).

        Returns:
            One tensor per name in :attr:`names`, differentiable with
            respect to ``embeds``.
        """
        grads = grad(self._client_loss)(self._selected, embeds, target)
        return [grads[n] for n in self.names]

    def loss(self, embeds: torch.Tensor, target: Target) -> torch.Tensor:
        """Distance between the gradient of ``embeds`` and the client's.

        Args:
            embeds: ``(B, T, d)`` candidate word embeddings.
            target: what the client sent.

        Returns:
            A scalar; differentiating it with respect to ``embeds`` is a
            double backward.
        """
        grads = self.gradients(embeds, target)
        return gradient_distance(grads, target.shared_grads, self.objective, self.tag_l1_weight)

    @torch.no_grad()
    def score(self, candidates: torch.Tensor, target: Target, chunk_size: int | None = None) -> torch.Tensor:
        """Losses of many candidates for one client, in batched calls.

        Each candidate gets its own gradient (``vmap`` over :meth:`loss`),
        so the result equals scoring them one by one.

        Args:
            candidates: ``(K, B, T, d)`` candidate word embeddings.
            target: what the client sent.
            chunk_size: candidates per call (bounds memory); ``None``: all.

        Returns:
            ``(K,)`` losses.
        """
        return vmap(self.loss, in_dims=(0, None), chunk_size=chunk_size)(candidates, target)


def round_targets(target: Target, rounds: int) -> list[Target]:
    """A several-rounds :class:`Target` split into one per round.

    A rounds target holds every round's gradients one round after another
    (``len(names)`` tensors each) beside the labels and mask they share,
    so that clients' targets stack field by field as one round's do (the
    fast engine batches clients that way).

    Args:
        target: the concatenated target (:meth:`RoundsMatcher.target`).
        rounds: how many rounds it holds.

    Returns:
        ``rounds`` targets, in order.
    """
    per = len(target.shared_grads) // rounds
    return [target._replace(shared_grads=tuple(target.shared_grads[k * per:(k + 1) * per])) for k in range(rounds)]


class RoundsMatcher(GradientMatcher):
    """The reconstruction loss over several rounds' messages of one batch: the mean of the rounds' losses.

    A server that sent a client a different global model in each of ``k``
    rounds and received each round's gradient of the same batch can ask a
    candidate to match all of them: its gradient in round ``j`` is taken at
    round ``j``'s model (:class:`GradientMatcher` per round) and compared
    with round ``j``'s message. The mean rather than the sum keeps the
    distance on one round's scale, so LAMP's regulariser weight and the
    learning rate keep the balance they were tuned for (Balunovic et al.,
    NeurIPS 2022). One round's matcher gives the same loss as
    :class:`GradientMatcher` itself.

    Args:
        matchers: one :class:`GradientMatcher` per round, each on its
            round's model, all over the same names, objective and TAG weight.

    Raises:
        ValueError: for no matcher, or matchers that differ in names,
            objective or weight.
    """

    def __init__(self, matchers: Sequence[GradientMatcher]) -> None:
        matchers = list(matchers)
        if not matchers:
            raise ValueError("A rounds matcher needs one matcher per round; got none.")
        first = matchers[0]
        for m in matchers[1:]:
            if (m.names, m.objective, m.tag_l1_weight, m.decoder) != (first.names, first.objective,
                                                                      first.tag_l1_weight, first.decoder):
                raise ValueError("Every round's matcher must match the same parameters with the same objective.")
        self.rounds_matchers = matchers
        self.rounds = len(matchers)
        # The first round's stand for the rounds' where one is asked for (the engine's model, the token space).
        self.model, self.names, self.objective = first.model, first.names, first.objective
        self.tag_l1_weight, self.decoder, self.tokens = first.tag_l1_weight, first.decoder, first.tokens
        self._selected, self._frozen = first._selected, first._frozen

    @property
    def models(self) -> list[torch.nn.Module]:
        """Each round's model, in order."""
        return [m.model for m in self.rounds_matchers]

    def matched(self, shared_grads_per_client: Sequence[Sequence[torch.Tensor]]) -> "RoundsMatcher":
        """Every round's matcher restricted to the tensors that carry a direction in some round or client.

        Args:
            shared_grads_per_client: every client's and every round's
                gradients, one list of tensors (one per name) each.
        """
        names = self.rounds_matchers[0].matched(shared_grads_per_client).names
        return RoundsMatcher([GradientMatcher(m.model, names, m.objective, m.tag_l1_weight, m.tokens)
                              for m in self.rounds_matchers])

    def target(self, shared_grads: Sequence[Sequence[torch.Tensor]], names: Sequence[str], labels: torch.Tensor,
               attention_mask: torch.Tensor) -> Target:
        """Package one client's messages of every round for :meth:`loss`.

        Args:
            shared_grads: one list of tensors per round (one per name in
                ``names``), in round order.
            names, labels, attention_mask: as :meth:`GradientMatcher.target`
                (the rounds share the batch, so its labels and lengths).

        Returns:
            A :class:`Target` whose ``shared_grads`` are the rounds' matched
            tensors one round after another (:func:`round_targets` splits it).
        """
        if len(shared_grads) != self.rounds:
            raise ValueError(f"Got {len(shared_grads)} messages for a matcher of {self.rounds} rounds.")
        parts = [m.target(grads, names, labels, attention_mask) for m, grads in zip(self.rounds_matchers,
                                                                                      shared_grads)]
        return parts[0]._replace(shared_grads=tuple(g for part in parts for g in part.shared_grads))

    def gradients(self, embeds: torch.Tensor, target: Target) -> list[torch.Tensor]:
        """The candidate's gradients in every round, one round after another (``rounds * len(names)`` tensors)."""
        return [g for m, t in zip(self.rounds_matchers, round_targets(target, self.rounds))
                for g in m.gradients(embeds, t)]

    def loss(self, embeds: torch.Tensor, target: Target) -> torch.Tensor:
        """The mean over rounds of the distance between the candidate's gradient at that round's model and
        that round's message.

        Args:
            embeds: ``(B, T, d)`` candidate word embeddings.
            target: every round's message (:meth:`target`).

        Returns:
            A scalar, differentiable with respect to ``embeds``.
        """
        losses = [m.loss(embeds, t) for m, t in zip(self.rounds_matchers, round_targets(target, self.rounds))]
        return torch.stack(losses).mean()
