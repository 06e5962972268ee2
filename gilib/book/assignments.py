"""Graded assignments from the chapters: student notebooks, autograders, instructor notes.

Every chapter's exercises are `otter-grader <https://otter-grader.readthedocs.io>`_
questions written in the chapter notebook itself (Otter Assign's notebook
format), so one source gives the book page, the student copy and the
autograder. A question is a run of cells::

    [raw]       # BEGIN QUESTION        name: q1, points: 2 (manual: true for an essay)
    [markdown]  **Exercise 1.** (★★, predict) ...
                                        the prompt, which names the variables to set
    [raw]       # BEGIN SOLUTION
    [code]      worked answer           tag hide-input; lines ending "# SOLUTION"
                                        (or "# BEGIN/END SOLUTION" blocks) become "..."
    [markdown]  Solution to 1           a dropdown admonition: the explanation
    [raw]       # END SOLUTION
    [raw]       # BEGIN TESTS
    [code]      public test             tag remove-cell; asserts only, no output
    [code]      # HIDDEN + test         tag remove-cell; only in the autograder
    [raw]       # END TESTS
    [raw]       # END QUESTION

The prompt opens with its number, then in brackets a difficulty (★ warm-up,
★★ core, ★★★ stretch) and one kind (:data:`KINDS`): *predict* (the
student commits to a guess before the cell that reveals the answer runs),
*compute*, *explain* (a short answer graded by hand) or *choose* (multiple
choice, the letter set in a variable). An essay question (``manual:
true``) has no code and no tests: its solution is the dropdown alone,
ending in a rubric (``**Rubric (N points).**`` and one bullet per point),
and it is graded by hand. The book does not render raw
cells, hides the tests (``remove-cell``) and folds the worked answers
(``hide-input``), so a reader sees the prompt, the answer's output and the
explanation in its dropdown; the tests run on every execution of the
chapter, so a solution that stops passing them fails the chapter's tests.

``make assignments`` (which installs otter-grader, an optional dependency:
``pip install -e .[assignments]``) writes, per chapter, outside the book's
source tree::

    _build/assignments/<chapter>/student/<chapter>.ipynb     hand this out,
    _build/assignments/<chapter>/student/tests/              with its public tests
    _build/assignments/<chapter>/autograder/<chapter>-autograder.zip
    _build/assignments/<chapter>/autograder/<chapter>.ipynb  the solutions: keep
    _build/assignments/<chapter>/README.md                   how to grade

and grades a folder of submissions with ``otter run`` (no Docker)::

    python -m gilib.book.assignments build --out _build/assignments
    python -m gilib.book.assignments grade AUTOGRADER.zip SUBMISSIONS/ --out RESULTS/ [--jobs 2]

Only :func:`build_assignment` and :func:`grade` need otter-grader; parsing
and checking the questions (:func:`parse_questions`,
:func:`question_problems`) do not.
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import nbformat
import yaml

from ..data import repo_root
from .upkeep import HIDE_TAG, INSTALL_TAG, chapter_notebooks, repository

OTTER_REQUIREMENT = "otter-grader[grading]==7.0.0"
"""The otter-grader the assignments are built and graded with (requirements-assignments.txt)."""

SOLUTION_TAG = "hide-input"
"""Tag of a worked answer's code cells: the book folds the code and shows its output."""

TEST_TAG = HIDE_TAG
"""Tag of a test cell: the book leaves it out (it still runs)."""

_BOUNDARY = re.compile(r"^#\s*(BEGIN|END)\s+(QUESTION|SOLUTION|TESTS|PROMPT)\b", re.IGNORECASE)
_HIDDEN = re.compile(r"^\s*#.*\bhidden\b", re.IGNORECASE)
_EXERCISE = re.compile(r"^\*\*Exercise (\d+)\.\*\*", re.MULTILINE)

KINDS = ("predict", "compute", "explain", "choose")
"""What a question asks of the student, named in its prompt."""
DIFFICULTIES = {1: "warm-up", 2: "core", 3: "stretch"}
"""The prompt's stars: their number and its meaning."""
_PROMPT = re.compile(r"^\*\*Exercise \d+\.\*\* \((★{1,3}), (" + "|".join(KINDS) + r")\) \S")
_RUBRIC = re.compile(r"^\*\*Rubric \((\d+(?:\.\d+)?) points?\)\.\*\*", re.MULTILINE)
_BULLET = re.compile(r"^\s*[*-] \S")


