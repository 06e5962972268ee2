"""The headline numbers come from the cached results, and the README prints them."""

from pathlib import Path

import pytest

from gilib.studies import grids
from gilib.studies.headlines import HEADLINE_KEYS, finetuned_markdown, headline_numbers, headline_table, markdown

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def numbers():
    return headline_numbers()


def test_numbers_match_the_summaries(numbers):
    layers = grids.summarize(ROOT / "data/results/ch2_layers.jsonl", by=["component", "layers"],
                                   where={"batch_size": 1})
    full = layers[layers["component"] == "full"].iloc[0]
    assert numbers["full"]["rouge1"] == pytest.approx(full["rouge1"], abs=1e-4)
    # The headline rows: one sentence per client, 10 from each dataset.
    assert [numbers[key]["n"] for key in HEADLINE_KEYS] == [30] * 5
    for key in HEADLINE_KEYS:  # each mean inside its interval, the interval inside [0, 1]
        for score in ("rouge1", "rouge2"):
            row = numbers[key]
            assert 0 <= row[f"{score}_low"] <= row[score] <= row[f"{score}_high"] <= 1
    # The most and least leaky *single* layer, each summarized on its own (the grid also holds pairs: 0+1, 4+5).
    per_layer = {str(i): float(grids.summarize(ROOT / "data/results/ch2_layers.jsonl",
                                               where={"batch_size": 1, "component": "layer", "layers": i})
                               ["rouge1"].iloc[0]) for i in range(6)}
    assert numbers["best_layer"]["layer"] == max(per_layer, key=per_layer.get)
    assert numbers["worst_layer"]["layer"] == min(per_layer, key=per_layer.get)
    assert numbers["best_layer"]["rouge1"] == pytest.approx(max(per_layer.values()), abs=1e-4)
    assert numbers["worst_layer"]["rouge1"] == pytest.approx(min(per_layer.values()), abs=1e-4)
    assert numbers["query0"]["share_pct"] == pytest.approx(0.65, abs=0.01)
    assert numbers["model"] == "minilm" and numbers["steps"] == 200


def test_batch_numbers_follow_the_batch_axis(numbers):
    # The conclusion's batch bullet: full model, layer 0 and layer 0's query
    # at 1, 2 and 4 sentences per client; batch 1 is the headline row itself.
    assert {key: sorted(sizes) for key, sizes in numbers["batch"].items()} == {
        key: ["1", "2", "4"] for key in ("full", "layer0", "query0")}
    # Batch 1 over the 24 sentences also attacked in batches (the headline row holds 30).
    layer_rows = grids.read_lines(ROOT / "data/results/ch2_layers.jsonl")
    in_batches = {(r["dataset"], r["row_id"]) for r in layer_rows if r["cell"].get("batch_size") == 4
                  and r["cell"]["component"] == "full"}
    full_one = [r["rouge1"] for r in layer_rows if r["cell"]["component"] == "full" and "batch_size" not in r["cell"]
                and (r["dataset"], r["row_id"]) in in_batches]
    assert len(full_one) == 24 and numbers["full"]["n"] == 30
    assert numbers["batch"]["full"]["1"]["rouge1"] == pytest.approx(sum(full_one) / 24, abs=1e-4)
    table = grids.batch_axis(ROOT / "data/results/ch3_components.jsonl")
    assert numbers["batch"]["query0"]["4"]["rouge1"] == pytest.approx(float(table["rouge1"].iloc[-1]), abs=1e-4)


def test_dp_and_utility_numbers(numbers):
    # Clipping alone leaves the attack as it was; any noise stops it (chapter 4).
    for part in numbers["dp"].values():
        assert part["sigma0"] > 0.4 and part["max_noisy"] < 0.05
    assert numbers["dp_sigmas"] == [0.0, 0.01, 0.05, 0.1, 0.2, 0.5]
    assert numbers["utility"]["0.0"]["epsilon"] is None  # no noise, no guarantee
    assert numbers["utility"]["0.5"]["epsilon"] < 10


def test_table_and_markdown(numbers):
    table = headline_table(numbers)
    assert list(table["share_pct"])[0] > list(table["share_pct"])[1] > list(table["share_pct"])[3]
    lines = markdown(numbers).splitlines()
    assert len(lines) == 2 + len(table) + 1 and all(line.startswith("| ") for line in lines)


def test_the_most_leaky_weight_is_ranked_on_the_sentences_every_weight_shares():
    # Layer 0's query and the best weight hold 30 sentences, the others 24: the best
    # weight is the highest mean over the 24 all of them attacked.
    rows = [r for r in grids.read_lines(ROOT / "data/results/ch3_components.jsonl")
            if r["cell"].get("batch_size", 1) == 1]
    per_cell = {}
    for r in rows:
        per_cell.setdefault((r["cell"]["component"], r["cell"]["layers"]), {})[(r["dataset"], r["row_id"])] = r["rouge1"]
    common = set.intersection(*(set(v) for v in per_cell.values()))
    assert len(common) == 24
    means = {cell: sum(v[k] for k in common) / len(common) for cell, v in per_cell.items()}
    best = max(means, key=means.get)
    numbers = headline_numbers()
    assert (numbers["best_weight"]["component"], int(numbers["best_weight"]["layer"])) == best


def test_the_fine_tuned_victims_pair_with_the_pretrained_one_on_the_same_sentences(numbers):
    tuned = numbers["finetuned"]
    assert list(tuned) == list(HEADLINE_KEYS)
    for key, row in tuned.items():
        assert row["n"] == 30 and row["victims"] == ["minilm-cola", "minilm-rotten_tomatoes", "minilm-sst2"]
        assert row["base_rouge1"] == pytest.approx(numbers[key]["rouge1"], abs=1e-4)  # the same 30
        assert row["diff_rouge1"] == pytest.approx(row["rouge1"] - row["base_rouge1"], abs=2e-4)
        assert row["diff_rouge1_low"] <= row["diff_rouge1"] <= row["diff_rouge1_high"]
    assert len(finetuned_markdown(numbers).splitlines()) == 2 + len(tuned)
