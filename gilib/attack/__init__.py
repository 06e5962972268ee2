"""Attacks that rebuild a client's text from the gradient it shares.

* :func:`optimization_attack`: LAMP-style gradient matching (cos / L2 / TAG),
  for any selection of parameters.
"""

from .objectives import OBJECTIVES, GradientMatcher, gradient_distance
from .optimization import AttackConfig, AttackResult, Prior, optimization_attack
from .tokens import TokenSpace

__all__ = [
    "OBJECTIVES",
    "AttackConfig",
    "AttackResult",
    "GradientMatcher",
    "Prior",
    "TokenSpace",
    "gradient_distance",
    "optimization_attack",
]