@dataclass
class Question:
    """One otter question of a chapter.

    Attributes:
        name: otter's name (``q1``, ``q2``, ...).
        number: the exercise's number in the chapter.
        difficulty: the prompt's stars (1 to 3; ``None`` when the prompt
            does not give them in the book's format).
        kind: the prompt's kind, one of :data:`KINDS` (``None`` likewise).
        manual: graded by hand (an essay).
        points: the question's points.
        prompt: the prompt's markdown.
        solution_code: the worked answer's code cells (sources).
        solution_markdown: the explanation's markdown cells (sources).
        public: public test cells (sources).
        hidden: hidden test cells (sources, ``# HIDDEN`` line included).
        cells: indices of every cell of the question in the notebook.
        answer_cells: indices of the worked answer's code cells.
        test_cells: indices of the test cells.
    """

    name: str
    number: int | None
    manual: bool
    points: float
    prompt: str
    difficulty: int | None = None
    kind: str | None = None
    solution_code: list[str] = field(default_factory=list)
    solution_markdown: list[str] = field(default_factory=list)
    public: list[str] = field(default_factory=list)
    hidden: list[str] = field(default_factory=list)
    cells: list[int] = field(default_factory=list)
    answer_cells: list[int] = field(default_factory=list)
    test_cells: list[int] = field(default_factory=list)


def _boundary(cell) -> tuple[str, str] | None:
    """``("BEGIN", "QUESTION")`` and the like for an otter boundary (raw) cell, else ``None``."""
    if cell.cell_type != "raw":
        return None
    match = _BOUNDARY.match(cell.source.strip())
    return (match.group(1).upper(), match.group(2).upper()) if match else None


def parse_questions(nb: nbformat.NotebookNode) -> list[Question]:
    """The otter questions of a chapter, in order.

    Raises:
        ValueError: a block is opened and not closed, closed without being
            opened, nested where otter does not allow it, or a question's
            configuration is not YAML with a ``name``.
    """
    questions: list[Question] = []
    current: Question | None = None
    block: str | None = None
    for i, cell in enumerate(nb.cells):
        bound = _boundary(cell)
        where = f"cell {i}"
        if bound == ("BEGIN", "QUESTION"):
            if current is not None:
                raise ValueError(f"{where}: BEGIN QUESTION inside question {current.name!r}")
            config = yaml.safe_load(cell.source.strip().split("\n", 1)[1] if "\n" in cell.source.strip() else "")
            if not isinstance(config, dict) or "name" not in config:
                raise ValueError(f"{where}: a question's configuration needs a name (YAML under BEGIN QUESTION)")
            current = Question(name=str(config["name"]), number=None, manual=bool(config.get("manual", False)),
                               points=float(config.get("points", 1)), prompt="", cells=[i])
            continue
        if current is None:
            if bound is not None:
                raise ValueError(f"{where}: {' '.join(bound)} outside a question")
            continue
        current.cells.append(i)
        if bound == ("END", "QUESTION"):
            if block is not None:
                raise ValueError(f"{where}: question {current.name!r} ends inside its {block} block")
            questions.append(current)
            current = None
        elif bound is not None and bound[0] == "BEGIN":
            if block is not None:
                raise ValueError(f"{where}: BEGIN {bound[1]} inside the {block} block of {current.name!r}")
            block = bound[1]
        elif bound is not None:
            if block != bound[1]:
                raise ValueError(f"{where}: END {bound[1]} without its BEGIN in {current.name!r}")
            block = None
        elif block == "SOLUTION":
            if cell.cell_type == "code":
                current.solution_code.append(cell.source)
                current.answer_cells.append(i)
            else:
                current.solution_markdown.append(cell.source)
        elif block == "TESTS":
            if cell.cell_type == "code":
                (current.hidden if _HIDDEN.match(cell.source.split("\n", 1)[0]) else current.public).append(
                    cell.source)
                current.test_cells.append(i)
        elif cell.cell_type == "markdown" and not current.prompt:
            current.prompt = cell.source
            number = _EXERCISE.search(cell.source)
            current.number = int(number.group(1)) if number else None
            marks = _PROMPT.match(cell.source.strip())
            if marks:
                current.difficulty, current.kind = len(marks.group(1)), marks.group(2)
    if current is not None:
        raise ValueError(f"question {current.name!r} is never closed (END QUESTION)")
    return questions


