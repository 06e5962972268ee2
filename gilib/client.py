"""The client side of the threat model, written once: what a client sends.

A client holds a private batch (``true_batch``: token ids, attention mask,
labels) and the current model. One round of training turns them into an
update, and that update, restricted to a selection of parameters
(:mod:`gilib.selection`), is all the server receives: a
:class:`~gilib.update.SharedUpdate` of gradients, labels and lengths, as in
LAMP's threat model (Balunovic et al., NeurIPS 2022) and the
partial-gradient paper (Li, Xu and Dras, EMNLP 2024). Four protocols:

* plain (FedSGD): the gradient of the batch's mean cross-entropy;
* :class:`DPSGD`: DP-SGD's privatised gradient (Abadi et al., CCS 2016),
  per-example clipping and Gaussian noise through Opacus
  (:func:`gilib.dp.dp_sgd_step`), or the raw gradient read before
  privatisation (local DP: the client adds the noise);
* :class:`CentralDP`: the client clips each example's gradient and sends
  their clipped mean *without* noise; the server adds the noise to the
  aggregate (:meth:`CentralDP.aggregate`), as DP-FedAvg (McMahan et al.,
  ICLR 2018) and Flower's server-side DP do;
* :class:`FedAvg`: ``E`` local SGD steps on the batch (McMahan et al.,
  AISTATS 2017); the client sends the weight difference, which the server
  divides by the public ``lr * E`` (the mean local gradient; the gradient
  itself at ``E = 1``);
* :class:`AdamW`: ``E`` local AdamW steps (Loshchilov and Hutter, ICLR
  2019), how transformers are fine-tuned; the client sends the weight
  difference over ``lr * E`` as for FedAvg. One step is an elementwise,
  invertible map of the gradient, which the server undoes with
  :meth:`AdamW.gradient` (weight decay and every setting are public).

A decoder client (a GPT-2-style victim, :func:`gilib.models.is_decoder`)
fine-tunes a language model, as federated LM fine-tuning does: its loss is
the next-token cross-entropy (each position predicts the following token,
padding ignored), its batch (:func:`gilib.models.encode_lm`) has no class
labels, and its message's ``labels`` are ``None``. The same protocols run
on it through the same code (:func:`training_loss`): plain, FedAvg and
AdamW; DP-SGD's per-example clipping is not wired for the decoder's loss
and is refused.

Every chapter, study, benchmark and test computes a client's update here.
The client's truth stays with the caller: it reaches the metrics, never an
attack.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Sequence, Union

import torch

from .dp import DPGradients, central_aggregate, check_dp_settings, dp_sgd_step
from .models import is_decoder
from .selection import Selection
from .update import SharedUpdate, check_labels, checked_update

READINGS = ("privatised", "raw")
PRECISIONS = ("float32", "float64")
ADAMW_PRECISIONS = ("float32", "bfloat16", "float64")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}


@dataclass(frozen=True)
class DPSGD:
    """A DP-SGD client step.

    Attributes:
        noise_multiplier: ``sigma``; 0 clips without noise.
        max_grad_norm: ``C``, the per-example clipping norm over every
            parameter.
        seed: seeds the Gaussian noise.
        reading: ``"privatised"`` (what a DP-SGD client sends: ``p.grad``
            after the DP optimizer's ``pre_step()``) or ``"raw"`` (``p.grad``
            right after ``backward()``, what the partial-gradient paper's
            code attacks).
    """

    noise_multiplier: float
    max_grad_norm: float = 1.0
    seed: int = 0
    reading: str = "privatised"

    def __post_init__(self) -> None:
        check_dp_settings(self.noise_multiplier, self.max_grad_norm)
        if self.reading not in READINGS:
            raise ValueError(f"Unknown DP reading {self.reading!r}: use 'privatised' (what the client sends) "
                             f"or 'raw' (p.grad right after backward()).")

    def noise_std(self, batch_size: int) -> float:
        """The standard deviation of each entry's noise in the message: ``sigma * C / B``.

        Opacus adds ``N(0, sigma^2 C^2)`` to the sum of the clipped
        per-example gradients and divides by the batch size.
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a whole number of sentences (at least 1), got {batch_size!r}.")
        return self.noise_multiplier * self.max_grad_norm / batch_size

    def entry_weights(self, update: SharedUpdate) -> list[torch.Tensor]:
        """``1 / noise^2`` per entry, the same for every entry, for :func:`gilib.attack.span_attack`'s ``weights``.

        Pass ``clipped=True`` with them: clipping scales the message by a
        factor the server does not see.

        Raises:
            ValueError: without noise (``sigma = 0``: the message is the
                clipped gradient, attack it without weights) or for a
                message read ``"raw"`` (it carries no noise).
        """
        if self.noise_multiplier == 0 or self.reading == "raw":
            raise ValueError("This DP-SGD message carries no noise (sigma = 0 or the raw reading): attack it "
                             "without weights.")
        weight = self.noise_std(len(update.lengths)) ** -2
        return [torch.full(tuple(g.shape), weight, dtype=torch.float64) for g in update.shared_grads]


