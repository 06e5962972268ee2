"""Chapter 6's study (gilib.studies.federated): its plan, its keys, and one measurement each way."""

import pytest

from gilib.studies import federated as federated_study
from gilib.studies.sample import sample
from gilib.client import FedAvg


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
