"""The README's tables are what the commands it names print.

Every table the README quotes is introduced by the command that prints it
(```python -m gilib.studies STUDY TABLE ...```). Each such command is run
here, in this process, and its output must stand in the README verbatim:
after new results, rerun the command and paste its table.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest

from gilib.studies import all_studies
from gilib.studies.study import main

README = Path(__file__).resolve().parents[2] / "README.md"
COMMAND = re.compile(r"`python -m gilib\.studies ([^`]+)`")


def _table_commands() -> list[str]:
    """The README's table commands: a study and one of its tables, on the cached files (no placeholder)."""
    found = []
    for args in COMMAND.findall(README.read_text()):
        words = shlex.split(args)
        if len(words) >= 2 and words[1] != "run" and not any(w.isupper() for w in words):
            found.append(args)
    return found


def test_the_readme_names_a_command_for_each_of_its_tables():
    commands = _table_commands()
    studies = {shlex.split(c)[0] for c in commands}
    assert studies == {"grids", "span", "federated", "lora", "partial", "headlines"}, commands
    assert len(commands) >= 8


@pytest.mark.parametrize("args", _table_commands())
def test_the_readme_quotes_what_each_table_command_prints(args, capsys):
    assert main(all_studies(), shlex.split(args)) == 0
    printed = capsys.readouterr().out.strip()
    assert printed.startswith("| ") and printed in README.read_text(), \
        f"update the README's table under: python -m gilib.studies {args}"


def test_the_readme_batching_and_weight_rankings_hold():
    # "Averaged over the layers, the attention key leaks most, narrowly (the
    # interval of its lead over the runner-up starts just above zero), and the
    # value least"; "at four sentences per client every selection's cost has
    # an interval above zero, and the costs' intervals overlap across selections".
    from gilib.studies import grids
    from tests.claims.cached import cached

    ch3 = list(cached("ch3_components.jsonl"))
    weights = grids.marginal(ch3, "component")
    assert weights["component"].iloc[0] == "attention.key" and weights["component"].iloc[-1] == "attention.value"
    lead = grids.marginal_difference(ch3, "component", "attention.key", weights["component"].iloc[1])
    assert 0 < lead["low"] < 0.01
    rows = list(cached("ch2_layers.jsonl")) + ch3
    costs = [grids.batch_cost(rows, c, l, 4) for c, l in (("full", None), ("layer", 0), ("attention.query", 0))]
    assert all(c["low"] > 0 for c in costs)
    assert max(c["low"] for c in costs) <= min(c["high"] for c in costs)


def test_the_readme_most_leaky_layer_and_weight_lead_their_runners_up_within_the_intervals():
    # "The most leaky layer and weight are those with the highest mean on the
    # sentences every layer (30) or weight (24) was attacked on; their leads
    # over the runners-up (layer 3, and the same weight in layer 1) are within
    # the intervals".
    from gilib.metrics import bootstrap_interval
    from gilib.studies import grids
    from gilib.studies.headlines import headline_numbers
    from tests.claims.cached import cached

    numbers = headline_numbers()
    best_weight = (numbers["best_weight"]["component"], int(numbers["best_weight"]["layer"]))
    for name, best, runner_up, count in (
            ("ch2_layers.jsonl", ("layer", int(numbers["best_layer"]["layer"])), ("layer", 3), 30),
            ("ch3_components.jsonl", best_weight, (best_weight[0], 1), 24)):
        lines = [r for r in cached(name) if r["cell"].get("batch_size", 1) == 1
                 and isinstance(r["cell"]["layers"], int)
                 and (name == "ch3_components.jsonl" or r["cell"]["component"] == "layer")]
        shared = grids.on_shared_sentences(lines)
        means = grids.summarize(shared, by=["component", "layers"])
        ranked = means.sort_values("rouge1", ascending=False)
        top = list(zip(ranked["component"], ranked["layers"].astype(int)))
        assert top[0] == best and top[1] == runner_up, top[:3]
        scores = {}
        for r in shared:
            scores.setdefault((r["cell"]["component"], r["cell"]["layers"]), {})[(r["dataset"], r["row_id"])] = r["rouge1"]
        assert len(scores[best]) == count
        low, high = bootstrap_interval([scores[best][k] - scores[runner_up][k] for k in scores[best]])
        assert low < 0 < high, (name, low, high)


# The conclusion (chapters/conclusion.md) reads the same cached numbers as
# the README; its rankings are checked here.

def test_the_conclusion_last_layer_leaks_least_by_a_wide_margin():
    # "The last layer's weights leak least, by a wide margin (chapter 3)."
    from gilib.studies import grids
    from tests.claims.cached import cached

    ch3 = list(cached("ch3_components.jsonl"))
    layers = grids.marginal(ch3, "layers")
    assert int(layers["layers"].iloc[-1]) == 5
    gap = grids.marginal_difference(ch3, "layers", int(layers["layers"].iloc[-2]), 5)
    assert gap["low"] > 0.1


