"""Attacks that rebuild a client's text from the gradient it shares.

Two attacks, one shape: each takes the server's message for one client, a
:class:`~gilib.update.SharedUpdate` (gradients of a selection, labels,
lengths; :func:`gilib.client.client_update` builds it), checks it first,
runs with a validated config and returns an :class:`AttackResult` whose
``diagnostics`` are the attack's own:

==========================  =======================  ===========================
entry point                 settings                 diagnostics
==========================  =======================  ===========================
:func:`optimization_attack` :class:`AttackConfig`    :class:`OptimizationDiagnostics`
:func:`span_attack`         :class:`SpanConfig`      :class:`SpanDiagnostics`
==========================  =======================  ===========================

* :func:`optimization_attack`: LAMP-style gradient matching (cos / L2 /
  TAG) for any selection of parameters (a decoder's at the next-token
  loss); :func:`attack_clients` runs it for
  several clients at once, :func:`optimization_rounds_attack` one client's
  messages of several rounds (:class:`Round`: each at its own global
  model) matched at once; a language-model prior (:class:`NgramPrior`,
  :class:`GPT2Prior`) can steer its reordering rounds.
* :func:`span_attack`: exact recovery from a layer-0 query, key or value
  weight gradient (the row-space check), peeling for batches; on a LoRA
  victim from its stacked layer-0 ``A`` adapter gradients, and
  :func:`adapter_span_attack` from several rounds' (the rank rule,
  :mod:`~gilib.attack.adapters`; given as :class:`Round` s, a noisy
  message's search reads every round's block at its own global model); on a GPT-2-style decoder, from layer 0's
  fused ``c_attn`` weight (on a LoRA decoder, its adapter's ``A``) and a
  causal left-to-right search (:mod:`~gilib.attack.decoder`).

The white-box pieces, for a reader who wants to see inside:
:mod:`~gilib.attack.rowspace` (the row-space check, chapter 5 teaches from
it), :mod:`~gilib.attack.checks`, :mod:`~gilib.attack.searches` and
:mod:`~gilib.attack.peeling` (batches), :mod:`~gilib.attack.decoder`
(a decoder's batches, by the causal mask), :mod:`~gilib.attack.positions`
(a large batch's word order from the gradient's position parts),
:mod:`~gilib.attack.objectives`,
:mod:`~gilib.attack.engines` and :mod:`~gilib.attack.ghost` (the
optimisation attack's loss and where it is computed).
"""

from .config import AttackConfig, SpanConfig
from .optimization import Round, attack_clients, optimization_attack, optimization_rounds_attack
from .priors import GPT2Prior, NgramPrior, Prior
from .result import AttackResult, OptimizationDiagnostics, SpanDiagnostics
from .span import adapter_span_attack, span_attack

__all__ = [
    "AttackConfig",
    "AttackResult",
    "GPT2Prior",
    "NgramPrior",
    "OptimizationDiagnostics",
    "Prior",
    "Round",
    "SpanConfig",
    "SpanDiagnostics",
    "adapter_span_attack",
    "attack_clients",
    "optimization_attack",
    "optimization_rounds_attack",
    "span_attack",
]
