"""Smoke tests of the benchmarks: each runs in quick mode and prints its table.

Timings and memory are figures for the reader, never checked here.
"""

import importlib
import json
import math
import re

import pandas as pd
import pytest
import torch

from gilib.client import FedAvg, client_update
from gilib.data import repo_root
from gilib.models import encode
from gilib.selection import select
from gilib.studies.study import markdown_table

REPO = repo_root()
HEADER = (
    "model",
    "selection",
    "params selected",
    "share %",
    "tokens",
    "ms/step",
    "peak RSS MiB",
    "attack MiB",
)


@pytest.fixture(autouse=True)
def _bench_on_path(monkeypatch):
    # The scripts import their siblings from bench/, and these tests import the scripts: on the path for
    # each test, and off it afterwards.
    monkeypatch.syspath_prepend(str(REPO / "bench"))


def run_bench(name: str, argv: list[str], capsys, monkeypatch) -> str:
    """``bench/<name>.py``'s ``main(argv)`` run in this process (no second start-up's imports), from the
    repository root as on the command line; what it printed to stdout."""
    monkeypatch.chdir(REPO)
    importlib.import_module(name).main(argv)
    return capsys.readouterr().out


@pytest.mark.slow
def test_attack_speed_quick_prints_table(capsys, monkeypatch):
    stdout = run_bench("attack_speed", ["--quick"], capsys, monkeypatch)
    lines = stdout.splitlines()
    headers = [line for line in lines if all(name in line for name in HEADER)]
    assert len(headers) == 1, stdout
    rows = [line.split() for line in lines if line.startswith("minilm ")]
    assert [row[1] for row in rows] == ["full", "layer0", "query0"], stdout


@pytest.mark.slow
def test_reference_comparison_quick_prints_table(tmp_path, capsys, monkeypatch):
    out = tmp_path / "comparison.csv"
    stdout = run_bench("reference_comparison", ["--quick", "--out", str(out)], capsys, monkeypatch)
    assert "s/sentence" in stdout and "x plain" in stdout, stdout
    # Without the reference code beside it, no ratio to it, and a hint how to get one.
    assert "x reference" not in stdout
    table = out.read_text().splitlines()
    assert len(table) == 1 + 3 * 4  # header, then fast, fast-bf16, fast-short and plain for three selections
    # The float32 fast path is a pure speed-up: it returns the plain path's tokens.
    import csv

    rows = list(csv.DictReader(table))
    assert [r["same tokens as plain"] for r in rows if r["path"] == "fast"] == ["2/2"] * 3, table
    # fast-short is paired with the fast-bf16 run it stops halfway.
    assert all(r["ROUGE-1 minus fast-bf16 [95% CI]"] for r in rows if r["path"] == "fast-short"), table
    assert "command" in out.with_suffix(".json").read_text()


@pytest.mark.slow
def test_reference_comparison_profiles_where_the_time_goes(tmp_path, capsys, monkeypatch):
    out = tmp_path / "profile.csv"
    run_bench("reference_comparison", ["--quick", "--paths", "fast-bf16", "--selections", "query0", "--profile",
                                       "--out", str(out)], capsys, monkeypatch)
    text = out.with_suffix(".profile.txt").read_text()
    assert text.startswith("python bench/reference_comparison.py --quick")
    shares = [float(v) for v in re.findall(r"^  [a-z ]+: ([\d.]+) %$", text, flags=re.M)]
    assert len(shares) == 3 and abs(sum(shares) - 100) < 0.2 and shares[0] > 10  # matrix products, casts, other
    assert "aten::mm" in text


@pytest.mark.slow
def test_span_speed_quick_prints_table_and_recovers_exactly(tmp_path, capsys, monkeypatch):
    out = tmp_path / "span_speed.json"
    stdout = run_bench("span_speed", ["--quick", "--out", str(out)], capsys, monkeypatch)
    assert "| set | batches |" in stdout and "median s" in stdout, stdout
    stored = json.loads(out.read_text())
    assert stored["command"] == f"python bench/span_speed.py --quick --out {out}"
    rows = {row["set"]: row for row in stored["rows"]}
    # The span check is exact on the bundled sentences, alone and in a batch of two.
    assert rows["sample B=1"]["exact"] == "4/4" and rows["sample B=2"]["exact"] == "2/2"


