"""The chapters' exercises as otter-grader questions: their format, checked without otter.

Building the assignments and grading them with ``otter run`` is
tests/book/test_grading.py (``make assignments-test``, which installs otter-grader).
"""

import json
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_raw_cell

from gilib.book import assignments
from gilib.book.assignments import (
    assignment_config,
    autograder_requirements,
    leaks,
    master_notebook,
    parse_questions,
    question_problems,
    question_scores,
    syntax_errors,
)
from gilib.book.upkeep import chapter_notebooks, repository

ROOT = Path(__file__).resolve().parents[2]


def _tagged(cell, tag):
    cell.metadata["tags"] = [tag]
    return cell


RUBRIC = "**Rubric (2 points).**\n\n* names the square\n* says why it is 9\n"


def question(n=1, *, public=("assert answer == 9, 'square X'",), hidden=("# HIDDEN\nassert answer - X * X == 0",),
             code="answer = X * X  # SOLUTION", manual=False, explanation=True, marks="(★★, compute)",
             rubric=None):
    """The cells of one question in the chapters' format (an essay gets :data:`RUBRIC` unless given one)."""
    rubric = (RUBRIC if manual else "") if rubric is None else rubric
    cells = [new_raw_cell(f"# BEGIN QUESTION\nname: q{n}\npoints: 2" + ("\nmanual: true" if manual else "")),
             new_markdown_cell(f"**Exercise {n}.** {marks} Square X into `answer`."),
             new_raw_cell("# BEGIN SOLUTION")]
    if code:
        cells.append(_tagged(new_code_cell(code), "hide-input"))
    if explanation:
        cells.append(new_markdown_cell(
            f"```{{admonition}} Solution to {n}\n:class: dropdown\n\nSquare it.\n\n{rubric}```"))
    cells.append(new_raw_cell("# END SOLUTION"))
    if public or hidden:
        cells.append(new_raw_cell("# BEGIN TESTS"))
        cells += [_tagged(new_code_cell(t), "remove-cell") for t in (*public, *hidden)]
        cells.append(new_raw_cell("# END TESTS"))
    cells.append(new_raw_cell("# END QUESTION"))
    return cells


def notebook(*questions):
    return new_notebook(cells=[new_markdown_cell("# Title"), new_code_cell("X = 3"),
                               new_markdown_cell("## Exercises"), *[c for q in questions for c in q]])


def test_a_well_formed_chapter_parses_and_passes():
    nb = notebook(question(1), question(2, code=None, public=(), hidden=(), manual=True, marks="(★★★, explain)"))
    q1, q2 = parse_questions(nb)
    assert (q1.name, q1.number, q1.manual, q1.points) == ("q1", 1, False, 2.0)
    assert (q1.difficulty, q1.kind, q2.difficulty, q2.kind) == (2, "compute", 3, "explain")
    assert q1.solution_code == ["answer = X * X  # SOLUTION"]
    assert len(q1.public) == 1 and q1.hidden == ["# HIDDEN\nassert answer - X * X == 0"]
    assert q2.manual and q2.solution_code == [] and "Solution to 2" in q2.solution_markdown[0]
    assert question_problems(nb) == []


@pytest.mark.parametrize("broken, problem", [
    (notebook(question(1, hidden=())), "1 public and 0 hidden"),
    (notebook(question(1, public=())), "0 public and 1 hidden"),
    (notebook(question(1, public=("answer == 9",))), "without an assert"),
    (notebook(question(1, code=None)), "no worked answer"),
    (notebook(question(1, explanation=False)), "no 'Solution to 1'"),
    (notebook(question(1, manual=True)), "essay (manual) question has no code"),
    (notebook(question(2)), "expected 1..1"),
    (notebook(question(1)) | {"cells": notebook(question(1)).cells + [new_markdown_cell("**Exercise 2.** Why?")]},
     "exercises [2] are not otter questions"),
    (new_notebook(cells=[new_markdown_cell("**Exercise 1.** Why?")]), "no otter question"),
])
def test_what_keeps_a_chapter_from_being_gradeable(broken, problem):
    broken = nbformat.from_dict(broken)
    problems = question_problems(broken)
    assert any(problem in p for p in problems), problems


def _essay(**kwargs):
    return question(1, code=None, public=(), hidden=(), manual=True, marks="(★★, explain)", **kwargs)


