"""One results store and one runner for every grid and study of the book.

A study is a list of *tasks* and a *work* function that turns a task into
result lines (plain JSON-able dicts). :func:`run` executes the tasks not yet
in the results file and appends their lines, one JSON line each:

* **resumable**: every line has a key (``line_key``); a task whose keys
  (``task_keys``) are all in the file is skipped, so a killed run resumes
  where it stopped and loses only the tasks in flight;
* **safe appends**: a last line cut short by a killed run is removed before
  anything is appended (:func:`append_lines`), so it never fuses with the
  next record;
* **one engine or another, the same lines**: tasks run in this process, in
  local worker processes through joblib, or on a Dask cluster (joblib's
  ``dask`` backend) when given a scheduler address, ``tcp://host:8786``, or
  ``"local"`` for a :class:`~distributed.LocalCluster` on this machine. Work
  functions seed everything from the task and use one torch thread, so the
  lines do not depend on which engine ran them; the parent process alone
  writes the file, stamping each line with the git commit.

Used by :mod:`gilib.experiments` (attack grids), :mod:`gilib.span_study`
(chapter 5) and :mod:`gilib.utility` (DP fine-tuning), each with its own
command line; :func:`markdown_table` renders every table the README prints.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Hashable, Iterable, Iterator, Sequence

from joblib import Parallel, delayed, parallel_backend

from .data import repo_root

Task = Sequence[Any]
"""The arguments of one call of a work function."""


def git_commit() -> str:
    """The repository's commit (``-dirty`` when the tree has changes), or ``unknown``."""
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty", "--abbrev=12"],
            cwd=repo_root(), capture_output=True, text=True, timeout=10, check=True,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def read_lines(path: str | Path) -> list[dict]:
    """The records of a results file (none if it does not exist).

    A last line cut short by a killed run is skipped; a malformed line
    anywhere else means the file was damaged, and is an error.

    Raises:
        ValueError: for a malformed line that is not the last one.
    """
    path = Path(path)
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if number == len(lines):
                continue  # the last line of a run killed mid-write; the next append removes it
            raise ValueError(f"{path}, line {number}, is not JSON: the file was edited or damaged. "
                             f"Remove that line and rerun to recompute it.") from None
    return rows


def repair(path: str | Path) -> None:
    """Cut a results file back to its last complete line (a killed run may leave half a line)."""
    path = Path(path)
    if not path.exists() or not path.stat().st_size:
        return
    data = path.read_bytes()
    if data.endswith(b"\n"):
        return
    with path.open("r+b") as f:
        f.truncate(data.rfind(b"\n") + 1)


def append_lines(path: str | Path, lines: Iterable[dict]) -> None:
    """Append records to a results file, one JSON line each, after :func:`repair`.

    One write and an ``fsync`` per call: a kill loses at most this call's
    lines, and never damages an earlier one.
    """
    text = "".join(json.dumps(line) + "\n" for line in lines)
    if not text:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    repair(path)
    with path.open("a") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def run(
    out: str | Path,
    tasks: Sequence[Task],
    work: Callable[..., list[dict]],
    *,
    task_keys: Callable[..., Iterable[Hashable]],
    line_key: Callable[[dict], Hashable],
    jobs: int = 1,
    scheduler: str | None = None,
    limit: int | None = None,
    progress: Callable[[int, int, float, list[dict]], None] | None = None,
) -> list[dict]:
    """Run (or resume) a study: the tasks not yet in ``out``, their lines appended.

    Args:
        out: the results file (JSON lines); created with its folders.
        tasks: every task of the study, each the arguments of one ``work``
            call.
        work: a module-level function (worker processes import it by name)
            returning the task's result lines.
        task_keys: the keys of the lines a task writes (called as
            ``task_keys(*task)``).
        line_key: the key of a result line.
        jobs: worker processes (joblib), or Dask workers of a ``"local"``
            cluster; 1 without a scheduler runs in this process.
        scheduler: ``None`` (this machine), ``"local"`` (a Dask
            ``LocalCluster`` of ``jobs`` workers) or a Dask scheduler's
            address (``tcp://host:8786``).
        limit: run at most this many tasks (tests use it to simulate a kill).
        progress: called after each finished task with ``(done, total,
            seconds, lines)``.

    Returns:
        Every line of ``out`` after the run, old and new.

    Raises:
        ValueError: for ``jobs < 1`` or a malformed results file.
    """
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"jobs must be a whole number of workers, at least 1; got {jobs!r}.")
    out = Path(out)
    done = {line_key(line) for line in read_lines(out)}
    todo = [t for t in tasks if any(k not in done for k in task_keys(*t))][:limit]
    commit, start = git_commit(), time.perf_counter()
    for i, lines in enumerate(execute(work, todo, jobs=jobs, scheduler=scheduler), start=1):
        fresh = [{**line, "commit": commit} for line in lines if line_key(line) not in done]
        append_lines(out, fresh)
        done |= {line_key(line) for line in fresh}
        if progress is not None:
            progress(i, len(todo), time.perf_counter() - start, lines)
    return read_lines(out)


