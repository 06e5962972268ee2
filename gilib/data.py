"""Sentences to attack: a bundled sample and three benchmark datasets.

Gradient inversion needs private training text for the client to compute
gradients on. This module loads it from one of three sources, all returned as
the same :class:`Example` records:

1. **The bundled sample** (``dataset="sample"``): ``data/sample_sentences.tsv``
   in this repository, a few dozen sentences written for this project. It needs
   no download, so the book and the tests always have something to run on.
2. **Local copies of the benchmarks** (``"cola"``, ``"sst2"``,
   ``"rotten_tomatoes"``): the original release files in a data folder
   (``$GILIB_DATA_DIR``, or ``../shared/data`` next to the repository). They are
   parsed so that every split has exactly the rows, order and text of the
   Hugging Face ``datasets`` version, so row ids match those used in papers.
   See ``shared/data/README.md`` for sources and checksums.
3. **The Hugging Face Hub** (:func:`load_hub_split`), when ``datasets`` is
   installed and the machine is online.

Sampling protocol. LAMP (Balunovic et al., "LAMP: Extracting Text from
Gradients with Language Model Priors", NeurIPS 2022), whose setup later work
reuses, draws its attacked sentences from the **train** split: in
``eth-sri/lamp``'s ``data_utils.py`` it shuffles the row indices with NumPy's
global generator seeded with the run seed (``np.random.seed(seed)``, then
``np.random.shuffle(idxs)``) and keeps the first ``n_inputs * batch_size``
indices, ``batch_size`` consecutive ones per batch. :func:`shuffled_indices`
and :func:`sample_batches` reproduce that exactly with a private
``np.random.RandomState``, which gives the same permutation without touching
global state. For CoLA with seed 101 the first index is 2310, the value LAMP
itself asserts.

Example:
    >>> from gilib.data import load_split, sample_batches
    >>> train = load_split("sample")
    >>> batches = sample_batches(train, n_batches=2, batch_size=4, seed=101)
    >>> len(batches), len(batches[0])
    (2, 4)
"""

from __future__ import annotations

import contextlib
import csv
import functools
import json
import os
import platform
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "DATASETS",
    "Example",
    "default_data_dir",
    "load_hub_split",
    "load_split",
    "local_splits",
    "prior_texts",
    "repo_root",
    "sample_batches",
    "shuffled_indices",
]

DATASETS = ("sample", "cola", "sst2", "rotten_tomatoes")

DATA_DIR_ENV = "GILIB_DATA_DIR"
"""Environment variable that points at the benchmark data folder."""

SAMPLE_FILE = Path("data") / "sample_sentences.tsv"
"""Location of the bundled sample, relative to :func:`repo_root`."""

# Splits available from local files, per dataset.
_LOCAL_SPLITS: dict[str, tuple[str, ...]] = {
    "sample": ("train",),
    "cola": ("train", "validation"),
    "sst2": ("train", "validation"),
    "rotten_tomatoes": ("train", "validation", "test"),
}

# Hub name and config, and the column holding the text.
_HUB: dict[str, tuple[tuple[str, ...], str]] = {
    "cola": (("glue", "cola"), "sentence"),
    "sst2": (("glue", "sst2"), "sentence"),
    "rotten_tomatoes": (("rotten_tomatoes",), "text"),
}
_HUB_SPLITS = ("train", "validation", "test")

# Where Hugging Face cuts each Rotten Tomatoes polarity file (5331 lines):
# int(5331 * 0.8 + 0.5) = 4265 and int(5331 * 0.9 + 0.5) = 4798.
_RT_CUTS = {"train": slice(0, 4265), "validation": slice(4265, 4798), "test": slice(4798, None)}

_OFFLINE_HINT = (
    f"Set {DATA_DIR_ENV} or pass data_dir=... to point at the benchmark data folder, "
    'or use dataset="sample" (the bundled sample), or load_hub_split(...) when online.'
)