@pytest.mark.parametrize("broken, problem", [
    (notebook(question(1, marks="")), "the prompt should open '**Exercise 1.** (★★, predict)"),
    (notebook(question(1, marks="(★★★★, compute)")), "1-3 stars"),
    (notebook(question(1, marks="(★★, guess)")), "one of predict, compute, explain, choose"),
    (notebook(question(1, marks="(compute, ★★)")), "the prompt should open"),
    (notebook(question(1, marks="(**, compute)")), "the prompt should open"),
    (notebook(_essay(rubric="Points for the square.\n")), "needs a '**Rubric (N points).**' line"),
    (notebook(_essay(rubric="**Rubric (3 points).**\n\n* a\n* b\n* c\n")), "rubric gives 3 points, the question 2"),
    (notebook(_essay(rubric="**Rubric (2 points).**\n\n* a\n")), "1 bullet(s) for 2 points"),
])
def test_prompts_follow_the_books_exercise_format(broken, problem):
    problems = question_problems(nbformat.from_dict(broken))
    assert any(problem in p for p in problems), problems
    # The structure alone is fine: without formats, nothing is reported.
    assert question_problems(nbformat.from_dict(broken), formats=False) == []


@pytest.mark.parametrize("kind", ["predict", "compute", "explain", "choose"])
@pytest.mark.parametrize("stars", ["★", "★★", "★★★"])
def test_every_difficulty_and_kind_is_accepted(stars, kind):
    nb = notebook(question(1, marks=f"({stars}, {kind})"),
                  question(2, code=None, public=(), hidden=(), manual=True, marks=f"({stars}, explain)"))
    assert question_problems(nb) == []
    q1 = parse_questions(nb)[0]
    assert (q1.difficulty, q1.kind) == (len(stars), kind)
    assert assignments.difficulty_text(q1) == f"{stars} {assignments.DIFFICULTIES[len(stars)]}"


def test_the_book_tags_are_required():
    nb = notebook(question(1))
    for cell in nb.cells:
        cell.metadata.pop("tags", None)
    problems = "\n".join(question_problems(nb))
    assert "lacks the tag 'remove-cell'" in problems and "lacks the tag 'hide-input'" in problems


@pytest.mark.parametrize("cells, message", [
    ([new_raw_cell("# BEGIN QUESTION\nname: q1")], "never closed"),
    ([new_raw_cell("# BEGIN QUESTION\npoints: 1"), new_raw_cell("# END QUESTION")], "needs a name"),
    ([new_raw_cell("# BEGIN SOLUTION")], "outside a question"),
    ([new_raw_cell("# BEGIN QUESTION\nname: q1"), new_raw_cell("# BEGIN SOLUTION"),
      new_raw_cell("# END QUESTION")], "ends inside its SOLUTION block"),
    ([new_raw_cell("# BEGIN QUESTION\nname: q1"), new_raw_cell("# END TESTS")], "without its BEGIN"),
])
def test_malformed_blocks_are_errors(cells, message):
    with pytest.raises(ValueError, match=message):
        parse_questions(new_notebook(cells=cells))


def test_every_chapter_is_a_gradeable_assignment():
    for path in chapter_notebooks():
        nb = nbformat.read(str(path), as_version=4)
        assert question_problems(nb, path.name, formats=False) == []
        questions = parse_questions(nb)
        # Most exercises are graded by otter; essays are the exception.
        graded = [q for q in questions if not q.manual]
        assert len(graded) >= len(questions) / 2, (path.name, [q.name for q in questions if q.manual])
        # Nothing of the old format is left outside the questions.
        inside = {i for q in questions for i in q.cells}
        outside = "\n".join(c.source for i, c in enumerate(nb.cells) if i not in inside)
        assert "Solution to" not in outside, path.name


def test_every_chapter_follows_the_exercise_format():
    problems = [p for path in chapter_notebooks()
                for p in assignments.format_problems(
                    parse_questions(nbformat.read(str(path), as_version=4)), path.name)]
    assert problems == []


def test_the_instructor_readme_lists_difficulty_and_kind(tmp_path):
    nb = notebook(question(1, marks="(★, predict)"),
                  question(2, code=None, public=(), hidden=(), manual=True, marks="(★★★, explain)"))
    a = assignments.Assignment("ch", tmp_path, tmp_path / "s.ipynb", tmp_path / "ch-autograder.zip",
                               tmp_path / "ch.ipynb", parse_questions(nb))
    readme = assignments._instructor_readme(a)
    assert "| question | exercise | difficulty | kind | graded | points | tests |" in readme
    assert "| q1 | 1 | ★ warm-up | predict | otter | 2 |" in readme
    assert "| q2 | 2 | ★★★ stretch | explain | by hand | 2 |" in readme


