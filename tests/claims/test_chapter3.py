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
    # "The attention key leaked most, ahead of the runner-up ... by a narrow
    # lead whose interval just excludes zero; the value weight leaked
    # least"; solution 1: "the attention key (`most_leaky`) ... leaks
    # most, narrowly, and the value least".
    means = ch3_pivot().mean(axis=1).sort_values(ascending=False)
    assert means.index[0] == "attention.key" and means.index[-1] == "attention.value"
    for other in means.index[1:]:  # the lead over each weight: an interval above 0
        assert ch3_marginal("component", "attention.key", other)["low"] > 0, other
    assert ch3_marginal("component", "attention.key", means.index[1])["difference"] < 0.05  # narrow
    for other in means.index[:-1]:
        assert ch3_marginal("component", other, "attention.value")["low"] > 0, other


def test_chapter3_the_last_layer_leaks_least_by_far_and_layers_0_to_4_lie_close():
    # "Averaged over the weights, the last layer leaks least, by ...; layers
    # 0 to 4 lie within 0.06 of each other".
    by_layer = ch3_pivot().mean()
    assert by_layer.idxmin() == "5"
    for layer in ("0", "1", "2", "3", "4"):
        assert ch3_marginal("layers", layer, "5")["low"] > 0.15, layer
    first_five = by_layer[["0", "1", "2", "3", "4"]]
    assert round(first_five.max() - first_five.min(), 2) <= 0.06, first_five.round(3).to_dict()


def test_chapter3_last_layer_query_and_ffn_weights_barely_leak():
    # "its query and feed-forward weights recover almost nothing and no word
    # pairs"; solution 3: "the query and the two feed-forward weights
    # recover almost nothing there"; summary: "in the last, the query and the
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


def _paired(first: tuple[str, str], second: tuple[str, str]) -> dict:
    """Two heatmap cells, (component, layer), paired over the sentences both attacked, as the chapter's paired_gap."""
    return grids.cell_difference(grids.on_shared_sentences(list(cached("ch3_components.jsonl"))), first, second)


def test_chapter3_layer_5_leaks_less_than_layer_0_for_every_weight():
    # Solution 3: "Expect lower ROUGE-1 for every weight: in the cached grid
    # each weight's layer-5 cell lies below its layer-0 cell, paired over the
    # same 24 sentences".
    for component in COMPONENTS:
        gap = _paired((component, "0"), (component, "5"))
        assert gap["n"] == 24 and gap["low"] > 0, (component, gap)


def test_chapter3_layer_0s_query_is_not_the_most_leaky_weight_of_layer_0():
    # "Layer 0's query is *not* the most dangerous weight of layer 0 to share:
    # paired over the same sentences, its key, its value and both
    # feed-forward weights give back more words, and its attention output
    # cannot be told apart from it."
    query = ("attention.query", "0")
    for component in ("attention.key", "attention.value", "ffn.intermediate", "ffn.output"):
        assert _paired((component, "0"), query)["low"] > 0, component
    output = _paired(("attention.output", "0"), query)
    assert output["low"] <= 0 <= output["high"], output


def test_chapter3_the_last_layers_key_and_value_cannot_be_told_apart_from_layer_0s_query():
    # "Nor do all of the last layer's weights leak least: ... its key cannot
    # be told apart from layer 0's query ... and nor can its value."
    for component in ("attention.key", "attention.value"):
        gap = _paired((component, "5"), ("attention.query", "0"))
        assert gap["low"] <= 0 <= gap["high"], (component, gap)


def test_chapter3_exercise_6_layer_4s_query_leaks_more_than_its_output_unlike_layer_0():
    # Exercise 6's answer ("a"), and its prompt: "layer 4's query scores
    # about 0.06 ROUGE-1 above layer 4's attention output ...; in layer 0 a
    # gap of 0.04 between the same two weights could not be resolved".
    four = _paired(("attention.query", "4"), ("attention.output", "4"))
    assert round(four["difference"], 2) == 0.06 and four["low"] > 0, four
    zero = _paired(("attention.query", "0"), ("attention.output", "0"))
    assert round(zero["difference"], 2) == 0.04 and zero["low"] <= 0 <= zero["high"], zero


def test_chapter3_the_keys_lead_just_excludes_zero():
    # "The attention key leaked most, ahead of the runner-up ... by a narrow
    # lead whose interval just excludes zero".
    means = ch3_pivot().mean(axis=1).sort_values(ascending=False)
    lead = ch3_marginal("component", means.index[0], means.index[1])
    assert 0 < lead["low"] < 0.01, lead


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