def _exercise_numbers(nb: nbformat.NotebookNode, questions: list[Question]) -> list[int]:
    """Numbers of the ``**Exercise N.**`` prompts that sit outside every question."""
    inside = {i for q in questions for i in q.cells}
    return [int(n) for i, c in enumerate(nb.cells)
            if c.cell_type == "markdown" and i not in inside for n in _EXERCISE.findall(c.source)]


def question_problems(nb: nbformat.NotebookNode, label: str = "chapter", formats: bool = True) -> list[str]:
    """What keeps a chapter's exercises from being a gradeable assignment; empty when nothing does.

    Every exercise (a markdown cell starting ``**Exercise N.**``) is a
    question, numbered 1, 2, ... and named ``qN``; a question graded by
    otter has a worked answer (code tagged :data:`SOLUTION_TAG`), an
    explanation, at least one public and one hidden test (tagged
    :data:`TEST_TAG`, each with an ``assert``); an essay (``manual: true``)
    has an explanation and neither code nor tests. With ``formats`` (the
    default), the book's conventions too (:func:`format_problems`): the
    prompt's difficulty and kind, and an essay's rubric.
    """
    try:
        questions = parse_questions(nb)
    except ValueError as error:
        return [f"{label}: {error}"]
    problems = []
    outside = _exercise_numbers(nb, questions)
    if outside:
        problems.append(f"{label}: exercises {outside} are not otter questions")
    if not questions:
        problems.append(f"{label}: no otter question")
    numbers = [q.number for q in questions]
    if numbers != list(range(1, len(questions) + 1)):
        problems.append(f"{label}: questions number the exercises {numbers}, expected 1..{len(questions)}")
    for q in questions:
        where = f"{label}, {q.name}"
        if q.number is not None and q.name != f"q{q.number}":
            problems.append(f"{where}: exercise {q.number} should be named q{q.number}")
        if not any("Solution to" in md for md in q.solution_markdown):
            problems.append(f"{where}: no 'Solution to {q.number}' explanation in the solution block")
        if q.manual:
            if q.solution_code or q.public or q.hidden:
                problems.append(f"{where}: an essay (manual) question has no code and no tests")
            continue
        if not q.solution_code:
            problems.append(f"{where}: no worked answer (code) in the solution block")
        if not q.public or not q.hidden:
            problems.append(f"{where}: {len(q.public)} public and {len(q.hidden)} hidden tests; "
                            "it needs at least one of each")
        for source in q.public + q.hidden:
            if "assert" not in source:
                problems.append(f"{where}: a test without an assert checks nothing: {source[:60]!r}")
    for q in questions:
        for kind, tag, indices in (("test", TEST_TAG, q.test_cells),
                                   ("worked-answer", SOLUTION_TAG, q.answer_cells)):
            for i in indices:
                if tag not in nb.cells[i].metadata.get("tags", []):
                    problems.append(f"{label}: {kind} cell {i} lacks the tag {tag!r}")
    if formats:
        problems += format_problems(questions, label)
    return problems


