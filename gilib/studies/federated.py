"""Measurements of chapter 6: the attacks against FedAvg clients and secure aggregation.

Every client here shares the whole of layer 0 (the paper's single-layer
setting, 7.8 % of MiniLM) and every message is attacked twice: by the span
check (:func:`gilib.attack.span_attack`, peeling for more than one
sentence) and by LAMP's optimisation attack at chapter 3's settings
(:func:`gilib.attack.optimization_attack`). One JSON line per attack and
message, three parts (a line's ``study`` field):

* ``protocol``: one sentence per client, FedSGD (the gradient) against
  FedAvg with ``E`` local SGD steps at learning rate ``lr``
  (:data:`LOCAL_STEPS` x :data:`LEARNING_RATES`); the client sends
  ``(theta_0 - theta_E) / (lr * E)`` (:class:`gilib.client.FedAvg`),
  computed in float32 as a client does, and, as a control, in float64.
* ``batch``: the client's batch size (:data:`BATCH_SIZES`), FedSGD and
  FedAvg at :data:`FEDAVG`.
* ``secure``: 2, 4 and 8 FedSGD clients of one sentence each in a real
  Flower round with SecAgg+ (:func:`gilib.federated.run_round` with
  ``secure=True``); the server attacks the only thing it can unmask, the
  mean update, as one batch of all the clients' sentences. The clients'
  sentences are those of the batch study's batches, so the two parts
  compare one client with B sentences and B clients with one.

The FedAvg and batch-size parts call :func:`gilib.client.client_update`,
the very function each Flower client runs; the secure study runs Flower
itself (Ray starts once per round, so run it with one job). The truth
(``true_batch``) reaches only the measurements. Lines keep dataset row ids,
never dataset text. Command line::

    python -m gilib.studies federated run --out data/results/ch6_federated.jsonl --parts protocol batch --jobs 2
    python -m gilib.studies federated run --out data/results/ch6_federated.jsonl --parts secure --jobs 1
    python -m gilib.studies federated table data/results/ch6_federated.jsonl --part protocol
    python -m gilib.studies federated lr data/results/ch6_federated.jsonl   # pooled over E
    python -m gilib.studies federated noise data/bench/noisy_span.csv   # old check vs noise model (bench)
    python -m gilib.studies federated mixed data/bench/mixed_batches.csv   # mixed batches of 16 (bench)
    python -m gilib.studies federated adamw-optimisation data/bench/optimisation_adamw.csv   # (bench)

A killed run resumes (:func:`gilib.studies.runner.run`).
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import pandas as pd
import torch

from ..attack import AttackConfig, SpanConfig, optimization_attack, span_attack
from ..client import PRECISIONS, FedAvg, client_update, float32_spacing
from ..metrics import exact_rate, interval_text, mean_interval, score_batch, share_interval, true_token_ids
from ..models import cached_model, encode
from ..selection import select
from .sample import GRID_SPLITS, sample
from .store import study_frame
from .study import Measurements, Study, Table, frame_markdown, markdown_table, option

MODEL = "minilm"
SELECTION = ("layer", 0)
"""What every client shares: the whole of layer 0."""
DATASETS = GRID_SPLITS
"""The grids' sentences (chapters 2 to 5 attack the same ones at batch size 1)."""
SENTENCES = 2  # per dataset, in the protocol study
LOCAL_STEPS = (1, 2, 5, 10)
LEARNING_RATES = (1e-5, 1e-4, 1e-3)
FEDAVG = FedAvg(local_steps=5, lr=1e-3)
"""The FedAvg client of the batch-size study."""
BATCH_SIZES = (2, 4, 8)
"""Batch sizes of the batch study (batch size 1 is the protocol study); one batch per dataset."""
OPTIMIZATION_MAX_BATCH = 4
"""The optimisation attack runs up to this many sentences per message: at 8 it
takes about five minutes a batch on one core, and chapters 2 and 3 show its
decline already at 4. It skips the float64 controls, which test the span
check's exactness (the optimisation attack matches a cosine, and rounding
changes it by less than 1 %)."""
CLIENTS = (2, 4, 8)
"""Clients of one sentence each in the secure rounds; one round per dataset."""
TIME_BUDGET = 300.0
"""Seconds each span check of the study may take (``SpanConfig.time_budget``):
every task is bounded, and a check out of time returns its best partial
result with ``timed_out`` in its line. Without a limit one batch ran 31
minutes; the benches give a batch 5 minutes too."""
ATTACK = AttackConfig(objective="cos", steps=200, init_candidates=100, swap_every=50, swap_candidates=100,
                      progress=False)
"""Chapter 3's attack settings (``data/results/ch3_components.yaml``)."""


def protocols() -> dict[str, FedAvg | None]:
    """Every client protocol of the protocol study, by name."""
    named: dict[str, FedAvg | None] = {"FedSGD": None}
    for precision in PRECISIONS:
        for steps in LOCAL_STEPS:
            for lr in LEARNING_RATES:
                protocol = FedAvg(steps, lr, precision)
                named[protocol_name(protocol)] = protocol
    return named


def protocol_name(protocol: FedAvg | None) -> str:
    """``FedSGD``, ``FedAvg E=5 lr=1e-04`` or ``FedAvg E=5 lr=1e-04 float64``."""
    if protocol is None:
        return "FedSGD"
    name = f"FedAvg E={protocol.local_steps} lr={protocol.lr:.0e}"
    return name if protocol.precision == "float32" else f"{name} {protocol.precision}"


def _protocol(name: str) -> FedAvg | None:
    if name == "FedSGD":
        return None
    settings, _, precision = name.removeprefix("FedAvg E=").partition(" float")
    steps, lr = settings.split(" lr=")
    return FedAvg(int(steps), float(lr), f"float{precision}" if precision else "float32")


def _settings(protocol: FedAvg | None) -> dict:
    """The protocol's fields of a line."""
    if protocol is None:
        return {"local_steps": 0, "lr": None, "precision": None}
    return {"local_steps": protocol.local_steps, "lr": protocol.lr, "precision": protocol.precision}


def attack_message(update, true_batch, references, *, optimize: bool = True,
                   time_budget: float | None = None) -> list[dict]:
    """Both attacks on one message; one measurement per attack.

    Args:
        update: the server's message (a :class:`~gilib.update.SharedUpdate`).
        true_batch: the client's truth (only the metrics read it).
        references: the true sentences.
        optimize: run the optimisation attack too.
        time_budget: seconds the span check may take (``None``: no limit);
            its line records ``timed_out``.

    Returns:
        ``attack``, ``exact`` (share of sentences rebuilt token for token),
        ROUGE-1/2 (matched within the batch) and seconds, per attack.
    """
    model, tokenizer = cached_model(MODEL)
    selection = select(model, *SELECTION)
    truth = true_token_ids(true_batch)
    lines = []
    # The span check needs no labels: peeling finds them.
    span = span_attack(model, tokenizer, update._replace(labels=None), selection, SpanConfig(time_budget=time_budget))
    found = span.diagnostics
    attacks = [("span check", span, {"rank": found.rank, "min_gap": found.min_gap, "timed_out": found.timed_out,
                                     **({"found": sum(found.found) / len(truth)} if len(truth) > 1 else {})})]
    if optimize:
        attacks.append(("optimisation", optimization_attack(model, tokenizer, update, selection, ATTACK),
                        {"steps": ATTACK.steps}))
    for name, result, extra in attacks:
        scores = score_batch(result.texts, references)
        lines.append({"attack": name, "exact": exact_rate(result.token_ids, truth),
                      "rouge1": statistics.fmean(s["rouge1"] for s in scores),
                      "rouge2": statistics.fmean(s["rouge2"] for s in scores), "seconds": result.seconds,
                      **extra})
    return lines


