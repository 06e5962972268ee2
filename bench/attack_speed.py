"""Speed and memory of one optimisation-attack step, per model and selection.

What it measures
----------------
For each victim model and each parameter selection the attacker sees, this
benchmark reports

* **ms/step**: the median wall-clock time of one iteration of the
  optimisation attack's inner loop (:func:`gilib.attack.optimization_attack`,
  with the library's default path): the gradient of the gradient-matching
  loss with respect to the candidate embeddings (the candidate's parameter
  gradient taken by torch.func, then differentiated again), the
  embedding-norm regulariser, the Adam step and the learning-rate schedule
  step. The library's own attack runs the loop, so nothing here is a copy of
  it that could drift: a global optimizer step hook
  (``torch.optim.optimizer.register_optimizer_step_post_hook``) stamps the
  end of every Adam step, and one step is the time between two consecutive
  stamps. Model loading, the random initialisation, the first step,
  ``warmup`` further steps and the final projection onto tokens are
  excluded.
* **peak memory**: each (model, selection) case runs in a fresh process
  (``multiprocessing`` with the ``spawn`` context), so its peak resident set
  size is its own (on Linux ``VmHWM``, see :func:`peak_rss_mib` for why not
  ``ru_maxrss``). The table gives the peak, the peak already reached once
  the model is loaded and the shared gradient computed (``loaded MiB``), and
  their difference (``attack MiB``): how far the attack itself raised the
  peak. On a CUDA device the figures come from
  :func:`torch.cuda.max_memory_allocated` instead (tensors only, not the
  CUDA context): ``loaded`` is what the tensors hold when the attack
  starts, when the peak counter is reset.

The attacked input is one fixed sentence of the bundled sample
(:func:`gilib.data.load_split` ``("sample")``), batch size 1, with the cosine
objective and no reordering rounds (``swap_every=0``), so every timed step
does the same work.

These are figures for one machine, printed for the reader; nothing here is an
assertion, and the test that runs this script checks only that it runs.

Usage::

    python bench/attack_speed.py                       # both models, all selections
    python bench/attack_speed.py --quick               # minilm, 3 steps (the test)
    python bench/attack_speed.py --models minilm --selections query0 --steps 50
    python bench/attack_speed.py --threads 1 --out attack_speed.csv
"""

from __future__ import annotations

import argparse
import csv
import multiprocessing
import os
import platform
import resource
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from gilib.data import load_split

MODELS = ("minilm", "bert-base-shape")
"""Victims benchmarked by default (both load with no network)."""

SELECTIONS: dict[str, tuple[str, int | None]] = {
    "full": ("full", None),
    "layer0": ("layer", 0),
    "query0": ("attention.query", 0),
}
"""Benchmark name -> ``(component, layers)`` for :func:`gilib.selection.select`."""

SENTENCE_ROW = 8
"""Row of the bundled sample that is attacked: "It seems unlikely that the
train will arrive on time." (13 tokens with ``[CLS]`` and ``[SEP]``)."""

DEFAULT_STEPS = 10
DEFAULT_WARMUP = 2
QUICK = {"models": ("minilm",), "steps": 3, "warmup": 1}
"""What ``--quick`` changes (explicit flags still win)."""

_MIB = 2**20


@dataclass(frozen=True)
class Case:
    """One measurement to run in its own process.

    Attributes:
        model: a name for :func:`gilib.models.load_model`.
        selection: a key of :data:`SELECTIONS`.
        steps: timed attack steps (the median is reported).
        warmup: steps run and discarded before the timed ones.
        threads: ``torch.set_num_threads`` value, or ``None`` for torch's
            default.
        device: ``"cpu"`` or ``"cuda"``.
        row: row of the bundled sample to attack.
    """

    model: str
    selection: str
    steps: int = DEFAULT_STEPS
    warmup: int = DEFAULT_WARMUP
    threads: int | None = None
    device: str = "cpu"
    row: int = SENTENCE_ROW