def format_problems(questions: list[Question], label: str = "chapter") -> list[str]:
    """Where questions break the book's exercise conventions; empty when none does.

    A prompt opens ``**Exercise N.** (★★, predict) ...``: one to three stars
    (:data:`DIFFICULTIES`) and a kind of :data:`KINDS`. An essay
    (``manual: true``) ends its explanation with ``**Rubric (N points).**``,
    where N is the question's points, and one bullet per point.
    """
    problems = []
    for q in questions:
        where = f"{label}, {q.name}"
        if q.difficulty is None:
            problems.append(f"{where}: the prompt should open '**Exercise {q.number}.** (★★, predict) ...': "
                            f"1-3 stars and one of {', '.join(KINDS)}; it opens {q.prompt.strip()[:50]!r}")
        if not q.manual:
            continue
        rubric = [(md, m) for md in q.solution_markdown for m in [_RUBRIC.search(md)] if m]
        if not rubric:
            problems.append(f"{where}: an essay question's solution needs a '**Rubric (N points).**' line "
                            "and one bullet per point")
            continue
        md, match = rubric[0]
        points = float(match.group(1))
        if points != q.points:
            problems.append(f"{where}: the rubric gives {points:g} points, the question {q.points:g}")
        bullets = [line for line in md[match.end():].splitlines() if _BULLET.match(line)]
        if len(bullets) != round(points):
            problems.append(f"{where}: the rubric has {len(bullets)} bullet(s) for {points:g} points")
    return problems


# --- building the assignment (needs otter-grader) -----------------------------------------------


def _otter() -> list[str]:
    """The command that runs otter-grader with this interpreter, or a clear error without it."""
    try:
        import otter  # noqa: F401
    except ImportError:
        raise RuntimeError(
            "otter-grader is not installed. `make assignments` installs it; by hand: "
            f"pip install '{OTTER_REQUIREMENT}' (or pip install -e '.[assignments]')."
        ) from None
    return [sys.executable, "-m", "otter"]


def autograder_requirements(root: Path) -> str:
    """The grading environment of the autograder zip (Gradescope builds it with pip).

    The book's pinned requirements, then gilib itself installed in editable
    mode from a clone of the book's repository (the chapters read the
    bundled data and cached results from the clone), as Colab does.
    """
    url, branch = repository(root)
    pins = [line for line in (root / "requirements.txt").read_text().splitlines()
            if line.strip() and not line.lstrip().startswith("#")]
    return "\n".join(["torch==2.13.0", *pins, f"-e git+{url}@{branch}#egg=gilib", ""])


def assignment_config(name: str) -> dict:
    """Otter Assign's settings for a chapter (the notebook's ``# ASSIGNMENT CONFIG`` cell)."""
    return {
        "name": name,
        "requirements": "requirements.txt",
        "python_version": "3.11",
        "init_cell": True,
        "check_all_cell": False,
        "export_cell": False,
        # Our own tests grade the solution notebook (tests/book/test_grading.py);
        # otter's check would execute every chapter once more.
        "run_tests": False,
        "solutions_pdf": False,
        "generate": True,
        # Public tests as files beside the student notebook: grader.check
        # reads them there, in Jupyter and (uploaded) in Colab.
        "tests": {"files": True},
    }


def master_notebook(nb: nbformat.NotebookNode, name: str) -> nbformat.NotebookNode:
    """A chapter as Otter Assign's master notebook: its config cell first, no outputs."""
    master = copy.deepcopy(nb)
    for cell in master.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    config = yaml.safe_dump(assignment_config(name), sort_keys=False).strip()
    master.cells.insert(0, nbformat.v4.new_raw_cell(f"# ASSIGNMENT CONFIG\n{config}"))
    return master


def _otter_init_source(name: str) -> str:
    """The student notebook's otter cell: in Colab it installs otter-grader first."""
    return textwrap.dedent(f"""\
        # Otter's checks: grader.check("q1") runs a question's public tests
        # from the tests/ folder handed out with this notebook (in Colab:
        # upload that folder to /content/tests).
        import sys
        import subprocess

        if "google.colab" in sys.modules:
            subprocess.run([sys.executable, "-m", "pip", "install", "--quiet",
                            "{OTTER_REQUIREMENT}"], check=True)
            TESTS_DIR = "/content/tests"
        else:
            TESTS_DIR = "tests"

        import otter

        grader = otter.Notebook("{name}.ipynb", tests_dir=TESTS_DIR)""")


