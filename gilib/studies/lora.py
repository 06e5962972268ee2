"""Measurements of chapter 7: what a LoRA client's adapter updates leak.

A LoRA client (Hu et al., "LoRA: Low-Rank Adaptation of Large Language
Models", ICLR 2022) trains and shares low-rank adapters alone: partial by
design. Every client here is MiniLM with adapters from
:func:`gilib.lora.lora_victim` (rank ``r``, ``alpha = 2 r``, seeded ``A``)
after :data:`WARMUP` public AdamW warm-up rounds, which move ``B`` off zero
(while ``B = 0`` the ``A`` gradient is zero); the server knows that global
model, it sent it. Each message is one sentence's adapter update, computed
by :func:`gilib.client.client_update`, and is attacked twice:

* the **span check** (DAGER's idea, Petrov et al., NeurIPS 2024, on the
  stacked layer-0 ``A`` gradients: :func:`gilib.attack.span_attack`, and
  :func:`gilib.attack.adapter_span_attack` for several rounds): exact
  exactly when the stacked rank reaches the sentence's token count (the
  rank rule, :mod:`gilib.attack.adapters`);
* LAMP's **optimisation attack** (Balunovic et al., NeurIPS 2022;
  :func:`gilib.attack.optimization_attack` at chapter 6's settings,
  :data:`gilib.studies.federated.ATTACK`) on every adapter's ``A`` and
  ``B`` (``select(victim, "lora", layers)``), and, as the reference the
  issue's target names, on layer 0's full query and value gradients of the
  plain victim (:data:`REFERENCE`): "adapter ROUGE-1 within 0.1 of the full
  layer-0 query/value ROUGE-1, or explain the gap".

The grid (:class:`Grid`; :data:`GRIDS` ``fast`` and ``full``) varies one
thing at a time around :data:`BASE` (``r = 8``, query and value adapters on
layer 0, one round, FedSGD):

* ``r`` (:data:`RANKS`); the adapters shared (:data:`ADAPTERS`: query,
  value, both on layer 0, both on every layer); the sentence's length
  (recorded per line; tables bin it against the stacked rank);
* the rounds observed (:data:`ROUNDS`): the same client's messages of one
  sentence in ``k`` consecutive rounds, the global model one more public
  warm-up step further each round (a stand-in for the other clients'
  aggregate moving ``B``), stacked by the span check
  (:func:`gilib.attack.adapter_span_attack`, given each round's global
  model as a :class:`~gilib.attack.Round`: the plain check reads the
  rows' span alone, the noise model's search every round's block at its
  own model; the grids weigh one round only); the optimisation
  attack matches them all at once (:func:`gilib.attack.optimization_rounds_attack`:
  the mean over rounds of LAMP's objective, each round's candidate
  gradient at that round's model), at the base setting;
* the protocol: FedSGD against one local AdamW step at ``lr = 5e-5``
  (:data:`ADAMW`). The server reads the AdamW message by inverting the
  step (:meth:`gilib.client.AdamW.gradient`, as ``bench/noisy_span.py``
  does), and **both attacks get that reading**. Each line records how much
  of the message was invertible (``invertible``: entries whose step is
  below 1 in size) and the cosine between the reading and the client's
  true gradient (``cosine_to_gradient``, a measurement only). The span
  check reads the AdamW reading twice: as it is, and with the inversion's
  noise model (``weighted``: :meth:`gilib.client.AdamW.entry_weights`, the
  entries to trust, passed as ``span_attack(..., weights=)``, as
  ``bench/noisy_span.py`` does for full weights).

The span grid crosses ``r`` x adapters x rounds (FedSGD) and ``r`` with
AdamW (with and without the noise model), on :attr:`Grid.span_sentences`
sentences per dataset; the optimisation grid is the one-at-a-time sweep
around :data:`BASE` (rounds included) plus :data:`REFERENCE`, on the first :attr:`Grid.optimization_sentences` of
those sentences (paired: the same sentences in every setting). Sentences
are the seeded sample (:func:`gilib.studies.sample.sample`) of CoLA, SST-2
and Rotten Tomatoes, the first ones: chapter 6's protocol sentences. One
JSON line per sentence, setting and attack (field ``study``: ``span`` or
``optimisation``); lines keep dataset row ids, never dataset text; the
truth (``true_batch``) reaches only the measurements. Command line::

    python -m gilib.studies lora run --out data/results/ch7_lora.jsonl --grid full --jobs 1
    python -m gilib.studies lora rank data/results/ch7_lora.jsonl
    python -m gilib.studies lora rounds data/results/ch7_lora.jsonl
    python -m gilib.studies lora length data/results/ch7_lora.jsonl
    python -m gilib.studies lora protocol data/results/ch7_lora.jsonl
    python -m gilib.studies lora optimisation data/results/ch7_lora.jsonl

A killed run resumes (:func:`gilib.studies.runner.run`).
"""

from __future__ import annotations

import functools
import itertools
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
import torch

from ..attack import (AttackConfig, Round, SpanConfig, adapter_span_attack, optimization_attack,
                      optimization_rounds_attack, span_attack)
from ..client import AdamW, client_update
from ..lora import WARMUP_LR, lora_victim
from ..metrics import interval_text, mean_interval, score_batch, share_interval, true_token_ids
from ..models import cached_model, encode
from ..selection import Selection, select
from .federated import ATTACK
from .sample import GRID_SPLITS, sample
from .store import study_frame
from .study import Measurements, Study, Table, frame_markdown, markdown_table, option

