"""Chapter 6 (the attack inside a federated round): its prose claims, checked against the cached results it draws on.

Each test quotes a sentence of the chapter and checks it against
``data/results``; a test fails when its sentence is false of those
numbers, and then the prose or the numbers need fixing, not the test.
"""

from __future__ import annotations

import pandas as pd

from gilib.studies import federated as federated_study

from tests.claims.cached import RESULTS, CLOSE, cached, fl_lines


def test_chapter6_the_cached_study_is_the_plan_complete():
    # Every task of gilib.studies.federated's plan has its lines, and nothing else is there.
    keys = sorted(k for task in federated_study.plan() for k in federated_study._task_key(*task))
    assert sorted(federated_study._line_key(line) for line in cached("ch6_federated.jsonl")) == keys


def test_chapter6_local_steps_do_not_protect_the_float64_control_is_exact():
    # "In the float64 control the span check recovers at least 100% of the
    # sentences at every E and learning rate", and FedSGD loses 100%.
    span = fl_lines("protocol").query("attack == 'span check'")
    assert (span.loc[span["precision"] == "float64", "exact"] == 1).all()
    assert (span.loc[span["protocol"] == "FedSGD", "exact"] == 1).all()


def test_chapter6_float32_rounding_breaks_the_span_check_by_learning_rate_whatever_e():
    # "the span check recovers 0% of the sentences at lr = 1e-5, 0% at 1e-4 and
    # 33% at 1e-3 (the cola sentences ...; none of the sentences of 28 tokens or
    # more), whatever E", with the message's cosine falling as lr shrinks.
    span = fl_lines("protocol").query("attack == 'span check' and precision == 'float32'")
    by_cell = span.groupby(["lr", "local_steps"])["exact"].mean().unstack()
    assert (by_cell.nunique(axis=1) == 1).all(), by_cell  # the same at every E
    assert by_cell.loc[1e-5].max() == by_cell.loc[1e-4].max() == 0
    assert 0 < by_cell.loc[1e-3].min() < 1
    assert set(span.query("lr == 0.001 and exact == 1")["dataset"]) == {"cola"}
    cosine = span.groupby("lr")["cosine_to_gradient"].mean()
    assert cosine.is_monotonic_increasing and cosine.loc[1e-5] < 0.95


def test_chapter6_the_optimization_attack_does_not_care_about_local_steps():
    # "reaches ROUGE-1 between 0.40 and 0.54 in every float32 cell, about as
    # much as from the plain gradient" (within 0.1 of FedSGD's).
    protocol = federated_study.table(RESULTS / "ch6_federated.jsonl", "protocol").query("attack == 'optimisation'")
    fedsgd = float(protocol.loc[protocol["protocol"] == "FedSGD", "rouge1"].iloc[0])
    fedavg = protocol.loc[protocol["protocol"] != "FedSGD", "rouge1"]
    assert len(fedavg) == 12 and (abs(fedavg - fedsgd) <= CLOSE).all()
    assert set(protocol["precision"]) == {"", "float32"}  # the float64 control is the span check's



def test_chapter6_batches_from_fedsgd_come_back_whole_and_fedavg_loses_them():
    # "From a FedSGD client the span check ... recovers 100%, 100% and 100% of
    # the sentences at batch sizes 2, 4 and 8. From the FedAvg client it
    # recovers" less at every size; the optimisation attack "drops at 4
    # sentences ... for both protocols alike".
    table = pd.concat([federated_study.table(RESULTS / "ch6_federated.jsonl", "batch"),
                       federated_study.table(RESULTS / "ch6_federated.jsonl", "protocol")])
    pick = table.set_index(["attack", "protocol", "batch_size"])
    fedavg = federated_study.protocol_name(federated_study.FEDAVG)
    for size in federated_study.BATCH_SIZES:
        assert pick.loc[("span check", "FedSGD", size), "exact"] == 1
        assert pick.loc[("span check", fedavg, size), "exact"] < 1
    for name in ("FedSGD", fedavg):
        assert pick.loc[("optimisation", name, 4), "rouge1"] < pick.loc[("optimisation", name, 1), "rouge1"] - CLOSE
    assert abs(pick.loc[("optimisation", "FedSGD", 4), "rouge1"] - pick.loc[("optimisation", fedavg, 4), "rouge1"]) \
        <= CLOSE


def test_chapter6_secure_aggregation_is_one_batch_up_to_its_quantisation():
    # "differs from the one-batch gradient by at most 8e-6 (relative)"; the
    # same exact rate as one client's batch except for "the exact attack on
    # batches of long sentences"; "The optimisation attack does not notice".
    secure = fl_lines("secure")
    assert secure["relative_error_to_batch_gradient"].max() < 1e-5
    assert (secure["skipped"] == 0).all()
    alone = fl_lines("batch").query("protocol == 'FedSGD'")
    paired = secure.merge(alone, left_on=["dataset", "clients", "attack"],
                          right_on=["dataset", "batch_size", "attack"], suffixes=("", "_alone"))
    assert len(paired) == len(secure)
    assert (paired["row_ids"] == paired["row_ids_alone"]).all()  # the same sentences
    differ = paired[paired["exact"] != paired["exact_alone"]]
    assert set(differ["attack"]) <= {"span check"}
    assert (differ["exact"] < differ["exact_alone"]).all() and (differ["tokens"] >= 100).all()
    assert (paired.query("tokens < 100 and attack == 'span check'")["exact"] == 1).all()
    optimized = paired[paired["attack"] == "optimisation"]
    assert (abs(optimized["rouge1"] - optimized["rouge1_alone"]) <= CLOSE).all()
