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

A killed run resumes (:func:`gilib.studies.runner.run`).
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import pandas as pd
import torch

from ..attack import AttackConfig, optimization_attack, span_attack
from ..client import PRECISIONS, FedAvg, client_update
from ..metrics import exact_rate, score_batch, true_token_ids
from ..models import cached_model, encode
from ..selection import select
from .sample import GRID_SPLITS, sample
from .store import study_frame
from .study import Study, Table, markdown_table, option

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


def attack_message(update, true_batch, references, *, optimize: bool = True) -> list[dict]:
    """Both attacks on one message; one measurement per attack.

    Args:
        update: the server's message (a :class:`~gilib.update.SharedUpdate`).
        true_batch: the client's truth (only the metrics read it).
        references: the true sentences.
        optimise: run the optimisation attack too.

    Returns:
        ``attack``, ``exact`` (share of sentences rebuilt token for token),
        ROUGE-1/2 (matched within the batch) and seconds, per attack.
    """
    model, tokenizer = cached_model(MODEL)
    selection = select(model, *SELECTION)
    truth = true_token_ids(true_batch)
    lines = []
    # The span check needs no labels: peeling finds them.
    span = span_attack(model, tokenizer, update._replace(labels=None), selection)
    found = span.diagnostics
    attacks = [("span check", span, {"rank": found.rank, "min_gap": found.min_gap,
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


def measure_client(study: str, dataset: str, item) -> list[dict]:
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
    measured = attack_message(shared, true_batch, [e.text for e in batch], optimize=_optimized(name, len(batch)))
    return [{**line, **m} for m in measured]


def measure_secure(study: str, dataset: str, item) -> list[dict]:
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
                              optimize=_optimized(name, len(batch)))
    return [{**line, **m} for m in measured]


PARTS = ("protocol", "batch", "secure")
"""The parts of the study; each line names its part in its ``study`` field."""


def plan(parts=PARTS) -> list[tuple]:
    """Every task: ``(function name, study, dataset, (protocol name, batch))``."""
    tasks = []
    if "protocol" in parts:
        for dataset in DATASETS:
            for batch in sample(dataset, SENTENCES):
                tasks += [("measure_client", "protocol", dataset, (name, batch)) for name in protocols()]
    if "batch" in parts:
        for size in BATCH_SIZES:
            for dataset in DATASETS:
                # The batch study's sentences follow the protocol study's in the seeded sample.
                (batch,) = sample(dataset, 1, size, offset=SENTENCES)
                tasks += [("measure_client", "batch", dataset, (name, batch))
                          for name in ("FedSGD", protocol_name(FEDAVG))]
    if "secure" in parts:
        for clients in CLIENTS:
            for dataset in DATASETS:
                (batch,) = sample(dataset, 1, clients, offset=SENTENCES)
                tasks.append(("measure_secure", "secure", dataset, ("FedSGD", batch)))
    return tasks


MEASUREMENTS = {f.__name__: f for f in (measure_client, measure_secure)}


def run_task(name: str, study: str, dataset: str, item) -> list[dict]:
    """One task (runs in a worker): one torch thread, then ``measure_<kind>``."""
    torch.set_num_threads(1)
    return MEASUREMENTS[name](study, dataset, item)


def _key(study: str, dataset: str, protocol: str, row_ids, attack: str) -> str:
    return json.dumps([study, dataset, protocol, row_ids, attack])


def _optimized(protocol: str, sentences: int) -> bool:
    """Whether a message is also attacked by optimisation: not the float64 controls, at most 4 sentences."""
    return not protocol.endswith("float64") and sentences <= OPTIMIZATION_MAX_BATCH


def _task_key(name: str, study: str, dataset: str, item) -> list[str]:
    protocol, batch = item
    attacks = ("span check", "optimisation") if _optimized(protocol, len(batch)) else ("span check",)
    return [_key(study, dataset, protocol, [e.row_id for e in batch], attack) for attack in attacks]


def _line_key(line: dict) -> str:
    return _key(line["study"], line["dataset"], line["protocol"], line["row_ids"], line["attack"])


def run(out: str | Path, parts=PARTS, jobs: int = 1, scheduler: str | None = None,
        progress: bool = True) -> list[dict]:
    """Run (or resume) the study's parts, appending their lines to ``out``.

    Args:
        out: the results file.
        parts: any of :data:`PARTS`; run ``secure`` with one job (each
            of its tasks starts Ray on every core).
        jobs, scheduler: the engine (:func:`gilib.studies.runner.run`).
        progress: print a line per finished task.
    """
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        raise ValueError(f"Unknown part {unknown[0]!r}: choose from {', '.join(PARTS)}.")
    return STUDY.run(out, plan(parts), jobs=jobs, scheduler=scheduler, progress=progress)


def load(path: str | Path, part: str) -> pd.DataFrame:
    """The lines of one part of the study (``protocol``, ``batch``, ``secure``), as a table."""
    return study_frame(path, part, f"python -m gilib.studies federated run --out {path} --parts {part}")


def table(path: str | Path, part: str) -> pd.DataFrame:
    """Exact rate, ROUGE-1/2 and median seconds per setting and attack.

    Returns:
        One row per (protocol, batch size, clients, attack), in the
        study's order, with ``sentences`` counted.
    """
    lines = load(path, part)
    lines["sentences"] = lines["row_ids"].map(len)
    keys = ["protocol", "precision", "local_steps", "lr", "batch_size", "clients", "attack"]
    lines["lr"] = lines["lr"].fillna(0.0)
    lines["precision"] = lines["precision"].fillna("")
    grouped = lines.groupby(keys, sort=False).agg(
        exact=("exact", "mean"), rouge1=("rouge1", "mean"), rouge2=("rouge2", "mean"),
        cosine=("cosine_to_gradient", "mean"), seconds=("seconds", "median"),
        sentences=("sentences", "sum")).reset_index()
    return grouped.sort_values(["attack", "batch_size", "clients", "precision", "local_steps", "lr"],
                               ignore_index=True)


def markdown(frame: pd.DataFrame) -> str:
    """:func:`table` as Markdown (the README repeats parts of it)."""
    rows = ([r["protocol"], r["batch_size"] if r["clients"] == 1 else f"{r['clients']} clients x 1",
             r["attack"], f"{r['exact']:.0%}", f"{r['rouge1']:.2f}", f"{r['rouge2']:.2f}", f"{r['cosine']:.3f}",
             f"{r['seconds']:.1f}", r["sentences"]] for _, r in frame.iterrows())
    return markdown_table(["client", "batch", "attack", "exact", "ROUGE-1", "ROUGE-2",
                                   "cos(update, gradient)", "s / message (median)", "sentences"], rows)


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


def _label(lines: list[dict]) -> str:
    line = lines[0]
    return f"{line['study']} {line['dataset']} {line['protocol']} B={line['batch_size']} clients={line['clients']}"


STUDY = Study(
    name="federated",
    description="chapter 6: FedAvg's local steps and float32, the client's batch size, SecAgg+ rounds",
    plan=lambda args: plan(args.parts),
    work=run_task,
    task_keys=_task_key,
    line_key=_line_key,
    label=_label,
    run_options=(option("--parts", nargs="+", default=list(PARTS), choices=PARTS,
                        help="which parts to run (run secure with --jobs 1: each of its tasks starts Ray)"),),
    tables=(
        Table("table", "one part's table: exact rate, ROUGE, cosine and seconds per setting and attack",
              lambda args: markdown(table(args.results, args.part)),
              (option("results", type=Path, help="this study's results (data/results/ch6_federated.jsonl)"),
               option("--part", default="protocol", choices=PARTS))),
        Table("lr", "the protocol part by client and learning rate, pooled over the local steps E",
              lambda args: lr_markdown(lr_table(args.results)),
              (option("results", type=Path, help="this study's results (data/results/ch6_federated.jsonl)"),)),
    ),
)
"""Chapter 6's measurements as a study (``python -m gilib.studies federated ...``)."""
