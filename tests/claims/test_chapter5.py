"""Chapter 5 (exact recovery from one linear weight): its prose claims, checked against the cached results it draws on.

Each test quotes a sentence of the chapter and checks it against
``data/results``; a test fails when its sentence is false of those
numbers, and then the prose or the numbers need fixing, not the test.
"""

from __future__ import annotations

import math

import pandas as pd
import pytest
import yaml

from gilib.attack.config import MAX_EFFORT
from gilib.studies import sample, span as span_study

from tests.claims.cached import DATASETS, RESULTS, ROOT, cached, first_sentences, sentences, span_lines


def test_chapter5_peeling_with_layer_1_meets_the_issues_targets_where_the_batch_fits():
    # The batch study's table (README and chapter): peeling checked by layer 1
    # recovers every sentence at batch size 2, at least 95% at 4, 80% at 8
    # and 50% at 16 (the issue's targets); DAGER's enumeration on the same
    # batches recovers no more at any size.
    table = span_study.batch_table(RESULTS / "ch5_span.jsonl").set_index(["method", "batch_size"])
    peel, enum = table.loc["peel, layer 0+1"], table.loc["enumerate, layer 0+1"]
    assert peel.loc[2, "exact"] == 1.0 and peel.loc[4, "exact"] >= 0.95
    assert peel.loc[8, "exact"] >= 0.8 and peel.loc[16, "exact"] >= 0.5
    # "Without layer 1, from the whole of layer 0, peeling recovers ..." the same targets.
    whole = table.loc["peel, whole layer 0"]
    assert whole.loc[2, "exact"] == 1.0 and whole.loc[4, "exact"] >= 0.95
    assert whole.loc[8, "exact"] >= 0.8 and whole.loc[16, "exact"] >= 0.5
    assert (enum["exact"] <= peel.loc[enum.index, "exact"]).all()
    # "From layer 0's weight alone, peeling recovers ... at batch size 2."
    assert table.loc[("peel, layer 0", 2), "exact"] >= 0.8


def test_chapter5_the_batch_study_holds_held_out_sentences_and_refuses_wide_batches():
    # "batches of 2, 4, 8 and 16 held-out sentences of natural length (SST-2
    # validation, CoLA validation, Rotten Tomatoes test)"; "at batch size 16
    # MiniLM's 384 admits CoLA's batches but refused the rotten_tomatoes,
    # sst2 ones"; "From batch size 8 on, the candidate sets hold ... tokens
    # per position": the bag of words, far more than the sentences.
    batches = span_lines("batch")
    assert set(batches["batch_size"]) == {2, 4, 8, 16}
    assert set(zip(batches["dataset"], batches["split"])) == set(span_study.BATCH_SPLITS.items())
    refused = batches[batches["refused"]]
    assert (refused["tokens"] >= refused["hidden"]).all() and (refused["batch_size"] == 16).all()
    assert set(refused["dataset"]) == {"sst2", "rotten_tomatoes"}
    assert not batches.query("dataset == 'cola'")["refused"].any()
    large = batches.query("method == 'peel, layer 0+1' and not refused and batch_size >= 8")
    # (one CoLA batch of eight short sentences keeps small sets: 7 tokens per position)
    assert (large["set_size"] > large["batch_size"]).mean() >= 0.75
    assert large["set_size"].mean() > 4 * large["batch_size"].mean()
    # True tokens and impostors overlap: the best impostor sits below the worst true token.
    peeled = batches.query("method.str.startswith('peel') and not refused")
    assert peeled["impostor_min"].min() < peeled["true_max"].max() < 1e-4
    # Peeling told every verified sentence's label right, and verified only
    # true sentences; the unverified sentences "come back as the search's
    # best guesses, with their uncertain positions".
    assert (peeled["labels_right"] == peeled["found"]).all()
    assert (peeled["found"] <= peeled["exact"]).all()
    assert (peeled.query("found < 1")["uncertain_positions"] > 0).all()
    # Every batch size runs with the default effort.
    assert (peeled["max_effort"] == MAX_EFFORT).all()


def test_chapter5_compares_on_chapter_3s_sentences():
    # "The cached measurements run the span check on the same 12 sentences (4
    # each from CoLA's train split, SST-2's validation split and Rotten
    # Tomatoes' train split, seed 101) as chapter 3's optimisation grid, on
    # the same three weights."
    comparison = span_lines("comparison")
    span = {(d, i) for d, i in zip(comparison["dataset"], comparison["row_id"])}
    assert span == first_sentences(4) and span <= sentences(cached("ch3_components.jsonl"))
    assert len(span) == 12 and comparison.groupby("dataset")["row_id"].nunique().to_dict() == dict.fromkeys(DATASETS, 4)
    grid = yaml.safe_load((RESULTS / "ch3_components.yaml").read_text())
    assert sample.GRID_SPLITS == dict(map(tuple, grid["datasets"]))
    assert sample.SAMPLE_SEED == grid["sample_seed"] == 101
    assert set(comparison["component"]) == {"attention.query", "attention.key", "attention.value"}
    assert set(comparison["layers"]) == {0}


