"""SecAgg+'s arithmetic without the network: what the server unmasks, and its noise.

Flower's SecAgg+ (Bell et al., "Secure Single-Server Aggregation with
(Poly)Logarithmic Overhead", CCS 2020; ``flwr.server.workflow.SecAggPlusWorkflow``
with ``flwr.client.mod.secaggplus_mod``) lets the server learn only the
weighted mean of its clients' replies. Client ``i`` scales its reply by
``r_i = round(n_i / max_weight * R) / R`` (``n_i`` its examples, ``R`` the
quantisation range), clips it to ``[-c, c]``, rounds it stochastically onto
the grid of step ``2 c / R`` and masks it; the pairwise masks cancel in the
modular sum, and the server dequantises the sum and divides by
``sum r_i``. The masks change nothing the server ends with, so
:func:`secure_mean` reproduces the unmasked mean with Flower's own
quantisation function in a fraction of a second (a simulated Flower round
starts Ray and takes minutes; :func:`gilib.federated.run_round` runs the
real one, and a test checks that the two agree to the noise).

The noise is the protocol's and is known to the server: rounding a value
that sits at a fraction ``f`` of a step errs by ``-f`` or ``1 - f`` steps,
variance ``f (1 - f) step^2`` (at most ``step^2 / 4``, ``step^2 / 6`` on
average over ``f``), so the mean of ``N`` equal-weight clients carries a
per-entry noise of about ``step / sqrt(6 N)`` (:meth:`SecAgg.noise_std`).
That floor, not float32's round-off, is what the span check's tests of a
secure mean must be judged against (:func:`gilib.attack.span_attack`'s
``noise``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from .update import SharedUpdate


@dataclass(frozen=True)
class SecAgg:
    """Settings of Flower's SecAgg+ round (``flwr.server.workflow.SecAggPlusWorkflow``).

    Every client clips its reply to ``[-clipping_range, clipping_range]``
    and rounds it stochastically to one of ``quantization_range`` levels
    before masking it. Flower's defaults (8.0, 2**22 levels, weights of up
    to 1000 examples) suit model weights; they would round a gradient of
    1e-3 away. The defaults here keep a reply to about 2e-9
    (``2 * clipping_range / quantization_range``), and the clients send
    float64 arrays, since Flower quantises in the arrays' own dtype.

    Attributes:
        clipping_range: the largest value a client's reply may hold.
        quantization_range: levels of the quantisation (at most 2**31:
            Flower rounds into 32-bit integers).
        modulus_range: the masks' modulus, a power of two above
            ``quantization_range`` times the client count.
        max_weight: the largest ``num_examples`` a client may weigh its reply
            with; ``None``: the largest client batch of the round. Each reply
            is scaled by ``num_examples / max_weight`` before quantisation, so
            a loose bound costs precision.
        reconstruction_threshold: the share of a client's key shares (one
            per client) that unmasks it if it drops out.
    """

    clipping_range: float = 1.0
    quantization_range: int = 2**30
    modulus_range: int = 2**40
    max_weight: float | None = None
    reconstruction_threshold: float = 0.5

    def __post_init__(self) -> None:
        if not (math.isfinite(self.clipping_range) and self.clipping_range > 0):
            raise ValueError(f"clipping_range must be a positive number, got {self.clipping_range!r}.")
        if not 0 < self.reconstruction_threshold <= 1:
            raise ValueError(f"reconstruction_threshold is a share of the clients, in (0, 1]; got "
                             f"{self.reconstruction_threshold!r}.")
        if not 1 < self.quantization_range <= 2**31:
            raise ValueError(f"quantization_range must lie in 2 .. 2**31, got {self.quantization_range!r}.")
        if self.max_weight is not None and not (math.isfinite(self.max_weight) and self.max_weight > 0):
            raise ValueError(f"max_weight must be a positive number of examples (or None), got "
                             f"{self.max_weight!r}.")

    @property
    def step(self) -> float:
        """The quantisation grid's step, ``2 * clipping_range / quantization_range``."""
        return 2 * self.clipping_range / self.quantization_range

    def ratios(self, examples: Sequence[int]) -> list[float]:
        """Each client's weight ``r_i`` as its SecAgg+ mod computes it (quantised to the grid)."""
        examples = _examples(examples)
        top = self.max_weight or max(examples)
        if max(examples) > top:
            raise ValueError(f"A client holds {max(examples)} examples, more than max_weight={top}: "
                             f"Flower would overflow its quantisation. Raise max_weight.")
        return [round(n / top * self.quantization_range) / self.quantization_range for n in examples]

    def noise_std(self, examples: Sequence[int]) -> float:
        """The per-entry standard deviation of the unmasked mean's rounding noise.

        ``sqrt(N step^2 / 6) / sum r_i``: ``N`` stochastic roundings of
        variance ``step^2 / 6`` on average, divided by the total weight.

        Args:
            examples: each client's ``num_examples`` (its batch size).
        """
        ratios = self.ratios(examples)
        return self.step * math.sqrt(len(ratios) / 6) / sum(ratios)