def test_the_conclusion_fine_tuning_raises_no_selection_and_the_optimisation_attack_is_rarely_exact():
    # "moves by at most ... and never below ...: fine-tuning does not close
    # the leak"; the summary figure: "part of the words ... but almost never
    # a whole sentence".
    from gilib.book.summary import COSINE, leakage_table
    from gilib.studies.headlines import headline_numbers

    tuned = headline_numbers()["finetuned"]
    assert all(row["diff_rouge1_low"] < 0 for row in tuned.values())
    assert min(row["rouge1"] for row in tuned.values()) > 0.4
    table = leakage_table()
    clear = table[(table["attack"] == COSINE) & ~table["shared"].str.startswith("DP")]
    assert len(clear) == 3 and (clear["exact"] <= 0.05).all() and (clear["low"] > 0.3).all()


def test_the_readme_last_layer_leaks_least_of_chapter_2s_layers():
    # "The gradient of any one of layers 0 to 4 ... gives back about half of
    # the words or more; the last layer leaks least (0.14 below layer 4,
    # paired interval [0.09, 0.19] over the 30 sentences)".
    from gilib.studies import grids
    from tests.claims.cached import cached

    lines = [r for r in cached("ch2_layers.jsonl") if r["cell"].get("batch_size", 1) == 1
             and r["cell"]["component"] == "layer" and isinstance(r["cell"]["layers"], int)]
    means = grids.summarize(lines, by=["component", "layers"]).set_index("layers")["rouge1"]
    assert means.idxmin() == 5 and all(means[layer] >= 0.5 for layer in range(5))
    gap = grids.marginal_difference(lines, "layers", 4, 5)
    assert gap["n"] == 30 and (round(gap["difference"], 2), round(gap["low"], 2), round(gap["high"], 2)) == (
        0.14, 0.09, 0.19)


def test_the_readme_larger_learning_rate_restores_only_the_cola_sentences():
    # "A larger learning rate removes it only in part: at lr = 1e-3 the CoLA
    # sentences' messages give them back exactly, the SST-2 and Rotten
    # Tomatoes sentences' do not. The optimisation attack keeps ROUGE-1
    # between 0.39 and 0.51 on every float32 FedAvg row."
    from tests.claims.cached import cached

    exact = {}
    for r in cached("ch6_federated.jsonl"):
        if (r["study"], r["attack"], r["precision"], r["lr"]) == ("protocol", "span check", "float32", 1e-3):
            exact.setdefault(r["dataset"], []).append(bool(r["exact"]))
    assert all(exact["cola"]) and not any(exact["sst2"] + exact["rotten_tomatoes"])
    scores = {}
    for r in cached("ch6_federated.jsonl"):
        if (r["study"], r["attack"], r["precision"]) == ("protocol", "optimisation", "float32") \
                and r["protocol"].startswith("FedAvg"):
            scores.setdefault(r["lr"], []).append(r["rouge1"])
    means = [sum(v) / len(v) for v in scores.values()]
    assert len(means) == 3 and (f"{min(means):.2f}", f"{max(means):.2f}") == ("0.39", "0.51")


def test_the_readme_rerun_of_the_secagg_bench_under_the_sweeps_count():
    # Chapter 6 says it too: "the new check rebuilt all 48 behind 8 clients, the slowest batch (269 tokens)
    # in 281 s". The README: "all 12 and 24 sentences behind 2 and 4 clients (at most 4
    # and 10 s a batch)" at 54a7586; behind 8 "48 of 48 ..., every batch within its 5 minutes, chapter 6's
    # Rotten Tomatoes batch in 281 and 284 s, the held-out one in 248 and 251 s (the file keeps the first
    # run)"; before, "46 of 48 behind 8 ... (257 s at 773bb75), and the held-out one took 255 s (190)".
    import pandas as pd

    from gilib.data import repo_root

    bench = repo_root() / "data" / "bench"
    rerun = pd.read_csv(bench / "noisy_span_secagg_rerun.csv")
    cached = pd.read_csv(bench / "noisy_span_secagg.csv").query("check == 'new'")
    per_batch = rerun.groupby(["protocol", "set", "dataset"], sort=False).agg(
        exact=("exact", "sum"), sentences=("exact", "size"), seconds=("seconds", "first"),
        timed_out=("timed_out", "first"), tokens=("tokens", "sum"))
    by_clients = per_batch.groupby(level="protocol").agg(exact=("exact", "sum"), sentences=("sentences", "sum"),
                                                         slowest=("seconds", "max"))
    assert by_clients.loc["SecAgg+ 2 clients"].tolist()[:2] == [12, 12]
    assert by_clients.loc["SecAgg+ 4 clients"].tolist()[:2] == [24, 24]
    assert by_clients.loc["SecAgg+ 8 clients"].tolist()[:2] == [48, 48]
    assert round(by_clients.loc["SecAgg+ 2 clients", "slowest"]) == 4
    assert round(by_clients.loc["SecAgg+ 4 clients", "slowest"]) == 10
    eight = per_batch.loc["SecAgg+ 8 clients"]
    assert not eight["timed_out"].any() and eight["seconds"].max() < 300
    assert round(eight.loc[("chapter 6", "rotten_tomatoes"), "seconds"]) == 281
    assert int(eight.loc[("chapter 6", "rotten_tomatoes"), "tokens"]) == 269
    assert round(eight.loc[("held-out", "rotten_tomatoes"), "seconds"]) == 248
    settings = json.loads((bench / "noisy_span_secagg_rerun.json").read_text())
    assert settings["commit"]["SecAgg+ 8 clients"].startswith("b6b92b5") and "283.6 s" in settings["ran_as"]
    before = cached.query("protocol == 'SecAgg+ 8 clients' and dataset == 'rotten_tomatoes'")
    assert sorted(round(s) for s in before.groupby("set")["seconds"].first()) == [190, 257]


