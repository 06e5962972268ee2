"""What the attacker sees: named selections of a BERT's parameters.

Li, Xu and Dras (EMNLP 2024) show that the gradient of a *part* of a
Transformer leaks the training text: one encoder layer, or one linear weight
inside it (layer 0's attention query in BERT-base is 768 x 768 = 0.54 % of
the parameters). A :class:`Selection` names such a part and maps it to exact
parameter names; a :class:`SharedUpdate` is what the server receives for
that part (:func:`gilib.client.client_update` computes it).

Components, each for one layer, a list of layers or ``"all"``:

============================  ==============================================
name                          parameters of ``encoder.layer.L``
============================  ==============================================
``layer``                     every parameter of the layer
``attention.query``           ``attention.self.query.weight``
``attention.key``             ``attention.self.key.weight``
``attention.value``           ``attention.self.value.weight``
``attention.qkv``             the three weights above
``attention.output``          ``attention.output.dense.weight``
``ffn.intermediate``          ``intermediate.dense.weight``
``ffn.output``                ``output.dense.weight``
============================  ==============================================

and two that take no layer: ``encoder`` (every encoder layer) and ``full``.

``full`` is every parameter except the word-embedding table, as in LAMP and
the paper. The table's gradient is non-zero exactly in the rows of the
tokens the sentence uses, so sharing it hands over the bag of words with no
attack at all; an optimisation attack, which works on continuous embeddings,
has no way to match it.

Names are matched exactly, never by substring: ``ffn.output`` is
``layer.L.output.dense.weight`` and must not pick up
``layer.L.attention.output.dense.weight``.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import NamedTuple, Sequence

import torch

_LINEAR = {
    "attention.query": ("attention.self.query.weight",),
    "attention.key": ("attention.self.key.weight",),
    "attention.value": ("attention.self.value.weight",),
    "attention.qkv": (
        "attention.self.query.weight",
        "attention.self.key.weight",
        "attention.self.value.weight",
    ),
    "attention.output": ("attention.output.dense.weight",),
    "ffn.intermediate": ("intermediate.dense.weight",),
    "ffn.output": ("output.dense.weight",),
}
PER_LAYER = ("layer", *_LINEAR)
"""Components that take a layer index, a list of indices or ``"all"``."""
WHOLE = ("full", "encoder")
"""Components that take no layer."""
COMPONENTS = WHOLE + PER_LAYER

_WORD_EMBEDDINGS = "embeddings.word_embeddings.weight"


@dataclass(frozen=True)
class Selection:
    """A named part of a model's parameters.

    Attributes:
        component: one of :data:`COMPONENTS`.
        layers: the encoder layers it covers (empty for ``full``).
        names: exact parameter names, in the model's order.
        numel: number of selected parameters.
        total: number of parameters of the whole model (word embeddings
            included), the denominator of :attr:`fraction`.
    """

    component: str
    layers: tuple[int, ...]
    names: tuple[str, ...]
    numel: int
    total: int

    def __post_init__(self) -> None:
        if not self.names:
            raise ValueError(
                f"The selection {self.component} {self.layers or ''} names no parameter: the attacker would see "
                f"nothing. Build it with select(model, component, layers)."
            )

    @property
    def fraction(self) -> float:
        """Share of the model's parameters that the attacker sees."""
        return self.numel / self.total

    @property
    def label(self) -> str:
        """A short name for tables and plots, e.g. ``attention.query L0``."""
        if self.component in WHOLE:
            return self.component
        return f"{self.component} L{','.join(map(str, self.layers))}"

    def parameters(self, model: torch.nn.Module) -> list[torch.nn.Parameter]:
        """The selected parameter tensors of ``model``, in :attr:`names` order."""
        params = dict(model.named_parameters())
        missing = [name for name in self.names if name not in params]
        if missing:
            raise ValueError(
                f"This model has no parameter {missing[0]}: the selection {self.label} was made for another "
                f"model. Build it with select(model, ...) on the model you attack."
            )
        return [params[name] for name in self.names]

    def __str__(self) -> str:
        return (
            f"{self.label}: {len(self.names)} tensor(s), {self.numel:,} parameters "
            f"({100 * self.fraction:.4g} % of {self.total:,})"
        )


