"""Tests for gilib.data: split sizes, Hugging Face row order, LAMP sampling, errors."""

from __future__ import annotations

import sys
from collections import Counter

import pytest

from gilib import data
from gilib.data import (
    DATASETS,
    Example,
    default_data_dir,
    load_hub_split,
    load_split,
    sample_batches,
    shuffled_indices,
)

DATA_DIR = default_data_dir()
needs_data = pytest.mark.skipif(
    DATA_DIR is None or not DATA_DIR.is_dir(), reason="benchmark data folder not found (set GILIB_DATA_DIR)"
)


# ---------------------------------------------------------------- bundled sample


def test_sample_is_large_enough_and_balanced():
    rows = load_split("sample")
    assert len(rows) >= 40
    assert all(isinstance(r, Example) and r.dataset == "sample" and r.split == "train" for r in rows)
    tasks = _sample_tasks()
    assert set(tasks.values()) == {"acceptability", "sentiment"}
    for task in ("acceptability", "sentiment"):
        labels = Counter(r.label for r in rows if tasks[r.row_id] == task)
        assert set(labels) == {0, 1}, task
        assert labels[0] == labels[1], task  # balanced within each task


def test_sample_mixes_short_and_long_sentences():
    lengths = [len(r.text.split()) for r in load_split("sample")]
    assert any(n < 8 for n in lengths)
    assert any(n >= 15 for n in lengths)


def test_sample_ids_are_unique_and_contiguous():
    ids = [r.row_id for r in load_split("sample")]
    assert ids == list(range(len(ids)))


def test_sample_demo_rows_are_short_plain_ascii():
    for row in load_split("sample")[:6]:
        assert row.text.isascii()
        assert 3 <= len(row.text.split()) <= 8


def test_sample_ignores_data_dir(tmp_path):
    assert load_split("sample", data_dir=tmp_path) == load_split("sample")


def _sample_tasks() -> dict[int, str]:
    """Map id -> task, read straight from the TSV (load_split does not expose the task)."""
    lines = (data.repo_root() / data.SAMPLE_FILE).read_text(encoding="ascii").splitlines()
    assert lines[0].split("\t") == ["id", "task", "label", "sentence"]
    return {int(cols[0]): cols[1] for cols in (line.split("\t") for line in lines[1:])}


# ---------------------------------------------------------------- local benchmarks


@needs_data
def test_cola_train_and_lamp_shuffle():
    train = load_split("cola", "train")
    assert len(train) == 8551
    assert [r.row_id for r in train[:3]] == [0, 1, 2]
    # eth-sri/lamp asserts idxs[0] == 2310 for CoLA with seed 101.
    assert shuffled_indices(len(train), 101)[:5] == [2310, 5604, 5827, 6564, 943]


@needs_data
def test_cola_rows_match_file():
    first = (DATA_DIR / "cola" / "train.tsv").read_text(encoding="utf-8").split("\n")[0].split("\t")
    row = load_split("cola", "train")[0]
    assert (row.label, row.text) == (int(first[1]), first[3])
    assert Counter(r.label for r in load_split("cola", "train")) == {1: 6023, 0: 2528}


@needs_data
def test_cola_validation_is_in_domain_then_out_of_domain():
    val = load_split("cola", "validation")
    assert len(val) == 1043
    assert Counter(r.label for r in val) == {1: 365 + 354, 0: 162 + 162}
    ood_first = (DATA_DIR / "cola" / "out_of_domain_dev.tsv").read_text(encoding="utf-8").split("\n")[0]
    assert val[527].text == ood_first.split("\t")[3]


@needs_data
def test_sst2_sizes_and_trailing_space():
    train = load_split("sst2", "train")
    assert len(train) == 67349
    assert len(load_split("sst2", "validation")) == 872
    header, first = (DATA_DIR / "sst2" / "train.tsv").read_text(encoding="utf-8").split("\n")[:2]
    assert header == "sentence\tlabel"
    sentence, label = first.split("\t")
    assert sentence.endswith(" ")
    assert (train[0].text, train[0].label) == (sentence, int(label))


@needs_data
def test_rotten_tomatoes_hf_splits():
    train = load_split("rotten_tomatoes", "train")
    assert len(train) == 8530
    assert [r.label for r in train] == [1] * 4265 + [0] * 4265
    assert len(load_split("rotten_tomatoes", "validation")) == 1066
    test = load_split("rotten_tomatoes", "test")
    assert len(test) == 1066
    assert Counter(r.label for r in test) == {1: 533, 0: 533}


