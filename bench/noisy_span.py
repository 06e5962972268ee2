"""The span check on what real clients send (float32 FedAvg, AdamW, SecAgg+, FedAvg batches): old check against new.

What it measures
----------------
One sentence per client, whole of layer 0 shared (chapter 6's setting), for
each client protocol: the share of sentences the span check rebuilds token
for token, and its seconds per sentence, for

* **old**: :func:`gilib.attack.span_attack` on the message as it is (the
  check of chapter 5: the first layer-0 projection's row space);
* **new**: the same attack with the protocol's noise model
  (``weights=protocol.entry_weights(...)``: the stacked projections'
  weighted rank-n fit and a search over each position's candidates,
  :mod:`gilib.attack.completion`);

and the **surviving share**: for FedAvg the share of layer 0's query and
value entries that moved at all, for AdamW the share whose one-step
inversion the noise model trusts (``entry_weights`` of 1). AdamW messages are
inverted first (:meth:`gilib.client.AdamW.gradient`); both attacks get the
inverted gradient. A message of several AdamW steps (``--adamw-steps 2 5``)
has no elementwise inverse; the server inverts it as if it were one step.

``--checks optimisation`` runs LAMP's optimisation attack (chapter 6's
settings, :data:`gilib.studies.federated.ATTACK`) on the same messages,
with ROUGE-1/2 per sentence; ``--protocols fedsgd`` adds the plain gradient
as its reference. Every line has ``cosine_to_gradient``: the cosine between
the server's reading of the message (inverted, for AdamW) and the client's
gradient.

**SecAgg+** (``--protocols secagg``): N FedSGD clients of one sentence each
(whole of layer 0), their mean as Flower's SecAgg+ unmasks it
(:func:`gilib.secure.secure_mean`: Flower's own quantisation, without the
network), attacked as one batch: **old** with the fixed thresholds, **new**
with the protocol's noise (``noise=SecAgg().noise_std(...)``: rank, token
z-scores and peel test judged against it). One line per sentence; its
``seconds`` are its batch's; ``surviving`` is the rounding noise's share of
the mean's norm.

**FedAvg batches** (``--protocols fedavg-batch``): chapter 6's batch study
(one float32 FedAvg client, E = 5, lr 1e-3, one batch of ``--batch-sizes``
sentences per dataset), attacked as one batch: **old** with the fixed
thresholds, **new** with ``noise=FedAvg(...).noise_std(...)`` (the
rounding's standard deviation on layer 0's query weight); ``surviving`` is
the share of query and value entries that moved. ``--batch-precisions
float64``: the same client training in double precision, the control that
keeps the local steps' drift without float32's rounding (old check only).

Every **new** line of a single sentence also has ``found_replay`` and
``truth_replay``: the share of the message's entries that the server's
replay of the client's protocol on the found sentence (its best label) and
on the client's batch does not reproduce
(:func:`gilib.client.replay_mismatch`): 0 certifies a sentence bit for bit.
And it has ``found_distance`` and
``truth_distance``: the weighted distance of the found sentence and of the
client's to the message, under the new check's noise model
(:func:`gilib.attack.completion.model_distance`). A miss whose truth is the
closer is the search's; a miss whose found sentence is the closer is the
noise model's: no search under it would return the truth.

Sentences: chapter 6's protocol sentences (the seeded sample's first two per
dataset) and a held-out set, the seeded sample (seed 101) from position 100
on, four per dataset. SecAgg+ batches: chapter 6's secure batches (the
sample's N sentences from position 2) and one held-out batch per dataset
from position 120. Nothing is asserted; the figures are for one machine.

Usage::

    python bench/noisy_span.py [--held-out 4] [--protocols fedsgd fedavg adamw secagg fedavg-batch]
                               [--local-steps 1 10] [--fedavg-rates 1e-5 1e-4 1e-3]
                               [--adamw-rates 2e-5 5e-5 1e-4] [--adamw-steps 1 2 5] [--clients 2 4 8]
                               [--batch-sizes 2 4 8] [--batch-precisions float32 float64]
                               [--checks old new optimisation]
                               [--time-budget 60] [--shard 0 1] [--out data/bench/noisy_span.csv]

Each attack stops after ``--time-budget`` seconds with its best partial
result (``timed_out`` in the CSV).
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace
from pathlib import Path

import pandas as pd
import torch

from gilib.attack import SpanConfig, optimization_attack, span_attack
from gilib.attack.completion import floored, model_distance, stacked_projections
from gilib.client import AdamW, FedAvg, client_update, replay_mismatch
from gilib.data import write_settings
from gilib.metrics import interval_text, score_batch, share_interval
from gilib.models import cached_model, encode
from gilib.secure import SecAgg, secure_mean
from gilib.selection import select
from gilib.studies.federated import (ATTACK, BATCH_SIZES, DATASETS, FEDAVG as BATCH_FEDAVG, LEARNING_RATES,
                                    LOCAL_STEPS, SENTENCES)
from gilib.studies.sample import sample

ADAMW_RATES = (2e-5, 5e-5, 1e-4)
"""AdamW learning rates: how transformers are fine-tuned (2e-5 to 5e-5) and a larger one."""
HELD_OUT_OFFSET = 100
SECURE_HELD_OUT_OFFSET = 120
CLIENTS = (2, 4, 8)


def protocols(kinds, local_steps=(1, 10), adamw_rates=ADAMW_RATES, adamw_steps=(1,),
              fedavg_rates=LEARNING_RATES) -> list:
    """Every client protocol measured, in table order (``None``: FedSGD, the reference)."""
    chosen = [None] if "fedsgd" in kinds else []
    if "fedavg" in kinds:
        chosen += [FedAvg(e, lr) for lr in fedavg_rates for e in local_steps]
    if "adamw" in kinds:
        chosen += [AdamW(e, lr) for e in adamw_steps for lr in adamw_rates]
        chosen += [AdamW(1, 5e-5, precision="bfloat16")] if 5e-5 in adamw_rates and 1 in adamw_steps else []
    return chosen


def sentences(held_out: int) -> list[tuple[str, str, object]]:
    """``(set name, dataset, example)``: chapter 6's protocol sentences, then the held-out ones."""
    chosen = [("chapter 6", d, b[0]) for d in DATASETS for b in sample(d, SENTENCES)]
    chosen += [("held-out", d, b[0]) for d in DATASETS for b in sample(d, held_out, offset=HELD_OUT_OFFSET)]
    return chosen


