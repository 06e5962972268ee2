"""SecAgg+'s arithmetic without the network (gilib.secure): the unmasked mean and its noise (issue 25).

The real Flower round is in ``tests/test_federated.py`` (it starts Ray);
there a test checks that Flower's reply and :func:`secure_mean` carry the
same noise.
"""

import math

import pytest
import torch

from gilib.client import client_update
from gilib.data import load_split
from gilib.models import encode
from gilib.secure import SecAgg, secure_mean
from gilib.selection import select


@pytest.fixture(scope="module")
def updates(minilm):
    """Four FedSGD clients of one bundled sentence each, sharing layer 0's query weight."""
    model, tokenizer = minilm
    selection = select(model, "attention.query", 0)
    examples = load_split("sample")[:4]
    return [client_update(model, selection, encode(tokenizer, [e.text], [e.label])).shared for e in examples]


def _exact_mean(updates):
    return [sum(u.shared_grads[k].double() for u in updates) / len(updates) for k in range(len(updates[0].shared_grads))]


def test_the_secure_mean_is_the_exact_mean_plus_the_protocols_rounding_noise(updates):
    secagg = SecAgg()
    mean = secure_mean(updates, secagg, seed=3)
    errors = torch.cat([(got.double() - want).flatten() for got, want in zip(mean.shared_grads,
                                                                              _exact_mean(updates))])
    # step / sqrt(6 N): 2 / 2**30 / sqrt(24), about 3.8e-10, over 148k entries.
    std = secagg.noise_std([1, 1, 1, 1])
    assert math.isclose(std, 2 / 2**30 / math.sqrt(24), rel_tol=1e-6)
    assert 0.9 < float(errors.std()) / std < 1.1
    assert abs(float(errors.mean())) < 0.05 * std
    assert mean.lengths == [n for u in updates for n in u.lengths]
    assert mean.labels.tolist() == [int(u.labels[0]) for u in updates]


def test_the_secure_mean_is_seeded(updates):
    first, again, other = (secure_mean(updates, seed=s).shared_grads[0] for s in (0, 0, 1))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_a_coarser_grid_leaves_more_noise_and_weights_follow_the_examples():
    fine, coarse = SecAgg(), SecAgg(quantization_range=2**22)
    assert math.isclose(coarse.noise_std([1, 1]) / fine.noise_std([1, 1]), 2**8, rel_tol=1e-9)
    # A client of 3 examples weighs 3 times one of 1; max_weight defaults to the largest.
    assert SecAgg().ratios([1, 3]) == pytest.approx([1 / 3, 1.0], abs=1e-9)
    assert SecAgg(max_weight=6).ratios([3]) == [0.5]


def test_bad_secure_inputs_get_clear_errors(updates):
    with pytest.raises(ValueError, match="at least one client"):
        secure_mean([])
    with pytest.raises(ValueError, match="outside SecAgg"):
        secure_mean(updates, SecAgg(clipping_range=1e-6))
    with pytest.raises(ValueError, match="same selection"):
        secure_mean([updates[0], updates[1]._replace(shared_grads=[updates[1].shared_grads[0][:10]])])
    with pytest.raises(ValueError, match="max_weight"):
        SecAgg(max_weight=-1.0)
    with pytest.raises(ValueError, match="Raise max_weight"):
        SecAgg(max_weight=2).ratios([3])
    with pytest.raises(ValueError, match="number of examples"):
        SecAgg().noise_std([])