MODEL = "minilm"
DATASETS = GRID_SPLITS
"""The seeded sample's datasets and splits (chapters 2 to 6 attack the same sentences)."""
RANKS = (4, 8, 16, 64)
ADAPTERS = {
    "query": (("query",), 0),
    "value": (("value",), 0),
    "both": (("query", "value"), 0),
    "all layers": (("query", "value"), "all"),
}
"""The adapters a client shares: name -> (LoRA targets, layers). ``all layers``: query and value on every layer."""
REFERENCE_NAME = "none (layer 0 query+value)"
"""The ``adapters`` field of the reference lines: the plain victim's full layer-0 query and value weights."""
ROUNDS = (1, 2, 4)
WARMUP = 3
"""Public AdamW warm-up rounds before the first attacked round (``B`` off zero), as ``bench/lora_rank.py``."""
ADAMW = AdamW(local_steps=1, lr=5e-5)
"""The FedAvg-AdamW client: one local step at a fine-tuning learning rate; torch's defaults otherwise."""
NOISE_MODEL_BUDGET = 30.0
"""Seconds the span check with the noise model may search (``SpanConfig.time_budget``; its best partial
result after that, ``timed_out`` in the line): on one thread a 25-token sentence's full search took 2.5 to 5
minutes, where the plain check takes under one second."""
PROTOCOLS = ("FedSGD", "AdamW")
PARTS = ("span", "optimisation")
"""The parts of the study; each line names its part in its ``study`` field."""


class Setting(NamedTuple):
    """One client setting: what it shares and how.

    Attributes:
        r: the adapters' rank (0 for the reference, which has none).
        adapters: a key of :data:`ADAPTERS`, or :data:`REFERENCE_NAME`.
        rounds: the same client's messages the server stacks (span check) or matches at once (optimisation).
        protocol: ``"FedSGD"`` or ``"AdamW"`` (:data:`ADAMW`).
        weighted: the span check gets the AdamW inversion's entry weights
            (:meth:`gilib.client.AdamW.entry_weights`); AdamW only.
    """

    r: int
    adapters: str
    rounds: int = 1
    protocol: str = "FedSGD"
    weighted: bool = False


REFERENCE = Setting(0, REFERENCE_NAME)
"""The plain victim's layer-0 query and value gradients: the issue's point of comparison."""
BASE = Setting(8, "both")
"""The setting the one-at-a-time sweeps vary: rank 8, query and value on layer 0, one round, FedSGD."""


@dataclass(frozen=True)
class Grid:
    """A grid of the study: which settings, how many sentences, which attack budget.

    Attributes:
        name: the grid's name (``fast`` or ``full``); every line records it.
        ranks: the ranks swept.
        adapters: keys of :data:`ADAPTERS` swept.
        rounds: rounds the span check stacks; those above 1 also for the optimisation attack at :attr:`base`.
        protocols: among :data:`PROTOCOLS`.
        span_sentences: sentences per dataset for the span check.
        optimization_sentences: the first this many of them get the optimisation attack.
        attack: the optimisation attack's settings.
    """

    name: str
    ranks: tuple[int, ...] = RANKS
    adapters: tuple[str, ...] = tuple(ADAPTERS)
    rounds: tuple[int, ...] = ROUNDS
    protocols: tuple[str, ...] = PROTOCOLS
    span_sentences: int = 4
    optimization_sentences: int = 2
    attack: AttackConfig = ATTACK

    def __post_init__(self) -> None:
        for name, values, valid in (("adapters", self.adapters, tuple(ADAPTERS)),
                                    ("protocols", self.protocols, PROTOCOLS)):
            unknown = [v for v in values if v not in valid]
            if unknown or not values:
                raise ValueError(f"Unknown {name} {unknown or '(none)'}: choose among {', '.join(valid)}.")
        for name, values in (("ranks", self.ranks), ("rounds", self.rounds)):
            if not values or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values):
                raise ValueError(f"{name} must be whole numbers of at least 1, got {values!r}.")
        if not 1 <= self.optimization_sentences <= self.span_sentences:
            raise ValueError(f"optimization_sentences must be 1..span_sentences ({self.span_sentences}), got "
                             f"{self.optimization_sentences}: the optimisation attack reuses the span check's "
                             f"sentences.")

    @property
    def base(self) -> Setting:
        """:data:`BASE`, at the grid's first rank when 8 is not among them."""
        return Setting(8 if 8 in self.ranks else self.ranks[0], "both")

    def span_settings(self) -> list[Setting]:
        """``r`` x adapters x rounds (FedSGD), ``r`` with AdamW (query and value, one round; without and with
        the noise model), the reference."""
        settings = [Setting(r, a, k) for r, a, k in itertools.product(self.ranks, self.adapters, self.rounds)] \
            if "FedSGD" in self.protocols else []
        if "AdamW" in self.protocols:
            settings += [Setting(r, "both", 1, "AdamW") for r in self.ranks]
            settings += [Setting(r, "both", 1, "AdamW", True) for r in self.ranks]
        return settings + [REFERENCE]

    def optimization_settings(self) -> list[Setting]:
        """One at a time around :attr:`base`: every rank, every other adapter set, AdamW, the reference; then
        every number of rounds above 1 (after the reference, so that a resumed run adds them last)."""
        base = self.base
        settings = [base._replace(r=r) for r in self.ranks]
        settings += [base._replace(adapters=a) for a in self.adapters if a != base.adapters]
        if "AdamW" in self.protocols:
            settings.append(base._replace(protocol="AdamW"))
        return settings + [REFERENCE] + [base._replace(rounds=k) for k in self.rounds if k > 1]