def test_the_readme_repeats_the_stored_span_speed_table():
    stored = json.loads((REPO / "data" / "bench" / "span_speed.json").read_text())
    header = list(stored["rows"][0])
    table = markdown_table(header, [[row[k] for k in header] for row in stored["rows"]])
    assert stored["command"].startswith("python bench/span_speed.py")
    assert table in (REPO / "README.md").read_text(), "update the README's span-check speed table from " \
        "data/bench/span_speed.json"


def test_the_readme_repeats_the_stored_side_by_side_table():
    """The README's speed table is the stored run's, and its ratios are to the reference of the same run."""
    import csv

    stored = REPO / "data" / "bench" / "reference_comparison.csv"
    meta = json.loads(stored.with_suffix(".json").read_text())
    assert meta["command"].startswith("python bench/reference_comparison.py") and "--reference" in meta["command"]
    with stored.open() as f:
        rows = list(csv.DictReader(f))
    assert {row["path"] for row in rows} >= {"reference", "fast", "fast-bf16"}
    for row in rows:  # every ratio divides seconds of this run
        if row["x reference"]:
            ref = next(r for r in rows if r["selection"] == row["selection"] and r["path"] == "reference")
            ratio = float(ref["s/sentence"]) / float(row["s/sentence"])  # of rounded seconds: within 2 %
            assert abs(ratio / float(row["x reference"]) - 1) < 0.02
    header = list(rows[0])
    table = markdown_table(header, [[row[k] for k in header] for row in rows])
    assert table in (REPO / "README.md").read_text(), "update the README's side-by-side table from " \
        "data/bench/reference_comparison.csv"


@pytest.mark.skipif(__import__("gilib.data", fromlist=["default_data_dir"]).default_data_dir() is None,
                    reason="the benchmark sentences (../shared/data) are not on this machine")
def test_the_mixed_batches_hold_sixteen_distinct_sentences_under_the_width(minilm):
    # bench/mixed_batches.py: 6 CoLA, 5 SST-2, 5 Rotten Tomatoes per batch; SST-2 and Rotten Tomatoes
    # share sentences (up to a trailing space), and a batch must not hold one twice.
    from mixed_batches import WIDTH, batch

    _, tokenizer = minilm
    for index in range(6):
        examples = batch(index)
        texts = [" ".join(e.text.lower().split()) for e in examples]
        assert len(examples) == 16 and len(set(texts)) == 16
        assert [e.dataset for e in examples] == ["cola"] * 6 + ["sst2"] * 5 + ["rotten_tomatoes"] * 5
        tokens = int(encode(tokenizer, [e.text for e in examples], [e.label for e in examples])
                     ["attention_mask"].sum())
        assert 250 < tokens < WIDTH


@pytest.mark.skipif(__import__("gilib.data", fromlist=["default_data_dir"]).default_data_dir() is None,
                    reason="the benchmark sentences (../shared/data) are not on this machine")
def test_peel_speed_rebuilds_chapter_6s_cola_batch_of_eight_with_either_search(tmp_path, capsys, monkeypatch):
    # bench/peel_speed.py on its smallest message (chapter 6's CoLA batch of 8, 84 tokens, FedSGD): both
    # searches rebuild all 8 sentences, and the CSV and its settings are written.
    out = tmp_path / "peel_speed.csv"
    run_bench("peel_speed", ["--messages", "fedsgd", "--datasets", "cola", "--time-budget", "120", "--out",
                             str(out)], capsys, monkeypatch)
    lines = pd.read_csv(out)
    assert lines["search"].tolist() == ["bag", "split"] and (lines["tokens"] == 84).all()
    assert (lines["exact"] == 8).all() and not lines["timed_out"].any()
    assert json.loads(out.with_suffix(".json").read_text())["command"].startswith("python bench/peel_speed.py")


