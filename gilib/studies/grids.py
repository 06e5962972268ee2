"""Grids of attack runs: one JSON line per attacked sentence, resumable, parallel.

A grid file (YAML) names a model, datasets, selections and attack settings;
every combination is a *cell*, and every cell attacks the same seeded sample
of sentences from each dataset (LAMP's protocol, :func:`gilib.data.sample_batches`).
Example::

    name: layers
    model: minilm         # or one victim per dataset: {cola: minilm-cola, sst2: minilm-sst2, ...}
    datasets: [cola, [sst2, validation], rotten_tomatoes]   # a [dataset, split] pair overrides split
    split: train
    sentences: 4          # per dataset and cell; every batch size divides it
    sample_seed: 101      # which sentences
    clients_per_task: 4   # client batches attacked together in one batched call
    batch_sizes: [1, 2]   # optional: sentences per client batch, one cell each (default [1])
    attack: {steps: 200, init_candidates: 100, swap_candidates: 100}
    seeds: [0]            # attack seeds
    selections:
      - {component: full, batch_sizes: [1, 2, 4]}        # a selection's own batch sizes replace the grid's
      - {component: layer, layers: [0, 1, 2, 3, 4, 5]}   # a list expands to one cell per layer
      - {component: layer, layers: [[0, 1]]}             # a nested list is one combined cell
      - {component: layer, layers: [4], sentences: 10}   # more sentences for this selection (a longer
                                                         # prefix of the same seeded sample)
    prior: ngram          # optional: the attack's reordering rounds use an n-gram prior counted from
                          # every local split but the attacked one (gilib.data.prior_texts); default none
    dp:                   # optional: the client runs a DP-SGD step (gilib.dp)
      noise_multipliers: [0, 0.1, 0.5]
      max_grad_norm: 1.0
      readings: [raw, privatised]   # attack p.grad before or after the DP optimizer's pre_step()
      protocol: local       # optional: local (the client adds the noise, gilib.client.DPSGD; the default)
                            # or central (gilib.client.CentralDP: the client sends its clipped, un-noised
                            # update and the server adds the noise; its one reading, clipped, is what the
                            # server receives)

Each finished sentence appends one line to the output: the cell's settings,
the dataset and row id, ROUGE-1/2/L, seconds and the git commit. A client
batch of B > 1 sentences (``batch_sizes``, for the whole grid or for one
selection) is attacked as one gradient, as LAMP does: the attack returns B sentences in an order of its own, each is
paired with a true sentence by the Hungarian matching of
:func:`gilib.metrics.match_batch`, and every true sentence gets the line of
the reconstruction paired with it (``batch`` lists the batch's row ids,
``seconds`` is the batch's time over B). The cell records ``batch_size``
only when it is above 1, so the keys of batch-1 results never change. Results
keep dataset row ids, never the text of CoLA, SST-2 or Rotten Tomatoes;
only for the bundled sample (our own sentences) the reconstruction is kept.

A run skips every (cell, dataset, row) already in the output, so a killed
run resumes where it stopped and loses only the tasks in flight (at most
``clients_per_task`` sentences per worker). Tasks run in worker processes
through joblib, one torch thread each, and the parent alone writes the file.

The client's update comes from :func:`gilib.client.client_update`, the
runner (resume, safe appends, local workers or a Dask cluster) from
:func:`gilib.studies.runner.run`. Command line::

    python -m gilib.studies grids run GRID.yaml --out data/results/NAME.jsonl [--jobs 2] [--device cpu]
    python -m gilib.studies grids run GRID.yaml --out ... --scheduler tcp://host:8786   # on a Dask cluster
    python -m gilib.studies grids table data/results/NAME.jsonl [--by component layers] [--where batch_size=1]
    python -m gilib.studies grids batches data/results/NAME.jsonl ...   # the selections run at several batch sizes

A grid is checked whole before its first task runs (:func:`tasks`): its
datasets and splits when it is parsed, their files and sizes by
:func:`plan`, every selection against the victim by :func:`check_grid`, so
that a typo fails at once rather than after hours of attacks.
"""

from __future__ import annotations

import functools
import itertools
import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pandas as pd
import torch
import yaml

from ..attack import AttackConfig, NgramPrior, attack_clients
from ..client import DPSGD, CentralDP, client_update
from ..data import DATASETS, load_split, local_splits, prior_texts, sample_batches
from ..dp import clip_factors
from ..metrics import bootstrap_interval, interval_text, match_batch, rouge_scores
from ..models import cached_model, encode
from ..selection import COMPONENTS, select
from .store import read_lines
from .study import Study, Table, markdown_table, option

SCORES = ("rouge1", "rouge2", "rougeL")
PRIORS = ("ngram",)
"""The priors a grid may name: ``ngram`` is :class:`gilib.attack.NgramPrior`
counted from every local split but the attacked one."""
OWN_DATASETS = ("sample",)  # text we wrote: reconstructions may be stored


@dataclass(frozen=True)
class Cell:
    """One grid point: a model, a selection and attack settings.

    Attributes:
        model: a :func:`gilib.models.load_model` name.
        component: a :data:`gilib.selection.COMPONENTS` name.
        layers: a layer index, a tuple of indices, or ``None``.
        attack: :class:`~gilib.attack.AttackConfig` settings, as sorted pairs.
        dp: the client's DP-SGD settings, as sorted pairs (``None``: plain).
        prior: the attack's language-model prior (:data:`PRIORS`; ``None``:
            none); recorded in the key only when set, so the keys of
            prior-free results never change.
        batch_size: sentences per client batch.
        sentences: sentences per dataset for this cell (``None``: the
            grid's); not part of the cell's key, so that a cell given more
            sentences keeps the lines it has.
    """

    model: str
    component: str
    layers: int | tuple[int, ...] | None
    attack: tuple[tuple[str, Any], ...]
    dp: tuple[tuple[str, Any], ...] | None = None
    batch_size: int = 1
    prior: str | None = None
    sentences: int | None = field(default=None, compare=False)

    def key(self) -> str:
        """A canonical string that identifies the cell in a results file."""
        return json.dumps(self.describe(), sort_keys=True)

    def describe(self) -> dict:
        """The cell as plain JSON values."""
        layers = list(self.layers) if isinstance(self.layers, tuple) else self.layers
        described = {"model": self.model, "component": self.component, "layers": layers, **dict(self.attack)}
        if self.dp is not None:
            described["dp"] = dict(self.dp)
        if self.batch_size != 1:
            described["batch_size"] = self.batch_size
        if self.prior is not None:
            described["prior"] = self.prior
        return described


