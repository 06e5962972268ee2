"""The assignments built and graded by otter-grader (``make assignments-test``).

``make assignments-test`` installs otter-grader (an optional dependency) and
runs this file with ``GILIB_ASSIGNMENTS_TEST=1``; a plain ``make test``
skips it. It builds every chapter's assignment with ``python -m
gilib.book.assignments``, checks that no student folder holds a solution or a
hidden test, and grades one chapter's solution notebook and its unmodified
student notebook with ``otter run`` (each executes the whole chapter in fast
mode).
"""

import csv
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import nbformat
import pytest

from gilib.book.assignments import difficulty_text, grade, leaks, parse_questions
from gilib.book.upkeep import chapter_notebooks

ROOT = Path(__file__).resolve().parents[2]

GRADED_CHAPTER = "05_span_check"
"""The chapter graded end to end: the cheapest to execute (seconds of span checks, no optimisation)."""

pytestmark = pytest.mark.skipif(
    os.environ.get("GILIB_ASSIGNMENTS_TEST") != "1",
    reason="the grading test runs with `make assignments-test` (it installs otter-grader)",
)


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """Every chapter's assignment, written by the command `make assignments` runs."""
    try:  # here a missing otter is a failure, not a skip
        import otter  # noqa: F401
    except ImportError:
        pytest.fail("otter-grader is missing: `make assignments-test` installs it")

    out = tmp_path_factory.mktemp("assignments")
    done = subprocess.run([sys.executable, "-m", "gilib.book.assignments", "build", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("question(s)") == len(chapter_notebooks())
    return out


def chapters():
    return [p.stem for p in chapter_notebooks()]


@pytest.mark.parametrize("name", chapters())
def test_each_chapter_gets_a_student_notebook_an_autograder_and_a_readme(built, name):
    folder = built / name
    questions = parse_questions(nbformat.read(str(ROOT / "chapters" / f"{name}.ipynb"), as_version=4))
    graded = [q for q in questions if not q.manual]
    student = nbformat.read(str(folder / "student" / f"{name}.ipynb"), as_version=4)
    nbformat.validate(student)
    # One public-test file per graded question, beside the notebook.
    assert sorted(p.stem for p in (folder / "student" / "tests").glob("*.py")) == sorted(q.name for q in graded)
    # Every graded question has its check cell; every answer cell is a blank to fill.
    checks = [c.source for c in student.cells if c.cell_type == "code" and c.source.startswith("grader.check(")]
    assert checks == [f'grader.check("{q.name}")' for q in graded]
    answers = [c for c in student.cells if "otter_answer_cell" in c.metadata.get("tags", [])]
    # At least one per question (a worked answer may span cells), none of them the book's hidden plumbing.
    assert len(answers) >= len(questions)
    assert not any("remove-cell" in c.metadata.get("tags", []) for c in answers)
    assert all("..." in c.source for c in answers if c.cell_type == "code")
    # The otter cell comes after the Colab install cell, which it needs in Colab.
    code = [c for c in student.cells if c.cell_type == "code"]
    assert "colab-install" in code[0].metadata.get("tags", []) and "otter.Notebook(" in code[1].source
    # The autograder holds every test, hidden ones included.
    with zipfile.ZipFile(folder / "autograder" / f"{name}-autograder.zip") as z:
        tests = {Path(n).stem: z.read(n).decode() for n in z.namelist() if n.startswith("tests/")}
    assert sorted(tests) == sorted(q.name for q in graded)
    assert all("'hidden': True" in tests[q.name] and "'hidden': False" in tests[q.name] for q in graded)
    readme = (folder / "README.md").read_text()
    assert f"otter run -a autograder/{name}-autograder.zip" in readme and "Gradescope" in readme
    # Each question's difficulty and kind, as its prompt gives them.
    assert "| question | exercise | difficulty | kind | graded | points | tests |" in readme
    for q in questions:
        assert f"| {q.name} | {q.number} | {difficulty_text(q)} | {q.kind or ''} |" in readme


@pytest.mark.parametrize("name", chapters())
def test_no_student_folder_holds_a_solution_or_a_hidden_test(built, name):
    chapter = nbformat.read(str(ROOT / "chapters" / f"{name}.ipynb"), as_version=4)
    student_dir = built / name / "student"
    assert leaks(student_dir, chapter) == []
    text = "\n".join(p.read_text() for p in student_dir.rglob("*") if p.is_file())
    assert "'hidden': True" not in text and "# HIDDEN" not in text
    for q in parse_questions(chapter):
        for source in q.hidden:
            body = [line.strip() for line in source.splitlines()[1:] if "assert" in line]
            assert body and not any(line in text for line in body), (q.name, body)
        for md in q.solution_markdown:
            assert md not in text


def test_the_solution_scores_full_marks_and_the_blank_copy_does_not(built, tmp_path):
    # Both submissions graded at once (--jobs 2): each row must still be its own notebook's.
    folder = built / GRADED_CHAPTER
    chapter = nbformat.read(str(ROOT / "chapters" / f"{GRADED_CHAPTER}.ipynb"), as_version=4)
    graded = [q for q in parse_questions(chapter) if not q.manual]
    submissions = tmp_path / "submissions"
    submissions.mkdir()
    (submissions / "solution.ipynb").write_bytes((folder / "autograder" / f"{GRADED_CHAPTER}.ipynb").read_bytes())
    (submissions / "blank.ipynb").write_bytes((folder / "student" / f"{GRADED_CHAPTER}.ipynb").read_bytes())
    done = subprocess.run([sys.executable, "-m", "gilib.book.assignments", "grade",
                           str(folder / "autograder" / f"{GRADED_CHAPTER}-autograder.zip"), str(submissions),
                           "--out", str(tmp_path / "results"), "--jobs", "2"], cwd=ROOT, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr
    with open(tmp_path / "results" / "scores.csv") as f:
        rows = {row["submission"]: row for row in csv.DictReader(f)}
    full = sum(q.points for q in graded)
    solution, blank = rows["solution.ipynb"], rows["blank.ipynb"]
    assert {q.name: float(solution[q.name]) for q in graded} == {q.name: q.points for q in graded}
    assert float(solution["total"]) == full
    assert float(blank["total"]) < full
    # Left blank, no graded question earns its points.
    assert all(float(blank[q.name]) < q.points for q in graded)
    assert (tmp_path / "results" / "solution" / "results.json").is_file()


def test_grade_keeps_going_past_a_broken_submission(built, tmp_path):
    # A file that is not a notebook gets a row with 0 points and the error, not a crash.
    submissions = tmp_path / "submissions"
    submissions.mkdir()
    (submissions / "broken.ipynb").write_text("not a notebook")
    path = grade(built / GRADED_CHAPTER / "autograder" / f"{GRADED_CHAPTER}-autograder.zip", submissions,
                 tmp_path / "results")
    with open(path) as f:
        (row,) = list(csv.DictReader(f))
    assert row["submission"] == "broken.ipynb" and float(row["total"]) == 0 and row["error"]