def _student_copy(nb: nbformat.NotebookNode, name: str) -> nbformat.NotebookNode:
    """Otter's student notebook, made to work where the chapters run.

    Otter puts its init cell first; in Colab ``import otter`` fails there, so
    the cell moves after the install cell and installs otter-grader itself.
    The book's ``hide-input`` tag means nothing to a student and goes, and
    so does a worked answer's cell the book removes (``remove-cell``: the
    record(...) plumbing of a solution), which would be an empty answer.
    """
    nb = copy.deepcopy(nb)
    init = next(i for i, c in enumerate(nb.cells)
                if c.cell_type == "code" and "otter.Notebook(" in c.source)
    cell = nb.cells.pop(init)
    cell.source = _otter_init_source(name)
    install = next((i for i, c in enumerate(nb.cells) if INSTALL_TAG in c.metadata.get("tags", [])), -1)
    nb.cells.insert(install + 1, cell)
    # A worked answer's book plumbing (record(...) calls in a cell the book
    # hides) would reach the student as an empty "..." cell: it goes.
    nb.cells = [c for c in nb.cells
                if not {"otter_answer_cell", TEST_TAG} <= set(c.metadata.get("tags", []))]
    for c in nb.cells:
        tags = [t for t in c.metadata.get("tags", []) if t != SOLUTION_TAG]
        if tags:
            c.metadata["tags"] = tags
        else:
            c.metadata.pop("tags", None)
    nb.metadata["gilib"] = {"assignment": name}
    return nb


def leaks(student_dir: Path, nb: nbformat.NotebookNode) -> list[str]:
    """What of the solutions or hidden tests is in a student folder; empty when nothing is.

    Looks in every file under ``student_dir`` for otter's solution markers,
    for the ``Solution to`` explanations, for each line a worked answer marks
    ``# SOLUTION`` or wraps in a ``# BEGIN SOLUTION`` block, and for each
    line of a hidden test, except lines the chapter also shows outside its
    solutions and hidden tests (``progress=False)`` is no secret).

    Args:
        student_dir: the folder handed out to students.
        nb: the chapter notebook it was built from.
    """
    text = "\n".join(p.read_text(errors="replace") for p in sorted(student_dir.rglob("*")) if p.is_file())
    questions = parse_questions(nb)
    question_cells = {i for q in questions for i in q.cells}
    shown = "\n".join(c.source for i, c in enumerate(nb.cells) if i not in question_cells)
    # Prompts, public tests and the unmarked lines of worked answers are
    # handed out by design.
    shown += "\n".join("\n".join([q.prompt, *q.public, *map(_unmarked, q.solution_code)]) for q in questions)
    found = []
    for marker in ("# SOLUTION", "BEGIN SOLUTION", "END SOLUTION", "Solution to ", "# HIDDEN"):
        if marker in text:
            found.append(f"marker {marker!r}")
    for q in questions:
        for line in _solution_lines(q) + _hidden_lines(q):
            if line in shown:
                continue
            if json.dumps(line)[1:-1] in text or line in text:
                found.append(f"{q.name}: {line!r}")
    return found


def syntax_errors(nb: nbformat.NotebookNode) -> list[str]:
    """Code cells of a notebook that are not valid Python (shell and magic lines aside)."""
    errors = []
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        source = "\n".join(line for line in cell.source.split("\n") if not line.lstrip().startswith(("!", "%")))
        try:
            compile(source, f"cell {i}", "exec")
        except SyntaxError as error:
            errors.append(f"cell {i}, line {error.lineno}: {error.msg}")
    return errors


def _answer_lines(source: str) -> list[tuple[str, bool]]:
    """A worked answer's lines, each with whether otter hides it, markers left out.

    Otter hides the lines between ``# BEGIN SOLUTION`` and ``# END
    SOLUTION`` and the lines ending ``# SOLUTION``.
    """
    lines, inside = [], False
    for line in source.split("\n"):
        s = line.strip()
        if s.endswith("# END SOLUTION"):
            inside = False
        elif re.match(r"#\s*BEGIN SOLUTION", s):
            inside = True
        else:
            lines.append((line, inside or s.endswith("# SOLUTION")))
    return lines


