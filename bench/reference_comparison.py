"""Our paths against the paper's reference code, side by side: seconds per sentence and ROUGE.

The setting is the one the paper's reference code (LAMP's attack as Li et
al., EMNLP 2024, ran it) is measured in: MiniLM, one thread per process,
500 steps, best of 500 random starts, reordering rounds of 200 candidates
every 75 steps, no language-model prior, on the first five CoLA training
rows of LAMP's seed-101 shuffle (rows 2310, 5604, 5827, 6564, 943). It runs
through gilib on up to four paths:

* **plain**: the reference's algorithm written in our code: sequential
  random starts, sequential reordering candidates, one sentence at a time
  (the library's :class:`~gilib.attack.engines.PlainEngine`), plus the
  reference's nearest-token lookup at every step, whose result it discards
  (:class:`ReferenceEngine` adds that cost here, so that the library does
  no discarded work);
* **fast**: the same algorithm, float32: starts and reordering candidates
  scored in batched calls from per-token activations
  (:mod:`gilib.attack.ghost`), the five sentences packed into one row and
  optimised together, lookups only where needed;
* **fast-bf16**: the fast path with ``AttackConfig(precision="bfloat16")``:
  the model's matrix products in bfloat16 (a change of arithmetic, not of
  algorithm);
* **fast-short**: fast-bf16 stopped at half the steps (:data:`SHORT`):
  the same starts, learning-rate schedule and reordering rounds up to
  there (three rounds instead of six), so its tokens are those fast-bf16
  holds at that step. A change of algorithm: its ROUGE is set against
  fast-bf16's, which spends about twice the seconds, on the same
  sentences.

With ``--reference SCRATCH`` the paper's own code (built in SCRATCH by
``../shared/reference/setup.sh``) runs at the same time in a second
process, on the same rows and settings, one thread, and the table divides
seconds measured in this run only. Without it, the script prints how to
build it and leaves the ratio out: seconds measured on another machine or
another day do not divide.

Plain and fast use the same seeds and return the same tokens on the seeded
tests (over 500 steps float rounding lets some trajectories part ways; the
table counts the sentences where they agree). ROUGE is scored on text
without ``[CLS]``/``[SEP]``, F-measure x 100, with a 95 % bootstrap interval
over the sentences (five sentences: wide). Seconds are per sentence, wall
clock. These are figures, never assertions.

Usage::

    python bench/reference_comparison.py --reference /tmp/ref    # side by side (about 40 min on 2 cores)
    python bench/reference_comparison.py --paths fast fast-bf16  # our paths only
    python bench/reference_comparison.py --paper         # the paper's full setting: long-running, not in make test
    python bench/reference_comparison.py --quick         # a few steps on the bundled sample (the test)
    python bench/reference_comparison.py --prior ngram   # with the offline n-gram prior
    python bench/reference_comparison.py --device cuda   # on a GPU
    python bench/reference_comparison.py --paths fast-bf16 --selections query0 --profile  # where the time goes
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch
from joblib import Parallel, delayed

from gilib.attack import AttackConfig, AttackResult, GPT2Prior, NgramPrior, attack_clients
from gilib.attack.engines import PlainEngine
from gilib.client import client_update
from gilib.data import cpu_model, default_data_dir, load_split, prior_texts, sample_batches
from gilib.metrics import bootstrap_interval, rouge_scores
from gilib.models import encode, load_model
from gilib.selection import Selection, select
from gilib.update import SharedUpdate

SELECTIONS = {
    "query0": ("attention.query", 0),
    "layer0": ("layer", 0),
    "full": ("full", None),
}
PATHS = ("plain", "fast", "fast-bf16", "fast-short")
SHORT = {"steps": 0.5}
"""fast-short's search: these settings of the mode scaled by these factors, the rest as they are."""
REFERENCE_DIR = Path(__file__).resolve().parent.parent.parent / "shared" / "reference"
SETUP_HINT = (
    "To run the paper's reference code beside this benchmark: fetch a snapshot of "
    "weijun-l/partial-gradients-leakage (commit ac6da10), then\n"
    "  bash ../shared/reference/setup.sh MIRROR_GIT_DIR /tmp/ref\n"
    "and pass --reference /tmp/ref (../shared/reference/README.md says more)."
)


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