@dataclass(frozen=True)
class Row:
    """The figures of one case: one line of the table.

    Attributes:
        model: victim name.
        selection: benchmark selection name (``full``, ``layer0``, ...).
        params: parameters in the selection.
        share: the selection's share of all parameters, in percent.
        tokens: tokens of the attacked sentence, ``[CLS]`` and ``[SEP]``
            included.
        ms_step: median milliseconds per attack step.
        peak_mib: peak memory of the process (RSS, or CUDA tensors).
        loaded_mib: peak memory once the model was loaded and the shared
            gradient computed (CUDA: tensors held at that point).
        attack_mib: ``peak_mib - loaded_mib``.
        threads: torch threads the case ran with.
    """

    model: str
    selection: str
    params: int
    share: float
    tokens: int
    ms_step: float
    peak_mib: float
    loaded_mib: float
    attack_mib: float
    threads: int


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far, in MiB.

    On Linux this is ``VmHWM`` from ``/proc/self/status``, the high-water
    mark of this process's own memory. ``resource.getrusage(RUSAGE_SELF)
    .ru_maxrss`` would be wrong there: the kernel carries it over ``exec``,
    so a process spawned by a parent that holds 800 MiB reports at least
    800 MiB however little it uses. Elsewhere ``ru_maxrss`` is the fallback
    (KiB on most systems, bytes on macOS).
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # the line reads "VmHWM: <n> kB"
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / _MIB if sys.platform == "darwin" else peak / 1024


def measure(case: Case) -> Row:
    """Run one case in this process and return its figures.

    Meant to run in a fresh process (see :func:`run_case`), so that the peak
    memory belongs to this case alone.

    Args:
        case: what to measure.

    Returns:
        The case's :class:`Row`.

    Raises:
        RuntimeError: if the attack made a different number of optimizer
            steps than asked (its loop changed shape).
    """
    # Imported here so that a spawned worker pays for them (torch.func,
    # transformers), not the parent, which only prints the table.
    from gilib.attack import AttackConfig, optimization_attack
    from gilib.client import client_update
    from gilib.models import encode, load_model
    from gilib.selection import select

    if case.threads is not None:
        torch.set_num_threads(case.threads)
    cuda = torch.device(case.device).type == "cuda"

    example = load_split("sample")[case.row]
    model, tokenizer = load_model(case.model, device=case.device)
    component, layers = SELECTIONS[case.selection]
    selection = select(model, component, layers)
    batch = encode(tokenizer, example.text, example.label, device=case.device)
    update = client_update(model, selection, batch).shared

    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        loaded = torch.cuda.max_memory_allocated() / _MIB
    else:
        loaded = peak_rss_mib()

    # The attack's loop runs 1 + warmup + steps Adam steps; the stamps after
    # each give warmup + steps intervals, each one full loop iteration.
    config = AttackConfig(
        steps=1 + case.warmup + case.steps,
        init_candidates=1,
        swap_every=0,
        progress=False,
    )
    stamps = _time_optimizer_steps(
        lambda: optimization_attack(model, tokenizer, update, selection, config),
        synchronize=cuda,
    )
    intervals = [b - a for a, b in zip(stamps, stamps[1:])][case.warmup :]
    if len(intervals) != case.steps:
        raise RuntimeError(
            f"Timed {len(intervals)} attack steps instead of {case.steps}: the attack's loop "
            "no longer makes one torch optimizer step per iteration, so this benchmark "
            "needs updating."
        )

    peak = torch.cuda.max_memory_allocated() / _MIB if cuda else peak_rss_mib()
    return Row(
        model=case.model,
        selection=case.selection,
        params=selection.numel,
        share=100 * selection.fraction,
        tokens=int(update.lengths[0]),
        ms_step=1000 * statistics.median(intervals),
        peak_mib=peak,
        loaded_mib=loaded,
        attack_mib=peak - loaded,
        threads=torch.get_num_threads(),
    )


