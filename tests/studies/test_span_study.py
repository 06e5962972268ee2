"""Chapter 5's measurements: the profile of residuals, the candidate-set scores, the cached table."""

import json
from pathlib import Path

import pandas as pd
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


def _lines_file(tmp_path, lines):
    path = tmp_path / "span.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def test_the_summaries_give_chapter_5_its_tables_and_facts():
    # Every fact the chapter records comes with the table it is read from.
    comparison, facts = span_study.comparison_summary(RESULTS / "ch5_span.jsonl", RESULTS / "ch3_components.jsonl")
    span = comparison[comparison["attack"].str.startswith("span")]
    assert facts["span_exact_min"] == round(float(span["exact"].min()), 4)
    assert facts["comparison_markdown"] == span_study.markdown(comparison)
    by_weight, facts = span_study.components_summary(RESULTS / "ch5_span.jsonl")
    assert set(facts) == {"best_other", "best_other_accuracy", "best_other_exact", "layer1_query_accuracy",
                          "layer4_query_accuracy", "layer5_query_rank"}
    assert (0, "attention.query") in set(zip(by_weight["layers"], by_weight["component"]))
    assert "layer 0's attention.query" != facts["best_other"]
    by_method, facts = span_study.batch_summary(RESULTS / "ch5_span.jsonl")
    for _, row in by_method.iterrows():
        key = span_study.METHOD_KEYS[row["method"]]
        assert facts[f"{key}{row['batch_size']}_exact"] == round(float(row["exact"]), 4)
    assert facts["batch_markdown"] == span_study.batch_markdown(by_method)
    levels, facts = span_study.dp_summary(RESULTS / "ch5_span.jsonl")
    assert list(levels["noise_multiplier"]) == sorted(span_study.NOISE_MULTIPLIERS)
    assert facts["dp_half_sigma"] == min(s for s, a in zip(levels["noise_multiplier"], levels["accuracy"]) if a < 0.5)


def test_the_dp_summary_handles_a_check_that_never_breaks(tmp_path):
    base = {"study": "dp", "dataset": "cola", "row_id": 1, "true_median": 1e-7, "false_median": 0.1,
            "signal_norm": 0.01}
    lines = [{**base, "noise_multiplier": s, "token_accuracy": 1.0, "gap": 0.1, "noise_norm": s}
             for s in (0.0, 1e-6)]
    levels, facts = span_study.dp_summary(_lines_file(tmp_path, lines))
    assert facts == {"dp_half_sigma": None, "dp_exact_sigma0": 1.0, "dp_signal": 0.01, "dp_accuracy_1e-06": 1.0}


def test_the_model_likelihood_summary_counts_misses_and_refuses_a_file_without_basin_lines(tmp_path):
    lines = [
        # sigma 3e-5: two misses (one the energy prefers, both the model), one exact sentence.
        {"sigma": 3e-5, "exact": False, "truth_minus_found": 0.01, "model_truth_minus_found": -0.1,
         "excess_found": 0.2, "excess_truth": 0.0, "excess_one_wrong": 0.3, "excess_half_wrong": 0.8},
        {"sigma": 3e-5, "exact": False, "truth_minus_found": -0.02, "model_truth_minus_found": -0.2,
         "excess_found": 0.4, "excess_truth": 0.0, "excess_one_wrong": 0.5, "excess_half_wrong": 1.0},
        {"sigma": 3e-5, "exact": True, "truth_minus_found": 0.0, "model_truth_minus_found": 0.0,
         "excess_found": None, "excess_truth": None, "excess_one_wrong": None, "excess_half_wrong": None},
        # sigma 1e-3: no --basin: no row.
        {"sigma": 1e-3, "exact": False, "truth_minus_found": -0.2, "model_truth_minus_found": -0.001,
         "excess_found": None, "excess_truth": None, "excess_one_wrong": None, "excess_half_wrong": None},
    ]
    path = tmp_path / "dp_energy.csv"
    pd.DataFrame(lines).to_csv(path, index=False)
    table, facts = span_study.dp_model_summary(path)
    assert table["sigma"].tolist() == ["3e-05"]
    assert (facts["dpm_missed_3e-05"], facts["dpm_energy_3e-05"], facts["dpm_model_3e-05"]) == (2, 1, 2)
    assert facts["dpm_one_3e-05"] == pytest.approx(0.4) and facts["dpm_half_3e-05"] == pytest.approx(0.9)
    assert table.iloc[0]["found: excess over the floor"] == "30 %"
    pd.DataFrame(lines).drop(columns=[c for c in lines[0] if c.startswith("excess")]).to_csv(path, index=False)
    with pytest.raises(ValueError, match="--basin"):
        span_study.dp_model_summary(path)