def _drift(gradient, shared) -> float:
    """Cosine between a message and the batch's plain gradient (1 for FedSGD)."""
    return float(torch.nn.functional.cosine_similarity(_flat(gradient), _flat(shared.shared_grads), dim=0))


def _flat(tensors) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def measure_client(study: str, dataset: str, item, time_budget: float | None = None) -> list[dict]:
    """One client's message under one protocol, attacked: ``item = (protocol name, batch)``."""
    name, batch = item
    model, tokenizer = cached_model(MODEL)
    selection = select(model, *SELECTION)
    true_batch = encode(tokenizer, [e.text for e in batch], [e.label for e in batch])
    protocol = _protocol(name)
    shared = client_update(model, selection, true_batch, protocol).shared
    line = {"study": study, "dataset": dataset, "split": DATASETS[dataset], "row_ids": [e.row_id for e in batch],
            "batch_size": len(batch), "clients": 1, "protocol": name, **_settings(protocol),
            "tokens": sum(shared.lengths),
            "cosine_to_gradient": _drift(client_update(model, selection, true_batch).shared.shared_grads, shared)}
    measured = attack_message(shared, true_batch, [e.text for e in batch], optimize=_optimized(name, len(batch)),
                              time_budget=time_budget)
    return [{**line, **m} for m in measured]


def measure_secure(study: str, dataset: str, item, time_budget: float | None = None) -> list[dict]:
    """A Flower round with SecAgg+: one sentence per client, the mean attacked as one batch."""
    from ..federated import run_round  # Flower and Ray: only this study needs them

    name, batch = item
    protocol = _protocol(name)
    start = time.perf_counter()
    run = run_round([[e] for e in batch], *SELECTION, model=MODEL, protocol=protocol, secure=True)
    (reply,) = run.replies
    model, tokenizer = cached_model(MODEL)
    selection = select(model, *SELECTION)
    # The clients' truth, in the order of the lengths the server received (by client).
    true_batch = encode(tokenizer, [e.text for e in batch], [e.label for e in batch])
    # With FedSGD the mean is the gradient of all the sentences as one batch.
    one_batch = client_update(model, selection, true_batch).shared.shared_grads
    error = float(_flat(reply.update.shared_grads).sub(_flat(one_batch)).norm() / _flat(one_batch).norm())
    line = {"study": study, "dataset": dataset, "split": DATASETS[dataset], "row_ids": [e.row_id for e in batch],
            "batch_size": 1, "clients": len(batch), "protocol": name, **_settings(protocol),
            "tokens": sum(reply.update.lengths),
            "flower_seconds": time.perf_counter() - start, "skipped": len(run.skipped),
            "relative_error_to_batch_gradient": error,
            "cosine_to_gradient": _drift(one_batch, reply.update)}
    measured = attack_message(reply.update, true_batch, [e.text for e in batch],
                              optimize=_optimized(name, len(batch)), time_budget=time_budget)
    return [{**line, **m} for m in measured]


PARTS = ("protocol", "batch", "secure")
"""The parts of the study; each line names its part in its ``study`` field."""


def plan(parts=PARTS, time_budget: float | None = TIME_BUDGET) -> list[tuple]:
    """Every task: ``(function name, study, dataset, (protocol name, batch), time budget)``.

    Raises:
        ValueError: for a time budget that is not a number of seconds above 0.
    """
    SpanConfig(time_budget=time_budget)  # checked before the first task runs
    tasks = []
    if "protocol" in parts:
        for dataset in DATASETS:
            for batch in sample(dataset, SENTENCES):
                tasks += [("measure_client", "protocol", dataset, (name, batch), time_budget)
                          for name in protocols()]
    if "batch" in parts:
        for size in BATCH_SIZES:
            for dataset in DATASETS:
                # The batch study's sentences follow the protocol study's in the seeded sample.
                (batch,) = sample(dataset, 1, size, offset=SENTENCES)
                tasks += [("measure_client", "batch", dataset, (name, batch), time_budget)
                          for name in ("FedSGD", protocol_name(FEDAVG))]
    if "secure" in parts:
        for clients in CLIENTS:
            for dataset in DATASETS:
                (batch,) = sample(dataset, 1, clients, offset=SENTENCES)
                tasks.append(("measure_secure", "secure", dataset, ("FedSGD", batch), time_budget))
    return tasks


run_task = Measurements(measure_client, measure_secure)
"""One task (runs in a worker): ``run_task("measure_client", part, dataset, (protocol name, batch))``."""


def _key(study: str, dataset: str, protocol: str, row_ids, attack: str) -> str:
    return json.dumps([study, dataset, protocol, row_ids, attack])


def _optimized(protocol: str, sentences: int) -> bool:
    """Whether a message is also attacked by optimisation: not the float64 controls, at most 4 sentences."""
    return not protocol.endswith("float64") and sentences <= OPTIMIZATION_MAX_BATCH


def _task_key(name: str, study: str, dataset: str, item, time_budget: float | None = None) -> list[str]:
    protocol, batch = item
    attacks = ("span check", "optimisation") if _optimized(protocol, len(batch)) else ("span check",)
    return [_key(study, dataset, protocol, [e.row_id for e in batch], attack) for attack in attacks]


def _line_key(line: dict) -> str:
    return _key(line["study"], line["dataset"], line["protocol"], line["row_ids"], line["attack"])


def run(out: str | Path, parts=PARTS, jobs: int = 1, scheduler: str | None = None,
        progress: bool = True, time_budget: float | None = TIME_BUDGET) -> list[dict]:
    """Run (or resume) the study's parts, appending their lines to ``out``.

    Args:
        out: the results file.
        parts: any of :data:`PARTS`; run ``secure`` with one job (each
            of its tasks starts Ray on every core).
        jobs, scheduler: the engine (:func:`gilib.studies.runner.run`).
        progress: print a line per finished task.
        time_budget: seconds each span check may take (:data:`TIME_BUDGET`;
            ``None``: no limit).
    """
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        raise ValueError(f"Unknown part {unknown[0]!r}: choose from {', '.join(PARTS)}.")
    return STUDY.run(out, plan(parts, time_budget), jobs=jobs, scheduler=scheduler, progress=progress)


def load(path: str | Path, part: str) -> pd.DataFrame:
    """The lines of one part of the study (``protocol``, ``batch``, ``secure``), as a table.

    ``timed_out`` is a bool on every line: False where a line has none (the
    optimisation attack's, which runs no time budget, and lines written
    before the study had one).
    """
    lines = study_frame(path, part, f"python -m gilib.studies federated run --out {path} --parts {part}")
    lines["timed_out"] = (lines["timed_out"] if "timed_out" in lines else pd.Series(False, index=lines.index)) \
        .astype("boolean").fillna(False).astype(bool)
    return lines


