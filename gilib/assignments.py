"""Student copies of the chapters: the exercises kept, every solution taken out.

Each chapter ends with exercises whose solutions sit in dropdown admonitions,

````markdown
```{admonition} Solution to 2
:class: dropdown

...
```
````

(an outer fence of four backticks or colons when the solution holds a code
block). :func:`strip_solutions` removes those blocks from every markdown
cell, and any cell tagged ``solution``, and clears the outputs; everything
else, the exercises included, stays as it is. ``make assignments`` writes
one student copy per chapter into ``_build/assignments/``, which is not
committed::

    python -m gilib.assignments --out _build/assignments
"""

from __future__ import annotations

import argparse
import copy
import re
from pathlib import Path

import nbformat

from .notebooks import chapter_notebooks

SOLUTION_TAG = "solution"
"""Cells with this tag are solutions as a whole (e.g. a worked code cell)."""

# The opening line of a solution: a fence of >= 3 backticks or colons, then
# an admonition (or dropdown) directive whose title starts with "Solution".
_OPEN = re.compile(r"^(?P<fence>`{3,}|:{3,})\{(?P<directive>admonition|dropdown)\}\s*Solution\b")


def _closes(line: str, fence: str) -> bool:
    """Whether ``line`` closes a block opened with ``fence`` (same character, at least as long)."""
    stripped = line.strip()
    return bool(stripped) and set(stripped) == {fence[0]} and len(stripped) >= len(fence)


def _solution_blocks(lines: list[str]) -> list[tuple[int, int]]:
    """``(first, last)`` line indices of each solution block; raises on an unclosed one."""
    blocks, i = [], 0
    while i < len(lines):
        match = _OPEN.match(lines[i])
        if not match:
            i += 1
            continue
        fence = match.group("fence")
        j = i + 1
        while j < len(lines) and not _closes(lines[j], fence):
            j += 1
        if j == len(lines):
            raise ValueError(f"Solution block opened with {fence!r} on line {i + 1} is never closed.")
        head = lines[i + 1 : j]
        # An admonition is a solution only when it is a dropdown; a dropdown directive always is.
        if match.group("directive") == "dropdown" or any(
            re.match(r"^:class:.*\bdropdown\b", line.strip()) for line in head
        ):
            blocks.append((i, j))
        i = j + 1
    return blocks


def strip_markdown(source: str) -> tuple[str, int]:
    """A markdown cell's text without its solution dropdowns.

    Returns:
        ``(text, removed)``: the text, with runs of blank lines left by a
        removed block collapsed to one, and how many blocks were removed.
    """
    lines = source.split("\n")
    blocks = _solution_blocks(lines)
    if not blocks:
        return source, 0
    keep = [True] * len(lines)
    for first, last in blocks:
        for k in range(first, last + 1):
            keep[k] = False
    text = "\n".join(line for line, k in zip(lines, keep) if k)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip("\n"), len(blocks)


def strip_solutions(nb: nbformat.NotebookNode) -> tuple[nbformat.NotebookNode, int]:
    """A student copy of a chapter notebook.

    Args:
        nb: the chapter (left unchanged).

    Returns:
        ``(copy, removed)``: the copy without solution dropdowns, without
        cells tagged :data:`SOLUTION_TAG` and without outputs; ``removed``
        counts the solutions taken out.
    """
    student = copy.deepcopy(nb)
    removed, cells = 0, []
    for cell in student.cells:
        if SOLUTION_TAG in cell.get("metadata", {}).get("tags", []):
            removed += 1
            continue
        if cell.cell_type == "markdown":
            cell.source, n = strip_markdown(cell.source)
            removed += n
        elif cell.cell_type == "code":
            cell.outputs = []
            cell.execution_count = None
        cells.append(cell)
    student.cells = cells
    student.metadata["gilib"] = {"assignment": True}
    return student, removed


def write_assignments(chapters: list[Path], out: str | Path) -> dict[str, int]:
    """Write a student copy of each chapter into ``out`` (created if needed).

    Returns:
        ``{file name: solutions removed}``.

    Raises:
        ValueError: a chapter has exercises but no solution to remove (a
            dropdown written some other way would leak into the copy).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    report = {}
    for path in chapters:
        nb = nbformat.read(str(path), as_version=4)
        student, removed = strip_solutions(nb)
        has_exercises = any(c.cell_type == "markdown" and "## Exercises" in c.source for c in nb.cells)
        if has_exercises and removed == 0:
            raise ValueError(f"{path.name} has exercises but no solution dropdown was found.")
        nbformat.validate(student)
        nbformat.write(student, str(out / path.name))
        report[path.name] = removed
    return report


def main(argv: list[str] | None = None) -> int:
    """``python -m gilib.assignments [--out DIR] [CHAPTER.ipynb ...]``."""
    parser = argparse.ArgumentParser(prog="python -m gilib.assignments",
                                     description="Write student copies of the chapters, without solutions.")
    parser.add_argument("chapters", nargs="*", type=Path, help="chapter notebooks (default: chapters/*.ipynb)")
    parser.add_argument("--out", type=Path, default=Path("_build") / "assignments")
    args = parser.parse_args(argv)
    report = write_assignments(args.chapters or chapter_notebooks(), args.out)
    for name, removed in report.items():
        print(f"{args.out / name}: {removed} solution(s) removed")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