def test_the_master_notebook_carries_otters_config():
    nb = nbformat.read(str(chapter_notebooks()[0]), as_version=4)
    nb.cells[1].outputs = [nbformat.v4.new_output("stream", text="x")]
    master = master_notebook(nb, "ch")
    assert master.cells[0].cell_type == "raw" and master.cells[0].source.startswith("# ASSIGNMENT CONFIG\n")
    assert "name: ch" in master.cells[0].source
    assert all(not c.get("outputs") for c in master.cells if c.cell_type == "code")
    assert nb.cells[1].outputs  # the chapter itself is untouched
    config = assignment_config("ch")
    assert config["tests"] == {"files": True} and config["init_cell"] and not config["run_tests"]


def test_the_autograder_installs_gilib_from_the_books_repository():
    text = autograder_requirements(ROOT)
    url, branch = repository(ROOT)
    lines = text.splitlines()
    assert lines[0] == "torch==2.13.0"
    assert lines[-1] == f"-e git+{url}@{branch}#egg=gilib"
    assert "transformers==" in text and not any(line.startswith("#") for line in lines)


def test_leaks_finds_solution_and_hidden_lines_but_not_shared_ones(tmp_path):
    nb = notebook(question(1, code="answer = X * X + 0  # SOLUTION\nshown = 'X = 3'"))
    nb.cells.insert(1, new_code_cell("print('a line the chapter shows anyway')"))
    clean = tmp_path / "clean"
    clean.mkdir()
    (clean / "nb.ipynb").write_text("answer = ...\nprint('a line the chapter shows anyway')")
    assert leaks(clean, nb) == []
    leaky = tmp_path / "leaky"
    leaky.mkdir()
    (leaky / "nb.ipynb").write_text(json.dumps({"source": "answer = X * X + 0"}))
    (leaky / "q1.py").write_text("assert answer - X * X == 0")
    found = leaks(leaky, nb)
    assert any("X * X + 0" in f for f in found) and any("answer - X * X == 0" in f for f in found)
    (leaky / "more.txt").write_text("```{admonition} Solution to 1")
    assert "marker 'Solution to '" in leaks(leaky, nb)


def test_syntax_errors_name_the_cell():
    nb = new_notebook(cells=[new_code_cell("x = 1\n!pip install otter-grader"),
                             new_code_cell("y = ...\n    init=1)")])
    assert syntax_errors(nb) == ["cell 1, line 2: unexpected indent"]


def test_question_scores_reads_otters_results():
    results = {"tests": [{"name": "Public Tests", "visibility": "visible", "output": "..."},
                         {"name": "q1", "score": 2.0, "max_score": 2.0},
                         {"name": "q2", "score": 0, "max_score": 2.0}]}
    assert question_scores(results) == {"q1": 2.0, "q2": 0.0}


def test_without_otter_the_error_says_how_to_install_it(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "otter", None)  # `import otter` raises ImportError
    with pytest.raises(RuntimeError, match=r"make assignments.*pip install"):
        assignments.build_assignment(chapter_notebooks()[0], tmp_path)


def test_grading_needs_a_zip_and_submissions(tmp_path):
    with pytest.raises(FileNotFoundError, match="make assignments"):
        assignments.grade(tmp_path / "missing.zip", tmp_path, tmp_path / "out")
    (tmp_path / "a.zip").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="No .ipynb submission"):
        assignments.grade(tmp_path / "a.zip", tmp_path, tmp_path / "out")
    for jobs in (0, -1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="jobs must be how many submissions to grade at once"):
            assignments.grade(tmp_path / "a.zip", tmp_path, tmp_path / "out", jobs=jobs)


def test_the_command_reports_a_missing_otter_clearly(tmp_path):
    # A fresh interpreter in which otter cannot be imported.
    code = ("import sys; sys.modules['otter'] = None; from gilib.book.assignments import main; "
            f"raise SystemExit(main(['build', '--out', {str(tmp_path)!r}]))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 1
    assert "otter-grader is not installed" in done.stderr and "Traceback" not in done.stderr
