"""Helpers a chapter notebook needs around the science: fast mode and recorded values.

Every chapter has a papermill ``parameters`` cell. Its settings default to
``None`` and :func:`pick` resolves them after papermill has injected its own
values, so that ``papermill -p FAST_MODE False`` changes every setting that
was left at ``None``.

A chapter *records* the numbers it reports with :func:`record`. In the book
build they are glued into the page (``{glue:text}`` in markdown, through
myst-nb); the tests read them back from the executed notebook with
:func:`read_records` and check them.
"""

from __future__ import annotations

import ast
import os
from pathlib import Path
from typing import Any, TypeVar

import nbformat

FAST_MODE_ENV = "GILIB_FAST_MODE"
_RECORD_MIME = "application/papermill.record/text/plain"

T = TypeVar("T")


def fast_mode() -> bool:
    """Whether chapters run their cheap settings.

    ``$GILIB_FAST_MODE`` decides: anything but ``0`` (or unset) is fast mode,
    which is what the book build and the tests run.
    """
    return os.environ.get(FAST_MODE_ENV, "1").strip().lower() not in ("0", "false", "no")


def pick(value: T | None, fast: T, full: T, fast_mode: bool) -> T:
    """A chapter setting: ``value`` when given, else the fast or the full default."""
    if value is not None:
        return value
    return fast if fast_mode else full


def record(name: str, value: Any) -> None:
    """Record a value the chapter reports, for the page and for the tests.

    Args:
        name: a unique name within the chapter.
        value: a number, string, or a list / dict of them (stored by ``repr``).
    """
    try:
        from myst_nb import glue
    except ImportError:  # e.g. in Colab: nothing reads the records there
        return
    glue(name, _plain(value), display=False)


def _plain(value: Any) -> Any:
    """Python scalars in place of numpy / torch ones, so that ``repr`` round-trips."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "item") and getattr(value, "ndim", 0) == 0:
        return value.item()
    return value


def read_records(notebook: str | Path | nbformat.NotebookNode) -> dict[str, Any]:
    """The values an executed notebook recorded with :func:`record`.

    Args:
        notebook: path of an executed ``.ipynb``, or the notebook itself.

    Returns:
        ``{name: value}``, values parsed back from their ``repr``.
    """
    nb = notebook if isinstance(notebook, nbformat.NotebookNode) else nbformat.read(str(notebook), as_version=4)
    records: dict[str, Any] = {}
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            name = output.get("metadata", {}).get("scrapbook", {}).get("name")
            if name is None:
                continue
            text = output["data"][_RECORD_MIME]
            try:
                records[name] = ast.literal_eval(text)
            except (ValueError, SyntaxError):
                records[name] = text
    return records
