"""``make book``: jupyter-book's build, with the pages executed on every core.

jupyter-book 1.x executes the pages one after another while Sphinx reads
them, so on two cores one core sits idle for the whole execution, which is
most of the build. Sphinx can read pages in parallel processes, but
jupyter-book's command line does not pass Sphinx's ``-j``, Sphinx reads a
parallel build in a few large chunks of pages in name order (which here
would put all seven chapters in one chunk), and it reads serially if any
extension does not say it is safe to read in parallel. This wrapper runs
jupyter-book's own ``build`` command with all three changed:

* Sphinx reads with one process per core (:func:`jobs`);
* every page is its own chunk, the executed notebooks (the long ones)
  first, so that each process takes the next page as soon as it is free;
* two extensions that do not say whether they are safe for a parallel
  read (Sphinx then reads serially, and warns, which ``-W`` makes an
  error) say that they are (:func:`_declare_parallel_safe`): both act
  only in the main process. (jupyter-book's LaTeX extension, the third
  that says nothing, is off in ``_config.yml``: the book is HTML.)

Each page's kernel then runs torch on ``cores / jobs`` threads (one, on two
cores) instead of on every core, so that the processes do not fight over
the cores (:func:`thread_share`: ``OMP_NUM_THREADS`` and
``MKL_NUM_THREADS``, unless the caller set them).

Command line (what ``make book`` runs)::

    python -m gilib.book.build [JUPYTER-BOOK BUILD OPTIONS]

e.g. ``python -m gilib.book.build . --all -W -n --keep-going``; the
options are jupyter-book's own (``jupyter-book build --help``).
``GILIB_BOOK_JOBS`` sets the number of processes (1: jupyter-book's serial
build).
"""

from __future__ import annotations

import functools
import importlib
import os
import sys
from pathlib import Path
from typing import Sequence

import sphinx.builders
from jupyter_book import sphinx as jb_sphinx
from jupyter_book.cli.main import main as jupyter_book

JOBS_ENV = "GILIB_BOOK_JOBS"


def jobs(environ: dict | None = None, cores: int | None = None) -> int:
    """How many processes read (and execute) the pages: :data:`JOBS_ENV`, else one per core.

    Raises:
        ValueError: if :data:`JOBS_ENV` is not a whole number of at least 1.
    """
    environ = os.environ if environ is None else environ
    value = environ.get(JOBS_ENV, "").strip()
    if not value:
        return max(1, cores if cores is not None else (os.cpu_count() or 1))
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"{JOBS_ENV}={value!r}: give a whole number of processes, at least 1 "
                         f"(1 builds the book one page after another).")
    return int(value)


def thread_share(processes: int, environ: dict | None = None, cores: int | None = None) -> dict[str, str]:
    """The thread settings for one of ``processes`` processes that share the cores.

    ``OMP_NUM_THREADS`` and ``MKL_NUM_THREADS`` (the threads torch runs
    on) each get ``cores // processes`` (at least 1), unless the caller set
    it: a caller's ``OMP_NUM_THREADS`` then stands for an unset
    ``MKL_NUM_THREADS`` too. The book build's kernels
    and :func:`gilib.book.assignments.grade`'s ``otter run`` take these.

    Returns:
        ``{"OMP_NUM_THREADS": ..., "MKL_NUM_THREADS": ...}``.
    """
    environ = os.environ if environ is None else environ
    share = str(max(1, (cores if cores is not None else (os.cpu_count() or 1)) // max(1, processes)))
    omp = environ.get("OMP_NUM_THREADS", "").strip() or share
    return {"OMP_NUM_THREADS": omp, "MKL_NUM_THREADS": environ.get("MKL_NUM_THREADS", "").strip() or omp}


def page_order(docnames: Sequence[str], source: Path) -> list[str]:
    """The order to execute the pages in: the notebooks first (in name order), then the Markdown pages.

    A notebook chapter executes for tens of seconds, a Markdown page for a
    few, so the long ones go first and the short ones fill in at the end.
    """
    notebook = [(source / f"{name}.ipynb").is_file() for name in docnames]
    return [n for n, nb in zip(docnames, notebook) if nb] + [n for n, nb in zip(docnames, notebook) if not nb]


def page_chunks(docnames: Sequence[str], source: Path, nproc: int) -> list[list[str]]:
    """One chunk per page for Sphinx's parallel read, so that the pages start in :func:`page_order`.

    Sphinx (7.4, ``sphinx.util.parallel.ParallelTasks``) starts the first
    ``nproc`` chunks at once and then, each time a process is free, the
    chunk added *last* of those still waiting (``dict.popitem``): so the
    waiting chunks are handed over in reverse.
    """
    order = page_order(docnames, source)
    return [[name] for name in order[:nproc] + order[nproc:][::-1]]


PARALLEL_SAFE = (
    # Its setup only replaces TocTreeCollector.assign_section_numbers, which
    # Sphinx calls once, in the main process, after every page is read and
    # merged; nothing is kept per page (forked readers inherit the change).
    "sphinx_multitoc_numbering",
    # Its setup sets mathjax_path and, on build-finished (main process),
    # copies MathJax into _static.
    "sphinx-mathjax-offline",
)
"""The extensions :func:`_declare_parallel_safe` declares safe for a parallel read and write."""


def _declare_parallel_safe() -> None:
    """Make each :data:`PARALLEL_SAFE` extension's ``setup`` say that it is safe for a parallel read and write."""
    for module_name in PARALLEL_SAFE:
        module = importlib.import_module(module_name)
        own = module.setup
        if getattr(own, "declared_parallel_safe", False):
            continue

        def setup(app, own=own):
            own(app)
            return {"parallel_read_safe": True, "parallel_write_safe": True}

        setup.declared_parallel_safe = True
        module.setup = setup


def main(argv: Sequence[str] | None = None) -> None:
    """Run ``jupyter-book build`` with ``argv`` (its options), on :func:`jobs` processes."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        processes = jobs()
    except ValueError as err:
        sys.exit(f"gilib.book.build: {err}")
    if processes > 1:
        # Each kernel on its share of the cores (set before any kernel starts).
        os.environ.update(thread_share(processes))
        source = Path(next((a for a in args if not a.startswith("-")), "."))
        # Sphinx chunks the pages to read in name order, a few large chunks;
        # one page per chunk instead (the write phase gets the same).
        sphinx.builders.make_chunks = lambda docnames, nproc, maxbatch=10: page_chunks(docnames, source, nproc)
        _declare_parallel_safe()
        jb_sphinx.build_sphinx = functools.partial(jb_sphinx.build_sphinx, jobs=processes)
    jupyter_book(["build", *args], prog_name="jupyter-book")


if __name__ == "__main__":
    main()
