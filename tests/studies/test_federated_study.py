"""Chapter 6's study (gilib.studies.federated): its plan, its keys, and one measurement each way."""

from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest

from gilib.studies import federated as federated_study
from gilib.studies.sample import sample
from gilib.client import FedAvg
from gilib.data import load_split
from gilib.models import encode
from gilib.selection import select

ROOT = Path(__file__).resolve().parents[2]


def test_every_protocol_name_reads_back_as_its_protocol():
    named = federated_study.protocols()
    assert len(named) == 1 + 2 * len(federated_study.LOCAL_STEPS) * len(federated_study.LEARNING_RATES)
    for name, protocol in named.items():
        assert federated_study._protocol(name) == protocol
        assert federated_study.protocol_name(protocol) == name
    assert federated_study._protocol("FedAvg E=10 lr=1e-05 float64") == FedAvg(10, 1e-5, "float64")


def test_the_plan_covers_the_issues_grid_once():
    tasks = federated_study.plan()
    by_study = {s: [t for t in tasks if t[1] == s] for s in federated_study.PARTS}
    assert len(by_study["protocol"]) == 3 * federated_study.SENTENCES * len(federated_study.protocols())
    assert {len(t[3][1]) for t in by_study["batch"]} == set(federated_study.BATCH_SIZES)
    assert {len(t[3][1]) for t in by_study["secure"]} == {2, 4, 8}
    keys = [k for t in tasks for k in federated_study._task_key(*t)]
    assert len(keys) == len(set(keys))


def test_secure_clients_hold_the_batch_studys_sentences_and_no_protocol_sentence():
    tasks = federated_study.plan()
    batch = {(t[2], len(t[3][1])): [e.row_id for e in t[3][1]] for t in tasks if t[1] == "batch"}
    secure = {(t[2], len(t[3][1])): [e.row_id for e in t[3][1]] for t in tasks if t[1] == "secure"}
    assert secure == batch
    single = {(t[2], t[3][1][0].row_id) for t in tasks if t[1] == "protocol"}
    assert not single & {(d, r) for (d, _), rows in batch.items() for r in rows}


def test_only_float32_messages_of_at_most_four_sentences_are_optimized():
    assert federated_study._optimized("FedSGD", 4) and federated_study._optimized("FedAvg E=5 lr=1e-03", 1)
    assert not federated_study._optimized("FedSGD", 8)
    assert not federated_study._optimized("FedAvg E=5 lr=1e-03 float64", 1)


@pytest.mark.slow
def test_float32_rounding_breaks_the_span_check_and_the_float64_control_restores_it():
    (batch,) = sample("cola", 1)
    rounded = federated_study.run_task("measure_client", "protocol", "cola", ("FedAvg E=1 lr=1e-05", batch))
    control = federated_study.run_task("measure_client", "protocol", "cola", ("FedAvg E=1 lr=1e-05 float64", batch))
    assert [line["attack"] for line in rounded] == ["span check", "optimisation"]
    assert [line["attack"] for line in control] == ["span check"]
    assert rounded[0]["exact"] == 0 and rounded[0]["cosine_to_gradient"] < 0.95
    assert control[0]["exact"] == 1 and control[0]["rouge2"] == 1 and control[0]["cosine_to_gradient"] > 0.9999
    assert 0 < rounded[1]["rouge1"] < 1  # the optimisation attack still finds words
    keys = federated_study._task_key("measure_client", "protocol", "cola", ("FedAvg E=1 lr=1e-05", batch))
    assert [federated_study._line_key(line) for line in rounded] == keys
    assert batch[0].text not in str(rounded)  # row ids, never the text


def test_unknown_parts_are_refused(tmp_path):
    with pytest.raises(ValueError, match="Unknown part 'secur'"):
        federated_study.run(tmp_path / "out.jsonl", ["secur"])


def test_the_summaries_give_chapter_6_its_tables_and_facts():
    path = ROOT / "data" / "results" / "ch6_federated.jsonl"
    protocol, facts = federated_study.protocol_summary(path)
    span32 = protocol.query("attack == 'span check' and precision == 'float32'")
    for lr in federated_study.LEARNING_RATES:
        assert facts[f"span32_exact_{lr:.0e}"] == round(float(span32.query("lr == @lr")["exact"].mean()), 4)
    assert facts["fedsgd_span_exact"] == 1.0 and 0 < facts["opt_rouge1_min"] <= facts["opt_rouge1_max"] < 1
    by_size, facts = federated_study.batch_summary(path)
    assert set(by_size["batch_size"]) == {1, *federated_study.BATCH_SIZES}
    assert facts["fedavg_name"] == federated_study.protocol_name(federated_study.FEDAVG)
    assert {f"span_sgd{b}_exact" for b in (1, 2, 4, 8)} <= set(facts)
    both, facts = federated_study.secure_summary(path)
    assert set(both["sentences_in_message"]) == set(federated_study.CLIENTS)
    assert facts["secure_pairs"] == 2 * len(federated_study.CLIENTS) - 1  # no optimisation attack at 8
    assert facts["secure_same"] <= facts["secure_pairs"] and facts["secure_error_max"] < 1e-4