@dataclass(frozen=True)
class Example:
    """One labelled sentence.

    Attributes:
        dataset: Dataset name, one of :data:`DATASETS`.
        split: ``"train"``, ``"validation"`` or ``"test"``.
        row_id: Index of the row in its split, in Hugging Face order (for the
            sample: the ``id`` column).
        text: The sentence, exactly as the dataset stores it.
        label: Class label. CoLA: 1 = acceptable. SST-2 and Rotten Tomatoes:
            1 = positive. Unlabelled Hub test rows have -1.
    """

    dataset: str
    split: str
    row_id: int
    text: str
    label: int


def repo_root() -> Path:
    """Return the directory that holds the ``gilib`` package (the repository root)."""
    return Path(__file__).resolve().parent.parent



def git_commit() -> str:
    """The repository's commit (``-dirty`` when the tree has changes), or ``unknown``: stamped on results."""
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty", "--abbrev=12"],
            cwd=repo_root(), capture_output=True, text=True, timeout=10, check=True,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


@contextlib.contextmanager
def environment(values: dict[str, str]):
    """Set environment variables for the ``with`` block, then restore each as it was (unset if it was).

    Processes started inside the block (a papermill kernel, Ray's workers)
    inherit the values.
    """
    before = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def write_settings(out: str | Path, script: str, argv: Sequence[str] | None, **settings) -> dict:
    """Write a bench's settings beside its CSV (``out`` with a ``.json`` suffix): its command and the machine.

    Every bench stamps the same facts after its own: the command that made
    the file, one torch thread, the machine, torch's version and the commit.

    Args:
        out: the bench's CSV path.
        script: the bench script's path from the repository root (``bench/....py``).
        argv: the script's arguments (``None``: the process's own).
        **settings: the bench's own settings, written first.

    Returns:
        The settings written.
    """
    import torch  # here: the data module does not need it otherwise

    arguments = list(argv) if argv is not None else sys.argv[1:]
    stamped = {"command": " ".join(["python", script, *arguments]), **settings, "threads": 1,
               "machine": f"{platform.machine()}, {os.cpu_count()} cores", "torch": torch.__version__,
               "commit": git_commit()}
    Path(out).with_suffix(".json").write_text(json.dumps(stamped, indent=2) + "\n")
    return stamped