@dataclass
class Grid:
    """A parsed grid file.

    Attributes:
        name: the grid's name.
        cells: every combination of selection and attack seed.
        datasets: ``(dataset, split)`` pairs.
        sentences: sentences per dataset and cell (a cell's own
            ``sentences`` overrides it).
        sample_seed: seed of the sentence sample.
        clients_per_task: client batches attacked together in one task.
        source: the file's text, stored with the results.
    """

    name: str
    cells: list[Cell]
    datasets: list[tuple[str, str]]
    sentences: int
    sample_seed: int = 101
    clients_per_task: int = 1
    source: dict = field(default_factory=dict)
    victims: dict[str, str] | None = None

    def victim(self, cell: Cell, dataset: str) -> Cell:
        """The cell as it attacks ``dataset``: with that dataset's own victim when the grid names one per dataset."""
        if self.victims is None:
            return cell
        return replace(cell, model=self.victims[dataset])

    def largest_sample(self) -> int:
        """The most sentences any cell attacks per dataset."""
        return max([self.sentences] + [cell.sentences or 0 for cell in self.cells])


def load_grid(path: str | Path) -> Grid:
    """Read and check a grid file.

    Raises:
        FileNotFoundError: if the file does not exist.
        ValueError: if a field is missing or malformed, naming the field.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No grid file at {path}; the grids of the book are in data/results/*.yaml.")
    spec = yaml.safe_load(path.read_text()) or {}
    return parse_grid(spec, name=path.stem)


def parse_grid(spec: dict, name: str = "grid") -> Grid:
    """Build a :class:`Grid` from a grid file's content (see the module docstring)."""
    if not isinstance(spec, dict):
        raise ValueError(f"A grid file holds a mapping of fields (name, model, selections, ...), got {spec!r}.")
    known = {"name", "model", "datasets", "split", "sentences", "sample_seed", "clients_per_task", "attack",
             "seeds", "selections", "dp", "batch_sizes", "prior"}
    unknown = set(spec) - known
    if unknown:
        raise ValueError(f"Unknown grid field(s) {sorted(unknown)}; the fields are {sorted(known)}.")
    if not spec.get("selections"):
        raise ValueError("The grid has no 'selections': list at least one, e.g. {component: full}.")
    attack = dict(spec.get("attack") or {})
    try:
        AttackConfig(**attack)
    except (TypeError, ValueError) as err:
        raise ValueError(f"Bad 'attack' settings in the grid: {err}") from None
    attack.setdefault("objective", "cos")
    attack.setdefault("steps", AttackConfig.steps)
    defences = _dp_settings(spec.get("dp"))
    prior = spec.get("prior")
    if prior is not None and prior not in PRIORS:
        raise ValueError(f"Unknown 'prior' {prior!r}: the grid's prior is one of {list(PRIORS)}, or leave it out "
                         "for none.")
    sentences = spec.get("sentences", 5)
    if isinstance(sentences, bool) or not isinstance(sentences, int) or sentences < 1:
        raise ValueError(f"'sentences' must be a whole number, at least 1, got {sentences!r}.")
    batch_sizes = _batch_sizes(spec.get("batch_sizes", [1]), sentences)
    entries = [_selection(entry, batch_sizes, sentences) for entry in spec["selections"]]
    datasets = _datasets(spec.get("datasets", ["sample"]), spec.get("split", "train"))
    model, victims = _victims(spec.get("model", "minilm"), datasets)
    # Batch sizes in order of first mention: the grid's, then the selections' own.
    all_sizes = list(dict.fromkeys(batch_sizes + [size for _, _, sizes, _ in entries for size in sizes]))
    cells, seen = [], {}
    for seed, defence, batch_size in itertools.product(spec.get("seeds", [0]), defences, all_sizes):
        for (component, options, sizes, own), entry in zip(entries, spec["selections"]):
            if batch_size not in sizes:
                continue
            for layers in options:
                layers = tuple(layers) if isinstance(layers, list) else layers
                settings = {**attack, "seed": int(seed)}
                cell = Cell(model, component, layers, tuple(sorted(settings.items())), defence, batch_size,
                            sentences=own if own != sentences else None, prior=prior)
                if cell.key() in seen:
                    raise ValueError(f"Selections {seen[cell.key()]!r} and {entry!r} both hold the cell "
                                     f"{cell.describe()}: list each selection, layer and batch size once.")
                seen[cell.key()] = entry
                cells.append(cell)
    return Grid(
        name=spec.get("name", name),
        cells=cells,
        datasets=datasets,
        sentences=sentences,
        sample_seed=int(spec.get("sample_seed", 101)),
        clients_per_task=max(1, int(spec.get("clients_per_task", 1))),
        source=spec,
        victims=victims,
    )


def _victims(model, datasets: list[tuple[str, str]]) -> tuple[str, dict[str, str] | None]:
    """A grid's ``model``: one name, or a mapping from each dataset to its own victim.

    Returns:
        The name the cells carry (for a mapping, ``"per-dataset"``, replaced
        by :meth:`Grid.victim` when a dataset is attacked) and the mapping.

    Raises:
        ValueError: for anything else, or a mapping that misses a dataset of
            the grid or names one it does not attack.
    """
    if isinstance(model, str) and model:
        return model, None
    if not isinstance(model, dict) or not all(isinstance(v, str) and v for v in model.values()):
        raise ValueError(f"'model' is a victim name (e.g. minilm) or a mapping from each dataset to its victim "
                         f"(e.g. {{cola: minilm-cola, sst2: minilm-sst2}}); got {model!r}.")
    names = {dataset for dataset, _ in datasets}
    if set(model) != names:
        raise ValueError(f"'model' names a victim for {sorted(model)}, but the grid attacks {sorted(names)}: "
                         f"give one victim for each dataset of the grid, and no other.")
    return "per-dataset", dict(model)


def _datasets(entries, split) -> list[tuple[str, str]]:
    """A grid's ``datasets``: names or ``[dataset, split]`` pairs, each a split this machine can read.

    Raises:
        ValueError: for an entry that is neither, an unknown dataset or a
            split the dataset does not have, naming the choices.
    """
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"'datasets' is a list of dataset names or [dataset, split] pairs, e.g. "
                         f"[cola, [sst2, validation]]; got {entries!r}.")
    pairs = []
    for entry in entries:
        pair = (entry, split) if isinstance(entry, str) else entry
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
            raise ValueError(f"Bad dataset {entry!r} in the grid: give a name or a [dataset, split] pair.")
        dataset, part = pair
        if dataset not in DATASETS:
            raise ValueError(f"Unknown dataset {dataset!r} in the grid; choose one of: {', '.join(DATASETS)}.")
        if part not in local_splits(dataset):
            raise ValueError(f"Unknown split {part!r} of {dataset} in the grid; {dataset} has "
                             f"{', '.join(local_splits(dataset))}.")
        pairs.append((dataset, part))
    return pairs