def _solution_lines(q: Question) -> list[str]:
    """The code lines otter removes from a worked answer (stripped, non-trivial)."""
    lines = []
    for source in q.solution_code:
        for line, hidden in _answer_lines(source):
            if not hidden:
                continue
            code = re.sub(r"#\s*SOLUTION$", "", line.strip()).strip()
            # The right-hand side of `x = value  # SOLUTION` is what otter hides.
            code = code.split("=", 1)[1].strip() if re.match(r"^[\w.\[\]'\", ]+=[^=]", code) else code
            if len(code) > 8:
                lines.append(code)
    return lines


def _unmarked(source: str) -> str:
    """The lines of a worked answer that otter leaves in the student copy."""
    return "\n".join(line for line, hidden in _answer_lines(source) if not hidden)


def _hidden_lines(q: Question) -> list[str]:
    return [line.strip() for source in q.hidden for line in source.split("\n")[1:]
            if len(line.strip()) > 8 and not line.strip().startswith("#")]


@dataclass
class Assignment:
    """What :func:`build_assignment` wrote for one chapter."""

    name: str
    folder: Path
    student: Path
    autograder_zip: Path
    solutions: Path
    questions: list[Question]


def build_assignment(chapter: str | Path, out: str | Path, root: str | Path | None = None) -> Assignment:
    """Write one chapter's student notebook, autograder zip and instructor README.

    Args:
        chapter: the chapter notebook.
        out: the folder that receives ``<chapter name>/``.
        root: the repository (default: the one gilib is installed from).

    Raises:
        ValueError: the chapter's questions are malformed (see
            :func:`question_problems`), or the student copy would contain a
            solution or a hidden test.
        RuntimeError: otter-grader is missing or ``otter assign`` failed.
    """
    root = Path(root or repo_root())
    chapter = Path(chapter)
    name = chapter.stem
    nb = nbformat.read(str(chapter), as_version=4)
    # Only what otter needs: the prompt format and rubrics are the book's
    # conventions, checked by the tests (tests/book/test_assignments.py).
    problems = question_problems(nb, chapter.name, formats=False)
    if problems:
        raise ValueError("\n".join(problems))
    questions = parse_questions(nb)
    otter = _otter()
    folder = Path(out) / name
    with tempfile.TemporaryDirectory(prefix="gilib-assign-") as tmp:
        tmp = Path(tmp)
        nbformat.write(master_notebook(nb, name), str(tmp / f"{name}.ipynb"))
        (tmp / "requirements.txt").write_text(autograder_requirements(root))
        done = subprocess.run([*otter, "assign", f"{name}.ipynb", "dist"], cwd=tmp,
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"otter assign failed on {chapter.name}:\n{done.stdout}\n{done.stderr}")
        zips = sorted((tmp / "dist" / "autograder").glob("*.zip"))
        if len(zips) != 1:
            raise RuntimeError(f"otter assign wrote {len(zips)} autograder zips for {chapter.name}")
        if folder.exists():
            shutil.rmtree(folder)
        (folder / "autograder").mkdir(parents=True)
        # Otter names the zip by the time it was built; a fixed name keeps
        # the README's commands right.
        autograder_zip = folder / "autograder" / f"{name}-autograder.zip"
        shutil.copy(zips[0], autograder_zip)
        solutions = folder / "autograder" / f"{name}.ipynb"
        shutil.copy(tmp / "dist" / "autograder" / f"{name}.ipynb", solutions)
        shutil.copytree(tmp / "dist" / "student", folder / "student")
    student = folder / "student" / f"{name}.ipynb"
    copy_ = _student_copy(nbformat.read(str(student), as_version=4), name)
    nbformat.validate(copy_)
    nbformat.write(copy_, str(student))
    leaked = leaks(folder / "student", nb)
    broken = syntax_errors(copy_)
    if leaked or broken:
        shutil.rmtree(folder)
        raise ValueError(f"the student copy of {chapter.name} " + "; ".join(
            [f"would show {item}" for item in leaked]
            + [f"is not Python in {item} (a multi-line answer needs a # BEGIN / # END SOLUTION block)"
               for item in broken]))
    assignment = Assignment(name, folder, student, autograder_zip, solutions, questions)
    (folder / "README.md").write_text(_instructor_readme(assignment))
    return assignment