def test_the_round_table_pairs_each_reply_with_its_clients_truth(tiny):
    model, tokenizer = tiny
    batches = [[e] for e in load_split("sample")[:2]]
    truth = [tokenizer(b[0].text)["input_ids"] for b in batches]
    rebuilt = {0: SimpleNamespace(texts=["x"], token_ids=[truth[0]]),
               1: SimpleNamespace(texts=["y"], token_ids=[truth[0]])}  # client 1 got client 0's sentence
    run = SimpleNamespace(replies=[SimpleNamespace(client=1), SimpleNamespace(client=0)])
    table = federated_study.round_table(run, rebuilt, batches, tokenizer)
    assert table["client"].tolist() == [0, 1] and table["exact"].tolist() == [True, False]
    assert table["private sentence"].tolist() == [b[0].text for b in batches]


def test_float32_rounds_small_steps_away_and_the_float64_control_keeps_them(tiny):
    model, tokenizer = tiny
    selection = select(model, "attention.query", 0)
    example = load_split("sample")[0]
    table, facts = federated_study.rounding_table(model, selection, encode(tokenizer, example.text, example.label),
                                                  lrs=(1e-9, 1e-2))
    small, large = table.to_dict("records")
    assert small["steps rounded away"] > large["steps rounded away"]
    assert small["cos, float64"] > 0.999 and small["cos, float32"] < small["cos, float64"]
    assert facts == {"rounded_away_1e-09": round(small["steps rounded away"], 4),
                     "rounded_away_1e-02": round(large["steps rounded away"], 4),
                     "cos32_1e-09": round(small["cos, float32"], 3)}


def test_intervals_average_each_message_first_and_resample_messages():
    from gilib.metrics import bootstrap_interval

    lines = pd.DataFrame({"dataset": ["cola", "cola", "cola", "sst2"], "row_ids": [[1, 2], [1, 2], [3], [4]],
                          "lr": [1e-3, 1e-3, 1e-3, 1e-3], "exact": [1.0, 0.0, 1.0, 0.0]})
    cells = federated_study.intervals(lines, ["lr"], "exact")
    assert cells["messages"].tolist() == [3]
    assert cells["exact"].tolist() == pytest.approx([0.5])  # messages 0.5, 1, 0
    assert (cells.loc[0, "low"], cells.loc[0, "high"]) == bootstrap_interval([0.5, 1.0, 0.0])
    assert cells.loc[0, "text"] == f"0.50 [{cells.loc[0, 'low']:.2f}, {cells.loc[0, 'high']:.2f}]"


def test_a_time_budget_reaches_every_task_and_bad_ones_are_refused():
    assert {t[-1] for t in federated_study.plan(["protocol"], time_budget=120.0)} == {120.0}
    assert {t[-1] for t in federated_study.plan(["protocol"])} == {federated_study.TIME_BUDGET} == {300.0}
    assert {t[-1] for t in federated_study.plan(["protocol"], time_budget=None)} == {None}
    for bad in (0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="time_budget"):
            federated_study.plan(["protocol"], time_budget=bad)


def _bench_line(lr, exact, found, truth, **extra):
    return {"protocol": f"FedAvg E=1 lr={lr:.0e}", "set": "held-out", "dataset": "cola", "row_id": len(extra),
            "check": "new", "exact": exact, "tokens": 10, "seconds": 5.0, "surviving": 0.2, "timed_out": False,
            "found_distance": found, "truth_distance": truth, "time_budget": 60.0, **extra}


def test_the_bound_counts_a_miss_against_the_noise_model_only_where_a_wrong_sentence_fits_better(tmp_path):
    lines = [_bench_line(1e-5, True, 1.0, 1.0), _bench_line(1e-5, False, 3.0, 1.0, a=1),
             _bench_line(1e-5, False, 1.0, 2.0, a=1, b=2), _bench_line(1e-5, False, 2.0, 2.0, a=1, b=2, c=3),
             _bench_line(1e-3, True, 1.0, 1.0),
             {**_bench_line(1e-5, True, 1.0, 1.0, a=1), "time_budget": 300.0}]
    path = tmp_path / "bound.csv"
    pd.DataFrame(lines).to_csv(path, index=False)
    table, facts = federated_study.bound_summary(path)
    assert list(table["lr"]) == ["1e-05", "1e-05", "1e-03"] and list(table["sentences"]) == [4, 1, 1]
    assert list(table["budget (s)"]) == [60, 300, 60] and facts["bound_exact_1e-05_300s"] == 1
    # One miss has the truth closer (the search's); two have a wrong sentence as close or closer.
    assert facts["bound_search_1e-05"] == 1 and facts["bound_model_1e-05"] == 2
    assert facts["bound_exact_1e-05"] == 0.25 and facts["bound_ceiling_1e-05"] == 0.5
    assert facts["bound_ceiling_1e-03"] == 1 and facts["bound_model_1e-03"] == 0
    assert facts["bound_gap_min_1e-05"] == 3.0 and facts["bound_gap_min_1e-03"] is None
    assert "| 1e-05 | 60 | 4 | 25% [" in federated_study.bound_markdown(path)


