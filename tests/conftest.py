"""Shared fixtures: models are loaded once per test session."""

import pytest
import torch

from gilib.models import load_model


@pytest.fixture(scope="session")
def tiny():
    """The tiny random-weight BERT and its tokenizer."""
    return load_model("tiny", seed=0)


@pytest.fixture(scope="session")
def minilm():
    """The offline default: pretrained all-MiniLM-L6-v2 with a 2-class head."""
    return load_model("minilm", seed=0)


@pytest.fixture(scope="session", autouse=True)
def _deterministic_threads():
    # Tests compare floats between runs; fixing the thread count keeps the
    # reduction order, and so the last bits, the same. Session-wide, so that
    # module fixtures (a client's message) and the test bodies that compare
    # against them use the same one.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


RAY_TESTS = ("tests/test_federated.py", "tests/test_federated_lora.py", "tests/chapters/test_chapter6.py",
             "tests/chapters/test_chapter7.py")
"""Tests that start Ray (Flower rounds: chapters 6 and 7 run them): ``make test`` runs the suite on several
workers (``pytest -n auto --dist loadgroup``), and these stay in one of them, one after another."""
CHAPTER_TESTS = "tests/chapters/"
"""The other chapters' tests: each chapter's module is a group of its own (``chapter1`` ...), so that one
worker executes the chapter once (a module fixture) while the other workers run other tests; the executed
chapters' manifest is written under a file lock (:mod:`gilib.book.executed`)."""


def xdist_group(path: str) -> str | None:
    """The worker group of a test file (a ``/``-separated path), or ``None`` for a test any worker may run."""
    if any(path.endswith(part) for part in RAY_TESTS):
        return "ray"
    if f"/{CHAPTER_TESTS}" in path or path.startswith(CHAPTER_TESTS):
        return path.rsplit("/", 1)[-1].removeprefix("test_").removesuffix(".py")
    return None


# First, explicitly: xdist's worker groups the tests by their xdist_group mark in
# its own pytest_collection_modifyitems, which must see the marks. (It renames each
# item's node id, which pytest 9.2 no longer reads: requirements.txt pins 9.1.1;
# tests/test_suite.py checks that the groups stay on one worker each.)
@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    for item in items:
        group = xdist_group(item.path.as_posix())
        if group is not None:
            item.add_marker(pytest.mark.xdist_group(group))