def cpu_model() -> str:
    """The processor's name as the kernel reports it (Linux), else what ``platform`` says: stamped on timings."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def default_data_dir() -> Path | None:
    """Return the benchmark data folder, or ``None`` when there is none.

    Returns:
        ``$GILIB_DATA_DIR`` when set (whether or not it exists, so that a typo
        shows up as a clear error later), else ``<repo_root>/../shared/data`` if
        that folder exists, else ``None``.
    """
    if env := os.environ.get(DATA_DIR_ENV):
        return Path(env).expanduser()
    shared = repo_root().parent / "shared" / "data"
    return shared if shared.is_dir() else None


def local_splits(dataset: str) -> tuple[str, ...]:
    """The splits :func:`load_split` reads for ``dataset`` from local files.

    Raises:
        ValueError: for an unknown dataset.
    """
    if dataset not in _LOCAL_SPLITS:
        raise ValueError(f"Unknown dataset {dataset!r}; choose one of {tuple(_LOCAL_SPLITS)}.")
    return _LOCAL_SPLITS[dataset]


def load_split(
    dataset: str = "sample", split: str = "train", data_dir: str | os.PathLike[str] | None = None
) -> list[Example]:
    """Load one split of a dataset from local files.

    Parsed splits are cached, so repeated calls are cheap.

    Args:
        dataset: One of :data:`DATASETS`.
        split: ``"train"``, ``"validation"`` or (Rotten Tomatoes only)
            ``"test"``. The sample has only ``"train"``.
        data_dir: Folder holding ``cola/``, ``sst2/`` and ``rotten_tomatoes/``.
            Defaults to :func:`default_data_dir`. Ignored for the sample,
            which ships inside the repository.

    Returns:
        The rows of the split, in Hugging Face order.

    Raises:
        ValueError: Unknown dataset or split.
        FileNotFoundError: The data folder or one of its files is missing.
    """
    _check_split(dataset, split, _LOCAL_SPLITS)
    if dataset == "sample":
        path = _require_file(repo_root() / SAMPLE_FILE)
        return list(_read_sample(path))
    if data_dir is None:
        data_dir = default_data_dir()
        if data_dir is None:
            expected = repo_root().parent / "shared" / "data"
            raise FileNotFoundError(f"No benchmark data folder found (looked for {expected}). {_OFFLINE_HINT}")
    paths = tuple(_require_file(Path(data_dir) / rel) for rel in _local_files(dataset, split))
    return list(_READERS[dataset](split, paths))


def load_hub_split(dataset: str, split: str = "train") -> list[Example]:
    """Load one split from the Hugging Face Hub with the ``datasets`` library.

    This is what LAMP itself calls (``load_dataset("glue", "cola")`` and so on).
    Prefer :func:`load_split` on local files, which gives the same rows offline.

    Args:
        dataset: ``"cola"``, ``"sst2"`` or ``"rotten_tomatoes"``.
        split: ``"train"``, ``"validation"`` or ``"test"``. GLUE test rows are
            unlabelled (label -1).

    Returns:
        The rows of the split, in Hugging Face order.

    Raises:
        ValueError: Unknown dataset or split (the sample is not on the Hub).
        RuntimeError: ``datasets`` is not installed or the Hub is unreachable.
    """
    _check_split(dataset, split, dict.fromkeys(_HUB, _HUB_SPLITS))
    try:  # optional dependency: only the online path needs it
        from datasets import load_dataset
    except ImportError as exc:
        raise RuntimeError(
            "load_hub_split needs the Hugging Face `datasets` package, which is not installed. "
            f"Offline choices: load_split({dataset!r}, ...) on local files "
            f'(set {DATA_DIR_ENV} or pass data_dir=...), or load_split("sample").'
        ) from exc
    hub_args, text_column = _HUB[dataset]
    try:
        rows = load_dataset(*hub_args, split=split)
    except Exception as exc:  # network, auth and cache errors all look different
        raise RuntimeError(
            f"Could not load {'/'.join(hub_args)} [{split}] from the Hugging Face Hub ({exc}). "
            f"Offline choices: load_split({dataset!r}, ...) on local files "
            f'(set {DATA_DIR_ENV} or pass data_dir=...), or load_split("sample").'
        ) from exc
    return [
        Example(dataset, split, i, text, int(label))
        for i, (text, label) in enumerate(zip(rows[text_column], rows["label"], strict=True))
    ]


def shuffled_indices(n: int, seed: int) -> list[int]:
    """Return ``range(n)`` shuffled exactly as LAMP shuffles dataset rows.

    Same permutation as ``np.random.seed(seed); np.random.shuffle(idxs)``,
    but drawn from a private generator, so global NumPy state is untouched.

    Args:
        n: Number of rows.
        seed: Run seed (LAMP's default is 101).

    Returns:
        A permutation of ``0..n-1``.
    """
    if n < 0:
        raise ValueError(f"n must be non-negative, got {n}")
    idxs = list(range(n))
    np.random.RandomState(seed).shuffle(idxs)
    return idxs


def sample_batches(
    examples: Sequence[Example], n_batches: int, batch_size: int, seed: int = 101
) -> list[list[Example]]:
    """Draw batches with LAMP's protocol.

    Shuffles the row indices with :func:`shuffled_indices`, keeps the first
    ``n_batches * batch_size`` and cuts them into consecutive batches.

    Args:
        examples: The split to draw from, usually ``load_split(..., "train")``.
        n_batches: Number of batches (LAMP's ``n_inputs``).
        batch_size: Sentences per batch.
        seed: Shuffle seed.

    Returns:
        ``n_batches`` lists of ``batch_size`` examples each, no example repeated.

    Raises:
        ValueError: A size is not positive, or more examples are requested
            than ``examples`` holds.
    """
    if n_batches <= 0 or batch_size <= 0:
        raise ValueError(f"n_batches and batch_size must be positive, got {n_batches} and {batch_size}")
    needed = n_batches * batch_size
    if needed > len(examples):
        raise ValueError(
            f"Requested {n_batches} batches of {batch_size} = {needed} examples, "
            f"but only {len(examples)} are available."
        )
    chosen = [examples[i] for i in shuffled_indices(len(examples), seed)[:needed]]
    return [chosen[i : i + batch_size] for i in range(0, needed, batch_size)]


def prior_texts(
    attacked: tuple[str, str],
    data_dir: str | os.PathLike[str] | None = None,
    *,
    splits: Sequence[tuple[str, str]] | None = None,
) -> tuple[list[str], list[str]]:
    """Sentences for a language-model prior, never from the split under attack.

    An attacker's prior (e.g. :class:`gilib.attack.NgramPrior`) must not
    have seen the sentences it helps to rebuild, or it hands the attack the
    answer. This gathers every split available on this machine except the
    attacked one: the bundled sample always, the benchmark files when there
    is a data folder. Use it as
    ``NgramPrior.from_texts(tokenizer, prior_texts(attacked)[0])``.

    Args:
        attacked: ``(dataset, split)`` under attack, e.g. ``("cola", "train")``;
            its sentences are never returned.
        data_dir: folder of the benchmark files (default:
            :func:`default_data_dir`); without one, only the bundled sample
            is used.
        splits: the ``(dataset, split)`` pairs to draw from (default: every
            local split but ``attacked``); a missing one is an error here.

    Returns:
        ``(texts, sources)``: the sentences, in split order, and the
        ``"dataset/split"`` names they came from.

    Raises:
        ValueError: for an unknown attacked dataset or split, ``splits``
            that include the attacked split, or no text left to count.
        FileNotFoundError: for a split named in ``splits`` whose files are
            not on this machine.
    """
    attacked = tuple(attacked)
    if len(attacked) != 2:
        raise ValueError(f"attacked must be a (dataset, split) pair, got {attacked!r}.")
    # Local or hub: a typo must not leave the attacked split in the prior.
    _check_split(*attacked, {d: tuple(dict.fromkeys(_LOCAL_SPLITS[d] + (_HUB_SPLITS if d in _HUB else ())))
                             for d in DATASETS})
    if data_dir is None:
        data_dir = default_data_dir()
    if splits is not None:
        chosen = [tuple(pair) for pair in splits]
        if attacked in chosen:
            raise ValueError(
                f"{attacked[0]}/{attacked[1]} is the split under attack: a prior counted from it would hand the "
                "attacker the answer. Leave it out of splits."
            )
        explicit = True
    else:
        chosen = [(d, s) for d in DATASETS for s in _LOCAL_SPLITS[d]
                  if (d, s) != attacked and (d == "sample" or data_dir is not None)]
        explicit = False
    texts: list[str] = []
    sources: list[str] = []
    for dataset, split in chosen:
        try:
            examples = load_split(dataset, split, data_dir)
        except FileNotFoundError:
            if explicit:
                raise
            continue  # its files are not on this machine
        texts += [e.text for e in examples]
        sources.append(f"{dataset}/{split}")
    if not texts:
        raise ValueError(
            f"No text besides {attacked[0]}/{attacked[1]} is available for a prior: "
            f"set {DATA_DIR_ENV} to the benchmark files, or pass data_dir=..."
        )
    return texts, sources


# --------------------------------------------------------------------------
# Local file parsing
# --------------------------------------------------------------------------


def _check_split(dataset: str, split: str, splits: dict[str, tuple[str, ...]]) -> None:
    """Raise a ValueError naming the valid choices when ``dataset`` or ``split`` is unknown."""
    if dataset not in splits:
        raise ValueError(f"Unknown dataset {dataset!r}; choose one of {tuple(splits)}.")
    if split not in splits[dataset]:
        raise ValueError(f"Unknown split {split!r} for dataset {dataset!r}; valid splits are {splits[dataset]}.")


def _require_file(path: Path) -> Path:
    """Return ``path`` resolved, or raise a FileNotFoundError that says what to do."""
    path = path.expanduser().resolve()
    if not path.is_file():
        raise FileNotFoundError(f"Expected data file {path} does not exist. {_OFFLINE_HINT}")
    return path


def _local_files(dataset: str, split: str) -> tuple[str, ...]:
    """Return the files, relative to the data folder, that make up a split."""
    if dataset == "cola":
        return ("cola/train.tsv",) if split == "train" else ("cola/dev.tsv", "cola/out_of_domain_dev.tsv")
    if dataset == "sst2":
        return ("sst2/train.tsv",) if split == "train" else ("sst2/dev.tsv",)
    return ("rotten_tomatoes/rt-polarity.pos", "rotten_tomatoes/rt-polarity.neg")


def _tsv_rows(path: Path) -> list[list[str]]:
    """Read a UTF-8 TSV file literally: no quote handling (sentences contain quotes)."""
    with path.open(encoding="utf-8", newline="") as f:
        return list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))


@functools.lru_cache(maxsize=None)
def _read_sample(path: Path) -> tuple[Example, ...]:
    """Parse the bundled sample (header ``id task label sentence``)."""
    header, *rows = _tsv_rows(path)
    col = {name: i for i, name in enumerate(header)}
    return tuple(
        Example("sample", "train", int(row[col["id"]]), row[col["sentence"]], int(row[col["label"]])) for row in rows
    )


@functools.lru_cache(maxsize=None)
def _read_cola(split: str, paths: tuple[Path, ...]) -> tuple[Example, ...]:
    """Parse CoLA: no header; column 2 is the label, column 4 the sentence.

    Validation is in-domain dev followed by out-of-domain dev, as in GLUE.
    """
    rows = [row for path in paths for row in _tsv_rows(path)]
    return tuple(Example("cola", split, i, row[3], int(row[1])) for i, row in enumerate(rows))


@functools.lru_cache(maxsize=None)
def _read_sst2(split: str, paths: tuple[Path, ...]) -> tuple[Example, ...]:
    """Parse SST-2: header ``sentence label``; the trailing space of each sentence is kept."""
    (path,) = paths
    _header, *rows = _tsv_rows(path)
    return tuple(Example("sst2", split, i, row[0], int(row[1])) for i, row in enumerate(rows))


@functools.lru_cache(maxsize=None)
def _read_rotten_tomatoes(split: str, paths: tuple[Path, ...]) -> tuple[Example, ...]:
    """Parse Rotten Tomatoes as Hugging Face does: positives (label 1), then negatives (label 0).

    The files are Latin-1 and contain byte 0x85, which decodes to U+0085, a
    character ``str.splitlines`` treats as a line break; hence ``split("\\n")``.
    """
    pos_path, neg_path = paths
    cut = _RT_CUTS[split]
    texts_labels = [
        (text, label)
        for path, label in ((pos_path, 1), (neg_path, 0))
        for text in _latin1_lines(path)[cut]
    ]
    return tuple(Example("rotten_tomatoes", split, i, text, label) for i, (text, label) in enumerate(texts_labels))


def _latin1_lines(path: Path) -> list[str]:
    """Return the stripped lines of a Latin-1 file, like ``[l.strip() for l in f.readlines()]``."""
    lines = path.read_text(encoding="latin-1").split("\n")
    if lines[-1] == "":  # the text after the final newline is not a line
        lines.pop()
    return [line.strip() for line in lines]


_READERS: dict[str, Callable[[str, tuple[Path, ...]], tuple[Example, ...]]] = {
    "cola": _read_cola,
    "sst2": _read_sst2,
    "rotten_tomatoes": _read_rotten_tomatoes,
}
