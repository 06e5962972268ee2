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
``shared_grads``.
"""

from __future__ import annotations

from typing import Sequence

import torch

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
    total = 0.0
    for g, s in zip(grads, shared_grads, strict=True):
        if objective == "cos":
            total = total + 1.0 - (g * s).sum() / (g.norm() * s.norm() + 1e-12)
        elif objective == "l2":
            total = total + (g - s).square().sum()
        elif objective == "tag":
            diff = g - s
            total = total + diff.square().sum() + tag_l1_weight * diff.abs().sum()
        else:
            raise ValueError(f"Unknown objective '{objective}'. Choose one of: {', '.join(OBJECTIVES)}.")
    if objective == "cos":
        total = total / len(shared_grads)
    return total


class GradientMatcher:
    """The reconstruction loss of an optimisation attack.

    It holds only what the server has: the model, the selection, the shared
    gradients, the labels and the sentence lengths (as an attention mask).

    Args:
        model: the victim, in ``eval()`` mode.
        params: the selected parameter tensors of ``model``.
        shared_grads: the client's gradients for ``params``.
        labels: ``(B,)`` class labels.
        attention_mask: ``(B, T)``, 1 on real tokens.
        objective: one of :data:`OBJECTIVES`.
        tag_l1_weight: weight of TAG's L1 term.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        params: Sequence[torch.nn.Parameter],
        shared_grads: Sequence[torch.Tensor],
        labels: torch.Tensor,
        attention_mask: torch.Tensor,
        objective: str = "cos",
        tag_l1_weight: float = 0.01,
    ) -> None:
        if objective not in OBJECTIVES:
            raise ValueError(f"Unknown objective '{objective}'. Choose one of: {', '.join(OBJECTIVES)}.")
        params, shared_grads = list(params), list(shared_grads)
        if objective == "cos":
            # A tensor whose shared gradient is zero up to round-off has no
            # direction: BERT's attention key bias is one (softmax ignores a
            # shift shared by a whole row of scores), its gradient ~1e-9
            # against >1e-2 for the rest. Its cosine would only add noise
            # around a constant 1, so leave it out.
            norms = [float(g.norm()) for g in shared_grads]
            keep = [i for i, n in enumerate(norms) if n > _ROUND_OFF * max(norms)]
            params = [params[i] for i in keep]
            shared_grads = [shared_grads[i] for i in keep]
        if not params:
            raise ValueError("Every shared gradient tensor is zero: there is nothing to match.")
        self.model = model
        self.params = params
        self.shared_grads = shared_grads
        self.labels = labels
        self.attention_mask = attention_mask
        self.objective = objective
        self.tag_l1_weight = tag_l1_weight

    def gradients(self, embeds: torch.Tensor, create_graph: bool = False) -> list[torch.Tensor]:
        """Gradient of the classification loss on the selected parameters.

        Args:
            embeds: ``(B, T, d)`` word embeddings (position and segment
                embeddings are added by the model).
            create_graph: keep the graph, so the result can be
                differentiated with respect to ``embeds``.
        """
        out = self.model(
            inputs_embeds=embeds, attention_mask=self.attention_mask, labels=self.labels
        )
        # Asking autograd for the selected parameters only skips the weight
        # gradients of everything else.
        return list(torch.autograd.grad(out.loss, self.params, create_graph=create_graph))

    def loss(self, embeds: torch.Tensor, create_graph: bool = True) -> torch.Tensor:
        """Distance between the gradient of ``embeds`` and the shared gradient.

        Args:
            embeds: ``(B, T, d)`` candidate word embeddings.
            create_graph: ``True`` to differentiate the loss with respect to
                ``embeds`` (a double backward); ``False`` to only score.

        Returns:
            A scalar tensor.
        """
        grads = self.gradients(embeds, create_graph=create_graph)
        return gradient_distance(grads, self.shared_grads, self.objective, self.tag_l1_weight)