def measure(protocol, examples, time_budget: float | None = None, checks=("old", "new")) -> list[dict]:
    """The chosen checks on every sentence's message under ``protocol`` (``None``: FedSGD)."""
    model, tokenizer = cached_model("minilm")
    selection = select(model, "layer", 0)
    stem = "bert.encoder.layer.0.attention.self."
    kept = [selection.names.index(stem + s) for s in ("query.weight", "value.weight")]
    rows = []
    for group, dataset, example in examples:
        true_batch = encode(tokenizer, [example.text], [example.label])
        truth = true_batch["input_ids"][0, : int(true_batch["attention_mask"].sum())].tolist()
        message = client_update(model, selection, true_batch, protocol).shared
        sent = message  # what the client sent (the AdamW line below reads its inversion)
        weights, surviving = None, 1.0
        if isinstance(protocol, AdamW):
            # Several AdamW steps have no elementwise inverse: the server inverts
            # the message as if it were one step (the steps' gradients differ little).
            server = replace(protocol, local_steps=1)
            weights = server.entry_weights(message, model, selection)
            surviving = statistics.fmean(float((weights[i] > 0).double().mean()) for i in kept)
            message = server.gradient(message, model, selection)
        elif protocol is not None:
            weights = protocol.entry_weights(message, model, selection)
            surviving = statistics.fmean(float((message.shared_grads[i] != 0).double().mean()) for i in kept)
        # How far the server's reading of the message is from the client's gradient
        # (the truth: only this measurement reads it).
        cosine = _cosine(client_update(model, selection, true_batch).shared.shared_grads, message.shared_grads)
        config = SpanConfig(time_budget=time_budget)
        for check in checks:
            if check == "new" and protocol is None:
                continue  # FedSGD has no noise model: the old check is the check
            start = time.perf_counter()
            extra = {}
            if check == "optimisation":
                # LAMP's attack at chapter 6's settings; it reads the labels the client sent.
                result = optimization_attack(model, tokenizer, message, selection, ATTACK)
                (score,) = score_batch(result.texts, [example.text])
                extra = {"rouge1": score["rouge1"], "rouge2": score["rouge2"]}
            else:
                # The span check needs no labels; the truth reaches only the comparison below.
                result = span_attack(model, tokenizer, message._replace(labels=None), selection, config,
                                     **({"weights": weights} if check == "new" else {}))
                extra = {"timed_out": result.diagnostics.timed_out}
                if check == "new":
                    extra.update(_distances(model, selection, message, weights, result.token_ids[0], truth))
                    extra.update(_replays(model, selection, sent, protocol, result.token_ids[0], true_batch))
            rows.append({"protocol": _name(protocol), "set": group, "dataset": dataset, "row_id": example.row_id,
                         "check": check,
                         "exact": result.token_ids[0] == truth, "tokens": len(truth),
                         "seconds": time.perf_counter() - start, "surviving": surviving,
                         "cosine_to_gradient": cosine, "time_budget": time_budget, **extra})
    return rows