def table(path: str | Path, part: str) -> pd.DataFrame:
    """Exact rate, ROUGE-1/2, median seconds and messages out of time per setting and attack.

    Returns:
        One row per (protocol, batch size, clients, attack), in the
        study's order, with ``out_of_time`` (the span check's messages that
        ran out of :data:`TIME_BUDGET`) and ``sentences`` counted.
    """
    lines = load(path, part)
    lines["sentences"] = lines["row_ids"].map(len)
    keys = ["protocol", "precision", "local_steps", "lr", "batch_size", "clients", "attack"]
    lines["lr"] = lines["lr"].fillna(0.0)
    lines["precision"] = lines["precision"].fillna("")
    grouped = lines.groupby(keys, sort=False).agg(
        exact=("exact", "mean"), rouge1=("rouge1", "mean"), rouge2=("rouge2", "mean"),
        cosine=("cosine_to_gradient", "mean"), seconds=("seconds", "median"),
        out_of_time=("timed_out", "sum"), sentences=("sentences", "sum")).reset_index()
    return grouped.sort_values(["attack", "batch_size", "clients", "precision", "local_steps", "lr"],
                               ignore_index=True)


def intervals(lines: pd.DataFrame, by: list[str], value: str, digits: int = 2) -> pd.DataFrame:
    """Mean of ``value`` per group with its 95 % bootstrap interval over the server's messages.

    A message's sentences share one update, so a message (its dataset and
    ``row_ids``) is the unit: its lines are averaged first, and the interval
    resamples messages (:func:`gilib.metrics.mean_interval`).

    Args:
        lines: the study's lines (:func:`load`), possibly several parts.
        by: the columns to group by, e.g. ``["local_steps", "lr"]``.
        value: the score, e.g. ``exact`` or ``rouge1``.
        digits: decimals of the ``text`` column.

    Returns:
        One row per group, in order of appearance: the ``by`` columns,
        ``value``, ``low``, ``high``, ``messages`` and ``text``
        (``"0.54 [0.48, 0.61]"``).
    """
    rows = []
    for key, part in lines.groupby(by, sort=False, dropna=False):
        message = part["dataset"] + part["row_ids"].astype(str)
        mean, low, high = mean_interval(part.groupby(message)[value].mean())
        rows.append({**dict(zip(by, key)), value: mean, "low": low, "high": high,
                     "messages": message.nunique(), "text": interval_text(mean, low, high, digits)})
    return pd.DataFrame(rows)


def markdown(frame: pd.DataFrame) -> str:
    """:func:`table` as Markdown (the README repeats parts of it)."""
    rows = ([r["protocol"], r["batch_size"] if r["clients"] == 1 else f"{r['clients']} clients x 1",
             r["attack"], f"{r['exact']:.0%}", f"{r['rouge1']:.2f}", f"{r['rouge2']:.2f}", f"{r['cosine']:.3f}",
             f"{r['seconds']:.1f}", r["out_of_time"] if r["attack"] == "span check" else "–", r["sentences"]]
            for _, r in frame.iterrows())
    return markdown_table(["client", "batch", "attack", "exact", "ROUGE-1", "ROUGE-2",
                          "cos(update, gradient)", "s / message (median)", "out of time", "sentences"], rows)


def lr_table(path: str | Path) -> pd.DataFrame:
    """The protocol study by client and learning rate, pooled over the local steps ``E``.

    Returns:
        One row per client (FedSGD, FedAvg in float32, the float64 control)
        and learning rate: the span check's exact rate and ROUGE-1, the
        optimisation attack's ROUGE-1/2 (NaN for the control), the mean
        cosine between the message and the gradient, and the messages
        pooled.
    """
    lines = load(path, "protocol")
    lines["client"] = lines["precision"].map(lambda p: f"FedAvg, {p}" if isinstance(p, str) else "FedSGD")
    lines["lr"] = lines["lr"].fillna(0.0)
    wide = lines.pivot_table(index=["client", "lr"], columns="attack", values=["exact", "rouge1", "rouge2"],
                             aggfunc="mean", sort=False)
    wide.columns = [f"{attack}: {value}" for value, attack in wide.columns]
    span = lines[lines["attack"] == "span check"].groupby(["client", "lr"], sort=False)
    wide["cosine"] = span["cosine_to_gradient"].mean()
    wide["messages"] = span.size()
    order = {"FedSGD": 0, "FedAvg, float32": 1, "FedAvg, float64": 2}
    return wide.reset_index().sort_values(["client", "lr"], key=lambda c: c.map(order) if c.name == "client" else c,
                                          ignore_index=True)


def lr_markdown(frame: pd.DataFrame) -> str:
    """:func:`lr_table` as Markdown (the README prints it)."""
    def fmt(value, pattern):
        return "–" if pd.isna(value) else format(value, pattern)

    rows = ([r["client"], "–" if r["lr"] == 0 else f"{r['lr']:.0e}", r["messages"],
             fmt(r["span check: exact"], ".0%"), fmt(r["span check: rouge1"], ".2f"),
             fmt(r.get("optimisation: rouge1"), ".2f"), fmt(r.get("optimisation: rouge2"), ".2f"),
             f"{min(r['cosine'], 1.0):.3f}"] for _, r in frame.iterrows())
    return markdown_table(["client", "local lr", "messages (all E)", "span check: exact",
                          "span check: ROUGE-1", "optimisation: ROUGE-1", "optimisation: ROUGE-2",
                          "cos(message, gradient)"], rows)


# --------------------------------------------------------------------------
# Chapter 6's tables, each with the facts its prose quotes (the chapter
# records them; tests/chapters read them back)
# --------------------------------------------------------------------------


def round_table(run, rebuilt: dict, batches, tokenizer) -> pd.DataFrame:
    """A live round's clients: each one's private sentence beside the server's rebuild of it.

    Args:
        run: the :class:`~gilib.federated.FederatedRun` of the round.
        rebuilt: client index to the :class:`~gilib.attack.AttackResult`
            the curious server's hook computed from its reply.
        batches: the clients' private batches (one sentence each), the
            truth that only this table reads.
        tokenizer: the victim's tokenizer.

    Returns:
        One row per client that replied: ``client``, ``private sentence``,
        ``server's reconstruction`` and ``exact`` (token for token).
    """
    rows = []
    for reply in sorted(run.replies, key=lambda r: r.client):
        (truth,) = batches[reply.client]
        result = rebuilt[reply.client]
        true_batch = encode(tokenizer, truth.text, truth.label)
        rows.append({"client": reply.client, "private sentence": truth.text,
                     "server's reconstruction": result.texts[0],
                     "exact": exact_rate(result.token_ids, true_token_ids(true_batch)) == 1.0})
    return pd.DataFrame(rows)


def rounding_table(model, selection, true_batch, lrs=LEARNING_RATES) -> tuple[pd.DataFrame, dict]:
    """How much of one FedAvg step float32 rounds away, at each learning rate.

    An SGD step ``lr * g`` smaller than half the spacing of float32
    numbers at a weight leaves that weight unchanged. For one local step
    (``E = 1``) the message should be the gradient itself.

    Args:
        model: the victim; ``selection`` must be one weight.
        selection: the weight a client shares.
        true_batch: the client's batch.
        lrs: the learning rates.

    Returns:
        ``(table, facts)``: per learning rate the share of the weight's
        steps below half a float32 spacing and the cosine between the
        message (in float32 and in the float64 control) and the gradient;
        the facts quote the share at the smallest and largest rate and the
        float32 cosine at the smallest.
    """
    (gradient,) = client_update(model, selection, true_batch).shared.shared_grads
    (weight,) = [p.detach() for p in selection.parameters(model)]
    spacing = float32_spacing(weight).float()
    rows = []
    for lr in lrs:
        row = {"lr": lr, "steps rounded away": float((lr * gradient.abs() < spacing / 2).float().mean())}
        for precision in PRECISIONS:
            sent = client_update(model, selection, true_batch, FedAvg(1, lr, precision)).shared
            row[f"cos, {precision}"] = _drift([gradient], sent)
        rows.append(row)
    facts = {f"rounded_away_{lrs[0]:.0e}": round(rows[0]["steps rounded away"], 4),
             f"rounded_away_{lrs[-1]:.0e}": round(rows[-1]["steps rounded away"], 4),
             f"cos32_{lrs[0]:.0e}": round(rows[0]["cos, float32"], 3)}
    return pd.DataFrame(rows), facts