def difficulty_text(q: Question) -> str:
    """The question's stars and their meaning, e.g. ``★★ core`` (empty when the prompt gives none)."""
    return f"{'★' * q.difficulty} {DIFFICULTIES[q.difficulty]}" if q.difficulty else ""


def _instructor_readme(a: Assignment) -> str:
    """The short README beside each chapter's assignment."""
    auto = [q for q in a.questions if not q.manual]
    manual = [q for q in a.questions if q.manual]
    rows = "\n".join(
        f"| {q.name} | {q.number} | {difficulty_text(q)} | {q.kind or ''} | "
        f"{'by hand' if q.manual else 'otter'} | {q.points:g} | "
        f"{'' if q.manual else f'{len(q.public)} public, {len(q.hidden)} hidden'} |" for q in a.questions)
    zip_ = f"autograder/{a.autograder_zip.name}"
    return f"""# Assignment: {a.name}

Built by `make assignments` from `chapters/{a.name}.ipynb`, the book's
chapter itself: the exercises are its otter-grader questions.

| question | exercise | difficulty | kind | graded | points | tests |
| --- | --- | --- | --- | --- | --- | --- |
{rows}

Difficulty: ★ warm-up, ★★ core, ★★★ stretch. Kind: *predict* (the student
commits to a guess before the cell that reveals the answer), *compute*,
*explain* (a short answer), *choose* (multiple choice). Essay questions
carry a rubric, one bullet per point, at the end of their worked answer in
`autograder/{a.name}.ipynb`.

{len(auto)} question(s) graded by otter ({sum(q.points for q in auto):g} points), {len(manual)} essay
question(s) graded by hand ({sum(q.points for q in manual):g} points).

## Hand out

`student/`: the notebook without solutions, and `tests/` with the public
tests that `grader.check("q1")` runs. Students work in Jupyter with gilib
installed (`make venv` in a clone of the book's repository, or `pip install
-e .` there), or in Colab: the notebook's first two cells install gilib
and otter-grader there, and the `tests/` folder goes to `/content/tests`.
Keep `autograder/` to yourself: `{a.name}.ipynb` there holds the solutions,
and the zip the hidden tests. Mind that the book is public: its page folds
the worked answers away but shows them on a click, and its repository holds
every test. The assignment checks a student's work; it cannot keep the
answers secret from a student who looks them up.

## Grade a folder of submissions (no Docker)

With this repository's environment and otter-grader (`make assignments`
installs it):

```bash
python -m gilib.book.assignments grade {zip_} submissions/ --out results/
```

runs `otter run -a {zip_} -o results/<student> <student>.ipynb` for every
notebook in `submissions/`, which executes the submission and then the
public and hidden tests, and writes `results/scores.csv` (points per
question, total). `--jobs 2` grades two submissions at once (no more than
your cores: each one executes the chapter). One submission by hand:

```bash
mkdir -p results/alice
otter run -a {zip_} -o results/alice submissions/alice.ipynb
```

`results/alice/results.json` lists every test case with its output. A
submission runs the whole chapter: in fast mode (the default,
`GILIB_FAST_MODE=1`) about as long as the chapter takes in the book's run
times. The essay questions are not in the score: read them in the notebook.

## Gradescope

Create a *Programming Assignment*, upload `{zip_}` under *Configure
Autograder* and let students submit their `.ipynb`. Gradescope builds the
grading image from the zip's `requirements.txt` (the book's pinned
packages and gilib from a clone of its repository, so the image needs the
internet while it is built) and runs the same tests; add the essay
questions as manually graded questions. This path is not exercised by the
book's tests: `otter run` above is.
"""


# --- grading ------------------------------------------------------------------------------------


