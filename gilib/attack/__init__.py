"""Attacks that rebuild a client's text from the gradient it shares.

Every attack takes the server's message for one client, a
:class:`~gilib.slicing.SharedUpdate` (gradients of a selection, labels,
lengths; :func:`gilib.client.client_update` builds it), and checks it first.

* :func:`optimization_attack`: LAMP-style gradient matching (cos / L2 / TAG),
  for any selection of parameters; :func:`attack_clients` runs it for
  several clients at once.
* :mod:`~gilib.attack.priors`: language-model priors for its reordering
  rounds (an n-gram model counted from texts the caller chooses, or GPT-2).
* :func:`span_attack`: exact recovery from a layer-0 query, key or value
  weight gradient (the row-space check).
* :mod:`~gilib.attack.ghost`: the fast path's gradient distances from
  per-token activations.
"""

from ..slicing import SharedUpdate
from .objectives import OBJECTIVES, GradientMatcher, Target, gradient_distance
from .optimization import AttackConfig, AttackResult, Prior, attack_clients, optimization_attack
from .priors import GPT2Prior, NgramPrior
from .exact import span_attack
from .span import RowSpace, row_space
from .tokens import TokenSpace

__all__ = [
    "OBJECTIVES",
    "GPT2Prior",
    "NgramPrior",
    "AttackConfig",
    "AttackResult",
    "GradientMatcher",
    "Prior",
    "SharedUpdate",
    "Target",
    "attack_clients",
    "TokenSpace",
    "gradient_distance",
    "optimization_attack",
    "RowSpace",
    "row_space",
    "span_attack",
]
