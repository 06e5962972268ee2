"""What a study is, and the one command line that runs any of them and prints its tables.

A :class:`Study` describes a measurement campaign once: how its command
line becomes a list of tasks (``plan``), the module-level function that
turns a task into result lines (``work``), the keys that make a run
resumable (``task_keys``, ``line_key``), what a progress line says
(``label``), and the tables it prints (:class:`Table`). Every study of the
book is one such description in its module (``STUDY``), run by the one
runner (:func:`gilib.studies.runner.run`) and driven by one command line of
one shape::

    python -m gilib.studies                                  # the studies
    python -m gilib.studies STUDY run [OPTIONS] --out FILE [--jobs N] [--scheduler ADDRESS]
    python -m gilib.studies STUDY TABLE FILE ... [OPTIONS]   # a table, in Markdown

:func:`main` builds that command line for a list of studies, and
:func:`main_for` for a single one (``python -m gilib.book.course`` uses it,
since the studies package never imports the book). :func:`markdown_table`
and :func:`mean_sd` format every table the README prints.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Hashable, Iterable, Sequence

import torch

from . import runner


@dataclass(frozen=True)
class Option:
    """One command-line argument: ``argparse``'s ``add_argument(*flags, **settings)``."""

    flags: tuple[str, ...]
    settings: dict = field(default_factory=dict)


def option(*flags: str, **settings: Any) -> Option:
    """An :class:`Option`, written as the ``add_argument`` call it stands for."""
    return Option(tuple(flags), settings)


@dataclass(frozen=True)
class Table:
    """A table a study prints from its results.

    Attributes:
        name: the command that prints it (``python -m gilib.studies STUDY NAME``).
        help: one line for ``--help``.
        show: the parsed arguments to the text printed (Markdown, or JSON).
        options: its arguments (the results files among them).
    """

    name: str
    help: str
    show: Callable[[argparse.Namespace], str]
    options: tuple[Option, ...] = ()


class Measurements:
    """A study's work when each task names its measurement: ``work(name, *arguments)``.

    ``Measurements(measure_a, measure_b)("measure_a", x, y)`` runs
    ``measure_a(x, y)`` on one torch thread, so that a task's lines do not
    depend on how many workers share the machine (nor does their round-off).
    The functions must be module-level (worker processes import them by
    name); the object pickles as the table of their names.
    """

    def __init__(self, *functions: Callable[..., list[dict]]) -> None:
        self.functions = {f.__name__: f for f in functions}

    def __call__(self, name: str, *arguments) -> list[dict]:
        if name not in self.functions:
            raise ValueError(f"Unknown measurement {name!r}: this study has {', '.join(self.functions)}.")
        torch.set_num_threads(1)
        return self.functions[name](*arguments)


@dataclass(frozen=True)
class Study:
    """A measurement campaign: its plan, its work, its keys and its tables.

    Attributes:
        name: the study's name on the command line.
        description: one line: what it measures and for which chapter.
        plan: the parsed ``run`` arguments to every task (the runner skips
            those already in the output); ``None`` for a study that only
            reads other studies' results.
        work: a module-level function (worker processes import it by name):
            ``work(*task)`` returns the task's result lines.
        task_keys: ``task_keys(*task)``: the keys of the lines a task writes.
        line_key: the key of a result line.
        label: the lines of a finished task to its progress line.
        run_options: the ``run`` command's own arguments (``--out``,
            ``--jobs`` and ``--scheduler`` are added for every study).
        tables: what the study prints.
        parallel: whether tasks may run side by side (``--jobs`` and
            ``--scheduler``); timing studies set it to ``False``.
    """

    name: str
    description: str
    plan: Callable[[argparse.Namespace], list] | None = None
    work: Callable[..., list[dict]] | None = None
    task_keys: Callable[..., Iterable[Hashable]] | None = None
    line_key: Callable[[dict], Hashable] | None = None
    label: Callable[[list[dict]], str] = lambda lines: f"{len(lines)} line(s)"
    run_options: tuple[Option, ...] = ()
    tables: tuple[Table, ...] = ()
    parallel: bool = True

    def run(self, out: str | Path, tasks: Sequence, *, jobs: int = 1, scheduler: str | None = None,
            limit: int | None = None, progress: bool = True) -> list[dict]:
        """Run (or resume) ``tasks`` into ``out`` (:func:`gilib.studies.runner.run`).

        Returns:
            Every line of ``out`` after the run, old and new.
        """
        if self.work is None:
            raise ValueError(f"The {self.name} study only reads other studies' results: it has nothing to run.")
        report = runner.print_progress(self.label) if progress else None
        return runner.run(out, tasks, self.work, task_keys=self.task_keys, line_key=self.line_key, jobs=jobs,
                          scheduler=scheduler, limit=limit, progress=report)


