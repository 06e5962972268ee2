"""Chapter 4 (DP-SGD as a defence): its prose claims, checked against the cached results it draws on.

Each test quotes a sentence of the chapter and checks it against
``data/results``; a test fails when its sentence is false of those
numbers, and then the prose or the numbers need fixing, not the test.
"""

from __future__ import annotations

import pytest

from gilib import dp
from gilib.data import load_split

from tests.claims.cached import NOTHING, SIGMAS, attack_settings, cached, first_sentences, sentences, summary


def test_chapter4_a_small_selection_loses_its_signal_first():
    # "Clipping is over all parameters, noise is per coordinate: a small
    # selection loses its signal first": at sigma = 0.01 the privatised
    # gradient's cosine with the raw one falls from the full model to layer 0
    # to layer 0's query weight.
    table = summary("ch4_dp.jsonl", ["component", "noise_multiplier"]).set_index(["component", "noise_multiplier"])
    cosine = table["dp_cosine"]
    assert cosine["full", 0.01] > cosine["layer", 0.01] > cosine["attention.query", 0.01]
    assert all(cosine[c, 0.0] == pytest.approx(1.0, abs=1e-3) for c in ("full", "layer", "attention.query"))


def test_chapter4_the_grid_attacks_the_same_sentences_with_the_same_settings_as_chapters_2_and_3():
    # "The cached grid attacks the privatised gradient at every sigma, for the
    # full model, layer 0 and layer 0's query weight, with the same attack
    # settings as chapters 2 and 3, on the first four sentences of their
    # sample from each of CoLA and Rotten Tomatoes ... and SST-2 ..., one
    # sentence per client."
    dp_rows, ch2_rows, ch3_rows = cached("ch4_dp.jsonl"), cached("ch2_layers.jsonl"), cached("ch3_components.jsonl")
    assert sentences(dp_rows) == first_sentences(4) and len(first_sentences(4)) == 12
    assert sentences(dp_rows) <= sentences(ch2_rows) and sentences(dp_rows) <= sentences(ch3_rows)
    settings = {tuple(sorted(attack_settings(r).items())) for r in dp_rows + ch2_rows + ch3_rows}
    assert len(settings) == 1
    table = summary("ch4_dp.jsonl", ["component", "noise_multiplier"])
    assert sorted(map(str, table["noise_multiplier"].unique())) == sorted(SIGMAS)
    assert set(table["component"]) == {"full", "layer", "attention.query"} and set(table["n"]) == {12}
    assert {r["cell"]["layers"] for r in dp_rows if r["cell"]["component"] != "full"} == {0}
    assert not any("batch_size" in r["cell"] for r in dp_rows)
    # "The cached attacks and the utility sweep are MiniLM's."
    assert {r["cell"]["model"] for r in dp_rows} == {"minilm"}
    assert {r["settings"]["model"] for r in cached("ch4_utility.jsonl")} == {"minilm"}


