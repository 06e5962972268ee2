"""The cost of DP-SGD: model quality after DP fine-tuning (chapter 4's utility figure).

:mod:`gilib.dp` is the privacy mechanism (the client's privatised gradient,
the privacy budget); this module is the experiment that asks what it costs.
:func:`dp_finetune` fine-tunes a copy of the victim with DP-SGD (Abadi et
al., CCS 2016, through Opacus) and measures held-out accuracy and
Matthews correlation; :func:`sweep` runs it at each noise multiplier
through the one runner (:mod:`gilib.studies.runner`).

A *recipe* (:data:`RECIPES`) names one way of fine-tuning: what is
trained, the expected batch size, the steps, the optimiser:

* ``top``: the last encoder layer, the pooler and the classifier, Poisson
  batches of 32, 300 Adam steps (the first utility sweep of chapter 4,
  ``data/results/ch4_utility.jsonl``; cheap, but it trains a part the
  attacked client does not share);
* ``deployed``: every parameter but the word embeddings (the ``full``
  selection the attack sees, so every encoder layer and the pooler and
  classifier), Poisson batches of 256 as DP fine-tuning uses (the batch
  runs in length-sorted chunks of 64 accumulated into one DP step, with
  Opacus's ghost clipping), Adam, as many steps as fit about five
  minutes of one CPU core per sigma.

Each line records what was trained (the parameter count), the batch size,
steps, sigma, epsilon, delta and sample rate of that very run, accuracy,
MCC and seconds. Command line::

    python -m gilib.studies dp-cost run --dataset sst2 --trainable top --steps 300 \
        --out data/results/ch4_utility.jsonl [--jobs 2]
    python -m gilib.studies dp-cost run --dataset sst2 --recipe deployed --sigmas 0 0.1 0.5 \
        --out data/results/ch4_utility_deployed.jsonl
    python -m gilib.studies dp-cost table data/results/ch4_utility.jsonl
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch

from ..data import load_split
from ..dp import GRAD_SAMPLE_MODES, batch_inputs, check_dp_settings, epsilon, make_private, quiet_hooks
from ..metrics import bootstrap_interval, interval_text, matthews
from ..models import load_model
from .grids import intervals, paired_differences
from .store import read_lines
from .study import Study, Table, markdown_table, option


TRAINABLE = {
    "all": "every parameter but the word embeddings",
    "top": "the last encoder layer, the pooler and the classifier",
}
"""What ``trainable`` trains, in words."""


@dataclass(frozen=True)
class Recipe:
    """A named way of DP fine-tuning (see the module docstring).

    Attributes:
        trainable: a :data:`TRAINABLE` name.
        batch_size: the expected (Poisson) batch size.
        steps: optimizer steps.
        lr: Adam's learning rate.
        physical_batch_size: examples per forward/backward pass, the batch
            accumulated into one DP step (``None``: the whole batch at once).
        grad_sample_mode: Opacus's ``"hooks"`` or ``"ghost"`` clipping.
    """

    trainable: str
    batch_size: int
    steps: int
    lr: float = 5e-4
    physical_batch_size: int | None = None
    grad_sample_mode: str = "hooks"


RECIPES = {
    "top": Recipe("top", 32, 300),
    # 30 steps of 256 on 2 cores shared with other work: about 8 s a step
    # (ghost clipping, chunks of 64, one thread), some 4-5 minutes a sigma.
    "deployed": Recipe("all", 256, 30, physical_batch_size=64, grad_sample_mode="ghost"),
}
"""The named recipes; ``None`` (no recipe) means the settings given, with the defaults of :func:`dp_finetune`."""

_PLAIN = Recipe("all", 32, 300)
"""The settings of a sweep without a recipe (what the command line always did)."""


@dataclass
class Utility:
    """Model quality after DP fine-tuning.

    Attributes:
        accuracy: on the held-out examples.
        mcc: Matthews correlation (CoLA's metric).
        epsilon: the run's privacy budget (``inf`` without noise).
        steps: optimizer steps taken.
        seconds: wall-clock time of training and evaluation.
        trained_parameters: how many parameters were trained.
        sample_rate: the Poisson sampling rate of the run (Opacus's
            ``1 / len(loader)``), the one epsilon is computed at.
        delta: the ``delta`` of epsilon.
        mean_batch: the mean size of the batches drawn.
        train_seconds: wall-clock time of training alone.
    """

    accuracy: float
    mcc: float
    epsilon: float
    steps: int
    seconds: float
    trained_parameters: int = 0
    sample_rate: float = 0.0
    delta: float = 0.0
    mean_batch: float = 0.0
    train_seconds: float = 0.0


def trained_names(model: torch.nn.Module, trainable: str) -> list[str]:
    """The parameters a recipe's ``trainable`` trains: every one but the word embeddings (``"all"``, the
    ``full`` selection), or the last encoder layer, the pooler and the classifier (``"top"``)."""
    if trainable not in TRAINABLE:
        raise ValueError(f"trainable must be 'all' or 'top', got {trainable!r}.")
    last = f"encoder.layer.{model.config.num_hidden_layers - 1}."
    if trainable == "all":
        return [n for n, _ in model.named_parameters() if not n.endswith("word_embeddings.weight")]
    return [n for n, _ in model.named_parameters()
            if last in n or ".pooler." in n or n.startswith("classifier.")]


def trained_parameters(model: torch.nn.Module, trainable: str) -> int:
    """How many parameters :func:`trained_names` names."""
    sizes = dict((n, p.numel()) for n, p in model.named_parameters())
    return sum(sizes[n] for n in trained_names(model, trainable))


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
    physical_batch_size: int | None = None,
    grad_sample_mode: str = "hooks",
    seed: int = 0,
) -> Utility:
    """Fine-tune a copy of ``model`` with DP-SGD and measure it on held-out examples.

    Poisson-sampled batches of expected size ``batch_size`` from ``train``,
    per-example clipping at ``C`` over all trainable parameters, Gaussian
    noise ``sigma * C``, Adam's update on the privatised gradient. The
    word-embedding table is frozen, as is usual for DP fine-tuning;
    ``trainable="top"`` also freezes every encoder layer but the last, which
    makes a CPU run several times cheaper.

    With ``physical_batch_size`` a drawn batch is sorted by length and run
    in chunks of that many examples, which pad only to their own longest
    sentence; Opacus accumulates their clipped per-example gradients and
    adds the noise once, so the step is the same DP-SGD step as on the
    whole batch (Opacus's ``BatchMemoryManager`` does the same).

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
        physical_batch_size: examples per forward/backward pass (``None``:
            the whole batch in one pass, in the order drawn).
        grad_sample_mode: ``"hooks"`` (per-example gradients) or
            ``"ghost"`` (ghost clipping: per-example norms only, a second
            backward pass; far less memory at large batches).
        seed: seeds sampling, noise and the data order.

    Returns:
        A :class:`Utility`.

    Raises:
        ValueError: for bad DP settings, a batch size, physical batch size
            or step count below 1, fewer training examples than a batch,
            or an unknown ``trainable`` or ``grad_sample_mode``.
    """
    check_dp_settings(noise_multiplier, max_grad_norm)
    for name, value in (("batch_size", batch_size), ("steps", steps),
                        ("physical_batch_size", 1 if physical_batch_size is None else physical_batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a whole number, at least 1; got {value!r}.")
    if len(train) < batch_size:
        raise ValueError(f"Need at least batch_size={batch_size} training examples, got {len(train)}.")
    if trainable not in TRAINABLE:
        raise ValueError(f"trainable must be 'all' or 'top', got {trainable!r}.")
    if grad_sample_mode not in GRAD_SAMPLE_MODES:
        raise ValueError(f"grad_sample_mode must be one of {GRAD_SAMPLE_MODES}, got {grad_sample_mode!r}.")
    start = time.perf_counter()
    torch.manual_seed(seed)
    client = copy.deepcopy(model)
    client.train()
    names = set(trained_names(client, trainable))
    for name, p in client.named_parameters():
        p.requires_grad_(name in names)

    def tensors(examples):
        enc = tokenizer([e.text for e in examples], padding="max_length", truncation=True, max_length=max_tokens,
                        return_tensors="pt")
        return enc["input_ids"], enc["attention_mask"], torch.tensor([e.label for e in examples])

    ids, mask, labels = tensors(train)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(ids, mask, labels), batch_size=batch_size,
                                         generator=torch.Generator().manual_seed(seed))
    sample_rate = 1 / len(loader)  # what Opacus's Poisson sampler draws with
    params = [p for p in client.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=lr)
    private = make_private(client, optimizer, loader, noise_multiplier, max_grad_norm, seed=seed + 1, poisson=True,
                           grad_sample_mode=grad_sample_mode)
    if grad_sample_mode == "ghost":
        wrapped, optimizer, criterion, loader = private
    else:
        (wrapped, optimizer, loader), criterion = private, torch.nn.CrossEntropyLoss()
    taken, drawn = 0, 0
    with quiet_hooks():
        while taken < steps:
            for batch_ids, batch_mask, batch_labels in loader:
                if taken == steps:
                    break
                _dp_step(wrapped, optimizer, criterion, params, batch_ids, batch_mask, batch_labels,
                         physical_batch_size, ghost=grad_sample_mode == "ghost")
                taken += 1
                drawn += len(batch_labels)
    train_seconds = time.perf_counter() - start
    delta = delta or 1 / len(train)
    eps = epsilon(noise_multiplier, sample_rate, taken, delta)

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
    return Utility(accuracy, matthews(predictions, held_labels.tolist()), eps, taken, time.perf_counter() - start,
                   trained_parameters=sum(p.numel() for p in params), sample_rate=sample_rate, delta=delta,
                   mean_batch=drawn / taken, train_seconds=train_seconds)


def _dp_step(wrapped, optimizer, criterion, params, ids, mask, labels, chunk: int | None, ghost: bool) -> None:
    """One DP-SGD step on a drawn batch: its clipped per-example gradients summed, the noise added once.

    With ``chunk`` the batch runs in length-sorted passes of ``chunk``
    examples; Opacus accumulates each pass's clipped gradients while told to
    skip the step (``signal_skip_step``), and the last pass adds the noise
    and steps. An empty batch (Poisson sampling can draw one) is a step of
    noise alone, as DP-SGD's analysis counts it.
    """
    if len(labels) == 0:
        optimizer.zero_grad(set_to_none=True)
        for p in params:
            if ghost:
                p.grad = torch.zeros_like(p)
            else:
                p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype)
        optimizer.step()
        return
    if chunk is None:
        passes = [torch.arange(len(labels))]
    else:
        order = torch.argsort(mask.sum(dim=1), stable=True)  # similar lengths together: less padding
        passes = [order[i:i + chunk] for i in range(0, len(order), chunk)]
    for j, rows in enumerate(passes):
        optimizer.signal_skip_step(do_skip=j < len(passes) - 1)
        optimizer.zero_grad(set_to_none=True)
        width = int(mask[rows].sum(dim=1).max())  # pad to the pass's longest sentence only
        inputs = batch_inputs({"input_ids": ids[rows, :width], "attention_mask": mask[rows, :width]})
        criterion(wrapped(**inputs).logits, labels[rows]).backward()
        optimizer.step()


def sweep(
    dataset: str,
    noise_multipliers: Sequence[float],
    out: str | Path,
    *,
    recipe: str | None = None,
    model_name: str = "minilm",
    train_split: str = "train",
    eval_split: str = "validation",
    train_size: int | None = None,
    eval_size: int | None = None,
    steps: int | None = None,
    batch_size: int | None = None,
    lr: float | None = None,
    max_grad_norm: float = 1.0,
    trainable: str | None = None,
    physical_batch_size: int | None = None,
    grad_sample_mode: str | None = None,
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
        recipe: a :data:`RECIPES` name, whose settings fill in every one of
            ``steps``, ``batch_size``, ``lr``, ``trainable``,
            ``physical_batch_size`` and ``grad_sample_mode`` left at
            ``None``; without one, those default to 300 steps of 32, Adam at
            5e-4, every parameter but the word embeddings, one pass, hooks.
        train_size, eval_size: seeded subsets of the splits (``None``: all).
        jobs, scheduler: the engine (:func:`gilib.studies.runner.run`).
        Others: as :func:`dp_finetune`.

    Returns:
        Every line of ``out`` after the run.
    """
    tasks = _tasks(dataset, noise_multipliers, recipe=recipe, model_name=model_name, train_split=train_split,
                   eval_split=eval_split, train_size=train_size, eval_size=eval_size, steps=steps,
                   batch_size=batch_size, lr=lr, max_grad_norm=max_grad_norm, trainable=trainable,
                   physical_batch_size=physical_batch_size, grad_sample_mode=grad_sample_mode, seed=seed)
    return STUDY.run(out, tasks, jobs=jobs, scheduler=scheduler)


def _tasks(dataset: str, noise_multipliers: Sequence[float], *, recipe: str | None = None,
           model_name: str = "minilm", train_split: str = "train", eval_split: str = "validation",
           train_size: int | None = None, eval_size: int | None = None, max_grad_norm: float = 1.0, seed: int = 0,
           **given) -> list[tuple[dict, float]]:
    """A sweep's tasks, ``(settings, sigma)`` each, checked whole (every sigma, the recipe, the data files) first.

    The settings of a sweep without a recipe keep the keys they always had
    (so that its old results still resume); a recipe's add ``recipe``,
    ``physical_batch_size`` and ``grad_sample_mode``.
    """
    for sigma in noise_multipliers:
        check_dp_settings(sigma, max_grad_norm)
    if recipe is not None and recipe not in RECIPES:
        raise ValueError(f"Unknown recipe {recipe!r}; choose one of: {', '.join(RECIPES)}.")
    chosen = replace(RECIPES[recipe] if recipe else _PLAIN, **{k: v for k, v in given.items() if v is not None})
    _check_recipe(chosen)
    settings = dict(model=model_name, dataset=dataset, train_split=train_split, eval_split=eval_split,
                    train_size=train_size, eval_size=eval_size, steps=chosen.steps, batch_size=chosen.batch_size,
                    lr=chosen.lr, max_grad_norm=max_grad_norm, trainable=chosen.trainable, seed=seed)
    if recipe is not None or chosen.physical_batch_size is not None or chosen.grad_sample_mode != "hooks":
        settings.update(recipe=recipe, physical_batch_size=chosen.physical_batch_size,
                        grad_sample_mode=chosen.grad_sample_mode)
    _examples(settings)  # a missing data file fails here, before any worker starts
    return [(settings, float(sigma)) for sigma in noise_multipliers]


def _check_recipe(recipe: Recipe) -> None:
    """Refuse a recipe :func:`dp_finetune` would refuse, before any worker starts."""
    for name in ("batch_size", "steps", "physical_batch_size"):
        value = getattr(recipe, name)
        if name == "physical_batch_size" and value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a whole number, at least 1; got {value!r}.")
    if recipe.trainable not in TRAINABLE:
        raise ValueError(f"trainable must be 'all' or 'top', got {recipe.trainable!r}.")
    if recipe.grad_sample_mode not in GRAD_SAMPLE_MODES:
        raise ValueError(f"grad_sample_mode must be one of {GRAD_SAMPLE_MODES}, got {recipe.grad_sample_mode!r}.")
    if not (isinstance(recipe.lr, (int, float)) and recipe.lr > 0):
        raise ValueError(f"lr must be a positive number, got {recipe.lr!r}.")


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
    """One sweep task: DP fine-tuning at ``sigma``, as one result line (runs in a worker).

    The line holds the run's own privacy accounting (``epsilon`` at its
    ``delta``, ``sample_rate`` and ``steps``) and what it trained
    (``trained``, ``trained_parameters``), beside accuracy, MCC and seconds.
    """
    torch.set_num_threads(1)
    train, held_out = _examples(settings)
    model, tokenizer = load_model(settings["model"], seed=settings["seed"])
    result = dp_finetune(model, tokenizer, train, held_out, noise_multiplier=sigma,
                         max_grad_norm=settings["max_grad_norm"], steps=settings["steps"],
                         batch_size=settings["batch_size"], lr=settings["lr"], trainable=settings["trainable"],
                         physical_batch_size=settings.get("physical_batch_size"),
                         grad_sample_mode=settings.get("grad_sample_mode", "hooks"), seed=settings["seed"])
    return [{"settings": settings, "noise_multiplier": sigma, "accuracy": result.accuracy, "mcc": result.mcc,
             "epsilon": result.epsilon, "delta": result.delta, "sample_rate": result.sample_rate,
             "steps": result.steps, "batch_size": settings["batch_size"], "mean_batch": result.mean_batch,
             "trained": TRAINABLE[settings["trainable"]], "trained_parameters": result.trained_parameters,
             "optimizer": "Adam", "train_examples": len(train), "eval_examples": len(held_out),
             "train_seconds": result.train_seconds, "seconds": result.seconds}]


COLUMNS = ["noise_multiplier", "accuracy", "mcc", "epsilon", "delta", "steps", "batch_size", "trained_parameters",
           "train_examples", "eval_examples", "seconds"]
"""The columns of :func:`table`."""


def table(path: str | Path) -> pd.DataFrame:
    """Accuracy, MCC and epsilon per noise multiplier, one row per line of a sweep's results.

    Lines written before a line recorded its batch size, trained parameter
    count and delta (``ch4_utility.jsonl``) show the batch size from their
    settings and the rest as missing.
    """
    lines = read_lines(path)
    if not lines:
        raise ValueError(f"{path} holds no DP fine-tuning lines: run python -m gilib.studies dp-cost run --out {path}")
    frame = pd.DataFrame(lines).sort_values("noise_multiplier", ignore_index=True)
    frame["batch_size"] = [line["settings"]["batch_size"] for line in frame.to_dict("records")]
    for column in COLUMNS:
        if column not in frame:
            frame[column] = np.nan
    return frame[COLUMNS]


def markdown(frame: pd.DataFrame) -> str:
    """:func:`table` as Markdown."""
    def count(value) -> str:
        return "–" if pd.isna(value) else f"{int(value):,}"

    rows = ([f"{r['noise_multiplier']:g}", f"{r['accuracy']:.3f}", f"{r['mcc']:.3f}", _epsilon(r["epsilon"]),
             count(r["batch_size"]), count(r["steps"]), count(r["trained_parameters"]), f"{r['seconds']:.0f}"]
            for _, r in frame.iterrows())
    return markdown_table(["sigma", "accuracy", "MCC", "epsilon", "batch", "steps", "trained parameters", "seconds"],
                          rows)


def _epsilon(value) -> str:
    return "∞" if value is None or not np.isfinite(value) else f"{value:.3g}"


def describe(line: dict) -> str:
    """What a utility line's run trained and how, in words: ``"... ; Adam, batch 256, 30 steps"``."""
    settings = line["settings"]
    trained = line.get("trained", TRAINABLE[settings["trainable"]])
    count = f" ({line['trained_parameters'] / 1e6:.1f} M)" if line.get("trained_parameters") else ""
    return f"{trained}{count}; Adam, batch {settings['batch_size']}, {settings['steps']} steps"


def accuracy_interval(accuracy: float, examples: int) -> tuple[float, float]:
    """The 95 % normal-approximation interval of an accuracy measured on ``examples`` held-out examples.

    It covers the evaluation sample only: one training run (one seed) per
    sigma says nothing about the spread between training runs.
    """
    half = 1.96 * float(np.sqrt(accuracy * (1 - accuracy) / examples))
    return max(0.0, accuracy - half), min(1.0, accuracy + half)


def with_accuracy_interval(table: pd.DataFrame) -> pd.DataFrame:
    """The utility table with each run's :func:`accuracy_interval` as ``low`` and ``high`` columns.

    Args:
        table: one row per run, with ``accuracy`` and ``eval_examples``.
    """
    bounds = [accuracy_interval(a, n) for a, n in zip(table["accuracy"], table["eval_examples"])]
    return table.assign(low=[b[0] for b in bounds], high=[b[1] for b in bounds])


def deployed_summary(utility: str | Path | Sequence[dict], privatised: Sequence[dict], central: Sequence[dict],
                     raw: Sequence[dict], component: str = "full") -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """Chapter 4's one-setting comparison: privacy, utility and leakage per sigma, and the central-DP row.

    Args:
        utility: the deployed recipe's lines (``ch4_utility_deployed.jsonl``):
            one DP fine-tuning run per sigma, with its own epsilon.
        privatised: attack lines on the privatised gradient of a local-DP
            client, every client batch size (``ch4_dp.jsonl`` and
            ``ch4_dp_batches.jsonl``).
        central: attack lines on what a central-DP server receives
            (``ch4_dp_central.jsonl``).
        raw: attack lines on the plain gradient at one sentence per client
            (``ch3_components.jsonl`` or ``ch2_layers.jsonl``), for the
            central cells' selections.
        component: the selection whose leakage the first table shows.

    Returns:
        ``(one_setting, server, facts)``. ``one_setting``: per sigma of the
        utility run, epsilon, accuracy with its interval, and ROUGE-1 of
        ``component`` [95 % bootstrap interval over client batches] at each
        client batch size, "not run" where no cell has that sigma.
        ``server``: for each central cell's selection, the raw gradient,
        the central-DP server's view and a local-DP client's message at the
        same sigma. ``facts``: the numbers the chapter's prose quotes
        (among them ``noisy_rouge1_max``, ``noisy_rouge1_high_max`` and
        ``noisy_sentence_rouge1_max``: the largest cell mean, upper bound
        and single-sentence ROUGE-1 of any local-DP message at sigma > 0).
    """
    lines = sorted(read_lines(utility) if isinstance(utility, (str, Path)) else list(utility),
                   key=lambda line: line["noise_multiplier"])
    if not lines:
        raise ValueError("No deployed utility lines: run python -m gilib.studies dp-cost run --recipe deployed ...")
    every = intervals(list(privatised), by=["component", "batch_size", "noise_multiplier"])
    noisy = every[every["noise_multiplier"] > 0]
    leak = every[every["component"] == component]
    sizes = sorted(int(b) for b in leak["batch_size"].unique())
    rows, facts = [], {}
    for line in lines:
        sigma = float(line["noise_multiplier"])
        low, high = accuracy_interval(line["accuracy"], line["eval_examples"])
        row = {"sigma": sigma, "epsilon": "∞" if not np.isfinite(line["epsilon"]) else f"{line['epsilon']:.3g}",
               "accuracy [95 %]": interval_text(line["accuracy"], low, high)}
        for size in sizes:
            cell = leak[(leak["batch_size"] == size) & (leak["noise_multiplier"] == sigma)]
            row[f"ROUGE-1, {size} per client"] = ("not run" if cell.empty else
                                                  interval_text(*cell[["rouge1", "low", "high"]].iloc[0]))
        rows.append(row)
        facts[f"deployed_accuracy_sigma{sigma:g}"] = round(float(line["accuracy"]), 4)
        facts[f"deployed_epsilon_sigma{sigma:g}"] = float(line["epsilon"]) if np.isfinite(line["epsilon"]) else None
    # How little a local-DP message gave: the best cell mean, the highest upper bound and the best
    # single sentence over every selection, batch size and sigma > 0.
    facts.update({"noisy_rouge1_max": round(float(noisy["rouge1"].max()), 4),
                  "noisy_rouge1_high_max": round(float(noisy["high"].max()), 4),
                  "noisy_sentence_rouge1_max": round(max(float(r["rouge1"]) for r in privatised
                                                         if r["cell"]["dp"]["noise_multiplier"] > 0), 4)})
    first = lines[0]
    facts.update({"deployed_trained_millions": round(first["trained_parameters"] / 1e6, 1),
                  "deployed_batch": first["batch_size"], "deployed_steps": first["steps"],
                  "deployed_lr": first["settings"]["lr"], "deployed_train_examples": first["train_examples"],
                  "deployed_minutes": round(max(line["seconds"] for line in lines) / 60, 1),
                  "deployed_delta": float(first["delta"])})
    for _, cell in leak.iterrows():
        tag = f"b{int(cell['batch_size'])}_sigma{cell['noise_multiplier']:g}"
        facts.update({f"rouge1_{tag}": round(float(cell["rouge1"]), 4), f"rouge1_high_{tag}": round(cell["high"], 4),
                      f"cosine_{tag}": round(float(cell["dp_cosine"]), 4), f"sentences_{tag}": int(cell["n"]),
                      f"batches_{tag}": int(cell["units"])})

    server_rows = []
    views = intervals(list(central), by=["component", "layers", "noise_multiplier"])
    local = intervals(list(privatised), by=["component", "layers", "batch_size", "noise_multiplier"])
    # The raw gradient on the central cells' sentences only: the grids it
    # comes from may hold more (a longer prefix of the same sample).
    attacked = {(r["dataset"], r["split"], r["row_id"]) for r in central}
    plain = intervals([r for r in raw if (r["dataset"], r["split"], r["row_id"]) in attacked],
                      by=["component", "layers", "batch_size"])
    for _, view in views.iterrows():
        same = (lambda t: (t["component"] == view["component"]) & (t["layers"].astype(str) == str(view["layers"]))
                & (t["batch_size"] == 1))
        parts = [("the raw gradient (p.grad after backward())", plain[same(plain)]),
                 ("central DP: what the server receives (clipped, no noise)", views[views.index == view.name]),
                 (f"local DP: what the client sends (sigma = {view['noise_multiplier']:g})",
                  local[same(local) & (local["noise_multiplier"] == view["noise_multiplier"])])]
        for label, cell in parts:
            if cell.empty:
                continue
            c = cell.iloc[0]
            server_rows.append({"selection": f"{view['component']} {view['layers']}", "the attack reads": label,
                                "ROUGE-1 [95 %]": interval_text(c["rouge1"], c["low"], c["high"]),
                                "cosine with the raw gradient": round(float(c.get("dp_cosine", 1.0)), 4),
                                "sentences": int(c["n"])})
        tag = f"{view['component']}_{view['layers']}".replace(".", "_")
        facts.update({f"central_rouge1_{tag}": round(float(view["rouge1"]), 4),
                      f"central_low_{tag}": round(view["low"], 4), f"central_high_{tag}": round(view["high"], 4),
                      "central_sigma": float(view["noise_multiplier"])})
        if not plain[same(plain)].empty:
            facts[f"raw_rouge1_{tag}"] = round(float(plain[same(plain)]["rouge1"].iloc[0]), 4)
            # Paired over the same sentences: the server's view minus the raw gradient, per sentence.
            diffs = paired_differences(central, raw, view["component"], view["layers"])
            low, high = bootstrap_interval(diffs)
            facts.update({f"central_minus_raw_{tag}": round(float(np.mean(diffs)), 4),
                          f"central_minus_raw_low_{tag}": round(low, 4),
                          f"central_minus_raw_high_{tag}": round(high, 4), f"central_pairs_{tag}": len(diffs)})
    return pd.DataFrame(rows), pd.DataFrame(server_rows), facts


def _label(lines: list[dict]) -> str:
    line = lines[0]
    return (f"sigma {line['noise_multiplier']}: accuracy {line['accuracy']:.3f}, MCC {line['mcc']:.3f}, "
            f"epsilon {line['epsilon']:.3g}, {line['seconds']:.0f} s")


def _plan(args) -> list[tuple[dict, float]]:
    """The sweep's tasks from the command line."""
    return _tasks(args.dataset, args.sigmas, recipe=args.recipe, model_name=args.model, train_size=args.train_size,
                  eval_size=args.eval_size, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                  max_grad_norm=args.clip, trainable=args.trainable, physical_batch_size=args.physical_batch_size,
                  grad_sample_mode=args.grad_sample_mode, seed=args.seed)


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
        option("--recipe", choices=sorted(RECIPES), default=None,
               help="a named recipe: top (last layer + pooler + classifier, batch 32, 300 steps) or deployed "
                    "(every parameter but the word embeddings, batch 256, ghost clipping); the options below "
                    "override it"),
        option("--model", default="minilm"),
        option("--train-size", type=int, default=None, help="a seeded subset of the training split"),
        option("--eval-size", type=int, default=None, help="a seeded subset of the held-out split"),
        option("--steps", type=int, default=None, help="optimizer steps (default: the recipe's, else 300)"),
        option("--batch-size", type=int, default=None, help="expected batch size (default: the recipe's, else 32)"),
        option("--lr", type=float, default=None, help="Adam's learning rate (default: the recipe's, else 5e-4)"),
        option("--clip", type=float, default=1.0),
        option("--trainable", choices=sorted(TRAINABLE), default=None,
               help="all parameters but the word embeddings, or the last layer + pooler + classifier "
                    "(default: the recipe's, else all)"),
        option("--physical-batch-size", type=int, default=None,
               help="examples per forward/backward pass, accumulated into one DP step (default: the recipe's)"),
        option("--grad-sample-mode", choices=list(GRAD_SAMPLE_MODES), default=None,
               help="Opacus's per-example gradients (hooks) or ghost clipping (default: the recipe's, else hooks)"),
        option("--seed", type=int, default=0),
    ),
    tables=(Table("table", "accuracy, MCC and epsilon per noise multiplier, as Markdown",
                  lambda args: markdown(table(args.results)),
                  (option("results", type=Path, help="the sweep's results (data/results/ch4_utility.jsonl)"),)),),
)
"""The DP fine-tuning sweep as a study (``python -m gilib.studies dp-cost ...``)."""