def execute(
    work: Callable[..., list[dict]], tasks: Sequence[Task], *, jobs: int = 1, scheduler: str | None = None
) -> Iterator[list[dict]]:
    """``work(*task)`` for every task, results in the order they finish.

    The engine is chosen as in :func:`run`; the work function and its tasks
    are the same whichever runs them.
    """
    if not tasks:
        return
    if scheduler is None and jobs == 1:
        for task in tasks:
            yield work(*task)
        return
    calls = (delayed(work)(*task) for task in tasks)
    if scheduler is None:
        yield from Parallel(n_jobs=jobs, return_as="generator_unordered")(calls)
        return
    with dask_client(scheduler, jobs), parallel_backend("dask"):
        yield from Parallel(return_as="generator_unordered")(calls)


@contextlib.contextmanager
def dask_client(scheduler: str, jobs: int = 1):
    """A Dask client for ``scheduler``: ``"local"`` starts (and stops) a ``LocalCluster``.

    Dask is an optional dependency (``pip install "dask[distributed]"``):
    imported here, so that local runs never need it.
    """
    try:  # optional: only a cluster run needs it
        from distributed import Client, LocalCluster
    except ImportError as err:
        raise RuntimeError('Running on a Dask cluster needs dask: pip install "dask[distributed]".') from err
    if scheduler == "local":
        # One thread per worker process: torch's own threads would oversubscribe the cores.
        cluster = LocalCluster(n_workers=jobs, threads_per_worker=1, processes=True, dashboard_address=None)
        try:
            with Client(cluster) as client:
                yield client
        finally:
            cluster.close()
        return
    if not scheduler.startswith(("tcp://", "tls://", "ws://", "wss://", "inproc://")):
        raise ValueError(f"Unknown scheduler {scheduler!r}: pass a Dask scheduler's address "
                         f"(tcp://host:8786) or 'local' for a cluster on this machine.")
    try:
        client = Client(scheduler, timeout="20s")
    except OSError as err:
        raise RuntimeError(f"No Dask scheduler answers at {scheduler}: start one (dask scheduler, then "
                           f"dask worker {scheduler} on each machine) or use --scheduler local.") from err
    with client:
        yield client


def print_progress(label: Callable[[list[dict]], str]) -> Callable[[int, int, float, list[dict]], None]:
    """A :func:`run` progress callback printing ``[i/n  seconds] label(lines)`` to stderr."""
    def report(done: int, total: int, seconds: float, lines: list[dict]) -> None:
        print(f"[{done}/{total} {seconds:6.0f}s] {label(lines)}", file=sys.stderr, flush=True)
    return report


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A Markdown table: one header row, then one row per sequence of (formatted) cells."""
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join("---" for _ in headers) + " |"]
    for row in rows:
        cells = [str(c) for c in row]
        if len(cells) != len(headers):
            raise ValueError(f"A row of {len(cells)} cells under {len(headers)} headers: {cells}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def mean_sd(mean: float, sd: float) -> str:
    """``0.80 ± 0.19``: a mean and standard deviation as the tables print them."""
    return f"{mean:.2f} ± {sd:.2f}"
