"""gilib: gradient inversion from partial Transformer gradients.

The package behind the book. Data flows one way:

``data`` and ``models`` feed ``slicing`` (what the client sends), which feeds
``attack`` (what the server rebuilds), which feeds ``metrics``.

Reference: W. Li, Q. Xu, M. Dras, "Seeing the Forest through the Trees: Data
Leakage from Partial Transformer Gradients", EMNLP 2024.
"""

__version__ = "0.1.0"