def _selection(entry, batch_sizes: list[int], sentences: int) -> tuple[str, list, list[int], int]:
    """A grid's selection entry: its component, its layer options, its batch sizes and its sentences.

    Args:
        entry: ``{component: NAME, layers: ..., batch_sizes: [...],
            sentences: N}``; ``layers``, ``batch_sizes`` and ``sentences``
            are optional.
        batch_sizes: the grid's batch sizes, which the entry's own
            ``batch_sizes`` replace.
        sentences: sentences per dataset, which the entry's own
            ``sentences`` replaces; every batch size divides it.

    Raises:
        ValueError: for another field, an unknown component, bad batch sizes
            or a bad number of sentences.
    """
    fields = {"component", "layers", "batch_sizes", "sentences"}
    if not isinstance(entry, dict) or set(entry) - fields:
        raise ValueError(f"Bad selection {entry!r} in the grid: each is {{component: NAME, layers: ...}}, "
                         f"optionally with batch_sizes: [...] and sentences: N, and no other field.")
    component = entry.get("component")
    if component not in COMPONENTS:
        raise ValueError(f"Unknown component {component!r} in the grid; choose one of: {', '.join(COMPONENTS)}.")
    layer_list = entry.get("layers")
    options = layer_list if isinstance(layer_list, list) else [layer_list]
    own = entry.get("sentences", sentences)
    if isinstance(own, bool) or not isinstance(own, int) or own < 1:
        raise ValueError(f"'sentences' of selection {entry!r} must be a whole number, at least 1, got {own!r}.")
    where = f" of selection {entry!r}"
    batch_sizes = _batch_sizes(entry.get("batch_sizes", batch_sizes), own, where=where)
    return component, options, batch_sizes, own


def _batch_sizes(sizes, sentences: int, where: str = "") -> list[int]:
    """A ``batch_sizes`` list (the grid's, or a selection's: ``where``): whole numbers dividing ``sentences``."""
    if not isinstance(sizes, list) or not sizes:
        raise ValueError(f"'batch_sizes'{where} is a list of sentences per client batch, e.g. [1, 2, 4]; "
                         f"got {sizes!r}.")
    for size in sizes:
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"Each batch size{where} is a whole number, at least 1; got {size!r}.")
        if sentences % size:
            raise ValueError(f"'sentences' ({sentences} per dataset) must be a multiple of every batch size, "
                             f"and {size}{where} does not divide it.")
    if len(set(sizes)) != len(sizes):
        raise ValueError(f"'batch_sizes' {sizes}{where} repeats a size; list each once.")
    return sizes


DP_PROTOCOLS = ("local", "central")


def _dp_settings(spec: dict | None) -> list[tuple[tuple[str, Any], ...] | None]:
    """The DP settings of a grid's ``dp`` field, one per (noise, reading); ``[None]`` without it.

    A local-DP cell's settings are ``max_grad_norm``, ``noise_multiplier``
    and ``reading``, as they always were; a central-DP cell adds
    ``protocol: central``, and its one reading is ``clipped`` (what the
    server receives).
    """
    if spec is None:
        return [None]
    if not isinstance(spec, dict):
        raise ValueError(f"'dp' is a mapping (noise_multipliers, max_grad_norm, readings, protocol), got {spec!r}.")
    unknown = set(spec) - {"noise_multipliers", "max_grad_norm", "readings", "protocol"}
    if unknown:
        raise ValueError(f"Unknown 'dp' field(s) {sorted(unknown)}; use noise_multipliers, max_grad_norm, readings, "
                         f"protocol.")
    protocol = spec.get("protocol", "local")
    if protocol not in DP_PROTOCOLS:
        raise ValueError(f"Unknown dp protocol {protocol!r}: use 'local' (the client adds the noise, DP-SGD) or "
                         f"'central' (the server adds it to the aggregate).")
    if protocol == "central":
        readings = spec.get("readings", ["clipped"])
        if readings != ["clipped"]:
            raise ValueError(f"Central DP has one reading, 'clipped' (the client's clipped, un-noised update, what "
                             f"the server receives); got {readings}.")
    else:
        readings = spec.get("readings", ["privatised"])
        bad = [r for r in readings if r not in ("raw", "privatised")]
        if bad:
            raise ValueError(f"Unknown dp reading(s) {bad}: use 'raw' (p.grad after backward) or 'privatised'.")
    noises = spec.get("noise_multipliers", [])
    if not noises or any(float(n) < 0 for n in noises):
        raise ValueError("'dp' needs noise_multipliers: a list of sigmas, each 0 or more.")
    clip = float(spec.get("max_grad_norm", 1.0))
    if clip <= 0:
        raise ValueError(f"dp max_grad_norm must be positive, got {clip}.")
    central = (("protocol", "central"),) if protocol == "central" else ()
    return [tuple(sorted((("max_grad_norm", clip), ("noise_multiplier", float(n)), ("reading", r)) + central))
            for n in noises for r in readings]


def _done_key(cell_key: str, dataset: str, split: str, row_id: int) -> tuple:
    return (cell_key, dataset, split, int(row_id))


def _line_key(line: dict) -> tuple:
    """The :func:`_done_key` of a result line."""
    return _done_key(json.dumps(line["cell"], sort_keys=True), line["dataset"], line["split"], line["row_id"])


def plan(grid: Grid) -> list[tuple[Cell, str, str, list]]:
    """Every task of a grid: ``(cell, dataset, split, batches)``.

    Every cell attacks the same sentences of a dataset; a cell of batch size
    B groups them, in sample order, into client batches of B.
    """
    tasks = []
    for dataset, split in grid.datasets:
        examples = load_split(dataset, split)
        largest = grid.largest_sample()
        if len(examples) < largest:
            raise ValueError(
                f"{dataset}/{split} has {len(examples)} sentences, fewer than the grid's {largest}."
            )
        # LAMP's sample is a seeded shuffle's prefix: a cell of n sentences
        # attacks the first n, the same as a grid of n would.
        sample = [b[0] for b in sample_batches(examples, largest, 1, seed=grid.sample_seed)]
        for cell in grid.cells:
            chosen = sample[: cell.sentences or grid.sentences]
            size, per_task = cell.batch_size, grid.clients_per_task
            batches = [chosen[i : i + size] for i in range(0, len(chosen), size)]
            cell = grid.victim(cell, dataset)
            # Fixed groups: client i of a group is seeded with seed + i, so a
            # resumed run must group the batches exactly as a fresh one does.
            tasks += [(cell, dataset, split, batches[i : i + per_task]) for i in range(0, len(batches), per_task)]
    return tasks


def check_grid(grid: Grid, device: str = "cpu") -> None:
    """Check every cell's selection on the victim before the first task runs.

    :func:`tasks` calls it after :func:`plan`, which reads every split (a
    missing file, or fewer sentences than the grid asks for, fails there),
    so that no task fails after the ones before it have run (a layer the
    model does not have fails here).

    Raises:
        ValueError: naming the selection and what to fix.
    """
    cells = [grid.victim(cell, dataset) for dataset, _ in grid.datasets for cell in grid.cells]
    for name in sorted({cell.model for cell in cells}):
        model, _ = cached_model(name, 0, device)
        for cell in cells:
            if cell.model == name:
                try:
                    select(model, cell.component, _layers(cell))
                except ValueError as err:
                    raise ValueError(f"Bad selection in the grid: {err}") from None


def _layers(cell: Cell):
    return list(cell.layers) if isinstance(cell.layers, tuple) else cell.layers