@pytest.mark.slow
def test_decoder_optimization_writes_a_line_per_sentence_and_its_settings(tmp_path, capsys, monkeypatch):
    out = tmp_path / "decoder_optimization.csv"
    # Batch size 1, one random start and one Adam step: the gpt2-shape decoder's passes are the cost.
    stdout = run_bench("decoder_optimization", ["--sizes", "1", "--steps", "1", "--starts", "1", "--out", str(out)],
                       capsys, monkeypatch)
    assert "sentences exact [95 %]" in stdout, stdout
    lines = pd.read_csv(out)
    # One batch of 1 per dataset: the sentences of bench/decoder_span.py's first batches of 1.
    assert len(lines) == 3 and lines.groupby("dataset")["row_ids"].nunique().tolist() == [1, 1, 1]
    assert (lines["batch_size"] == 1).all()
    assert (lines["steps"] == 1).all() and lines["rouge1"].between(0, 1).all()
    settings = json.loads(out.with_suffix(".json").read_text())
    assert settings["attack"]["steps"] == 1 and settings["attack"]["lr"] == 0.003 and settings["batches"] == 1
    assert settings["attack"]["init_candidates"] == 1


def test_a_decoder_bench_counts_a_sentence_held_twice_only_when_given_back_twice():
    from decoder_span import exact_sentences

    ids = torch.tensor([[101, 7, 102, 0], [101, 7, 102, 0], [101, 8, 9, 102]])
    true_batch = {"input_ids": ids, "attention_mask": (ids != 0).long()}
    assert exact_sentences([[101, 8, 9, 102], [101, 7, 102], [101, 5, 102]], true_batch) == [True, False, True]
    assert exact_sentences([[101, 7, 102], [101, 7, 102], [101, 8, 9, 102]], true_batch) == [True, True, True]


@pytest.mark.slow
def test_lora_decoder_writes_a_line_per_sentence_and_setting_and_its_settings(tmp_path, capsys, monkeypatch):
    out = tmp_path / "lora_decoder.csv"
    # Rank 64, one sentence per dataset: each fits, so each comes back exactly (the rank rule).
    stdout = run_bench("lora_decoder", ["--ranks", "64", "--per-dataset", "1", "--out", str(out)], capsys,
                       monkeypatch)
    assert "token_accuracy" in stdout, stdout
    lines = pd.read_csv(out)
    assert len(lines) == 3 * 2 and set(lines["adapters"]) == {"c_attn", "c_attn+mlp"}
    assert lines["fits"].all() and lines["exact"].all() and (lines["inputs"] == lines["tokens"] - 1).all()
    assert lines.loc[lines["adapters"] == "c_attn+mlp", "verified"].all()
    settings = json.loads(out.with_suffix(".json").read_text())
    assert settings["ranks"] == [64] and settings["model"] == "gpt2-shape" and settings["offset"] == 300


def _noiseless_query_message(minilm):
    """The DP energy benches' noiseless case: layer 0's query gradient of one sentence, the sentence, and it
    with one token changed (bench/ is on the path: ``_bench_on_path``).

    Returns:
        ``(model, token space, selection, the message's tensors, true ids, ids with "dog" at position 2)``.
    """
    from gilib.attack.tokens import TokenSpace

    model, tokenizer = minilm
    selection = select(model, "attention.query", 0)
    true_batch = encode(tokenizer, ["the cat sat on the mat ."], [1])
    grads = client_update(model, selection, true_batch).shared.shared_grads
    truth = true_batch["input_ids"][0].tolist()
    wrong = truth[:2] + [tokenizer.convert_tokens_to_ids("dog")] + truth[3:]
    return model, TokenSpace(model, tokenizer), selection, grads, truth, wrong


def test_the_true_sentence_captures_all_of_a_noiseless_gradient_and_a_wrong_one_less(minilm):
    # bench/dp_energy.py compares the energy tr(P_X G^T G) the true and the found sentence capture: without
    # noise the query gradient's rows lie in the span of the sentence's inputs, so the truth captures all of
    # ||G||^2 and a sentence with one token changed captures less.
    model, tokens, selection, grads, truth, wrong = _noiseless_query_message(minilm)
    from dp_energy import captured_energy  # bench/: on sys.path (_bench_on_path)

    gradient = grads[0].double()
    gram = gradient.T @ gradient
    total = float(gradient.square().sum())
    assert captured_energy(model, truth, gram) == pytest.approx(total, rel=1e-6)
    assert captured_energy(model, wrong, gram) < 0.999 * total


