"""LoRA victims: a BERT whose client trains and shares only low-rank adapters.

LoRA (Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", ICLR
2022) freezes a pretrained weight ``W`` (``d_out x d_in``) and trains a
low-rank update beside it: ``y = W x + (alpha / r) B A x`` with ``A``
(``r x d_in``) drawn at random and ``B`` (``d_out x r``) zero at the start.
A federated LoRA client therefore shares the gradients (or local updates) of
``A`` and ``B`` alone: partial by design, and a tiny part (two rank-8
adapters on layer 0's query and value are 0.05 % of MiniLM). The adapters
are injected with Hugging Face's peft (Mangrulkar et al., 2022,
https://github.com/huggingface/peft).

What the adapters' gradients leak (chapter 7; the attack side is
:mod:`gilib.attack.adapters`): with ``G = sum_i delta_i x_i^T`` the frozen
weight's gradient,

* ``grad A = (alpha / r) B^T G``: its rows lie in the span of the layer's
  inputs ``x_i`` but span at most ``r`` of its dimensions, and it is zero
  while ``B`` is (the first round of a fresh adapter leaks nothing through
  ``A``); hence :func:`lora_victim`'s ``warmup``, the global model after a
  few rounds of training, which the server knows because it sent it;
* ``grad B = (alpha / r) G A^T = (alpha / r) sum_i delta_i (A x_i)^T``: it
  sees the inputs only through their ``r``-dimensional projections ``A x_i``.

Selections name the adapters exactly (``lora``, ``lora.query.A``, ...:
:mod:`gilib.selection`), and :func:`gilib.client.client_update` computes a
LoRA client's FedSGD, FedAvg or AdamW message as for any other model.
:class:`LoraRecipe` holds a victim's settings as a picklable value, so that
Flower's server and clients (:func:`gilib.federated.run_round` with
``lora=``) rebuild the same global model in their own processes.
"""

from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass
from typing import Sequence

import torch
from peft import LoraConfig, inject_adapter_in_model

from .models import encode, load_tokenizer
from .selection import LORA_MODULES, _layer_indices, adapter_parameters, has_adapters

ADAPTER = "default"
"""The name peft gives the one adapter a victim carries (``...query.lora_A.default.weight``)."""

WARMUP_TEXTS = (
    "the museum opens at nine on weekdays .",
    "she forgot her umbrella on the train again .",
    "a warm bowl of soup is all i want tonight .",
    "the committee will vote on the budget next month .",
)
"""Public warm-up sentences (written for this module, in no dataset the book samples): the global
model's earlier rounds, which move ``B`` off zero. Labels alternate 1, 0."""
WARMUP_LR = 1e-3
"""The warm-up's AdamW learning rate: LoRA is trained at 1e-4 to 1e-3 (Hu et al. use 2e-4 to 5e-4 on GLUE)."""


@dataclass(frozen=True)
class LoraSettings:
    """The settings of a LoRA victim's adapters, as :func:`lora_settings` reads them back.

    Attributes:
        r: the adapters' rank.
        alpha: LoRA's ``alpha``; the update is scaled by ``alpha / r``.
        targets: the adapted modules, keys of :data:`gilib.selection.LORA_MODULES`, in table order.
        layers: the encoder layers that carry adapters, ascending.
    """

    r: int
    alpha: float
    targets: tuple[str, ...]
    layers: tuple[int, ...]

    @property
    def scaling(self) -> float:
        """``alpha / r``, the factor on ``B A x``."""
        return self.alpha / self.r