def _time_optimizer_steps(run, *, synchronize: bool = False) -> list[float]:
    """Call ``run()`` and return a ``perf_counter`` stamp per optimizer step it made.

    Args:
        run: a callable that runs the attack.
        synchronize: wait for the CUDA device before each stamp, so that a
            stamp marks finished work rather than queued work.
    """
    stamps: list[float] = []

    def stamp(optimizer, args, kwargs) -> None:
        if synchronize:
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())

    handle = register_optimizer_step_post_hook(stamp)
    try:
        run()
    finally:
        handle.remove()
    return stamps


def run_case(case: Case) -> Row:
    """Run :func:`measure` for ``case`` in a fresh ``spawn``-ed process."""
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        return pool.submit(measure, case).result()


def run_bench(
    models: Sequence[str] = MODELS,
    selections: Sequence[str] = tuple(SELECTIONS),
    *,
    steps: int = DEFAULT_STEPS,
    warmup: int = DEFAULT_WARMUP,
    threads: int | None = None,
    device: str = "cpu",
    row: int = SENTENCE_ROW,
    on_row: Callable[[Row], None] | None = None,
) -> list[Row]:
    """Measure every (model, selection) pair, each in its own process.

    Args:
        models: victim names.
        selections: keys of :data:`SELECTIONS`.
        steps: timed steps per case.
        warmup: discarded steps per case, after the always-discarded first.
        threads: ``torch.set_num_threads`` value (``None``: torch's default).
        device: ``"cpu"`` or ``"cuda"``.
        row: row of the bundled sample to attack.
        on_row: optional callback, called with each :class:`Row` as soon as
            it is measured.

    Returns:
        One :class:`Row` per pair, models outermost.
    """
    rows = []
    for model in models:
        for selection in selections:
            result = run_case(Case(model, selection, steps, warmup, threads, device, row))
            if on_row is not None:
                on_row(result)
            rows.append(result)
    return rows


def machine_facts(device: str = "cpu", threads: int | None = None) -> dict[str, str]:
    """What the figures depend on: software versions, threads, CPUs, device, load.

    Args:
        device: the device the cases run on.
        threads: the ``--threads`` value; ``None`` reports torch's default.
    """
    facts = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": str(threads or torch.get_num_threads()),
        "cpus": str(os.cpu_count()),
        "cpu": platform.processor() or platform.machine(),
        "device": device,
    }
    if hasattr(os, "getloadavg"):
        # Other work on the machine slows every step (torch's threads wait on
        # each other), so the load before the run belongs with the figures.
        facts["load"] = "{:.2f} {:.2f} {:.2f} (1, 5, 15 min)".format(*os.getloadavg())
    if torch.device(device).type == "cuda":
        facts["device"] = f"{device} ({torch.cuda.get_device_name()})"
    return facts


def _columns(device: str) -> list[tuple[str, str, str]]:
    """``(header, Row field, format)`` of each printed column."""
    memory = "CUDA" if torch.device(device).type == "cuda" else "RSS"
    return [
        ("model", "model", "{}"),
        ("selection", "selection", "{}"),
        ("params selected", "params", "{:,}"),
        ("share %", "share", "{:.3g}"),
        ("tokens", "tokens", "{}"),
        ("ms/step", "ms_step", "{:.1f}"),
        (f"peak {memory} MiB", "peak_mib", "{:.0f}"),
        ("loaded MiB", "loaded_mib", "{:.0f}"),
        ("attack MiB", "attack_mib", "{:.0f}"),
    ]


def header(device: str = "cpu") -> list[str]:
    """Column headers of the table."""
    return [name for name, _, _ in _columns(device)]


def format_row(row: Row, widths: Sequence[int], device: str = "cpu") -> str:
    """One table line: text columns left-aligned, numbers right-aligned."""
    cells = []
    for (_, attr, fmt), width in zip(_columns(device), widths):
        value = getattr(row, attr)
        text = fmt.format(value)
        cells.append(text.ljust(width) if isinstance(value, str) else text.rjust(width))
    return "  ".join(cells).rstrip()


