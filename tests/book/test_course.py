"""The course table: questions per chapter and measured run times."""

import json
import math
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from gilib.book import course
from gilib.book.assignments import parse_questions
from gilib.book.upkeep import chapter_notebooks

ROOT = Path(__file__).resolve().parents[2]
CACHED = ROOT / "data" / "results" / "chapter_times.jsonl"


def test_questions_table_counts_each_chapters_questions():
    table = course.questions_table().set_index("chapter")
    assert list(table.index) == [p.stem for p in chapter_notebooks()]
    for path in chapter_notebooks():
        questions = parse_questions(nbformat.read(str(path), as_version=4))
        row = table.loc[path.stem]
        assert row["graded"] + row["essays"] == len(questions) and row["graded"] >= 1
        assert row["points"] == sum(q.points for q in questions)


def test_table_gives_seconds_and_minutes_and_leaves_unmeasured_modes_empty(tmp_path):
    first, second = (p.stem for p in chapter_notebooks()[:2])
    path = tmp_path / "times.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in [
        {"chapter": first, "mode": "fast", "seconds": 90.0},
        {"chapter": first, "mode": "full", "seconds": 600.0},
        {"chapter": second, "mode": "fast", "seconds": 30.0},
    ]) + "\n")
    table = course.table(path).set_index("chapter")
    assert table.loc[first, "fast (s)"] == 90.0 and table.loc[first, "full (min)"] == 10.0
    assert table.loc[second, "fast (s)"] == 30.0 and math.isnan(table.loc[second, "full (min)"])
    assert table.loc[:, "fast (s)"].isna().sum() == len(chapter_notebooks()) - 2


def test_bad_input_gets_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="Unknown chapter 'ch9'; the chapters are: 01_full_model_inversion"):
        course.run(tmp_path / "t.jsonl", chapters=["ch9"])
    with pytest.raises(ValueError, match="mode must be one of"):
        course.time_chapter(chapter_notebooks()[0].stem, "slow")
    done = subprocess.run([sys.executable, "-m", "gilib.book.course", "run", "--chapters", "ch9", "--out",
                           str(tmp_path / "t.jsonl")], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 2 and "Unknown chapter 'ch9'" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "t.jsonl").exists()


def test_the_cached_times_cover_every_chapter_in_fast_mode():
    # The course page's table reads this file (python -m gilib.book.course run).
    table = course.table(CACHED)
    assert table["fast (s)"].notna().all(), table
    assert (table["fast (s)"] > 0).all()


def test_questions_table_counts_difficulties_and_work():
    table = course.questions_table().set_index("chapter")
    for path in chapter_notebooks():
        questions = parse_questions(nbformat.read(str(path), as_version=4))
        row = table.loc[path.stem]
        stars = [int(n) for n in row["★ / ★★ / ★★★"].split(" / ")]
        assert sum(stars) == len(questions)
        assert row["work (min)"] == sum(course.WORK_MINUTES[q.difficulty or 2] for q in questions)


def test_workload_adds_the_runs_to_the_work_and_leaves_unmeasured_chapters_empty(tmp_path):
    first = chapter_notebooks()[0].stem
    path = tmp_path / "times.jsonl"
    path.write_text(json.dumps({"chapter": first, "mode": "fast", "seconds": 60.0}) + "\n")
    load = course.workload(path).set_index("chapter")
    row = load.loc[first]
    assert row["runs (min)"] == course.RUNS * 1.0
    assert row["total (h)"] == pytest.approx((course.RUNS + row["work (min)"]) / 60)
    assert load["total (h)"].isna().sum() == len(chapter_notebooks()) - 1


def test_the_workload_command_prints_every_chapter():
    done = subprocess.run([sys.executable, "-m", "gilib.book.course", "workload", str(CACHED)], cwd=ROOT,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert all(p.stem in done.stdout for p in chapter_notebooks()) and "total (h)" in done.stdout


def test_the_course_pages_cpu_claims_hold_for_the_cached_times():
    # chapters/course.md: "Fast mode ... runs each chapter in two minutes or
    # less on two cores"; "With the full settings, chapters 2 to 7 still run on a
    # CPU ...; chapter 1's full run is the longest."
    table = course.table(CACHED).set_index("chapter")
    assert (table["fast (s)"] <= 120).all()
    full = table["full (min)"]
    assert full.notna().all() and full.idxmax() == "01_full_model_inversion"
    assert (full.drop("01_full_model_inversion") < 10).all()
