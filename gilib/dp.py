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
the privatised gradient. :func:`dp_client_gradients` returns both, read at
the two points, restricted to a selection.

BERT under Opacus needs explicit ``position_ids`` and ``token_type_ids`` of
the batch's shape: the model otherwise broadcasts one ``(1, T)`` lookup over
the batch, and the position table gets no per-example gradient.
"""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from .slicing import Selection


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


def _check_dp_settings(noise_multiplier: float, max_grad_norm: float) -> None:
    if not noise_multiplier >= 0 or not math.isfinite(noise_multiplier):
        raise ValueError(f"noise_multiplier (sigma) must be 0 or more, got {noise_multiplier}.")
    if not max_grad_norm > 0 or not math.isfinite(max_grad_norm):
        raise ValueError(f"max_grad_norm (C) must be positive, got {max_grad_norm}.")


def _make_private(module: torch.nn.Module, optimizer: torch.optim.Optimizer, loader, noise_multiplier: float,
                  max_grad_norm: float, seed: int, poisson: bool):
    """Opacus's ``make_private`` with seeded noise: ``(wrapped module, DP optimizer, loader)``."""
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
        )


def _private(module: torch.nn.Module, dataset, batch_size: int, noise_multiplier: float, max_grad_norm: float,
             seed: int, lr: float, poisson: bool):
    """A DP-SGD (plain SGD) client over ``dataset``: ``(wrapped module, DP optimizer, loader)``."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size)
    optimizer = torch.optim.SGD(module.parameters(), lr=lr)
    return _make_private(module, optimizer, loader, noise_multiplier, max_grad_norm, seed, poisson)


def dp_client_gradients(
    model: torch.nn.Module,
    selection: Selection,
    true_batch: dict[str, torch.Tensor],
    *,
    noise_multiplier: float,
    max_grad_norm: float = 1.0,
    seed: int = 0,
) -> DPGradients:
    """One DP-SGD step of a client, read before and after privatisation.

    The client's model is a copy (Opacus hooks into the modules it wraps);
    the caller's model is left as it was. Every parameter is trainable, so
    clipping uses the norm over all of them, as DP-SGD prescribes.

    Args:
        model: the victim, as the client holds it; the step runs without
            dropout, like :func:`gilib.slicing.client_gradient`.
        selection: which parameters' gradients to return.
        true_batch: the client's batch (:func:`gilib.models.encode`).
        noise_multiplier: ``sigma``; 0 clips without noise.
        max_grad_norm: ``C``, the per-example clipping norm.
        seed: seeds the Gaussian noise.

    Returns:
        A :class:`DPGradients`.
    """
    _check_dp_settings(noise_multiplier, max_grad_norm)
    client = _without_dropout(copy.deepcopy(model))
    for p in client.parameters():
        p.requires_grad_(True)
    inputs = batch_inputs(true_batch)
    labels = true_batch["labels"]
    dataset = torch.utils.data.TensorDataset(*inputs.values(), labels)
    wrapped, optimizer, _ = _private(client, dataset, len(labels), noise_multiplier, max_grad_norm, seed,
                                     lr=0.0, poisson=False)
    optimizer.zero_grad(set_to_none=True)
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
    from opacus.accountants import RDPAccountant

    if not 0 < sample_rate <= 1:
        raise ValueError(f"sample_rate must lie in (0, 1], got {sample_rate}.")
    if steps < 1 or not 0 < delta < 1:
        raise ValueError(f"need steps >= 1 and 0 < delta < 1, got {steps} and {delta}.")
    if noise_multiplier == 0:
        return math.inf
    accountant = RDPAccountant()
    accountant.history = [(float(noise_multiplier), float(sample_rate), int(steps))]
    return float(accountant.get_epsilon(delta=delta))


@dataclass
class Utility:
    """Model quality after DP fine-tuning.

    Attributes:
        accuracy: on the held-out examples.
        mcc: Matthews correlation (CoLA's metric).
        epsilon: the run's privacy budget (``inf`` without noise).
        steps: optimizer steps taken.
        seconds: wall-clock time of training and evaluation.
    """

    accuracy: float
    mcc: float
    epsilon: float
    steps: int
    seconds: float


def matthews(predictions: Sequence[int], labels: Sequence[int]) -> float:
    """Matthews correlation coefficient of binary predictions (0 when undefined)."""
    p, y = np.asarray(predictions), np.asarray(labels)
    tp, tn = float(((p == 1) & (y == 1)).sum()), float(((p == 0) & (y == 0)).sum())
    fp, fn = float(((p == 1) & (y == 0)).sum()), float(((p == 0) & (y == 1)).sum())
    denominator = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return 0.0 if denominator == 0 else (tp * tn - fp * fn) / denominator


def dp_finetune(
    model: torch.nn.Module,
    tokenizer,
    train: Sequence,
    held_out: Sequence,
    *,
    noise_multiplier: float,
    max_grad_norm: float = 1.0,
    steps: int = 300,
    batch_size: int = 32,
    lr: float = 5e-4,
    max_tokens: int = 64,
    delta: float | None = None,
    trainable: str = "all",
    seed: int = 0,
) -> Utility:
    """Fine-tune a copy of ``model`` with DP-SGD and measure it on held-out examples.

    Poisson-sampled batches of expected size ``batch_size`` from ``train``,
    per-example clipping at ``C`` over all trainable parameters, Gaussian
    noise ``sigma * C``, Adam's update on the privatised gradient. The
    word-embedding table is frozen, as is usual for DP fine-tuning;
    ``trainable="top"`` also freezes every encoder layer but the last, which
    makes a CPU run several times cheaper.

    Args:
        model: the starting model (left unchanged).
        tokenizer: its tokenizer.
        train: :class:`gilib.data.Example` s to train on.
        held_out: examples to evaluate on.
        noise_multiplier: ``sigma``.
        max_grad_norm: ``C``.
        steps: optimizer steps.
        batch_size: expected batch size.
        lr: Adam's learning rate.
        max_tokens: sentences are cut to this many tokens.
        delta: for epsilon; default ``1 / len(train)``.
        trainable: ``"all"`` (every parameter but the word embeddings) or
            ``"top"`` (last encoder layer, pooler and classifier).
        seed: seeds sampling, noise and the data order.

    Returns:
        A :class:`Utility`.
    """
    import time

    _check_dp_settings(noise_multiplier, max_grad_norm)
    if len(train) < batch_size:
        raise ValueError(f"Need at least batch_size={batch_size} training examples, got {len(train)}.")
    start = time.perf_counter()
    torch.manual_seed(seed)
    if trainable not in ("all", "top"):
        raise ValueError(f"trainable must be 'all' or 'top', got {trainable!r}.")
    client = copy.deepcopy(model)
    client.train()
    last = f"encoder.layer.{client.config.num_hidden_layers - 1}."
    for name, p in client.named_parameters():
        if trainable == "all":
            p.requires_grad_(not name.endswith("word_embeddings.weight"))
        else:  # the last encoder layer, the pooler and the classifier
            p.requires_grad_(last in name or ".pooler." in name or name.startswith("classifier."))

    def tensors(examples):
        enc = tokenizer([e.text for e in examples], padding="max_length", truncation=True, max_length=max_tokens,
                        return_tensors="pt")
        return enc["input_ids"], enc["attention_mask"], torch.tensor([e.label for e in examples])

    ids, mask, labels = tensors(train)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(ids, mask, labels), batch_size=batch_size,
                                         generator=torch.Generator().manual_seed(seed))
    trainable = [p for p in client.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(trainable, lr=lr)
    wrapped, optimizer, loader = _make_private(client, optimizer, loader, noise_multiplier, max_grad_norm,
                                               seed=seed + 1, poisson=True)
    taken = 0
    while taken < steps:
        for batch_ids, batch_mask, batch_labels in loader:
            if taken == steps:
                break
            optimizer.zero_grad(set_to_none=True)
            if len(batch_labels):  # Poisson sampling can draw an empty batch: Opacus then skips it
                width = int(batch_mask.sum(dim=1).max())  # pad to the batch's longest sentence only
                inputs = batch_inputs({"input_ids": batch_ids[:, :width], "attention_mask": batch_mask[:, :width]})
                wrapped(**inputs, labels=batch_labels).loss.backward()
            optimizer.step()
            taken += 1
    eps = epsilon(noise_multiplier, 1 / len(loader), taken, delta or 1 / len(train))

    client.eval()
    predictions = []
    ids, mask, held_labels = tensors(held_out)
    with torch.no_grad():
        for i in range(0, len(ids), 128):
            width = int(mask[i:i + 128].sum(dim=1).max())
            logits = client(**batch_inputs({"input_ids": ids[i:i + 128, :width],
                                            "attention_mask": mask[i:i + 128, :width]})).logits
            predictions += logits.argmax(dim=-1).tolist()
    accuracy = float(np.mean(np.asarray(predictions) == held_labels.numpy()))
    return Utility(accuracy, matthews(predictions, held_labels.tolist()), eps, taken,
                   time.perf_counter() - start)


def utility_sweep(
    dataset: str,
    noise_multipliers: Sequence[float],
    out,
    *,
    model_name: str = "minilm",
    train_split: str = "train",
    eval_split: str = "validation",
    train_size: int | None = None,
    eval_size: int | None = None,
    steps: int = 300,
    batch_size: int = 32,
    lr: float = 5e-4,
    max_grad_norm: float = 1.0,
    trainable: str = "all",
    seed: int = 0,
    jobs: int = 1,
) -> list[dict]:
    """DP fine-tuning at each noise multiplier; one JSON line per sigma in ``out``, resumable.

    Returns:
        Every line of ``out`` after the run.
    """
    import json
    from pathlib import Path

    from .data import load_split
    from .experiments import read_results

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    settings = dict(model=model_name, dataset=dataset, train_split=train_split, eval_split=eval_split,
                    train_size=train_size, eval_size=eval_size, steps=steps, batch_size=batch_size, lr=lr,
                    max_grad_norm=max_grad_norm, trainable=trainable, seed=seed)
    done = read_results(out)
    have = {(json.dumps(r["settings"], sort_keys=True), r["noise_multiplier"]) for r in done}
    todo = [float(s) for s in noise_multipliers if (json.dumps(settings, sort_keys=True), float(s)) not in have]
    train = list(load_split(dataset, train_split))
    held_out = list(load_split(dataset, eval_split))
    rng = np.random.RandomState(seed)
    if train_size:
        train = [train[i] for i in rng.permutation(len(train))[:train_size]]
    if eval_size:
        held_out = [held_out[i] for i in rng.permutation(len(held_out))[:eval_size]]

    def one(sigma: float) -> dict:
        from .experiments import git_commit
        from .models import load_model

        torch.set_num_threads(1)
        model, tokenizer = load_model(model_name, seed=seed)
        result = dp_finetune(model, tokenizer, train, held_out, noise_multiplier=sigma, max_grad_norm=max_grad_norm,
                             steps=steps, batch_size=batch_size, lr=lr, trainable=trainable, seed=seed)
        return {"settings": settings, "noise_multiplier": sigma, "accuracy": result.accuracy, "mcc": result.mcc,
                "epsilon": result.epsilon, "delta": 1 / len(train), "sample_rate": batch_size / len(train),
                "steps": result.steps, "train_examples": len(train), "eval_examples": len(held_out),
                "seconds": result.seconds, "commit": git_commit()}

    if jobs == 1:
        results = (one(s) for s in todo)
    else:
        from joblib import Parallel, delayed

        results = Parallel(n_jobs=jobs, return_as="generator_unordered")(delayed(one)(s) for s in todo)
    for line in results:
        with out.open("a") as f:
            f.write(json.dumps(line) + "\n")
        print(f"sigma {line['noise_multiplier']}: accuracy {line['accuracy']:.3f}, MCC {line['mcc']:.3f}, "
              f"epsilon {line['epsilon']:.3g}, {line['seconds']:.0f} s")
    return read_results(out)


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m gilib.dp utility ...``: the DP fine-tuning sweep behind chapter 4's utility figure."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m gilib.dp", description="DP-SGD fine-tuning sweeps")
    sub = parser.add_subparsers(dest="command", required=True)
    util = sub.add_parser("utility", help="fine-tune with DP-SGD at each sigma; accuracy, MCC, epsilon")
    util.add_argument("--dataset", default="sst2")
    util.add_argument("--sigmas", type=float, nargs="+", default=[0.0, 0.01, 0.05, 0.1, 0.2, 0.5])
    util.add_argument("--model", default="minilm")
    util.add_argument("--train-size", type=int, default=None, help="a seeded subset of the training split")
    util.add_argument("--eval-size", type=int, default=None, help="a seeded subset of the held-out split")
    util.add_argument("--steps", type=int, default=300)
    util.add_argument("--batch-size", type=int, default=32)
    util.add_argument("--lr", type=float, default=5e-4)
    util.add_argument("--clip", type=float, default=1.0)
    util.add_argument("--trainable", choices=["all", "top"], default="all",
                      help="all parameters but the word embeddings, or the last layer + pooler + classifier")
    util.add_argument("--seed", type=int, default=0)
    util.add_argument("--jobs", type=int, default=1)
    util.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    try:
        utility_sweep(args.dataset, args.sigmas, args.out, model_name=args.model, train_size=args.train_size,
                      eval_size=args.eval_size, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                      max_grad_norm=args.clip, trainable=args.trainable, seed=args.seed, jobs=args.jobs)
    except (ValueError, FileNotFoundError) as err:
        parser.exit(2, f"error: {err}\n")


if __name__ == "__main__":
    from gilib.dp import main as _main

    _main()