GRIDS = {
    "full": Grid("full"),
    "fast": Grid("fast", ranks=(8, 16), adapters=("query", "both"), rounds=(1, 2), span_sentences=1,
                 optimization_sentences=1,
                 attack=AttackConfig(objective="cos", steps=40, init_candidates=10, swap_every=20,
                                     swap_candidates=10, progress=False)),
}
"""``full``: the cached run (``data/results/ch7_lora.jsonl``: 750 tasks, about 56 minutes on one core of a
2-core CPU: the first 690 in 26, the optimisation attack over rounds in 11, the noise model's 48 span checks in
19); ``fast``: 57 tasks, a few minutes, for a reader's first try."""


# --------------------------------------------------------------------------
# The client and the server's reading of its messages
# --------------------------------------------------------------------------


@functools.lru_cache(maxsize=6)
def _victim(targets: tuple[str, ...], r: int, layers, warmup: int) -> torch.nn.Module:
    """The global LoRA model after ``warmup`` public rounds (cached: the plan keeps a setting's tasks together)."""
    model, _ = cached_model(MODEL)
    return lora_victim(model, targets, r=r, alpha=2 * r, layers=layers, warmup=warmup)


def _union(model: torch.nn.Module, components: tuple[str, ...], layer: int) -> Selection:
    """Several per-layer weights as one selection (layer 0's query and value: the reference)."""
    parts = [select(model, c, layer) for c in components]
    names = tuple(n for p in parts for n in p.names)
    return Selection("+".join(components), (layer,), names, sum(p.numel for p in parts), parts[0].total)


def _client(setting: Setting, rounds: int) -> tuple[list[torch.nn.Module], Selection]:
    """The global model of each observed round (the first is the attacked one's) and the shared selection."""
    if setting.adapters == REFERENCE_NAME:
        model, _ = cached_model(MODEL)
        return [model], _union(model, ("attention.query", "attention.value"), 0)
    targets, layers = ADAPTERS[setting.adapters]
    victims = [_victim(targets, setting.r, layers, WARMUP + k) for k in range(rounds)]
    return victims, select(victims[0], "lora", 0 if layers == 0 else None)


def _server_reading(setting: Setting, victim, selection, true_batch) -> tuple:
    """What the client sends under the setting's protocol and what the server attacks.

    Returns:
        ``(reading, extra)``: the :class:`~gilib.update.SharedUpdate` the
        attacks get (the message for FedSGD, its one-step inversion
        :meth:`~gilib.client.AdamW.gradient` for AdamW) and the line's
        protocol fields (for AdamW: the invertible share of the message and
        the cosine between the reading and the true gradient; the truth
        reaches only that measurement; with ``setting.weighted`` also
        ``"weights"``, the inversion's entry weights, which the caller
        takes out of the line and gives the span check).
    """
    if setting.protocol == "FedSGD":
        return client_update(victim, selection, true_batch).shared, {}
    message = client_update(victim, selection, true_batch, ADAMW).shared
    weights = {"weights": ADAMW.entry_weights(message, victim, selection)} if setting.weighted else {}
    starts = selection.parameters(victim)
    steps = [m.double() - ADAMW.weight_decay * p.detach().double() for m, p in zip(message.shared_grads, starts)]
    reading = ADAMW.gradient(message, victim, selection)
    gradient = client_update(victim, selection, true_batch).shared.shared_grads
    flat = [torch.cat([t.double().reshape(-1) for t in ts]) for ts in (reading.shared_grads, gradient)]
    return reading, {"invertible": float(torch.cat([(u.abs() < 1).reshape(-1) for u in steps]).double().mean()),
                     "cosine_to_gradient": float(torch.nn.functional.cosine_similarity(*flat, dim=0)), **weights}


def _line(part: str, grid: str, dataset: str, example, setting: Setting, selection: Selection, tokens: int) -> dict:
    """The fields every line of a sentence and setting shares."""
    targets, layers = ADAPTERS.get(setting.adapters, ((), 0))
    return {"study": part, "grid": grid, "dataset": dataset, "split": DATASETS[dataset], "row_id": example.row_id,
            "tokens": tokens, "r": setting.r, "alpha": 2 * setting.r, "adapters": setting.adapters,
            "targets": list(targets), "layers": layers, "rounds": setting.rounds, "protocol": setting.protocol,
            "warmup": WARMUP if setting.r else None, "warmup_lr": WARMUP_LR if setting.r else None,
            **({"adamw_lr": ADAMW.lr, "adamw_steps": ADAMW.local_steps} if setting.protocol == "AdamW" else {}),
            **({"weighted": True} if setting.weighted else {}),
            "shared_parameters": selection.numel, "fraction": selection.fraction}


def _capacity(setting: Setting, hidden: int) -> int:
    """The most dimensions the stacked layer-0 A rows can span: ``r`` x layer-0 adapters x rounds."""
    if setting.adapters == REFERENCE_NAME:
        return hidden
    targets, _ = ADAPTERS[setting.adapters]
    return setting.r * len(targets) * setting.rounds


