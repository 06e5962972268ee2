"""Student copies: solutions removed, exercises kept, valid notebooks."""

import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from gilib.assignments import strip_markdown, strip_solutions, write_assignments
from gilib.notebooks import chapter_notebooks

ROOT = Path(__file__).resolve().parent.parent

EXERCISES = """## Exercises

1. First question.
2. Second question.

```{admonition} Solution to 1
:class: dropdown

The answer, with $x$.
```

````{admonition} Solution to 2
:class: dropdown

Code inside:

```python
print("hi")
```
````

:::{admonition} Solution to 3
:class: dropdown
Colon fence.
:::

```{admonition} A hint, not a solution
Kept.
```

```{admonition} Solution shown openly
Kept too: not a dropdown.
```

## References

Kept."""


def test_strip_markdown_removes_only_solution_dropdowns():
    text, removed = strip_markdown(EXERCISES)
    assert removed == 3
    assert "The answer" not in text and 'print("hi")' not in text and "Colon fence" not in text
    assert "1. First question." in text and "2. Second question." in text
    assert "A hint, not a solution" in text and "Solution shown openly" in text
    assert text.endswith("## References\n\nKept.")
    assert "\n\n\n" not in text


def test_an_unclosed_solution_is_an_error():
    with pytest.raises(ValueError, match="never closed"):
        strip_markdown("```{admonition} Solution to 1\n:class: dropdown\n\nno end")


def test_solution_cells_and_outputs_go():
    nb = nbformat.v4.new_notebook()
    worked = nbformat.v4.new_code_cell("answer = 42")
    worked.metadata["tags"] = ["solution"]
    kept = nbformat.v4.new_code_cell("x = 1")
    kept.outputs = [nbformat.v4.new_output("stream", text="1")]
    kept.execution_count = 3
    nb.cells = [nbformat.v4.new_markdown_cell(EXERCISES), worked, kept]
    student, removed = strip_solutions(nb)
    assert removed == 4
    assert [c.source for c in student.cells[1:]] == ["x = 1"]
    assert student.cells[1].outputs == [] and student.cells[1].execution_count is None
    assert len(nb.cells) == 3 and nb.cells[2].outputs  # the chapter itself is untouched


def _exercise_lines(nb):
    cell = next(c for c in nb.cells if c.cell_type == "markdown" and "## Exercises" in c.source)
    block = cell.source[cell.source.index("## Exercises"):]
    return [line for line in block.splitlines() if line[:2].rstrip(".").isdigit()]


def test_every_chapter_gets_a_student_copy(tmp_path):
    report = write_assignments(chapter_notebooks(), tmp_path)
    assert sorted(report) == sorted(p.name for p in chapter_notebooks())
    for path in chapter_notebooks():
        original = nbformat.read(str(path), as_version=4)
        student = nbformat.read(str(tmp_path / path.name), as_version=4)
        nbformat.validate(student)
        text = "\n".join(c.source for c in student.cells)
        assert report[path.name] >= 1 and report[path.name] == original_solutions(original)
        assert "Solution to" not in text and ":class: dropdown" not in text
        # Every exercise is still asked, and the code is all there.
        assert _exercise_lines(student) == _exercise_lines(original) != []
        assert [c.source for c in student.cells if c.cell_type == "code"] == [
            c.source for c in original.cells if c.cell_type == "code"]


def original_solutions(nb):
    return sum(c.source.count("{admonition} Solution") for c in nb.cells if c.cell_type == "markdown")


def test_the_command_writes_into_the_build_folder(tmp_path):
    out = tmp_path / "assignments"
    done = subprocess.run([sys.executable, "-m", "gilib.assignments", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, check=True)
    assert sorted(p.name for p in out.glob("*.ipynb")) == sorted(p.name for p in chapter_notebooks())
    assert "solution(s) removed" in done.stdout
    # The default folder is under _build/, which git ignores.
    assert "_build/" in (ROOT / ".gitignore").read_text()