def run_task(cell: Cell, dataset: str, split: str, batches: list[list], device: str = "cpu",
             threads: int = 1) -> list[dict]:
    """Attack a few client batches of one cell together; one result line per sentence.

    The client side (the true sentences and their update) and the server
    side (the attack, which gets only the shared update) meet only in the
    metrics.
    """
    if threads:
        torch.set_num_threads(threads)
    model, tokenizer = cached_model(cell.model, 0, device)
    selection = select(model, cell.component, _layers(cell))
    updates, extras = [], []
    for batch in batches:
        true_batch = encode(tokenizer, [ex.text for ex in batch], [ex.label for ex in batch], device=device)
        protocol, extra = None, {}
        if cell.dp is not None:
            settings = dict(cell.dp)
            # The noise is seeded by the batch's first sentence, so it does not depend on how a run was split.
            seed = int(batch[0].row_id) + 100_003 * dict(cell.attack)["seed"]
            if settings.get("protocol") == "central":  # the server's view: the clipped, un-noised update
                protocol = CentralDP(settings["noise_multiplier"], settings["max_grad_norm"], seed=seed)
            else:
                protocol = DPSGD(settings["noise_multiplier"], settings["max_grad_norm"], seed=seed,
                                 reading=settings["reading"])
        update = client_update(model, selection, true_batch, protocol)
        if update.dp is not None:
            clip = clip_factors(update.dp.per_example_norms, settings["max_grad_norm"])
            extra = {"dp_cosine": update.dp.cosine(), "clip_factor": float(clip.mean())}
        updates.append(update.shared)
        extras.append(extra)
    config = AttackConfig(**dict(cell.attack), progress=False)
    prior = _prior(cell, tokenizer, dataset, split)
    rebuilt = attack_clients(model, tokenizer, updates, selection, config, prior=prior)
    lines = []
    for batch, update, result, extra in zip(batches, updates, rebuilt, extras):
        references = [ex.text for ex in batch]
        order = match_batch(result.texts, references) if len(batch) > 1 else [0]
        for ex, length, j in zip(batch, update.lengths, order):
            scores = rouge_scores(result.texts[j], ex.text)
            line = {
                "cell": cell.describe(),
                "dataset": dataset,
                "split": split,
                "row_id": ex.row_id,
                **({"batch": [e.row_id for e in batch]} if len(batch) > 1 else {}),
                "tokens": int(length),
                "selection": selection.label,
                "numel": selection.numel,
                "fraction": selection.fraction,
                **{k: scores[k] for k in SCORES},
                "final_loss": result.final_loss,
                **extra,
                "seconds": result.seconds / len(batch),
                "device": device,
            }
            if dataset in OWN_DATASETS:
                line["reconstruction"] = result.texts[j]
                line["reference"] = ex.text
            lines.append(line)
    return lines


def _prior(cell: Cell, tokenizer, dataset: str, split: str) -> NgramPrior | None:
    """The cell's prior for an attack on ``dataset``/``split``, counted without that split."""
    if cell.prior is None:
        return None
    return ngram_prior(cell.model, dataset, split)


@functools.lru_cache(maxsize=8)
def ngram_prior(model: str, dataset: str, split: str) -> NgramPrior:
    """The attacker's n-gram prior for ``model``'s tokens against ``dataset``/``split``: every other local split.

    Counting some 80,000 sentences takes seconds: once per process, not per task.
    """
    _, tokenizer = cached_model(model, 0, "cpu")
    return NgramPrior.from_texts(tokenizer, prior_texts((dataset, split))[0])


def run_grid(
    grid: Grid | str | Path,
    out: str | Path,
    *,
    jobs: int = 1,
    device: str = "cpu",
    threads: int = 1,
    scheduler: str | None = None,
    limit: int | None = None,
    progress: bool = True,
) -> list[dict]:
    """Run (or resume) a grid, appending one JSON line per attacked sentence to ``out``.

    Args:
        grid: a :class:`Grid` or the path of a grid file.
        out: the results file (JSON lines); created with its folders.
        jobs: worker processes (joblib), or Dask workers with
            ``scheduler="local"``; 1 runs in this process.
        device: ``"cpu"`` or ``"cuda"``.
        threads: torch threads per worker (0: torch's default).
        scheduler: a Dask scheduler's address, or ``"local"`` (see
            :func:`gilib.studies.runner.run`); ``None`` runs on this machine.
        limit: stop after this many tasks (tests use it to simulate a kill).
        progress: print one line per finished task.

    Returns:
        Every line of ``out`` after the run, old and new.
    """
    return STUDY.run(out, tasks(grid, device=device, threads=threads), jobs=jobs, scheduler=scheduler, limit=limit,
                     progress=progress)


def tasks(grid: Grid | str | Path, *, device: str = "cpu", threads: int = 1) -> list[tuple]:
    """Every task of a grid, checked whole first (:func:`check_grid`): the runner skips those already done."""
    if not isinstance(grid, Grid):
        grid = load_grid(grid)
    planned = plan(grid)  # reads every split first
    check_grid(grid, device)
    return [(cell, dataset, split, group, device, threads) for cell, dataset, split, group in planned]


def _task_keys(cell: Cell, dataset: str, split: str, batches: list[list], *_) -> list[tuple]:
    return [_done_key(cell.key(), dataset, split, ex.row_id) for batch in batches for ex in batch]


def _flat(rows: Iterable[dict] | str | Path) -> pd.DataFrame:
    """Result lines as one flat table: the cell's fields (DP settings included) beside the line's."""
    if isinstance(rows, (str, Path)):
        rows = read_lines(rows)
    flat = []
    for r in rows:
        cell = dict(r["cell"])
        dp = cell.pop("dp", None)
        if dp:  # noise_multiplier, max_grad_norm, reading, and protocol (local unless the cell says central)
            cell.update({"protocol": "local", **dp})
        cell.setdefault("batch_size", 1)
        if not isinstance(cell.get("layers"), int):
            # here, not in the frame: a column of None and ints would turn float
            cell["layers"] = layers_text(cell.get("layers"))
        flat.append({**cell, **{k: v for k, v in r.items() if k != "cell"}})
    if not flat:
        raise ValueError("No results to summarize: run the grid first (python -m gilib.studies grids run ...).")
    return pd.DataFrame(flat)


