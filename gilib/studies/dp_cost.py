"""The cost of DP-SGD: model quality after DP fine-tuning (chapter 4's utility figure).

:mod:`gilib.dp` is the privacy mechanism (the client's privatised gradient,
the privacy budget); this module is the experiment that asks what it costs.
:func:`dp_finetune` fine-tunes a copy of the victim with DP-SGD (Abadi et
al., CCS 2016, through Opacus) and measures held-out accuracy and
Matthews correlation; :func:`sweep` runs it at each noise multiplier
through the one runner (:mod:`gilib.studies.runner`). Command line::

    python -m gilib.studies dp-cost run --dataset sst2 --trainable top --steps 300 \
        --out data/results/ch4_utility.jsonl [--jobs 2]
    python -m gilib.studies dp-cost table data/results/ch4_utility.jsonl
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch

from ..data import load_split
from ..dp import batch_inputs, check_dp_settings, epsilon, make_private
from ..metrics import matthews
from ..models import load_model
from .store import read_lines
from .study import Study, Table, markdown_table, option


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
    check_dp_settings(noise_multiplier, max_grad_norm)
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
    wrapped, optimizer, loader = make_private(client, optimizer, loader, noise_multiplier, max_grad_norm,
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


def sweep(
    dataset: str,
    noise_multipliers: Sequence[float],
    out: str | Path,
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
    scheduler: str | None = None,
) -> list[dict]:
    """DP fine-tuning at each noise multiplier; one JSON line per sigma in ``out``, resumable.

    Args:
        dataset, train_split, eval_split: where the examples come from
            (:func:`gilib.data.load_split`).
        noise_multipliers: the sigmas to run.
        out: the results file.
        train_size, eval_size: seeded subsets of the splits (``None``: all).
        jobs, scheduler: the engine (:func:`gilib.studies.runner.run`).
        Others: as :func:`dp_finetune`.

    Returns:
        Every line of ``out`` after the run.
    """
    tasks = _tasks(dataset, noise_multipliers, model_name=model_name, train_split=train_split,
                   eval_split=eval_split, train_size=train_size, eval_size=eval_size, steps=steps,
                   batch_size=batch_size, lr=lr, max_grad_norm=max_grad_norm, trainable=trainable, seed=seed)
    return STUDY.run(out, tasks, jobs=jobs, scheduler=scheduler)


def _tasks(dataset: str, noise_multipliers: Sequence[float], *, model_name: str = "minilm",
           train_split: str = "train", eval_split: str = "validation", **others) -> list[tuple[dict, float]]:
    """A sweep's tasks, ``(settings, sigma)`` each, checked whole (every sigma, the data files) first."""
    for sigma in noise_multipliers:
        check_dp_settings(sigma, others.get("max_grad_norm", 1.0))
    settings = dict(model=model_name, dataset=dataset, train_split=train_split, eval_split=eval_split, **others)
    _examples(settings)  # a missing data file fails here, before any worker starts
    return [(settings, float(sigma)) for sigma in noise_multipliers]


def _key(settings: dict, sigma: float) -> tuple[str, float]:
    return json.dumps(settings, sort_keys=True), float(sigma)


def _examples(settings: dict) -> tuple[list, list]:
    """The seeded training and held-out examples a sweep's settings name."""
    train = list(load_split(settings["dataset"], settings["train_split"]))
    held_out = list(load_split(settings["dataset"], settings["eval_split"]))
    rng = np.random.RandomState(settings["seed"])
    if settings["train_size"]:
        train = [train[i] for i in rng.permutation(len(train))[: settings["train_size"]]]
    if settings["eval_size"]:
        held_out = [held_out[i] for i in rng.permutation(len(held_out))[: settings["eval_size"]]]
    return train, held_out