def _distances(model, selection, message, weights, found: list[int], truth: list[int]) -> dict:
    """Which sentence the message prefers under the new check's noise model: the found one's and the truth's
    weighted distance to the message (:func:`gilib.attack.completion.model_distance` with the search's weights).

    Where the check misses and the truth's distance is the smaller, the message
    tells them apart and the search stopped short of the truth; where it is
    not, this noise model's reading of the message cannot tell them apart.
    """
    names, matrix = stacked_projections(model, selection.names, message.shared_grads)
    _, stacked = stacked_projections(model, selection.names, weights)
    floor = floored(stacked, matrix, len(truth))
    return {name: model_distance(model, names, matrix, ids, clipped=False, weights=floor)
            for name, ids in (("found_distance", found), ("truth_distance", truth))}


def _replays(model, selection, sent, protocol, found: list[int], true_batch) -> dict:
    """The share of the client's message that the server's replay of the protocol does not reproduce
    (:func:`gilib.client.replay_mismatch`), for the found sentence (the smallest over the labels, which the
    server does not know) and for the client's batch (its own label: 0 unless the replay's arithmetic differs).

    0 for the found sentence certifies it without the client's data; a miss the server can see is one whose
    replay does not reproduce the message.
    """
    ids = torch.tensor([found])
    guesses = [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.tensor([label])}
               for label in range(model.config.num_labels)]
    return {"found_replay": min(replay_mismatch(model, selection, g, protocol, sent) for g in guesses),
            "truth_replay": replay_mismatch(model, selection, true_batch, protocol, sent)}


def _cosine(gradient, message) -> float:
    flat = [torch.cat([t.double().reshape(-1) for t in tensors]) for tensors in (gradient, message)]
    return float(torch.nn.functional.cosine_similarity(*flat, dim=0))


def secure_batches(clients: int) -> list[tuple[str, str, list]]:
    """``(set name, dataset, examples)``: chapter 6's secure batch of ``clients`` sentences, then a held-out one."""
    chosen = [("chapter 6", d, sample(d, 1, clients, offset=SENTENCES)[0]) for d in DATASETS]
    chosen += [("held-out", d, sample(d, 1, clients, offset=SECURE_HELD_OUT_OFFSET)[0]) for d in DATASETS]
    return chosen


def measure_secure(clients: int, time_budget: float | None = None, checks=("old", "new"),
                   shard: tuple[int, int] = (0, 1)) -> list[dict]:
    """Both checks on the SecAgg+ mean of ``clients`` one-sentence FedSGD clients, per batch (``shard``: every
    N-th batch from the I-th)."""
    model, tokenizer = cached_model("minilm")
    selection = select(model, "layer", 0)
    rows = []
    index, count = shard
    for group, dataset, examples in list(secure_batches(clients))[index::count]:
        message, noise, truths, updates = secure_message(model, tokenizer, selection, examples)
        exact_mean = [sum(u.shared_grads[k].double() for u in updates) / clients for k in range(len(updates[0][0]))]
        rounding = float(torch.cat([(m.double() - e).flatten() for m, e in zip(message.shared_grads, exact_mean)])
                         .norm() / torch.cat([e.flatten() for e in exact_mean]).norm())
        line = {"protocol": f"SecAgg+ {clients} clients", "set": group, "dataset": dataset, "surviving": rounding}
        rows += _batch_rows(message, examples, truths, noise, line, time_budget, checks)
    return rows


def secure_message(model, tokenizer, selection, examples) -> tuple[object, float, list[list[int]], list]:
    """What the server unmasks when each example is a one-sentence FedSGD client behind SecAgg+.

    Returns:
        ``(message, noise, truths, updates)``: the quantised mean of the clients' updates (the masks'
        seed is the number of clients), the protocol's noise model for it, each sentence's token ids (for
        the metrics only) and the clients' own updates (for the rounding the mean adds).
    """
    batches = [encode(tokenizer, [e.text], [e.label]) for e in examples]
    truths = [b["input_ids"][0, : int(b["attention_mask"].sum())].tolist() for b in batches]
    updates = [client_update(model, selection, b).shared for b in batches]
    secagg = SecAgg()
    message = secure_mean(updates, secagg, seed=len(examples))
    return message, secagg.noise_std([1] * len(examples)), truths, updates


