"""The book in a course: what each chapter asks of a student and how long it runs.

An instructor planning a course needs, per chapter, the graded questions and
essays of its assignment (:mod:`gilib.book.assignments`) and the time the chapter
takes to execute, in fast mode (the book build, the tests, ``otter run``
grading a submission) and with the full settings. :func:`run` measures the
time: each chapter is executed with papermill in a fresh kernel, in the mode
asked for, and one JSON line per (chapter, mode) is kept through the book's
one runner (:data:`STUDY`, a :class:`~gilib.studies.study.Study` with the
command line of every study), stamped with the commit::

    python -m gilib.book.course run --modes fast --out data/results/chapter_times.jsonl
    python -m gilib.book.course run --modes full --chapters 05_span_check --out ...
    python -m gilib.book.course table data/results/chapter_times.jsonl
    python -m gilib.book.course workload data/results/chapter_times.jsonl

:func:`workload` turns the table into a student's time per assignment: the
chapter's measured fast-mode run time, times the runs a student makes
(:data:`RUNS`), plus a working time per question set by its difficulty
(:data:`WORK_MINUTES`, a planning figure, not a measurement).

A time is the machine's wall clock for the whole notebook (model loading
included), so it is a figure for that machine, never a test; the line
records the CPU count and torch's thread count with it.
"""

from __future__ import annotations

import os
import platform
import tempfile
import time
from pathlib import Path

import nbformat
import pandas as pd
import torch

from ..studies.store import read_lines
from ..studies.study import Study, Table, main_for, option
from .assignments import parse_questions
from .executed import execute_chapter
from .upkeep import chapter_notebooks, chapter_path

MODES = ("fast", "full")

WORK_MINUTES = {1: 10, 2: 25, 3: 45}
"""Planning minutes a student spends on a question of 1, 2 or 3 stars (★ warm-up, ★★ core,
★★★ stretch), running included only as far as the question's own cells; a question whose
prompt gives no stars counts as ★★."""
RUNS = 3
"""Times a student executes a whole chapter: reading it, working the exercises, before handing in."""


def time_chapter(chapter: str, mode: str) -> list[dict]:
    """Execute one chapter in ``mode`` and time it (the runner's work function).

    Args:
        chapter: a chapter's file name without ``.ipynb``.
        mode: ``"fast"`` or ``"full"`` (``FAST_MODE`` passed to papermill and
            ``$GILIB_FAST_MODE`` set to match).

    Returns:
        One line: chapter, mode, seconds, cpus, threads, machine.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}; got {mode!r}.")
    path = chapter_path(chapter)
    with tempfile.TemporaryDirectory(prefix="gilib-time-") as tmp:
        start = time.perf_counter()
        execute_chapter(path, Path(tmp) / path.name, fast=mode == "fast")
        seconds = time.perf_counter() - start
    return [{"chapter": chapter, "mode": mode, "seconds": round(seconds, 1), "cpus": os.cpu_count(),
             "threads": torch.get_num_threads(), "machine": platform.machine()}]


def run(out: str | Path, modes=("fast",), chapters: list[str] | None = None) -> list[dict]:
    """Time every chapter in every mode not yet in ``out`` (one at a time: times must not compete)."""
    return STUDY.run(out, tasks(modes, chapters))


def tasks(modes=("fast",), chapters: list[str] | None = None) -> list[tuple[str, str]]:
    """``(chapter, mode)`` for every chapter and mode, the chapters checked first."""
    chapters = chapters or [p.stem for p in chapter_notebooks()]
    for chapter in chapters:
        chapter_path(chapter)
    return [(c, m) for m in modes for c in chapters]


def questions_table() -> pd.DataFrame:
    """Per chapter: its otter-graded questions, essays and points."""
    rows = []
    for path in chapter_notebooks():
        questions = parse_questions(nbformat.read(str(path), as_version=4))
        graded = [q for q in questions if not q.manual]
        points = sum(q.points for q in questions)
        stars = [sum(1 for q in questions if (q.difficulty or 2) == d) for d in (1, 2, 3)]
        rows.append({"chapter": path.stem, "graded": len(graded), "essays": len(questions) - len(graded),
                     "points": int(points) if float(points).is_integer() else points,
                     "★ / ★★ / ★★★": " / ".join(map(str, stars)),
                     "work (min)": sum(WORK_MINUTES[q.difficulty or 2] for q in questions)})
    return pd.DataFrame(rows)


def table(path: str | Path) -> pd.DataFrame:
    """The course table: questions per chapter and the measured run time in each mode.

    Fast mode in seconds (``fast (s)``), the full settings in minutes
    (``full (min)``). A mode not measured for a chapter is missing (NaN),
    never guessed.
    """
    lines = read_lines(path)
    times = pd.DataFrame(lines, columns=["chapter", "mode", "seconds"])
    seconds = times.pivot_table(index="chapter", columns="mode", values="seconds", aggfunc="last")
    seconds = seconds.reindex(columns=list(MODES))
    measured = pd.DataFrame({"fast (s)": seconds["fast"], "full (min)": seconds["full"] / 60})
    return questions_table().merge(measured.reset_index(), on="chapter", how="left")


def workload(path: str | Path) -> pd.DataFrame:
    """A student's time per assignment: the chapter run :data:`RUNS` times in fast mode plus the questions' work.

    Returns:
        One row per chapter: ``questions``, ``★ / ★★ / ★★★`` (questions per
        difficulty), ``runs (min)`` (RUNS x the measured fast-mode time),
        ``work (min)`` (:data:`WORK_MINUTES` summed over the questions) and
        ``total (h)``. A chapter without a measured fast-mode time is missing
        (NaN), never guessed.
    """
    course = table(path)
    runs = RUNS * course["fast (s)"] / 60
    return pd.DataFrame({
        "chapter": course["chapter"], "questions": course["graded"] + course["essays"],
        "★ / ★★ / ★★★": course["★ / ★★ / ★★★"], "runs (min)": runs,
        "work (min)": course["work (min)"], "total (h)": (runs + course["work (min)"]) / 60})


STUDY = Study(
    name="course",
    description="run times of every chapter in fast and full mode, for the course table",
    plan=lambda args: tasks(args.modes, args.chapters),
    work=time_chapter,
    task_keys=lambda chapter, mode: [(chapter, mode)],
    line_key=lambda line: (line["chapter"], line["mode"]),
    label=lambda lines: f"{lines[0]['chapter']} ({lines[0]['mode']}): {lines[0]['seconds']} s",
    run_options=(option("--modes", nargs="+", choices=MODES, default=["fast"]),
                 option("--chapters", nargs="+", help="chapter names without .ipynb (default: all)")),
    tables=(Table("table", "the course table: questions per chapter and run times",
                  lambda args: table(args.results).round(1).to_string(index=False),
                  (option("results", type=Path, help="the times (data/results/chapter_times.jsonl)"),)),
            Table("workload", "a student's time per assignment: runs plus work per question",
                  lambda args: workload(args.results).round(1).to_string(index=False),
                  (option("results", type=Path, help="the times (data/results/chapter_times.jsonl)"),)),),
    parallel=False,
)
"""Chapter run times as a study; its command line is every study's (``python -m gilib.book.course``)."""


def main(argv: list[str] | None = None) -> int:
    """``python -m gilib.book.course run [--modes fast full] [--chapters ...] --out FILE`` or ``table FILE``."""
    return main_for(STUDY, argv, prog="python -m gilib.book.course")


if __name__ == "__main__":
    raise SystemExit(main())
