"""Command line: fine-tune the offline victims and report their validation metrics.

::

    python -m gilib.finetune cola [--rebuild]
    python -m gilib.finetune all --out data/results/finetuned_victims.jsonl

Each dataset prints its validation accuracy, Matthews correlation and cache
folder; ``--out`` writes one JSON line per dataset (recipe, metrics,
seconds, hardware, command), replacing the file. ``--rebuild`` trains even
when a valid checkpoint is cached, so that the seconds are this machine's.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path

from ..data import cpu_model, git_commit
from ..models import load_model
from . import DATASETS, Recipe, load


def line(dataset: str, recipe: Recipe, rebuild: bool, argv: list[str]) -> dict:
    """Fine-tune (or read) one victim and return its results line (``argv``: the command's arguments)."""
    victim = load(dataset, recipe, load_base=load_model, force=rebuild)
    meta = victim.meta
    return {
        "dataset": dataset, "victim": f"{recipe.base}-{dataset}", "recipe": meta["recipe"],
        "fingerprint": meta["fingerprint"], "validation": meta["validation"],
        "train_examples": meta["train_examples"], "epochs": meta["epochs"], "seconds": meta["seconds"],
        "trained_now": victim.built, "created": meta["created"],
        "hardware": {"cpu": cpu_model(), "cpus": os.cpu_count(), "torch_threads": meta["threads"]},
        "versions": meta["versions"], "path": str(victim.path),
        "command": shlex.join(["python", "-m", "gilib.finetune", *argv]), "commit": git_commit(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gilib.finetune", description=__doc__.split("\n")[0])
    parser.add_argument("dataset", choices=(*DATASETS, "all"))
    parser.add_argument("--rebuild", action="store_true", help="train even if a valid checkpoint is cached")
    parser.add_argument("--out", type=Path, help="write one JSON line per dataset to this file")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    recipe = Recipe()  # the recipe of the victim names, load_model("minilm-cola") and so on
    lines = []
    for dataset in DATASETS if args.dataset == "all" else (args.dataset,):
        lines.append(line(dataset, recipe, args.rebuild, argv))
        v, s = lines[-1]["validation"], lines[-1]["seconds"]
        print(f"{dataset}: accuracy {v['accuracy']:.4f}, MCC {v['mcc']:.4f} on {v['examples']} validation "
              f"sentences; trained in {s['train']:.0f} s; {lines[-1]['path']}", flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_name(args.out.name + ".tmp")
        tmp.write_text("".join(json.dumps(x) + "\n" for x in lines))
        tmp.replace(args.out)
        print(f"wrote {len(lines)} lines to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
