"""Chapter 2 (one Transformer layer): its prose claims, checked against the cached results it draws on.

Each test quotes a sentence of the chapter and checks it against
``data/results``; a test fails when its sentence is false of those
numbers, and then the prose or the numbers need fixing, not the test.
"""

from __future__ import annotations

import inspect

from gilib.studies import grids

from tests.claims.cached import CLOSE, batch_table, cached, ch2_rouge1, first_sentences, summary


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


def test_chapter2_cola_is_short_the_review_sentences_mostly_longer():
    # "CoLA's short sentences (4 to 18 word pieces) ... The review sentences of
    # SST-2 (5 to 42 word pieces) and Rotten Tomatoes (18 to 43) are mostly
    # longer": each review set's median is more than twice CoLA's.
    lengths = grids.sentence_lengths(list(cached("ch2_layers.jsonl"))).set_index("dataset")
    assert set(lengths["sentences"]) == {10}
    assert lengths.loc["cola", "median"] < 0.5 * min(lengths.loc["sst2", "median"],
                                                      lengths.loc["rotten_tomatoes", "median"])


def test_chapter2_cola_has_the_highest_mean_under_every_selection():
    # "CoLA's short sentences ... have the highest mean under every selection."
    per_dataset = summary("ch2_layers.jsonl", ["component", "layers", "dataset"])
    pivot = per_dataset.pivot_table(index=["component", "layers"], columns="dataset", values="rouge1")
    gap = pivot["cola"] - pivot[["sst2", "rotten_tomatoes"]].max(axis=1)
    assert (gap > 0).all(), gap.round(2).to_dict()


def test_chapter2_batching_costs_the_full_model_and_layer_0_words_paired_over_the_same_sentences():
    # "Paired over the same 24 sentences ... two sentences in one gradient cost
    # the full model ... and layer 0 ...; four cost ..." (intervals excluding 0).
    rows = list(cached("ch2_layers.jsonl"))
    for component, layers in (("full", None), ("layer", 0)):
        two, four = (grids.batch_cost(rows, component, layers, size) for size in (2, 4))
        assert two["n"] == four["n"] == 24 and two["batches"] == 12 and four["batches"] == 6
        assert two["low"] > 0 and four["low"] > 0 and four["cost"] > two["cost"]


def test_chapter2_every_batch_size_attacks_the_same_sentences_once():
    # "Paired over the same 24 sentences (each attacked alone and inside its
    # client batch)": every batch sentence has one line per batch size, and a
    # batch holds sentences of one dataset.
    rows = cached("ch2_layers.jsonl")
    for size in (2, 4):
        lines = [r for r in rows if r["cell"].get("batch_size") == size]
        for component in ("full", "layer"):
            mine = [r for r in lines if r["cell"]["component"] == component]
            assert sorted((r["dataset"], r["row_id"]) for r in mine) == sorted(first_sentences(8))
            assert all(len(r["batch"]) == size and r["row_id"] in r["batch"] for r in mine)
    assert batch_table("ch2_layers.jsonl")["n"].eq(24).all()


def test_chapter2_the_truth_enters_run_task_only_through_the_metrics():
    # Solution 3: "`rouge_scores(result.texts[j], ex.text)`, and for a batch
    # ... `match_batch(result.texts, references)` just before it ... the truth
    # enters only the metrics, after the attack has returned."
    source = inspect.getsource(grids.run_task)
    assert "rouge_scores(result.texts[j], ex.text)" in source
    assert "match_batch(result.texts, references)" in source
    assert source.index("attack_clients(") < source.index("match_batch(") < source.index("rouge_scores(")