def test_the_bound_table_counts_the_sentences_whose_replay_reproduces_the_message(tmp_path):
    lines = [_bench_line(1e-5, True, 1.0, 1.0, found_replay=0.0, truth_replay=0.0),
             _bench_line(1e-5, False, 3.0, 1.0, a=1, found_replay=0.19, truth_replay=0.0),
             _bench_line(1e-5, False, 2.0, 2.0, a=1, b=2, found_replay=0.0, truth_replay=1e-6),
             _bench_line(1e-3, True, 1.0, 1.0)]  # a line of an older run: no replay
    path = tmp_path / "bound.csv"
    pd.DataFrame(lines).to_csv(path, index=False)
    table, facts = federated_study.bound_summary(path)
    assert list(table["found replays the message"]) == ["2 of 3", "–"]
    assert list(table["client's replays it"]) == ["2 of 3", "–"]
    # The third line's miss replays: a second sentence that fits the message.
    assert facts["bound_replayed_1e-05"] == 2 and facts["bound_replayed_misses_1e-05"] == 1
    assert facts["bound_truth_replayed_1e-05"] == 2 and "bound_replayed_1e-03" not in facts


def test_the_noise_table_counts_each_rates_misses_those_out_of_time_and_the_searchs(tmp_path):
    lines = [_bench_line(1e-5, True, 1.0, 1.0), {**_bench_line(1e-5, False, 3.0, 1.0, a=1), "timed_out": True},
             {**_bench_line(1e-5, False, 1.0, 2.0, a=1, b=2), "protocol": "FedAvg E=2 lr=1e-05"},
             _bench_line(1e-3, True, 1.0, 1.0)]
    lines += [{**line, "check": "old", "exact": False} for line in lines]
    path = tmp_path / "noise.csv"
    pd.DataFrame(lines).to_csv(path, index=False)
    table, facts = federated_study.noise_check_summary(path)
    assert list(table["E"]) == [1, 2, 1] and facts["new_exact_1e-05"] == pytest.approx(1 / 3, abs=1e-4)
    # Pooled over E: two misses at 1e-5, one out of time, one the search's (the truth closer).
    assert facts["new_misses_1e-05"] == 2 and facts["new_misses_timed_out_1e-05"] == 1
    assert facts["new_search_misses_1e-05"] == 1 and facts["new_misses_1e-03"] == 0
    # The bench's older lines carry no distances: no count of the search's misses, rather than a wrong one.
    pd.DataFrame(lines).drop(columns=["found_distance", "truth_distance"]).to_csv(path, index=False)
    _, older = federated_study.noise_check_summary(path)
    assert "new_search_misses_1e-05" not in older and older["new_misses_1e-05"] == 2


def test_the_fedavg_batch_table_sets_the_float64_control_beside_both_checks(tmp_path):
    def line(size, check, exact, precision=""):
        return {"protocol": f"FedAvg E=5 lr=1e-03{precision} batch {size}", "set": "chapter 6", "dataset": "cola",
                "surviving": 0.9, "row_id": 1, "check": check, "exact": exact, "tokens": 12, "seconds": 40.0,
                "timed_out": not exact}
    lines = [line(2, "old", False), line(2, "new", True), line(4, "old", False), line(4, "new", False),
             line(2, "old", True, " float64")]
    path = tmp_path / "batches.csv"
    pd.DataFrame(lines).to_csv(path, index=False)
    table, facts = federated_study.fedavg_batch_summary(path)
    assert list(table["batch"]) == [2, 4] and list(table["sentences"]) == [1, 1]
    assert facts["fedavg_batch_old_exact_2"] == 0 and facts["fedavg_batch_new_exact_2"] == 1
    assert facts["fedavg_batch_control_exact_2"] == 1 and "fedavg_batch_control_exact_4" not in facts
    assert list(table["float64 control: exact [95 %]"])[1] == "not run"
    assert list(table.columns)[-4:] == ["float64 control: exact [95 %]", "entries moved", "batches", "sentences"]
