"""The shapes study: parameter shares of the paper's victims, the span check on random weights, its tables."""

import json

import pytest

from gilib.data import load_split
from gilib.studies import all_studies
from gilib.studies import shapes
from gilib.studies.study import main


def test_layer_0_query_is_0_54_percent_of_bert_base_as_the_paper_says():
    lines = {line["component"]: line for line in shapes.measure_shares("bert-base-shape")}
    query = lines["attention.query"]
    assert query["checkpoint"] == "bert-base-uncased" and query["weight_shape"] == [768, 768]
    assert query["numel"] == 768 * 768
    assert round(100 * query["fraction"], 2) == 0.54
    # The FFN's two weights are four times the query; the whole layer is 7.08M parameters.
    assert lines["ffn.intermediate"]["numel"] == lines["ffn.output"]["numel"] == 4 * query["numel"]
    assert lines["layer"]["numel"] == 7_087_872
    assert {line["params"] for line in lines.values()} == {109_483_778}


def test_tinybert_4_has_its_own_widths_and_a_larger_query_share():
    lines = {line["component"]: line for line in shapes.measure_shares("tinybert-4-shape")}
    assert lines["attention.query"]["weight_shape"] == [312, 312]
    assert lines["ffn.intermediate"]["weight_shape"] == [1200, 312]
    assert lines["attention.query"]["checkpoint"] == "huawei-noah/TinyBERT_General_4L_312D"
    # A small model: the word embeddings dominate, so one weight is a smaller share than in BERT-base.
    assert lines["attention.query"]["fraction"] == pytest.approx(312 * 312 / 14_350_874)


def test_paired_token_accuracy_pairs_sentences_of_equal_length_in_any_order():
    truth = [[101, 5, 6, 102], [101, 7, 8, 102], [101, 9, 102]]
    # The two 4-token sentences come back swapped, one token of one of them wrong.
    recovered = [[101, 7, 3, 102], [101, 5, 6, 102], [101, 9, 102]]
    assert shapes.paired_token_accuracy(recovered, truth) == pytest.approx(4 / 5)
    assert shapes.paired_token_accuracy(truth, truth) == 1.0


def test_the_span_check_on_the_tiny_random_model_recovers_one_sentence_exactly():
    example = load_split("sample")[0]
    (line,) = shapes.measure_batch("tiny", "sample", [example])
    assert line["refused"] is False and line["exact"] == 1.0 and line["token_accuracy"] == 1.0
    assert line["selection"] == "attention.query L0" and line["width"] == 64
    assert line["rank"] == line["tokens"] == len(example.text.split()) + 2  # one direction per token


def test_a_batch_with_as_many_tokens_as_the_width_is_refused_by_the_check():
    batch = load_split("sample")[:8]
    (line,) = shapes.measure_batch("tiny", "sample", batch)
    assert line["tokens"] >= line["width"] == 64
    assert line["refused"] is True and "exact" not in line and "seconds" not in line


def test_a_run_resumes_from_its_keys(tmp_path):
    example = load_split("sample")[0]
    tasks = [("measure_shares", "tiny"), ("measure_batch", "tiny", "sample", [example], 1)]
    out = tmp_path / "shapes.jsonl"
    lines = shapes.STUDY.run(out, tasks, progress=False)
    assert len(lines) == len(shapes.COMPONENTS) + 1
    assert shapes.STUDY.run(out, tasks, progress=False) == lines  # nothing left to run


def test_the_plan_attacks_every_shape_on_the_same_batches():
    tasks = shapes.plan(["minilm", "minilm-shape"], [1, 16], datasets=["cola"])
    batches = [t for t in tasks if t[0] == "measure_batch"]
    assert [t[0] for t in tasks].count("measure_shares") == 2
    assert len(batches) == 2 * (shapes.BATCHES[1] + shapes.BATCHES[16])
    ids = {shape: [[e.row_id for e in t[3]] for t in batches if t[1] == shape] for shape in ("minilm", "minilm-shape")}
    assert ids["minilm"] == ids["minilm-shape"] and [len(i) for i in ids["minilm"]] == [1] * 4 + [16] * 2
    with pytest.raises(ValueError, match="No batch count for batch size 3"):
        shapes.plan(sizes=[3])


def _batch(shape, dataset, ids, size, tokens, width, exact=None, accuracy=None, seconds=None):
    line = {"study": "batch", "shape": shape, "checkpoint": shape, "dataset": dataset, "row_ids": ids,
            "batch_size": size, "tokens": tokens, "width": width, "refused": tokens >= width}
    if tokens < width:
        line.update({"exact": exact, "token_accuracy": accuracy, "seconds": seconds})
    return line


