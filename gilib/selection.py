"""What the attacker sees: named selections of a BERT's or a GPT-2 decoder's parameters.

Li, Xu and Dras (EMNLP 2024) show that the gradient of a *part* of a
Transformer leaks the training text: one encoder layer, or one linear weight
inside it (layer 0's attention query in BERT-base is 768 x 768 = 0.54 % of
the parameters). A :class:`Selection` names such a part and maps it to exact
parameter names; what the server receives for that part is a
:class:`~gilib.update.SharedUpdate` (:func:`gilib.client.client_update`
computes it).

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

LoRA adapters (Hu et al., ICLR 2022; a victim from :func:`gilib.lora.lora_victim`)
have a family of their own, each for one layer, a list, ``"all"`` or
``None`` (every layer that carries that adapter):

============================  ==============================================
name                          parameters of ``encoder.layer.L``
============================  ==============================================
``lora``                      every adapter's ``A`` and ``B``
``lora.A`` / ``lora.B``       every adapter's ``A`` (``r x d_in``) or ``B``
                              (``d_out x r``)
``lora.M``                    module ``M``'s ``A`` and ``B``
``lora.M.A`` / ``lora.M.B``   module ``M``'s ``A`` or ``B``
============================  ==============================================

with ``M`` one of :data:`LORA_MODULES` (``query``, ``key``, ``value``,
``attention.output``, ``ffn.intermediate``, ``ffn.output``); ``A`` is
``M....lora_A.<adapter>.weight``, e.g. ``lora.query.A`` at layer 0 is
``encoder.layer.0.attention.self.query.lora_A.default.weight``. A LoRA
decoder's modules (:data:`DECODER_LORA_MODULES`) keep GPT-2's own names,
as peft users target them: ``c_attn`` (the fused query/key/value),
``attn.c_proj``, ``mlp.c_fc`` and ``mlp.c_proj``, so ``lora.c_attn.A`` at
layer 0 is ``transformer.h.0.attn.c_attn.lora_A.default.weight`` (``r x
d_in`` as on a BERT: peft's adapters are ``nn.Linear`` s even on GPT-2's
``Conv1D``). Asked of a
model without adapters they raise a ``ValueError``. On a LoRA victim,
``full`` and ``encoder`` name only the *trainable* parameters: a LoRA
client trains and shares its adapters alone, and the frozen base weights
(renamed ``M.base_layer.weight`` by peft) have no gradient to share. On a
plain model every parameter is trainable and they are what they always were.

``full`` is every parameter except the word-embedding table, as in LAMP and
the paper. The table's gradient is non-zero exactly in the rows of the
tokens the sentence uses, so sharing it hands over the bag of words with no
attack at all; an optimisation attack, which works on continuous embeddings,
has no way to match it.

A GPT-2-style decoder (:func:`gilib.models.is_decoder`) has the same
components under its own names, in ``transformer.h.L``:

============================  ==============================================
name                          parameters of ``transformer.h.L``
============================  ==============================================
``layer``                     every parameter of the block
``attention.qkv``             ``attn.c_attn.weight`` (query, key, value fused)
``attention.output``          ``attn.c_proj.weight``
``ffn.intermediate``          ``mlp.c_fc.weight``
``ffn.output``                ``mlp.c_proj.weight``
============================  ==============================================

GPT-2's linear layers are ``Conv1D`` s whose weight is stored ``(in, out)``,
the transpose of ``nn.Linear``'s: the gradient is ``X^T Delta`` and the
inputs span its *columns*. Query, key and value are one fused weight, so
``attention.query``, ``attention.key`` and ``attention.value`` do not
exist on a decoder (select ``attention.qkv``). ``encoder`` is every block;
``full`` is every parameter but the word embeddings, which GPT-2 ties to
its LM head, so ``full`` leaves out the LM head's weight too (it is the
same tensor).

Names are matched exactly, never by substring: ``ffn.output`` is
``layer.L.output.dense.weight`` and must not pick up
``layer.L.attention.output.dense.weight``.
"""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass
from typing import Sequence

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
_DECODER_LINEAR = {
    "attention.qkv": ("attn.c_attn.weight",),
    "attention.output": ("attn.c_proj.weight",),
    "ffn.intermediate": ("mlp.c_fc.weight",),
    "ffn.output": ("mlp.c_proj.weight",),
}
"""A GPT-2 block's weights under the same component names (query, key and value are fused)."""
PER_LAYER = ("layer", *_LINEAR)
"""Components that take a layer index, a list of indices or ``"all"``."""
WHOLE = ("full", "encoder")
"""Components that take no layer."""
COMPONENTS = WHOLE + PER_LAYER
"""The components of a plain model (the LoRA family is :data:`ADAPTER_COMPONENTS`)."""