def test_chapter4_sigma_0_41_is_the_epsilon_8_noise_level():
    # Solution 2: "gives sigma ~ 0.41 (check: dp.epsilon(0.411, 32 / n,
    # 3 * n // 32, 1 / n) is just under 8)".
    n = 67_349
    assert 7 < dp.epsilon(0.411, 32 / n, 3 * n // 32, 1 / n) < 8


def test_chapter4_the_utility_sweep_keeps_accuracy_only_up_to_sigma_0_1():
    # Solution 2: sigma ~ 0.41 is "past the point where the utility sweep
    # above falls to chance accuracy (sigma = 0.2): this sweep keeps its
    # accuracy only up to sigma = 0.1, where epsilon is void".
    utility = {r["noise_multiplier"]: r["accuracy"] for r in cached("ch4_utility.jsonl")}
    assert all(utility[s] > 0.7 for s in utility if s <= 0.1), utility
    assert all(utility[s] < 0.55 for s in utility if s >= 0.2), utility
    n = 67_349
    assert dp.epsilon(0.1, 32 / n, 3 * n // 32, 1 / n) > 1000  # void


def test_chapter4_the_first_utility_sweep_trains_only_the_last_layer_and_head():
    # "it fine-tunes only the last encoder layer, the pooler and the classifier ... on SST-2, with Adam at
    # a learning rate of 5e-4 on Poisson batches of 32, for 300 steps."
    settings = [r["settings"] for r in cached("ch4_utility.jsonl")]
    assert all((s["trainable"], s["batch_size"], s["steps"], s["lr"], s["dataset"]) ==
               ("top", 32, 300, 5e-4, "sst2") for s in settings)


def test_chapter4_the_deployed_recipe_trains_the_full_selection_and_accounts_its_own_epsilon():
    # "The deployed recipe fine-tunes every parameter but the word embeddings (... exactly the full
    # selection) on SST-2 with DP-SGD at C = 1: Poisson batches of 256 ..., Adam at 5e-4, 30 steps ...
    # Each epsilon is that run's own, from its sigma, sampling rate, steps and delta = 1/n."
    lines = cached("ch4_utility_deployed.jsonl")
    full_numel = {r["numel"] for r in cached("ch4_dp.jsonl") if r["cell"]["component"] == "full"}
    assert {r["trained_parameters"] for r in lines} == full_numel
    for r in lines:
        s = r["settings"]
        assert (s["recipe"], s["trainable"], s["batch_size"], s["lr"], s["max_grad_norm"], s["dataset"]) == \
            ("deployed", "all", 256, 5e-4, 1.0, "sst2")
        assert r["steps"] == s["steps"] == 30 and r["delta"] == pytest.approx(1 / r["train_examples"])
        assert r["sample_rate"] == pytest.approx(1 / -(-r["train_examples"] // 256))  # Opacus's 1 / len(loader)
        if r["noise_multiplier"] > 0:
            assert r["epsilon"] == pytest.approx(dp.epsilon(r["noise_multiplier"], r["sample_rate"], r["steps"],
                                                            r["delta"]))
    assert 0.0 in {r["noise_multiplier"] for r in lines}  # the non-private baseline of the same recipe
    # "as many as about N CPU minutes allow": every run took at most about five minutes.
    assert max(r["seconds"] for r in lines) < 330


def test_chapter4_the_batch_cells_attack_the_full_model_at_sigma_0_01_on_the_stated_sentences():
    # "At 4 per client they are the 12 sentences above in 3 client batches; at 8, 16 sentences of CoLA
    # and SST-2 in 2 batches."
    rows = cached("ch4_dp_batches.jsonl")
    assert {(r["cell"]["component"], r["cell"]["dp"]["noise_multiplier"], r["cell"]["dp"]["reading"])
            for r in rows} == {("full", 0.01, "privatised")}
    four = [r for r in rows if r["cell"]["batch_size"] == 4]
    eight = [r for r in rows if r["cell"]["batch_size"] == 8]
    assert sentences(four) == sentences(cached("ch4_dp.jsonl")) and len({tuple(r["batch"]) for r in four}) == 3
    assert len(eight) == 16 and {r["dataset"] for r in eight} == {"cola", "sst2"}
    assert len({tuple(r["batch"]) for r in eight}) == 2
    settings = {tuple(sorted(attack_settings(r).items())) for r in list(rows) + list(cached("ch4_dp.jsonl"))}
    assert len(settings) == 1


def _deployed():
    from gilib.studies import dp_cost

    privatised = list(cached("ch4_dp.jsonl")) + list(cached("ch4_dp_batches.jsonl"))
    return dp_cost.deployed_summary(list(cached("ch4_utility_deployed.jsonl")), privatised,
                                    list(cached("ch4_dp_central.jsonl")), list(cached("ch3_components.jsonl")))


def test_chapter4_in_the_deployed_setting_noise_that_stops_the_attack_leaves_epsilon_void_or_the_model_at_chance():
    # "At sigma = 0.01 the accuracy ... stays inside the baseline's interval and the attack's mean ROUGE-1 is at
    # most 0.01 at every batch size (no interval reaches above 0.03), but epsilon is ...: no guarantee at all. At sigma = 0.5
    # the same 30 steps give epsilon = 4.5, and the model falls to 0.51, chance on SST-2's balanced
    # validation split."
    from gilib.studies import dp_cost

    lines = {r["noise_multiplier"]: r for r in cached("ch4_utility_deployed.jsonl")}
    low, high = dp_cost.accuracy_interval(lines[0.0]["accuracy"], lines[0.0]["eval_examples"])
    assert low <= lines[0.01]["accuracy"] <= high
    assert lines[0.01]["epsilon"] > 1e4 and lines[0.5]["epsilon"] < 10
    labels = [e.label for e in load_split("sst2", "validation")]
    majority = max(sum(labels), len(labels) - sum(labels)) / len(labels)
    assert majority < 0.52 and abs(lines[0.5]["accuracy"] - majority) < 0.02
    _, _, facts = _deployed()
    for size in (1, 4, 8):
        assert facts[f"rouge1_b{size}_sigma0.01"] <= facts["noisy_rouge1_max"] <= NOTHING
        assert facts[f"rouge1_high_b{size}_sigma0.01"] <= facts["noisy_rouge1_high_max"] <= 0.05
    # "no single sentence scored above 0.12": the largest of every local-DP line at sigma > 0.
    noisy = [r["rouge1"] for r in [*cached("ch4_dp.jsonl"), *cached("ch4_dp_batches.jsonl")]
             if r["cell"]["dp"]["noise_multiplier"] > 0]
    assert facts["noisy_sentence_rouge1_max"] == round(max(noisy), 4) < 0.2
    # Only sigma = 0.01 was run at 4 and 8 per client: the table says "not run" elsewhere.
    one, _, _ = _deployed()
    assert set(one.loc[one["sigma"] != 0.01, "ROUGE-1, 4 per client"]) == {"not run"}


def test_chapter4_central_dp_leaks_as_the_raw_gradient_and_local_dp_at_the_same_sigma_does_not():
    # "The server's view leaks as the raw gradient does ...; their paired difference ... is a rerun's spread
    # ... The server's noise protects the sentence from whoever sees the aggregate, as local DP's identical
    # noise does (the last row)."
    _, server, facts = _deployed()
    assert facts["central_minus_raw_low_attention_query_0"] <= 0 <= facts["central_minus_raw_high_attention_query_0"]
    assert facts["central_pairs_attention_query_0"] == 12 and facts["central_rouge1_attention_query_0"] >= 0.3
    assert server["the attack reads"].iloc[-1].startswith("local DP") and \
        float(server["ROUGE-1 [95 %]"].iloc[-1].split()[0]) <= NOTHING
    rows = cached("ch4_dp_central.jsonl")
    assert {r["cell"]["dp"]["protocol"] for r in rows} == {"central"} and len(rows) == 12
    assert all(r["dp_cosine"] > 0.9999 for r in rows)  # one sentence: the raw direction, clipped


# --- rankings the prose states, each checked with a bootstrap over the same sentences or batches ---

def _per_sentence(rows, field="rouge1", **where):
    """(dataset, split, row id) -> field, for the lines whose cell matches ``where``."""
    def value(r, key):
        return r["cell"]["dp"]["noise_multiplier"] if key == "sigma" else r["cell"][key]
    out = {}
    for r in rows:
        if all(str(value(r, k)) == str(v) for k, v in where.items()):
            key = (r["dataset"], r["split"], r["row_id"])
            assert key not in out, key
            out[key] = r[field]
    return out


def _paired_low(first: dict, second: dict) -> float:
    """The low end of the 95 % paired bootstrap interval of first minus second, over their common keys."""
    from gilib.metrics import bootstrap_interval

    common = sorted(set(first) & set(second))
    assert len(common) >= 10, len(common)
    return bootstrap_interval([first[k] - second[k] for k in common])[0]


def test_chapter4_the_privatised_gradient_leaks_less_than_the_raw_one_from_sigma_0_01_on():
    # Figure fig-ch4-privacy-utility: "every solid line drops to the floor from the smallest noise on,
    # while the dashed lines, the raw gradient, stay where chapters 2 and 3 put them": the raw gradient
    # minus the privatised one, paired over the 12 sentences, excludes zero for every selection and sigma > 0.
    dp_rows = cached("ch4_dp.jsonl")
    raw_rows = [r for r in cached("ch2_layers.jsonl") + cached("ch3_components.jsonl")
                if r["cell"].get("batch_size", 1) == 1]
    for component, layers in [("full", None), ("layer", 0), ("attention.query", 0)]:
        raw = _per_sentence(raw_rows, component=component, layers=layers)
        for sigma in (0.01, 0.05, 0.1, 0.2, 0.5):
            privatised = _per_sentence(dp_rows, component=component, sigma=sigma)
            assert _paired_low(raw, privatised) > 0, (component, sigma)


def test_chapter4_a_small_selection_loses_its_signal_first_paired():
    # Summary: "Clipping is over all parameters, noise is per coordinate: a small selection loses its
    # signal first": at sigma = 0.01 the cosine with the raw gradient ranks full > layer 0 > its query
    # weight, with a paired bootstrap over the 12 sentences excluding zero at each step.
    rows = cached("ch4_dp.jsonl")
    cosine = {c: _per_sentence(rows, "dp_cosine", component=c, sigma=0.01)
              for c in ("full", "layer", "attention.query")}
    assert _paired_low(cosine["full"], cosine["layer"]) > 0
    assert _paired_low(cosine["layer"], cosine["attention.query"]) > 0


def test_chapter4_batches_of_4_raise_the_cosine_every_batch_above_every_sentence():
    # "at sigma = 0.01 the privatised gradient's mean cosine with the raw one rises from ... at one
    # sentence to ... at 4 (each batch of 4 above every single sentence) and ... at 8 (two batches,
    # too few to rank against 4)".
    single = _per_sentence(cached("ch4_dp.jsonl"), "dp_cosine", component="full", sigma=0.01)
    batches = {}
    for r in cached("ch4_dp_batches.jsonl"):
        batches.setdefault(r["cell"]["batch_size"], {})[tuple(r["batch"])] = r["dp_cosine"]
    assert sorted(batches) == [4, 8]
    assert min(batches[4].values()) > max(single.values())
    assert min(batches[8].values()) > max(single.values()) and len(batches[8]) == 2


def test_chapter4_the_two_epsilons_per_sigma_are_different_runs():
    # "This sweep is a different run from the budget above: 300 steps, not three epochs, so its epsilon
    # ... is smaller than the budget table's at the same sigma."
    n = 67_349
    three_epochs = 3 * n // 32
    for line in cached("ch4_utility.jsonl"):
        assert line["steps"] == 300 < three_epochs
        sigma = line["noise_multiplier"]
        if sigma > 0:
            assert line["epsilon"] < dp.epsilon(sigma, 32 / n, three_epochs, 1 / n)


def test_chapter4_epsilon_in_the_tens_is_astronomically_large_and_one_is_below_three():
    # "At epsilon = 1 that factor is below 3, a real guarantee; at epsilon in the tens it is
    # astronomically large"; the budget table's sigma = 0.1 and 0.2 lie far past the tens.
    import math

    assert math.exp(1) < 3 and math.exp(20) > 1e8
    n = 67_349
    assert dp.epsilon(0.2, 32 / n, 3 * n // 32, 1 / n) > 20
