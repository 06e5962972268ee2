"""Chapter 7's study (gilib.studies.lora): its grids, plan and keys, and its tables on a tiny grid run for real."""

import json

import pandas as pd
import pytest

from gilib.attack import AttackConfig
from gilib.studies import all_studies
from gilib.studies import lora as lora_study
from gilib.studies.study import main

TINY = lora_study.Grid("tiny", ranks=(16,), adapters=("both",), rounds=(1, 2), span_sentences=1,
                       optimization_sentences=1,
                       attack=AttackConfig(steps=4, init_candidates=2, swap_every=2, swap_candidates=2,
                                           progress=False))
"""One rank, query and value on layer 0, one and two rounds, FedSGD and AdamW (with and without the noise model):
a few seconds per sentence."""


def test_the_full_grid_crosses_the_span_check_and_sweeps_the_optimisation_attack_around_the_base():
    grid = lora_study.GRIDS["full"]
    span = grid.span_settings()
    # r x adapters x rounds (FedSGD), r with AdamW without and with the noise model, the reference
    assert len(span) == 4 * 4 * 3 + 4 + 4 + 1
    assert {s.r for s in span if s.weighted} == set(lora_study.RANKS)
    assert all(s.protocol == "AdamW" and s.adapters == "both" and s.rounds == 1 for s in span if s.weighted)
    assert lora_study.REFERENCE in span and lora_study.REFERENCE in grid.optimization_settings()
    optimised = grid.optimization_settings()
    # Rounds at the base setting only: every round's message matched at once.
    assert {s for s in optimised if s.rounds > 1} == {lora_study.BASE._replace(rounds=k) for k in (2, 4)}
    assert not any(s.weighted for s in optimised)
    assert {s.r for s in optimised if s.adapters == "both" and s.protocol == "FedSGD"} == set(lora_study.RANKS)
    assert {s.adapters for s in optimised} == {*lora_study.ADAPTERS, lora_study.REFERENCE_NAME}
    assert lora_study.BASE._replace(protocol="AdamW") in optimised
    assert len(optimised) == len(set(optimised)) == 4 + 3 + 1 + 1 + 2


def test_the_plan_pairs_the_optimisation_sentences_with_the_span_checks_and_keys_each_line_once():
    tasks = lora_study.plan("full")
    span = [t for t in tasks if t[1] == "span"]
    optimised = [t for t in tasks if t[1] == "optimisation"]
    assert len(span) == 57 * 12 and len(optimised) == 11 * 6
    span_rows = {(t[3], t[4].row_id) for t in span}
    by_setting = {}
    for t in optimised:
        by_setting.setdefault(t[5], set()).add((t[3], t[4].row_id))
    # Every setting attacks the same six sentences, the first two of each dataset's span sentences.
    assert all(rows == by_setting[lora_study.REFERENCE] for rows in by_setting.values())
    assert len(by_setting[lora_study.REFERENCE]) == 6 and by_setting[lora_study.REFERENCE] <= span_rows
    keys = [k for t in tasks for k in lora_study._task_key(*t)]
    assert len(keys) == len(set(keys))
    # A setting's sentences are consecutive: its victims are built once per worker.
    settings = [t[5] for t in span]
    assert settings == sorted(settings, key=lambda s: settings.index(s))


@pytest.mark.parametrize("kwargs, message", [
    (dict(adapters=("keys",)), "Unknown adapters"),
    (dict(protocols=("FedProx",)), "Unknown protocols"),
    (dict(ranks=(0,)), "ranks must be"),
    (dict(rounds=()), "rounds must be"),
    (dict(span_sentences=1, optimization_sentences=2), "optimization_sentences"),
])
def test_bad_grids_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        lora_study.Grid("bad", **kwargs)


def test_unknown_grids_and_parts_are_refused():
    with pytest.raises(ValueError, match="Unknown grid 'medium'"):
        lora_study.plan("medium")
    with pytest.raises(ValueError, match="Unknown part 'dp'"):
        lora_study.plan("fast", ["dp"])


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """The tiny grid on CoLA's first sentence, run through the study's runner."""
    out = tmp_path_factory.mktemp("lora") / "lines.jsonl"
    tasks = [t for t in lora_study.plan(TINY) if t[3] == "cola"]
    lines = lora_study.STUDY.run(out, tasks, progress=False)
    return out, tasks, lines


