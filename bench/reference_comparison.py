"""Fast path against plain path: seconds per sentence and ROUGE, on the reference's setting.

The paper's reference code (LAMP's attack as Li et al., EMNLP 2024, ran it)
was measured on this project's CPU machine on MiniLM with one thread: 500
steps, best of 500 random starts, reordering rounds of 200 candidates every
75 steps, no language-model prior, on the first five CoLA training rows of
LAMP's seed-101 shuffle (rows 2310, 5604, 5827, 6564, 943). This script
runs the same setting through gilib twice:

* **plain**: the reference's algorithm written in our code: sequential
  random starts, sequential reordering candidates, one sentence at a time
  (the library's :class:`~gilib.attack.optimization.PlainEngine`), plus
  the reference's nearest-token lookup at every step, whose result it
  discards: :class:`ReferenceEngine` adds that cost here, so that the
  library does no discarded work;
* **fast**: starts and reordering candidates scored in batched ``vmap``
  calls, lookups only where needed, the five sentences optimised together.

Both paths use the same seeds and return the same tokens (the table counts
the sentences where they agree). ROUGE is scored on text without
``[CLS]``/``[SEP]``. Seconds are per sentence, wall clock. These are
figures, never assertions.

Usage::

    python bench/reference_comparison.py                 # the reference's setting (about 30 min on 2 cores)
    python bench/reference_comparison.py --jobs 2        # cases in two processes, one thread each
    python bench/reference_comparison.py --paper         # the paper's full setting: long-running, not in make test
    python bench/reference_comparison.py --quick         # a few steps on the bundled sample (the test)
    python bench/reference_comparison.py --prior ngram   # with the offline n-gram prior
    python bench/reference_comparison.py --device cuda   # on a GPU
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import time
from pathlib import Path

import pandas as pd
import torch
from joblib import Parallel, delayed

from gilib.attack import AttackConfig, AttackResult, GPT2Prior, NgramPrior, attack_clients
from gilib.attack.engines import PlainEngine
from gilib.client import client_update
from gilib.data import default_data_dir, load_split, prior_texts, sample_batches
from gilib.metrics import aggregate, rouge_scores
from gilib.models import encode, load_model
from gilib.selection import Selection, select
from gilib.update import SharedUpdate

SELECTIONS = {
    "query0": ("attention.query", 0),
    "layer0": ("layer", 0),
    "full": ("full", None),
}
# The reference code on this machine (issue 3 of this project): seconds per
# sentence and ROUGE-1/2 (%), same rows and settings, one thread.
REFERENCE = {
    "query0": (116.0, 58.8, 24.4),
    "layer0": (132.0, 60.6, 20.9),
    "full": (195.0, 81.1, 29.0),
}


class ReferenceEngine(PlainEngine):
    """The plain path with the reference's per-step cost: a nearest-token lookup it never uses.

    The reference projects every position to its nearest token at every
    step (for logging) and discards the result; the tokens are the plain
    path's, only the time differs.
    """

    def step_gradients(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        for client in x:
            self.space.nearest(client)  # discarded, as in the reference
        return super().step_gradients(x)


def reference_attack(model, tokenizer, update: SharedUpdate, selection: Selection, config: AttackConfig,
                     prior=None) -> AttackResult:
    """:func:`gilib.attack.optimization_attack` on the plain path, with the :class:`ReferenceEngine`."""
    return attack_clients(model, tokenizer, [update], selection, config, prior=prior, engine=ReferenceEngine)[0]


def settings(args: argparse.Namespace) -> dict:
    """The attack settings of the chosen mode."""
    if args.quick:
        return dict(steps=6, init_candidates=4, swap_every=3, swap_candidates=4)
    if args.paper:
        return dict(steps=2000, init_candidates=500, swap_every=75, swap_candidates=200)
    return dict(steps=500, init_candidates=500, swap_every=75, swap_candidates=200)


def attacked_split(args: argparse.Namespace) -> tuple[str, str]:
    """LAMP's CoLA training split, or the bundled sample in quick mode or without the files."""
    if args.quick or default_data_dir() is None:
        if not args.quick:
            print("no dataset directory (set GILIB_DATA_DIR): using the bundled sample", file=sys.stderr)
        return ("sample", "train")
    return ("cola", "train")


def sentences(args: argparse.Namespace):
    """The attacked sentences: the first rows of LAMP's seeded shuffle."""
    examples = load_split(*attacked_split(args))
    return [b[0] for b in sample_batches(examples, args.sentences, 1, seed=args.seed)]


def make_prior(name: str, tokenizer, args: argparse.Namespace):
    """The language-model prior of the reordering rounds, never built from the attacked split."""
    if name == "none":
        return None
    if name == "gpt2":
        return GPT2Prior(tokenizer, device=args.device)
    texts, _ = prior_texts(attacked_split(args))
    return NgramPrior.from_texts(tokenizer, texts)


