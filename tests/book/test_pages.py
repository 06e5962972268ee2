"""Every chapter keeps the page rules (gilib.book.pages), checked on the source, no execution needed.

Short markdown cells, code that fits the page, the record plumbing hidden,
and every figure a numbered, captioned figure with alt text that the prose
explains after it. The browser test checks the same on the built pages.
"""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest

from gilib.book.pages import DRAWS, drawing_cells, figure_problems, page_problems, repeated_figure_names

ROOT = Path(__file__).resolve().parents[2]
CHAPTERS = sorted((ROOT / "chapters").glob("[0-9][0-9]_*.ipynb"))

GOOD_FIGURE = {"mystnb": {"figure": {"name": "fig-ch3-heatmap", "caption": "ROUGE-1 per layer and weight."},
                          "image": {"alt": "A heatmap of mean ROUGE-1, layers by weights."}}}


def _notebook(*cells):
    nb = nbformat.v4.new_notebook()
    nb.cells = list(cells)
    return nb


def test_the_detector_finds_figures():
    # A guard on the guards below: the chapters draw, and the detector sees it.
    assert CHAPTERS and all(drawing_cells(path) for path in CHAPTERS[:3])
    assert DRAWS.search("ax = plots.rouge_bars(table, group='attack')")
    assert DRAWS.search("fig, ax = plt.subplots()")
    assert DRAWS.search("table.plot(kind='bar')") and DRAWS.search("sns.lineplot(data=t)")
    assert not DRAWS.search("plots.set_style()\nplt.close('all')\nsns.set_theme()")


def test_figure_problems_reads_the_metadata():
    good = nbformat.v4.new_code_cell("plots.heatmap(t)", metadata=GOOD_FIGURE)
    assert figure_problems(good) == []
    bare = nbformat.v4.new_code_cell("plots.heatmap(t)")
    assert figure_problems(bare) == ["no figure name fig-<chapter>-<what>", "no caption",
                                     "no alt text (or a file name)"]
    hashed = nbformat.v4.new_code_cell("plots.heatmap(t)", metadata={"mystnb": {
        "figure": {"name": "fig-ch3-heatmap", "caption": "c"}, "image": {"alt": "3e5ec46cdc336e48.png"}}})
    assert figure_problems(hashed) == ["no alt text (or a file name)"]


def test_page_problems_finds_each_broken_rule():
    long_prose = nbformat.v4.new_markdown_cell("word " * 251)
    wide = nbformat.v4.new_code_cell("x = 1  # " + "y" * 80)
    shown_record = nbformat.v4.new_code_cell('record("a", 1)')
    hidden = nbformat.v4.new_code_cell('record("a", 1)  # ' + "z" * 90, metadata={"tags": ["remove-cell"]})
    figure = nbformat.v4.new_code_cell("ax = plots.heatmap(t)", metadata=GOOD_FIGURE)
    problems = page_problems(_notebook(long_prose, wide, shown_record, hidden, figure))
    assert problems == ["cell 0: 251 words in one markdown cell (at most 250: split it or cut it)",
                        "cell 1: a code line of 89 characters (under 80)",
                        "cell 2: record(...) in a visible cell (move it to a cell tagged remove-cell)",
                        "cell 4: no {numref}`fig-ch3-heatmap` in the prose after the figure"]
    explained = nbformat.v4.new_markdown_cell("{numref}`fig-ch3-heatmap` shows the cells.")
    assert page_problems(_notebook(hidden, figure, explained)) == []
    # Explained before the figure only: still a problem.
    assert page_problems(_notebook(explained, figure)) == [
        "cell 1: no {numref}`fig-ch3-heatmap` in the prose after the figure"]
    # A cell without an id (the notebook is nbformat 4.5).
    anonymous = nbformat.v4.new_markdown_cell("Text.")
    del anonymous["id"]
    assert page_problems(_notebook(hidden, anonymous)) == [
        "cell 1: no cell id (nbformat 4.5 needs one: save the notebook in Jupyter, or nbformat.validator.normalize "
        "it)"]


@pytest.mark.parametrize("path", CHAPTERS, ids=[p.stem for p in CHAPTERS])
def test_every_chapter_keeps_the_page_rules(path):
    assert page_problems(path) == []


def test_figure_names_are_unique_across_the_book():
    assert repeated_figure_names(CHAPTERS) == []
    assert len({name for path in CHAPTERS for name in
                [c.metadata["mystnb"]["figure"]["name"] for _, c in drawing_cells(path)]}) >= len(CHAPTERS)
