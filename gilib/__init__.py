"""gilib: gradient inversion from partial Transformer gradients.

The package behind the book. Data flows one way:

``data`` and ``models`` feed ``slicing`` (which parameters) and ``client``
(what the client sends: a ``SharedUpdate``, plain, DP-SGD through ``dp``, or
FedAvg), which feeds ``attack`` (what the server rebuilds), which feeds
``metrics``. ``federated`` runs the client inside Flower's federated rounds,
with a curious server strategy that hands every reply to a callback.
``experiments``, ``span_study``, ``fl_study`` and ``utility`` drive that loop
through ``results`` (one resumable runner, local or on a Dask cluster);
``plots`` draws, ``headlines`` reads the cached numbers; ``book`` is what a
chapter imports, ``notebooks`` and ``assignments`` keep the chapters. The
attack never imports the client's side (``tests/test_walls.py``).

Reference: W. Li, Q. Xu, M. Dras, "Seeing the Forest through the Trees: Data
Leakage from Partial Transformer Gradients", EMNLP 2024.
"""

__version__ = "0.1.0"