def run_case(selection_key: str, path: str, args: argparse.Namespace, attack: dict | None = None) -> dict:
    """Attack every sentence on one selection with one path; one result row.

    ``path`` is one of :data:`PATHS`, optionally with ``+PRIOR``; ``attack``
    replaces the mode's settings (:func:`settings`).
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
    base = dict(objective="cos", seed=args.seed, progress=False, polish_rounds=args.polish,
                **(attack or settings(args)))
    kind, _, prior_name = path.partition("+")
    prior = make_prior(prior_name or "none", tokenizer, args)
    start = time.perf_counter()
    if kind == "plain":
        results = [
            reference_attack(model, tokenizer, u, selection,
                             AttackConfig(batched=False, **{**base, "seed": args.seed + i}), prior=prior)
            for i, u in enumerate(updates)
        ]
    else:
        precision = "float32" if kind == "fast" else "bfloat16"
        if kind == "fast-short":
            base.update({k: max(1, int(base[k] * factor)) for k, factor in SHORT.items()})
        config = AttackConfig(batched=True, precision=precision, **base)
        results = attack_clients(model, tokenizer, updates, selection, config, prior=prior)
    seconds = (time.perf_counter() - start) / len(examples)
    scores = [rouge_scores(r.texts[0], ex.text) for r, ex in zip(results, examples)]
    timings = {k: sum(r.timings[k] for r in results) / len(results) for k in results[0].timings}
    return {
        "selection": selection_key,
        "path": path,
        "sentences": len(examples),
        "rows": " ".join(str(ex.row_id) for ex in examples),
        "s_per_sentence": seconds,
        **{f"s_{k}": v for k, v in timings.items()},
        "rouge1_each": [100 * sc["rouge1"] for sc in scores],
        "rouge2_each": [100 * sc["rouge2"] for sc in scores],
        "token_ids": [r.token_ids for r in results],
    }


GROUPS = {
    "matrix products": ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::linear", "aten::matmul"),
    "dtype casts and copies": ("aten::copy_", "aten::_to_copy", "aten::to", "aten::clone", "aten::contiguous"),
}
"""How :func:`profile_case` groups torch's operators (by self CPU time); the rest is "other"."""


PROFILE_SCALE = 0.1
"""--profile runs the mode's steps, starts, reordering interval and candidates scaled by this factor:
every phase gets a tenth of its work, so the shares stay, and the profiler's record of every operator
call (millions over the full setting, gigabytes of memory) stays small."""


def profile_settings(args: argparse.Namespace) -> dict:
    """The mode's attack settings scaled by :data:`PROFILE_SCALE` (each at least 1)."""
    return {k: max(1, int(v * PROFILE_SCALE)) for k, v in settings(args).items()}


