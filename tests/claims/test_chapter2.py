"""Chapter 2 (one Transformer layer): its prose claims, checked against the cached results it draws on.

Each test quotes a sentence of the chapter and checks it against
``data/results``; a test fails when its sentence is false of those
numbers, and then the prose or the numbers need fixing, not the test.
"""

from __future__ import annotations

import inspect

from gilib.studies import grids

from tests.claims.cached import LARGE_PART, CLOSE, cached, summary, sentences, ch2_rouge1, batch_table


def test_chapter2_two_adjacent_layers_come_close_to_the_full_model():
    # "Two adjacent layers (0+1) come close to the full model."
    assert abs(ch2_rouge1("0+1") - ch2_rouge1("all", "full")) <= CLOSE


def test_chapter2_the_whole_encoder_scores_only_a_little_higher_than_two_layers():
    # Solution 1: "the second layer lifts layer 0 close to the full model,
    # and even the whole encoder scores only a little higher".
    assert ch2_rouge1("0") < ch2_rouge1("0+1") and ch2_rouge1("all", "full") - ch2_rouge1("0+1") <= CLOSE
    assert 0 < ch2_rouge1("all", "encoder") - ch2_rouge1("0+1") <= CLOSE


def test_chapter2_the_grid_ran_a_tenth_of_the_papers_steps():
    # "The attack ran 200 steps, a tenth of the paper's 2000".
    assert {r["cell"]["steps"] for r in cached("ch2_layers.jsonl")} == {200}


def test_chapter2_sst2_is_its_validation_split_the_others_their_training_splits():
    # "CoLA and Rotten Tomatoes from their training splits, SST-2 from its
    # validation split", in every grid the chapters read (chapters 2 to 4).
    for name in ("ch2_layers.jsonl", "ch3_components.jsonl", "ch4_dp.jsonl"):
        assert {(r["dataset"], r["split"]) for r in cached(name)} == {
            ("cola", "train"), ("sst2", "validation"), ("rotten_tomatoes", "train")}, name


def test_chapter2_cola_is_short_the_review_sentences_whole():
    # "CoLA's short sentences (4 to 10 word pieces) ... The whole review
    # sentences of SST-2 (18 to 28 word pieces) and Rotten Tomatoes (23 to
    # 30)": no review sentence is as short as CoLA's longest.
    lengths = grids.sentence_lengths(list(cached("ch2_layers.jsonl"))).set_index("dataset")
    assert set(lengths["sentences"]) == {4}
    assert lengths.loc["cola", "max"] < min(lengths.loc["sst2", "min"], lengths.loc["rotten_tomatoes", "min"])


def test_chapter2_review_sentences_are_the_hard_case_for_every_selection():
    # "CoLA's short sentences ... are recovered best, by every selection ...
    # every selection recovers at least 0.1 ROUGE-1 less of them than of CoLA's".
    per_dataset = summary("ch2_layers.jsonl", ["component", "layers", "dataset"])
    pivot = per_dataset.pivot_table(index=["component", "layers"], columns="dataset", values="rouge1")
    gap = pivot["cola"] - pivot[["sst2", "rotten_tomatoes"]].max(axis=1)
    assert (gap >= 0.1).all(), gap.round(2).to_dict()


def test_chapter2_batches_of_two_cost_little_batches_of_four_more_than_a_tenth():
    # "With two sentences in one gradient ROUGE-1 drops by at most 0.05 ...,
    # with four by more than 0.1 ...: still a large part of the words".
    table = batch_table("ch2_layers.jsonl")
    assert {(c, l) for c, l, _ in table.index} == {("full", "all"), ("layer", "0")}
    for component, layers in (("full", "all"), ("layer", "0")):
        r1 = table.loc[(component, layers), "rouge1"]
        assert list(r1.index) == [1, 2, 4]
        assert 0 <= r1[1] - r1[2] <= 0.05, r1.round(3).to_dict()
        assert r1[1] - r1[4] > 0.1 and r1[4] >= LARGE_PART, r1.round(3).to_dict()


def test_chapter2_rouge2_shows_no_trend_with_the_batch_size():
    # "ROUGE-2 shows no trend at these sizes: its changes are smaller than its
    # spread over sentences."
    table = batch_table("ch2_layers.jsonl")
    for selection in (("full", "all"), ("layer", "0")):
        part = table.loc[selection]
        assert ((part["rouge2"] - part.loc[1, "rouge2"]).abs() < part.loc[1, "rouge2_std"]).all()


def test_chapter2_every_batch_size_attacks_the_same_sentences_once():
    # "on the same sentences (each dataset's four form two batches of two, or
    # one of four)": every sentence has one line per batch size, and a batch
    # holds sentences of one dataset.
    rows = cached("ch2_layers.jsonl")
    single = sentences(r for r in rows if "batch_size" not in r["cell"])
    for size in (2, 4):
        lines = [r for r in rows if r["cell"].get("batch_size") == size]
        for component in ("full", "layer"):
            mine = [r for r in lines if r["cell"]["component"] == component]
            assert sorted((r["dataset"], r["row_id"]) for r in mine) == sorted(single)
            assert all(len(r["batch"]) == size and r["row_id"] in r["batch"] for r in mine)
    assert batch_table("ch2_layers.jsonl")["n"].eq(12).all()


def test_chapter2_the_truth_enters_run_task_only_through_the_metrics():
    # Solution 3: "`rouge_scores(result.texts[j], ex.text)`, and for a batch
    # ... `match_batch(result.texts, references)` just before it ... the truth
    # enters only the metrics, after the attack has returned."
    source = inspect.getsource(grids.run_task)
    assert "rouge_scores(result.texts[j], ex.text)" in source
    assert "match_batch(result.texts, references)" in source
    assert source.index("attack_clients(") < source.index("match_batch(") < source.index("rouge_scores(")