def test_the_readme_side_by_side_of_the_projection_table_is_the_bench():
    # README, "Where the SecAgg+ batch of 8's time goes": "SecAgg+ 279 s against 277 s and 278 against 282,
    # FedSGD 155 against 154, the same 8 of 8 in the same rounds", and b6b92b5's rerun: "277 to 282 s on the
    # same batch for either".
    import pandas as pd

    from gilib.data import repo_root

    frame = pd.read_csv(repo_root() / "data" / "bench" / "peel_speed_table.csv")
    assert (frame["exact"] == 8).all() and not frame["timed_out"].any()
    seconds = {(m, p, t): round(s) for m, p, t, s in frame[["message", "pair", "table", "seconds"]].values}
    assert seconds == {("SecAgg+ 8 clients", 1, True): 279, ("SecAgg+ 8 clients", 1, False): 277,
                       ("SecAgg+ 8 clients", 2, True): 278, ("SecAgg+ 8 clients", 2, False): 282,
                       ("FedSGD", 1, True): 155, ("FedSGD", 1, False): 154}
    for message, part in frame.groupby("message"):
        assert part["rounds"].nunique() == 1, message


def test_the_readme_table_of_exact_ranking_is_the_peel_speed_bench():
    # README, "Ranking hypotheses exactly": its table is data/bench/peel_speed.csv (seconds and rounds per
    # batch of 8, search and ranking), "every sentence comes back in every cell", and exact ranking took
    # fewer rounds than the sketch's in every batch of SST-2 and Rotten Tomatoes.
    import re

    import pandas as pd

    from gilib.data import repo_root

    lines = pd.read_csv(repo_root() / "data" / "bench" / "peel_speed.csv")
    assert (lines["exact"] == lines["sentences"]).all() and not lines["timed_out"].any()
    assert len(lines) == 12 and set(lines["ranking"]) == {"sketch", "exact"}
    names = {"cola": "CoLA", "sst2": "SST-2", "rotten_tomatoes": "Rotten Tomatoes"}
    readme = (repo_root() / "README.md").read_text()
    for dataset, part in lines.groupby("dataset", sort=False):
        cell = {(r.search, r.ranking): f"{round(r.seconds)} ({r.rounds})" for r in part.itertuples()}
        row = (f"| {names[dataset]} | {int(part['tokens'].iloc[0])} | {cell['split', 'sketch']} | "
               f"{cell['split', 'exact']} | {cell['bag', 'sketch']} | {cell['bag', 'exact']} |")
        assert row in readme, row
        if dataset != "cola":
            for search in ("split", "bag"):
                rounds = part.set_index(["search", "ranking"])["rounds"]
                assert rounds[search, "exact"] < rounds[search, "sketch"]
    assert re.search(r"Ranking hypotheses exactly", readme)


def test_the_readme_table_of_flower_actors_is_the_bench():
    # README, "Flower rounds in one Ray actor": each row's median (min to max) is data/bench/flower_actors.csv's.
    import pandas as pd

    from gilib.data import repo_root

    lines = pd.read_csv(repo_root() / "data" / "bench" / "flower_actors.csv")
    readme = (repo_root() / "README.md").read_text()
    names = {"fedsgd": "FedSGD, query L0", "secure": "SecAgg+, layer 0"}
    beside = {0: "nothing", 1: "one busy core"}
    for (kind, busy), part in lines.groupby(["round", "busy"]):
        cells = [f"{s.median():.1f} ({s.min():.1f}-{s.max():.1f})"
                 for s in (part.loc[part["actors"] == n, "seconds"] for n in (1, 2))]
        row = f"| {names[kind]} | {beside[busy]} | {cells[0]} | {cells[1]} |"
        assert row in readme, row
        assert (part.groupby("actors").size() == 3).all()
