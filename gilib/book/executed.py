"""Each chapter executed once per change, for the book and for the tests.

The book build and the chapter tests both need every chapter executed in
fast mode, and one execution costs 10 s to a minute on two cores. So the
tests read the book build's own executed notebooks when they are up to
date, and run a chapter themselves only when they are not:

* ``make book`` executes every chapter (jupyter-book writes each executed
  notebook into ``_build/jupyter_execute/``), then :func:`stamp` records,
  per chapter, a :func:`fingerprint` of everything the execution read (the
  notebook, the ``gilib`` package, the bundled and cached data, the book's
  configuration) and the mode it ran in;
* :func:`executed` returns a chapter's executed notebook: the book build's
  when its fingerprint is the sources' fingerprint now, it ran in fast mode
  and it holds no error; otherwise it executes the chapter once with
  papermill into ``_build/executed/`` and records that copy the same way.

So ``make book`` then ``make test`` (what CI runs) executes each chapter
once, ``make test`` alone executes each once, and a second ``make test``
none until a source changes. The manifest (``_build/executed/manifest.json``)
is a cache: deleting ``_build`` is always safe. Test workers that execute
different chapters at once update it under a file lock
(``manifest.json.lock``), so that neither loses the other's entry. Command line::

    python -m gilib.book.executed stamp     # after jupyter-book build (make book does it)
    python -m gilib.book.executed status    # which chapters have an up-to-date executed copy
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
from pathlib import Path

import nbformat
import papermill as pm

from ..data import environment, repo_root
from .build import thread_share
from .chapter import FAST_MODE_ENV, fast_mode
from .upkeep import chapter_notebooks, chapter_path

BUILD = Path("_build")
BOOK_COPIES = BUILD / "jupyter_execute" / "chapters"
"""Where jupyter-book writes the chapters it executed (relative to the repository)."""
OWN_COPIES = BUILD / "executed"
"""Where :func:`executed` writes the chapters it runs itself, and the manifest."""
INPUTS = ("gilib", "data", "_config.yml")
"""What an execution reads besides the chapter itself (folders are read whole)."""


def fingerprint(chapter: str | Path, root: str | Path | None = None) -> str:
    """A digest of everything a chapter's execution depends on: the notebook and :data:`INPUTS`.

    Python caches (``__pycache__``) are left out; any other change to a
    file, its name or its place changes the digest.
    """
    root = Path(root or repo_root())
    digest = hashlib.sha256()
    files = [chapter_path(chapter, root)]
    for name in INPUTS:
        path = root / name
        files += sorted(p for p in path.rglob("*") if p.is_file() and "__pycache__" not in p.parts) \
            if path.is_dir() else [path]
    for path in files:
        digest.update(str(path.relative_to(root)).encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest() if path.exists() else b"missing")
    return digest.hexdigest()


def stamp(root: str | Path | None = None) -> list[str]:
    """Record the book build's executed chapters in the manifest (``make book`` calls it).

    A chapter whose executed copy is missing or holds an error is left out.

    Returns:
        The chapters recorded.
    """
    root = Path(root or repo_root())
    mode = "fast" if fast_mode() else "full"
    entries = {}
    for chapter in chapter_notebooks(root):
        copy = root / BOOK_COPIES / chapter.name
        if copy.is_file() and not _errors(copy):
            entries[chapter.stem] = _entry(chapter, copy, root, mode, "book build")
    _update_manifest(root, entries)
    return list(entries)


def executed(chapter: str | Path, root: str | Path | None = None, *, processes: int = 1) -> Path:
    """The chapter executed in fast mode on the sources as they are: a notebook with its outputs.

    Args:
        chapter: a chapter's name (``"05_span_check"``, with or without
            ``.ipynb``) or path.
        root: the book's root folder (default: the one that holds gilib).
        processes: how many processes share the cores while it runs (the
            test workers): a papermill run's kernel gets its share of them
            (:func:`gilib.book.build.thread_share`), as a book build's do.

    Returns:
        The executed notebook: the book build's copy when it is up to
        date, else a fresh papermill execution's (which later calls reuse).

    Raises:
        papermill.PapermillExecutionError: if a cell fails.
        ValueError: for an unknown chapter.
    """
    root = Path(root or repo_root())
    path = chapter_path(chapter, root)
    entry = _manifest(root).get(path.stem)
    if entry is not None and _fresh(entry, path, root):
        return root / entry["copy"]
    out = root / OWN_COPIES / path.name
    out.parent.mkdir(parents=True, exist_ok=True)
    execute_chapter(path, out, fast=True, processes=processes)
    _update_manifest(root, {path.stem: _entry(path, out, root, "fast", "papermill")})
    return out


def execute_chapter(path: Path, out: Path, *, fast: bool, processes: int = 1) -> None:
    """Execute a chapter with papermill into ``out``, in fast mode or with the full settings.

    ``FAST_MODE`` is passed as the parameter and ``$GILIB_FAST_MODE`` set to
    match for the run (and restored after), as the book build does. With
    ``processes`` > 1 the kernel's torch threads are its share of the
    cores (:func:`gilib.book.build.thread_share`), set the same way: on
    every core beside other busy processes (the other test workers), its
    threads would wait on one another and the execution take several times
    as long.

    Raises:
        papermill.PapermillExecutionError: if a cell fails.
    """
    values = {FAST_MODE_ENV: "1" if fast else "0"}
    if processes > 1:
        values.update(thread_share(processes))
    with environment(values):
        pm.execute_notebook(str(path), str(out), parameters={"FAST_MODE": fast}, cwd=str(path.parent),
                            kernel_name="python3", progress_bar=False)


def status(root: str | Path | None = None) -> dict[str, str]:
    """Per chapter: where its up-to-date executed copy comes from, or ``"stale"`` / ``"none"``."""
    root = Path(root or repo_root())
    manifest = _manifest(root)
    result = {}
    for chapter in chapter_notebooks(root):
        entry = manifest.get(chapter.stem)
        result[chapter.stem] = "none" if entry is None else (entry["made_by"] if _fresh(entry, chapter, root)
                                                             else "stale")
    return result


def _entry(chapter: Path, copy: Path, root: Path, mode: str, made_by: str) -> dict:
    return {"fingerprint": fingerprint(chapter, root), "mode": mode, "copy": str(copy.relative_to(root)),
            "copy_sha256": hashlib.sha256(copy.read_bytes()).hexdigest(), "made_by": made_by}


def _fresh(entry: dict, chapter: Path, root: Path) -> bool:
    """Whether a manifest entry still describes a good fast-mode execution of the sources as they are."""
    copy = root / entry["copy"]
    return (entry.get("mode") == "fast" and copy.is_file()
            and entry.get("copy_sha256") == hashlib.sha256(copy.read_bytes()).hexdigest()
            and entry.get("fingerprint") == fingerprint(chapter, root) and not _errors(copy))


def _errors(copy: Path) -> bool:
    nb = nbformat.read(str(copy), as_version=4)
    return any(out.get("output_type") == "error" for cell in nb.cells for out in cell.get("outputs", []))


def _manifest(root: Path) -> dict:
    path = root / OWN_COPIES / "manifest.json"
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}  # a damaged cache is an empty one


def _update_manifest(root: Path, entries: dict) -> None:
    """Add ``entries`` (chapter -> entry) to the manifest: read, changed and written under its lock.

    Two test workers may each execute a chapter at once; without the lock
    both read the old manifest and the later write drops the other's entry.
    The new manifest goes to a temporary file first and replaces the old
    one in a single rename, so that a reader never sees half of it.
    """
    path = root / OWN_COPIES / "manifest.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    with _locked(path.with_name(path.name + ".lock")):
        manifest = {**_manifest(root), **entries}
        temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        temporary.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        temporary.replace(path)


@contextlib.contextmanager
def _locked(lock: Path):
    """Hold an exclusive advisory lock on the file ``lock`` (created if absent) for the ``with`` block."""
    with open(lock, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def main(argv: list[str] | None = None) -> int:
    """``python -m gilib.book.executed stamp | status``."""
    parser = argparse.ArgumentParser(prog="python -m gilib.book.executed", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("stamp", help="record the book build's executed chapters (after jupyter-book build)")
    sub.add_parser("status", help="which chapters have an up-to-date executed copy, and from where")
    args = parser.parse_args(argv)
    if args.command == "stamp":
        recorded = stamp()
        print(f"recorded {len(recorded)} executed chapter(s) of the book build: {', '.join(recorded) or 'none'}")
    else:
        for chapter, where in status().items():
            print(f"{chapter}: {where}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
