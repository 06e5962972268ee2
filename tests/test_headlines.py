"""The headline numbers come from the cached results, and the README prints them."""

from pathlib import Path

import pytest

from gilib import experiments
from gilib.headlines import headline_numbers, headline_table, markdown

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def numbers():
    return headline_numbers()


def test_numbers_match_the_summaries(numbers):
    layers = experiments.summarize(ROOT / "data/results/ch2_layers.jsonl", by=["component", "layers"])
    full = layers[layers["component"] == "full"].iloc[0]
    assert numbers["full"]["rouge1"] == pytest.approx(full["rouge1"], abs=1e-4)
    assert numbers["full"]["n"] == 15
    single = layers[(layers["component"] == "layer") & ~layers["layers"].astype(str).str.contains("[+]")]
    assert numbers["best_layer"]["rouge1"] == pytest.approx(single["rouge1"].max(), abs=1e-4)
    assert numbers["worst_layer"]["rouge1"] == pytest.approx(single["rouge1"].min(), abs=1e-4)
    assert numbers["query0"]["share_pct"] == pytest.approx(0.65, abs=0.01)
    assert numbers["model"] == "minilm" and numbers["steps"] == 200


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


def test_readme_prints_the_headline_table(numbers):
    assert markdown(numbers) in (ROOT / "README.md").read_text(), "update the README: python -m gilib.headlines"
