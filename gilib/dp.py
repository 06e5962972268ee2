"""DP-SGD as a client really runs it: the gradient it sends, its privacy budget, its cost.

DP-SGD (Abadi et al., "Deep Learning with Differential Privacy", CCS 2016)
clips every example's gradient to norm ``C`` (the norm over *all* trainable
parameters) and adds Gaussian noise of standard deviation ``sigma * C`` to
their sum. We run it through Opacus (Yousefpour et al., 2021), whose
optimizer does this in ``pre_step()``: after ``backward()``, ``p.grad``
still holds the raw gradient, and only ``pre_step()`` replaces it with the
privatised one.

That ordering is why "DP gives limited protection" has two readings. An
attack on ``p.grad`` read right after ``backward()`` (what the
partial-gradient paper's code does) attacks the raw gradient of a model
whose *weights* were trained with DP noise. A DP-SGD client, though, sends
the privatised gradient. :func:`dp_sgd_step` returns both, read at the two
points, restricted to a selection; :class:`gilib.client.DPSGD` is how a
client runs it. :func:`epsilon` is the privacy budget of a run, from
Opacus's RDP accountant. The cost in model quality is measured by
:mod:`gilib.studies.dp_cost`.

Central DP moves the noise to the server, as DP-FedAvg (McMahan et al.,
"Learning Differentially Private Recurrent Language Models", ICLR 2018)
and Flower's server-side DP do: the client sends its clipped, un-noised
update (:class:`gilib.client.CentralDP`), and :func:`central_aggregate`
adds the Gaussian noise ``sigma * C`` once, to the sum of the clients'
clipped updates. A server that attacks what it receives sees no noise at
all; that is where the "raw gradient" reading is the right one.

BERT under Opacus needs explicit ``position_ids`` and ``token_type_ids`` of
the batch's shape: the model otherwise broadcasts one ``(1, T)`` lookup over
the batch, and the position table gets no per-example gradient.
"""

from __future__ import annotations

import contextlib
import copy
import math
import warnings
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from .selection import Selection


@dataclass
class DPGradients:
    """One DP-SGD client step, read at two points, on a selection.

    Attributes:
        names: the selected parameter names.
        raw: ``p.grad`` right after ``backward()``: the batch-mean gradient,
            unclipped and noiseless (one tensor per name).
        privatised: ``p.grad`` after the DP optimizer's ``pre_step()``:
            ``(sum_i clip_C(g_i) + N(0, sigma^2 C^2)) / B``, what a DP-SGD
            client sends.
        per_example_norms: ``(B,)`` gradient norms over all trainable
            parameters, before clipping.
        noise_multiplier: ``sigma``.
        max_grad_norm: ``C``.
    """

    names: list[str]
    raw: list[torch.Tensor]
    privatised: list[torch.Tensor]
    per_example_norms: torch.Tensor
    noise_multiplier: float
    max_grad_norm: float

    def cosine(self) -> float:
        """Cosine between the raw and the privatised gradient of the selection (flattened)."""
        raw = torch.cat([g.flatten() for g in self.raw])
        priv = torch.cat([g.flatten() for g in self.privatised])
        return float(torch.nn.functional.cosine_similarity(raw, priv, dim=0))