def measure_span(part: str, grid: str, dataset: str, example, setting: Setting) -> list[dict]:
    """The span check on one sentence's message(s) under one setting: one line.

    Args:
        part: ``"span"``.
        grid: the grid's name (recorded).
        dataset: the sentence's dataset.
        example: the client's sentence (:class:`~gilib.data.Example`; its
            text reaches only the client and the metrics).
        setting: the client's :class:`Setting`.

    Returns:
        One line: ``exact``, ``token_accuracy``, ``rank``, ``capacity``,
        ``fits`` (capacity at least the token count: the rank rule's
        condition), ``residual`` (the largest residual among the chosen
        tokens), ROUGE-1/2 and ``seconds``.
    """
    model, tokenizer = cached_model(MODEL)
    true_batch = encode(tokenizer, [example.text], [example.label])
    (truth,) = true_token_ids(true_batch)
    victims, selection = _client(setting, setting.rounds)
    readings, weights, extra = [], [], {}
    for victim in victims:
        reading, extra = _server_reading(setting, victim, selection, true_batch)
        readings.append(reading._replace(labels=None))  # the check needs no labels
        weights.append(extra.pop("weights", None))  # the noise model goes to the check, not into the line
    weights = weights if weights[0] is not None else None
    start = time.perf_counter()
    config = SpanConfig(time_budget=NOISE_MODEL_BUDGET) if weights is not None else None
    if len(readings) == 1:
        result = span_attack(victims[0], tokenizer, readings[0], selection, config,
                             weights=None if weights is None else weights[0])
    else:
        # Each round at its own global model: with the noise model, its search judges every round's block.
        result = adapter_span_attack(victims[0], tokenizer, [Round(v, r) for v, r in zip(victims, readings)],
                                     selection, config, weights=weights)
    seconds = time.perf_counter() - start
    found = result.token_ids[0]
    capacity = _capacity(setting, model.config.hidden_size)
    (scores,) = score_batch(result.texts, [example.text])
    interior = max(len(truth) - 2, 1)
    return [{**_line(part, grid, dataset, example, setting, selection, len(truth)), "attack": "span check",
             "exact": found == truth, "rouge1": scores["rouge1"], "rouge2": scores["rouge2"],
             "token_accuracy": sum(a == b for a, b in zip(found[1:-1], truth[1:-1])) / interior,
             "rank": result.diagnostics.rank, "capacity": capacity, "fits": capacity >= len(truth),
             "residual": result.final_loss, "seconds": seconds, **extra,
             **({"time_budget": NOISE_MODEL_BUDGET, "timed_out": bool(result.diagnostics.timed_out)}
                if weights is not None else {})}]


def measure_optimization(part: str, grid: str, dataset: str, example, setting: Setting,
                         attack: AttackConfig) -> list[dict]:
    """LAMP's optimisation attack on one sentence's message under one setting: one line.

    Args:
        part: ``"optimisation"``.
        grid, dataset, example, setting: as :func:`measure_span`.
        attack: the attack's settings (the grid's).

    Returns:
        One line: ROUGE-1/2, ``exact``, ``final_loss`` (the gradient
        distance of the rebuilt tokens; over several rounds the mean over
        rounds), ``steps`` and ``seconds``.

    Raises:
        ValueError: for a setting with the noise model (the span check's alone).
    """
    if setting.weighted:
        raise ValueError("The noise model (weighted) is the span check's; the optimisation attack matches the "
                         "reading itself.")
    model, tokenizer = cached_model(MODEL)
    true_batch = encode(tokenizer, [example.text], [example.label])
    (truth,) = true_token_ids(true_batch)
    victims, selection = _client(setting, setting.rounds)
    rounds, extra = [], {}
    for victim in victims:
        reading, own = _server_reading(setting, victim, selection, true_batch)
        rounds.append(Round(victim, reading))
        extra = extra or own  # the first round's protocol fields
    if len(rounds) == 1:
        result = optimization_attack(victims[0], tokenizer, rounds[0].update, selection, attack)
    else:
        result = optimization_rounds_attack(tokenizer, rounds, selection, attack)
    (scores,) = score_batch(result.texts, [example.text])
    return [{**_line(part, grid, dataset, example, setting, selection, len(truth)), "attack": "optimisation",
             "exact": result.token_ids[0] == truth, "rouge1": scores["rouge1"], "rouge2": scores["rouge2"],
             "final_loss": result.final_loss, "steps": attack.steps, "init_candidates": attack.init_candidates,
             "seconds": result.seconds, **extra}]


run_task = Measurements(measure_span, measure_optimization)
"""One task (runs in a worker): ``run_task("measure_span", part, grid, dataset, example, setting)``."""


# --------------------------------------------------------------------------
# Plan and keys
# --------------------------------------------------------------------------


def _grid(grid: Grid | str) -> Grid:
    if isinstance(grid, Grid):
        return grid
    if grid not in GRIDS:
        raise ValueError(f"Unknown grid {grid!r}: choose {' or '.join(GRIDS)}.")
    return GRIDS[grid]


def plan(grid: Grid | str = "full", parts=PARTS) -> list[tuple]:
    """Every task, a setting's sentences together (its victims are built once per worker).

    Returns:
        ``("measure_span", "span", grid name, dataset, example, setting)``
        and ``("measure_optimization", "optimisation", grid name, dataset,
        example, setting, attack config)`` tuples.

    Raises:
        ValueError: for an unknown grid or part.
    """
    grid = _grid(grid)
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        raise ValueError(f"Unknown part {unknown[0]!r}: choose from {', '.join(PARTS)}.")
    sentences = [(d, b[0]) for d in DATASETS for b in sample(d, grid.span_sentences)]
    first = {(d, e.row_id) for d in DATASETS for (e,) in sample(d, grid.optimization_sentences)}
    tasks = []
    if "span" in parts:
        tasks += [("measure_span", "span", grid.name, d, e, s) for s in grid.span_settings() for d, e in sentences]
    if "optimisation" in parts:
        tasks += [("measure_optimization", "optimisation", grid.name, d, e, s, grid.attack)
                  for s in grid.optimization_settings() for d, e in sentences if (d, e.row_id) in first]
    return tasks


def _key(part: str, grid: str, dataset: str, row_id: int, setting: Setting) -> str:
    # ``weighted`` only where set: the lines written before it existed keep their keys.
    fields = list(setting) if setting.weighted else list(setting)[:4]
    return json.dumps([part, grid, dataset, row_id, *fields])