def finetune_line(settings: dict, sigma: float) -> list[dict]:
    """One sweep task: DP fine-tuning at ``sigma``, as one result line (runs in a worker)."""
    torch.set_num_threads(1)
    train, held_out = _examples(settings)
    model, tokenizer = load_model(settings["model"], seed=settings["seed"])
    result = dp_finetune(model, tokenizer, train, held_out, noise_multiplier=sigma,
                         max_grad_norm=settings["max_grad_norm"], steps=settings["steps"],
                         batch_size=settings["batch_size"], lr=settings["lr"], trainable=settings["trainable"],
                         seed=settings["seed"])
    return [{"settings": settings, "noise_multiplier": sigma, "accuracy": result.accuracy, "mcc": result.mcc,
             "epsilon": result.epsilon, "delta": 1 / len(train), "sample_rate": settings["batch_size"] / len(train),
             "steps": result.steps, "train_examples": len(train), "eval_examples": len(held_out),
             "seconds": result.seconds}]


def table(path: str | Path) -> pd.DataFrame:
    """Accuracy, MCC and epsilon per noise multiplier, one row per line of a sweep's results."""
    lines = read_lines(path)
    if not lines:
        raise ValueError(f"{path} holds no DP fine-tuning lines: run python -m gilib.studies dp-cost run --out {path}")
    frame = pd.DataFrame(lines).sort_values("noise_multiplier", ignore_index=True)
    return frame[["noise_multiplier", "accuracy", "mcc", "epsilon", "steps", "train_examples", "eval_examples",
                  "seconds"]]


def markdown(frame: pd.DataFrame) -> str:
    """:func:`table` as Markdown."""
    rows = ([f"{r['noise_multiplier']:g}", f"{r['accuracy']:.3f}", f"{r['mcc']:.3f}",
             "∞" if r["epsilon"] is None or not np.isfinite(r["epsilon"]) else f"{r['epsilon']:.3g}", r["steps"],
             f"{r['seconds']:.0f}"] for _, r in frame.iterrows())
    return markdown_table(["sigma", "accuracy", "MCC", "epsilon", "steps", "seconds"], rows)


def _label(lines: list[dict]) -> str:
    line = lines[0]
    return (f"sigma {line['noise_multiplier']}: accuracy {line['accuracy']:.3f}, MCC {line['mcc']:.3f}, "
            f"epsilon {line['epsilon']:.3g}, {line['seconds']:.0f} s")


def _plan(args) -> list[tuple[dict, float]]:
    """The sweep's tasks from the command line."""
    return _tasks(args.dataset, args.sigmas, model_name=args.model, train_size=args.train_size,
                  eval_size=args.eval_size, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                  max_grad_norm=args.clip, trainable=args.trainable, seed=args.seed)


STUDY = Study(
    name="dp-cost",
    description="chapter 4's cost of DP-SGD: held-out accuracy, MCC and epsilon after DP fine-tuning, per sigma",
    plan=_plan,
    work=finetune_line,
    task_keys=lambda settings, sigma: [_key(settings, sigma)],
    line_key=lambda line: _key(line["settings"], line["noise_multiplier"]),
    label=_label,
    run_options=(
        option("--dataset", default="sst2"),
        option("--sigmas", type=float, nargs="+", default=[0.0, 0.01, 0.05, 0.1, 0.2, 0.5]),
        option("--model", default="minilm"),
        option("--train-size", type=int, default=None, help="a seeded subset of the training split"),
        option("--eval-size", type=int, default=None, help="a seeded subset of the held-out split"),
        option("--steps", type=int, default=300),
        option("--batch-size", type=int, default=32),
        option("--lr", type=float, default=5e-4),
        option("--clip", type=float, default=1.0),
        option("--trainable", choices=["all", "top"], default="all",
               help="all parameters but the word embeddings, or the last layer + pooler + classifier"),
        option("--seed", type=int, default=0),
    ),
    tables=(Table("table", "accuracy, MCC and epsilon per noise multiplier, as Markdown",
                  lambda args: markdown(table(args.results)),
                  (option("results", type=Path, help="the sweep's results (data/results/ch4_utility.jsonl)"),)),),
)
"""The DP fine-tuning sweep as a study (``python -m gilib.studies dp-cost ...``)."""