def profile_case(selection_key: str, path: str, args: argparse.Namespace) -> str:
    """:func:`run_case` under torch's profiler, at :data:`PROFILE_SCALE`: where one path's time goes.

    Returns:
        Text: each group's share of the self CPU time, then torch's table
        of the 15 operators with the most self CPU time.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run_case(selection_key, path, args, profile_settings(args))
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    shares = {name: sum(e.self_cpu_time_total for e in events if e.key in ops) / total
              for name, ops in GROUPS.items()}
    shares["other"] = 1 - sum(shares.values())
    head = f"{selection_key} / {path}: {total / 1e6:.1f} s of self CPU time (profiler overhead included)\n"
    head += "\n".join(f"  {name}: {100 * share:.1f} %" for name, share in shares.items())
    return head + "\n" + events.table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=36)


# --------------------------------------------------------------------------
# The reference code, in a second process
# --------------------------------------------------------------------------


class ReferenceRun:
    """The paper's code on the chosen selections, one after the other, in a background process.

    Its ``run.sh`` (``../shared/reference``) prints one ``PATCH-TIMING`` and
    one ``PATCH-ROUGE`` line per sentence; :meth:`rows` reads them.
    """

    def __init__(self, scratch: Path, selections: list[str], logs: Path) -> None:
        script = REFERENCE_DIR / "run.sh"
        if not (scratch / "partial_attack.py").is_file() or not script.is_file():
            raise SystemExit(f"No reference code in {scratch} (or no {script}).\n{SETUP_HINT}")
        logs.mkdir(parents=True, exist_ok=True)
        self.logs = {key: logs / f"reference_{key}.log" for key in selections}
        command = " && ".join(
            f"bash {shlex.quote(str(script))} {shlex.quote(str(scratch))} {shlex.quote(sys.executable)} "
            f"{key} {shlex.quote(str(log))} > /dev/null" for key, log in self.logs.items()
        )
        self.process = subprocess.Popen(["bash", "-c", command])

    def rows(self) -> list[dict]:
        """Wait for the reference to finish; one row per selection, like :func:`run_case`'s."""
        if self.process.wait() != 0:
            raise SystemExit(f"The reference code failed: see {', '.join(map(str, self.logs.values()))}.")
        out = []
        for key, log in self.logs.items():
            text = log.read_text()
            seconds = [float(v) for v in re.findall(r"PATCH-TIMING sentence=\d+ seconds=([\d.]+)", text)]
            rouge = re.findall(r"PATCH-ROUGE sentence=\d+ r1=([\d.]+) r2=([\d.]+)", text)
            rows = re.search(r"PATCH-DATA chosen row indices = \[([\d, ]+)\]", text)
            out.append({
                "selection": key, "path": "reference", "sentences": len(seconds),
                "rows": rows.group(1).replace(",", "") if rows else "",
                "s_per_sentence": sum(seconds) / len(seconds),
                "rouge1_each": [float(a) for a, _ in rouge], "rouge2_each": [float(b) for _, b in rouge],
                "token_ids": None,
            })
        return out


# --------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------


def _with_interval(values: list[float], digits: int = 0) -> str:
    low, high = bootstrap_interval(values)
    return f"{sum(values) / len(values):.1f} [{low:.{digits}f}, {high:.{digits}f}]"


def _paired(row: pd.Series, other: pd.Series, name: str) -> dict:
    """ROUGE-1/2 of ``row`` minus ``other``'s, sentence by sentence, with 95 % intervals (same sentences only)."""
    if row["rows"] != other["rows"]:
        return {}
    return {f"{score.replace('rouge', 'ROUGE-')} minus {name} [95% CI]": _with_interval(
        [a - b for a, b in zip(row[f"{score}_each"], other[f"{score}_each"])], 1) for score in ("rouge1", "rouge2")}


def table(rows: list[dict]) -> pd.DataFrame:
    """One line per selection and path; ratios only between seconds measured in this run."""
    df = pd.DataFrame(rows)
    out = []
    for key in df["selection"].unique():
        part = df[df["selection"] == key].set_index("path")
        for path, row in part.iterrows():
            line = {
                "selection": key,
                "path": path,
                "s/sentence": round(row["s_per_sentence"], 1),
            }
            if path != "reference":
                line["init / optimisation / reordering / polish"] = " / ".join(
                    f"{row[c]:.1f}" for c in ("s_init", "s_optimization", "s_reordering", "s_polish"))
            line["ROUGE-1 [95% CI]"] = _with_interval(row["rouge1_each"])
            line["ROUGE-2 [95% CI]"] = _with_interval(row["rouge2_each"])
            if "reference" in part.index and path != "reference":
                line["x reference"] = round(part.loc["reference", "s_per_sentence"] / row["s_per_sentence"], 1)
            # Paired, sentence by sentence: against the reference, and
            # fast-short against the fast-bf16 run it stops halfway.
            for other in ("reference", "fast-bf16"):
                if other in part.index and path != other and (other == "reference" or path == "fast-short"):
                    line.update(_paired(row, part.loc[other], other))
            kind, plus, prior = path.partition("+")
            plain = "plain" + plus + prior
            if kind.startswith("fast") and plain in part.index:
                line["x plain"] = round(part.loc[plain, "s_per_sentence"] / row["s_per_sentence"], 2)
            if kind == "fast" and plain in part.index:  # the same arithmetic: the same tokens expected
                same = sum(a == b for a, b in zip(row["token_ids"], part.loc[plain, "token_ids"]))
                line["same tokens as plain"] = f"{same}/{row['sentences']}"
            out.append(line)
    return pd.DataFrame(out).astype(object).fillna("")