def select(
    model: torch.nn.Module,
    component: str = "full",
    layers: int | Sequence[int] | str | None = None,
) -> Selection:
    """Name the part of ``model`` whose gradient the attacker receives.

    Args:
        model: a BERT-family model (``BertForSequenceClassification``).
        component: one of :data:`COMPONENTS`.
        layers: for a per-layer component, an index, a list of indices or
            ``"all"``; must be ``None`` for ``full`` and ``encoder``.
            Negative indices count from the last layer.

    Returns:
        The :class:`Selection`.

    Raises:
        ValueError: for an unknown component, a missing or out-of-range
            layer, or a layer given to ``full`` / ``encoder``; the message
            lists the valid choices.
    """
    if component not in COMPONENTS:
        raise ValueError(
            f"Unknown component '{component}'. Choose one of: {', '.join(COMPONENTS)}."
        )
    named = dict(model.named_parameters())
    prefix = f"{model.base_model_prefix}."
    n_layers = model.config.num_hidden_layers

    if component in WHOLE:
        if layers is not None:
            raise ValueError(
                f"'{component}' covers the whole model and takes no layers; "
                f"use one of {', '.join(PER_LAYER)} to select a layer."
            )
        if component == "full":
            names = [n for n in named if n != prefix + _WORD_EMBEDDINGS]
        else:
            names = [n for n in named if n.startswith(prefix + "encoder.layer.")]
        layer_ids: tuple[int, ...] = tuple(range(n_layers)) if component == "encoder" else ()
    else:
        layer_ids = _layer_indices(layers, n_layers, component)
        names = []
        for layer in layer_ids:
            stem = f"{prefix}encoder.layer.{layer}."
            if component == "layer":
                names += [n for n in named if n.startswith(stem)]
            else:
                names += [stem + suffix for suffix in _LINEAR[component]]
        missing = [n for n in names if n not in named]
        if missing:
            raise ValueError(
                f"This model has no parameter {missing[0]}: selections expect a BERT-family model."
            )
    return Selection(
        component=component,
        layers=layer_ids,
        names=tuple(names),
        numel=sum(named[n].numel() for n in names),
        total=sum(p.numel() for p in named.values()),
    )


class SharedUpdate(NamedTuple):
    """What the server receives from one client: the message of the threat model.

    It holds what LAMP's threat model lets the server know, and nothing of
    the client's text: :func:`gilib.client.client_update` builds it, every
    attack takes it.

    Attributes:
        shared_grads: one tensor per name of the selection, each of its
            parameter's shape.
        labels: ``(B,)`` class labels, or ``None`` where the attack does not
            need them (the span check at batch size 1).
        lengths: B token counts, ``[CLS]`` and ``[SEP]`` included.
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
        labels = None if self.labels is None else check_labels(model, self.labels, len(lengths))
        return SharedUpdate(shared_grads, labels, lengths)


def checked_update(update: SharedUpdate, model: torch.nn.Module, selection: Selection) -> SharedUpdate:
    """``update.validated(model, selection)``, after checking that it is a :class:`SharedUpdate` at all.

    Raises:
        TypeError: for anything else (a bare list of gradients, a dict).
        ValueError: as :meth:`SharedUpdate.validated`.
    """
    if not isinstance(update, SharedUpdate):
        raise TypeError(
            f"An update must be a gilib.slicing.SharedUpdate (gradients, labels, lengths), got a "
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


def _layer_indices(layers, n_layers: int, component: str) -> tuple[int, ...]:
    valid = f"0..{n_layers - 1} (or -{n_layers}..-1), a list of them, or 'all'"
    if layers is None:
        raise ValueError(f"'{component}' needs layers: pass an index {valid}.")
    if isinstance(layers, str):
        if layers != "all":
            raise ValueError(f"Unknown layers '{layers}': pass an index {valid}.")
        return tuple(range(n_layers))
    indices = list(layers) if isinstance(layers, (list, tuple, range)) else [layers]
    if not indices:
        raise ValueError(f"The list of layers is empty: pass an index {valid}.")
    resolved = []
    for layer in indices:
        try:
            layer = operator.index(layer)  # accepts numpy integers too
        except TypeError:
            raise ValueError(f"Layer {layer!r} is not an integer: pass an index {valid}.") from None
        if not -n_layers <= layer < n_layers:
            raise ValueError(
                f"Layer {layer} is out of range: this model has {n_layers} layers, "
                f"so pass an index {valid}."
            )
        resolved.append(layer % n_layers)
    if len(set(resolved)) != len(resolved):
        raise ValueError(f"Layers {indices} repeat a layer; list each layer once.")
    return tuple(sorted(resolved))
