"""Chapter 5's measurements: the profile of residuals, the candidate-set scores, the cached table."""

from pathlib import Path

import pytest
import torch

from gilib.data import load_split
from gilib.studies import span as span_study

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "data" / "results"


def test_residual_profile_compares_the_worst_true_token_with_the_best_false_one():
    residuals = torch.tensor([[1e-7, 0.2, 0.5], [0.3, 2e-7, 0.1], [0.05, 0.04, 1e-6]], dtype=torch.float64)
    profile = span_study.residual_profile(residuals, [0, 1, 2])
    assert profile["true_max"] == pytest.approx(1e-6)
    assert profile["false_min"] == pytest.approx(0.04)
    assert profile["gap"] == pytest.approx(0.04 - 1e-6)
    assert profile["token_accuracy"] == 1.0
    # A false token below a true one: negative gap, the position is lost.
    wrong = span_study.residual_profile(residuals, [0, 1, 0])
    assert wrong["gap"] < 0 and wrong["token_accuracy"] == pytest.approx(2 / 3)


def test_candidate_sets_are_scored_against_the_true_tokens_per_position():
    truth = [[101, 7, 8, 102], [101, 9, 102]]
    quality = span_study._set_quality([[7, 9, 5], [8]], truth)
    assert quality == {"set_recall": 1.0, "set_precision": 0.75}


def test_a_study_missing_from_a_results_file_says_how_to_make_it(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text('{"study": "dp"}\n')
    with pytest.raises(ValueError, match="python -m gilib.studies span run"):
        span_study.load(path, "batch")


def test_the_readme_repeats_the_cached_comparison_table():
    table = span_study.comparison_table(RESULTS / "ch5_span.jsonl", RESULTS / "ch3_components.jsonl")
    assert len(table) == 6 and set(table["sentences"]) == {12}
    text = (ROOT / "README.md").read_text()
    assert span_study.markdown(table) in text, (
        "update the README: python -m gilib.studies span table data/results/ch5_span.jsonl "
        "data/results/ch3_components.jsonl")


def test_the_components_measurement_separates_only_layer_0_input_projections():
    example = load_split("sample")[0]
    lines = {(line["component"], line["layers"]): line for line in span_study.measure_components("sample", example)}
    assert lines[("attention.query", 0)]["token_accuracy"] == 1.0 and lines[("attention.query", 0)]["gap"] > 0.01
    assert lines[("attention.query", 0)]["rank"] == lines[("attention.query", 0)]["tokens"]
    # The attention output's inputs are not the embeddings: no token is named.
    assert lines[("attention.output", 0)]["gap"] < 0 and lines[("attention.output", 0)]["token_accuracy"] < 0.5
    # The second FFN weight reads the 1536-wide activation: not comparable.
    assert lines[("ffn.output", 0)] == {**lines[("ffn.output", 0)], "applicable": False, "input_width": 1536}


@pytest.mark.parametrize("method", list(span_study.METHODS))
def test_the_batch_measurement_recovers_two_bundled_sentences_exactly(method):
    (line,) = span_study.measure_batch("sample", (method, load_split("sample")[:2]))
    assert not line["refused"] and line["exact"] == 1.0 and line["rouge1"] == 1.0
    assert line["tokens"] < line["hidden"] and line["batch_size"] == 2
    if method.startswith("peel"):
        assert line["found"] == 1.0 and line["labels_right"] == 1.0 and line["uncertain_positions"] == 0
        assert line["set_recall"] == 1.0 and line["rank"] <= line["tokens"]


def test_a_batch_wider_than_the_hidden_size_is_recorded_as_refused():
    examples = load_split("sample")
    (line,) = span_study.measure_batch("sample", ("peel, layer 0+1", examples))
    assert line["refused"] and line["tokens"] >= line["hidden"] and "exact" not in line
