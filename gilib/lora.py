"""LoRA victims: a BERT or a GPT-2-style decoder whose client trains and shares only low-rank adapters.

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

A decoder (:func:`gilib.models.is_decoder`) takes adapters on its blocks'
``Conv1D`` s, named as GPT-2 names them (:data:`gilib.selection.DECODER_LORA_MODULES`:
``c_attn``, the fused query/key/value, ``attn.c_proj``, ``mlp.c_fc``,
``mlp.c_proj``). A ``Conv1D`` stores its weight ``(d_in, d_out)``, so peft
is told ``fan_in_fan_out=True``; that flag only transposes the merged
update ``B A``: the adapters themselves are ``nn.Linear`` s with ``A``
``(r, d_in)`` and ``B`` ``(d_out, r)`` as on a BERT, and ``grad A = s B^T G``
with ``G`` the frozen weight's gradient in ``(d_out, d_in)`` orientation
(the transpose of what the ``Conv1D`` stores), so ``A``'s rows lie in the
span of the module's inputs as on a BERT. The decoder's warm-up trains on
the next-token loss (:func:`gilib.client.training_loss`).

Selections name the adapters exactly (``lora``, ``lora.query.A``,
``lora.c_attn.A``, ...: :mod:`gilib.selection`), and :func:`gilib.client.client_update` computes a
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

from .client import training_loss
from .models import encode, encode_lm, is_decoder, load_tokenizer
from .selection import (DECODER_LORA_MODULES, LORA_MODULES, _layer_indices, adapter_parameters, has_adapters,
                        lora_modules)

ADAPTER = "default"
"""The name peft gives the one adapter a victim carries (``...query.lora_A.default.weight``)."""

WARMUP_TEXTS = (
    "the museum opens at nine on weekdays .",
    "she forgot her umbrella on the train again .",
    "a warm bowl of soup is all i want tonight .",
    "the committee will vote on the budget next month .",
)
"""Public warm-up sentences (written for this module, in no dataset the book samples): the global
model's earlier rounds, which move ``B`` off zero. Labels alternate 1, 0 (a decoder's warm-up has none: it
learns the next token)."""
WARMUP_LR = 1e-3
"""The warm-up's AdamW learning rate: LoRA is trained at 1e-4 to 1e-3 (Hu et al. use 2e-4 to 5e-4 on GLUE)."""
DEFAULT_TARGETS = {"bert": ("query", "value"), "gpt2": ("c_attn",)}
"""What :func:`lora_victim` adapts when no targets are given: Hu et al.'s query and value on a BERT; on
GPT-2, whose query, key and value are one fused weight, ``c_attn`` (peft's own default for GPT-2)."""