def test_the_models_likelihood_puts_a_clipped_noiseless_message_at_the_truth(minilm):
    # completion.model_distance (bench/dp_energy.py's likelihood): the message against each sentence's own
    # gradient, scaled by its least-squares clipping factor. A clipped (halved) noiseless gradient sits at
    # distance 0 from the truth, and a sentence with one token changed is far from it.
    model, tokens, selection, grads, truth, wrong = _noiseless_query_message(minilm)
    from gilib.attack.completion import model_distance, stacked_projections

    names, matrix = stacked_projections(model, selection.names, [0.5 * g for g in grads])
    scale = float(matrix.square().mean())
    assert model_distance(model, names, matrix, truth) < 1e-10 * scale
    assert model_distance(model, names, matrix, wrong) > 1e-3 * scale


def test_single_changes_find_the_true_fix_first_without_noise(minilm):
    # bench/dp_energy.py --single-changes: a found sentence one token off a noiseless message. Its wrong
    # position's true token adds the most energy to the others' span (rank 0), fixing it alone lowers the
    # model's distance, and no other of the 64 candidates lowers it as much.
    model, tokens, selection, grads, truth, found = _noiseless_query_message(minilm)
    from dp_energy import single_changes  # bench/: on sys.path (_bench_on_path)
    from gilib.attack.completion import stacked_projections

    names, matrix = stacked_projections(model, selection.names, grads)
    counts = single_changes(model, tokens, names, matrix, found, truth)
    assert counts == {"wrong": 1, "fix_lowers": 1, "in_candidates": 1, "fix_best": 1, "true_rank_median": 0.0}


def test_the_basin_puts_the_truth_at_the_floor_and_one_wrong_token_above_it(minilm):
    # bench/dp_energy.py --basin on a noiseless message (floor 0), the found sentence two tokens off: the
    # truth has no excess, and the truth with one of them wrong has some, less than the found sentence's.
    model, tokens, selection, grads, truth, one_off = _noiseless_query_message(minilm)
    from dp_energy import basin  # bench/: on sys.path (_bench_on_path)
    from gilib.attack.completion import stacked_projections

    found = one_off[:4] + [one_off[1]] + one_off[5:]
    names, matrix = stacked_projections(model, selection.names, grads)
    excess = basin(model, names, matrix, found, truth, floor=0.0, seed=0)
    assert excess["excess_found"] == float("inf")
    assert abs(excess["excess_truth"]) < 1e-6
    assert 0.01 < excess["excess_one_wrong"] < 0.99
    assert 0.01 < excess["excess_half_wrong"] < 0.99  # half of two: one, drawn
    assert all(math.isnan(v) for v in basin(model, names, matrix, truth, truth, floor=0.0, seed=0).values())
    # A floor above the found sentence's distance leaves it no excess to take shares of: NaN, not a sign flip.
    below = basin(model, names, matrix, found, truth, floor=1.0, seed=0)
    assert below["excess_found"] < 0 and all(math.isnan(below[k]) for k in below if k != "excess_found")


@pytest.mark.parametrize("flag", ["--single-changes", "--basin"])
def test_dp_energy_refuses_a_diagnosis_at_a_sigma_it_does_not_run(capsys, flag):
    # A sigma given to --single-changes or --basin but not to --sigmas would measure nothing without a word.
    from dp_energy import main

    with pytest.raises(SystemExit):
        main(["--sigmas", "3e-5", flag, "1e-4"])
    assert f"{flag} [0.0001] are not among --sigmas" in capsys.readouterr().err