def test_chapter5_the_rank_is_the_token_count_and_one_fewer_for_the_key():
    # "the token count for the query and value weights, one fewer for the key"
    # (and solution 1: "the rank is the token count minus one"), on every sentence.
    comparison = span_lines("comparison")
    shortfall = comparison.assign(d=comparison["tokens"] - comparison["rank"]).groupby("component")["d"]
    assert shortfall.min().to_dict() == shortfall.max().to_dict() == {
        "attention.key": 1, "attention.query": 0, "attention.value": 0}


def test_chapter5_only_layer_0s_input_projections_are_exact():
    # "Outside layer 0's input projections the check is no longer exact",
    # the residual path "fades with depth" (layers 1 to 4), and "The second FFN
    # weight reads the 1536-wide FFN activation: there is nothing to compare".
    components = span_lines("components")
    usable = components[components["applicable"]].assign(exact=lambda t: t["token_accuracy"] == 1)
    by_weight = usable.groupby(["layers", "component"])[["exact", "token_accuracy"]].mean()
    assert by_weight.loc[(0, "attention.query"), "exact"] == 1.0
    others = by_weight.drop(index=(0, "attention.query"))
    assert (others["exact"] < 1).all(), others.round(3).to_dict()
    deeper = [by_weight.loc[(layer, "attention.query"), "token_accuracy"] for layer in (1, 2, 3, 4)]
    assert deeper == sorted(deeper, reverse=True)
    ffn_output = components[components["component"] == "ffn.output"]
    assert len(ffn_output) > 0 and not ffn_output["applicable"].any() and set(ffn_output["input_width"]) == {1536}


def test_chapter5_chapter_4s_noise_levels_leave_nothing_of_the_span():
    # "token accuracy falls below one half from sigma = 0.0001 on" (at every
    # larger sigma too), "the noise on its 384 x 384 entries has norm
    # 384 sigma C", and "Chapter 4's noise levels (sigma >= 0.01) leave nothing
    # of the span".
    dp = span_lines("dp")
    levels = dp.groupby("noise_multiplier").agg(accuracy=("token_accuracy", "mean"), noise=("noise_norm", "median"),
                                                clip=("max_grad_norm", "first"))
    half = levels.index[levels["accuracy"] < 0.5].min()
    assert (levels.loc[levels.index >= half, "accuracy"] < 0.5).all()
    noisy = levels[levels.index > 0]
    assert (noisy["noise"] / (384 * noisy.index * noisy["clip"])).tolist() == pytest.approx([1.0] * len(noisy), rel=0.01)
    assert (levels.loc[levels.index >= 0.01, "accuracy"] == 0).all()
    assert (dp.loc[dp["noise_multiplier"] >= 0.01, "gap"] <= 0).all()


# --- Rankings the prose states, each on a paired bootstrap over the same sentences or batches ---


def _paired_low(differences) -> float:
    from gilib.metrics import bootstrap_interval

    return bootstrap_interval(list(differences))[0]


def test_chapter5_the_span_check_beats_optimisation_on_every_weight_paired():
    # "The gain in ROUGE-1 (span check minus optimisation, sentence by
    # sentence; the table gives its 95 % bootstrap interval) excludes zero on
    # every weight."
    span = span_lines("comparison")
    optimisation = {(r["cell"]["component"], r["dataset"], r["row_id"]): r["rouge1"]
                    for r in cached("ch3_components.jsonl")
                    if r["cell"]["layers"] == 0 and r["cell"].get("batch_size", 1) == 1}
    for weight, part in span.groupby("component"):
        gains = [row.rouge1 - optimisation[(weight, row.dataset, row.row_id)] for row in part.itertuples()]
        assert len(gains) == 12
        assert _paired_low(gains) > 0, weight


def _accuracy_by_sentence():
    components = span_lines("components")
    usable = components[components["applicable"]]
    return usable.pivot_table(index=["dataset", "row_id"], columns=["layers", "component"],
                              values="token_accuracy")


def test_chapter5_layer_0s_first_ffn_weight_is_the_closest_other_weight():
    # "The closest is layer 0's ffn.intermediate": above every other weight
    # but layer 0's query, paired over the same sentences.
    table = _accuracy_by_sentence()
    best = table[(0, "ffn.intermediate")]
    for column in table.columns:
        if column not in ((0, "ffn.intermediate"), (0, "attention.query")):
            assert _paired_low(best - table[column]) > 0, column