def main(argv: list[str] | None = None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="a few steps on the bundled sample (for the test)")
    mode.add_argument("--paper", action="store_true", help="the paper's 2000 steps (long-running)")
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--selections", nargs="+", default=list(SELECTIONS), choices=list(SELECTIONS))
    parser.add_argument("--paths", nargs="+", default=list(PATHS), choices=list(PATHS))
    parser.add_argument("--plain-for", nargs="+", choices=list(SELECTIONS), metavar="SELECTION",
                        help="run the (slow) plain path on these selections only (default: every selection)")
    parser.add_argument("--reference", type=Path, metavar="SCRATCH",
                        help="the reference code built by ../shared/reference/setup.sh: run it beside ours")
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
    parser.add_argument("--profile", action="store_true",
                        help="run each case under torch's profiler and print where its time goes "
                             "(with --out, also to OUT.profile.txt); no table")
    args = parser.parse_args(argv)
    if args.quick:
        args.sentences = min(args.sentences, 2)
    if args.reference and (args.quick or args.paper or args.model != "minilm" or args.sentences != 5
                           or args.seed != 101 or args.prior != "none" or args.polish):
        parser.error("--reference runs the reference setting only: no --quick/--paper/--model/--sentences/"
                     "--seed/--prior/--polish")

    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"device {args.device}, {args.threads or torch.get_num_threads()} thread(s) per process, {args.jobs} job(s)")
    print(f"model {args.model}, settings {settings(args)}, {args.sentences} sentences, seed {args.seed}")
    suffix = "" if args.prior == "none" else f"+{args.prior}"
    cases = [(s, p + suffix) for s in args.selections for p in args.paths
             if p != "plain" or args.plain_for is None or s in args.plain_for]
    # Outside the repository: the reference's log prints the dataset's sentences.
    logs = Path(tempfile.gettempdir()) / "gilib_reference_logs"
    cases.sort(key=lambda c: (PATHS.index(c[1].partition("+")[0]) == 0, list(SELECTIONS).index(c[0])))
    if args.profile:
        if args.reference:
            parser.error("--profile runs our paths only: no --reference")
        text = "\n\n".join(profile_case(s, p, args) for s, p in cases)
        print(text)
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            command = "python bench/reference_comparison.py " + shlex.join(argv if argv is not None else sys.argv[1:])
            args.out.with_suffix(".profile.txt").write_text(
                f"{command}\ntorch {torch.__version__}, {cpu_model()}, settings {profile_settings(args)} "
                f"(the mode's, scaled by {PROFILE_SCALE})\n\n{text}\n")
        return pd.DataFrame()
    load = [os.getloadavg()[0]]
    if args.reference:
        # One selection at a time, the reference and our paths on it at the
        # same time: whatever else loads the machine loads both alike.
        rows = []
        for key in args.selections:
            reference = ReferenceRun(args.reference.resolve(), [key], logs)
            rows += [run_case(s, p, args) for s, p in cases if s == key]
            rows += reference.rows()
            load.append(os.getloadavg()[0])
    else:
        if not (args.quick or args.paper):
            print(SETUP_HINT)
        rows = Parallel(n_jobs=args.jobs)(delayed(run_case)(s, p, args) for s, p in cases)
        load.append(os.getloadavg()[0])
    result = table(rows)
    with pd.option_context("display.width", 250, "display.max_columns", 20):
        print(result.to_string(index=False))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        result.to_csv(args.out, index=False)
        meta = {
            "command": "python bench/reference_comparison.py " + shlex.join(argv if argv is not None else sys.argv[1:]),
            "settings": {**settings(args), "prior": args.prior, "prior_weight": 0.2, "polish_rounds": args.polish},
            "fast-short": SHORT,
            "rows": rows[0]["rows"],
            "torch": torch.__version__,
            "cpu": cpu_model(),
            "load_average_1min": {"start": load[0], "after_each_selection": load[1:]},
            "per_sentence": [{k: r[k] for k in ("selection", "path", "rouge1_each", "rouge2_each", "s_per_sentence")}
                             for r in rows],
        }
        args.out.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
