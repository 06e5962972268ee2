"""The exact span check on a GPT-2-style decoder: exact share and seconds per batch, batch sizes 1 to 8.

What it measures
----------------
A decoder client (GPT-2 small's shape, ``gpt2-shape``: 12 x 768, random
seeded weights over bert-base-uncased's vocabulary) fine-tunes on the
next-token loss and shares all of layer 0 (``select(model, "layer", 0)``,
the paper's single-layer setting); the server runs
:func:`gilib.attack.span_attack`, which hands a decoder to
:func:`gilib.attack.decoder.decoder_span_attack`: candidates from layer 0's
fused ``c_attn`` gradient, then the causal left-to-right search checked by
layer 0's ``mlp.c_fc`` gradient. For each batch: whether it came back token
for token (as a multiset of sentences: a batch's order is its own), the
share of its sentences that did, the seconds of the attack (and of its
layer-0 check), whether the time budget ran out, and the layer-0 rank.

Sentences: the seeded sample (``gilib.studies.sample.sample``, as
``bench/noisy_span.py``) of the three datasets in ``/work/shared/data``
(CoLA, SST-2, Rotten Tomatoes; the book's grid splits), from position
``--offset`` on, held out from the book's earlier draws; batch ``k`` of
size B is that sample's sentences ``k B`` to ``(k + 1) B - 1``. Nothing is
asserted; the seconds are for one machine, one thread.

What the random weights leave out: the search's exactness holds for any
weights (the causal mask), but a trained GPT-2's LayerNorm biases and
smooth position embeddings change how many impostors the layer-0
candidates hold (here, with ``ln_1``'s bias 0, every batch's bag of words,
:func:`gilib.attack.decoder.decoder_span_attack`), so the seconds, not the
exactness, may differ on ``gpt2``.

Usage::

    python bench/decoder_span.py [--sizes 1 2 4 8] [--batches 10] [--offset 300] [--time-budget 60]
                                 [--out data/bench/decoder_span.csv]
"""

from __future__ import annotations

import argparse
import time
from collections import Counter
from pathlib import Path
from typing import Iterator, NamedTuple

import pandas as pd
import torch

from gilib.attack import AttackResult, SpanConfig, span_attack
from gilib.client import client_update
from gilib.data import write_settings
from gilib.metrics import interval_text, share_interval, true_token_ids
from gilib.models import cached_model, encode_lm
from gilib.selection import select
from gilib.studies.sample import sample
from gilib.studies.span import DATASETS
from gilib.update import SharedUpdate

MODEL = "gpt2-shape"
SIZES = (1, 2, 4, 8)


class Attacked(NamedTuple):
    """One batch of a decoder bench, attacked (:func:`attacked`)."""

    size: int
    dataset: str
    index: int
    examples: list
    true_batch: dict  # the client's truth: input_ids and attention_mask, each (B, T)
    message: SharedUpdate  # what the server sees: layer 0's gradients, no labels
    result: AttackResult
    seconds: float  # the attack's

    def line(self) -> dict:
        """The fields every line of this batch starts with."""
        return {"model": MODEL, "dataset": self.dataset, "batch_size": self.size, "batch": self.index,
                "row_ids": " ".join(str(e.row_id) for e in self.examples)}


def attacked(sizes, count: int, offset: int, attack) -> Iterator[Attacked]:
    """Every batch of the bench, sent by the decoder client and attacked, in order.

    Batch ``index`` of size B from a dataset is the seeded sample's sentences
    ``offset + index B`` to ``offset + (index + 1) B - 1``, encoded for a
    decoder (:func:`gilib.models.encode_lm`); the client takes one
    next-token step and shares all of layer 0.

    Args:
        sizes: batch sizes.
        count: batches per dataset and size.
        offset: sentences of the seeded sample to skip first.
        attack: ``attack(model, tokenizer, message, selection)``, timed, returns an
            :class:`~gilib.attack.AttackResult`.
    """
    model, tokenizer = cached_model(MODEL)
    selection = select(model, "layer", 0)
    for size in sizes:
        for dataset in DATASETS:
            for index, examples in enumerate(sample(dataset, count, size, offset=offset)):
                true_batch = encode_lm(tokenizer, [e.text for e in examples])
                message = client_update(model, selection, true_batch).shared  # labels None: a decoder has none
                start = time.perf_counter()
                result = attack(model, tokenizer, message, selection)
                yield Attacked(size, dataset, index, examples, true_batch, message, result,
                               time.perf_counter() - start)