LORA_MODULES = {
    "query": "attention.self.query",
    "key": "attention.self.key",
    "value": "attention.self.value",
    "attention.output": "attention.output.dense",
    "ffn.intermediate": "intermediate.dense",
    "ffn.output": "output.dense",
}
"""The linear modules of a BERT layer that can carry a LoRA adapter: short name -> module path in the layer."""
DECODER_LORA_MODULES = {
    "c_attn": "attn.c_attn",
    "attn.c_proj": "attn.c_proj",
    "mlp.c_fc": "mlp.c_fc",
    "mlp.c_proj": "mlp.c_proj",
}
"""The ``Conv1D`` modules of a GPT-2 block that can carry a LoRA adapter, under GPT-2's own names (``c_attn``
is the fused query/key/value; the two ``c_proj`` s keep their parent to tell them apart)."""
ADAPTER_COMPONENTS = ("lora", "lora.A", "lora.B", *(f"lora.{m}{ab}" for m in (*LORA_MODULES, *DECODER_LORA_MODULES)
                                                    for ab in ("", ".A", ".B")))
"""The LoRA family: every adapter, every ``A`` or ``B``, one module's pair, one module's ``A`` or ``B``
(a BERT's modules and a decoder's: each model answers for its own)."""

_WORD_EMBEDDINGS = "embeddings.word_embeddings.weight"
_DECODER_WORD_EMBEDDINGS = "wte.weight"


def lora_modules(model: torch.nn.Module) -> tuple[str, dict[str, str]]:
    """Where ``model``'s layers sit and which of their modules may carry adapters: ``(stem, table)``.

    A BERT's layers are ``<prefix>.encoder.layer.L`` with :data:`LORA_MODULES`;
    a GPT-2 decoder's (``config.model_type == "gpt2"``, read off the config:
    the model module is not imported here) are ``transformer.h.L`` with
    :data:`DECODER_LORA_MODULES`. ``stem`` ends with the dot before ``L``.
    """
    if getattr(model.config, "model_type", None) == "gpt2":
        return f"{model.base_model_prefix}.h.", DECODER_LORA_MODULES
    return f"{model.base_model_prefix}.encoder.layer.", LORA_MODULES


def adapter_parameters(model: torch.nn.Module) -> dict[tuple[int, str, str], str]:
    """Every LoRA adapter weight of ``model``, matched by exact pattern, never by substring.

    Returns:
        ``{(layer, module, "A" or "B"): parameter name}`` in the model's order,
        ``module`` a key of the model's table (:func:`lora_modules`:
        :data:`LORA_MODULES` for a BERT, :data:`DECODER_LORA_MODULES` for a
        decoder); empty for a plain model.

    Raises:
        ValueError: for a module carrying two adapters (a selection names one).
    """
    stem, table = lora_modules(model)
    prefix = re.escape(stem)
    modules = "|".join(re.escape(path) for path in table.values())
    pattern = re.compile(rf"{prefix}(\d+)\.({modules})\.lora_([AB])\.([^.]+)\.weight")
    short = {path: name for name, path in table.items()}
    found: dict[tuple[int, str, str], str] = {}
    for name, _ in model.named_parameters():
        match = pattern.fullmatch(name)
        if match is None:
            continue
        key = (int(match.group(1)), short[match.group(2)], match.group(3))
        if key in found:
            raise ValueError(f"{found[key]} and {name} are two adapters on one module: a selection names one "
                             f"adapter per module (delete the others with peft's delete_adapter).")
        found[key] = name
    return found


