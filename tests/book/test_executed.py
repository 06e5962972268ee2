"""Chapters executed once per change (gilib.book.executed): the book build's copies are reused only while fresh."""

import json
import multiprocessing
import shutil

import nbformat
import pytest

from gilib.book import executed as ex
from gilib.book.chapter import read_records


def _book(tmp_path, value=41):
    """A book of one chapter that records ``answer`` (its parameter + 1), with a package and data beside it."""
    root = tmp_path / "book"
    (root / "chapters").mkdir(parents=True)
    (root / "gilib").mkdir()
    (root / "data").mkdir()
    (root / "gilib" / "x.py").write_text("X = 1\n")
    (root / "data" / "d.txt").write_text("data\n")
    (root / "_config.yml").write_text("title: t\n")
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    params = nbformat.v4.new_code_cell(f"FAST_MODE = False\nVALUE = {value}")
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, nbformat.v4.new_code_cell(
        "from gilib.book import record\nrecord('answer', VALUE + 1)\nrecord('fast', FAST_MODE)")]
    nbformat.write(nb, str(root / "chapters" / "one.ipynb"))
    return root


def test_the_fingerprint_changes_with_every_input_and_only_with_them(tmp_path):
    root = _book(tmp_path)
    first = ex.fingerprint("one", root)
    assert ex.fingerprint("one", root) == first
    (root / "tests").mkdir()
    (root / "tests" / "t.py").write_text("x")  # the tests read the outputs: not an input
    (root / "gilib" / "__pycache__").mkdir()
    (root / "gilib" / "__pycache__" / "x.pyc").write_bytes(b"\0")
    assert ex.fingerprint("one", root) == first
    for change in (root / "gilib" / "x.py", root / "data" / "d.txt", root / "_config.yml"):
        before = ex.fingerprint("one", root)
        change.write_text(change.read_text() + "#")
        assert ex.fingerprint("one", root) != before, change
    with pytest.raises(ValueError, match="Unknown chapter 'two'; the chapters are: one"):
        ex.fingerprint("two", root)


@pytest.mark.slow
def test_a_chapter_runs_once_then_is_reused_until_a_source_changes(tmp_path, monkeypatch):
    root = _book(tmp_path)
    runs = []
    real = ex.pm.execute_notebook
    monkeypatch.setattr(ex.pm, "execute_notebook", lambda *a, **k: runs.append(a[0]) or real(*a, **k))
    path = ex.executed("one", root)
    assert read_records(path) == {"answer": 42, "fast": True} and len(runs) == 1
    assert ex.executed("one.ipynb", root) == path and len(runs) == 1  # reused
    assert ex.status(root) == {"one": "papermill"}
    (root / "data" / "d.txt").write_text("changed\n")
    assert ex.status(root) == {"one": "stale"}
    ex.executed(root / "chapters" / "one.ipynb", root)
    assert len(runs) == 2


def _book_copy(root, records: dict, error: bool = False):
    """What jupyter-book leaves in _build/jupyter_execute: the chapter with outputs."""
    nb = nbformat.read(str(root / "chapters" / "one.ipynb"), as_version=4)
    outputs = [nbformat.v4.new_output("display_data", data={"application/papermill.record/text/plain": repr(v)},
                                      metadata={"scrapbook": {"name": k}}) for k, v in records.items()]
    if error:
        outputs.append(nbformat.v4.new_output("error", ename="ValueError", evalue="boom", traceback=[]))
    nb.cells[1].outputs = outputs
    copy = root / ex.BOOK_COPIES / "one.ipynb"
    copy.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, str(copy))
    return copy


def test_a_stamped_book_build_is_read_instead_of_executing_again(tmp_path, monkeypatch):
    root = _book(tmp_path)
    monkeypatch.setattr(ex.pm, "execute_notebook", lambda *a, **k: pytest.fail("executed again"))
    copy = _book_copy(root, {"answer": 42})
    monkeypatch.setenv("GILIB_FAST_MODE", "1")
    assert ex.stamp(root) == ["one"]
    assert ex.executed("one", root) == copy and ex.status(root) == {"one": "book build"}
    manifest = json.loads((root / ex.OWN_COPIES / "manifest.json").read_text())
    assert manifest["one"]["mode"] == "fast" and manifest["one"]["copy"] == "_build/jupyter_execute/chapters/one.ipynb"


@pytest.mark.parametrize("problem", ["full mode", "error", "edited copy", "damaged manifest"])
def test_a_copy_that_is_not_a_good_fast_execution_of_these_sources_is_not_used(tmp_path, monkeypatch, problem):
    root = _book(tmp_path)
    runs = []
    monkeypatch.setattr(ex.pm, "execute_notebook", lambda src, out, **k: runs.append(out) or shutil.copy(src, out))
    monkeypatch.setenv("GILIB_FAST_MODE", "0" if problem == "full mode" else "1")
    copy = _book_copy(root, {"answer": 42}, error=problem == "error")
    ex.stamp(root)
    if problem == "edited copy":
        copy.write_text(copy.read_text().replace("42", "43"))
    if problem == "damaged manifest":
        (root / ex.OWN_COPIES / "manifest.json").write_bytes(b"\xff{")
    assert ex.executed("one", root) == root / ex.OWN_COPIES / "one.ipynb" and len(runs) == 1


def _add_entries(root, worker: int, count: int) -> None:
    for i in range(count):
        ex._update_manifest(root, {f"w{worker}-{i}": {"copy": "x"}})


def test_workers_that_update_the_manifest_at_once_keep_every_entry(tmp_path):
    # make test executes chapters on two workers at once (tests/conftest.py): each adds its entry under the
    # manifest's lock, so neither write drops the other's (without the lock this test lost entries).
    root = tmp_path / "book"
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=_add_entries, args=(root, w, 40)) for w in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=60)
    assert [w.exitcode for w in workers] == [0] * 4
    manifest = json.loads((root / ex.OWN_COPIES / "manifest.json").read_text())
    assert sorted(manifest) == sorted(f"w{w}-{i}" for w in range(4) for i in range(40))
    assert not list((root / ex.OWN_COPIES).glob("*.tmp"))  # every write renamed into place


@pytest.mark.parametrize("processes", [1, 2])
def test_a_kernel_beside_other_workers_runs_on_its_share_of_the_cores(tmp_path, monkeypatch, processes):
    # The kernel inherits the environment papermill is called in: with 2 processes on the cores, torch's
    # thread settings are thread_share(2)'s (1 thread on 2 cores) and FAST_MODE is on; afterwards the
    # caller's environment is as it was (here: no thread settings, GILIB_FAST_MODE 0).
    root = _book(tmp_path)
    for key in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("GILIB_FAST_MODE", "0")
    monkeypatch.setattr(ex.os, "cpu_count", lambda: 2)
    seen = []

    def execute(src, out, **kwargs):
        seen.append({k: ex.os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "GILIB_FAST_MODE")})
        shutil.copy(src, out)

    monkeypatch.setattr(ex.pm, "execute_notebook", execute)
    ex.executed("one", root, processes=processes)
    threads = "1" if processes == 2 else None
    assert seen == [{"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "GILIB_FAST_MODE": "1"}]
    assert [ex.os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "GILIB_FAST_MODE")] == \
        [None, None, "0"]