def summarize(rows: Iterable[dict] | str | Path, by: Iterable[str] = ("component", "layers"),
              where: dict[str, Any] | None = None) -> pd.DataFrame:
    """Mean, standard deviation and count of the scores, per group.

    Args:
        rows: result lines, or the path of a results file.
        by: cell fields (``model``, ``component``, ``layers``, ``seed``,
            ``batch_size``, ...) and/or ``dataset`` to group by.
        where: keep only the lines whose field has this value (compared as
            text, e.g. ``{"batch_size": 1}`` or ``{"layers": "0"}``), before
            grouping.

    Returns:
        One row per group: ``<score>``, ``<score>_std``, ``n``, ``seconds``,
        and the selection's share of parameters.

    Raises:
        ValueError: for no results, an unknown field, or lines of several
            client batch sizes when ``by`` does not hold ``batch_size`` (a
            mean over batch sizes would mix two experiments).
    """
    df = _flat(rows)
    by = list(by)
    missing = [b for b in by if b not in df.columns]
    if missing:
        raise ValueError(f"Cannot group by {missing}; the results have {sorted(df.columns)}.")
    for name, value in (where or {}).items():
        if name not in df.columns:
            raise ValueError(f"Cannot filter on {name!r}; the results have {sorted(df.columns)}.")
        df = df[df[name].astype(str) == str(value)]
    if df.empty:
        raise ValueError(f"No results with {where}.")
    sizes = sorted(int(b) for b in df["batch_size"].unique())
    if len(sizes) > 1 and "batch_size" not in by:
        raise ValueError(f"The results hold client batches of {sizes} sentences: group by batch_size, or keep "
                         f"one size with where={{'batch_size': 1}} (--where batch_size=1).")
    grouped = df.groupby(by, sort=False, dropna=False)
    table = grouped[list(SCORES)].mean()
    for score in SCORES:
        table[f"{score}_std"] = grouped[score].std(ddof=1).fillna(0.0)
    table["n"] = grouped.size()
    table["seconds"] = grouped["seconds"].mean()
    table["fraction"] = grouped["fraction"].mean()
    if "dp_cosine" in df.columns:  # DP cells: how much of the raw direction survived privatisation
        table["dp_cosine"] = grouped["dp_cosine"].mean()
    return table.reset_index().sort_values(by, key=lambda column: column.map(_natural)).reset_index(drop=True)


def intervals(rows: Iterable[dict] | str | Path, by: Iterable[str] = ("component", "layers"),
              where: dict[str, Any] | None = None, score: str = "rouge1") -> pd.DataFrame:
    """Mean of a score per group with its 95 % bootstrap interval, resampling the independent unit.

    A sentence attacked alone is its own unit; the sentences of one client
    batch share a gradient, so a batch is one unit (the mean of its
    sentences) and the interval resamples batches
    (:func:`gilib.metrics.bootstrap_interval`).

    Args:
        rows: result lines, or the path of a results file.
        by: the groups, as in :func:`summarize` (``batch_size`` among them
            when the lines hold several batch sizes).
        where: keep only the lines whose field has this value, as in :func:`summarize`.
        score: ``rouge1``, ``rouge2`` or ``rougeL``.

    Returns:
        One row per group: ``<score>``, ``low``, ``high``, ``n`` (sentences),
        ``units`` (client batches), and ``dp_cosine`` when the lines have it.
    """
    df = _flat(rows)
    by = list(by)
    for name, value in (where or {}).items():
        if name not in df.columns:
            raise ValueError(f"Cannot filter on {name!r}; the results have {sorted(df.columns)}.")
        df = df[df[name].astype(str) == str(value)]
    missing = [b for b in by if b not in df.columns]
    if missing or df.empty:
        raise ValueError(f"Cannot group by {missing}; the results have {sorted(df.columns)}." if missing
                         else f"No results with {where}.")
    if df["batch_size"].nunique() > 1 and "batch_size" not in by:
        raise ValueError("The results hold several client batch sizes: group by batch_size.")
    unit = [tuple(b) if isinstance(b, list) else (r,) for b, r in
            zip(df["batch"] if "batch" in df else [None] * len(df), df["row_id"])]
    df = df.assign(_unit=[f"{d}/{u}" for d, u in zip(df["dataset"], unit)])
    out = []
    for key, part in df.groupby(by, sort=False, dropna=False):
        per_unit = part.groupby("_unit", sort=False)[score].mean()
        low, high = bootstrap_interval(per_unit.to_numpy())
        row = dict(zip(by, key if isinstance(key, tuple) else (key,)))
        row.update({score: float(part[score].mean()), "low": low, "high": high, "n": len(part),
                    "units": len(per_unit), "fraction": float(part["fraction"].mean())})
        if "dp_cosine" in part:
            row["dp_cosine"] = float(part["dp_cosine"].mean())
        out.append(row)
    return pd.DataFrame(out).sort_values(by, key=lambda column: column.map(_natural)).reset_index(drop=True)


def score_intervals(rows: Iterable[dict] | str | Path, by: Iterable[str] = ("component", "layers"),
                    where: dict[str, Any] | None = None,
                    scores: Iterable[str] = ("rouge1", "rouge2")) -> pd.DataFrame:
    """:func:`intervals` of several scores side by side: ``<score>``, ``<score>_low``, ``<score>_high`` each.

    The table :func:`gilib.book.plots.layer_bars` draws with
    ``low="{}_low", high="{}_high"``; ``n``, ``units`` and ``fraction`` as
    in :func:`intervals`.
    """
    rows = list(read_lines(rows) if isinstance(rows, (str, Path)) else rows)
    by, table = list(by), None
    for score in scores:
        one = intervals(rows, by=by, where=where, score=score).rename(
            columns={"low": f"{score}_low", "high": f"{score}_high"})
        table = one if table is None else table.merge(one[[*by, score, f"{score}_low", f"{score}_high"]], on=by)
    return table


def paired_differences(first: Iterable[dict], second: Iterable[dict], component: str, layers,
                       score: str = "rouge1") -> list[float]:
    """``score`` of ``first`` minus ``second`` on each sentence both attacked alone with this selection.

    A paired comparison (two victims, two readings of a gradient) on the
    same sentences: the interval of these differences
    (:func:`gilib.metrics.bootstrap_interval`) ranks the two where it
    excludes 0.

    Args:
        first, second: result lines, each holding one cell of the selection
            at batch size 1 (other cells are ignored).
        component, layers: the selection, as a cell describes it.
        score: ``rouge1``, ``rouge2`` or ``rougeL``.

    Returns:
        One difference per common sentence, in (dataset, split, row id) order.

    Raises:
        ValueError: if a sentence appears twice in one set (several cells of
            the selection: pass the lines of one), or none is in both.
    """
    return [a - b for a, b in _pairs(first, second, component, layers, score)]


def _cell_scores(rows, component: str, layers, score: str) -> dict[tuple, float]:
    """``score`` per sentence ``(dataset, split, row id)`` attacked alone with this selection.

    ``layers`` as a cell holds them (``None``, ``0``, ``[0, 1]``) or as
    :func:`layers_text` writes them (``"all"``, ``"0"``, ``"0+1"``).
    """
    wanted = layers if isinstance(layers, str) else layers_text(layers)
    kept = [r for r in rows if r["cell"]["component"] == component and layers_text(r["cell"]["layers"]) == wanted
            and r["cell"].get("batch_size", 1) == 1]
    found = {(r["dataset"], r["split"], r["row_id"]): r[score] for r in kept}
    if len(found) != len(kept):
        raise ValueError(f"The results hold a sentence of {component} {layers} more than once (several "
                         f"cells): pass the lines of one cell.")
    return found