def lora_victim(
    model: torch.nn.Module,
    target_modules: Sequence[str] = ("query", "value"),
    r: int = 8,
    alpha: float = 16,
    layers: int | Sequence[int] | str | None = None,
    seed: int = 0,
    warmup: int | None = None,
    *,
    warmup_batch: dict[str, torch.Tensor] | None = None,
    warmup_lr: float = WARMUP_LR,
) -> torch.nn.Module:
    """A new model: a deep copy of ``model`` with LoRA adapters on ``target_modules``, everything else frozen.

    The adapters are injected with :func:`peft.inject_adapter_in_model`
    rather than :func:`peft.get_peft_model`: injection keeps the model a
    ``BertForSequenceClassification`` with its own ``config``,
    ``base_model_prefix`` and parameter names (``bert.encoder.layer.0...``),
    so every ``base_model_prefix``-based lookup of the library and the
    attack keeps working; ``get_peft_model`` would wrap it in a
    ``PeftModel`` and prefix every name with ``base_model.model.``. peft
    freezes every non-adapter parameter (the classification head too: the
    client shares its adapters alone). ``A`` is peft's default Kaiming-uniform
    draw, seeded from ``seed``; ``B`` starts at zero. The copy is in
    ``eval()`` mode and keeps the input's (eager) attention.

    Args:
        model: a BERT-family victim (:func:`gilib.models.load_model`); never
            modified (it may be the shared :func:`~gilib.models.cached_model`).
        target_modules: keys of :data:`gilib.selection.LORA_MODULES`
            (``"query"``, ``"key"``, ``"value"``, ``"attention.output"``,
            ``"ffn.intermediate"``, ``"ffn.output"``).
        r: the adapters' rank, ``1 .. min(d_out, d_in)`` of every target.
        alpha: LoRA's ``alpha`` (positive); the update is ``(alpha / r) B A x``.
        layers: the encoder layers to adapt: an index, a list, ``"all"`` or
            ``None`` (every layer).
        seed: seeds ``A``'s draw.
        warmup: ``None`` or 0 for a fresh adapter (``B = 0``: ``A``'s
            gradient is zero), else this many full-batch AdamW steps
            (``warmup_lr``, torch's defaults otherwise) of the adapters on
            ``warmup_batch``: the global model after earlier rounds. The
            returned model *is* that global model, so the server, which
            sent it, knows every weight of it.
        warmup_batch: the warm-up's batch (``input_ids``, ``attention_mask``
            ``(B, T)``, ``labels`` ``(B,)``, as :func:`gilib.models.encode`
            returns); default :data:`WARMUP_TEXTS`, encoded with the victim's
            tokenizer.
        warmup_lr: the warm-up's learning rate (positive).

    Returns:
        The LoRA victim, a ``BertForSequenceClassification`` whose only
        trainable parameters are the adapters
        (``...<module>.lora_A.default.weight``, ``(r, d_in)``, and
        ``...lora_B.default.weight``, ``(d_out, r)``).

    Raises:
        ValueError: for a model that already carries adapters, an unknown
            target (the message lists the valid ones), ``r`` outside
            ``1 .. min(d_out, d_in)``, a non-positive or non-finite
            ``alpha``, bad ``layers``, or a bad ``warmup`` / ``warmup_lr``.
    """
    if adapter_parameters(model):
        raise ValueError("This model already carries LoRA adapters: pass the plain victim to lora_victim.")
    targets = _checked_targets(target_modules)
    n_layers = model.config.num_hidden_layers
    layer_ids = tuple(range(n_layers)) if layers is None else _layer_indices(layers, n_layers, "lora_victim")
    stem = f"{model.base_model_prefix}.encoder.layer."
    modules = dict(model.named_modules())
    smallest = min(min(modules[f"{stem}{layer}.{LORA_MODULES[t]}"].weight.shape)
                   for t in targets for layer in layer_ids)
    if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= smallest:
        raise ValueError(f"r must be a whole number in 1..{smallest} (the smallest dimension of the adapted "
                         f"weights), got {r!r}.")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"alpha must be a positive, finite number (the update is scaled by alpha / r), got {alpha!r}.")
    steps = 0 if warmup is None else warmup
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"warmup must be None or a whole number of AdamW steps (0 or more), got {warmup!r}.")
    if isinstance(warmup_lr, bool) or not isinstance(warmup_lr, (int, float)) or not math.isfinite(warmup_lr) \
            or warmup_lr <= 0:
        raise ValueError(f"warmup_lr must be a positive number, got {warmup_lr!r}.")
    # A regular expression that peft matches against each module's full name
    # (re.fullmatch): exact modules of exact layers, so 'ffn.output'
    # (output.dense) never catches attention.output.dense by substring.
    pattern = (re.escape(stem) + "(" + "|".join(map(str, layer_ids)) + r")\."
               + "(" + "|".join(re.escape(LORA_MODULES[t]) for t in targets) + ")")
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=pattern, lora_dropout=0.0, bias="none",
                        init_lora_weights=True)
    victim = copy.deepcopy(model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        victim = inject_adapter_in_model(config, victim, adapter_name=ADAPTER)
    victim.eval()
    if steps:
        _warm_up(victim, steps, warmup_batch, float(warmup_lr))
    return victim


@dataclass(frozen=True)
class LoraRecipe:
    """How to build a LoRA victim from a plain one, as a value: what a Flower client and the server share.

    :func:`lora_victim` is deterministic in its arguments (seeded ``A``,
    ``B = 0``, a deterministic warm-up), so a recipe rebuilds the same
    global model in any process: the server's and every Ray actor's. It
    pickles (Flower's clients run in other processes) and never holds a
    model.

    Attributes:
        targets: the adapted modules (keys of :data:`gilib.selection.LORA_MODULES`).
        r: the adapters' rank.
        alpha: LoRA's ``alpha``.
        layers: an index, a tuple of indices, ``"all"`` or ``None`` (every layer).
        seed: seeds ``A``'s draw.
        warmup: AdamW warm-up steps on the public warm-up batch (``None`` or 0: fresh, ``B = 0``).
    """

    targets: tuple[str, ...] = ("query", "value")
    r: int = 8
    alpha: float = 16
    layers: int | tuple[int, ...] | str | None = 0
    seed: int = 0
    warmup: int | None = 3

    def __post_init__(self) -> None:
        object.__setattr__(self, "targets", _checked_targets(self.targets))
        if isinstance(self.layers, list):
            object.__setattr__(self, "layers", tuple(self.layers))

    def victim(self, model: torch.nn.Module) -> torch.nn.Module:
        """The LoRA victim of ``model`` (a new model; ``model`` is never modified).

        Raises:
            ValueError: as :func:`lora_victim`, for settings that do not fit ``model``.
        """
        return lora_victim(model, self.targets, r=self.r, alpha=self.alpha, layers=self.layers, seed=self.seed,
                           warmup=self.warmup)


def _checked_targets(target_modules) -> tuple[str, ...]:
    """The target modules as a tuple in table order, or a clear error."""
    if isinstance(target_modules, str):
        target_modules = (target_modules,)
    targets = tuple(target_modules)
    unknown = [t for t in targets if t not in LORA_MODULES]
    if unknown or not targets:
        raise ValueError(f"Unknown LoRA target {unknown[0] if unknown else 'list (empty)'}: choose modules among "
                         f"{', '.join(LORA_MODULES)}.")
    if len(set(targets)) != len(targets):
        raise ValueError(f"The targets {list(targets)} repeat a module; list each once.")
    return tuple(t for t in LORA_MODULES if t in targets)


def _warm_up(victim: torch.nn.Module, steps: int, batch: dict | None, lr: float) -> None:
    """``steps`` full-batch AdamW steps of the adapters (in place), deterministic: no dropout, fixed batch."""
    if batch is None:
        try:
            tokenizer = load_tokenizer(victim.config.name_or_path)
        except Exception as err:  # a hub name offline, a model loaded by hand
            raise ValueError(f"No tokenizer for the victim {victim.config.name_or_path!r} to encode the warm-up "
                             f"sentences: pass warmup_batch=gilib.models.encode(tokenizer, texts, labels).") from err
        batch = encode(tokenizer, list(WARMUP_TEXTS), [(i + 1) % 2 for i in range(len(WARMUP_TEXTS))])
    missing = [k for k in ("input_ids", "attention_mask", "labels") if not isinstance(batch, dict) or k not in batch]
    if missing:
        raise ValueError(f"warmup_batch lacks {missing}: build it with gilib.models.encode(tokenizer, texts, labels).")
    params = [p for p in victim.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, foreach=False)
    for _ in range(steps):
        loss = victim(**batch).loss
        for p, g in zip(params, torch.autograd.grad(loss, params)):
            p.grad = g
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def is_lora(model: torch.nn.Module) -> bool:
    """Whether ``model`` carries LoRA adapters (e.g. one :func:`lora_victim` built)."""
    return has_adapters(model)


def lora_settings(model: torch.nn.Module) -> LoraSettings:
    """``(r, alpha, targets, layers)`` of a LoRA victim, read back from its adapters.

    ``r`` is read off the ``A`` weights' shapes, ``alpha`` from the adapted
    modules (peft keeps it per module), targets and layers from the exact
    adapter names.

    Raises:
        ValueError: for a model without adapters, or whose adapters differ in
            rank or alpha (a victim :func:`lora_victim` did not build).
    """
    adapters = adapter_parameters(model)
    if not adapters:
        raise ValueError("This model carries no LoRA adapters: build one with gilib.lora.lora_victim(model, ...).")
    params = dict(model.named_parameters())
    modules = dict(model.named_modules())
    ranks, alphas = set(), set()
    for (_, _, half), name in adapters.items():
        if half == "A":
            ranks.add(params[name].shape[0])
            # ...query.lora_A.default.weight -> the module ...query and the adapter's name.
            module_name, adapter = name.rsplit(".lora_A.", 1)
            alphas.add(float(modules[module_name].lora_alpha[adapter.removesuffix(".weight")]))
    if len(ranks) != 1 or len(alphas) != 1:
        raise ValueError(f"The adapters differ in rank {sorted(ranks)} or alpha {sorted(alphas)}: one LoraSettings "
                         f"describes adapters of one rank and one alpha.")
    present = {k[1] for k in adapters}
    return LoraSettings(r=ranks.pop(), alpha=alphas.pop(), targets=tuple(t for t in LORA_MODULES if t in present),
                        layers=tuple(sorted({k[0] for k in adapters})))
