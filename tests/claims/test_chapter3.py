"""Chapter 3 (one linear weight): its prose claims, checked against the cached results it draws on.

Each test quotes a sentence of the chapter and checks it against
``data/results``; a test fails when its sentence is false of those
numbers, and then the prose or the numbers need fixing, not the test.
"""

from __future__ import annotations

from gilib.studies import grids

from tests.claims.cached import (BARELY, COMPONENTS, LARGE_PART, NOTHING, batch_table, cached, ch3_marginal,
                                 ch3_pivot, sentences, summary)


def test_chapter3_the_same_sentences_as_chapter_2():
    # "The same sentences as chapter 2's grid".
    assert sentences(cached("ch3_components.jsonl")) == sentences(cached("ch2_layers.jsonl"))
    lengths = [grids.sentence_lengths(list(cached(name))) for name in ("ch2_layers.jsonl", "ch3_components.jsonl")]
    assert lengths[0].equals(lengths[1])


def test_chapter3_every_weight_in_the_first_five_layers_but_the_value_leaks_a_large_part_of_the_words():
    # "every weight in the first five layers but the value weight leaks a
    # large part of the words (the value weight of layers 1 to 4 less)".
    first_five = ch3_pivot()[["0", "1", "2", "3", "4"]]
    others = first_five.drop(index="attention.value")
    assert others.min().min() >= LARGE_PART, others.round(2).to_dict()
    value = first_five.loc["attention.value"]
    assert value["0"] >= LARGE_PART and (value[["1", "2", "3", "4"]] < LARGE_PART).all(), value.round(2).to_dict()


def test_chapter3_the_key_leaks_most_narrowly_and_the_value_least():
    # "the attention key leaked most, ahead of the runner-up ... by ...
    # ([...], each sentence against itself), a narrow lead; the value weight
    # leaked least"; solution 1: "the attention key (`most_leaky`) ... leaks
    # most, narrowly, and the value least".
    means = ch3_pivot().mean(axis=1).sort_values(ascending=False)
    assert means.index[0] == "attention.key" and means.index[-1] == "attention.value"
    for other in means.index[1:]:  # the lead over each weight: an interval above 0
        assert ch3_marginal("component", "attention.key", other)["low"] > 0, other
    assert ch3_marginal("component", "attention.key", means.index[1])["difference"] < 0.05  # narrow
    for other in means.index[:-1]:
        assert ch3_marginal("component", other, "attention.value")["low"] > 0, other


def test_chapter3_the_last_layer_leaks_least_by_far_and_layers_0_to_4_lie_close():
    # "the last layer leaks least, ... below the next ([...])"; "Layers 0 to
    # 4 lie within 0.06 of each other".
    by_layer = ch3_pivot().mean()
    assert by_layer.idxmin() == "5"
    for layer in ("0", "1", "2", "3", "4"):
        assert ch3_marginal("layers", layer, "5")["low"] > 0.15, layer
    first_five = by_layer[["0", "1", "2", "3", "4"]]
    assert round(first_five.max() - first_five.min(), 2) <= 0.06, first_five.round(3).to_dict()


def test_chapter3_last_layer_query_and_ffn_weights_barely_leak():
    # "its query and feed-forward weights recover almost nothing and no word
    # pairs"; solution 2: "where the query and the two feed-forward weights
    # recover almost nothing"; summary: "in the last, the query and the
    # feed-forward weights leak almost nothing".
    for component in ("attention.query", "ffn.intermediate", "ffn.output"):
        assert ch3_pivot().loc[component, "5"] < BARELY
        assert ch3_pivot("rouge2").loc[component, "5"] < NOTHING


def test_chapter3_word_pairs_are_few_in_every_cell():
    # "Word *pairs* (ROUGE-2 ...) are few in every cell."
    assert ch3_pivot("rouge2").max().max() < BARELY


def test_chapter3_the_grid_ran_200_steps_with_a_wide_spread():
    # "These are 200-step attacks (a tenth of the paper's budget) ... and the
    # spread over sentences is wide (a standard deviation of 0.15 ROUGE-1 or
    # more in most cells)".
    assert {r["cell"]["steps"] for r in cached("ch3_components.jsonl")} == {200}
    assert (summary("ch3_components.jsonl", ["component", "layers"])["rouge1_std"] >= 0.15).mean() > 0.5


def test_chapter3_layer_5_leaks_less_than_layer_0_for_every_weight():
    # Solution 2: "Expect lower ROUGE for every weight, as in the cached
    # heatmap's last column".
    for metric in ("rouge1", "rouge2"):
        pivot = ch3_pivot(metric)
        higher = {c: (round(pivot.loc[c, "0"], 4), round(pivot.loc[c, "5"], 4))
                  for c in COMPONENTS if pivot.loc[c, "5"] >= pivot.loc[c, "0"]}
        assert not higher, f"{metric} (layer 0, layer 5) where layer 5 is not lower: {higher}"


def test_chapter3_batching_costs_one_weight_words_and_the_intervals_do_not_rank_it():
    # "paired over the same sentences a cost of ... ([..], 95 % interval over
    # batches) ... Chapter 2 measured the full model's and layer 0's costs on
    # the same sentences; their intervals overlap this one".
    query = grids.batch_cost(list(cached("ch3_components.jsonl")), "attention.query", 0, 2)
    assert query["low"] > 0 and query["n"] == 24
    for component, layers in (("full", None), ("layer", 0)):
        other = grids.batch_cost(list(cached("ch2_layers.jsonl")), component, layers, 2)
        assert other["low"] <= query["high"] and query["low"] <= other["high"]
        assert other["n"] == 24
    assert set(batch_table("ch3_components.jsonl")["n"]) == {24}
    ch2 = {(r["dataset"], r["row_id"]) for r in cached("ch2_layers.jsonl") if r["cell"].get("batch_size", 1) == 2}
    ch3 = {(r["dataset"], r["row_id"]) for r in cached("ch3_components.jsonl") if r["cell"].get("batch_size", 1) == 2}
    assert ch2 == ch3