@pytest.fixture
def results(tmp_path):
    lines = [
        {"study": "shares", "shape": "minilm", "checkpoint": "minilm", "component": c, "layers": 0,
         "layer_count": 6, "hidden": 384, "params": 1000, "fraction": f}
        for c, f in (("attention.query", 0.0065), ("layer", 0.0781))
    ] + [
        _batch("minilm", "cola", [1], 1, 12, 384, 1.0, 1.0, 0.5),
        _batch("minilm", "cola", [2], 1, 14, 384, 1.0, 1.0, 0.7),
        _batch("minilm", "cola", [1, 2], 2, 26, 384, 1.0, 1.0, 2.0),
        _batch("minilm", "cola", [3, 4], 2, 30, 384, 0.5, 0.75, 9.0),
        _batch("minilm", "sst2", [5, 6], 2, 400, 384),
        _batch("minilm-shape", "cola", [1, 2], 2, 26, 384, 1.0, 1.0, 1.5),
        _batch("minilm-shape", "cola", [3, 4], 2, 30, 384, 1.0, 1.0, 3.0),
        _batch("minilm-shape", "sst2", [5, 6], 2, 400, 384),
    ]
    path = tmp_path / "shapes.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def test_the_tables_read_a_results_file(results, capsys):
    shares = shapes.shares_table(results).set_index("shape")
    assert shares.loc["minilm", "attention.query"] == 0.65 and shares.loc["minilm", "layer"] == 7.81

    table = shapes.batch_table(results).set_index(["shape", "batch_size"])
    two = table.loc[("minilm", 2)]
    assert (two["batches"], two["attacked"], two["refused"], two["sentences"]) == (3, 2, 1, 4)
    assert two["exact"]["mean"] == 0.75 and two["exact"]["low"] == 0.5 and two["exact"]["high"] == 1.0
    assert two["seconds"] == 5.5 and two["seconds_max"] == 9.0

    largest = shapes.largest_table(results).set_index(["shape", "dataset"])
    # Batch size 1 is exact throughout, batch size 2 not: the largest resolved is 1.
    assert largest.loc[("minilm", "cola"), "resolved"] == 1
    assert largest.loc[("minilm-shape", "cola"), "resolved"] == 2
    assert largest.loc[("minilm", "sst2"), "resolved"] == 0
    assert largest.loc[("minilm", "sst2"), "first_refused"] == 2

    weights = shapes.weights_table(results).set_index("batch_size")
    assert weights.loc[2, "batches"] == 3 and weights.loc[2, "same_refusal"] == 1.0
    assert weights.loc[2, "exact_random"] == 1.0 and weights.loc[2, "exact_trained"] == 0.75
    assert weights.loc[2, "same_exact"] == 0.5

    assert main(all_studies(), ["shapes", "batches", str(results)]) == 0
    printed = capsys.readouterr().out
    assert "| minilm | 2 | 2 | 1 | 152.0 | 75% [50%, 100%] | 0.88 [0.75, 1.00] | 5.5 | 9.0 |" in printed
    # A group whose every batch was refused has nothing to average: dashes, not NaN.
    assert main(all_studies(), ["shapes", "batches", str(results), "--by", "shape", "dataset", "batch_size"]) == 0
    assert "| minilm | sst2 | 2 | 0 | 1 | 400.0 | – | – | – | – |" in capsys.readouterr().out
    for name in ("shares", "largest", "weights"):
        assert main(all_studies(), ["shapes", name, str(results)]) == 0
        assert capsys.readouterr().out.startswith("| ")


def test_a_file_without_batch_lines_says_how_to_make_them(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text('{"study": "shares"}\n')
    with pytest.raises(ValueError, match="python -m gilib.studies shapes run"):
        shapes.batch_table(path)


def test_a_time_budget_bounds_each_batch_and_the_line_says_when_it_ran_out():
    batch = load_split("sample")[:3]
    (line,) = shapes.measure_batch("tiny", "sample", batch, 1, time_budget=1e-6)
    assert line["time_budget"] == 1e-6 and line["timed_out"] is True and line["exact"] < 1.0
    (free,) = shapes.measure_batch("tiny", "sample", batch, 1)
    assert "time_budget" not in free and free["timed_out"] is False
    assert [t[-1] for t in shapes.plan(["tiny"], [1], datasets=["cola"], time_budget=60.0)[1:]] == [60.0] * 4
    for bad in (0, -5.0, float("nan")):
        with pytest.raises(ValueError, match="time_budget"):
            shapes.plan(["tiny"], [1], datasets=["cola"], time_budget=bad)
