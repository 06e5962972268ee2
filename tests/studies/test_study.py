"""A study's description and the one command line: every study has the same shape, and errors exit cleanly."""

import pickle

import pytest
import torch

from gilib.studies import all_studies
from gilib.studies.store import read_lines
from gilib.studies.study import Measurements, Study, Table, main, main_for, markdown_table, mean_sd, option


def _square(n: int) -> list[dict]:
    return [{"n": n, "square": n * n}]


SQUARES = Study(
    name="squares", description="squares of whole numbers",
    plan=lambda args: [(n,) for n in range(args.upto)], work=_square,
    task_keys=lambda n: [n], line_key=lambda line: line["n"], label=lambda lines: f"n={lines[0]['n']}",
    run_options=(option("--upto", type=int, default=3),),
    tables=(Table("total", "the sum of the squares",
                  lambda args: str(sum(line["square"] for line in read_lines(args.results))),
                  (option("results"),)),),
)


def test_markdown_table():
    table = markdown_table(["a", "b"], [[1, mean_sd(0.5, 0.25)], ["x", "y"]])
    assert table.splitlines() == ["| a | b |", "| --- | --- |", "| 1 | 0.50 ± 0.25 |", "| x | y |"]
    with pytest.raises(ValueError, match="3 cells under 2 headers"):
        markdown_table(["a", "b"], [[1, 2, 3]])


def test_one_study_runs_resumes_and_prints_its_table_from_the_command_line(tmp_path, capsys):
    out = tmp_path / "s.jsonl"
    assert main([SQUARES], ["squares", "run", "--upto", "4", "--out", str(out), "--jobs", "1"]) == 0
    assert "[4/4" in capsys.readouterr().err  # one progress line per task
    main_for(SQUARES, ["run", "--upto", "5", "--out", str(out)])
    assert "[1/1" in capsys.readouterr().err  # resumed: only n = 4 was left
    main_for(SQUARES, ["total", str(out)])
    assert capsys.readouterr().out.strip() == str(sum(n * n for n in range(5)))


def test_every_book_study_has_a_name_a_description_and_one_command_shape(capsys):
    studies = all_studies()
    assert [s.name for s in studies] == ["grids", "dp-cost", "span", "federated", "lora", "partial", "shapes",
                                         "headlines"]
    for study in studies:
        assert study.description and study.tables, study.name
        if study.plan is not None:
            works = study.work.functions.values() if isinstance(study.work, Measurements) else [study.work]
            assert {f.__module__ for f in works} == {f"gilib.studies.{study.name.replace('-', '_')}"}, study.name
            assert study.task_keys and study.line_key
    main(studies, [])  # no study named: the list
    listing = capsys.readouterr().out
    assert all(f"| {s.name} |" in listing for s in studies)


def test_every_help_page_prints_even_with_a_percent_sign_in_its_text(capsys):
    # argparse formats help with %: "95 %" in a table's help crashed `grids --help`.
    studies = all_studies()
    assert any("%" in t.help for s in studies for t in s.tables)
    for study in studies:
        commands = (["run"] if study.plan else []) + [t.name for t in study.tables]
        for argv in [[study.name, "--help"]] + [[study.name, c, "--help"] for c in commands]:
            with pytest.raises(SystemExit) as info:
                main(studies, argv)
            assert info.value.code == 0, argv
    assert "95 %" in capsys.readouterr().out


def test_errors_exit_with_status_2_and_a_message_not_a_traceback(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(all_studies(), ["span", "batches", str(tmp_path / "none.jsonl")])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "error:" in err and "has no 'batch' lines" in err and "Traceback" not in err
    garbage = tmp_path / "garbage.jsonl"
    garbage.write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff")
    with pytest.raises(SystemExit):
        main(all_studies(), ["grids", "table", str(garbage)])
    assert "is not a results file" in capsys.readouterr().err
    with pytest.raises(ValueError, match="only reads other studies' results"):
        Study("reader", "reads").run(tmp_path / "x.jsonl", [])


def test_measurements_run_the_named_one_on_one_thread_and_pickle_by_name(monkeypatch):
    threads = []
    monkeypatch.setattr(torch, "set_num_threads", threads.append)
    work = Measurements(_square)
    assert work("_square", 3) == [{"n": 3, "square": 9}] and threads == [1]
    assert pickle.loads(pickle.dumps(work))("_square", 4) == [{"n": 4, "square": 16}]
    with pytest.raises(ValueError, match="Unknown measurement 'cube': this study has _square"):
        work("cube", 2)
