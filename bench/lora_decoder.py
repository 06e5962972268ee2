"""The rank rule of LoRA messages on a GPT-2-style decoder: the span check from layer 0's c_attn adapter.

What it measures
----------------
A decoder of GPT-2 small's shape (``gpt2-shape``: 12 x 768, random seeded
weights over bert-base-uncased's vocabulary) with LoRA adapters
(:func:`gilib.lora.lora_victim`, Hu et al., ICLR 2022: rank ``r``,
``alpha = 2 r``, block 0 only, three next-token AdamW warm-up rounds so that
``B`` is off zero) on layer 0's fused ``c_attn`` alone, or on ``c_attn``
and ``mlp.c_fc``. Each sentence is one client's FedSGD message of its
adapters (:func:`gilib.client.client_update`, next-token loss), and the
server runs :func:`gilib.attack.span_attack` on ``select(victim, "lora.A",
0)``: candidates from the ``c_attn`` adapter's ``A`` rows (DAGER's step 1,
Petrov et al., NeurIPS 2024), then, where the ``mlp.c_fc`` adapter's ``A``
rows reach the sentence's inputs, the causal prefix search checked by them
(:mod:`gilib.attack.decoder`); otherwise each position's best token. One
line per sentence and setting:

* ``tokens``: the token count, start and end tokens included; ``inputs``:
  the distinct inputs the gradient sees, ``tokens - 1`` (the end token's
  output gradient is zero); ``capacity``: ``r``, the most one ``A``
  gradient's rows span; ``fits``: ``capacity >= inputs``, the rank rule;
* ``rank``: the ``c_attn`` ``A`` gradient's numerical rank; ``verified``:
  whether the ``mlp.c_fc`` adapter checked prefixes (it does only when it
  fits too) and ``found`` whether that search found the sentence whole;
* ``exact``: the sentence rebuilt token for token; ``token_accuracy``:
  the share of its words right; ``rouge1`` / ``rouge2``: ROUGE F-measures
  of the decoded text; ``residual``: the largest residual among the chosen
  tokens (float32 round-off when the rows span every input, far more
  when they fall short: then nothing is certified); ``seconds``: the attack's.

Sentences: the seeded sample (:func:`gilib.studies.sample.sample`) of the
three datasets in ``/work/shared/data`` (the book's grid splits) from
position ``--offset`` on, ``--per-dataset`` each: with the default offset,
the sentences of ``bench/decoder_span.py``'s first batches of 1. Nothing is
asserted; the seconds are for one machine, one thread.

What the random weights leave out: with ``ln_1``'s initial gain and bias a
token's layer-0 input is linear in ``wte[t] + wpe[p]`` (in a batch the
candidates are its bag of words, :mod:`gilib.attack.decoder`), and random
embeddings are nearly orthogonal, so below the rank rule how often the best
token is still the true one (uncertified) depends on these weights; trained
embeddings (smooth positions, a LayerNorm bias) bring more tokens close.
The exactness of a fitting sentence does not depend on the weights.

Usage::

    python bench/lora_decoder.py [--ranks 4 8 16 64] [--adapters c_attn c_attn+mlp] [--per-dataset 3]
                                 [--offset 300] [--warmup 3] [--out data/bench/lora_decoder.csv]
"""

from __future__ import annotations

import time

import pandas as pd
import torch

from gilib.attack import span_attack
from gilib.client import client_update
from gilib.data import write_settings
from gilib.lora import lora_victim
from gilib.metrics import rouge_scores
from gilib.models import cached_model, encode_lm
from gilib.selection import select
from gilib.studies.sample import sample
from gilib.studies.span import DATASETS
from lora_rank import options  # bench/: the script's own folder

MODEL = "gpt2-shape"
RANKS = (4, 8, 16, 64)
ADAPTERS = {"c_attn": ("c_attn",), "c_attn+mlp": ("c_attn", "mlp.c_fc")}
OFFSET = 300
"""The sentences of ``bench/decoder_span.py``'s batches of 1 (its default offset)."""


def measure(r: int, adapters: str, examples, warmup: int) -> list[dict]:
    """One line per sentence: the span check on the layer-0 ``A`` gradients of one LoRA decoder client."""
    model, tokenizer = cached_model(MODEL)
    victim = lora_victim(model, ADAPTERS[adapters], r=r, alpha=2 * r, layers=0, warmup=warmup)
    selection = select(victim, "lora.A", 0)
    rows = []
    for dataset, example in examples:
        true_batch = encode_lm(tokenizer, [example.text])
        truth = true_batch["input_ids"][0].tolist()
        message = client_update(victim, selection, true_batch).shared  # labels None: a decoder has none
        start = time.perf_counter()
        result = span_attack(victim, tokenizer, message, selection)
        seconds = time.perf_counter() - start
        # The client's truth reaches only these comparisons.
        found, d = result.token_ids[0], result.diagnostics
        words = max(len(truth) - 2, 1)
        score = rouge_scores(result.texts[0], example.text)
        rows.append({"model": MODEL, "r": r, "adapters": adapters, "dataset": dataset, "row_id": example.row_id,
                     "tokens": len(truth), "inputs": len(truth) - 1, "capacity": r, "fits": r >= len(truth) - 1,
                     "rank": d.rank, "verified": d.verifier is not None, "found": bool(d.found and all(d.found)),
                     "exact": found == truth,
                     "token_accuracy": sum(a == b for a, b in zip(found[1:-1], truth[1:-1])) / words,
                     "rouge1": score["rouge1"], "rouge2": score["rouge2"], "residual": result.final_loss,
                     "seconds": seconds})
        print(r, adapters, dataset, example.row_id, len(truth), rows[-1]["exact"], round(score["rouge1"], 2),
              round(seconds, 2), flush=True)
    return rows


def table(rows: list[dict]) -> pd.DataFrame:
    """Exact rate, ROUGE and seconds by setting and by whether the sentence fits the rank."""
    frame = pd.DataFrame(rows)
    return frame.groupby(["r", "adapters", "fits"], sort=False).agg(
        sentences=("exact", "size"), exact=("exact", "mean"), verified=("verified", "mean"),
        token_accuracy=("token_accuracy", "mean"), rouge1=("rouge1", "mean"), tokens=("tokens", "median"),
        seconds=("seconds", "mean")).reset_index().round(3)


def main(argv=None) -> None:
    parser = options(__doc__.split("\n")[0], RANKS, ADAPTERS, OFFSET)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    started = time.perf_counter()
    examples = [(d, b[0]) for d in DATASETS for b in sample(d, args.per_dataset, offset=args.offset)]
    rows = []
    for r in args.ranks:
        for adapters in args.adapters:
            rows += measure(r, adapters, examples, args.warmup)
    summary = table(rows)
    print(summary.to_string(index=False))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        pd.DataFrame(rows).to_csv(args.out, index=False)
        write_settings(args.out, "bench/lora_decoder.py", argv,
                       model=MODEL, ranks=args.ranks, alpha="2 r", adapters=args.adapters, layers=[0],
                       warmup=args.warmup, warmup_lr=1e-3, per_dataset=args.per_dataset, offset=args.offset,
                       datasets=list(DATASETS), selection="lora.A L0",
                       wall_seconds=round(time.perf_counter() - started, 1))


if __name__ == "__main__":
    main()
