import nbformat
import pytest
from nbclient import NotebookClient

from gilib.book import fast_mode, pick, read_records


def test_fast_mode_follows_the_environment(monkeypatch):
    monkeypatch.delenv("GILIB_FAST_MODE", raising=False)
    assert fast_mode()
    monkeypatch.setenv("GILIB_FAST_MODE", "0")
    assert not fast_mode()
    monkeypatch.setenv("GILIB_FAST_MODE", "1")
    assert fast_mode()


def test_pick_prefers_an_explicit_value():
    assert pick(None, 2, 10, fast_mode=True) == 2
    assert pick(None, 2, 10, fast_mode=False) == 10
    assert pick(5, 2, 10, fast_mode=True) == 5


def test_records_round_trip_through_an_executed_notebook():
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(
        "import numpy as np\n"
        "from gilib.book import record\n"
        "record('score', np.float64(0.25))\n"
        "record('texts', {'a/0': 'the film'})\n"
        "record('curve', [np.float32(1.5), 2])"
    )]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    NotebookClient(nb, timeout=120, kernel_name="python3").execute()
    assert read_records(nb) == {"score": 0.25, "texts": {"a/0": "the film"}, "curve": [1.5, 2]}