@dataclass(frozen=True)
class CentralDP:
    """Central DP: the client clips, the server adds the noise.

    The client runs DP-SGD's clipping (per example, at ``C`` over every
    parameter) and sends the clipped mean ``(1 / B) sum_i clip_C(g_i)`` with
    no noise; the server adds ``N(0, sigma^2 C^2 I)`` to the sum over its
    clients (:meth:`aggregate`, :func:`gilib.dp.central_aggregate`). This is
    central (trusted-server) DP, as in DP-FedAvg (McMahan et al., ICLR 2018)
    and Flower's server-side DP. DP-FedAvg clips a client's whole update
    (user-level DP); clipping each example, as here, protects each
    sentence (example-level DP), and the two coincide for a client with one
    sentence. The server, which receives the message before its own noise,
    sees the clipped gradient: at one sentence, the raw gradient times
    ``min(1, C / ||g||)``.

    Attributes:
        noise_multiplier: ``sigma``, the noise the *server* adds (the
            client's message does not depend on it).
        max_grad_norm: ``C``, the per-example clipping norm.
        seed: seeds the server's noise.
    """

    noise_multiplier: float
    max_grad_norm: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        check_dp_settings(self.noise_multiplier, self.max_grad_norm)

    def aggregate(self, updates: Sequence[SharedUpdate]) -> list[torch.Tensor]:
        """The server's noisy mean of its clients' messages (each weighted by its batch size)."""
        return central_aggregate([u.shared_grads for u in updates], [len(u.lengths) for u in updates],
                                 noise_multiplier=self.noise_multiplier, max_grad_norm=self.max_grad_norm,
                                 seed=self.seed)


