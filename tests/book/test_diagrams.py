"""gilib.book.diagrams: the diagrams drawn by code (chapter 5's peeling loop)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402

from gilib.book import diagrams, plots  # noqa: E402


def _texts(ax) -> list[str]:
    return [t.get_text() for t in ax.texts]


def test_peeling_loop_draws_the_four_steps_in_order_with_axes_off():
    plots.set_style()
    ax = diagrams.peeling_loop(title="peeling")
    try:
        texts = _texts(ax)
        for step in diagrams.PEELING_STEPS:
            assert step in texts
        names = ["candidate sets", "beam search", "the check", "peel"]
        assert [s.split("\n")[0].split(". ", 1)[1] for s in diagrams.PEELING_STEPS][:3] == [
            "candidate sets", "beam search over positions", "the check"]
        assert all(any(name in t for t in texts) for name in names)
        assert any("repeat" in t for t in texts)  # the loop back
        assert not ax.axison and ax.get_title() == "peeling"
        # Arrows join the boxes: the input, the three steps, the repeat, the fallback, the way out.
        assert sum(1 for child in ax.texts if getattr(child, "arrow_patch", None) is not None) >= 7
    finally:
        plt.close(ax.figure)


def test_peeling_loop_draws_on_a_given_axes():
    fig, ax = plt.subplots()
    try:
        assert diagrams.peeling_loop(ax=ax) is ax
    finally:
        plt.close(fig)


def test_peeling_loop_keeps_every_box_inside_its_own_figure():
    ax = diagrams.peeling_loop()
    try:
        ax.figure.canvas.draw()
        frame = ax.figure.bbox
        for text in ax.texts:
            if text.get_text():
                box = text.get_window_extent()
                assert frame.x0 <= box.x0 and box.x1 <= frame.x1, text.get_text()
                assert frame.y0 <= box.y0 and box.y1 <= frame.y1, text.get_text()
    finally:
        plt.close(ax.figure)