def test_a_tiny_run_writes_one_keyed_line_per_task_and_resumes_without_work(tiny_run):
    out, tasks, lines = tiny_run
    # span: r16 both x rounds 1, 2; AdamW without and with the noise model; the reference /
    # opt: base, AdamW, reference, two rounds
    assert len(tasks) == 5 + 4
    assert sorted(map(lora_study._line_key, lines)) == sorted(k for t in tasks for k in lora_study._task_key(*t))
    assert all(line["commit"] and line["grid"] == "tiny" and "text" not in line for line in lines)
    assert lora_study.STUDY.run(out, tasks, progress=False) == lines  # every key present: nothing reruns
    span = {(l["rounds"], l["protocol"], l["adapters"]): l for l in lines if l["study"] == "span"
            and not l.get("weighted")}
    (weighted,) = [l for l in lines if l.get("weighted")]
    assert weighted["protocol"] == "AdamW" and weighted["time_budget"] == lora_study.NOISE_MODEL_BUDGET
    assert isinstance(weighted["timed_out"], bool) and "weights" not in weighted
    # CoLA's first sentence has 12 tokens, inside the 32 stacked rows of two rank-16 adapters: exact.
    assert span[(1, "FedSGD", "both")]["exact"] and span[(1, "FedSGD", "both")]["fits"]
    assert span[(2, "FedSGD", "both")]["capacity"] == 64
    assert span[(1, "FedSGD", lora_study.REFERENCE_NAME)]["exact"]
    adamw = span[(1, "AdamW", "both")]
    assert 0 < adamw["invertible"] <= 1 and -1 <= adamw["cosine_to_gradient"] <= 1
    optimised = [l for l in lines if l["study"] == "optimisation"]
    assert {l["steps"] for l in optimised} == {4} and all(0 <= l["rouge1"] <= 1 for l in optimised)
    assert {l["rounds"] for l in optimised} == {1, 2}
    reference = next(l for l in optimised if l["adapters"] == lora_study.REFERENCE_NAME)
    assert reference["shared_parameters"] == 2 * 384 * 384 and reference["r"] == 0


def test_the_tables_and_their_facts_read_the_tiny_run(tiny_run):
    out, _, lines = tiny_run
    rank, facts = lora_study.rank_summary(out)
    assert list(rank["adapters"]) == ["both"] and facts["span_both_16_exact"] == 1.0
    assert facts["rule_fits_exact"] == facts["rule_fits_n"] == 2 and facts["span_ref_exact"] == 1.0
    rounds, facts = lora_study.rounds_summary(out)
    assert list(rounds.columns) == ["adapters", "r", "1 round: exact [95 %]", "2 rounds: exact [95 %]"]
    assert facts["span_rounds2_both_16_exact"] == 1.0
    length, facts = lora_study.length_summary(out)
    assert list(length["length"]) == ["<= 16 tokens"] and facts["length_short_16_exact"] == 1.0
    protocol, facts = lora_study.protocol_summary(out)
    assert set(protocol["protocol"]) == {"FedSGD", "AdamW"} and "adamw_invertible" in facts
    assert facts["fedsgd_span_16_exact"] == 1.0 and "adamw_span_weighted_16_exact" in facts
    assert lora_study.NOISE_MODEL in set(protocol["attack"])
    optimised, facts = lora_study.optimization_summary(out)
    assert len(optimised) == 4 and {"opt_ref_rouge1", "opt_r16_both_diff", "opt_r16_both_adamw_within",
                                    "opt_r16_both_rounds2_vs1"} <= set(facts)
    two = optimised.set_index("setting").loc["r=16, both, 2 rounds"]
    one = optimised.set_index("setting").loc["r=16, both"]
    assert two["vs1"] == pytest.approx(two["rouge1"] - one["rouge1"])  # one sentence: the paired difference
    row = optimised.set_index("setting").loc["r=16, both"]
    assert row["diff"] == pytest.approx(row["rouge1"] - facts["opt_ref_rouge1"], abs=0.006)
    # The same tables from the lines in memory, and an error that says how to make a missing part.
    assert lora_study.rank_summary(pd.DataFrame(lines))[1]["span_both_16_exact"] == 1.0
    empty = out.parent / "empty.jsonl"
    empty.write_text(json.dumps({"study": "span", "grid": "tiny"}) + "\n")
    with pytest.raises(ValueError, match="python -m gilib.studies lora run"):
        lora_study.optimization_summary(empty)


def test_the_command_line_prints_every_table(tiny_run, capsys):
    out, _, _ = tiny_run
    assert "lora" in [s.name for s in all_studies()]
    for table in ("rank", "rounds", "length", "protocol", "optimisation"):
        assert main(all_studies(), ["lora", table, str(out)]) == 0
        printed = capsys.readouterr().out
        assert printed.startswith("| ") and "95 %]" in printed
