"""Each chapter executed once in fast mode: its recorded numbers say what its prose says.

Each test checks one claim of a chapter's prose, quoted in its comment,
against what the chapter records (:func:`gilib.book.record`). A chapter is
executed once (:func:`gilib.book.executed.executed`: the book build's copy
when it is up to date, else one papermill run), so every test here is
``slow`` and ``make test-fast`` leaves them out. A test fails when its
sentence is false of those numbers: then the prose or the code needs
fixing, not the test.
"""

import os

import nbformat
import pytest

from gilib.book import read_records
from gilib.book.executed import executed


def executed_chapter(name: str, *, notebook: bool = False):
    """A module-scoped fixture: the chapter's records (and, with ``notebook``, its executed notebook too)."""

    @pytest.fixture(scope="module")
    def chapter():
        # A kernel on this worker's share of the cores, beside the other workers' tests.
        path = executed(name, processes=int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
        records = read_records(path)
        return (records, nbformat.read(str(path), as_version=4)) if notebook else records

    return chapter
