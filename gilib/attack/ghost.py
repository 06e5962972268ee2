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
``"cos"`` and ``"l2"`` objectives; :func:`supports` says when.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from .objectives import Target

GHOST_OBJECTIVES = ("cos", "l2")


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
        True for ``"cos"``/``"l2"`` on a single-label classifier whose
        selected parameters all belong to ``Linear``, ``LayerNorm`` or
        ``Embedding`` modules, with absolute position embeddings.
    """
    config = getattr(model, "config", None)
    if objective not in GHOST_OBJECTIVES or config is None:
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

    def __init__(self, model: torch.nn.Module, names: Sequence[str], objective: str = "cos") -> None:
        if not supports(model, names, objective):
            raise ValueError(
                "Ghost scoring covers cos/L2 on BERT-style classifiers (Linear, LayerNorm and Embedding "
                "parameters); use GradientMatcher for this selection."
            )
        self.model = model
        self.names = list(names)
        self.objective = objective
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
        """Run ``(K, B, T, d)`` candidates; returns the summed loss and each hooked module's tensors."""
        k, b, t, d = embeds.shape
        captured: dict[int, list] = {}

        def hook(module, args, output):
            inp = args[0]
            if isinstance(module, torch.nn.Embedding) and output.shape[0] != k * b:
                # Position embeddings are looked up once, (1, T, d), and broadcast
                # over the batch: expand them so that each sentence gets its own
                # output gradient instead of the batch's sum.
                output = output.expand(k * b, *output.shape[1:])
                inp = inp.expand(k * b, *inp.shape[1:])
            captured[id(module)] = [inp, output]
            return output

        handles = [m.register_forward_hook(hook) for m in self._modules.values()]
        try:
            logits = self.model(
                inputs_embeds=embeds.reshape(k * b, t, d),
                attention_mask=mask.reshape(k * b, *mask.shape[-3:]),
            ).logits
        finally:
            for h in handles:
                h.remove()
        # The client's loss is the mean over its batch; candidates are
        # independent, so the sum of their losses has each candidate's
        # gradient at its own activations.
        per_sentence = F.cross_entropy(logits, labels.reshape(-1), reduction="none")
        return per_sentence.view(k, b).mean(dim=1).sum(), captured

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
            loss, captured = self._forward(embeds, labels, mask)
            keys = list(captured)
            outputs = [captured[key][1] for key in keys]
            deltas = torch.autograd.grad(loss, outputs, create_graph=create_graph, allow_unused=True)
            delta = {key: d if d is not None else torch.zeros_like(o) for key, d, o in zip(keys, deltas, outputs)}

            total = embeds.new_zeros(k)
            for (key, attr), shared in zip(self._params, target.shared_grads):
                module = self._modules[key]
                inp, out_delta = captured[key][0], delta[key]
                dot, norm2 = self._dot_and_norm(module, attr, inp, out_delta, shared, k, per_candidate_target)
                if self.objective == "cos":
                    s_norm = shared.flatten(int(per_candidate_target)).norm(dim=-1)
                    total = total + 1.0 - dot / (norm2.clamp_min(0).sqrt() * s_norm + 1e-12)
                else:
                    s_sq = shared.flatten(int(per_candidate_target)).square().sum(dim=-1)
                    total = total + norm2 - 2 * dot + s_sq
            if self.objective == "cos":
                total = total / len(self._params)
        return total

    @staticmethod
    def _dot_and_norm(module, attr, inp, delta, shared, k, per_candidate):
        """``<G_k, S_k>`` and ``||G_k||^2`` for one parameter, each ``(K,)``."""
        if isinstance(module, torch.nn.Linear) and attr == "weight":
            x = inp.reshape(k, -1, inp.shape[-1])  # (K, M, d_in)
            dl = delta.reshape(k, -1, delta.shape[-1])  # (K, M, d_out)
            tokens, d_in, d_out = x.shape[1], x.shape[2], dl.shape[2]
            if tokens * (d_in + d_out) >= d_in * d_out:
                # Many tokens: forming the gradient is cheaper than Gram matrices.
                g = dl.transpose(1, 2) @ x  # (K, d_out, d_in)
                return (g * shared).flatten(1).sum(1), g.flatten(1).square().sum(1)
            xs = x @ (shared.transpose(-1, -2))  # (K, M, d_out)
            dot = (dl * xs).flatten(1).sum(1)
            norm2 = ((dl @ dl.transpose(1, 2)) * (x @ x.transpose(1, 2))).flatten(1).sum(1)
            return dot, norm2
        if isinstance(module, torch.nn.Embedding):
            ids = inp.reshape(k, -1)  # (K, M)
            dl = delta.reshape(k, -1, delta.shape[-1])  # (K, M, d)
            rows = shared[ids] if not per_candidate else torch.stack([s[i] for s, i in zip(shared, ids)])
            dot = (dl * rows).flatten(1).sum(1)
            same = (ids[:, :, None] == ids[:, None, :]).to(dl.dtype)
            norm2 = ((dl @ dl.transpose(1, 2)) * same).flatten(1).sum(1)
            return dot, norm2
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