def _task_key(name: str, part: str, grid: str, dataset: str, example, setting: Setting, *attack) -> list[str]:
    return [_key(part, grid, dataset, example.row_id, setting)]


def _line_key(line: dict) -> str:
    setting = Setting(line["r"], line["adapters"], line["rounds"], line["protocol"],
                      bool(line.get("weighted") is True))
    return _key(line["study"], line["grid"], line["dataset"], line["row_id"], setting)


def run(out: str | Path, grid: Grid | str = "full", parts=PARTS, jobs: int = 1, scheduler: str | None = None,
        progress: bool = True) -> list[dict]:
    """Run (or resume) the study's grid, appending its lines to ``out``."""
    return STUDY.run(out, plan(grid, parts), jobs=jobs, scheduler=scheduler, progress=progress)


# --------------------------------------------------------------------------
# Tables, each with the facts the chapter quotes
# --------------------------------------------------------------------------


def load(path: str | Path | pd.DataFrame, part: str, grid: str | None = None) -> pd.DataFrame:
    """The lines of one part (``span`` or ``optimisation``), of one grid if given (default: the fullest present)."""
    if isinstance(path, pd.DataFrame):
        # As study_frame reads them: this part's columns only, with their own dtypes.
        lines = path[path["study"] == part].dropna(axis=1, how="all").infer_objects()
        if lines.empty:
            raise ValueError(f"The lines hold no '{part}' part.")
    else:
        lines = study_frame(path, part, f"python -m gilib.studies lora run --out {path} --grid full")
    if grid is None:
        present = set(lines["grid"])
        grid = "full" if "full" in present else sorted(present)[0]
    return lines[lines["grid"] == grid].reset_index(drop=True)


def exact_cells(lines: pd.DataFrame, by: list[str]) -> pd.DataFrame:
    """Exact share per group with its Wilson 95 % interval (each sentence is an independent try).

    Returns:
        One row per group, in order of appearance: the ``by`` columns,
        ``exact``, ``low``, ``high``, ``sentences`` and ``text``
        (``"75% [41%, 93%]"``).
    """
    rows = []
    for key, part in lines.groupby(by, sort=False, dropna=False):
        share, low, high = share_interval(int(part["exact"].sum()), len(part))
        rows.append({**dict(zip(by, key if isinstance(key, tuple) else (key,))), "exact": share, "low": low,
                     "high": high, "sentences": len(part), "text": interval_text(share, low, high, 0, percent=True)})
    return pd.DataFrame(rows)


def rouge_cells(lines: pd.DataFrame, by: list[str], value: str = "rouge1") -> pd.DataFrame:
    """Mean ``value`` per group with its 95 % bootstrap interval over sentences (:func:`gilib.metrics.mean_interval`)."""
    rows = []
    for key, part in lines.groupby(by, sort=False, dropna=False):
        mean, low, high = mean_interval(part[value])
        rows.append({**dict(zip(by, key if isinstance(key, tuple) else (key,))), value: mean, "low": low,
                     "high": high, "sentences": len(part), "text": interval_text(mean, low, high)})
    return pd.DataFrame(rows)


_BINS = ("<= 16 tokens", "17-32 tokens", "> 32 tokens")


def _order(column: pd.Series) -> pd.Series:
    """Sort keys in the study's own order: adapters as :data:`ADAPTERS`, token bins short to long, numbers as they are."""
    if column.name == "adapters":
        return column.map({a: i for i, a in enumerate([*ADAPTERS, REFERENCE_NAME])})
    if column.name == "length":
        return column.map({b: i for i, b in enumerate(_BINS)})
    return column


def _slug(adapters: str) -> str:
    return "ref" if adapters == REFERENCE_NAME else adapters.replace(" ", "_")


def rank_summary(path) -> tuple[pd.DataFrame, dict]:
    """The span check's exact rate per rank and adapters (FedSGD, one round), and the rank rule over the grid.

    Returns:
        ``(table, facts)``: one row per adapters and ``r``: exact [Wilson
        95 %], the stacked capacity, the share of sentences that fit it and
        their median tokens; the facts give ``span_<adapters>_<r>_exact``
        and the rank rule over every FedSGD adapter line: exact among the
        sentence-settings that fit (``rule_fits_exact`` of
        ``rule_fits_n``) and among those that do not (``rule_short_*``).
    """
    lines = load(path, "span")
    sgd = lines[(lines["protocol"] == "FedSGD") & (lines["adapters"] != REFERENCE_NAME)]
    one = sgd[sgd["rounds"] == 1]
    table = exact_cells(one, ["adapters", "r"])
    extra = one.groupby(["adapters", "r"], sort=False).agg(capacity=("capacity", "first"), fits=("fits", "mean"),
                                                           tokens=("tokens", "median")).reset_index()
    table = table.merge(extra, on=["adapters", "r"])
    table = table.sort_values(["adapters", "r"], key=_order, ignore_index=True)
    facts = {f"span_{_slug(r.adapters)}_{r.r}_exact": round(r.exact, 4) for r in table.itertuples()}
    fits = sgd["fits"].astype(bool)
    for name, part in (("fits", sgd[fits]), ("short", sgd[~fits])):
        facts[f"rule_{name}_exact"] = int(part["exact"].sum())
        facts[f"rule_{name}_n"] = len(part)
    reference = lines[lines["adapters"] == REFERENCE_NAME]
    if len(reference):
        facts["span_ref_exact"] = round(float(reference["exact"].mean()), 4)
    facts["span_sentences"] = int(one.groupby(["dataset", "row_id"]).ngroups)
    return table, facts