def test_noisy_span_shards_the_secure_and_fedavg_batches_too(monkeypatch):
    # --shard splits a run across processes: the SecAgg+ and FedAvg batches as well as the single sentences
    # (it once applied to the sentences only, and two shards of a SecAgg+ run each ran every batch).
    import noisy_span
    from gilib.update import SharedUpdate

    from types import SimpleNamespace

    batches = [("chapter 6", name, [SimpleNamespace(text=name, label=0)]) for name in "abcde"]
    update = SharedUpdate([torch.ones(2), torch.ones(2)], None, [3])
    monkeypatch.setattr(noisy_span, "secure_batches", lambda clients: iter(batches))
    monkeypatch.setattr(noisy_span, "fedavg_batches", lambda size: iter(batches))
    monkeypatch.setattr(noisy_span, "cached_model", lambda name: (None, None))
    monkeypatch.setattr(noisy_span, "select", lambda *args: None)
    monkeypatch.setattr(noisy_span, "secure_message", lambda *args: (update, 0.0, [[1]], [update, update]))
    monkeypatch.setattr(noisy_span, "_batch_rows", lambda *args: [{"dataset": args[4]["dataset"]}])
    ran = [[r["dataset"] for r in noisy_span.measure_secure(2, shard=(i, 2))] for i in (0, 1)]
    assert ran == [["a", "c", "e"], ["b", "d"]]
    monkeypatch.setattr(noisy_span, "encode", lambda *args: {"input_ids": torch.ones(1, 3, dtype=torch.long),
                                                           "attention_mask": torch.ones(1, 3)})
    monkeypatch.setattr(noisy_span, "client_update", lambda *args: type("Reply", (), {"shared": update}))
    selection = type("Selection", (), {"names": ["bert.encoder.layer.0.attention.self.query.weight",
                                                 "bert.encoder.layer.0.attention.self.value.weight"]})
    monkeypatch.setattr(noisy_span, "select", lambda *args: selection)
    ran = [r["dataset"] for r in noisy_span.measure_fedavg_batch(2, checks=["old"], shard=(1, 3))]
    assert ran == ["b", "e"]


@pytest.mark.parametrize("shard", [["2", "2"], ["-1", "3"], ["0", "0"]])
def test_noisy_span_refuses_a_shard_outside_its_count(capsys, shard):
    # --shard I N takes every N-th sentence from the I-th: I >= N or I < 0 would run no sentence and
    # write an empty table without a word.
    from noisy_span import main

    with pytest.raises(SystemExit):
        main(["--shard", *shard])
    assert f"--shard I N needs 0 <= I < N, got {shard[0]} {shard[1]}" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["--actors", "0"], ["--busy", "-1"], ["--repeats", "0"]])
def test_flower_actors_refuses_settings_that_time_nothing(capsys, monkeypatch, argv):
    # bench/flower_actors.py: no actor, a negative count of busy cores or no repeat is refused before any round.
    import flower_actors

    monkeypatch.setattr(flower_actors, "timed_round", lambda *args: pytest.fail("a round started"))
    with pytest.raises(SystemExit):
        flower_actors.main(argv)
    assert "--actors needs counts of at least 1" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["--starts", "0"], ["--steps", "0"]])
def test_decoder_optimization_refuses_an_attack_with_no_start_or_no_step(capsys, monkeypatch, argv):
    # Refused before the victim is built or any sentence attacked.
    import decoder_optimization

    monkeypatch.setattr(decoder_optimization, "measure", lambda *args: pytest.fail("an attack started"))
    with pytest.raises(SystemExit):
        decoder_optimization.main(argv)
    assert "--steps and --starts must be at least 1" in capsys.readouterr().err


def test_noisy_span_replays_the_found_sentence_at_its_best_label(minilm):
    # bench/noisy_span.py's certificate: the found sentence's replay under the label that fits, the client's
    # under its own; a wrong token leaves a share of the entries unreproduced under either label.
    from noisy_span import _replays

    model, tokenizer = minilm
    selection = select(model, "layer", 0)
    true_batch = encode(tokenizer, "a cat sat on the mat", 0)
    protocol = FedAvg(1, 1e-5)
    sent = client_update(model, selection, true_batch, protocol).shared
    truth = true_batch["input_ids"][0].tolist()
    assert _replays(model, selection, sent, protocol, truth, true_batch) == {"found_replay": 0.0, "truth_replay": 0.0}
    wrong = truth[:2] + tokenizer.convert_tokens_to_ids(["dog"]) + truth[3:]
    replay = _replays(model, selection, sent, protocol, wrong, true_batch)
    assert replay["found_replay"] > 0.01 and replay["truth_replay"] == 0.0
