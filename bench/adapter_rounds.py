"""Several rounds' AdamW readings of LoRA adapters: the noise model's search on the first round's block or on every one.

What it measures
----------------
MiniLM with LoRA adapters on layer 0's query and value
(:func:`gilib.lora.lora_victim`, rank ``r``, ``alpha = 2 r``), one global
model per round: ``--warmups`` public AdamW warm-up steps each (the study's
stand-in for the other clients moving ``B``, :mod:`gilib.studies.lora`).
The client sends each round one local AdamW step of one sentence (lr 5e-5,
as :data:`gilib.studies.lora.ADAMW`); the server inverts each step
(:meth:`gilib.client.AdamW.gradient`) and takes the inversion's entry
weights (:meth:`gilib.client.AdamW.entry_weights`), and runs
:func:`gilib.attack.adapter_span_attack` with them twice, on the same
readings:

* **first block**: the bare messages: the rounds' ``A`` blocks are fitted
  together, and the search judges candidate sentences on the first round's
  block only (computed at the first round's model);
* **every block**: the same messages as ``Round(global model, reading)``:
  the search judges candidates on every round's block, each at its own
  round's model, the distances summed.

One line per sentence and mode: ``exact``, ``token_accuracy`` (interior
positions right), ``outside`` (the stacked message's share outside the
found inputs' span), ``seconds`` and ``timed_out`` (the search's
``--time-budget``). The table pairs the modes sentence by sentence: the
difference of token accuracy (every block minus first block) with its 95 %
bootstrap interval. Sentences: the seeded sample
(:func:`gilib.studies.sample.sample`) of each dataset from ``--offset``,
``--per-dataset`` each, kept when the stacked rows (``2 r`` per round) reach
their token count (the fit's condition) and they have at most
``--max-tokens`` tokens. Every block costs the search about twice the
seconds per candidate (two rounds' gradients), so at the study's 30 s
budget (:data:`gilib.studies.lora.NOISE_MODEL_BUDGET`) it is stopped more
often; ``--time-budget 120`` compares the two searches run to their end.
Nothing is asserted; the seconds are for one machine.

Usage::

    python bench/adapter_rounds.py [--ranks 4 8] [--warmups 3 4] [--per-dataset 4] [--offset 140]
                                   [--max-tokens 14] [--time-budget 30] [--out data/bench/adapter_rounds.csv]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pandas as pd
import torch

from gilib.attack import Round, SpanConfig, adapter_span_attack
from gilib.client import AdamW, client_update
from gilib.data import write_settings
from gilib.lora import lora_victim
from gilib.metrics import interval_text, mean_interval
from gilib.models import cached_model, encode
from gilib.selection import select
from gilib.studies.federated import DATASETS
from gilib.studies.sample import sample

ADAMW = AdamW(local_steps=1, lr=5e-5)
MODES = ("first block", "every block")
OFFSET = 140
"""As ``bench/lora_rank.py``: after the other benches' held-out sentences."""


def measure(r: int, warmups: list[int], examples, time_budget: float) -> list[dict]:
    """Both modes on every sentence: two lines per sentence."""
    model, tokenizer = cached_model("minilm")
    victims = [lora_victim(model, ("query", "value"), r=r, alpha=2 * r, layers=0, warmup=w) for w in warmups]
    selection = select(victims[0], "lora", 0)
    config = SpanConfig(time_budget=time_budget)
    rows = []
    for dataset, example in examples:
        true_batch = encode(tokenizer, [example.text], [example.label])
        truth = true_batch["input_ids"][0].tolist()
        readings, weights = [], []
        for victim in victims:
            message = client_update(victim, selection, true_batch, ADAMW).shared
            # The server's attack needs no labels; the truth reaches only the comparison below.
            readings.append(ADAMW.gradient(message, victim, selection)._replace(labels=None))
            weights.append(ADAMW.entry_weights(message, victim, selection))
        invertible = float(torch.cat([w.reshape(-1) for ws in weights for w in ws]).double().mean())
        for mode, updates in zip(MODES, (readings, [Round(v, u) for v, u in zip(victims, readings)])):
            start = time.perf_counter()
            result = adapter_span_attack(victims[0], tokenizer, updates, selection, config, weights=weights)
            seconds = time.perf_counter() - start
            found = result.token_ids[0]
            rows.append({"r": r, "rounds": len(warmups), "warmups": " ".join(map(str, warmups)), "mode": mode,
                         "dataset": dataset, "row_id": example.row_id, "tokens": len(truth),
                         "invertible": invertible, "exact": found == truth,
                         "token_accuracy": sum(a == b for a, b in zip(found[1:-1], truth[1:-1])) / (len(truth) - 2),
                         "outside": result.diagnostics.outside, "seconds": seconds,
                         "timed_out": bool(result.diagnostics.timed_out)})
    return rows


