"""The server's message: what a client sends for a selection of parameters.

A :class:`SharedUpdate` is everything the server receives from one client
in the threat model of LAMP (Balunovic et al., NeurIPS 2022) and of the
partial-gradient paper (Li, Xu and Dras, EMNLP 2024): the gradients of a
:class:`~gilib.selection.Selection`, the batch's labels and its token
counts, and nothing of the client's text. :func:`gilib.client.client_update`
builds it; every attack takes it and checks it first
(:meth:`SharedUpdate.validated`), so that a malformed message fails with a
message that says what to do, never deep inside torch or LAPACK.
"""

from __future__ import annotations

import operator
from typing import NamedTuple, Sequence

import torch

from .selection import Selection


class SharedUpdate(NamedTuple):
    """What the server receives from one client: the message of the threat model.

    It holds what LAMP's threat model lets the server know, and nothing of
    the client's text: :func:`gilib.client.client_update` builds it, every
    attack takes it.

    Attributes:
        shared_grads: one tensor per name of the selection, each of its
            parameter's shape.
        labels: ``(B,)`` class labels, or ``None`` where the attack does not
            need them (the span check at batch size 1), and always ``None``
            from a decoder, which has no classes (its next-token labels are
            the text itself).
        lengths: B token counts, ``[CLS]`` and ``[SEP]`` included (a
            decoder's start and end tokens: :func:`gilib.models.encode_lm`).
    """

    shared_grads: Sequence[torch.Tensor]
    labels: Sequence[int] | torch.Tensor | None
    lengths: Sequence[int]

    def validated(self, model: torch.nn.Module, selection: "Selection") -> "SharedUpdate":
        """The update checked against the model and the selection, in canonical form.

        Every attack calls this first, so a malformed message fails here with
        a message that says what to do, never deep inside torch or LAPACK.

        Returns:
            A :class:`SharedUpdate` with ``shared_grads`` a tuple of tensors,
            ``labels`` a ``(B,)`` long tensor on the model's device (or
            ``None``) and ``lengths`` a list of ints.

        Raises:
            ValueError: for a tensor count or shape that does not fit the
                selection, a gradient of another dtype or device than the
                model, NaN or infinite values, an all-zero gradient, lengths
                outside ``3 .. max_position_embeddings``, or labels that are
                not one class index of the model per sentence.
        """
        params = selection.parameters(model)
        shared_grads = tuple(self.shared_grads)
        if len(shared_grads) != len(params):
            raise ValueError(
                f"Got {len(shared_grads)} gradient tensors for the {len(params)} of {selection.label}; "
                f"pass one tensor per name of the selection, in its order."
            )
        for name, p, g in zip(selection.names, params, shared_grads):
            if not isinstance(g, torch.Tensor):
                raise ValueError(f"The gradient for {name} is a {type(g).__name__}, not a tensor.")
            if tuple(g.shape) != tuple(p.shape):
                raise ValueError(f"The gradient for {name} has shape {tuple(g.shape)}, the parameter {tuple(p.shape)}.")
            if g.dtype != p.dtype:
                raise ValueError(
                    f"The gradient for {name} is {g.dtype} but the model is {p.dtype}: convert it with "
                    f".to({p.dtype}) (or load the model in the gradient's dtype)."
                )
            if g.device != p.device:
                raise ValueError(
                    f"The gradient for {name} is on {g.device} but the model on {p.device}: move it with "
                    f".to('{p.device}') first."
                )
            if not bool(torch.isfinite(g).all()):
                raise ValueError(
                    f"The gradient for {name} holds NaN or infinite values: the client's step diverged or the "
                    f"message was corrupted, and no attack can read it. Recompute the update."
                )
        if not any(bool(g.any()) for g in shared_grads):
            raise ValueError(
                f"Every shared gradient tensor of {selection.label} is zero: the update carries no signal "
                f"(a frozen selection, or a client that sent nothing). Check the client's step."
            )
        lengths = [_whole(n, "A sentence length") for n in self.lengths]
        if not lengths:
            raise ValueError("No sentence lengths given: pass one length per sentence of the batch.")
        max_tokens = model.config.max_position_embeddings
        for n in lengths:
            if not 3 <= n <= max_tokens:
                raise ValueError(
                    f"A sentence length of {n} tokens is impossible here: lengths count [CLS] and [SEP], "
                    f"so they lie between 3 and {max_tokens} for this model."
                )
        labels = None
        if self.labels is not None:
            given = torch.as_tensor(self.labels).reshape(-1)
            if len(given) != len(lengths):
                raise ValueError(
                    f"The update has {len(lengths)} sentence length(s) but {len(given)} label(s): a message holds "
                    f"one length and one label per sentence of the batch. Check which of the two is wrong "
                    f"(client_update(...).shared gives both), or pass labels=None where the attack needs none."
                )
            labels = check_labels(model, given, len(lengths))
        return SharedUpdate(shared_grads, labels, lengths)


def checked_update(update: SharedUpdate, model: torch.nn.Module, selection: Selection) -> SharedUpdate:
    """``update.validated(model, selection)``, after checking that it is a :class:`SharedUpdate` at all.

    Raises:
        TypeError: for anything else (a bare list of gradients, a dict).
        ValueError: as :meth:`SharedUpdate.validated`.
    """
    if not isinstance(update, SharedUpdate):
        raise TypeError(
            f"An update must be a gilib.update.SharedUpdate (gradients, labels, lengths), got a "
            f"{type(update).__name__}: build it with gilib.client.client_update(model, selection, batch).shared."
        )
    return update.validated(model, selection)


def check_labels(model: torch.nn.Module, labels: Sequence[int] | torch.Tensor, count: int) -> torch.Tensor:
    """``labels`` as a ``(count,)`` long tensor on the model's device, checked against its classes.

    Raises:
        ValueError: unless there are ``count`` integer labels, each in
            ``0 .. num_labels - 1``.
    """
    classes = model.config.num_labels
    tensor = torch.as_tensor(labels).reshape(-1)
    if len(tensor) != count or tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool \
            or not bool(((tensor >= 0) & (tensor < classes)).all()):
        shown = tensor.tolist() if tensor.numel() <= 16 else f"{tensor.numel()} values"
        raise ValueError(
            f"Labels must be {count} class indices in 0..{classes - 1} (this model has {classes} classes), "
            f"one per sentence; got {shown}."
        )
    return tensor.to(device=next(model.parameters()).device, dtype=torch.long)


def _whole(value, what: str) -> int:
    """``value`` as an int, refusing bools, fractions and anything else that is not a whole number."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_floating_point() \
            and value.dtype != torch.bool:
        return int(value)
    try:
        if isinstance(value, bool):
            raise TypeError
        return operator.index(value)  # ints and numpy integers
    except TypeError:
        raise ValueError(f"{what} must be a whole number of tokens, got {value!r}.") from None