def rank_markdown(path) -> str:
    """:func:`rank_summary`'s table as Markdown."""
    table, _ = rank_summary(path)
    rows = ([r.adapters, r.r, r.capacity, r.text, f"{r.fits:.0%}", f"{r.tokens:.0f}", r.sentences]
            for r in table.itertuples())
    return markdown_table(["adapters", "r", "stacked capacity", "span check: exact [95 %]", "sentences that fit",
                           "median tokens", "sentences"], rows)


def rounds_summary(path) -> tuple[pd.DataFrame, dict]:
    """The span check's exact rate as the server stacks more rounds of the same client (FedSGD).

    Returns:
        ``(table, facts)``: one row per adapters and ``r``, one column per
        number of rounds (exact [Wilson 95 %]); facts
        ``span_rounds<k>_<adapters>_<r>_exact``.
    """
    lines = load(path, "span")
    sgd = lines[(lines["protocol"] == "FedSGD") & (lines["adapters"] != REFERENCE_NAME)]
    cells = exact_cells(sgd, ["adapters", "r", "rounds"])
    table = cells.pivot_table(index=["adapters", "r"], columns="rounds", values="text", aggfunc="first",
                              sort=False)
    table.columns = [f"{k} round{'s' if k > 1 else ''}: exact [95 %]" for k in table.columns]
    facts = {f"span_rounds{c.rounds}_{_slug(c.adapters)}_{c.r}_exact": round(c.exact, 4) for c in cells.itertuples()}
    return table.reset_index().sort_values(["adapters", "r"], key=_order, ignore_index=True), facts


def _bins(tokens: pd.Series) -> pd.Series:
    """Token counts in three bins that straddle the base setting's stacked ranks (16 at r = 8, 32 at r = 16)."""
    return pd.cut(tokens, [0, 16, 32, np.inf], labels=list(_BINS)).astype(str)


def length_summary(path) -> tuple[pd.DataFrame, dict]:
    """Exact rate and ROUGE against the sentence's length, query and value adapters on layer 0, one round, FedSGD.

    Returns:
        ``(table, facts)``: one row per token bin and ``r``: the span
        check's exact [Wilson 95 %] and, where the optimisation attack ran,
        its ROUGE-1 [bootstrap 95 %]; facts ``length_<bin>_<r>_exact``
        (bins ``short``, ``middle``, ``long``).
    """
    span = load(path, "span")
    span = span[(span["adapters"] == "both") & (span["rounds"] == 1) & (span["protocol"] == "FedSGD")].copy()
    span["length"] = _bins(span["tokens"])
    table = exact_cells(span, ["length", "r"]).rename(columns={"text": "span check: exact [95 %]"})
    try:
        opt = load(path, "optimisation")
        opt = opt[(opt["adapters"] == "both") & (opt["protocol"] == "FedSGD") & (opt["rounds"] == 1)].copy()
    except ValueError:
        opt = pd.DataFrame()
    if len(opt):
        opt["length"] = _bins(opt["tokens"])
        rouge = rouge_cells(opt, ["length", "r"])[["length", "r", "text"]]
        table = table.merge(rouge.rename(columns={"text": "optimisation: ROUGE-1 [95 %]"}), on=["length", "r"],
                            how="left")
    table = table.dropna(subset=["sentences"]).sort_values(["r", "length"], key=_order, ignore_index=True)
    names = dict(zip(_BINS, ["short", "middle", "long"]))
    facts = {f"length_{names[r.length]}_{r.r}_exact": round(r.exact, 4) for r in table.itertuples()}
    return table, facts


def length_markdown(path) -> str:
    """:func:`length_summary`'s table as Markdown."""
    table, _ = length_summary(path)
    columns = ["length", "r", "sentences", "span check: exact [95 %]"]
    columns += [c for c in ("optimisation: ROUGE-1 [95 %]",) if c in table]
    return markdown_table(columns, table[columns].fillna("–").itertuples(index=False))


NOISE_MODEL = "span check, noise model"
"""The ``attack`` the protocol table gives the span check with the AdamW inversion's entry weights."""


def _weighted(lines: pd.DataFrame) -> pd.Series:
    """Whether each line's span check had the noise model (lines written before the field: no)."""
    if "weighted" not in lines:
        return pd.Series(False, index=lines.index)
    return lines["weighted"].eq(True)


