"""Chapter 3 (one linear weight), executed once: its records against its prose (see tests/chapters)."""

from __future__ import annotations

import pytest

from gilib.studies import grids

from tests.claims.cached import DATASETS, COMPONENTS, cached, summary, batch_table, ch3_marginal, ch3_pivot
from tests.chapters import executed_chapter

pytestmark = pytest.mark.slow


ch3 = executed_chapter("03_single_linear_component")


def test_chapter3_runs_end_to_end(ch3):
    # The live sweep attacked all six weights of layer 0; the cached grid's
    # summary was recorded for all six.
    assert sorted(ch3["live_rouge1"]) == sorted(COMPONENTS)
    assert sorted(ch3["component_rouge1"]) == sorted(COMPONENTS)


def test_chapter3_bert_base_query_is_the_papers_share(ch3):
    # "BERT-base's query weight is 0.54 % of the model: the paper's 0.54 %."
    assert ch3["bert_base_query_share_pct"] == 0.54


def test_chapter3_an_attention_projection_is_a_twelfth_of_a_layer(ch3):
    # "one attention projection is 1/12 of a layer": layer 0's query share
    # against a layer's share (chapter 2's grid, the same model).
    layer = summary("ch2_layers.jsonl", ["component", "layers"]).query("component == 'layer' and layers == '0'")
    assert ch3["query0_share_pct"] / (100 * float(layer["fraction"].iloc[0])) == pytest.approx(1 / 12, rel=0.02)


def test_chapter3_records_the_lead_and_the_last_layers_gap(ch3):
    # "the attention key leaked most, ahead of the runner-up, the
    # {lead_second} weight, by {lead_difference} ([{lead_low}, {lead_high}])";
    # "the last layer leaks least, {last_gap_difference} below the next".
    by_component = ch3["component_rouge1"]
    assert max(by_component, key=by_component.get) == "attention.key"
    assert min(by_component, key=by_component.get) == "attention.value"
    assert ch3["lead_second"] == sorted(by_component, key=by_component.get)[-2]
    lead = ch3_marginal("component", "attention.key", ch3["lead_second"])
    assert [ch3[f"lead_{p}"] for p in ("difference", "low", "high")] == [round(lead[p], 4) for p in
                                                                          ("difference", "low", "high")]
    assert 0 < ch3["lead_low"] < ch3["lead_difference"] < 0.05
    by_layer = ch3["layer_rouge1"]
    assert min(by_layer, key=by_layer.get) == "5"
    assert ch3["last_gap_low"] > 0.15


def test_chapter3_every_weight_leaks_text_the_worst_in_the_last_layer(ch3):
    # Summary: "Every one of the six weights leaks text in the first five
    # layers"; the least leaky cell is one of the last layer's.
    assert ch3["worst_cell"].endswith("layer 5")
    assert ch3_pivot()[["0", "1", "2", "3", "4"]].min().min() > 0.1


def test_chapter3_records_the_query_weights_batch_axis(ch3):
    # The batch figure's values for layer 0's query weight at B = 1, 2, 4.
    table = batch_table("ch3_components.jsonl")
    for size in (1, 2, 4):
        assert ch3[f"batch{size}_query0_rouge1"] == round(table.loc[("attention.query", "0", size), "rouge1"], 4)
    assert ch3["batch1_query0_rouge1"] == ch3["query0_rouge1"]


def test_chapter3_over_24_real_sentences(ch3):
    # "over 24 real sentences" (CoLA, SST-2, Rotten Tomatoes, eight each) for
    # every cell: the heatmap compares the cells on the sentences all of them
    # attacked (the headline weights hold 30).
    assert ch3["n_sentences"] == 24
    table = summary("ch3_components.jsonl", ["component", "layers"]).set_index(["component", "layers"])
    headline = [("attention.query", "0"), ("ffn.intermediate", "1"), ("ffn.intermediate", "2")]
    assert table.loc[headline, "n"].eq(30).all() and table.drop(headline)["n"].eq(24).all()
    shared = grids.on_shared_sentences(list(cached("ch3_components.jsonl")))
    assert len({(r["dataset"], r["row_id"]) for r in shared}) == 24
    assert {r["dataset"] for r in cached("ch3_components.jsonl")} == DATASETS


def test_chapter3_records_the_paired_comparisons_with_layer_0s_query(ch3):
    # "its key, its value and both feed-forward weights give back more words,
    # and its attention output cannot be told apart from it ... its key [of
    # the last layer] cannot be told apart from layer 0's query"; exercise
    # 6's reveal lies above zero (answer "a").
    for tag in ("attention_key_0", "attention_value_0", "ffn_intermediate_0", "ffn_output_0"):
        assert ch3[f"vs_query0_{tag}_low"] > 0, tag
    for tag in ("attention_output_0", "attention_key_5", "attention_value_5"):
        assert ch3[f"vs_query0_{tag}_low"] <= 0 <= ch3[f"vs_query0_{tag}_high"], tag
    assert 0 < ch3["q6_low"] < ch3["q6_difference"]