def test_the_prior_summary_compares_the_most_probable_sentence_and_refuses_a_file_without_it(tmp_path):
    # Two sentences at two sigmas: the old check crosses one half between 1e-6 and 1e-5, the prior check
    # between 1e-5 and 1e-4 (log-linear: 0.7 -> 0.3 at 1e-5 -> 1e-4 crosses at 1e-5 * 10^0.5).
    accuracy = {("old", 1e-6): (0.6, 0.8), ("old", 1e-5): (0.2, 0.4), ("new", 1e-6): (0.9, 0.9),
                ("new", 1e-5): (0.5, 0.7), ("prior", 1e-6): (1.0, 1.0), ("prior", 1e-5): (0.6, 0.8),
                ("old", 1e-4): (0.0, 0.0), ("new", 1e-4): (0.1, 0.1), ("prior", 1e-4): (0.2, 0.4)}
    lines = [{"dataset": "cola", "row_id": row, "tokens": 8, "sigma": sigma, "check": check,
              "prior_weight": 16.0 if check == "prior" else None, "token_accuracy": values[row],
              "exact": values[row] == 1.0, "seconds": 10.0 + row, "floor_z": 0.1 if values[row] == 1.0 else 9.0}
             for (check, sigma), values in accuracy.items() for row in (0, 1)]
    path = tmp_path / "dp_span.csv"
    pd.DataFrame(lines).to_csv(path, index=False)
    table, prior_facts = span_study.dp_prior_summary(path)
    _, facts = span_study.dp_likelihood_summary(path)
    assert prior_facts == {"dpl_prior_weight": 16.0} and not set(prior_facts) & set(facts)  # each recorded once
    assert table["sigma"].tolist() == ["1e-06", "1e-05", "1e-04"]
    assert table["exact (prior)"].tolist() == ["2 of 2", "0 of 2", "0 of 2"]
    assert table["missed, told apart (z > 3)"].tolist() == ["0 of 0", "2 of 2", "2 of 2"]
    assert table["s (prior, median)"].tolist() == [10.5] * 3
    assert facts["dpl_prior_1e-05"] == 0.7
    assert facts["dpl_old_half"] == float(f"{1e-6 * 10 ** (0.2 / 0.4):.1e}")
    assert facts["dpl_prior_half"] == float(f"{1e-5 * 10 ** 0.5:.1e}")
    assert facts["dpl_prior_half_ratio"] == round(facts["dpl_prior_half"] / facts["dpl_old_half"], 1)
    pd.DataFrame([line for line in lines if line["check"] != "prior"]).to_csv(path, index=False)
    with pytest.raises(ValueError, match="--checks old new prior"):
        span_study.dp_prior_summary(path)


def test_the_readme_tables_carry_an_interval_for_every_rouge_mean_and_exact_share():
    from gilib.metrics import share_interval

    comparison = span_study.comparison_table(RESULTS / "ch5_span.jsonl", RESULTS / "ch3_components.jsonl")
    span = comparison[comparison["attack"].str.startswith("span")]
    # Twelve of twelve exact: Wilson's interval, not a bootstrap's [1, 1].
    assert (span["exact_low"] == share_interval(12, 12)[1]).all() and (span["sentences"] == 12).all()
    other = comparison[~comparison["attack"].str.startswith("span")]
    assert other["exact_low"].isna().all() and (other["rouge1_low"] < other["rouge1"]).all()
    assert (other["rouge1"] < other["rouge1_high"]).all()
    assert "| 1.00 [1.00, 1.00] | 1.00 | 100% [76%, 100%] |" in span_study.markdown(comparison)
    batches = span_study.batch_table(RESULTS / "ch5_span.jsonl")
    enumerate2 = batches[(batches["method"] == "enumerate, layer 0+1") & (batches["batch_size"] == 2)].iloc[0]
    assert enumerate2["exact_low"] < enumerate2["exact"] < enumerate2["exact_high"] < 1
    assert "[95 %]" in span_study.batch_markdown(batches)


def test_a_time_budget_bounds_each_batch_of_the_span_study():
    assert {t[-1] for t in span_study.plan(1, time_budget=30.0) if t[0] == "measure_batch"} == {30.0}
    (line,) = span_study.measure_batch("sample", ("peel, layer 0+1", load_split("sample")[:3]), time_budget=1e-6)
    assert line["timed_out"] is True and line["exact"] < 1.0
    with pytest.raises(ValueError, match="time_budget"):
        span_study.plan(1, time_budget=0)
