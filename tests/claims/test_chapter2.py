"""Chapter 2 (one Transformer layer): its prose claims, checked against the cached results it draws on.

Each test quotes a sentence of the chapter and checks it against
``data/results``; a test fails when its sentence is false of those
numbers, and then the prose or the numbers need fixing, not the test.
"""

from __future__ import annotations

import inspect

from gilib.studies import grids

from tests.claims.cached import batch_table, cached, ch2_paired, first_sentences, summary


def test_chapter2_the_second_layer_lifts_layer_0_and_the_full_models_edge_is_unresolved():
    # Solution 1: "In the cached grid the second layer lifts layer 0
    # clearly, and the full model's edge over layers 0+1 cannot be resolved".
    assert ch2_paired(("layer", "0+1"), ("layer", "0"))["low"] > 0
    edge = ch2_paired(("full", "all"), ("layer", "0+1"))
    assert edge["difference"] > 0 and edge["low"] <= 0 <= edge["high"], edge


def test_chapter2_the_last_layer_leaks_less_than_every_other_paired():
    # "Paired this way, the last layer leaks less than every other layer";
    # summary: "the last layer least, by a margin a paired interval resolves".
    for layer in "01234":
        gap = ch2_paired(("layer", layer), ("layer", "5"))
        assert gap["low"] > 0 and gap["n"] == 30, (layer, gap)


def test_chapter2_layers_1_2_3_have_the_highest_bars_and_cannot_be_ranked():
    # "Layers 1, 2 and 3 have the highest bars, but their paired differences
    # all hold zero: these sentences do not rank them."
    means = summary("ch2_layers.jsonl", ["component", "layers"]).query("component == 'layer'")
    single = means[means["layers"].str.isdigit()].set_index("layers")["rouge1"]
    assert set(single.sort_values().index[-3:]) == {"1", "2", "3"}, single.round(3).to_dict()
    for first, second in (("1", "2"), ("1", "3"), ("3", "2")):
        gap = ch2_paired(("layer", first), ("layer", second))
        assert gap["low"] <= 0 <= gap["high"], (first, second, gap)


def test_chapter2_the_two_oddities_are_within_the_noise():
    # "The encoder alone ... scores a little above the full model; and layers
    # 4+5 together score hardly more than layer 4 alone ... Paired over the
    # same 24 sentences ... neither gap is one these sentences can resolve".
    table = summary("ch2_layers.jsonl", ["component", "layers"]).set_index(["component", "layers"])["rouge1"]
    assert table[("encoder", "all")] > table[("full", "all")]
    assert 0 <= table[("layer", "4+5")] - table[("layer", "4")] < 0.05
    for first, second in ((("encoder", "all"), ("full", "all")), (("layer", "4+5"), ("layer", "4"))):
        gap = ch2_paired(first, second)
        assert gap["n"] == 24 and gap["low"] <= 0 <= gap["high"], (first, second, gap)


def test_chapter2_layers_01_against_layer_1_cannot_be_told_apart():
    # Exercise 6's answer ("c"): the interval of layers 0+1 minus layer 1 holds zero.
    gap = ch2_paired(("layer", "0+1"), ("layer", "1"))
    assert gap["n"] == 24 and gap["low"] <= 0 <= gap["high"], gap


def test_chapter2_standard_error_of_a_24_sentence_mean_is_about_0_04():
    # "A cell's mean over 24 sentences has a standard error of about 0.04".
    table = summary("ch2_layers.jsonl", ["component", "layers"])
    errors = table["rouge1_std"] / table["n"] ** 0.5
    assert errors.between(0.025, 0.055).all(), errors.round(3).tolist()


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


def test_chapter2_cola_has_the_highest_mean_under_every_selection_but_the_intervals_overlap():
    # "CoLA's short sentences ... have the highest mean in every row ... CoLA's
    # interval overlaps another dataset's in most rows".
    spans = grids.intervals(list(cached("ch2_layers.jsonl")), by=["component", "layers", "dataset"],
                            where={"batch_size": 1})
    mean = spans.pivot_table(index=["component", "layers"], columns="dataset", values="rouge1")
    low = spans.pivot_table(index=["component", "layers"], columns="dataset", values="low")
    high = spans.pivot_table(index=["component", "layers"], columns="dataset", values="high")
    others = ["sst2", "rotten_tomatoes"]
    assert (mean["cola"] > mean[others].max(axis=1)).all()
    overlap = low["cola"] <= high[others].max(axis=1)
    assert overlap.mean() > 0.5, overlap.to_dict()


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
    # Solution 4: "`rouge_scores(result.texts[j], ex.text)`, and for a batch
    # ... `match_batch(result.texts, references)` just before it ... the truth
    # enters only the metrics, after the attack has returned."
    source = inspect.getsource(grids.run_task)
    assert "rouge_scores(result.texts[j], ex.text)" in source
    assert "match_batch(result.texts, references)" in source
    assert source.index("attack_clients(") < source.index("match_batch(") < source.index("rouge_scores(")


def test_chapter2_a_paired_interval_on_24_sentences_spans_about_0_05_either_side():
    # Solutions 6 and 7: "on 24 sentences the paired interval, about 0.05
    # either side, is wider than the gap"; "a paired interval spans about
    # 0.05 ROUGE-1 either side of the mean difference".
    for first, second in ((("layer", "0+1"), ("layer", "1")), (("layer", "4+5"), ("layer", "4")),
                          (("encoder", "all"), ("full", "all"))):
        gap = ch2_paired(first, second)
        assert gap["n"] == 24 and 0.03 <= (gap["high"] - gap["low"]) / 2 <= 0.09, (first, second, gap)
    q6 = ch2_paired(("layer", "0+1"), ("layer", "1"))
    assert (q6["high"] - q6["low"]) / 2 > abs(q6["difference"])
