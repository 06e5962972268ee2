"""The parallel book build (gilib/book/build.py): its settings, its page order and its extension check."""

import importlib
import inspect

import pytest
from sphinx.util.parallel import ParallelTasks

from gilib.book import build
from gilib.data import repo_root


def test_jobs_defaults_to_the_cores_and_reads_the_environment():
    assert build.jobs({}, cores=2) == 2
    assert build.jobs({}, cores=0) == 1
    assert build.jobs({build.JOBS_ENV: "1"}, cores=8) == 1
    assert build.jobs({build.JOBS_ENV: " 3 "}, cores=2) == 3


def test_each_process_gets_its_share_of_the_cores_unless_the_caller_set_the_threads():
    assert build.thread_share(2, {}, cores=2) == {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    assert build.thread_share(2, {}, cores=16) == {"OMP_NUM_THREADS": "8", "MKL_NUM_THREADS": "8"}
    assert build.thread_share(4, {}, cores=2) == {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    # The caller's OMP_NUM_THREADS stands, and for MKL too unless MKL's is set.
    assert build.thread_share(2, {"OMP_NUM_THREADS": "3"}, cores=16) == {"OMP_NUM_THREADS": "3",
                                                                      "MKL_NUM_THREADS": "3"}
    assert build.thread_share(2, {"MKL_NUM_THREADS": "5"}, cores=16) == {"OMP_NUM_THREADS": "8",
                                                                      "MKL_NUM_THREADS": "5"}


@pytest.mark.parametrize("value", ["0", "-2", "two", "1.5", "nan"])
def test_a_bad_job_count_is_a_clear_error(value):
    with pytest.raises(ValueError, match=f"{build.JOBS_ENV}=.*whole number of processes, at least 1"):
        build.jobs({build.JOBS_ENV: value}, cores=2)


def test_the_command_line_refuses_a_bad_job_count_with_its_message(monkeypatch):
    monkeypatch.setenv(build.JOBS_ENV, "0")
    with pytest.raises(SystemExit, match=f"gilib.book.build: {build.JOBS_ENV}='0': give a whole number"):
        build.main(["."])


def test_each_page_is_its_own_chunk_started_notebooks_first(tmp_path):
    (tmp_path / "chapters").mkdir()
    for name in ("01_a.ipynb", "02_b.ipynb", "03_c.ipynb", "intro.md", "zz.md"):
        (tmp_path / "chapters" / name).write_text("")
    pages = sorted(["chapters/intro", "chapters/02_b", "chapters/zz", "chapters/01_a", "chapters/03_c"])
    order = ["chapters/01_a", "chapters/02_b", "chapters/03_c", "chapters/intro", "chapters/zz"]
    assert build.page_order(pages, tmp_path) == order
    chunks = build.page_chunks(pages, tmp_path, nproc=2)
    assert all(len(chunk) == 1 for chunk in chunks)
    # Sphinx starts the first two at once, then the waiting chunk added last: replay its queue.
    started, waiting = [c[0] for c in chunks[:2]], [c[0] for c in chunks[2:]]
    while waiting:
        started.append(waiting.pop())
    assert started == order


def test_the_book_s_chapters_come_first_in_the_real_tree():
    root = repo_root()
    pages = sorted(p.relative_to(root).with_suffix("").as_posix() for p in (root / "chapters").iterdir()
                   if p.suffix in (".md", ".ipynb"))
    order = build.page_order(pages, root)
    # The seven numbered chapters (notebooks), in order, then the Markdown pages.
    chapters = [p for p in pages if p.split("/")[-1][:2].isdigit()]
    assert len(chapters) >= 7 and order[:len(chapters)] == chapters
    assert "chapters/intro" in order[len(chapters):] and sorted(order) == pages


def test_sphinx_still_starts_waiting_tasks_last_in_first_out():
    # page_chunks relies on it; a Sphinx that changes it only changes the build's speed, and this test says so.
    assert "self._precvsWaiting.popitem()" in inspect.getsource(ParallelTasks._join_one)


def test_the_declared_extensions_say_they_are_parallel_safe_and_still_set_up(monkeypatch):
    calls = []
    for name in build.PARALLEL_SAFE:
        module = importlib.import_module(name)
        monkeypatch.setattr(module, "setup", lambda app, name=name: calls.append(name))
    build._declare_parallel_safe()
    build._declare_parallel_safe()  # twice: wrapped once
    for name in build.PARALLEL_SAFE:
        metadata = importlib.import_module(name).setup("app")
        assert metadata == {"parallel_read_safe": True, "parallel_write_safe": True}
    assert calls == list(build.PARALLEL_SAFE)
