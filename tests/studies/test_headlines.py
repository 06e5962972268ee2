"""The headline numbers come from the cached results, and the README prints them."""

from pathlib import Path

import pytest

from gilib.studies import grids
from gilib.studies.headlines import headline_numbers, headline_table, markdown

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def numbers():
    return headline_numbers()


def test_numbers_match_the_summaries(numbers):
    layers = grids.summarize(ROOT / "data/results/ch2_layers.jsonl", by=["component", "layers"],
                                   where={"batch_size": 1})
    full = layers[layers["component"] == "full"].iloc[0]
    assert numbers["full"]["rouge1"] == pytest.approx(full["rouge1"], abs=1e-4)
    assert numbers["full"]["n"] == 12  # one sentence per client: 4 from each dataset
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
    for key in ("full", "layer0", "query0"):
        assert numbers["batch"][key]["1"]["rouge1"] == numbers[key]["rouge1"]
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
