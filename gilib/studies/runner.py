"""One runner for every study of the book: resumable, local or on a Dask cluster.

A study is a list of *tasks* and a *work* function that turns a task into
result lines (plain JSON-able dicts); :class:`gilib.studies.study.Study`
describes one. :func:`run` executes the tasks not yet in the results file
and appends their lines through :mod:`gilib.studies.store`:

* **resumable**: every line has a key (``line_key``); a task whose keys
  (``task_keys``) are all in the file is skipped, so a killed run resumes
  where it stopped and loses only the tasks in flight;
* **one engine or another, the same lines**: tasks run in this process, in
  local worker processes through joblib, or on a Dask cluster (joblib's
  ``dask`` backend) when given a scheduler address, ``tcp://host:8786``, or
  ``"local"`` for a :class:`~distributed.LocalCluster` on this machine. Work
  functions seed everything from the task and use one torch thread, so the
  lines do not depend on which engine ran them; the parent process alone
  writes the file, stamping each line with the git commit.
"""

from __future__ import annotations

import contextlib
import sys
import time
from pathlib import Path
from typing import Any, Callable, Hashable, Iterable, Iterator, Sequence

from joblib import Parallel, delayed, parallel_backend

from ..data import git_commit
from .store import append_lines, read_lines

Task = Sequence[Any]
"""The arguments of one call of a work function."""

CONNECT_TIMEOUT = 20
"""Seconds a Dask scheduler has to answer before :func:`_dask_client` gives up."""


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
    with _dask_client(scheduler, jobs), parallel_backend("dask"):
        yield from Parallel(return_as="generator_unordered")(calls)


@contextlib.contextmanager
def _dask_client(scheduler: str, jobs: int = 1):
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
        client = Client(scheduler, timeout=f"{CONNECT_TIMEOUT}s")
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