def grade(autograder_zip: str | Path, submissions: str | Path, out: str | Path, jobs: int = 1) -> Path:
    """Grade every notebook in a folder with ``otter run``; write ``scores.csv``.

    Args:
        autograder_zip: a chapter's ``<chapter>-autograder.zip``.
        submissions: a folder of submitted ``.ipynb`` files (one per student).
        out: results: ``<student>/results.json`` and ``scores.csv``.
        jobs: submissions graded at once, each ``otter run`` with its share
            of the cores for torch's threads. Each one executes a chapter
            (a model in memory): more jobs than cores, or than the memory
            holds chapters, is slower, not faster.

    Returns:
        The path of ``scores.csv``: one row per submission, the points of
        every question and the total.

    Raises:
        FileNotFoundError: the zip or the folder is missing, or it holds no notebook.
        RuntimeError: otter-grader is missing.
        ValueError: ``jobs`` is not a whole number >= 1.
    """
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"jobs must be how many submissions to grade at once, a whole number >= 1, got {jobs!r}.")
    autograder_zip, submissions, out = Path(autograder_zip), Path(submissions), Path(out)
    if not autograder_zip.is_file():
        raise FileNotFoundError(f"No autograder zip at {autograder_zip}; `make assignments` writes them.")
    notebooks = sorted(submissions.glob("*.ipynb")) if submissions.is_dir() else []
    if not notebooks:
        raise FileNotFoundError(f"No .ipynb submission in {submissions}.")
    otter = _otter()
    env = None
    if jobs > 1:
        # Each job's kernel gets its share of the cores: torch on every core in each would oversubscribe them.
        from .build import thread_share  # the book build's rule; it brings jupyter-book, which only this needs
        env = {**os.environ, **thread_share(jobs)}

    def graded(nb: Path) -> dict:
        target = out / nb.stem
        target.mkdir(parents=True, exist_ok=True)
        done = subprocess.run([*otter, "run", "-a", str(autograder_zip.resolve()), "-o", str(target.resolve()),
                               str(nb.resolve())], capture_output=True, text=True, env=env)
        results = target / "results.json"
        row = {"submission": nb.name}
        if done.returncode != 0 or not results.is_file():
            row.update(total=0.0, error=(done.stderr or done.stdout).strip().splitlines()[-1:])
        else:
            scores = question_scores(json.loads(results.read_text()))
            row.update(scores, total=round(sum(scores.values()), 6))
        return row

    # Threads only wait on the otter processes; map keeps the submissions' order.
    with ThreadPoolExecutor(max_workers=min(jobs, len(notebooks))) as pool:
        rows = list(pool.map(graded, notebooks))
    columns = ["submission", *sorted({k for r in rows for k in r} - {"submission", "total", "error"}),
               "total", "error"]
    path = out / "scores.csv"
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return path


def question_scores(results: dict) -> dict[str, float]:
    """Points per question from otter's ``results.json`` (Gradescope's format)."""
    return {t["name"]: float(t["score"]) for t in results["tests"] if "score" in t}


# --- command line -------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """``python -m gilib.book.assignments build [--out DIR] [CHAPTER ...]`` or ``... grade ZIP FOLDER --out DIR``."""
    parser = argparse.ArgumentParser(prog="python -m gilib.book.assignments",
                                     description="Each chapter's otter-grader assignment: build it, grade it.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    build = sub.add_parser("build", help="write each chapter's student notebook, autograder zip and instructor "
                                         "README (needs otter-grader)")
    build.add_argument("chapters", nargs="*", type=Path, help="chapter notebooks (default: chapters/*.ipynb)")
    build.add_argument("--out", type=Path, default=Path("_build") / "assignments")
    marking = sub.add_parser("grade", help="grade a folder of submissions with otter run")
    marking.add_argument("autograder", type=Path, help="the chapter's autograder zip")
    marking.add_argument("submissions", type=Path, help="folder of submitted notebooks")
    marking.add_argument("--out", type=Path, required=True, help="folder for the results and scores.csv")
    marking.add_argument("--jobs", type=int, default=1,
                         help="submissions graded at once (at most the cores; each executes the chapter)")
    args = parser.parse_args(argv)
    try:
        if args.command == "grade":
            print(grade(args.autograder, args.submissions, args.out, jobs=args.jobs).read_text(), end="")
            return 0
        for chapter in args.chapters or chapter_notebooks():
            a = build_assignment(chapter, args.out)
            auto = sum(not q.manual for q in a.questions)
            print(f"{a.folder}: {auto} autograded + {len(a.questions) - auto} essay question(s)")
    except (RuntimeError, ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