def _examples(examples: Sequence[int]) -> list[int]:
    examples = [int(n) for n in examples]
    if not examples or min(examples) < 1:
        raise ValueError(f"Give each client's number of examples (at least 1 each), got {examples!r}.")
    return examples


def secure_mean(updates: Sequence[SharedUpdate], secagg: SecAgg = SecAgg(), seed: int = 0) -> SharedUpdate:
    """What the server unmasks after a SecAgg+ round of FedSGD clients, without the network.

    Each client's arrays (sent as float64, as :func:`gilib.federated.client_app`
    does) are scaled by its ratio and quantised with Flower's own
    ``quantize``; the integer sum is dequantised and divided by the total
    weight, as ``SecAggPlusWorkflow``'s unmask stage does, and delivered in
    float32 with every client's lengths and labels, in client order.

    Args:
        updates: one :class:`~gilib.update.SharedUpdate` per client.
        secagg: the round's settings.
        seed: seeds the stochastic rounding (Flower draws from NumPy's
            global generator; here a seeded one, so two runs agree).

    Raises:
        ValueError: for no updates, updates of different shapes, or a reply
            outside the clipping range (Flower would clip it silently and
            the mean would be wrong: widen ``clipping_range``).
    """
    if not updates:
        raise ValueError("secure_mean needs at least one client's update.")
    shapes = [tuple(g.shape) for g in updates[0].shared_grads]
    for i, u in enumerate(updates):
        if [tuple(g.shape) for g in u.shared_grads] != shapes:
            raise ValueError(f"Client {i}'s update does not have client 0's tensors {shapes}: every client "
                             f"must share the same selection.")
    examples = [len(u.lengths) for u in updates]
    ratios = secagg.ratios(examples)
    c, levels = secagg.clipping_range, secagg.quantization_range
    generator = np.random.default_rng(seed)
    total = [np.zeros(s, dtype=np.int64) for s in shapes]
    for u, ratio in zip(updates, ratios):
        for k, g in enumerate(u.shared_grads):
            value = g.detach().cpu().double().numpy() * ratio
            if np.abs(value).max() > c:
                raise ValueError(f"A client's reply holds {np.abs(value).max():.3g}, outside SecAgg+'s "
                                 f"clipping range {c}: Flower would clip it. Widen clipping_range.")
            total[k] += _stochastic_round((value + c) * levels / (2 * c), generator)
    n = len(updates)
    # Dequantise the sum (Flower: * 2c / R - c, then - (N - 1) c), divide by the total weight.
    mean = [torch.from_numpy(((t * (2 * c / levels) - n * c) / sum(ratios)).astype(np.float32)) for t in total]
    labels = None if any(u.labels is None for u in updates) else torch.cat([torch.as_tensor(u.labels)
                                                                           for u in updates])
    lengths = [int(m) for u in updates for m in u.lengths]
    return SharedUpdate(mean, labels, lengths)


def _stochastic_round(values: np.ndarray, generator: np.random.Generator) -> np.ndarray:
    """Flower's stochastic rounding (``flwr.common.secure_aggregation.quantization``), seeded."""
    up = np.ceil(values)
    return (up - (generator.random(values.shape) < up - values)).astype(np.int64)