def test_chapter5_the_smallest_residual_fades_with_depth_layer_by_layer():
    # "it fades with depth: each layer's accuracy lies below the one before,
    # a paired interval over the same sentences excluding zero each time".
    table = _accuracy_by_sentence()
    queries = [table[(layer, "attention.query")] for layer in (1, 2, 3, 4)]
    for upper, lower in zip(queries, queries[1:]):
        assert _paired_low(upper - lower) > 0


def test_chapter5_peeling_beats_enumeration_at_every_size_both_ran():
    # "Over the same batches, the paired gain of peeling over enumeration
    # excludes zero at every size both ran"; "DAGER's enumeration ... none
    # from 4 on".
    batches = span_lines("batch")
    batches = batches[~batches["refused"]].assign(batch=lambda t: t["dataset"] + t["row_ids"].astype(str))
    peel = batches[batches["method"] == "peel, layer 0+1"].set_index(["batch_size", "batch"])["exact"]
    enum = batches[batches["method"] == "enumerate, layer 0+1"].set_index(["batch_size", "batch"])["exact"]
    assert set(enum.index.get_level_values(0)) == {2, 4, 8}
    for size in (2, 4, 8):
        gains = peel.loc[size] - enum.loc[size].reindex(peel.loc[size].index)
        assert gains.notna().all() and len(gains) == 6
        assert _paired_low(gains) > 0, size
    assert (enum.loc[[4, 8]] == 0).all()


def test_chapter5_dp_noise_breaks_the_check_interval_and_all():
    # "Already at sigma = 1e-6 it names only 85% of the tokens, and token
    # accuracy falls below one half from sigma = 1e-05 on, the whole
    # interval with it."
    from gilib.metrics import bootstrap_interval

    dp = span_lines("dp")
    bounds = {s: bootstrap_interval(g["token_accuracy"]) for s, g in dp.groupby("noise_multiplier")}
    assert bounds[0.0] == (1.0, 1.0)
    assert bounds[1e-6][1] < 1.0
    half = min(s for s, g in dp.groupby("noise_multiplier") if g["token_accuracy"].mean() < 0.5)
    assert all(high < 0.5 for s, (low, high) in bounds.items() if s >= half)


def test_chapter5_the_most_likely_sentence_takes_about_eight_times_more_dp_noise_to_break():
    # Chapter 5 and the README: token accuracy crosses one half near 4.1e-6 (old) and 3.2e-5 (new), 7.8 times
    # more noise; first sigma below one half 1e-5 -> 5e-5; paired differences above zero up to 1e-4; at 3e-5 the
    # interval straddles one half; at 1e-3 neither names a token.
    from gilib.metrics import mean_interval
    from gilib.studies import span as span_study

    path = ROOT / span_study.DP_BENCH
    table, facts = span_study.dp_likelihood_summary(path)
    assert facts["dpl_sentences"] == 12 and len(table) == 8
    assert (facts["dpl_old_half"], facts["dpl_new_half"], facts["dpl_half_ratio"]) == (4.1e-6, 3.2e-5, 7.8)
    assert (facts["dpl_old_below"], facts["dpl_new_below"]) == (1e-5, 5e-5)
    lines = pd.read_csv(path)
    for sigma in (1e-6, 3e-6, 1e-5, 3e-5, 5e-5, 1e-4):
        part = lines[lines["sigma"] == sigma]
        new = part[part["check"] == "new"].set_index(["dataset", "row_id"])["token_accuracy"]
        old = part[part["check"] == "old"].set_index(["dataset", "row_id"])["token_accuracy"]
        assert mean_interval((new - old).tolist())[1] > 0
    at = lines[(lines["sigma"] == 3e-5) & (lines["check"] == "new")]["token_accuracy"]
    _, low, high = mean_interval(at.tolist())
    assert low < 0.5 < high
    assert facts["dpl_new_1e-03"] == facts["dpl_old_1e-03"] == 0