def _pairs(first, second, component: str, layers, score: str,
           other: tuple[str, Any] | None = None) -> list[tuple[float, float]]:
    """``(first's score, second's score)`` of each sentence both attacked alone.

    With ``other``, ``second``'s lines are read for that selection
    ``(component, layers)`` instead of the same one.
    """
    a = _cell_scores(first, component, layers, score)
    b = _cell_scores(second, *(other or (component, layers)), score)
    common = sorted(set(a) & set(b))
    if not common:
        what = f"{component} {layers}" + (f" and {other[0]} {other[1]}" if other else "")
        raise ValueError(f"No sentence of {what} was attacked in both sets of results.")
    return [(a[k], b[k]) for k in common]


def cell_difference(rows: Iterable[dict] | str | Path, first: tuple[str, Any], second: tuple[str, Any],
                    score: str = "rouge1") -> dict:
    """Two cells of one grid, paired over the sentences both attacked: ``first`` minus ``second``.

    Where two cells' intervals overlap, the paired difference can still
    rank them (the sentence's own difficulty cancels); the prose ranks two
    cells only where this interval excludes 0.

    Args:
        rows: the grid's result lines (or their file).
        first, second: ``(component, layers)``, ``layers`` as cells hold
            them (``None`` for the full model, a list for several) or as
            :func:`layers_text` writes them (``"all"``, ``"0+1"``).
        score: ``rouge1``, ``rouge2`` or ``rougeL``.

    Returns:
        ``difference`` (the mean of the per-sentence differences), its 95 %
        bootstrap interval ``low``, ``high``, and ``n`` (common sentences).

    Raises:
        ValueError: if no sentence was attacked with both selections.
    """
    rows = list(read_lines(rows) if isinstance(rows, (str, Path)) else rows)
    pairs = np.asarray(_pairs(rows, rows, *first, score, other=second))
    differences = pairs[:, 0] - pairs[:, 1]
    low, high = bootstrap_interval(differences)
    return {"difference": float(differences.mean()), "low": low, "high": high, "n": len(differences)}


def paired(first: Iterable[dict] | str | Path, second: Iterable[dict] | str | Path,
           selections: Iterable[tuple[str, Any]], score: str = "rouge1") -> pd.DataFrame:
    """Two sets of results on the same sentences, per selection: both means and their paired difference.

    Args:
        first, second: result lines (or their files), e.g. a fine-tuned
            victim's and the pretrained one's, with the same attack settings.
        selections: ``(component, layers)`` pairs, as cells describe them
            (``layers`` ``None`` for the full model).
        score: ``rouge1``, ``rouge2`` or ``rougeL``.

    Returns:
        One row per selection: ``first``, ``second`` (means over the common
        sentences), ``difference`` (first minus second) with its 95 %
        bootstrap interval ``low``, ``high``, and ``n`` (common sentences).
    """
    first = list(read_lines(first) if isinstance(first, (str, Path)) else first)
    second = list(read_lines(second) if isinstance(second, (str, Path)) else second)
    out = []
    for component, layers in selections:
        pairs = np.asarray(_pairs(first, second, component, layers, score))
        low, high = bootstrap_interval(pairs[:, 0] - pairs[:, 1])
        out.append({"component": component, "layers": layers, "first": float(pairs[:, 0].mean()),
                    "second": float(pairs[:, 1].mean()), "difference": float((pairs[:, 0] - pairs[:, 1]).mean()),
                    "low": low, "high": high, "n": len(pairs)})
    return pd.DataFrame(out)


def batch_axis(rows: Iterable[dict] | str | Path, by: Iterable[str] = ("component", "layers")) -> pd.DataFrame:
    """The selections attacked at several client batch sizes, summarized per batch size.

    Args:
        rows: result lines, or the path of a results file.
        by: the groups within a batch size: ``component`` and ``layers``,
            and e.g. ``dataset`` for one row per dataset.

    Returns:
        :func:`summarize` by ``by`` and ``batch_size``, keeping only the
        selections with more than one batch size, each over the sentences
        it attacked at every one of its batch sizes (a headline cell may
        hold more sentences at batch size 1).
    """
    table = summarize(_batch_rows(rows), by=[*by, "batch_size"])
    sizes = table.groupby(["component", "layers"])["batch_size"].transform("nunique")
    if not (sizes > 1).any():
        raise ValueError("No selection of these results was attacked at more than one batch size.")
    return table[sizes > 1].reset_index(drop=True)


def on_shared_sentences(rows: Iterable[dict] | str | Path) -> list[dict]:
    """The lines on the sentences every cell attacked alone (batch size 1).

    A grid whose headline cells hold a longer prefix of the sample than the
    others compares its cells on the sentences they all hold: a heatmap of
    means over different sentences would rank the sentences, not the cells.
    """
    rows = list(read_lines(rows) if isinstance(rows, (str, Path)) else rows)
    per_cell: dict[str, set] = {}
    for r in rows:
        if r["cell"].get("batch_size", 1) == 1:
            per_cell.setdefault(json.dumps(r["cell"], sort_keys=True), set()).add(
                (r["dataset"], r["split"], r["row_id"]))
    if not per_cell:
        raise ValueError("No lines of one sentence per client: nothing to compare.")
    shared = set.intersection(*per_cell.values())
    return [r for r in rows if (r["dataset"], r["split"], r["row_id"]) in shared]


def _per_sentence_marginals(rows, over: str, score: str) -> pd.DataFrame:
    """``(sentence x level of over)``: each sentence's mean score over the grid's other axis."""
    if over not in ("component", "layers"):
        raise ValueError(f"over must be 'component' or 'layers', got {over!r}.")
    df = _flat(on_shared_sentences(rows))
    df = df[df["batch_size"] == 1]
    if df.empty:
        raise ValueError("No lines of one sentence per client: nothing to compare.")
    df = df.assign(_sentence=[f"{d}/{s}/{r}" for d, s, r in zip(df["dataset"], df["split"], df["row_id"])],
                   layers=df["layers"].astype(str))
    return df.pivot_table(index="_sentence", columns=over, values=score, aggfunc="mean", sort=False)


def marginal(rows: Iterable[dict] | str | Path, over: str = "component", score: str = "rouge1") -> pd.DataFrame:
    """A heatmap's row or column means, each with a 95 % bootstrap interval over sentences.

    Each sentence attacked alone by every cell gets, per level of ``over``
    (a component, or a layer), its mean score over the other axis (the
    layers, or the components); the interval resamples sentences. Cells
    holding extra sentences are compared on the shared ones
    (:func:`on_shared_sentences`).

    Args:
        rows: a component x layer grid's result lines, or their file.
        over: ``"component"`` (means over layers) or ``"layers"`` (means
            over components).
        score: ``rouge1``, ``rouge2`` or ``rougeL``.

    Returns:
        One row per level, highest mean first: ``over``, ``<score>``,
        ``low``, ``high``, ``n`` (sentences).
    """
    rows = list(read_lines(rows) if isinstance(rows, (str, Path)) else rows)
    return _levels(_per_sentence_marginals(rows, over, score), over, score)


def _levels(table: pd.DataFrame, over: str, score: str) -> pd.DataFrame:
    """:func:`marginal`'s rows from the ``(sentence x level)`` means."""
    out = []
    for level in table.columns:
        values = table[level].dropna().to_numpy()
        low, high = bootstrap_interval(values)
        out.append({over: str(level), score: float(values.mean()), "low": low, "high": high, "n": len(values)})
    return pd.DataFrame(out).sort_values(score, ascending=False, kind="stable").reset_index(drop=True)