NOISE_BENCH = Path("data") / "bench" / "noisy_span.csv"
"""Old check against the noise-model check on float32 FedAvg messages (``python bench/noisy_span.py``)."""


def noise_check_summary(path: str | Path) -> tuple[pd.DataFrame, dict]:
    """The span check with and without the protocol's noise model, per FedAvg learning rate and ``E``.

    Args:
        path: ``bench/noisy_span.py``'s CSV (one line per sentence, protocol
            and check).

    Returns:
        ``(table, facts)``: per learning rate and ``E`` (both sentence sets
        together; each cell holds every sentence once, so the sentence is
        the unit), each check's exact share with its Wilson 95 % interval,
        the share of layer 0's query and value entries that moved
        (``entries moved``) and the new check's median and largest seconds;
        the facts give each learning rate's numbers pooled over ``E``
        (``old_exact_1e-04``, ``new_exact_1e-04``, ``surviving_1e-04``, ...),
        its lowest Wilson bound over ``E`` (``new_low_1e-04``), the new
        check's misses pooled over ``E`` (``new_misses_1e-04``), how many of
        them ran out of time (``new_misses_timed_out_1e-04``) and, where the
        lines carry the found sentence's and the truth's distances, how many
        are the search's (``new_search_misses_1e-04``: the truth closer, as
        in :func:`bound_summary`), the messages per cell, the sentences, the
        attacks that ran out of time and the longest sentence rebuilt at the
        smallest rate.
    """
    frame = _bench_lines(path, "FedAvg")
    rows, facts = [], {}
    for (lr, steps), part in frame.groupby(["lr", "E"]):
        row = {"lr": lr, "E": steps}
        row.update(_checks_row(part, facts, f"{lr:.0e}", "entries moved"))
        rows.append(row)
    for lr, part in frame.groupby("lr"):
        for check in ("old", "new"):
            facts[f"{check}_exact_{lr:.0e}"] = round(float(part[part["check"] == check]["exact"].mean()), 4)
        new = part[part["check"] == "new"]
        facts.update({f"surviving_{lr:.0e}": round(float(new["surviving"].mean()), 4),
                      f"new_seconds_max_{lr:.0e}": round(float(new["seconds"].max()), 1)})
        missed, searched = _split_misses(new)
        facts.update({f"new_misses_{lr:.0e}": len(missed),
                      f"new_misses_timed_out_{lr:.0e}": int(missed["timed_out"].astype(bool).sum())})
        if searched is not None:
            facts[f"new_search_misses_{lr:.0e}"] = len(searched)
    smallest = frame[(frame["lr"] == frame["lr"].min()) & (frame["check"] == "new")]
    facts.update({"noise_messages": int(rows[0]["messages"]),
                  "noise_sentences": int(frame[["dataset", "row_id"]].drop_duplicates().shape[0]),
                  "noise_timed_out": int(frame["timed_out"].sum()),
                  "noise_smallest_longest_exact": int(smallest[smallest["exact"]]["tokens"].max())
                  if smallest["exact"].any() else 0})
    return pd.DataFrame(rows), facts


BOUND_BENCH = Path("data") / "bench" / "noisy_span_bound.csv"
"""The noise-model check at E = 1 with each sentence's distance and the truth's (``python bench/noisy_span.py
--local-steps 1 --checks new``): which misses are the search's and which the noise model's."""