def test_chapter5_the_models_likelihood_prefers_the_truth_but_rewards_it_only_at_the_end():
    # Chapter 5 ("Why it stops there") and the README: where the most likely sentence missed, the span's energy
    # prefers the truth in 1 of 11 misses at 3e-5 and 0 of 12 at 1e-4, the model's likelihood in every one;
    # with one found token put back the truth keeps over a third of the found sentence's excess (36 %, 39 %),
    # with half of them about nine tenths or more (89 %, 96 %); the truth itself sits at the noise floor.
    from gilib.studies import span as span_study

    path = ROOT / span_study.DP_ENERGY_BENCH
    table, facts = span_study.dp_model_summary(path)
    assert len(table) == 2
    assert [facts[f"dpm_{k}_3e-05"] for k in ("missed", "energy", "model")] == [11, 1, 11]
    assert [facts[f"dpm_{k}_1e-04"] for k in ("missed", "energy", "model")] == [12, 0, 12]
    for sigma in ("3e-05", "1e-04"):
        assert 1 / 3 < facts[f"dpm_one_{sigma}"] < 0.5
        assert facts[f"dpm_half_{sigma}"] > 0.85
    # The truth's own distance is the noise's: within three standard deviations of a chi-square of the
    # query weight's 384 x 384 entries around the floor (its excess is a share of the found one's).
    lines = pd.read_csv(path)
    missed = lines[~lines["exact"] & lines["excess_truth"].notna()]
    over_floor = (missed["excess_truth"] * missed["excess_found"]).abs()
    assert (over_floor < 3 * math.sqrt(2 / 384**2)).all()


def test_chapter5_the_server_tells_its_exact_sentences_from_its_misses_up_to_3e_5():
    # Chapter 5 and the README: every exact sentence within 0.93 standard deviations of the noise floor
    # (floor_z), every miss up to 5e-5 at 4.6 or more; at 1e-4 two of the 12 misses under 3, from 3e-4 all.
    from gilib.studies import span as span_study

    path = ROOT / span_study.DP_BENCH
    table, facts = span_study.dp_likelihood_summary(path)
    assert facts["dpl_exact_z_max"] == 0.93
    assert table["missed, told apart (z > 3)"].tolist() == ["4 of 4", "9 of 9", "10 of 10", "11 of 11", "12 of 12",
                                                           "10 of 12", "0 of 12", "0 of 12"]
    new = pd.read_csv(path).query("check == 'new'")
    assert round(new[(new["sigma"] <= 5e-5) & ~new["exact"]]["floor_z"].min(), 1) == 4.6


def test_chapter5_a_language_prior_and_the_repair_take_ten_times_the_dp_noise():
    # Chapter 5 ("What the server knows of English"), the conclusion and the README: with the n-gram prior
    # (weight 16, the best of the tuning grid on other sentences) and the repair, token accuracy crosses one
    # half near 4.4e-5, 10.7 times the old check's 4.1e-6; 0.68 [0.50, 0.85] at 3e-5 and 0.45 [0.26, 0.64]
    # at 5e-5; paired gain over the most likely sentence above zero from 3e-6 to 3e-5; 9 and 4 of 12 exact at
    # 1e-5 and 3e-5 (against 2 and 1); the prior alone names 5 % of the tokens at 1e-3.
    from gilib.attack.config import PRIOR_WEIGHT
    from gilib.metrics import mean_interval
    from gilib.studies import span as span_study

    path = ROOT / span_study.DP_BENCH
    table, prior_facts = span_study.dp_prior_summary(path)
    _, facts = span_study.dp_likelihood_summary(path)
    assert (facts["dpl_prior_half"], facts["dpl_prior_half_ratio"], facts["dpl_old_half"]) == (4.4e-5, 10.7, 4.1e-6)
    assert prior_facts["dpl_prior_weight"] == PRIOR_WEIGHT == 16
    rows = table.set_index("sigma")
    assert rows.loc["3e-05", "with the prior, repaired"] == "0.68 [0.50, 0.85]"
    assert rows.loc["5e-05", "with the prior, repaired"] == "0.45 [0.26, 0.64]"
    assert [rows.loc[s, "exact (prior)"] for s in ("1e-05", "3e-05")] == ["9 of 12", "4 of 12"]
    lines = pd.read_csv(path)
    for sigma in (3e-6, 1e-5, 3e-5):
        part = lines[lines["sigma"] == sigma]
        prior = part[part["check"] == "prior"].set_index(["dataset", "row_id"])["token_accuracy"]
        new = part[part["check"] == "new"].set_index(["dataset", "row_id"])["token_accuracy"]
        assert mean_interval((prior - new).tolist())[1] > 0
    assert round(facts["dpl_prior_1e-03"], 2) == 0.05 and facts["dpl_new_1e-03"] == 0
    # The weight: the best mean token accuracy over the tuning grid's two sigmas, on sentences no study attacks.
    tune = pd.read_csv(ROOT / "data" / "bench" / "dp_prior_tune.csv")
    assert not set(zip(tune["dataset"], tune["row_id"])) & set(zip(lines["dataset"], lines["row_id"]))
    assert tune.groupby("prior_weight")["token_accuracy"].mean().idxmax() == PRIOR_WEIGHT