def table_widths(models: Sequence[str] = MODELS, device: str = "cpu") -> list[int]:
    """Column widths: each header's, and room for the longest model name."""
    widths = [len(h) for h in header(device)]
    widths[0] = max(widths[0], *map(len, models))
    return widths


def format_header(widths: Sequence[int], device: str = "cpu") -> str:
    """The header line and a rule under it."""
    names = header(device)
    line = "  ".join(n.ljust(w) if i < 2 else n.rjust(w) for i, (n, w) in enumerate(zip(names, widths)))
    return f"{line.rstrip()}\n{'-' * len(line)}"


def write_csv(rows: Sequence[Row], path: str | os.PathLike[str]) -> None:
    """Write the rows (every :class:`Row` field) to a CSV file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=[field.name for field in fields(Row)])
        writer.writeheader()
        for row in rows:
            writer.writerow(asdict(row))


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the command line; ``--quick`` fills in only what was not given."""
    parser = argparse.ArgumentParser(
        description="Milliseconds per optimisation-attack step and peak memory, "
        "per model and parameter selection."
    )
    parser.add_argument("--models", nargs="+", metavar="NAME", help=f"victims (default: {' '.join(MODELS)})")
    parser.add_argument(
        "--selections",
        nargs="+",
        choices=tuple(SELECTIONS),
        default=list(SELECTIONS),
        help="selections the attacker sees (default: all)",
    )
    parser.add_argument("--steps", type=int, help=f"timed steps per case (default: {DEFAULT_STEPS})")
    parser.add_argument("--warmup", type=int, help=f"discarded steps per case (default: {DEFAULT_WARMUP})")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's default)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument("--row", type=int, default=SENTENCE_ROW, help=f"sample row to attack (default: {SENTENCE_ROW})")
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"minilm only, {QUICK['steps']} steps, {QUICK['warmup']} warm-up (a smoke test)",
    )
    parser.add_argument("--out", metavar="PATH", help="also write the table to this CSV file")
    args = parser.parse_args(argv)

    defaults = QUICK if args.quick else {"models": MODELS, "steps": DEFAULT_STEPS, "warmup": DEFAULT_WARMUP}
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, list(value) if isinstance(value, tuple) else value)
    if args.steps < 1:
        parser.error(f"--steps must be at least 1, got {args.steps}")
    if args.warmup < 0:
        parser.error(f"--warmup must be 0 or more, got {args.warmup}")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be at least 1, got {args.threads}")
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda was asked for, but torch sees no CUDA device")
    return args


def main(argv: Sequence[str] | None = None) -> list[Row]:
    """Run the benchmark from the command line and print the table.

    Returns:
        The measured rows.
    """
    args = parse_args(argv)
    sample = load_split("sample")
    if not 0 <= args.row < len(sample):
        raise SystemExit(f"--row must lie between 0 and {len(sample) - 1}, got {args.row}")
    example = sample[args.row]
    facts = machine_facts(args.device, args.threads)
    print("Attack step speed and memory (figures for this machine, not assertions)")
    for name, value in facts.items():
        print(f"  {name:<8} {value}")
    print(f'  sentence sample row {args.row}: "{example.text}"')
    print(
        f"  per case: fresh spawned process, median of {args.steps} step(s) "
        f"after 1 + {args.warmup} warm-up step(s), objective cos, batch 1"
    )
    print()

    widths = table_widths(args.models, args.device)
    print(format_header(widths, args.device), flush=True)
    rows = run_bench(
        args.models,
        args.selections,
        steps=args.steps,
        warmup=args.warmup,
        threads=args.threads,
        device=args.device,
        row=args.row,
        on_row=lambda r: print(format_row(r, widths, args.device), flush=True),
    )
    if hasattr(os, "getloadavg"):
        print(f"\nload after the run: {os.getloadavg()[0]:.2f} (1 min)")
    if args.out:
        write_csv(rows, args.out)
        print(f"\nwrote {args.out}")
    return rows


if __name__ == "__main__":
    main()