def has_adapters(model: torch.nn.Module) -> bool:
    """Whether ``model`` carries LoRA adapters (:func:`adapter_parameters` finds any)."""
    return bool(adapter_parameters(model))


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
        model: a BERT-family model (``BertForSequenceClassification``) or a
            GPT-2-style decoder (``GPT2LMHeadModel``).
        component: one of :data:`COMPONENTS`.
        layers: for a per-layer component, an index, a list of indices or
            ``"all"``; must be ``None`` for ``full`` and ``encoder``.
            Negative indices count from the last layer.

    Returns:
        The :class:`Selection`.

    Raises:
        ValueError: for an unknown component, a missing or out-of-range
            layer, a layer given to ``full`` / ``encoder``, or a query, key or
            value weight on a decoder (fused: ``attention.qkv``); the message
            lists the valid choices.
    """
    if component in ADAPTER_COMPONENTS:
        return _adapter_selection(model, component, layers)
    if component not in COMPONENTS:
        raise ValueError(
            f"Unknown component '{component}'. Choose one of: {', '.join(COMPONENTS)}; on a LoRA victim also "
            f"{', '.join(ADAPTER_COMPONENTS)}."
        )
    named = dict(model.named_parameters())
    prefix = f"{model.base_model_prefix}."
    n_layers = model.config.num_hidden_layers
    # A LoRA client shares only what it trains; a plain model trains everything (and keeps its old names).
    lora = has_adapters(model)
    # A decoder's names (GPT-2's); the model module is not imported here, so read its type off the config.
    decoder = getattr(model.config, "model_type", None) == "gpt2"
    linear = _DECODER_LINEAR if decoder else _LINEAR
    blocks = f"{prefix}h." if decoder else f"{prefix}encoder.layer."
    words = prefix + (_DECODER_WORD_EMBEDDINGS if decoder else _WORD_EMBEDDINGS)
    if decoder and component in PER_LAYER and component not in ("layer", *linear):
        raise ValueError(
            f"'{component}' does not exist on a GPT-2 decoder: its query, key and value share one fused weight "
            f"(attn.c_attn). Choose one of: {', '.join(('layer', *linear))}, or {', '.join(WHOLE)}."
        )

    if component in WHOLE:
        if layers is not None:
            raise ValueError(
                f"'{component}' covers the whole model and takes no layers; "
                f"use one of {', '.join(PER_LAYER)} to select a layer."
            )
        if component == "full":
            names = [n for n in named if n != words]
        else:
            names = [n for n in named if n.startswith(blocks)]
        if lora:
            names = [n for n in names if named[n].requires_grad]
        layer_ids: tuple[int, ...] = tuple(range(n_layers)) if component == "encoder" else ()
    else:
        layer_ids = _layer_indices(layers, n_layers, component)
        names = []
        for layer in layer_ids:
            stem = f"{blocks}{layer}."
            if component == "layer":
                names += [n for n in named if n.startswith(stem)]
            else:
                names += [stem + suffix for suffix in linear[component]]
        missing = [n for n in names if n not in named]
        if missing and lora:
            raise ValueError(
                f"This LoRA victim has no parameter {missing[0]}: peft froze the base weight (now "
                f"'...base_layer.weight', no gradient to share). Select its adapters instead, e.g. "
                f"select(model, 'lora.A', 0)."
            )
        if missing:
            raise ValueError(
                f"This model has no parameter {missing[0]}: selections expect a BERT-family model or a GPT-2 "
                f"decoder."
            )
        if lora and component == "layer":
            names = [n for n in names if named[n].requires_grad]
    return _selection(component, layer_ids, names, named)


def _selection(component: str, layer_ids: tuple[int, ...], names: Sequence[str],
               named: dict[str, torch.nn.Parameter]) -> Selection:
    """The :class:`Selection` of ``names`` among the model's ``named`` parameters."""
    return Selection(
        component=component,
        layers=layer_ids,
        names=tuple(names),
        numel=sum(named[n].numel() for n in names),
        total=sum(p.numel() for p in named.values()),
    )


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


def _adapter_selection(model: torch.nn.Module, component: str, layers) -> Selection:
    """A :data:`ADAPTER_COMPONENTS` selection: exact adapter names, or a clear error."""
    adapters = adapter_parameters(model)
    if not adapters:
        raise ValueError(
            f"'{component}' selects LoRA adapters and this model has none: build the victim with "
            f"gilib.lora.lora_victim(model, ...), or pick one of {', '.join(COMPONENTS)} for a plain model."
        )
    parts = component.split(".")[1:]
    half = parts.pop() if parts and parts[-1] in ("A", "B") else None
    module = ".".join(parts) or None
    wanted = {k: n for k, n in adapters.items()
              if (module is None or k[1] == module) and (half is None or k[2] == half)}
    carried = sorted({k[0] for k in wanted})
    if not wanted:
        present = sorted({k[1] for k in adapters})
        raise ValueError(f"This victim has no '{module}' adapter: its adapters sit on {', '.join(present)}; select "
                         f"one of those (e.g. 'lora.{present[0]}.A').")
    if layers is None:
        layer_ids = tuple(carried)
    else:
        layer_ids = _layer_indices(layers, model.config.num_hidden_layers, component)
        bare = [layer for layer in layer_ids if layer not in carried]
        if bare:
            raise ValueError(f"Layer {bare[0]} carries no adapter for '{component}': this victim has them on "
                             f"layers {carried}; pass some of those (or layers=None for all).")
    names = [n for k, n in wanted.items() if k[0] in layer_ids]
    return _selection(component, layer_ids, names, dict(model.named_parameters()))
