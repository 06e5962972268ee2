"""Tests for gilib.book.summary: the one-page leakage table, on the cached results."""

import pytest

from gilib.book import summary
from gilib.studies import headlines


@pytest.fixture(scope="module")
def table():
    return summary.leakage_table()


@pytest.fixture(scope="module")
def numbers():
    return headlines.headline_numbers()


def test_one_row_per_shared_thing_and_attack_in_the_books_order(table):
    assert list(table.columns) == summary.COLUMNS
    assert list(zip(table["shared"], table["attack"])) == [
        ("every parameter but the word embeddings", summary.COSINE),
        ("one layer: layer 0", summary.COSINE),
        ("one linear weight: layer 0's query", summary.COSINE),
        ("one linear weight: layer 0's query", summary.SPAN),
        ("DP-SGD's message (σ = 0.01): every parameter", summary.COSINE),
        ("DP-SGD's message (σ = 0.01): layer 0's query", summary.COSINE),
    ]


def test_every_mean_sits_in_its_interval(table):
    assert (table["low"] <= table["rouge1"] + 1e-12).all() and (table["rouge1"] <= table["high"] + 1e-12).all()
    assert table["exact"].between(0, 1).all()


def test_the_optimisation_rows_are_the_headline_tables(table, numbers):
    """The same means, intervals and counts as the README's headline table (computed by grids.intervals)."""
    for i, key in enumerate(("full", "layer0", "query0")):
        row, headline = table.iloc[i], numbers[key]
        assert row["rouge1"] == pytest.approx(headline["rouge1"], abs=1e-4)
        assert row["low"] == pytest.approx(headline["rouge1_low"], abs=1e-4)
        assert row["high"] == pytest.approx(headline["rouge1_high"], abs=1e-4)
        assert row["sentences"] == headline["n"] == 30
        assert row["share (%)"] == pytest.approx(headline["share_pct"])


def test_the_cached_numbers(table):
    full, layer0, query, span, dp_full, dp_query = (table.iloc[i] for i in range(6))
    # The optimisation attack rebuilds part of the words, from less and less of the model.
    assert full["rouge1"] == pytest.approx(0.689, abs=0.005) and full["exact"] == pytest.approx(1 / 30)
    assert layer0["rouge1"] == pytest.approx(0.544, abs=0.005) and layer0["exact"] == 0
    assert query["rouge1"] == pytest.approx(0.394, abs=0.005) and query["share (%)"] == pytest.approx(0.65)
    # The span check recovers every one of its 12 sentences from the same weight.
    assert (span["rouge1"], span["low"], span["exact"], span["sentences"]) == (1.0, 1.0, 1.0, 12)
    assert span["source"] == "ch5_span.jsonl"
    # What a DP-SGD client sends (sigma = 0.01) leaves the optimisation attack nothing.
    for row in (dp_full, dp_query):
        assert row["sentences"] == 12 and row["high"] < 0.05 and row["exact"] == 0


def test_the_span_sentences_are_among_the_grids(table):
    """The span row's sentences are a subset of the query row's (chapter 5 attacks chapter 3's sample)."""
    from gilib.data import repo_root
    from gilib.studies.store import read_lines

    results = repo_root() / summary.RESULTS
    span_ids = {(l["dataset"], l["row_id"]) for l in read_lines(results / "ch5_span.jsonl")
                if l["study"] == "comparison" and l["component"] == "attention.query"}
    grid_ids = {(l["dataset"], l["row_id"]) for l in read_lines(results / "ch3_components.jsonl")
                if l["cell"]["component"] == "attention.query" and l["cell"]["layers"] == 0}
    assert len(span_ids) == 12 and span_ids <= grid_ids


def test_a_missing_row_is_an_error(tmp_path):
    (tmp_path / summary.RESULTS).mkdir(parents=True)
    for name in ("ch2_layers.jsonl", "ch3_components.jsonl", "ch4_dp.jsonl", "ch5_span.jsonl"):
        (tmp_path / summary.RESULTS / name).write_text("")
    with pytest.raises(ValueError, match="No cached lines"):
        summary.leakage_table(tmp_path)


def test_exact_reads_the_span_flag_or_a_perfect_rouge_l():
    assert summary._exact({"exact": True, "rougeL": 0.5})
    assert not summary._exact({"exact": False, "rougeL": 1.0})
    assert summary._exact({"rougeL": 1.0}) and not summary._exact({"rougeL": 0.99})