@needs_data
def test_rotten_tomatoes_decoding_matches_hf():
    pos = DATA_DIR / "rotten_tomatoes" / "rt-polarity.pos"
    with pos.open(encoding="latin-1") as f:  # what the HF loading script does
        expected = [line.strip() for line in f.readlines()]
    train = load_split("rotten_tomatoes", "train")
    assert [r.text for r in train[:4265]] == expected[:4265]
    assert load_split("rotten_tomatoes", "test")[532].text == expected[-1]


@needs_data
def test_repeated_loads_are_cached():
    a, b = load_split("sst2", "train"), load_split("sst2", "train")
    assert a == b and a is not b  # fresh list each call ...
    assert all(x is y for x, y in zip(a[:100], b[:100]))  # ... of the same cached rows


# ---------------------------------------------------------------- sampling


def test_shuffled_indices_is_a_permutation_and_leaves_global_state_alone():
    import numpy as np

    np.random.seed(0)
    before = np.random.get_state()[1].copy()
    idxs = shuffled_indices(50, seed=7)
    assert sorted(idxs) == list(range(50))
    assert idxs != list(range(50))
    assert (np.random.get_state()[1] == before).all()


def test_same_seed_same_batches_different_seed_different_batches():
    rows = load_split("sample")
    a = sample_batches(rows, n_batches=3, batch_size=4, seed=101)
    b = sample_batches(rows, n_batches=3, batch_size=4, seed=101)
    c = sample_batches(rows, n_batches=3, batch_size=4, seed=102)
    assert a == b
    assert a != c
    assert [len(batch) for batch in a] == [4, 4, 4]
    flat = [r.row_id for batch in a for r in batch]
    assert len(set(flat)) == 12


def test_batches_follow_the_lamp_order():
    rows = load_split("sample")
    batches = sample_batches(rows, n_batches=2, batch_size=3, seed=5)
    expected = [rows[i] for i in shuffled_indices(len(rows), 5)[:6]]
    assert batches == [expected[:3], expected[3:]]


# ---------------------------------------------------------------- errors


def test_unknown_dataset():
    with pytest.raises(ValueError, match="Unknown dataset 'imdb'") as info:
        load_split("imdb")
    assert all(name in str(info.value) for name in DATASETS)


def test_unknown_split():
    with pytest.raises(ValueError, match=r"Unknown split 'validation'.*valid splits are \('train',\)"):
        load_split("sample", "validation")
    with pytest.raises(ValueError, match="Unknown split 'test'"):
        load_split("cola", "test")


def test_missing_data_dir(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="GILIB_DATA_DIR") as info:
        load_split("cola", "train", data_dir=missing)
    assert str(missing / "cola" / "train.tsv") in str(info.value)
    assert 'dataset="sample"' in str(info.value)


def test_env_var_sets_default_data_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("GILIB_DATA_DIR", str(tmp_path))
    assert default_data_dir() == tmp_path
    with pytest.raises(FileNotFoundError, match="Expected data file"):
        load_split("sst2", "validation")


def test_too_many_examples_requested():
    rows = load_split("sample")
    with pytest.raises(ValueError, match="only 8 are available"):
        sample_batches(rows[:8], n_batches=3, batch_size=3)
    with pytest.raises(ValueError, match="must be positive"):
        sample_batches(rows, n_batches=0, batch_size=4)


def test_hub_without_datasets_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(RuntimeError, match="not installed.*load_split"):
        load_hub_split("cola")
    with pytest.raises(ValueError, match="Unknown dataset 'sample'"):
        load_hub_split("sample")


def test_local_splits_name_what_load_split_reads():
    from gilib.data import local_splits

    assert local_splits("sample") == ("train",)
    assert local_splits("rotten_tomatoes") == ("train", "validation", "test")
    with pytest.raises(ValueError, match="Unknown dataset 'imdb'"):
        local_splits("imdb")


def test_a_bench_writes_its_command_and_machine_beside_its_csv(tmp_path):
    import json

    from gilib.data import write_settings

    out = tmp_path / "bench.csv"
    written = write_settings(out, "bench/x.py", ["--batches", "2"], batches=2, sizes=[1, 2])
    stored = json.loads(out.with_suffix(".json").read_text())
    assert stored == written
    assert stored["command"] == "python bench/x.py --batches 2"
    assert list(stored)[:3] == ["command", "batches", "sizes"] and stored["threads"] == 1
    assert stored["commit"] and stored["torch"] and "cores" in stored["machine"]
