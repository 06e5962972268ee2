"""The claims of chapters/paper.md ("How close is this to the paper?") against the cached files."""

from __future__ import annotations

import json
import re

import pandas as pd

from gilib.attack import AttackConfig
from gilib.studies import grids
from tests.claims.cached import CHAPTERS, NOTHING, ROOT, cached

PAGE = CHAPTERS / "paper.md"
BENCH = ROOT / "data" / "bench" / "reference_comparison.csv"


def _interval(text: str) -> tuple[float, float]:
    """``(low, high)`` of a bench cell such as ``-3.0 [-16.1, 5.4]``."""
    low, high = re.search(r"\[(-?[\d.]+), (-?[\d.]+)\]", text).groups()
    return float(low), float(high)


def test_the_book_runs_a_tenth_of_the_papers_steps_and_a_fifth_of_its_starts():
    # "The book's grids run a tenth of the paper's steps and a fifth of its starts".
    paper = AttackConfig.paper()
    for name in ("ch2_layers.yaml", "ch3_components.yaml", "ch4_dp.yaml"):
        attack = dict(grids.load_grid(ROOT / "data" / "results" / name).cells[0].attack)
        assert attack["steps"] * 10 == paper.steps, name
        assert attack["init_candidates"] * 5 == paper.init_candidates, name
        assert attack["objective"] == paper.objective == "cos"
    assert (paper.steps, paper.init_candidates, paper.prior_weight) == (2000, 500, 0.2)


def test_the_grids_attack_sst2_validation_and_the_other_train_splits():
    grid = grids.load_grid(ROOT / "data" / "results" / "ch2_layers.yaml")
    assert dict(grid.datasets) == {"cola": "train", "sst2": "validation", "rotten_tomatoes": "train"}


def test_the_reference_and_the_fast_path_cannot_be_told_apart_on_the_query_weight():
    # "their paired difference ... holds zero, so the two cannot be told apart".
    rows = pd.read_csv(BENCH).set_index(["selection", "path"])
    low, high = _interval(rows.loc[("query0", "fast"), "ROUGE-1 minus reference [95% CI]"])
    assert low < 0 < high


def test_no_path_lies_below_the_reference_and_every_path_beats_it_on_layer_0():
    # "No path's paired interval lies wholly below zero on any selection; on
    # layer 0 every path of the book scores above the reference."
    bench = pd.read_csv(BENCH)
    ours = bench[bench["path"] != "reference"]
    assert set(ours["path"]) == {"fast", "fast-bf16", "fast-short"}
    for _, row in ours.iterrows():
        low, high = _interval(row["ROUGE-1 minus reference [95% CI]"])
        assert high > 0, row["selection"]
        if row["selection"] == "layer0":
            assert low > 0, row["path"]


def test_the_bench_ran_in_the_references_setting_without_a_prior():
    import json

    run = json.loads(BENCH.with_suffix(".json").read_text())
    assert run["settings"]["prior"] == "none"
    assert (run["settings"]["steps"], run["settings"]["init_candidates"]) == (500, 500)
    assert run["command"] in PAGE.read_text()


def _query0(name: str, **dp) -> dict[tuple[str, int], float]:
    return {(r["dataset"], r["row_id"]): r["rouge1"] for r in cached(name)
            if r["cell"]["component"] == "attention.query" and r["cell"]["layers"] == 0
            and r["cell"].get("batch_size", 1) == 1
            and all(r["cell"].get("dp", {}).get(k) == v for k, v in dp.items())}


def test_local_dp_leaves_nothing_and_central_dp_reads_like_the_raw_gradient():
    # "Noise at the smallest multiplier of the paper's range leaves the attack
    # nothing"; the clipped, un-noised update of central DP is attacked as the
    # raw gradient is ("its DP results hold there unchanged").
    local = _query0("ch4_dp.jsonl", noise_multiplier=0.01)
    central = _query0("ch4_dp_central.jsonl")
    raw = _query0("ch3_components.jsonl")
    assert len(local) == 12 and set(local) <= set(central) and set(local) <= set(raw)
    assert sum(local.values()) / len(local) <= NOTHING
    pair = grids.paired(cached("ch4_dp_central.jsonl"), cached("ch3_components.jsonl"),
                        [("attention.query", 0)]).iloc[0]
    assert pair["n"] == 12 and pair["low"] < 0 < pair["high"]


def test_the_page_names_the_papers_dp_function_and_no_bare_lamp_attack():
    text = PAGE.read_text()
    assert "dpsgd_defense.py" in text and "`main()`" in text and "extract_grads" in text
    assert "cosine (LAMP's objective, no prior)" in text


def test_the_prior_adds_word_order_not_words_on_the_headline_rows():
    # README and paper page: "every ROUGE-1 interval holds 0, while ROUGE-2 (word pairs) rises for layer 1
    # and layer 2's ffn.intermediate weight (intervals above 0), just for the full model (the interval starts
    # at 0.00) and within the intervals for layer 0 and its query."
    from gilib.studies.headlines import headline_numbers

    prior = headline_numbers()["prior"]
    assert set(prior) == {"full", "layer0", "best_layer", "query0", "best_weight"}
    assert all(row["n"] == 30 for row in prior.values())
    assert all(row["diff_rouge1_low"] <= 0 <= row["diff_rouge1_high"] for row in prior.values())
    above = {key for key, row in prior.items() if row["diff_rouge2_low"] > 0}
    assert above == {"full", "best_layer", "best_weight"}
    assert prior["full"]["diff_rouge2_low"] < 0.005
    # The prior run pairs with the prior-free rows: the same sentences, victim and attack settings.
    rows = list(cached("headline_prior.jsonl"))
    plain = {json.dumps({k: v for k, v in r["cell"].items() if k != "prior"}, sort_keys=True)
             for r in rows}
    base = {json.dumps(r["cell"], sort_keys=True) for name in ("ch2_layers.jsonl", "ch3_components.jsonl")
            for r in cached(name)}
    assert plain <= base and {r["cell"]["prior"] for r in rows} == {"ngram"}


def test_the_readme_chapter_4_utility_numbers_are_the_cached_ones():
    # "kept 0.80 / 0.80 / 0.78 / 0.77 accuracy at sigma 0 / 0.01 / 0.05 / 0.1
    # and fell to chance (0.51, 0.51) at 0.2 and 0.5, where epsilon is 40 and
    # 3.1"; "300 steps of batch 32, about a seventh of an epoch".
    runs = {str(r["noise_multiplier"]): r for r in cached("ch4_utility.jsonl")}
    accuracy = [f"{runs[s]['accuracy']:.2f}" for s in ("0.0", "0.01", "0.05", "0.1", "0.2", "0.5")]
    assert accuracy == ["0.80", "0.80", "0.78", "0.77", "0.51", "0.51"]
    assert (round(runs["0.2"]["epsilon"]), round(runs["0.5"]["epsilon"], 1)) == (40, 3.1)
    settings = runs["0.0"]["settings"]
    assert (settings["steps"], settings["batch_size"]) == (300, 32)
    assert round(1 / (settings["steps"] * runs["0.0"]["sample_rate"])) == 7
    text = " ".join((ROOT / "README.md").read_text().split())
    assert "kept 0.80 / 0.80 / 0.78 / 0.77 accuracy" in text and "fell to chance (0.51, 0.51)" in text
    assert "300 steps of batch 32, about a seventh of an epoch" in text