def _split_misses(lines: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """The noise-model check's misses among ``lines``, and those of them that are the search's: the
    client's sentence closer to the message than the one found (``None`` for lines without the two
    distances, the bench's older runs)."""
    missed = lines[~lines["exact"].astype(bool)]
    if not {"found_distance", "truth_distance"} <= set(lines.columns):
        return missed, None
    return missed, missed[missed["found_distance"] > missed["truth_distance"]]


def bound_summary(path: str | Path) -> tuple[pd.DataFrame, dict]:
    """Where the noise-model check's misses come from, per FedAvg learning rate and time budget (one local step).

    A miss whose found sentence lies closer to the message than the
    client's (``found_distance <= truth_distance``, both weighted by the
    check's noise model) is beyond any search under that model: the
    message, read through it, prefers a wrong sentence. A miss whose truth
    lies closer is the search's. So ``1 - (noise model's misses) /
    sentences`` bounds from above what any search under this noise model
    can rebuild (a server that replays the client's float32 arithmetic
    exactly is not bound by it). Lines with ``found_replay`` and
    ``truth_replay`` (:func:`gilib.client.replay_mismatch`) also say how many
    found sentences, and how many of the clients', reproduce the message
    bit for bit when the server replays the protocol on them: a found
    sentence that does is certified without the client's data, and a miss
    that does would be a second sentence fitting the message.

    Returns:
        ``(table, facts)``: per learning rate and time budget (``time_budget``
        per line), the sentences, the exact share [Wilson 95 %], the misses
        the search left (truth closer) and the noise model's (a wrong
        sentence closer), the bound, the entries moved and the median and
        largest seconds, and the sentences found and the clients' whose
        replay reproduces the message ("–" for lines without replays); the
        facts give ``bound_exact_<lr>``,
        ``bound_search_<lr>``, ``bound_model_<lr>`` and
        ``bound_ceiling_<lr>`` (``1e-05``, ...) at the smallest budget, the
        same with ``_<budget>s`` appended (``bound_exact_1e-05_300s``) at a
        larger one, the smallest factor by which a search's miss lies
        farther from the message than the truth (``bound_gap_min_<lr>``;
        ``None`` without one), with replays ``bound_replayed_<lr>``,
        ``bound_replayed_misses_<lr>`` and ``bound_truth_replayed_<lr>``,
        and ``bound_sentences``.
    """
    frame = _bench_lines(path, "FedAvg")
    frame = frame[(frame["check"] == "new") & (frame["E"] == 1)]
    smallest = frame["time_budget"].min()
    rows, facts = [], {}
    for (lr, budget), part in frame.groupby(["lr", "time_budget"]):
        missed, searched = _split_misses(part)
        search_misses = len(searched)
        model_misses = len(missed) - search_misses
        share, low, high = share_interval(int(part["exact"].sum()), len(part))
        ceiling = 1 - model_misses / len(part)
        rows.append({"lr": f"{lr:.0e}", "budget (s)": int(budget), "sentences": len(part),
                     "exact [95 %]": interval_text(share, low, high, 0, percent=True),
                     "missed, the truth closer (search)": search_misses,
                     "missed, a wrong sentence closer (noise model)": model_misses,
                     "at most": f"{ceiling:.0%}",
                     "found replays the message": _replayed(part, "found_replay"),
                     "client's replays it": _replayed(part, "truth_replay"),
                     "entries moved": round(float(part["surviving"].mean()), 2),
                     "s / sentence (median, max)": f"{part['seconds'].median():.0f}, {part['seconds'].max():.0f}"})
        key = f"{lr:.0e}" if budget == smallest else f"{lr:.0e}_{budget:.0f}s"
        facts.update({f"bound_exact_{key}": round(share, 4), f"bound_search_{key}": search_misses,
                      f"bound_model_{key}": model_misses, f"bound_ceiling_{key}": round(ceiling, 4),
                      f"bound_gap_min_{key}": round(float((searched["found_distance"] / searched["truth_distance"])
                                                          .min()), 1) if len(searched) else None})
        if _has(part, "found_replay"):
            replayed = part["found_replay"] == 0
            facts.update({f"bound_replayed_{key}": int(replayed.sum()),
                          # A miss whose replay reproduces the message would be a second sentence that fits it.
                          f"bound_replayed_misses_{key}": int((replayed & ~part["exact"].astype(bool)).sum()),
                          f"bound_truth_replayed_{key}": int((part["truth_replay"] == 0).sum())})
    facts["bound_sentences"] = int(frame[["dataset", "row_id"]].drop_duplicates().shape[0])
    return pd.DataFrame(rows), facts


def _has(lines: pd.DataFrame, column: str) -> bool:
    """Whether every one of ``lines`` has ``column`` (the bench's older runs lack the newer columns)."""
    return column in lines.columns and bool(lines[column].notna().all())


def _replayed(lines: pd.DataFrame, column: str) -> str:
    """How many of ``lines`` replay the message bit for bit (``column`` 0), as ``"k of n"``; ``"–"`` for lines
    of a bench run without replays."""
    return f"{int((lines[column] == 0).sum())} of {len(lines)}" if _has(lines, column) else "–"


def bound_markdown(path: str | Path) -> str:
    """:func:`bound_summary`'s table as Markdown (the README repeats it)."""
    table, _ = bound_summary(path)
    return frame_markdown(table)


def _bench_lines(path: str | Path, family: str) -> pd.DataFrame:
    """``bench/noisy_span.py``'s lines of one protocol family (``FedAvg`` or ``AdamW``), with ``lr`` and ``E``
    read off the protocol's name."""
    frame = pd.read_csv(path)
    frame = frame[frame["protocol"].str.startswith(family)].copy()
    frame["lr"] = frame["protocol"].str.extract(r"lr=([0-9.e+-]+)")[0].astype(float)
    frame["E"] = frame["protocol"].str.extract(r"E=(\d+)")[0].astype(int)
    return frame


def _adamw_lines(path: str | Path) -> pd.DataFrame:
    """:func:`_bench_lines` of the AdamW protocols, with their ``precision`` and the facts' ``key``
    (``5e-05_float32``, ``_E2`` added for several steps)."""
    frame = _bench_lines(path, "AdamW")
    frame["precision"] = frame["protocol"].str.split().str[-1]
    frame["key"] = [f"{lr:.0e}_{precision}" + (f"_E{steps}" if steps != 1 else "")
                    for lr, precision, steps in zip(frame["lr"], frame["precision"], frame["E"])]
    return frame


def _checks_row(part: pd.DataFrame, facts: dict, key: str, surviving: str) -> dict:
    """One cell of the old-against-new table: each check's exact share [Wilson 95 %], the surviving
    share, the new check's seconds; each check's lowest Wilson bound goes into ``facts`` under ``key``."""
    row = {}
    for check, name in (("old", "old check"), ("new", "noise-model check")):
        lines = part[part["check"] == check]
        share, low, high = share_interval(int(lines["exact"].sum()), len(lines))
        row[f"{name}: exact [95 %]"] = interval_text(share, low, high, 0, percent=True)
        facts[f"{check}_low_{key}"] = round(min(low, facts.get(f"{check}_low_{key}", 1.0)), 4)
    new = part[part["check"] == "new"]
    row.update({surviving: round(float(new["surviving"].mean()), 2),
                "s / sentence (median, max)": f"{new['seconds'].median():.0f}, {new['seconds'].max():.0f}",
                "messages": len(new)})
    return row


ADAMW_BENCH = Path("data") / "bench" / "noisy_span_adamw.csv"
"""Old check against the noise-model check on one-step AdamW messages
(``python bench/noisy_span.py --protocols adamw``)."""


def adamw_summary(path: str | Path) -> tuple[pd.DataFrame, dict]:
    """The span check on AdamW clients' messages, old against new, per learning rate and precision.

    Every message is inverted first (:meth:`gilib.client.AdamW.gradient`);
    the old check reads the inverted gradient as it is, the new one with
    :meth:`~gilib.client.AdamW.entry_weights`.

    Returns:
        ``(table, facts)``: per learning rate and precision, each check's
        exact share [Wilson 95 %], the share of layer 0's query and value
        entries the inversion resolves (``entries resolved``), the new
        check's seconds and the messages; the facts give
        ``adamw_new_exact_<lr>_<precision>[_E<E>]``, the lowest Wilson
        bounds (``new_low_<lr>_<precision>``), the resolved shares, the
        attacks that ran out of time and, for messages of several steps
        (inverted as if one), both checks' exact share, their messages and
        the largest median cosine between the server's reading and the
        client's gradient (``adamw_several_...``).
    """
    frame = _adamw_lines(path)
    rows, facts = [], {}
    for (precision, lr, steps, key), part in frame.groupby(["precision", "lr", "E", "key"], sort=False):
        row = {"lr": f"{lr:.0e}", "E": steps, "precision": precision}
        row.update(_checks_row(part, facts, key, "entries resolved"))
        new = part[part["check"] == "new"]
        facts.update({f"adamw_new_exact_{key}": round(float(new["exact"].mean()), 4),
                      f"adamw_resolved_{key}": round(float(new["surviving"].mean()), 4)})
        rows.append(row)
    facts.update({"adamw_timed_out": int(frame["timed_out"].sum()),
                  "adamw_sentences": int(frame[["dataset", "row_id"]].drop_duplicates().shape[0])})
    several = frame[frame["E"] > 1]
    if len(several):
        # Several steps, inverted as if one: how far the server's reading is from the gradient.
        cosines = several.groupby("protocol")["cosine_to_gradient"].median()
        facts.update({"adamw_several_exact": round(float(several["exact"].mean()), 4),
                      "adamw_several_messages": int((several["check"] == "new").sum()),
                      "adamw_several_cosine_max": round(float(cosines.max()), 2)})
    return pd.DataFrame(rows), facts


ADAMW_OPTIMISATION_BENCH = Path("data") / "bench" / "optimisation_adamw.csv"
"""LAMP's optimisation attack on FedSGD and AdamW messages, the same sentences
(``python bench/noisy_span.py --protocols fedsgd adamw --adamw-steps 1 2 5 --checks optimisation``)."""


def adamw_optimisation_summary(path: str | Path) -> tuple[pd.DataFrame, dict]:
    """The optimisation attack on AdamW messages against the same attack on the plain gradient.

    The server attacks its reading of each message: the one-step inversion
    (:meth:`gilib.client.AdamW.gradient`, applied as if one step for
    ``E > 1``). Each sentence is attacked once per protocol, so the
    difference to FedSGD is paired by sentence.

    Returns:
        ``(table, facts)``: per protocol, ROUGE-1 and ROUGE-2 with their
        95 % bootstrap intervals over sentences, ROUGE-1's paired difference
        to FedSGD, the cosine between the server's reading and the client's
        gradient (median) and the seconds; the facts give
        ``opt_rouge1_fedsgd``, ``opt_rouge1_<lr>_<precision>[_E<E>]``, the
        differences (``opt_diff_...``, ``opt_diff_low_...``,
        ``opt_diff_high_...``), the cosines (``opt_cosine_...``), the
        sentences, and over every AdamW row the smallest and largest loss
        (``opt_diff_least``, ``opt_diff_most``) and the highest upper bound
        of a difference (``opt_diff_high_max``).
    """
    everything = pd.read_csv(path)
    fedsgd = everything[(everything["protocol"] == "FedSGD") & (everything["check"] == "optimisation")]
    adamw = _adamw_lines(path)
    adamw = adamw[adamw["check"] == "optimisation"]
    reference = fedsgd.set_index(["dataset", "row_id"])["rouge1"]
    parts = [("fedsgd", {"client": "FedSGD", "E": "", "lr": "", "precision": ""}, fedsgd)]
    parts += [(key, {"client": "AdamW", "E": steps, "lr": f"{lr:.0e}", "precision": precision}, part)
              for (key, steps, lr, precision), part in adamw.groupby(["key", "E", "lr", "precision"], sort=False)]
    rows, facts = [], {}
    for key, row, part in parts:
        rouge1, rouge2 = mean_interval(part["rouge1"].tolist()), mean_interval(part["rouge2"].tolist())
        row.update({"ROUGE-1 [95 %]": interval_text(*rouge1), "ROUGE-2 [95 %]": interval_text(*rouge2)})
        facts[f"opt_rouge1_{key}"] = round(rouge1[0], 4)
        row["ROUGE-1 - FedSGD"] = ""
        if key != "fedsgd":
            paired = part.set_index(["dataset", "row_id"])["rouge1"] - reference
            diff = mean_interval(paired.dropna().tolist())
            row["ROUGE-1 - FedSGD"] = interval_text(*diff, signed=True)
            facts.update({f"opt_diff_{key}": round(diff[0], 4), f"opt_diff_low_{key}": round(diff[1], 4),
                          f"opt_diff_high_{key}": round(diff[2], 4)})
        cosine = float(part["cosine_to_gradient"].median())
        facts[f"opt_cosine_{key}"] = round(cosine, 4)
        row.update({"cosine to gradient": round(cosine, 2), "s / sentence": round(float(part["seconds"].median())),
                    "sentences": len(part)})
        rows.append(row)
    frame = pd.concat([fedsgd, adamw])
    facts["opt_sentences"] = int(frame[["dataset", "row_id"]].drop_duplicates().shape[0])
    differences = {k: v for k, v in facts.items() if k.startswith("opt_diff_") and "_low_" not in k
                   and "_high_" not in k}
    if differences:
        facts.update({"opt_diff_least": max(differences.values()), "opt_diff_most": min(differences.values()),
                      "opt_diff_high_max": max(v for k, v in facts.items() if k.startswith("opt_diff_high_"))})
    return pd.DataFrame(rows), facts


def adamw_optimisation_markdown(path: str | Path) -> str:
    """:func:`adamw_optimisation_summary`'s table as Markdown (the README repeats it)."""
    table, _ = adamw_optimisation_summary(path)
    return frame_markdown(table)


SECURE_BENCH = Path("data") / "bench" / "noisy_span_secagg.csv"
"""Old check against the noise-model check on SecAgg+ means
(``python bench/noisy_span.py --protocols secagg``)."""


def secure_noise_summary(path: str | Path) -> tuple[pd.DataFrame, dict]:
    """The span check on SecAgg+ means of N one-sentence clients, fixed thresholds against the noise model.

    Returns:
        ``(table, facts)``: per N, each check's exact share of sentences
        [Wilson 95 %], the rounding noise's share of the mean's norm, each
        check's median and largest seconds per batch, the batches and the
        sentences; the facts give ``secagg_old_exact_<N>`` and
        ``secagg_new_exact_<N>``, the lowest Wilson bounds
        (``secagg_new_low_<N>``), the largest seconds per batch
        (``secagg_new_seconds_max_<N>``), the batches that ran out of time
        (``secagg_new_timed_out_<N>``), the fewest tokens among them
        (``secagg_new_slow_tokens_<N>``) and the most tokens of a batch that
        finished (``secagg_new_done_tokens_<N>``).
    """
    frame = pd.read_csv(path)
    frame = frame[frame["protocol"].str.startswith("SecAgg+")].copy()
    frame["N"] = frame["protocol"].str.extract(r"(\d+) clients")[0].astype(int)
    return _batch_checks(frame, "N", "N clients", "secagg", "rounding / mean", lambda s: f"{s.max():.0e}")


FEDAVG_BATCH_BENCH = Path("data") / "bench" / "noisy_span_fedavg_batch.csv"
"""Old check against the noise-calibrated batch check on chapter 6's FedAvg batches
(``python bench/noisy_span.py --protocols fedavg-batch``)."""


def fedavg_batch_summary(path: str | Path) -> tuple[pd.DataFrame, dict]:
    """The span check on one float32 FedAvg client's batch (:data:`FEDAVG`), fixed thresholds against noise.

    "new" is :func:`~gilib.attack.span_attack`'s batch check with
    ``noise=FedAvg(...).noise_std(...)``: the rounding's standard deviation
    on layer 0's query weight, as for SecAgg+'s means.

    Returns:
        ``(table, facts)`` as :func:`secure_noise_summary`'s, per batch size,
        with the share of layer 0's query and value entries that moved and,
        where the bench ran it, the float64 control's exact share under the
        old check (``float64 control: exact [95 %]``: the same client
        training in double precision, the local steps' drift without the
        rounding); the facts' keys start ``fedavg_batch_``
        (``fedavg_batch_new_exact_4``, ``fedavg_batch_control_exact_4``, ...).
    """
    frame = pd.read_csv(path)
    frame = frame[frame["protocol"].str.contains(" batch ")].copy()
    frame["size"] = frame["protocol"].str.extract(r"batch (\d+)")[0].astype(int)
    control = frame["protocol"].str.contains("float64")
    table, facts = _batch_checks(frame[~control], "size", "batch", "fedavg_batch", "entries moved",
                                 lambda s: round(float(s.mean()), 2))
    if control.any():
        cells = []
        for size in table["batch"]:
            lines = frame[control & (frame["size"] == size) & (frame["check"] == "old")]
            if not len(lines):
                cells.append("not run")
                continue
            share, low, high = share_interval(int(lines["exact"].sum()), len(lines))
            cells.append(interval_text(share, low, high, 0, percent=True))
            facts[f"fedavg_batch_control_exact_{size}"] = round(share, 4)
        table.insert(table.columns.get_loc("entries moved"), "float64 control: exact [95 %]", cells)
    return table, facts


def _batch_checks(frame: pd.DataFrame, by: str, label: str, prefix: str, surviving: str,
                  surviving_text) -> tuple[pd.DataFrame, dict]:
    """The old-against-new table of batches (one line per sentence, each with its batch's seconds), per ``by``."""
    rows, facts = [], {}
    for value, part in frame.groupby(by):
        row = {label: value}
        for check in ("old", "new"):
            lines = part[part["check"] == check]
            share, low, high = share_interval(int(lines["exact"].sum()), len(lines))
            row[f"{check}: exact [95 %]"] = interval_text(share, low, high, 0, percent=True)
            batches = lines.drop_duplicates(["set", "dataset"])
            row[f"{check}: s / batch (median, max)"] = (f"{batches['seconds'].median():.0f}, "
                                                         f"{batches['seconds'].max():.0f}")
            tokens = lines.groupby(["set", "dataset"])["tokens"].sum()
            slow = batches[batches["timed_out"]].set_index(["set", "dataset"]).index
            facts.update({f"{prefix}_{check}_exact_{value}": round(share, 4),
                          f"{prefix}_{check}_low_{value}": round(low, 4),
                          f"{prefix}_{check}_seconds_max_{value}": round(float(batches["seconds"].max()), 1),
                          f"{prefix}_{check}_timed_out_{value}": int(batches["timed_out"].sum()),
                          f"{prefix}_{check}_slow_tokens_{value}": int(tokens[slow].min()) if len(slow) else 0,
                          f"{prefix}_{check}_done_tokens_{value}": int(tokens.drop(slow).max())
                          if len(slow) < len(tokens) else 0})
        row.update({surviving: surviving_text(part["surviving"]),
                    "batches": int(part.drop_duplicates(["set", "dataset"]).shape[0]),
                    "sentences": int(len(part) // 2)})
        rows.append(row)
    return pd.DataFrame(rows), facts


MIXED_BENCH = Path("data") / "bench" / "mixed_batches.csv"
"""The span check on FedSGD batches of 16 sentences mixed from the three datasets, whole bag against
position split (``python bench/mixed_batches.py``)."""


def mixed_summary(path: str | Path | pd.DataFrame) -> tuple[pd.DataFrame, dict]:
    """The span check on mixed FedSGD batches of 16, per check (``old``: the whole bag; ``new``: position split).

    Args:
        path: ``bench/mixed_batches.py``'s CSV (one line per batch and check), or its lines.

    Returns:
        ``(table, facts)``: per check, the sentences rebuilt exactly
        [Wilson 95 %], the batches rebuilt whole, the median and largest
        seconds per batch, the batches that ran out of time, the batches
        and their token counts; the facts give ``mixed_<check>_exact``,
        ``mixed_<check>_low``, ``mixed_<check>_seconds_max``,
        ``mixed_<check>_timed_out`` and ``mixed_batches``.
    """
    frame = path if isinstance(path, pd.DataFrame) else pd.read_csv(path)
    rows, facts = [], {}
    for check, part in frame.groupby("check", sort=False):
        share, low, high = share_interval(int(part["exact"].sum()), int(part["sentences"].sum()))
        rows.append({"check": {"old": "whole bag (old)", "new": "position split (new)"}.get(check, check),
                     "sentences exact [95 %]": interval_text(share, low, high, 0, percent=True),
                     "batches whole": f"{int((part['exact'] == part['sentences']).sum())} of {len(part)}",
                     "s / batch (median, max)": f"{part['seconds'].median():.0f}, {part['seconds'].max():.0f}",
                     "out of time": int(part["timed_out"].sum()),
                     "tokens": f"{part['tokens'].min()}-{part['tokens'].max()}"})
        facts.update({f"mixed_{check}_exact": round(share, 4), f"mixed_{check}_low": round(low, 4),
                      f"mixed_{check}_seconds_max": round(float(part["seconds"].max()), 1),
                      f"mixed_{check}_timed_out": int(part["timed_out"].sum())})
    facts["mixed_batches"] = int(frame["batch"].nunique())
    return pd.DataFrame(rows), facts


def mixed_markdown(path: str | Path) -> str:
    """:func:`mixed_summary`'s table as Markdown (the README repeats it)."""
    table, _ = mixed_summary(path)
    return frame_markdown(table)


def fedavg_batch_markdown(path: str | Path) -> str:
    """:func:`fedavg_batch_summary`'s table as Markdown (the README repeats it)."""
    table, _ = fedavg_batch_summary(path)
    return frame_markdown(table)


def secure_noise_markdown(path: str | Path) -> str:
    """:func:`secure_noise_summary`'s table as Markdown (the README repeats it)."""
    table, _ = secure_noise_summary(path)
    return frame_markdown(table)


def adamw_markdown(path: str | Path) -> str:
    """:func:`adamw_summary`'s table as Markdown (the README repeats it)."""
    table, _ = adamw_summary(path)
    return frame_markdown(table)


def noise_markdown(path: str | Path) -> str:
    """:func:`noise_check_summary`'s table as Markdown (the README repeats it)."""
    table, _ = noise_check_summary(path)
    columns = list(table.columns)
    rows = ([f"{v:.0e}" if c == "lr" else v for c, v in zip(columns, row)] for row in table.itertuples(index=False))
    return markdown_table(["lr" if c == "lr" else c for c in columns], rows)


def protocol_summary(path: str | Path) -> tuple[pd.DataFrame, dict]:
    """The protocol part's :func:`table` and the facts the chapter quotes.

    Returns:
        ``(table, facts)``: FedSGD's exact share and ROUGE-1, the float64
        control's lowest exact share and cosine, the float32 span check's
        exact share and cosine per learning rate, which datasets survive the
        largest rate (and the token counts either side), and the range of
        the optimisation attack's ROUGE-1 over every FedAvg client.
    """
    protocol = table(path, "protocol")
    fedsgd = protocol.query("protocol == 'FedSGD'").set_index("attack")
    fedavg = protocol.query("protocol != 'FedSGD'")
    span32 = fedavg.query("attack == 'span check' and precision == 'float32'")
    span64 = fedavg.query("attack == 'span check' and precision == 'float64'")
    optimized = fedavg.query("attack == 'optimisation'")
    facts = {
        "protocol_sentences": int(fedsgd.loc["span check", "sentences"]),
        "fedsgd_span_exact": round(float(fedsgd.loc["span check", "exact"]), 4),
        "fedsgd_opt_rouge1": round(float(fedsgd.loc["optimisation", "rouge1"]), 2),
        "span64_exact_min": round(float(span64["exact"].min()), 4),
        "span64_cos_min": round(float(span64["cosine"].min()), 4),
    }
    for lr in LEARNING_RATES:
        facts[f"span32_exact_{lr:.0e}"] = round(float(span32.query("lr == @lr")["exact"].mean()), 4)
        facts[f"cos32_mean_{lr:.0e}"] = round(float(span32.query("lr == @lr")["cosine"].mean()), 3)
    lines = load(path, "protocol")
    largest = lines.query("attack == 'span check' and precision == 'float32' and lr == @LEARNING_RATES[-1]")
    by_dataset = largest.groupby("dataset")[["exact", "tokens"]].mean()
    kept = by_dataset["exact"] > 0
    facts.update({
        f"survivors_{LEARNING_RATES[-1]:.0e}": ", ".join(by_dataset.index[kept]),
        "survivor_tokens": round(float(by_dataset.loc[kept, "tokens"].max())),
        "failed_tokens": round(float(by_dataset.loc[~kept, "tokens"].min())),
        "opt_rouge1_min": round(float(optimized["rouge1"].min()), 2),
        "opt_rouge1_max": round(float(optimized["rouge1"].max()), 2),
    })
    return protocol, facts


def batch_summary(path: str | Path) -> tuple[pd.DataFrame, dict]:
    """One client's batch size, FedSGD against FedAvg at :data:`FEDAVG`, with batch size 1 from the protocol part.

    Returns:
        ``(table, facts)``: one row per attack, client and batch size
        (1 from the protocol part, 2 to 8 from the batch part) with a
        ``series`` column for the figure; the facts give each one's exact
        share and ROUGE-1 (``span_sgd2_exact``, ``opt_avg4_rouge1``, ...)
        and the FedAvg client's name.
    """
    fedavg = protocol_name(FEDAVG)
    single = table(path, "protocol").query("protocol in ['FedSGD', @fedavg]")
    by_size = pd.concat([single, table(path, "batch")], ignore_index=True)
    by_size["series"] = by_size["attack"] + ", " + by_size["protocol"]
    facts = {"fedavg_name": fedavg}
    for (attack, name), part in by_size.groupby(["attack", "protocol"]):
        key = ("span" if attack == "span check" else "opt") + ("_sgd" if name == "FedSGD" else "_avg")
        for _, row in part.iterrows():
            facts[f"{key}{row['batch_size']}_exact"] = round(float(row["exact"]), 4)
            facts[f"{key}{row['batch_size']}_rouge1"] = round(float(row["rouge1"]), 2)
    return by_size, facts


def secure_summary(path: str | Path) -> tuple[pd.DataFrame, dict]:
    """SecAgg+ of N one-sentence clients against one client holding the same N sentences.

    Returns:
        ``(table, facts)``: one row per attack and N for each of the two
        (``who``, ``sentences_in_message``); the facts give the secure
        rounds' exact share and ROUGE-1 per N (``sec_span4_exact``, ...),
        how many (attack, N) pairs the two agree on, where the span check
        did worse behind SecAgg+ (datasets, exact share, fewest tokens,
        median seconds, how many ran out of time), the largest error of the unmasked mean against the
        batch gradient and the median Flower round's seconds.
    """
    secure = table(path, "secure")
    secure = secure.assign(sentences_in_message=secure["clients"],
                           who=secure["attack"] + ", SecAgg+ of N clients")
    one = table(path, "batch").query("protocol == 'FedSGD'")
    one = one.assign(sentences_in_message=one["batch_size"], who=one["attack"] + ", one client with N sentences")
    both = pd.concat([secure, one], ignore_index=True)
    facts = {}
    for _, row in secure.iterrows():
        key = "sec_span" if row["attack"] == "span check" else "sec_opt"
        facts[f"{key}{row['clients']}_exact"] = round(float(row["exact"]), 4)
        facts[f"{key}{row['clients']}_rouge1"] = round(float(row["rouge1"]), 2)
    paired = secure.merge(one, on=["attack", "sentences_in_message"], suffixes=("_secure", "_batch"))
    lines = load(path, "secure")
    alone = load(path, "batch").query("protocol == 'FedSGD' and attack == 'span check'")
    span = lines.query("attack == 'span check'").merge(alone, left_on=["dataset", "clients"],
                                                         right_on=["dataset", "batch_size"], suffixes=("", "_alone"))
    worse = span.query("exact < exact_alone")
    facts.update({
        "secure_same": int((paired["exact_secure"] == paired["exact_batch"]).sum()),
        "secure_pairs": len(paired),
        "secure_worse": ", ".join(f"{r.dataset} at {r.clients}" for r in worse.itertuples()),
        "secure_worse_exact": round(float(worse["exact"].mean()), 4),
        "secure_worse_tokens": int(worse["tokens"].min()),
        "secure_worse_seconds": round(float(worse["seconds"].median())),
        "secure_worse_timed_out": int(worse["timed_out"].sum()),
        "secure_error_max": float(lines["relative_error_to_batch_gradient"].max()),
        "secure_flower_seconds": round(float(lines["flower_seconds"].median()), 1),
    })
    return both, facts


def _label(lines: list[dict]) -> str:
    line = lines[0]
    return f"{line['study']} {line['dataset']} {line['protocol']} B={line['batch_size']} clients={line['clients']}"


STUDY = Study(
    name="federated",
    description="chapter 6: FedAvg's local steps and float32, the client's batch size, SecAgg+ rounds",
    plan=lambda args: plan(args.parts, args.time_budget),
    work=run_task,
    task_keys=_task_key,
    line_key=_line_key,
    label=_label,
    run_options=(option("--parts", nargs="+", default=list(PARTS), choices=PARTS,
                        help="which parts to run (run secure with --jobs 1: each of its tasks starts Ray)"),
                 option("--time-budget", type=float, default=TIME_BUDGET,
                        help="seconds each span check may take; it then returns its best partial result, "
                             f"marked timed_out (default: {TIME_BUDGET:.0f}, the cached study's)")),
    tables=(
        Table("table", "one part's table: exact rate, ROUGE, cosine and seconds per setting and attack",
              lambda args: markdown(table(args.results, args.part)),
              (option("results", type=Path, help="this study's results (data/results/ch6_federated.jsonl)"),
               option("--part", default="protocol", choices=PARTS))),
        Table("noise", "float32 FedAvg: the span check with and without the protocol's noise model "
                       "(bench/noisy_span.py's CSV), per learning rate",
              lambda args: noise_markdown(args.results),
              (option("results", type=Path, help="bench/noisy_span.py's CSV (data/bench/noisy_span.csv)"),)),
        Table("bound", "float32 FedAvg at E = 1: the noise-model check's misses, the search's (the truth closer "
                       "to the message) and the noise model's (a wrong sentence closer), per learning rate "
                       "(bench/noisy_span.py --local-steps 1 --checks new)",
              lambda args: bound_markdown(args.results),
              (option("results", type=Path, help="the bench's CSV (data/bench/noisy_span_bound.csv)"),)),
        Table("adamw", "AdamW clients: the span check with and without the one-step inversion's noise model "
                        "(bench/noisy_span.py --protocols adamw), per learning rate and precision",
              lambda args: adamw_markdown(args.results),
              (option("results", type=Path, help="the bench's AdamW CSV (data/bench/noisy_span_adamw.csv)"),)),
        Table("adamw-optimisation", "AdamW clients: LAMP's optimisation attack on the server's reading of the "
                                    "message against the same attack on FedSGD (bench/noisy_span.py --checks "
                                    "optimisation)",
              lambda args: adamw_optimisation_markdown(args.results),
              (option("results", type=Path,
                      help="the bench's CSV (data/bench/optimisation_adamw.csv)"),)),
        Table("secagg", "SecAgg+ means of N one-sentence clients: the span check with fixed thresholds and "
                         "with the protocol's rounding noise (bench/noisy_span.py --protocols secagg)",
              lambda args: secure_noise_markdown(args.results),
              (option("results", type=Path,
                      help="the bench's SecAgg+ CSV (data/bench/noisy_span_secagg.csv)"),)),
        Table("fedavg-batch", "one float32 FedAvg client's batch of 2, 4 or 8 sentences (E=5, lr 1e-3): the span "
                              "check with fixed thresholds and with the rounding's noise (bench/noisy_span.py "
                              "--protocols fedavg-batch)",
              lambda args: fedavg_batch_markdown(args.results),
              (option("results", type=Path,
                      help="the bench's FedAvg batch CSV (data/bench/noisy_span_fedavg_batch.csv)"),)),
        Table("mixed", "FedSGD batches of 16 sentences mixed from the three datasets: the span check on the "
                        "whole bag and with the position split (bench/mixed_batches.py)",
              lambda args: mixed_markdown(args.results),
              (option("results", type=Path, help="the bench's CSV (data/bench/mixed_batches.csv)"),)),
        Table("lr", "the protocol part by client and learning rate, pooled over the local steps E",
              lambda args: lr_markdown(lr_table(args.results)),
              (option("results", type=Path, help="this study's results (data/results/ch6_federated.jsonl)"),)),
    ),
)
"""Chapter 6's measurements as a study (``python -m gilib.studies federated ...``)."""