def exact_sentences(token_ids, true_batch) -> list[bool]:
    """Per true sentence, whether the attack gave it back token for token (a multiset match: any order).

    Args:
        token_ids: the attack's ``B`` sentences (``AttackResult.token_ids``).
        true_batch: the client's batch (``input_ids``, ``attention_mask``: ``(B, T)``).

    Returns:
        ``B`` booleans in the batch's order; a sentence the batch holds twice
        needs two reconstructions.
    """
    found = Counter(map(tuple, token_ids))
    hits = []
    for sentence in map(tuple, true_token_ids(true_batch)):
        hits.append(found[sentence] > 0)
        found[sentence] -= 1
    return hits


def measure(sizes, count: int, offset: int, time_budget: float | None) -> list[dict]:
    """One line per batch: exact or not, its sentences' exact share, seconds."""
    config = SpanConfig(time_budget=time_budget)
    rows = []
    for batch in attacked(sizes, count, offset, lambda *message: span_attack(*message, config)):
        result, size, tokens = batch.result, batch.size, sum(batch.message.lengths)
        hits = exact_sentences(result.token_ids, batch.true_batch)  # the client's truth reaches only this
        rows.append({**batch.line(), "tokens": tokens, "exact": all(hits), "sentences_exact": sum(hits) / size,
                     "seconds": batch.seconds, "check_seconds": result.timings["check"],
                     "timed_out": result.diagnostics.timed_out, "rank": result.diagnostics.rank,
                     "verifier": result.diagnostics.verifier})
        print(size, batch.dataset, batch.index, tokens, rows[-1]["exact"], round(batch.seconds, 2), flush=True)
    return rows


def summary(frame: pd.DataFrame) -> pd.DataFrame:
    """Per batch size: batches, exact share with its Wilson interval, sentences exact, seconds per batch."""
    lines = []
    for size, group in frame.groupby("batch_size"):
        lines.append({"batch size": size, "batches": len(group), "tokens (mean)": round(group["tokens"].mean(), 1),
                      "exact batches": interval_text(*share_interval(int(group["exact"].sum()), len(group)),
                                                     percent=True, digits=0),
                      "sentences exact": f"{100 * group['sentences_exact'].mean():.1f} %",
                      "s/batch (mean)": round(group["seconds"].mean(), 2),
                      "s/batch (max)": round(group["seconds"].max(), 2),
                      "timed out": int(group["timed_out"].sum())})
    return pd.DataFrame(lines)


def options(description: str, batches: int) -> argparse.ArgumentParser:
    """The options both decoder benches take: ``--sizes``, ``--batches`` (default: ``batches``), ``--offset``,
    ``--out``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--sizes", nargs="+", type=int, default=list(SIZES), help="batch sizes")
    parser.add_argument("--batches", type=int, default=batches, help="batches per dataset and batch size")
    parser.add_argument("--offset", type=int, default=300, help="sentences of the seeded sample to skip first")
    parser.add_argument("--out", type=Path, default=None, help="also write every line here (CSV)")
    return parser


def save(frame: pd.DataFrame, table: pd.DataFrame, args, argv, script: str, started: float, **settings) -> None:
    """Print a decoder bench's table; with ``args.out``, write its lines there and its settings beside them."""
    print(table.to_string(index=False))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        frame.to_csv(args.out, index=False)
        write_settings(args.out, script, argv,
                       model=MODEL, selection="layer 0 (all of transformer.h.0)", sizes=args.sizes,
                       batches=args.batches, datasets=list(DATASETS), offset=args.offset, **settings,
                       wall_seconds=round(time.perf_counter() - started, 1),
                       summary=table.to_dict(orient="records"))


def main(argv=None) -> None:
    parser = options(__doc__.split("\n")[0], batches=10)
    parser.add_argument("--time-budget", type=float, default=60.0, help="seconds per attack")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    started = time.perf_counter()
    frame = pd.DataFrame(measure(args.sizes, args.batches, args.offset, args.time_budget))
    save(frame, summary(frame), args, argv, "bench/decoder_span.py", started, time_budget=args.time_budget)


if __name__ == "__main__":
    main()
