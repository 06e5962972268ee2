"""The rules a chapter's page follows, checked on the notebook's source.

A chapter is read on the page, so its source keeps to a few rules that the
tests check without executing it (the browser test checks the built pages):

* a markdown cell holds at most :data:`MAX_WORDS` words;
* a code cell the page shows has lines under :data:`MAX_LINE` characters;
* ``record(...)`` and ``record_all(...)``, the plumbing that hands numbers to
  the page and the tests, live in cells tagged ``remove-cell``;
* a cell that draws a figure (:data:`DRAWS`) carries a figure name
  (``fig-<chapter>-<what>``), a caption and alt text that says what the
  figure shows (not a file name) in its ``mystnb`` metadata, and a markdown
  cell after it refers to the figure with ``{numref}``;
* every cell has an id (nbformat 4.5's format, which nbformat will enforce).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import nbformat

from .upkeep import HIDE_TAG

MAX_WORDS = 250
MAX_LINE = 80

DRAWS = re.compile(r"\b(?:plots|diagrams)\.(?!set_style\b)[a-z_]+\(|\bplt\.(?!close\b|rcParams\b)\w+\("
                   r"|\bsns\.(?!set\w*\b)\w+\(|\.plot\(")
"""A call that draws a figure: a plots or diagrams function (not set_style), pyplot (not close),
seaborn (not its settings), or a DataFrame's ``.plot(``."""

_RECORD = re.compile(r"^\s*record(_all)?\(", re.MULTILINE)
_FILE_NAME = re.compile(r"\.(png|svg|jpe?g|gif)$|^[0-9a-f]{16,}", re.IGNORECASE)


def looks_like_file_name(text: str) -> bool:
    """Whether an alt text is a file name (myst-nb's default is the image's hashed name), not a description."""
    return bool(_FILE_NAME.search(text.strip()))


def _notebook(notebook: str | Path | nbformat.NotebookNode) -> nbformat.NotebookNode:
    if isinstance(notebook, nbformat.NotebookNode):
        return notebook
    return nbformat.read(str(notebook), as_version=4)


def drawing_cells(notebook: str | Path | nbformat.NotebookNode) -> list[tuple[int, nbformat.NotebookNode]]:
    """``(index, cell)`` of each code cell that draws a figure the page shows."""
    nb = _notebook(notebook)
    return [(i, cell) for i, cell in enumerate(nb.cells)
            if cell.cell_type == "code" and DRAWS.search(cell.source)
            and not {"remove-output", HIDE_TAG} & set(cell.metadata.get("tags", []))]


def figure_problems(cell: nbformat.NotebookNode) -> list[str]:
    """What a drawing cell's metadata lacks: a figure name, a caption, alt text that is not a file name."""
    mystnb = cell.metadata.get("mystnb", {})
    figure, image = mystnb.get("figure", {}), mystnb.get("image", {})
    problems = []
    if not str(figure.get("name", "")).startswith("fig-"):
        problems.append("no figure name fig-<chapter>-<what>")
    if not str(figure.get("caption", "")).strip():
        problems.append("no caption")
    alt = str(image.get("alt", "")).strip()
    if not alt or looks_like_file_name(alt):
        problems.append("no alt text (or a file name)")
    return problems


def page_problems(notebook: str | Path | nbformat.NotebookNode) -> list[str]:
    """What breaks the page rules in a chapter's source; an empty list when nothing does.

    Args:
        notebook: the chapter notebook (or its path).

    Returns:
        One line per problem, naming the cell by its index.
    """
    # The file as written, read once: nbformat's reader fills in missing cell ids (with a warning on every
    # read, the book build's and the tests'), and says it will refuse such a notebook one day.
    if isinstance(notebook, nbformat.NotebookNode):
        nb = written = notebook
    else:
        text = Path(notebook).read_text()
        written, nb = json.loads(text), nbformat.reads(text, as_version=4)
    problems = [f"cell {i}: no cell id (nbformat 4.5 needs one: save the notebook in Jupyter, or "
                f"nbformat.validator.normalize it)"
                for i, cell in enumerate(written["cells"])
                if (written["nbformat"], written["nbformat_minor"]) >= (4, 5) and "id" not in cell]
    for i, cell in enumerate(nb.cells):
        tags = cell.metadata.get("tags", [])
        if cell.cell_type == "markdown" and len(cell.source.split()) > MAX_WORDS:
            problems.append(f"cell {i}: {len(cell.source.split())} words in one markdown cell "
                            f"(at most {MAX_WORDS}: split it or cut it)")
        if cell.cell_type != "code":
            continue
        hidden = HIDE_TAG in tags
        if not hidden:
            problems += [f"cell {i}: a code line of {len(line)} characters (under {MAX_LINE})"
                         for line in cell.source.split("\n") if len(line) >= MAX_LINE]
            if _RECORD.search(cell.source):
                problems.append(f"cell {i}: record(...) in a visible cell (move it to a cell tagged {HIDE_TAG})")
    later_prose = {i: "\n".join(c.source for c in nb.cells[i + 1:] if c.cell_type == "markdown")
                   for i, _ in drawing_cells(nb)}
    for i, cell in drawing_cells(nb):
        problems += [f"cell {i}: {p}" for p in figure_problems(cell)]
        name = cell.metadata.get("mystnb", {}).get("figure", {}).get("name")
        if name and f"{{numref}}`{name}`" not in later_prose[i]:
            problems.append(f"cell {i}: no {{numref}}`{name}` in the prose after the figure")
    return problems


def figure_names(notebooks) -> list[str]:
    """The figure names of every drawing cell of the given notebooks, in order (repeats kept)."""
    return [cell.metadata["mystnb"]["figure"]["name"] for nb in notebooks for _, cell in drawing_cells(nb)
            if "name" in cell.metadata.get("mystnb", {}).get("figure", {})]


def repeated_figure_names(notebooks) -> list[str]:
    """Figure names used more than once (a page's {numref} would point at the wrong one)."""
    return [name for name, count in Counter(figure_names(notebooks)).items() if count > 1]