def fedavg_batches(size: int) -> list[tuple[str, str, list]]:
    """``(set name, dataset, examples)``: chapter 6's batch study's batches of ``size`` sentences."""
    return [("chapter 6", d, sample(d, 1, size, offset=SENTENCES)[0]) for d in DATASETS]


def measure_fedavg_batch(size: int, time_budget: float | None = None, checks=("old", "new"),
                         precision: str = "float32", shard: tuple[int, int] = (0, 1)) -> list[dict]:
    """Both checks on one FedAvg client's batch of ``size`` sentences (chapter 6's batch study; ``shard``:
    every N-th batch from the I-th).

    ``precision="float64"``: the control, local training in double precision
    (the drift of the local steps without float32's rounding), old check only.
    """
    protocol = replace(BATCH_FEDAVG, precision=precision)
    if precision != "float32":
        checks = [c for c in checks if c == "old"]
    model, tokenizer = cached_model("minilm")
    selection = select(model, "layer", 0)
    query = "bert.encoder.layer.0.attention.self.query.weight"
    kept = [selection.names.index(query.replace("query", s)) for s in ("query", "value")]
    rows = []
    index, count = shard
    for group, dataset, examples in list(fedavg_batches(size))[index::count]:
        true_batch = encode(tokenizer, [e.text for e in examples], [e.label for e in examples])
        truths = [ids[: int(mask.sum())].tolist() for ids, mask in
                  zip(true_batch["input_ids"], true_batch["attention_mask"])]
        message = client_update(model, selection, true_batch, protocol).shared
        surviving = statistics.fmean(float((message.shared_grads[i] != 0).double().mean()) for i in kept)
        line = {"protocol": _batch_name(protocol, size), "set": group, "dataset": dataset, "surviving": surviving}
        noise = protocol.noise_std(message, model, selection, query) if "new" in checks else None
        rows += _batch_rows(message, examples, truths, noise, line, time_budget, checks)
    return rows


def _batch_name(protocol: FedAvg, size: int) -> str:
    """``FedAvg E=5 lr=1e-03 batch 4``, ``... float64 batch 4`` for the control."""
    precision = "" if protocol.precision == "float32" else f" {protocol.precision}"
    return f"{_name(protocol)}{precision} batch {size}"


def _batch_rows(message, examples, truths, noise: float | None, line: dict, time_budget, checks) -> list[dict]:
    """The old check and the new one (``noise=``) on one batch's message; a line per sentence, the batch's seconds."""
    model, tokenizer = cached_model("minilm")
    selection = select(model, "layer", 0)
    config = SpanConfig(time_budget=time_budget)
    # The span check needs no labels: peeling finds them; the truth reaches only the comparison below.
    message = message._replace(labels=None)
    rows = []
    for check, extra in (("old", {}), ("new", {"noise": noise})):
        if check not in checks:
            continue
        start = time.perf_counter()
        result = span_attack(model, tokenizer, message, selection, config, **extra)
        seconds = time.perf_counter() - start
        found = list(result.token_ids)
        for example, truth in zip(examples, truths):
            hit = truth in found
            if hit:
                found.remove(truth)
            rows.append({**line, "row_id": example.row_id, "check": check, "exact": hit, "tokens": len(truth),
                         "seconds": seconds, "timed_out": result.diagnostics.timed_out})
    return rows


def _name(protocol) -> str:
    if protocol is None:
        return "FedSGD"
    if isinstance(protocol, FedAvg):
        return f"FedAvg E={protocol.local_steps} lr={protocol.lr:.0e}"
    return f"AdamW E={protocol.local_steps} lr={protocol.lr:.0e} {protocol.precision}"


