"""The results store: safe appends after a kill, strict reads, clear errors for files that are not results."""

import pytest

from gilib.studies import store


def test_a_cut_last_line_is_repaired_before_appending(tmp_path):
    path = tmp_path / "r.jsonl"
    store.append_lines(path, [{"n": 1}])
    with path.open("a") as f:
        f.write('{"n": 2, "squ')  # a run killed mid-write
    assert store.read_lines(path) == [{"n": 1}]  # the cut line is not a record
    store.append_lines(path, [{"n": 3}])
    assert path.read_text() == '{"n": 1}\n{"n": 3}\n'  # and it never fuses with the next one


def test_a_damaged_line_before_the_end_is_an_error(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text('{"n": 1}\nnot json\n{"n": 2}\n')
    with pytest.raises(ValueError, match="line 2, is not JSON"):
        store.read_lines(path)


@pytest.mark.parametrize("text, line", [('{"n": 1}\n[1, 2]\n', 2), ('3\n{"n": 1}\n', 1), ('{"n": 1}\nnot json\n', 2)])
def test_a_complete_line_that_is_not_a_json_object_is_an_error(tmp_path, text, line):
    # A last line that ends with its newline was written whole: damaged, not cut.
    path = tmp_path / "r.jsonl"
    path.write_text(text)
    with pytest.raises(ValueError, match=f"line {line}, is not JSON"):
        store.read_lines(path)


def test_a_binary_file_is_not_a_results_file(tmp_path):
    path = tmp_path / "garbage.jsonl"
    path.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(ValueError, match="is not a results file: byte 128 is not UTF-8 text"):
        store.read_lines(path)
    with pytest.raises(ValueError, match="is a folder"):
        store.read_lines(tmp_path)


def test_a_missing_file_has_no_lines_and_a_missing_part_says_how_to_make_it(tmp_path):
    assert store.read_lines(tmp_path / "none.jsonl") == []
    path = tmp_path / "r.jsonl"
    store.append_lines(path, [{"study": "dp", "x": 1}, {"study": "batch", "x": 2}])
    assert store.study_frame(path, "batch", "CMD")["x"].tolist() == [2]
    with pytest.raises(ValueError, match="has no 'secure' lines: run CMD"):
        store.study_frame(path, "secure", "CMD")
