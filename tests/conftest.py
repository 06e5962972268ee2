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