def _help(text: str | None) -> str | None:
    """A help text as argparse wants it: a literal ``%`` (as in "95 %") doubled, since argparse formats help."""
    return None if text is None else text.replace("%", "%%")


def _settings(settings: dict[str, Any]) -> dict[str, Any]:
    return {**settings, "help": _help(settings["help"])} if "help" in settings else settings


def _add_commands(parser: argparse.ArgumentParser, study: Study) -> None:
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    if study.plan is not None:
        run = commands.add_parser("run", help="run or resume the study", description=study.description)
        for o in study.run_options:
            run.add_argument(*o.flags, **_settings(o.settings))
        run.add_argument("--out", type=Path, required=True, help="results file (JSON lines)")
        if study.parallel:
            run.add_argument("--jobs", type=int, default=1, help="worker processes (or Dask workers with "
                                                                  "--scheduler local)")
            run.add_argument("--scheduler", default=None,
                             help="run on a Dask cluster: its scheduler's address (tcp://host:8786), or 'local' "
                                  "for a LocalCluster of --jobs workers on this machine")
    for table in study.tables:
        shown = commands.add_parser(table.name, help=_help(table.help), description=table.help)
        for o in table.options:
            shown.add_argument(*o.flags, **_settings(o.settings))


def _execute(study: Study, args: argparse.Namespace) -> None:
    if args.command == "run":
        study.run(args.out, study.plan(args), jobs=getattr(args, "jobs", 1),
                  scheduler=getattr(args, "scheduler", None))
        return
    (table,) = [t for t in study.tables if t.name == args.command]
    print(table.show(args))


def main(studies: Sequence[Study], argv: Sequence[str] | None = None, prog: str = "python -m gilib.studies") -> int:
    """The command line of several studies: ``PROG STUDY run|TABLE ...``; without a study, lists them."""
    parser = argparse.ArgumentParser(prog=prog, description="Run the book's studies and print their tables.")
    sub = parser.add_subparsers(dest="study", metavar="STUDY")
    by_name = {}
    for study in studies:
        by_name[study.name] = study
        _add_commands(sub.add_parser(study.name, help=_help(study.description), description=study.description), study)
    args = parser.parse_args(argv)
    if args.study is None:
        print(markdown_table(["study", "what it measures", "commands"],
                             [[s.name, s.description, ", ".join((["run"] if s.plan else []) +
                                                                [t.name for t in s.tables])] for s in studies]))
        return 0
    try:
        _execute(by_name[args.study], args)
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        parser.exit(2, f"error: {err}\n")
    return 0


def main_for(study: Study, argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """The command line of one study: ``PROG run|TABLE ...``."""
    parser = argparse.ArgumentParser(prog=prog, description=study.description)
    _add_commands(parser, study)
    args = parser.parse_args(argv)
    try:
        _execute(study, args)
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        parser.exit(2, f"error: {err}\n")
    return 0


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A Markdown table: one header row, then one row per sequence of (formatted) cells."""
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join("---" for _ in headers) + " |"]
    for row in rows:
        cells = [str(c) for c in row]
        if len(cells) != len(headers):
            raise ValueError(f"A row of {len(cells)} cells under {len(headers)} headers: {cells}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def frame_markdown(table) -> str:
    """A summary table (a DataFrame of formatted cells) as :func:`markdown_table` prints it."""
    return markdown_table(list(table.columns), table.itertuples(index=False))


def mean_sd(mean: float, sd: float) -> str:
    """``0.80 ± 0.19``: a mean and standard deviation as the tables print them."""
    return f"{mean:.2f} ± {sd:.2f}"
