"""gilib: gradient inversion from partial Transformer gradients.

The package behind the book, in three layers:

* **the library** (this folder): the victim (:mod:`~gilib.models`), the
  sentences (:mod:`~gilib.data`), which parameters the server sees
  (:mod:`~gilib.selection`) and its message (:mod:`~gilib.update`), what a
  client sends (:mod:`~gilib.client`, with DP-SGD in :mod:`~gilib.dp`),
  the attacks (:mod:`~gilib.attack`), the scores against the truth
  (:mod:`~gilib.metrics`), federated rounds in Flower
  (:mod:`~gilib.federated`) and SecAgg+'s arithmetic without the network
  (:mod:`~gilib.secure`), victims fine-tuned offline, cached
  (:mod:`~gilib.finetune`), and LoRA victims whose clients share only
  their adapters (:mod:`~gilib.lora`);
* **the studies** (:mod:`gilib.studies`): the measurement campaigns that
  write ``data/results/``, one runner, one command line;
* **the book's tooling** (:mod:`gilib.book`): what a chapter imports, the
  plots, the notebooks' upkeep, the assignments, the course table.

Data flows one way, and the names here are that flow::

    model, tokenizer = load_model("minilm")
    true_batch = encode(tokenizer, texts, labels)            # the client's truth
    selection = select(model, "attention.query", 0)          # what it shares
    update = client_update(model, selection, true_batch).shared   # the server's message
    result = optimization_attack(model, tokenizer, update, selection, AttackConfig())
    result = span_attack(model, tokenizer, update, selection, SpanConfig())
    scores = score_batch(result.texts, texts)                 # truth meets the metrics only

The attack never imports the client's side, the library never imports the
studies or the book (``tests/test_walls.py``). Names are imported on first
use, so ``import gilib.book`` stays light.

Reference: W. Li, Q. Xu, M. Dras, "Seeing the Forest through the Trees: Data
Leakage from Partial Transformer Gradients", EMNLP 2024.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_FLOW = {
    "load_model": "models",
    "encode": "models",
    "encode_lm": "models",
    "load_split": "data",
    "sample_batches": "data",
    "lora_victim": "lora",
    "select": "selection",
    "SharedUpdate": "update",
    "client_update": "client",
    "DPSGD": "client",
    "CentralDP": "client",
    "FedAvg": "client",
    "AdamW": "client",
    "optimization_attack": "attack",
    "AttackConfig": "attack",
    "span_attack": "attack",
    "SpanConfig": "attack",
    "AttackResult": "attack",
    "rouge_scores": "metrics",
    "score_batch": "metrics",
    "exact_rate": "metrics",
}
"""Each public name of the flow and the module that defines it."""

__all__ = sorted(_FLOW)


def __getattr__(name: str):
    # PEP 562: a name of the flow is imported from its module on first use.
    if name in _FLOW:
        value = getattr(importlib.import_module(f".{_FLOW[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'gilib' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_FLOW))
