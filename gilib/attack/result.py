"""What an attack returns: the same :class:`AttackResult` for both attacks, with typed diagnostics.

Both :func:`gilib.attack.optimization_attack` and
:func:`gilib.attack.span_attack` return an :class:`AttackResult`: the
rebuilt sentences, the loss of what was returned, the seconds it took, the
settings it ran with (``config``) and the seconds per phase (``timings``).
What each attack has to say beyond that lives in its own diagnostics
record: :class:`OptimizationDiagnostics` (the loss at every step) or
:class:`SpanDiagnostics` (the rank of the gradient, the candidate sets, and
for a batch what peeling verified).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class OptimizationDiagnostics:
    """What the optimisation attack saw on its way.

    Attributes:
        loss_history: reconstruction loss at every Adam step.
        seconds_per_step: the attack's seconds over its steps.
    """

    loss_history: list[float]
    seconds_per_step: float


@dataclass
class SpanDiagnostics:
    """What the span check saw.

    Attributes:
        weight: the layer-0 query, key or value weight whose row space was
            checked (on a LoRA victim, the stacked ``A`` adapters' names joined by ``+``).
        verifier: the weight that checked a batch's sentences (layer 1's
            query or value weight, layer 0's FFN weight, or the layer-0
            weight's own output gradients); ``None`` at batch size 1.
        rank: the numerical rank of the weight's gradient.
        min_gap: the smallest gap, over positions, between the last chosen
            and the first rejected token's residual.
        candidates: each interior position's candidate tokens.
        rounds: peeling rounds run (0 at batch size 1); on a decoder, the
            positions the causal search extended.
        found: per sentence of a batch, whether peeling verified it
            (``None`` at batch size 1, where there is no peeling); on a
            decoder, whether the causal search found it whole, at every
            batch size (``None`` without a verifier weight).
        labels: per sentence of a batch, the label its peeling showed
            (``None`` where it was not found; the list is ``None`` at batch size 1).
        uncertain: per sentence of a batch, the positions whose check
            residual stayed high (empty for a verified one; ``None`` at batch size 1).
        timed_out: whether the attack's time budget
            (:attr:`SpanConfig.time_budget <gilib.attack.SpanConfig>`) ended
            peeling before every sentence was found (or, with entry weights,
            the search before its last pass).
        outside: with entry weights (a message seen through known noise),
            the share of the stacked layer-0 message's squared norm outside
            the rebuilt inputs' span: the noise's share when the sentence is
            right; ``None`` otherwise.
        floor_z: at batch size 1 under a noise model (the most likely
            sentence, :mod:`gilib.attack.likelihood`), how far the found
            sentence's distance to the message, under the model's own
            gradient with the clipping factor fitted, sits above the noise
            floor, in the floor's standard deviations
            (:func:`gilib.attack.completion.floor_z`): near 0 (within about
            3) for the client's sentence, higher for a wrong one as far as
            the model tells them apart; ``None`` otherwise.
    """

    weight: str
    verifier: str | None
    rank: int
    min_gap: float
    candidates: list[list[int]]
    rounds: int = 0
    found: list[bool] | None = None
    labels: list[int | None] | None = None
    uncertain: list[list[int]] | None = None
    timed_out: bool = False
    outside: float | None = None
    floor_z: float | None = None


@dataclass
class AttackResult:
    """What an attack rebuilt, and what it cost.

    Attributes:
        texts: one reconstructed sentence per input, without special tokens.
        token_ids: the reconstructed token ids, ``[CLS]`` and ``[SEP]``
            included, one list per sentence (its known length).
        final_loss: the attack's loss on the returned tokens (the gradient
            distance; at batch size 1 the span check's largest residual).
        seconds: wall-clock time of the attack, per client when several
            clients were attacked together.
        method: a short name of the attack (``"optimization/cos"``, ``"span"``).
        config: the settings it ran with (its config's fields).
        timings: seconds spent in each phase (per client, like ``seconds``).
        diagnostics: the attack's own record
            (:class:`OptimizationDiagnostics` or :class:`SpanDiagnostics`).
    """

    texts: list[str]
    token_ids: list[list[int]]
    final_loss: float
    seconds: float
    method: str
    config: dict
    timings: dict[str, float]
    diagnostics: OptimizationDiagnostics | SpanDiagnostics