def run_case(selection_key: str, path: str, args: argparse.Namespace) -> dict:
    """Attack every sentence on one selection with one path; one result row.

    ``path`` is ``fast`` or ``plain``, optionally with ``+PRIOR``.
    """
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model, seed=0, device=args.device)
    component, layers = SELECTIONS[selection_key]
    selection = select(model, component, layers)
    examples = sentences(args)
    updates = []
    for ex in examples:  # the clients: the truth stays on this side
        updates.append(client_update(model, selection, encode(tokenizer, ex.text, ex.label, device=args.device)).shared)
    base = dict(objective="cos", seed=args.seed, progress=False, polish_rounds=args.polish, **settings(args))
    kind, _, prior_name = path.partition("+")
    prior = make_prior(prior_name or "none", tokenizer, args)
    start = time.perf_counter()
    if kind == "fast":
        results = attack_clients(model, tokenizer, updates, selection, AttackConfig(batched=True, **base), prior=prior)
    else:
        results = [
            reference_attack(model, tokenizer, u, selection,
                             AttackConfig(batched=False, **{**base, "seed": args.seed + i}), prior=prior)
            for i, u in enumerate(updates)
        ]
    seconds = (time.perf_counter() - start) / len(examples)
    scores = aggregate([rouge_scores(r.texts[0], ex.text) for r, ex in zip(results, examples)])
    timings = {k: sum(r.timings[k] for r in results) / len(results) for k in results[0].timings}
    return {
        "selection": selection_key,
        "path": path,
        "sentences": len(examples),
        "rows": " ".join(str(ex.row_id) for ex in examples),
        "s_per_sentence": seconds,
        **{f"s_{k}": v for k, v in timings.items()},
        "rouge1": 100 * scores["rouge1"],
        "rouge2": 100 * scores["rouge2"],
        "token_ids": [r.token_ids for r in results],
    }


def table(rows: list[dict], args: argparse.Namespace) -> pd.DataFrame:
    """One line per selection and path, with the speed-up over the plain path."""
    df = pd.DataFrame(rows)
    out = []
    for key in df["selection"].unique():
        part = df[df["selection"] == key].set_index("path")
        for path, row in part.iterrows():
            line = {
                "selection": key,
                "path": path,
                "s/sentence": round(row["s_per_sentence"], 1),
                "init / optimisation / reordering / polish": " / ".join(
                    f"{row[c]:.1f}" for c in ("s_init", "s_optimization", "s_reordering", "s_polish")
                ),
                "ROUGE-1": round(row["rouge1"], 1),
                "ROUGE-2": round(row["rouge2"], 1),
            }
            plain = path.replace("fast", "plain")
            if path.startswith("fast") and plain in part.index:
                line["x plain"] = round(part.loc[plain, "s_per_sentence"] / row["s_per_sentence"], 2)
                same = sum(a == b for a, b in zip(row["token_ids"], part.loc[plain, "token_ids"]))
                line["same tokens"] = f"{same}/{row['sentences']}"
            if not (args.quick or args.paper) and args.model == "minilm" and key in REFERENCE:
                line["x reference"] = round(REFERENCE[key][0] / row["s_per_sentence"], 2)
            out.append(line)
    return pd.DataFrame(out)


def main(argv: list[str] | None = None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="a few steps on the bundled sample (for the test)")
    mode.add_argument("--paper", action="store_true", help="the paper's 2000 steps (long-running)")
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--selections", nargs="+", default=list(SELECTIONS), choices=list(SELECTIONS))
    parser.add_argument("--paths", nargs="+", default=["fast", "plain"], choices=["fast", "plain"])
    parser.add_argument("--prior", choices=["none", "ngram", "gpt2"], default="none",
                        help="LM prior of the reordering rounds (weight 0.2): ngram is built offline "
                             "from every split but the attacked one; gpt2 needs the hub")
    parser.add_argument("--polish", type=int, default=0, metavar="ROUNDS",
                        help="greedy token-substitution rounds after the projection (beyond the paper; 0: off)")
    parser.add_argument("--sentences", type=int, default=5)
    parser.add_argument("--seed", type=int, default=101)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process (0: torch's default)")
    parser.add_argument("--jobs", type=int, default=1, help="cases run in parallel processes")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, help="write the table (CSV) and the run's settings (JSON) here")
    args = parser.parse_args(argv)
    if args.quick:
        args.sentences = min(args.sentences, 2)

    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"device {args.device}, {args.threads or torch.get_num_threads()} thread(s) per process, {args.jobs} job(s)")
    print(f"model {args.model}, settings {settings(args)}, {args.sentences} sentences, seed {args.seed}")
    suffix = "" if args.prior == "none" else f"+{args.prior}"
    cases = [(s, p + suffix) for s in args.selections for p in args.paths]
    # Longest cases first, so that parallel jobs finish together.
    cases.sort(key=lambda c: (not c[1].startswith("plain"), -list(SELECTIONS).index(c[0])))
    rows = Parallel(n_jobs=args.jobs)(delayed(run_case)(s, p, args) for s, p in cases)
    result = table(rows, args)
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(result.to_string(index=False))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        result.to_csv(args.out, index=False)
        meta = {
            "command": "python bench/reference_comparison.py " + shlex.join(argv if argv is not None else sys.argv[1:]),
            "settings": {**settings(args), "prior": args.prior, "prior_weight": 0.2, "polish_rounds": args.polish},
            "rows": rows[0]["rows"],
            "torch": torch.__version__,
            "reference": REFERENCE,
        }
        args.out.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
