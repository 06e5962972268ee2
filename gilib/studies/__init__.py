"""The measurement campaigns behind the book's cached numbers (``data/results/``).

Each study is one :class:`~gilib.studies.study.Study` description in its
module (``STUDY``): its plan, its work, its keys and its tables. All of
them run through one runner (:mod:`gilib.studies.runner`, resumable, local
workers or a Dask cluster) into one store (:mod:`gilib.studies.store`),
on one seeded sample of sentences (:mod:`gilib.studies.sample`), and one
command line drives them all::

    python -m gilib.studies                     # the studies and their commands
    python -m gilib.studies STUDY run ...       # run or resume one
    python -m gilib.studies STUDY TABLE ...     # print one of its tables

==============  =================================================  =========
study           what it measures                                   chapter
==============  =================================================  =========
``grids``       the optimisation attack over grids of selections   2, 3, 4
``dp-cost``     accuracy and epsilon after DP fine-tuning          4
``span``        the span check: exactness, other weights, batches  5
``federated``   FedAvg, float32, batch size, SecAgg+ rounds         6
``lora``        LoRA adapters: span check and optimisation attack  7
                against r, adapters, rounds, length, AdamW
``partial``     LoRA's rank rule, the decoder (reads the benches)  7
``shapes``      BERT-base and TinyBERT shapes: shares, span check  3, 5
``headlines``   the README's and the conclusion's numbers          (reads)
==============  =================================================  =========

The studies drive the library (:mod:`gilib.client` for every client
update, :mod:`gilib.attack` for every attack, :mod:`gilib.metrics` against
the truth); the library never imports them, and they never import the
book (``tests/test_walls.py``).
"""


def all_studies() -> list:
    """Every study of the book, in the order of its chapters."""
    # Imported here, not at the top: each study loads torch and its data,
    # which `import gilib.studies.store` alone does not need.
    from . import dp_cost, federated, grids, headlines, lora, partial, shapes, span

    return [grids.STUDY, dp_cost.STUDY, span.STUDY, federated.STUDY, lora.STUDY, partial.STUDY, shapes.STUDY,
            headlines.STUDY]