def protocol_summary(path) -> tuple[pd.DataFrame, dict]:
    """FedSGD against one AdamW step (lr 5e-5), the server attacking its one-step inversion.

    Returns:
        ``(table, facts)``: one row per protocol, attack and ``r``
        (adapters on layer 0's query and value, one round): exact [Wilson
        95 %], ROUGE-1 [bootstrap 95 %], the invertible share of the
        message and the cosine of the reading to the true gradient (AdamW).
        The span check on the AdamW reading appears twice: as it is and
        with the inversion's noise model (attack :data:`NOISE_MODEL`).
        Facts ``<protocol>_<attack>_<r>_exact`` / ``_rouge1`` (attack
        ``span``, ``span_weighted`` or ``opt``), ``adamw_invertible`` and
        ``adamw_cosine`` (means over the AdamW lines).
    """
    frames = []
    for part in PARTS:
        try:
            frames.append(load(path, part))
        except ValueError:
            continue
    lines = pd.concat(frames, ignore_index=True)
    lines = lines[(lines["adapters"] == "both") & (lines["rounds"] == 1)].copy()
    lines.loc[_weighted(lines), "attack"] = NOISE_MODEL
    lines = lines[lines["r"].isin(set(lines.loc[lines["protocol"] == "AdamW", "r"]))]
    by = ["protocol", "attack", "r"]
    table = exact_cells(lines, by).rename(columns={"text": "exact [95 %]"})
    rouge = rouge_cells(lines, by).rename(columns={"text": "ROUGE-1 [95 %]", "rouge1": "rouge1_mean"})
    table = table.merge(rouge[by + ["ROUGE-1 [95 %]", "rouge1_mean"]], on=by)
    for column in ("invertible", "cosine_to_gradient"):
        if column not in lines:
            lines[column] = np.nan
    readings = lines.groupby(by, sort=False)[["invertible", "cosine_to_gradient"]].mean().reset_index()
    table = table.merge(readings, on=by).sort_values(["attack", "r", "protocol"], ignore_index=True)
    facts = {}
    attacks = {"span check": "span", NOISE_MODEL: "span_weighted", "optimisation": "opt"}
    for r in table.itertuples():
        key = f"{r.protocol.lower()}_{attacks[r.attack]}_{r.r}"
        facts[f"{key}_exact"] = round(r.exact, 4)
        facts[f"{key}_rouge1"] = round(r.rouge1_mean, 2)
    adamw = lines[lines["protocol"] == "AdamW"]
    if len(adamw):
        facts["adamw_invertible"] = round(float(adamw["invertible"].mean()), 4)
        facts["adamw_cosine"] = round(float(adamw["cosine_to_gradient"].mean()), 3)
    weighted = lines[lines["attack"] == NOISE_MODEL]
    if len(weighted):
        # The rank rule under the noise model: exact among the sentence-settings that fit, and the others.
        fits = weighted["fits"].astype(bool)
        facts.update({"adamw_weighted_fits_n": int(fits.sum()), "adamw_weighted_fits_exact":
                      int(weighted.loc[fits, "exact"].sum()), "adamw_weighted_short_n": int((~fits).sum()),
                      "adamw_weighted_short_exact": int(weighted.loc[~fits, "exact"].sum()),
                      "adamw_weighted_timed_out": int(weighted["timed_out"].astype(bool).sum()),
                      "adamw_weighted_budget": float(weighted["time_budget"].iloc[0])})
    return table, facts


def protocol_markdown(path) -> str:
    """:func:`protocol_summary`'s table as Markdown."""
    table, _ = protocol_summary(path)

    def fmt(value, pattern):
        return "–" if pd.isna(value) else format(value, pattern)

    rows = ([r["protocol"], r["attack"], r["r"], r["sentences"], r["exact [95 %]"], r["ROUGE-1 [95 %]"],
             fmt(r["invertible"], ".1%"), fmt(r["cosine_to_gradient"], ".3f")] for _, r in table.iterrows())
    return markdown_table(["client", "attack", "r", "sentences", "exact [95 %]", "ROUGE-1 [95 %]",
                           "invertible entries", "cos(reading, gradient)"], rows)


def _setting_label(row) -> str:
    if row["adapters"] == REFERENCE_NAME:
        return "full layer-0 query+value (plain victim)"
    label = f"r={row['r']}, {row['adapters']}"
    label = label if row["protocol"] == "FedSGD" else f"{label}, {row['protocol']}"
    return label if row["rounds"] == 1 else f"{label}, {row['rounds']} rounds"


def _slug_of(row) -> str:
    """A setting's name in the facts: ``ref``, ``r8_both``, ``r8_both_adamw``, ``r8_both_rounds2``."""
    if row["adapters"] == REFERENCE_NAME:
        return "ref"
    return (f"r{row['r']}_{_slug(row['adapters'])}" + ("" if row["protocol"] == "FedSGD" else "_adamw")
            + ("" if row["rounds"] == 1 else f"_rounds{row['rounds']}"))


