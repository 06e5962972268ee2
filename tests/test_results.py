"""The one results store and runner: safe appends after a kill, resume by key, one Markdown renderer."""

import json

import pytest

from gilib import results

CALLS = []


def _work(n: int) -> list[dict]:
    CALLS.append(n)
    return [{"n": n, "square": n * n}]


def _run(path, tasks, **kwargs):
    return results.run(path, [(n,) for n in tasks], _work, task_keys=lambda n: [n], line_key=lambda line: line["n"],
                       **kwargs)


def test_a_cut_last_line_is_repaired_before_appending(tmp_path):
    path = tmp_path / "r.jsonl"
    results.append_lines(path, [{"n": 1}])
    with path.open("a") as f:
        f.write('{"n": 2, "squ')  # a run killed mid-write
    assert results.read_lines(path) == [{"n": 1}]  # the cut line is not a record
    results.append_lines(path, [{"n": 3}])
    assert path.read_text() == '{"n": 1}\n{"n": 3}\n'  # and it never fuses with the next one


def test_a_damaged_line_before_the_end_is_an_error(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text('{"n": 1}\nnot json\n{"n": 2}\n')
    with pytest.raises(ValueError, match="line 2, is not JSON"):
        results.read_lines(path)


def test_run_resumes_by_key_and_stamps_the_commit(tmp_path):
    path = tmp_path / "r.jsonl"
    CALLS.clear()
    first = _run(path, [1, 2, 3], limit=2)  # "killed" after two tasks
    assert [r["n"] for r in first] == [1, 2]
    with path.open("a") as f:
        f.write('{"n": 3, "sq')
    every = _run(path, [1, 2, 3, 4])
    assert CALLS == [1, 2, 3, 4]  # only the missing tasks ran again
    assert [r["n"] for r in every] == [1, 2, 3, 4] and all(r["square"] == r["n"] ** 2 for r in every)
    assert all(r["commit"] for r in every)
    assert _run(path, [1, 2, 3, 4]) == every and CALLS == [1, 2, 3, 4]
    assert len(path.read_text().splitlines()) == 4


def test_worker_processes_give_the_same_lines(tmp_path):
    local = _run(tmp_path / "a.jsonl", range(6))
    parallel = _run(tmp_path / "b.jsonl", range(6), jobs=2)
    assert sorted(map(json.dumps, local)) == sorted(map(json.dumps, parallel))


@pytest.mark.parametrize("kwargs, message", [({"jobs": 0}, "at least 1"), ({"jobs": 1.5}, "at least 1"),
                                             ({"scheduler": "host:8786"}, "Unknown scheduler")])
def test_bad_engines_are_refused(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        _run(tmp_path / "r.jsonl", [1], **kwargs)


def test_an_unreachable_scheduler_says_what_to_do(tmp_path):
    pytest.importorskip("distributed")
    with pytest.raises(RuntimeError, match="No Dask scheduler answers at tcp://127.0.0.1:1"):
        _run(tmp_path / "r.jsonl", [1], scheduler="tcp://127.0.0.1:1")


def test_markdown_table():
    table = results.markdown_table(["a", "b"], [[1, results.mean_sd(0.5, 0.25)], ["x", "y"]])
    assert table.splitlines() == ["| a | b |", "| --- | --- |", "| 1 | 0.50 ± 0.25 |", "| x | y |"]
    with pytest.raises(ValueError, match="3 cells under 2 headers"):
        results.markdown_table(["a", "b"], [[1, 2, 3]])