def marginal_difference(rows: Iterable[dict] | str | Path, over: str, first, second,
                        score: str = "rouge1") -> dict:
    """Two levels of a grid's axis compared sentence by sentence: ``first`` minus ``second``.

    The per-sentence means of :func:`marginal`, paired: the interval ranks
    the two where it excludes 0.

    Returns:
        ``{"difference", "low", "high", "n"}``.

    Raises:
        ValueError: for a level the grid does not hold.
    """
    rows = list(read_lines(rows) if isinstance(rows, (str, Path)) else rows)
    return _difference(_per_sentence_marginals(rows, over, score), over, first, second)


def _difference(table: pd.DataFrame, over: str, first, second) -> dict:
    """:func:`marginal_difference` from the ``(sentence x level)`` means."""
    for level in (first, second):
        if str(level) not in table.columns:
            raise ValueError(f"No {over} {level!r} in these results: they hold {', '.join(map(str, table.columns))}.")
    both = table[[str(first), str(second)]].dropna()
    differences = (both[str(first)] - both[str(second)]).to_numpy()
    low, high = bootstrap_interval(differences)
    return {"difference": float(differences.mean()), "low": low, "high": high, "n": len(differences)}


def batch_cost(rows: Iterable[dict] | str | Path, component: str, layers, size: int,
               score: str = "rouge1") -> dict:
    """What batching costs a selection: its score alone minus in client batches of ``size``, sentence by sentence.

    Paired over the sentences attacked both ways; the sentences of one
    client batch share a gradient, so the interval resamples batches (each
    batch's mean difference), as :func:`intervals` does.

    Returns:
        ``{"cost", "low", "high", "n", "batches"}``: the mean difference,
        its 95 % bootstrap interval, sentences and client batches.
    """
    rows = list(read_lines(rows) if isinstance(rows, (str, Path)) else rows)
    mine = [r for r in rows if r["cell"]["component"] == component and str(r["cell"]["layers"]) == str(layers)]
    alone = {(r["dataset"], r["row_id"]): r[score] for r in mine if r["cell"].get("batch_size", 1) == 1}
    costs: dict[tuple, list[float]] = {}
    for r in mine:
        if r["cell"].get("batch_size", 1) == size and (r["dataset"], r["row_id"]) in alone:
            costs.setdefault((r["dataset"], tuple(r["batch"])), []).append(alone[(r["dataset"], r["row_id"])]
                                                                          - r[score])
    if not costs:
        raise ValueError(f"No sentence of {component} {layers} was attacked both alone and in batches of {size}.")
    per_batch = [float(np.mean(v)) for v in costs.values()]
    flat = [c for v in costs.values() for c in v]
    low, high = bootstrap_interval(per_batch)
    return {"cost": float(np.mean(flat)), "low": low, "high": high, "n": len(flat), "batches": len(per_batch)}


def _batch_rows(rows: Iterable[dict] | str | Path) -> list[dict]:
    """The lines of each selection on the sentences it attacked at every one of its batch sizes."""
    rows = list(read_lines(rows) if isinstance(rows, (str, Path)) else rows)
    seen: dict[tuple, dict[int, set]] = {}
    for r in rows:
        selection = (r["cell"]["component"], json.dumps(r["cell"]["layers"]))
        seen.setdefault(selection, {}).setdefault(r["cell"].get("batch_size", 1), set()).add(
            (r["dataset"], r["split"], r["row_id"]))
    common = {selection: set.intersection(*sizes.values()) for selection, sizes in seen.items()}
    return [r for r in rows if (r["dataset"], r["split"], r["row_id"])
            in common[(r["cell"]["component"], json.dumps(r["cell"]["layers"]))]]


def sentence_lengths(rows: Iterable[dict] | str | Path) -> pd.DataFrame:
    """Each dataset's sample: how many sentences, and how long they are.

    Length is the sentence's word pieces, ``[CLS]`` and ``[SEP]`` not
    counted (a line's ``tokens`` minus 2). Every sentence counts once,
    however many cells attacked it.

    Args:
        rows: result lines, or the path of a results file.

    Returns:
        One row per dataset and split, in order of first appearance:
        ``sentences`` and the ``min``, ``median`` and ``max`` length.

    Raises:
        ValueError: if a sentence has lines of different lengths (results of
            two tokenizers mixed).
    """
    df = _flat(rows)
    pieces = df.assign(length=df["tokens"] - 2).groupby(["dataset", "split", "row_id"], sort=False)["length"]
    if (pieces.nunique() > 1).any():
        raise ValueError("A sentence has lines of different lengths: the results mix tokenizers.")
    per_sentence = pieces.first().reset_index()
    return (per_sentence.groupby(["dataset", "split"], sort=False)["length"]
            .agg(sentences="size", min="min", median="median", max="max").reset_index())


