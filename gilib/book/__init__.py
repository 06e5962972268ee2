"""The book's tooling: what a chapter imports, its figures, and the maintainer's upkeep.

* :mod:`gilib.book.chapter`: what a chapter imports at run time (its
  settings, online or offline, the numbers it records); its names are
  re-exported here, so that a chapter writes
  ``from gilib.book import choose_setup, fast_mode, load_sentences, pick, record``.
* :mod:`gilib.book.plots`: the one plotting module, one style.
* :mod:`gilib.book.upkeep`: the maintainer's tool for the notebooks (Colab
  badge, install cell, repository links, the README's figure); chapters
  never import it.
* :mod:`gilib.book.assignments`: each chapter's otter-grader assignment.
* :mod:`gilib.book.course`: the course table (questions and run times).
* :mod:`gilib.book.executed`: chapters executed once, read by the tests.

The book sits on top: it may import the studies and the library, and
neither imports it (``tests/test_walls.py``).
"""

from .chapter import (
    FAST_MODE_ENV,
    ONLINE_ENV,
    Setup,
    choose_setup,
    fast_mode,
    in_colab,
    load_sentences,
    pick,
    read_records,
    record,
    record_all,
)

__all__ = [
    "FAST_MODE_ENV",
    "ONLINE_ENV",
    "Setup",
    "choose_setup",
    "fast_mode",
    "in_colab",
    "load_sentences",
    "pick",
    "read_records",
    "record",
    "record_all",
]
