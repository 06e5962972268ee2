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
with its own per-candidate gradient).
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
from torch.func import functional_call, grad, vmap

OBJECTIVES = ("cos", "l2", "tag")
_ROUND_OFF = 1e-6  # relative gradient norm below which a tensor is numerically zero


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


def _additive_mask(attention_mask: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The ``(B, 1, T, T)`` additive attention mask BERT's eager attention adds to its scores.

    Handing the model this prepared mask, rather than the ``(B, T)`` 0/1
    mask, skips transformers' data-dependent mask construction, which
    :func:`torch.func.vmap` cannot trace. The values are the ones
    transformers would build: 0 where attention is allowed, the dtype's
    minimum where it is not.
    """
    batch, width = attention_mask.shape
    blocked = (1.0 - attention_mask.to(dtype)) * torch.finfo(dtype).min
    return blocked[:, None, None, :].expand(batch, 1, width, width)


class Target(NamedTuple):
    """What one client sent, in the form the loss consumes.

    Attributes:
        shared_grads: one tensor per matched parameter.
        labels: ``(B,)`` class labels.
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

    Args:
        model: the victim, in ``eval()`` mode.
        names: exact names of the selected parameters.
        objective: one of :data:`OBJECTIVES`.
        tag_l1_weight: weight of TAG's L1 term.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        names: Sequence[str],
        objective: str = "cos",
        tag_l1_weight: float = 0.01,
    ) -> None:
        if objective not in OBJECTIVES:
            raise ValueError(f"Unknown objective '{objective}'. Choose one of: {', '.join(OBJECTIVES)}.")
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
        return GradientMatcher(self.model, [n for n in self.names if n in keep], self.objective, self.tag_l1_weight)

    def target(
        self, shared_grads: Sequence[torch.Tensor], names: Sequence[str], labels: torch.Tensor, attention_mask: torch.Tensor
    ) -> Target:
        """Package one client's update for :meth:`loss`.

        Args:
            shared_grads: the client's gradients, one per name in ``names``.
            names: the names ``shared_grads`` belong to (a superset of
                :attr:`names`).
            labels: ``(B,)`` class labels.
            attention_mask: ``(B, T)``, 1 on real tokens.
        """
        by_name = dict(zip(names, shared_grads))
        return Target(tuple(by_name[n].detach() for n in self.names), labels, _additive_mask(attention_mask))

    def _client_loss(self, selected: dict[str, torch.Tensor], embeds: torch.Tensor, target: Target) -> torch.Tensor:
        out = functional_call(
            self.model,
            {**self._frozen, **selected},
            args=(),
            kwargs={"inputs_embeds": embeds, "attention_mask": target.mask, "labels": target.labels},
        )
        return out.loss

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