def _natural(value: Any) -> str:
    """A sort key that puts layer 2 before layer 10 and single layers before combinations."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return f"0{float(value):012.4f}"
    return f"1{value}"


def markdown(rows: Iterable[dict] | str | Path, by: Iterable[str] = ("component", "layers"),
             where: dict[str, Any] | None = None) -> str:
    """Result lines as a Markdown table: the groups, share of parameters, ROUGE-1/2 with 95 % intervals, n.

    Each mean comes with its bootstrap interval (:func:`intervals`, which
    resamples the independent unit: a sentence, or a client batch).
    """
    rows = list(read_lines(rows) if isinstance(rows, (str, Path)) else rows)
    return _interval_markdown(rows, list(by), where)


def _interval_markdown(rows: list[dict], by: list[str], where) -> str:
    spans = [intervals(rows, by=by, where=where, score=score) for score in ("rouge1", "rouge2")]
    lines = ([*(row[b] for b in by), f"{100 * row['fraction']:.2f} %",
              *(_span(span.iloc[i], score) for span, score in zip(spans, ("rouge1", "rouge2"))), int(row["n"])]
             for i, (_, row) in enumerate(spans[0].iterrows()))
    names = {"batch_size": "sentences per client"}
    return markdown_table([*(names.get(b, b) for b in by), "share of parameters", "ROUGE-1 [95 %]",
                           "ROUGE-2 [95 %]", "sentences"], lines)


def interval_column(table: pd.DataFrame, value: str = "rouge1", digits: int = 2, *,
                    signed: bool = False) -> list[str]:
    """Each row's ``value`` and its ``low``/``high`` columns as ``"0.54 [0.48, 0.61]"``.

    For a table of :func:`intervals` (or any with ``low`` and ``high``
    columns), e.g. ``table["ROUGE-1 [95 %]"] = interval_column(table)``;
    ``signed`` for paired differences (:func:`cell_difference`'s
    ``difference``): ``"+0.10 [-0.02, +0.21]"``.
    """
    return [interval_text(m, low, high, digits, signed=signed)
            for m, low, high in zip(table[value], table["low"], table["high"])]


def _span(row: pd.Series, score: str) -> str:
    return interval_text(row[score], row["low"], row["high"])


def batch_markdown(rows: Iterable[dict] | str | Path) -> str:
    """:func:`batch_axis` as the README's Markdown table: one row per selection and batch size.

    The largest selection comes first; ROUGE is the mean over the sentences
    (each scored once per batch size) with its 95 % interval, which
    resamples client batches.
    """
    table = batch_axis(rows)
    kept = {(c, str(l)) for c, l in zip(table["component"], table["layers"])}
    lines = [r for r in _batch_rows(rows) if (r["cell"]["component"], layers_text(r["cell"]["layers"])) in kept]
    parts = []
    for component, layers in _largest_first(table):
        mine = [r for r in lines
                if (r["cell"]["component"], layers_text(r["cell"]["layers"])) == (component, str(layers))]
        parts.append(_interval_markdown(mine, ["component", "layers", "batch_size"], None).splitlines())
    return "\n".join(parts[0][:2] + [line for part in parts for line in part[2:]])


def _largest_first(table: pd.DataFrame) -> list[tuple]:
    """The ``(component, layers)`` selections of a :func:`batch_axis` table, largest share of parameters first."""
    order = table.groupby(["component", "layers"], sort=False)["fraction"].first().sort_values(
        ascending=False, kind="stable")
    return list(order.index)


def cost_markdown(rows: Iterable[dict] | str | Path) -> str:
    """What batching costs each selection attacked at several batch sizes (:func:`batch_cost`), as Markdown.

    One row per selection and batch size above 1: the paired ROUGE-1 and
    ROUGE-2 costs (alone minus in client batches, on the same sentences)
    with their 95 % intervals over client batches.
    """
    rows = list(read_lines(rows) if isinstance(rows, (str, Path)) else rows)
    table = batch_axis(rows)
    lines = []
    for component, layers in _largest_first(table):
        cell_layers = None if layers == "all" else layers
        sizes = sorted(int(b) for b in table[(table["component"] == component)
                                             & (table["layers"].astype(str) == str(layers))]["batch_size"])
        for size in sizes[1:]:
            costs = [batch_cost(rows, component, cell_layers, size, score) for score in ("rouge1", "rouge2")]
            lines.append([component, layers, size,
                          *(interval_text(c["cost"], c["low"], c["high"]) for c in costs),
                          costs[0]["n"], costs[0]["batches"]])
    return markdown_table(["component", "layers", "sentences per client", "ROUGE-1 cost [95 %]",
                           "ROUGE-2 cost [95 %]", "sentences", "client batches"], lines)


def marginal_markdown(rows: Iterable[dict] | str | Path, over: str = "component") -> str:
    """A component x layer grid's means over one axis (:func:`marginal`), as Markdown.

    Each level with its ROUGE-1 and ROUGE-2 means and 95 % intervals over
    the sentences every cell attacked, highest ROUGE-1 first, and each
    level's paired ROUGE-1 difference to the next one down
    (:func:`marginal_difference`): an interval that excludes 0 ranks the two.
    """
    rows = list(read_lines(rows) if isinstance(rows, (str, Path)) else rows)
    means = _per_sentence_marginals(rows, over, "rouge1")
    first = _levels(means, over, "rouge1")
    second = _levels(_per_sentence_marginals(rows, over, "rouge2"), over, "rouge2").set_index(over)
    lines = []
    for i, row in first.iterrows():
        two = second.loc[row[over]]
        step = ""
        if i + 1 < len(first):
            d = _difference(means, over, row[over], first.loc[i + 1, over])
            step = interval_text(d["difference"], d["low"], d["high"], signed=True)
        lines.append([row[over], _span(row, "rouge1"),
                      _span(two, "rouge2"), step, int(row["n"])])
    names = {"component": "weight (mean over layers)", "layers": "layer (mean over weights)"}
    return markdown_table([names[over], "ROUGE-1 [95 %]", "ROUGE-2 [95 %]", "ROUGE-1 minus the next [95 %]",
                           "sentences"], lines)


def layers_text(layers) -> str:
    """A cell's ``layers`` as :func:`summarize` writes them: ``all``, ``0`` or ``0+1``."""
    if layers is None:
        return "all"
    return "+".join(map(str, layers)) if isinstance(layers, list) else str(layers)


def _where(pairs: list[str]) -> dict[str, str]:
    """``["batch_size=1", ...]`` from the command line, as :func:`summarize`'s ``where``."""
    bad = [p for p in pairs if "=" not in p]
    if bad:
        raise ValueError(f"--where takes FIELD=VALUE pairs, e.g. batch_size=1; got {bad[0]!r}.")
    return {name: value for name, _, value in (p.partition("=") for p in pairs)}


def _label(lines: list[dict]) -> str:
    cell = lines[0]["cell"]
    return (f"{cell['component']} {cell['layers']} {lines[0]['dataset']}: ROUGE-1 "
            + " ".join(f"{line['rouge1']:.2f}" for line in lines))


STUDY = Study(
    name="grids",
    description="attack grids of chapters 2 to 4: one line per attacked sentence (data/results/ch*_*.yaml)",
    plan=lambda args: tasks(args.grid, device=args.device, threads=args.threads),
    work=run_task,
    task_keys=_task_keys,
    line_key=_line_key,
    label=_label,
    run_options=(
        option("grid", type=Path, help="the grid file (YAML), e.g. data/results/ch2_layers.yaml"),
        option("--device", default="cpu"),
        option("--threads", type=int, default=1, help="torch threads per worker (0: torch's default)"),
    ),
    tables=(
        Table("table", "mean ROUGE per group with its 95 % bootstrap interval, as Markdown",
              lambda args: markdown([line for path in args.results for line in read_lines(path)],
                                    by=args.by, where=_where(args.where)),
              (option("results", type=Path, nargs="+", help="results files (their lines are pooled)"),
               option("--by", nargs="+", default=["component", "layers"], help="cell fields or dataset"),
               option("--where", nargs="+", default=[], metavar="FIELD=VALUE",
                      help="keep only the lines whose field has this value, e.g. layers=0 or batch_size=1"))),
        Table("batches", "the selections attacked at several client batch sizes, as Markdown",
              lambda args: batch_markdown([line for path in args.results for line in read_lines(path)]),
              (option("results", type=Path, nargs="+", help="results files (their lines are pooled)"),)),
        Table("costs", "what batching costs each selection, paired over the same sentences, as Markdown",
              lambda args: cost_markdown([line for path in args.results for line in read_lines(path)]),
              (option("results", type=Path, nargs="+", help="results files (their lines are pooled)"),)),
        Table("marginals", "a component x layer grid's means over layers (or weights), ranked, as Markdown",
              lambda args: marginal_markdown(args.results, over=args.over),
              (option("results", type=Path, help="a component x layer grid's results file"),
               option("--over", default="component", choices=["component", "layers"],
                      help="component: each weight's mean over the layers; layers: each layer's over the weights"))),
    ),
)
"""The attack grids as a study (``python -m gilib.studies grids ...``)."""