def _positive_number(value, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{what} must be a positive number, got {value!r}.")


def _local_steps(value, protocol: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{protocol} needs local_steps >= 1 (a whole number), got {value!r}.")


@dataclass(frozen=True)
class FedAvg:
    """FedAvg's client update: ``local_steps`` SGD steps on the private batch.

    Attributes:
        local_steps: ``E``, full-batch SGD steps (at least 1).
        lr: the local learning rate (positive).
        precision: ``"float32"`` (the model's own arithmetic, what a client
            does) or ``"float64"`` (local training in double precision, the
            update sent in the model's dtype): a control that separates what
            the local steps change from float32's rounding of small steps
            (an SGD step of ``1e-5 * 1e-4`` is below the spacing of float32
            numbers near a weight of 0.05).
    """

    local_steps: int = 1
    lr: float = 1e-4
    precision: str = "float32"

    def __post_init__(self) -> None:
        _local_steps(self.local_steps, "FedAvg")
        _positive_number(self.lr, "FedAvg's learning rate")
        if self.precision not in PRECISIONS:
            raise ValueError(f"Unknown precision {self.precision!r}: use 'float32' or 'float64'.")

    def noise(self, update: SharedUpdate, model: torch.nn.Module, selection: Selection) -> list[torch.Tensor]:
        """The server's noise model of this client's message: each entry's largest error, in float64.

        Every local step rounds the weight to its float32 grid, an error of
        at most half a spacing ``s``; over ``E`` steps divided by ``lr E``,
        the message's entry is the mean gradient to within ``s / (2 lr)``
        (0 where no step moved the weight: the gradient was below it).
        Local training in float64 leaves only the message's own float32
        rounding (relative, about ``6e-8``).

        Raises:
            ValueError: if the message does not fit these settings: in
                float32, more than 1 % of its non-zero entries smaller than
                a quarter of one grid step (a wrong ``lr`` or ``local_steps``).
        """
        bounds = []
        for message, start in zip(update.shared_grads, selection.parameters(model)):
            if self.precision == "float64":
                bounds.append(message.detach().double().abs() * 2.0 ** -24 + 1e-300)
                continue
            bound = float32_spacing(start) / (2 * self.lr)
            moved = message.detach().double().abs()
            # A moved entry travelled at least half a spacing in E steps.
            small = (moved > 0) & (moved < bound / (2 * self.local_steps))
            if moved.count_nonzero() and float(small.sum()) > 0.01 * float(moved.count_nonzero()):
                raise ValueError(
                    f"The message does not fit FedAvg(local_steps={self.local_steps}, lr={self.lr:g}) in float32: "
                    f"{int(small.sum())} of its non-zero entries are smaller than a quarter of one float32 step "
                    f"at that learning rate. Give the client's own lr and local_steps.")
            bounds.append(bound)
        return bounds

    def entry_weights(self, update: SharedUpdate, model: torch.nn.Module, selection: Selection) -> list[torch.Tensor]:
        """``1 / noise^2`` per entry (:meth:`noise`), for :func:`gilib.attack.span_attack`'s ``weights``."""
        return [_weights_from_noise(n) for n in self.noise(update, model, selection)]

    def noise_std(self, update: SharedUpdate, model: torch.nn.Module, selection: Selection, name: str) -> float:
        """One standard deviation for every entry of a shared weight, for :func:`~gilib.attack.span_attack`'s ``noise``.

        The span check of a *batch* takes the noise as one number per entry
        (as SecAgg+'s); this is the root mean square of :meth:`noise`'s
        bounds over the weight ``name``, each entry's error taken as uniform
        within its bound (``bound / sqrt(3)``). Pass the weight the check
        reads: layer 0's query weight (the first query, key or value weight
        of ``selection``).

        Raises:
            ValueError: if ``name`` is not one of ``selection``'s weights,
                or as :meth:`noise`.
        """
        if name not in selection.names:
            raise ValueError(f"{name!r} is not shared in {selection.label}: give one of its weights, the one the "
                             f"span check reads (layer 0's query weight), e.g. {selection.names[0]!r}.")
        bound = self.noise(update, model, selection)[selection.names.index(name)]
        return float(torch.as_tensor(bound, dtype=torch.float64).square().mean().div(3.0).sqrt())


@dataclass(frozen=True)
class AdamW:
    """A client that fine-tunes with ``local_steps`` full-batch AdamW steps.

    The message is ``(theta_0 - theta_E) / (lr * E)`` on the selection, as
    for :class:`FedAvg`. Torch's AdamW step from ``theta`` with gradient
    ``g`` is ``theta - lr * weight_decay * theta - lr * m_hat / (sqrt(v_hat)
    + eps)``; after one step ``m_hat = g`` and ``v_hat = g^2``, so the
    message is ``weight_decay * theta_0 + g / (|g| + eps)``, elementwise and
    invertible (:meth:`gradient`). After several steps the moments mix the
    steps' gradients and no elementwise map undoes them: each entry's step
    is then the ratio of its gradients' running mean to their running root
    mean square, not a function of one gradient and ``eps``, and the one-step
    inversion of a two-step message is off by about the gradient itself.

    Attributes:
        local_steps: ``E``, full-batch AdamW steps (at least 1).
        lr: the local learning rate (transformers are fine-tuned at 2e-5
            to 5e-5).
        betas: AdamW's moment decays, each in ``[0, 1)``.
        eps: the term added to the root of the second moment (positive).
        weight_decay: decoupled weight decay (0 or more), public like the
            other settings.
        precision: the local model's and optimizer's dtype: ``"float32"``,
            ``"bfloat16"`` (as LLM fine-tuning recipes train: 8 bits of
            mantissa) or ``"float64"`` (a control without rounding). The
            message is sent in the model's dtype.
    """

    local_steps: int = 1
    lr: float = 2e-5
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.01
    precision: str = "float32"

    def __post_init__(self) -> None:
        _local_steps(self.local_steps, "AdamW")
        _positive_number(self.lr, "AdamW's learning rate")
        _positive_number(self.eps, "AdamW's eps")
        betas = tuple(self.betas) if isinstance(self.betas, (tuple, list)) else None
        if betas is None or len(betas) != 2 or not all(
                not isinstance(b, bool) and isinstance(b, (int, float)) and 0 <= b < 1 for b in betas):
            raise ValueError(f"AdamW's betas must be two numbers in [0, 1), got {self.betas!r}.")
        object.__setattr__(self, "betas", (float(betas[0]), float(betas[1])))
        wd = self.weight_decay
        if isinstance(wd, bool) or not isinstance(wd, (int, float)) or not math.isfinite(wd) or wd < 0:
            raise ValueError(f"AdamW's weight_decay must be a number of at least 0, got {wd!r}.")
        if self.precision not in ADAMW_PRECISIONS:
            raise ValueError(f"Unknown precision {self.precision!r}: use one of {', '.join(ADAMW_PRECISIONS)}.")

    def noise(self, update: SharedUpdate, model: torch.nn.Module, selection: Selection) -> list[torch.Tensor]:
        """The server's noise model of :meth:`gradient`'s estimate: each entry's error, in float64.

        The step ``u = g / (|g| + eps)`` is known to ``delta = s / lr``
        (``s`` the weight's float32 spacing: the step and its weight decay
        are each rounded to it), so with ``t = 1 - |u|`` the estimate
        ``eps (1 - t) / t`` is off by about ``eps delta / t^2``. Where ``t``
        is within ``2 delta`` of 0 (a gradient far above ``eps``) only the
        sign survives: the noise is infinite there, the entry missing. In
        float64 the step is exact to the message's own float32 rounding.
        bfloat16 training rounds to a grid 65536 times coarser.

        Raises:
            ValueError: for a message of several local steps, as :meth:`gradient`.
        """
        return self._noise(self._steps(update, model, selection), selection.parameters(model))

    def _noise(self, steps: list[torch.Tensor], starts: list[torch.Tensor]) -> list[torch.Tensor]:
        """:meth:`noise` from the steps ``u`` (:meth:`_steps`) and the weights ``theta_0`` they start from."""
        bounds = []
        for u, start in zip(steps, starts):
            t = 1 - u.abs()
            if self.precision == "float64":
                delta = u.abs() * 2.0 ** -24 + 1e-300
            else:
                delta = float32_spacing(start) / self.lr * (2.0 ** 16 if self.precision == "bfloat16" else 1.0)
            bound = self.eps * delta / t.clamp_min(1e-300) ** 2
            bounds.append(torch.where(t > 2 * delta, bound, torch.full_like(bound, float("inf"))))
        return bounds

    def entry_weights(self, update: SharedUpdate, model: torch.nn.Module, selection: Selection) -> list[torch.Tensor]:
        """Which entries of :meth:`gradient`'s estimate to trust, for :func:`gilib.attack.span_attack`'s ``weights``.

        1 where the estimate's error is below a fifth of its size, 0
        elsewhere (a missing entry). Binary on purpose: the estimate's error
        grows as ``1 / t^2`` and spans many orders of magnitude, and a fit
        weighted by ``1 / noise^2`` follows the few tiniest gradients instead
        of the sentence. (A fifth, not a half: on six of the bench's
        sentences at lr 5e-5 the half kept noisier entries and no sentence
        came back; the fifth keeps about two thirds of the entries.)
        """
        steps = self._steps(update, model, selection)
        noise = self._noise(steps, selection.parameters(model))
        return [((_inverse_step(u, self.eps).abs() > 5 * n) & torch.isfinite(n)).double()
                for u, n in zip(steps, noise)]

    def _steps(self, update: SharedUpdate, model: torch.nn.Module, selection: Selection) -> list[torch.Tensor]:
        """The normalised step ``u = message - weight_decay * theta_0`` of each shared tensor, in float64.

        Raises:
            ValueError: for a message of several local steps.
        """
        if self.local_steps != 1:
            raise ValueError(f"Only one AdamW step is invertible elementwise; this client took "
                             f"{self.local_steps}. Attack the message itself, or use local_steps=1.")
        return [message.detach().double() - self.weight_decay * start.detach().double()
                for message, start in zip(update.shared_grads, selection.parameters(model))]

    def gradient(self, update: SharedUpdate, model: torch.nn.Module, selection: Selection) -> SharedUpdate:
        """The server's inversion of one AdamW step: the client's gradient, from its message.

        ``u = g / (|g| + eps)`` (:meth:`_steps`), so ``g = sign(u) * eps *
        |u| / (1 - |u|)``. Only entries with ``|u| < 1`` are invertible:
        where rounding pushed ``|u|`` to 1 or past it (a gradient much larger
        than ``eps``, whose step rounds to the learning rate itself), the
        magnitude is lost and the entry is set to the largest magnitude the
        others show, with its sign. Computed in float64 and returned in the
        model's dtype.

        Args:
            update: the client's message (``client_update(..., AdamW(...)).shared``).
            model: the model the round started from (``theta_0``), as the server holds it.
            selection: the selection the message covers.

        Returns:
            The update with its tensors replaced by the gradients.

        Raises:
            ValueError: for a message of several local steps (the moments
                then mix the steps' gradients).
        """
        grads = []
        for message, u in zip(update.shared_grads, self._steps(update, model, selection)):
            inside = u.abs() < 1
            magnitude = _inverse_step(u, self.eps).abs()
            ceiling = magnitude.max() if inside.any() else torch.tensor(1.0, dtype=u.dtype)
            magnitude = torch.where(inside, magnitude, ceiling)
            grads.append((u.sign() * magnitude).to(message.dtype))
        return update._replace(shared_grads=grads)


def _inverse_step(u: torch.Tensor, eps: float) -> torch.Tensor:
    """``g`` with ``g / (|g| + eps) = u``, for ``|u| < 1`` (0 elsewhere: the magnitude is lost)."""
    inside = u.abs() < 1
    return torch.where(inside, eps * u / (1 - u.abs().clamp(max=1 - 1e-16)), torch.zeros_like(u))


def float32_spacing(weights: torch.Tensor) -> torch.Tensor:
    """The gap from each float32 weight to the next float32 number away from zero, in float64.

    An SGD step ``lr * g`` smaller than half of it is rounded away; a larger
    one lands on this grid. The server knows it: it sent the weights.
    """
    magnitude = weights.detach().float().abs()
    return (torch.nextafter(magnitude, torch.full_like(magnitude, float("inf"))) - magnitude).double()


def _weights_from_noise(noise: torch.Tensor) -> torch.Tensor:
    """Entry weights ``1 / noise^2`` (0 where the noise is infinite: the entry is missing)."""
    return torch.where(torch.isfinite(noise) & (noise > 0), noise.clamp_min(1e-300) ** -2, torch.zeros_like(noise))


Protocol = Union[None, DPSGD, CentralDP, FedAvg, AdamW]
"""``None`` for the plain gradient, else a :class:`DPSGD`, :class:`CentralDP`, :class:`FedAvg` or :class:`AdamW`."""


@dataclass
class ClientUpdate:
    """A client's update: the message the server receives, and the client's own view.

    Attributes:
        shared: what the server receives (gradients, labels, lengths).
        dp: for a :class:`DPSGD` or :class:`CentralDP` client, both
            readings of its step (for central DP the "privatised" one is the
            clipped, un-noised message) and the per-example norms; the
            client's measurements, never sent.
    """

    shared: SharedUpdate
    dp: DPGradients | None = None


def client_update(
    model: torch.nn.Module,
    selection: Selection,
    true_batch: dict[str, torch.Tensor],
    protocol: Protocol = None,
) -> ClientUpdate:
    """The update a client computes on its private batch, restricted to ``selection``.

    Args:
        model: the current model, as the client receives it (``eval()``
            mode: no dropout); left unchanged.
        selection: which parameters' update the client shares.
        true_batch: ``input_ids``, ``attention_mask`` ``(B, T)`` and
            ``labels`` ``(B,)``, as :func:`gilib.models.encode` returns them;
            for a decoder ``input_ids`` and ``attention_mask`` only
            (:func:`gilib.models.encode_lm`): the next-token labels come
            from the ids (:func:`lm_labels`).
        protocol: ``None`` (the plain gradient), :class:`DPSGD`,
            :class:`CentralDP`, :class:`FedAvg` or :class:`AdamW`
            (a decoder: ``None``, :class:`FedAvg` or :class:`AdamW`).

    Returns:
        A :class:`ClientUpdate`; its ``shared`` is the server's message
        (``labels`` ``None`` for a decoder: it has no classes).

    Raises:
        ValueError: for a batch the model cannot take (missing fields,
            sentences longer than its position table, labels outside its
            classes, class labels given to a decoder), an unknown protocol,
            or DP-SGD on a decoder.
    """
    labels, lengths = _checked_batch(model, true_batch)
    if is_decoder(model) and isinstance(protocol, (DPSGD, CentralDP)):
        raise ValueError(f"{type(protocol).__name__} is not available for a decoder: per-example clipping is "
                         f"wired for the classifiers' loss only. Use protocol=None, FedAvg(...) or AdamW(...).")
    if protocol is None:
        loss = training_loss(model, true_batch)
        grads = [g.detach() for g in torch.autograd.grad(loss, selection.parameters(model))]
        return ClientUpdate(SharedUpdate(grads, labels, lengths))
    if isinstance(protocol, DPSGD):
        step = dp_sgd_step(model, selection, true_batch, noise_multiplier=protocol.noise_multiplier,
                           max_grad_norm=protocol.max_grad_norm, seed=protocol.seed)
        grads = step.privatised if protocol.reading == "privatised" else step.raw
        return ClientUpdate(SharedUpdate(grads, labels, lengths), dp=step)
    if isinstance(protocol, CentralDP):
        # The client's half of central DP: DP-SGD's clipping, no noise (the server adds it).
        step = dp_sgd_step(model, selection, true_batch, noise_multiplier=0.0,
                           max_grad_norm=protocol.max_grad_norm, seed=protocol.seed)
        return ClientUpdate(SharedUpdate(step.privatised, labels, lengths), dp=step)
    if isinstance(protocol, (FedAvg, AdamW)):
        return ClientUpdate(SharedUpdate(_local_training(model, selection, true_batch, protocol), labels, lengths))
    raise ValueError(f"Unknown protocol {protocol!r}: pass None (plain gradient), DPSGD(...), CentralDP(...), "
                     f"FedAvg(...) or AdamW(...).")


def replay_mismatch(model: torch.nn.Module, selection: Selection, candidate_batch: dict[str, torch.Tensor],
                    protocol: Protocol, update: SharedUpdate) -> float:
    """The share of a message's entries that a candidate batch, sent through the same protocol, does not reproduce.

    The server knows the protocol's settings and every weight it sent, so
    it can replay the client's update on a guess (:func:`client_update`
    with ``candidate_batch``) and compare the result with the message entry
    by entry. The client's own batch reproduces a plain gradient, a FedAvg
    or an AdamW message to the last bit, float32 rounding included, where a
    noise model (:meth:`FedAvg.entry_weights`) only says that it lies
    closer to the message than a wrong guess: 0.0 certifies the guess
    without the client's data. A guess with a wrong token changes the
    gradient of every entry it reaches. Bit for bit needs the client's
    arithmetic: the same float32 sums, which a different thread count or
    machine may order differently; such a replay moves entries that lie at
    a rounding boundary, a share near 0 but not 0.

    Args:
        model: the global model the client received (left unchanged).
        selection: the weights the message covers.
        candidate_batch: the guess, as :func:`client_update` takes a batch
            (``input_ids``, ``attention_mask``, ``labels``): try each label
            where the message does not say it.
        protocol: the client's protocol: ``None``, :class:`FedAvg` or :class:`AdamW`.
        update: the message.

    Returns:
        The share of entries, over every shared tensor, whose replayed value
        differs from the message's (0.0 to 1.0).

    Raises:
        ValueError: for a DP protocol (its noise is the client's secret, so
            no replay reproduces it), or a message that does not fit the
            selection (:func:`gilib.update.checked_update`, as every attack
            checks it).
    """
    if isinstance(protocol, (DPSGD, CentralDP)):
        raise ValueError(f"A {type(protocol).__name__} message holds the client's clipping of every example (and "
                         f"DP-SGD its secret noise): a replay cannot reproduce it. Replay plain, FedAvg or AdamW "
                         f"messages; judge a DP message under its noise model (entry_weights).")
    update = checked_update(update, model, selection)  # the attacks' check: count, shapes, dtype, values
    replayed = client_update(model, selection, candidate_batch, protocol).shared.shared_grads
    differ = sum(int((a != b).sum()) for a, b in zip(replayed, update.shared_grads))
    return differ / sum(g.numel() for g in update.shared_grads)


def _local_training(model: torch.nn.Module, selection: Selection, true_batch: dict,
                    protocol: FedAvg | AdamW) -> list:
    """``(theta_0 - theta_E) / (lr * E)`` on the selection, after E full-batch SGD or AdamW steps on a copy."""
    local = copy.deepcopy(model)
    if protocol.precision != "float32":
        local = local.to(_DTYPES[protocol.precision])
    params = [p for p in local.parameters() if p.requires_grad]
    start = [p.detach().clone() for p in selection.parameters(local)]
    if isinstance(protocol, AdamW):
        optimizer = torch.optim.AdamW(params, lr=protocol.lr, betas=protocol.betas, eps=protocol.eps,
                                      weight_decay=protocol.weight_decay, foreach=False)
    for _ in range(protocol.local_steps):
        loss = training_loss(local, true_batch)
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            if isinstance(protocol, AdamW):
                for p, g in zip(params, grads):
                    p.grad = g
                optimizer.step()
            else:
                for p, g in zip(params, grads):
                    p -= protocol.lr * g
    scale = protocol.lr * protocol.local_steps
    return [((before - after.detach()) / scale).to(p.dtype)
            for before, after, p in zip(start, selection.parameters(local), selection.parameters(model))]


def lm_labels(true_batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """A decoder batch's next-token labels: ``(B, T)``, the ids with ``-100`` (ignored) on padding.

    ``GPT2LMHeadModel`` shifts them itself: position ``p``'s logits are
    scored against the token at ``p + 1``, and the last real token's logits
    against nothing.
    """
    return true_batch["input_ids"].masked_fill(true_batch["attention_mask"] == 0, -100)


def training_loss(model: torch.nn.Module, true_batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The loss a client trains on: one function for every protocol.

    A classifier's mean cross-entropy over the batch's labels; a decoder's
    next-token cross-entropy, the mean over every predicted token of the
    batch (:func:`lm_labels`), as ``GPT2LMHeadModel`` computes it.
    """
    if is_decoder(model):
        return model(input_ids=true_batch["input_ids"], attention_mask=true_batch["attention_mask"],
                     labels=lm_labels(true_batch)).loss
    return model(**true_batch).loss


def _checked_batch(model: torch.nn.Module, true_batch: dict) -> tuple[torch.Tensor | None, list[int]]:
    """The batch's labels (``None`` for a decoder) and lengths, after checking that the model can take it."""
    decoder = is_decoder(model)
    if decoder and "labels" in true_batch:
        raise ValueError("A decoder learns the next token and has no class labels, but this batch carries "
                         "'labels': build it with gilib.models.encode_lm(tokenizer, texts) (no labels); the "
                         "client derives the next-token labels from the ids.")
    fields = ("input_ids", "attention_mask") if decoder else ("input_ids", "attention_mask", "labels")
    missing = [k for k in fields if k not in true_batch]
    if missing:
        how = "encode_lm(tokenizer, texts)" if decoder else "encode(tokenizer, texts, labels)"
        raise ValueError(f"The client's batch lacks {missing}: build it with gilib.models.{how}.")
    ids = true_batch["input_ids"]
    if ids.dim() != 2 or ids.shape[0] == 0:
        raise ValueError(f"input_ids must be (B, T) with at least one sentence, got shape {tuple(ids.shape)}.")
    max_tokens = model.config.max_position_embeddings
    if ids.shape[1] > max_tokens:
        raise ValueError(
            f"The batch has {ids.shape[1]} tokens per sentence but this model takes at most {max_tokens}; "
            f"use shorter sentences or a larger model."
        )
    labels = None if decoder else check_labels(model, true_batch["labels"], ids.shape[0])
    lengths = [int(n) for n in true_batch["attention_mask"].sum(dim=1)]
    return labels, lengths