def table(rows: list[dict]) -> pd.DataFrame:
    """Exact share [Wilson 95 %] and seconds per protocol and check, with the surviving share."""
    frame = pd.DataFrame(rows)
    out = []
    for (name, check), part in frame.groupby(["protocol", "check"], sort=False):
        share, low, high = share_interval(int(part["exact"].sum()), len(part))
        out.append({"protocol": name, "check": check, "exact": interval_text(share, low, high, 0, percent=True),
                    "sentences": len(part), "s / message": round(part["seconds"].mean(), 1),
                    "s max": round(part["seconds"].max(), 1), "surviving": round(part["surviving"].mean(), 2),
                    "ROUGE-1": round(part["rouge1"].mean(), 2) if "rouge1" in part else None})
    return pd.DataFrame(out)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--held-out", type=int, default=4, help="held-out sentences per dataset")
    parser.add_argument("--protocols", nargs="+", default=["fedavg"],
                        choices=["fedsgd", "fedavg", "adamw", "secagg", "fedavg-batch"])
    parser.add_argument("--clients", nargs="+", type=int, default=list(CLIENTS),
                        help="SecAgg+ clients per round (one sentence each)")
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=list(BATCH_SIZES),
                        help="FedAvg batch sizes (fedavg-batch: chapter 6's batch study, one batch per dataset)")
    parser.add_argument("--batch-precisions", nargs="+", default=["float32"], choices=["float32", "float64"],
                        help="fedavg-batch: the client's arithmetic (float64: the control, old check only)")
    parser.add_argument("--adamw-rates", nargs="+", type=float, default=list(ADAMW_RATES),
                        help="AdamW learning rates (float32); bfloat16 runs at 5e-5 when 5e-5 is among them")
    parser.add_argument("--adamw-steps", nargs="+", type=int, default=[1],
                        help="AdamW's E values (several steps are inverted as if one)")
    parser.add_argument("--fedavg-rates", nargs="+", type=float, default=list(LEARNING_RATES),
                        help="FedAvg's learning rates (float32)")
    parser.add_argument("--local-steps", nargs="+", type=int, default=[1, 10],
                        help=f"FedAvg's E values (the study's: {list(LOCAL_STEPS)})")
    parser.add_argument("--time-budget", type=float, default=60.0, help="seconds per attack (SpanConfig)")
    parser.add_argument("--shard", nargs=2, type=int, default=[0, 1], metavar=("I", "N"),
                        help="every N-th sentence from the I-th, and of the SecAgg+ and FedAvg batches every "
                             "N-th batch (to split a run across processes)")
    parser.add_argument("--checks", nargs="+", default=["old", "new"], choices=["old", "new", "optimisation"],
                        help="which attacks to run: the span check old and new, LAMP's optimisation attack "
                             "(not on SecAgg+ means)")
    parser.add_argument("--out", type=Path, default=None, help="also write every sentence's line here (CSV)")
    args = parser.parse_args(argv)
    index, count = args.shard
    if not 0 <= index < count:
        parser.error(f"--shard I N needs 0 <= I < N, got {index} {count}")
    torch.set_num_threads(1)
    examples = sentences(args.held_out)[index::count]
    rows = []
    for protocol in protocols(args.protocols, args.local_steps, args.adamw_rates, args.adamw_steps,
                              args.fedavg_rates):
        rows += measure(protocol, examples, args.time_budget, args.checks)
        print(table([r for r in rows if r["protocol"] == _name(protocol)]).to_string(index=False, header=False),
              flush=True)
    for clients in args.clients if "secagg" in args.protocols else ():
        rows += measure_secure(clients, args.time_budget, [c for c in args.checks if c != "optimisation"],
                               args.shard)
        print(table([r for r in rows if r["protocol"] == f"SecAgg+ {clients} clients"])
              .to_string(index=False, header=False), flush=True)
    for precision in args.batch_precisions if "fedavg-batch" in args.protocols else ():
        for size in args.batch_sizes:
            rows += measure_fedavg_batch(size, args.time_budget, [c for c in args.checks if c != "optimisation"],
                                         precision, args.shard)
            name = _batch_name(replace(BATCH_FEDAVG, precision=precision), size)
            print(table([r for r in rows if r["protocol"] == name]).to_string(index=False, header=False), flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        pd.DataFrame(rows).to_csv(args.out, index=False)
        write_settings(args.out, "bench/noisy_span.py", argv,
                       held_out=args.held_out, held_out_offset=HELD_OUT_OFFSET, protocols=args.protocols,
                       local_steps=args.local_steps, fedavg_rates=args.fedavg_rates, adamw_rates=args.adamw_rates,
                       adamw_steps=args.adamw_steps, clients=args.clients,
                       batch_sizes=args.batch_sizes, batch_precisions=args.batch_precisions,
                       secure_held_out_offset=SECURE_HELD_OUT_OFFSET,
                       time_budget=args.time_budget, shard=args.shard)
    print(table(rows).to_string(index=False))


if __name__ == "__main__":
    main()