def table(rows: list[dict]) -> pd.DataFrame:
    """Per setting and mode: exact, token accuracy and seconds; the paired token-accuracy difference."""
    frame = pd.DataFrame(rows)
    out = []
    for (r, warmups), part in frame.groupby(["r", "warmups"], sort=False):
        first, every = (part[part["mode"] == m].set_index(["dataset", "row_id"]) for m in MODES)
        difference = mean_interval((every["token_accuracy"] - first.loc[every.index, "token_accuracy"]).tolist())
        for mode, lines in zip(MODES, (first, every)):
            out.append({"r": r, "warmups": warmups, "mode": mode, "sentences": len(lines),
                        "exact": f"{int(lines['exact'].sum())}/{len(lines)}",
                        "token accuracy": round(float(lines["token_accuracy"].mean()), 3),
                        "minus first block [95 %]": interval_text(*difference, signed=True) if mode == MODES[1]
                        else "", "s (mean)": round(float(lines["seconds"].mean()), 1),
                        "timed out": int(lines["timed_out"].sum())})
    return pd.DataFrame(out)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ranks", nargs="+", type=int, default=[4, 8])
    parser.add_argument("--warmups", nargs="+", type=int, default=[3, 4],
                        help="warm-up steps of each round's global model, first round first")
    parser.add_argument("--per-dataset", type=int, default=4, help="sentences drawn per dataset")
    parser.add_argument("--offset", type=int, default=OFFSET, help="position in the seeded sample to start at")
    parser.add_argument("--max-tokens", type=int, default=14, help="longest sentence kept (both special tokens)")
    parser.add_argument("--time-budget", type=float, default=30.0, help="seconds each search may take")
    parser.add_argument("--out", type=Path, default=None, help="also write every sentence's line here (CSV)")
    args = parser.parse_args(argv)
    if len(args.warmups) < 2:
        parser.error("--warmups needs two rounds or more: one round is the same attack in both modes.")
    torch.set_num_threads(1)
    _, tokenizer = cached_model("minilm")
    drawn = [(d, b[0]) for d in DATASETS for b in sample(d, args.per_dataset, offset=args.offset)]
    rows = []
    for r in args.ranks:
        capacity = 2 * r * len(args.warmups)
        examples = [(d, e) for d, e in drawn
                    if len(tokenizer(e.text)["input_ids"]) <= min(capacity, args.max_tokens)]
        if not examples:
            print(f"r = {r}: no drawn sentence has at most {min(capacity, args.max_tokens)} tokens.", flush=True)
            continue
        new = measure(r, args.warmups, examples, args.time_budget)
        rows += new
        print(table(new).to_string(index=False), flush=True)
    if args.out and rows:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        pd.DataFrame(rows).to_csv(args.out, index=False)
        write_settings(args.out, "bench/adapter_rounds.py", argv, model="minilm", ranks=args.ranks, alpha="2 r",
                       adapters=["query", "value"], layers=[0], warmups=args.warmups, adamw_lr=ADAMW.lr,
                       adamw_steps=ADAMW.local_steps, per_dataset=args.per_dataset, offset=args.offset,
                       max_tokens=args.max_tokens, time_budget=args.time_budget, datasets=list(DATASETS))


if __name__ == "__main__":
    main()