def batch_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The model inputs of a batch with explicit ``position_ids`` and ``token_type_ids`` of shape ``(B, T)``.

    Opacus computes per-example gradients from each layer's per-example
    activations; a position lookup broadcast from ``(1, T)`` has none.
    """
    ids = batch["input_ids"]
    return {
        "input_ids": ids,
        "attention_mask": batch["attention_mask"],
        "token_type_ids": batch.get("token_type_ids", torch.zeros_like(ids)),
        "position_ids": torch.arange(ids.shape[1], device=ids.device).expand_as(ids).contiguous(),
    }


def _without_dropout(module: torch.nn.Module) -> torch.nn.Module:
    """``module`` in training mode with every dropout rate set to 0.

    Opacus records per-example activations only in training mode, while the
    client of this book computes its gradient deterministically, as in
    ``eval()`` mode; for BERT the two modes differ only in dropout.
    """
    module.train()
    for m in module.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    return module


def check_dp_settings(noise_multiplier: float, max_grad_norm: float) -> None:
    """Refuse a noise multiplier below 0 and a clipping norm that is not positive (NaN included)."""
    for name, value in (("noise_multiplier (sigma)", noise_multiplier), ("max_grad_norm (C)", max_grad_norm)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{name} must be a number, got {value!r}.")
    if not noise_multiplier >= 0 or not math.isfinite(noise_multiplier):
        raise ValueError(f"noise_multiplier (sigma) must be 0 or more, got {noise_multiplier}.")
    if not max_grad_norm > 0 or not math.isfinite(max_grad_norm):
        raise ValueError(f"max_grad_norm (C) must be positive, got {max_grad_norm}.")


GRAD_SAMPLE_MODES = ("hooks", "ghost")


def make_private(module: torch.nn.Module, optimizer: torch.optim.Optimizer, loader, noise_multiplier: float,
                  max_grad_norm: float, seed: int, poisson: bool, grad_sample_mode: str = "hooks"):
    """Opacus's ``make_private`` with seeded noise.

    Args:
        grad_sample_mode: ``"hooks"`` (per-example gradients, Opacus's
            default) or ``"ghost"`` (ghost clipping, Li et al., ICLR 2022:
            per-example norms without per-example gradients, then a second
            backward pass; much less memory, the same clipped sum).

    Returns:
        ``(wrapped module, DP optimizer, loader)``; with ``"ghost"``,
        ``(wrapped module, DP optimizer, criterion, loader)``, where the
        loss must come from ``criterion(logits, labels)``, as in Opacus.
    """
    if grad_sample_mode not in GRAD_SAMPLE_MODES:
        raise ValueError(f"grad_sample_mode must be one of {GRAD_SAMPLE_MODES}, got {grad_sample_mode!r}.")
    extra = {"criterion": torch.nn.CrossEntropyLoss(), "grad_sample_mode": "ghost"} if grad_sample_mode == "ghost" \
        else {}
    # Here, not at the top: Opacus (and SciPy with it) is the slowest import of gilib.client, and only DP
    # clients need it (a Flower client process or a chapter without DP starts without it).
    from opacus import PrivacyEngine

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the secure-RNG notice: seeded noise is what reproducibility needs
        engine = PrivacyEngine(accountant="rdp")
        return engine.make_private(
            module=module,
            optimizer=optimizer,
            data_loader=loader,
            noise_multiplier=noise_multiplier,
            max_grad_norm=max_grad_norm,
            poisson_sampling=poisson,
            noise_generator=torch.Generator().manual_seed(seed),
            **extra,
        )


@contextlib.contextmanager
def quiet_hooks() -> Iterator[None]:
    """Silence Opacus's notice on a backward pass through its hooks.

    Opacus's full backward hooks warn when the module's input needs no
    gradient (token ids, or a frozen base under LoRA adapters): expected
    here, and otherwise printed into every chapter that runs a DP client.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)
        yield