def optimization_summary(path) -> tuple[pd.DataFrame, dict]:
    """The optimisation attack per setting against the full layer-0 query+value reference, paired by sentence.

    Returns:
        ``(table, facts)``: one row per setting: ROUGE-1 and ROUGE-2
        [bootstrap 95 % over sentences], the share of the parameters
        shared, and ROUGE-1 minus the reference's on the same sentences
        [paired bootstrap 95 %]; ``within 0.1`` says whether the mean
        difference is at least -0.1 (the issue's target). A setting of
        ``k > 1`` rounds (every message matched at once) also gets its
        ROUGE-1 minus the same setting's at one round, on the same
        sentences [paired bootstrap 95 %]. Facts:
        ``opt_ref_rouge1``, ``opt_<slug>_rouge1`` / ``_rouge2`` /
        ``_diff`` / ``_diff_low`` / ``_diff_high`` / ``_within``
        (``<slug>`` e.g. ``r8_both``, ``r8_both_adamw``,
        ``r8_both_rounds2``), ``opt_<slug>_vs1`` / ``_vs1_low`` /
        ``_vs1_high`` for rounds, and ``opt_sentences``.

    Raises:
        ValueError: if the lines hold no reference.
    """
    lines = load(path, "optimisation")
    lines["setting"] = lines.apply(_setting_label, axis=1)
    reference = lines[lines["adapters"] == REFERENCE_NAME].set_index(["dataset", "row_id"])
    if reference.empty:
        raise ValueError("The optimisation lines hold no reference (the plain victim's layer-0 query+value): "
                         "run the optimisation part of the grid.")
    rows, facts = [], {"opt_sentences": len(reference)}
    by_sentence = lines.set_index(["dataset", "row_id"])
    for setting, part in lines.groupby("setting", sort=False):
        first = part.iloc[0]
        slug = _slug_of(first)
        row = {"setting": setting, "r": int(first["r"]), "adapters": first["adapters"],
               "protocol": first["protocol"], "sentences": len(part),
               "shared parameters": int(first["shared_parameters"]), "share": float(first["fraction"])}
        for value in ("rouge1", "rouge2"):
            mean, low, high = mean_interval(part[value])
            row[value] = mean
            row[f"{value} [95 %]"] = interval_text(mean, low, high)
        paired = part.set_index(["dataset", "row_id"])["rouge1"] - reference["rouge1"]
        paired = paired.dropna()
        mean, low, high = mean_interval(paired)
        row.update({"diff": mean, "diff_low": low, "diff_high": high,
                    "ROUGE-1 - reference [95 %]": interval_text(mean, low, high, signed=True),
                    "within 0.1": bool(mean >= -0.1)})
        if first["rounds"] > 1:
            # Paired with the same setting at one round: what matching more messages adds.
            one = by_sentence[(by_sentence["r"] == first["r"]) & (by_sentence["adapters"] == first["adapters"])
                              & (by_sentence["protocol"] == first["protocol"]) & (by_sentence["rounds"] == 1)]
            gain = (part.set_index(["dataset", "row_id"])["rouge1"] - one["rouge1"]).dropna()
            if len(gain):
                g_mean, g_low, g_high = mean_interval(gain)
                row.update({"vs1": g_mean, "vs1_low": g_low, "vs1_high": g_high,
                            "ROUGE-1 - one round [95 %]": interval_text(g_mean, g_low, g_high, signed=True)})
                facts.update({f"opt_{slug}_vs1": round(g_mean, 2), f"opt_{slug}_vs1_low": round(g_low, 2),
                              f"opt_{slug}_vs1_high": round(g_high, 2)})
        rows.append(row)
        facts.update({f"opt_{slug}_rouge1": round(row["rouge1"], 2), f"opt_{slug}_rouge2": round(row["rouge2"], 2)})
        if slug != "ref":
            facts.update({f"opt_{slug}_diff": round(mean, 2), f"opt_{slug}_diff_low": round(low, 2),
                          f"opt_{slug}_diff_high": round(high, 2), f"opt_{slug}_within": row["within 0.1"]})
    return pd.DataFrame(rows), facts


def optimization_markdown(path) -> str:
    """:func:`optimization_summary`'s table as Markdown."""
    table, _ = optimization_summary(path)
    rounds = "ROUGE-1 - one round [95 %]"

    def versus_one(r) -> str:
        return r[rounds] if rounds in r and isinstance(r[rounds], str) else "–"

    rows = ([r["setting"], f"{r['shared parameters']:,} ({100 * r['share']:.3g} %)", r["sentences"],
             r["rouge1 [95 %]"], r["rouge2 [95 %]"],
             "–" if r["adapters"] == REFERENCE_NAME else r["ROUGE-1 - reference [95 %]"],
             "–" if r["adapters"] == REFERENCE_NAME else ("yes" if r["within 0.1"] else "no"), versus_one(r)]
            for _, r in table.iterrows())
    return markdown_table(["client shares", "parameters", "sentences", "ROUGE-1 [95 %]", "ROUGE-2 [95 %]",
                           "ROUGE-1 - reference [paired 95 %]", "within 0.1", "ROUGE-1 - one round [paired 95 %]"],
                          rows)


def _cells_markdown(table: pd.DataFrame) -> str:
    return frame_markdown(table)


def _label(lines: list[dict]) -> str:
    line = lines[0]
    score = f"exact={line['exact']}" if line["attack"] == "span check" else f"ROUGE-1={line['rouge1']:.2f}"
    protocol = f"{line['protocol']}{' (noise model)' if line.get('weighted') is True else ''}"
    return (f"{line['study']} {line['dataset']} r={line['r']} {line['adapters']} rounds={line['rounds']} "
            f"{protocol} tokens={line['tokens']} {score} ({line['seconds']:.1f} s)")


_RESULTS = option("results", type=Path, help="this study's results (data/results/ch7_lora.jsonl)")

STUDY = Study(
    name="lora",
    description="chapter 7: LoRA adapters: the span check and the optimisation attack against r, adapters, "
                "rounds, length and AdamW",
    plan=lambda args: plan(args.grid, args.parts),
    work=run_task,
    task_keys=_task_key,
    line_key=_line_key,
    label=_label,
    run_options=(option("--grid", default="full", choices=list(GRIDS),
                        help="full: the cached run (about 56 minutes on one core); fast: a few minutes"),
                 option("--parts", nargs="+", default=list(PARTS), choices=PARTS, help="which parts to run")),
    tables=(
        Table("rank", "the span check's exact rate per r and adapters (FedSGD, one round), with the stacked capacity",
              lambda args: rank_markdown(args.results), (_RESULTS,)),
        Table("rounds", "the span check's exact rate as the server stacks 1, 2 or 4 rounds of one client",
              lambda args: _cells_markdown(rounds_summary(args.results)[0]), (_RESULTS,)),
        Table("length", "exact rate and ROUGE-1 per sentence length (query+value adapters on layer 0)",
              lambda args: length_markdown(args.results), (_RESULTS,)),
        Table("protocol", "FedSGD against one AdamW step (the server attacks the step's inversion; the span "
                          "check with and without its noise model)",
              lambda args: protocol_markdown(args.results), (_RESULTS,)),
        Table("optimisation", "the optimisation attack per setting (rounds too) against the full layer-0 "
                              "query+value reference and, for rounds, against one round",
              lambda args: optimization_markdown(args.results), (_RESULTS,)),
    ),
)
"""Chapter 7's measurements as a study (``python -m gilib.studies lora ...``)."""