@dataclass(frozen=True)
class LoraSettings:
    """The settings of a LoRA victim's adapters, as :func:`lora_settings` reads them back.

    Attributes:
        r: the adapters' rank.
        alpha: LoRA's ``alpha``; the update is scaled by ``alpha / r``.
        targets: the adapted modules, keys of :data:`gilib.selection.LORA_MODULES` (a decoder's:
            :data:`gilib.selection.DECODER_LORA_MODULES`), in table order.
        layers: the layers (encoder layers or decoder blocks) that carry adapters, ascending.
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
    target_modules: Sequence[str] | None = None,
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
    ``BertForSequenceClassification`` (or ``GPT2LMHeadModel``) with its own ``config``,
    ``base_model_prefix`` and parameter names (``bert.encoder.layer.0...``),
    so every ``base_model_prefix``-based lookup of the library and the
    attack keeps working; ``get_peft_model`` would wrap it in a
    ``PeftModel`` and prefix every name with ``base_model.model.``. peft
    freezes every non-adapter parameter (the classification head too: the
    client shares its adapters alone). ``A`` is peft's default Kaiming-uniform
    draw, seeded from ``seed``; ``B`` starts at zero. The copy is in
    ``eval()`` mode and keeps the input's (eager) attention.

    Args:
        model: a BERT-family victim or a GPT-2-style decoder
            (:func:`gilib.models.load_model`); never modified (it may be the
            shared :func:`~gilib.models.cached_model`).
        target_modules: keys of :data:`gilib.selection.LORA_MODULES`
            (``"query"``, ``"key"``, ``"value"``, ``"attention.output"``,
            ``"ffn.intermediate"``, ``"ffn.output"``) for a BERT, of
            :data:`gilib.selection.DECODER_LORA_MODULES` (``"c_attn"``,
            ``"attn.c_proj"``, ``"mlp.c_fc"``, ``"mlp.c_proj"``) for a
            decoder; ``None``: :data:`DEFAULT_TARGETS` (query and value; a
            decoder's ``c_attn``).
        r: the adapters' rank, ``1 .. min(d_out, d_in)`` of every target.
        alpha: LoRA's ``alpha`` (positive); the update is ``(alpha / r) B A x``.
        layers: the layers to adapt (a BERT's encoder layers, a decoder's
            blocks): an index, a list, ``"all"`` or ``None`` (every layer).
        seed: seeds ``A``'s draw.
        warmup: ``None`` or 0 for a fresh adapter (``B = 0``: ``A``'s
            gradient is zero), else this many full-batch AdamW steps
            (``warmup_lr``, torch's defaults otherwise) of the adapters on
            ``warmup_batch``: the global model after earlier rounds. The
            returned model *is* that global model, so the server, which
            sent it, knows every weight of it.
        warmup_batch: the warm-up's batch (``input_ids``, ``attention_mask``
            ``(B, T)``, ``labels`` ``(B,)``, as :func:`gilib.models.encode`
            returns; a decoder's without ``labels``, as
            :func:`gilib.models.encode_lm` returns, trained on the
            next-token loss); default :data:`WARMUP_TEXTS`, encoded with the
            victim's tokenizer.
        warmup_lr: the warm-up's learning rate (positive).

    Returns:
        The LoRA victim, of the model's class, whose only trainable
        parameters are the adapters (``...<module>.lora_A.default.weight``,
        ``(r, d_in)``, and ``...lora_B.default.weight``, ``(d_out, r)``, on
        a decoder's ``Conv1D`` s too).

    Raises:
        ValueError: for a model that already carries adapters, an unknown
            target or one the model lacks (the message lists the model's), ``r`` outside
            ``1 .. min(d_out, d_in)``, a non-positive or non-finite
            ``alpha``, bad ``layers``, a bad ``warmup`` / ``warmup_lr``, or
            a ``warmup_batch`` that does not fit the model (a decoder's
            with class labels).
    """
    if adapter_parameters(model):
        raise ValueError("This model already carries LoRA adapters: pass the plain victim to lora_victim.")
    decoder = is_decoder(model)
    stem, table = lora_modules(model)
    if target_modules is None:
        target_modules = DEFAULT_TARGETS["gpt2" if decoder else "bert"]
    targets = _checked_targets(target_modules, table, "a GPT-2 decoder" if decoder else "a BERT")
    n_layers = model.config.num_hidden_layers
    layer_ids = tuple(range(n_layers)) if layers is None else _layer_indices(layers, n_layers, "lora_victim")
    modules = dict(model.named_modules())
    # A Conv1D's weight is (d_in, d_out), a Linear's (d_out, d_in): the smallest side is the same either way.
    smallest = min(min(modules[f"{stem}{layer}.{table[t]}"].weight.shape)
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
               + "(" + "|".join(re.escape(table[t]) for t in targets) + ")")
    # GPT-2's Conv1D stores (d_in, d_out): peft must transpose B A when it merges (and warns without the flag).
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=pattern, lora_dropout=0.0, bias="none",
                        init_lora_weights=True, fan_in_fan_out=decoder)
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
        targets: the adapted modules (keys of :data:`gilib.selection.LORA_MODULES`, or of
            :data:`gilib.selection.DECODER_LORA_MODULES` for a decoder; :meth:`victim` checks
            them against the model's table).
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
        # Without the model yet: every target of either table; victim() checks the model's own.
        object.__setattr__(self, "targets", _checked_targets(self.targets, {**LORA_MODULES, **DECODER_LORA_MODULES},
                                                             "a BERT or a GPT-2 decoder"))
        if isinstance(self.layers, list):
            object.__setattr__(self, "layers", tuple(self.layers))

    def victim(self, model: torch.nn.Module) -> torch.nn.Module:
        """The LoRA victim of ``model`` (a new model; ``model`` is never modified).

        Raises:
            ValueError: as :func:`lora_victim`, for settings that do not fit ``model``.
        """
        return lora_victim(model, self.targets, r=self.r, alpha=self.alpha, layers=self.layers, seed=self.seed,
                           warmup=self.warmup)


def _checked_targets(target_modules, table: dict[str, str], kind: str) -> tuple[str, ...]:
    """The target modules as a tuple in ``table``'s order (the modules of ``kind``), or a clear error."""
    if isinstance(target_modules, str):
        target_modules = (target_modules,)
    targets = tuple(target_modules)
    unknown = [t for t in targets if t not in table]
    if unknown or not targets:
        raise ValueError(f"Unknown LoRA target {unknown[0] if unknown else 'list (empty)'}: choose modules among "
                         f"{', '.join(table)} (the targets of {kind}).")
    if len(set(targets)) != len(targets):
        raise ValueError(f"The targets {list(targets)} repeat a module; list each once.")
    return tuple(t for t in table if t in targets)


def _warm_up(victim: torch.nn.Module, steps: int, batch: dict | None, lr: float) -> None:
    """``steps`` full-batch AdamW steps of the adapters (in place), deterministic: no dropout, fixed batch.

    A classifier trains on its labels, a decoder on the next-token loss (the client's own,
    :func:`gilib.client.training_loss`).
    """
    decoder = is_decoder(victim)
    how = "encode_lm(tokenizer, texts)" if decoder else "encode(tokenizer, texts, labels)"
    if batch is None:
        try:
            tokenizer = load_tokenizer(victim.config.name_or_path)
        except Exception as err:  # a hub name offline, a model loaded by hand
            raise ValueError(f"No tokenizer for the victim {victim.config.name_or_path!r} to encode the warm-up "
                             f"sentences: pass warmup_batch=gilib.models.{how}.") from err
        if decoder:
            batch = encode_lm(tokenizer, list(WARMUP_TEXTS))
        else:
            batch = encode(tokenizer, list(WARMUP_TEXTS), [(i + 1) % 2 for i in range(len(WARMUP_TEXTS))])
    fields = ("input_ids", "attention_mask") if decoder else ("input_ids", "attention_mask", "labels")
    missing = [k for k in fields if not isinstance(batch, dict) or k not in batch]
    if missing:
        raise ValueError(f"warmup_batch lacks {missing}: build it with gilib.models.{how}.")
    if decoder and "labels" in batch:
        raise ValueError("A decoder learns the next token and has no class labels, but warmup_batch carries "
                         "'labels': build it with gilib.models.encode_lm(tokenizer, texts) (no labels).")
    params = [p for p in victim.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, foreach=False)
    for _ in range(steps):
        loss = training_loss(victim, batch)
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
    _, table = lora_modules(model)
    return LoraSettings(r=ranks.pop(), alpha=alphas.pop(), targets=tuple(t for t in table if t in present),
                        layers=tuple(sorted({k[0] for k in adapters})))