def _private(module: torch.nn.Module, dataset, batch_size: int, noise_multiplier: float, max_grad_norm: float,
             seed: int, lr: float, poisson: bool):
    """A DP-SGD (plain SGD) client over ``dataset``: ``(wrapped module, DP optimizer, loader)``."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size)
    optimizer = torch.optim.SGD(module.parameters(), lr=lr)
    return make_private(module, optimizer, loader, noise_multiplier, max_grad_norm, seed, poisson)


def dp_sgd_step(
    model: torch.nn.Module,
    selection: Selection,
    true_batch: dict[str, torch.Tensor],
    *,
    noise_multiplier: float,
    max_grad_norm: float = 1.0,
    seed: int = 0,
) -> DPGradients:
    """One DP-SGD step of a client, read before and after privatisation.

    Call it through :func:`gilib.client.client_update` with a
    :class:`gilib.client.DPSGD` protocol, which returns the reading the
    client sends as the server's message.

    The client's model is a copy (Opacus hooks into the modules it wraps);
    the caller's model is left as it was. Every parameter is trainable, so
    clipping uses the norm over all of them, as DP-SGD prescribes.

    Args:
        model: the victim, as the client holds it; the step runs without
            dropout, like the plain client of :mod:`gilib.client`.
        selection: which parameters' gradients to return.
        true_batch: the client's batch (:func:`gilib.models.encode`).
        noise_multiplier: ``sigma``; 0 clips without noise.
        max_grad_norm: ``C``, the per-example clipping norm.
        seed: seeds the Gaussian noise.

    Returns:
        A :class:`DPGradients`.
    """
    check_dp_settings(noise_multiplier, max_grad_norm)
    client = _without_dropout(copy.deepcopy(model))
    for p in client.parameters():
        p.requires_grad_(True)
    inputs = batch_inputs(true_batch)
    labels = true_batch["labels"]
    dataset = torch.utils.data.TensorDataset(*inputs.values(), labels)
    wrapped, optimizer, _ = _private(client, dataset, len(labels), noise_multiplier, max_grad_norm, seed,
                                     lr=0.0, poisson=False)
    optimizer.zero_grad(set_to_none=True)
    with quiet_hooks():
        wrapped(**inputs, labels=labels).loss.backward()
    named = dict(client.named_parameters())
    selected = [named[n] for n in selection.names]
    raw = [p.grad.detach().clone() for p in selected]
    norms = torch.stack([p.grad_sample.flatten(1).square().sum(1) for p in client.parameters()
                         if p.grad_sample is not None]).sum(0).sqrt()
    optimizer.pre_step()  # clip each example, add noise, divide by the batch size: into p.grad
    privatised = [p.grad.detach().clone() for p in selected]
    return DPGradients(list(selection.names), raw, privatised, norms.detach(), float(noise_multiplier),
                       float(max_grad_norm))


def clip_factors(per_example_norms: torch.Tensor, max_grad_norm: float) -> torch.Tensor:
    """The factor DP-SGD scales each example's gradient by: ``min(1, C / (norm + 1e-6))``.

    Opacus clips this way (its ``1e-6`` keeps a zero gradient finite), so
    the privatised gradient of one example without noise is exactly its raw
    gradient times this factor.

    Args:
        per_example_norms: ``(B,)`` gradient norms over all trainable
            parameters, before clipping (:attr:`DPGradients.per_example_norms`).
        max_grad_norm: ``C``.

    Returns:
        ``(B,)`` factors in ``(0, 1]``.
    """
    return (max_grad_norm / (per_example_norms + 1e-6)).clamp(max=1.0)


def central_aggregate(
    updates: Sequence[Sequence[torch.Tensor]],
    batch_sizes: Sequence[int],
    *,
    noise_multiplier: float,
    max_grad_norm: float = 1.0,
    seed: int = 0,
) -> list[torch.Tensor]:
    """The server's side of central DP: the noisy mean of the clients' clipped updates.

    Client ``k`` sends ``u_k = (1 / B_k) sum_i clip_C(g_ki)``, its clipped,
    un-noised update (:class:`gilib.client.CentralDP`, in the batch-mean
    form of every message in gilib). The server adds Gaussian noise of
    standard deviation ``sigma * C`` once, to the sum of the clipped
    per-example gradients, and divides by the number of examples::

        (sum_k B_k u_k + N(0, sigma^2 C^2 I)) / sum_k B_k

    With one client this has the distribution of a DP-SGD client's
    privatised gradient (:func:`dp_sgd_step`); the difference is who
    adds the noise, so who sees the update without it: here the server.

    Args:
        updates: per client, one tensor per selected parameter (the same
            shapes for every client).
        batch_sizes: per client, the examples behind its update (at least 1).
        noise_multiplier: ``sigma``; 0 adds no noise.
        max_grad_norm: ``C``, the clients' per-example clipping norm.
        seed: seeds the server's noise.

    Returns:
        The noisy aggregate, one tensor per selected parameter.

    Raises:
        ValueError: for bad DP settings, no clients, a batch size below 1,
            or updates of different lengths or shapes.
    """
    check_dp_settings(noise_multiplier, max_grad_norm)
    if len(updates) == 0:
        raise ValueError("No client updates to aggregate: pass one list of tensors per client.")
    if len(batch_sizes) != len(updates):
        raise ValueError(f"{len(updates)} client updates but {len(batch_sizes)} batch sizes: give one per client.")
    for size in batch_sizes:
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"Each client's batch size is a whole number, at least 1; got {size!r}.")
    shapes = [tuple(t.shape) for t in updates[0]]
    for k, update in enumerate(updates):
        if [tuple(t.shape) for t in update] != shapes:
            raise ValueError(f"Client {k}'s update has shapes {[tuple(t.shape) for t in update]}, "
                             f"client 0's {shapes}: every client must send the same selection.")
    total = sum(batch_sizes)
    generator = torch.Generator().manual_seed(seed)
    std = float(noise_multiplier) * float(max_grad_norm)
    out = []
    for i, reference in enumerate(updates[0]):
        summed = sum(update[i].detach() * size for update, size in zip(updates, batch_sizes))
        noise = torch.normal(0.0, std, size=reference.shape, generator=generator, dtype=reference.dtype)
        out.append((summed + noise.to(reference.device)) / total)
    return out


def epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float = 1e-5) -> float:
    """The privacy budget of DP-SGD, from Opacus's RDP accountant.

    Args:
        noise_multiplier: ``sigma``; 0 gives no privacy (``inf``).
        sample_rate: batch size over dataset size (Poisson sampling).
        steps: optimizer steps.
        delta: the ``delta`` of ``(epsilon, delta)``-DP.

    Returns:
        ``epsilon``.
    """
    if not 0 < sample_rate <= 1:
        raise ValueError(f"sample_rate must lie in (0, 1], got {sample_rate}.")
    if steps < 1 or not 0 < delta < 1:
        raise ValueError(f"need steps >= 1 and 0 < delta < 1, got {steps} and {delta}.")
    if noise_multiplier == 0:
        return math.inf
    from opacus.accountants import RDPAccountant  # only here: see make_private

    accountant = RDPAccountant()
    accountant.history = [(float(noise_multiplier), float(sample_rate), int(steps))]
    return float(accountant.get_epsilon(delta=delta))
