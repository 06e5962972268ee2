"""The one runner: resume by key, the same lines from every engine, clear errors for bad engines."""

import json

import pytest

from gilib.studies import runner

CALLS = []


def _work(n: int) -> list[dict]:
    CALLS.append(n)
    return [{"n": n, "square": n * n}]


def _run(path, tasks, **kwargs):
    return runner.run(path, [(n,) for n in tasks], _work, task_keys=lambda n: [n], line_key=lambda line: line["n"],
                      **kwargs)


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


def test_an_unreachable_scheduler_says_what_to_do(tmp_path, monkeypatch):
    pytest.importorskip("distributed")
    monkeypatch.setattr(runner, "CONNECT_TIMEOUT", 1)  # nothing listens there: no need to wait 20 s
    with pytest.raises(RuntimeError, match="No Dask scheduler answers at tcp://127.0.0.1:1"):
        _run(tmp_path / "r.jsonl", [1], scheduler="tcp://127.0.0.1:1")
