"""Chapter 7's bench readers (gilib.studies.partial) on small frames, and their command line."""

import pandas as pd
import pytest

from gilib.studies import all_studies, partial
from gilib.studies.study import main


def _lora_lines() -> pd.DataFrame:
    # Two sentences (n = 10 and 20) at r = 4 (query: no fit) and r = 16 (query: fits only the short one).
    rows = []
    for r in (4, 16):
        for row_id, n in ((1, 10), (2, 20)):
            fits = r >= n
            rows.append({"r": r, "adapters": "query", "dataset": "cola", "row_id": row_id, "tokens": n,
                         "capacity": r, "fits": fits, "rank": min(r, n), "exact": fits,
                         "token_accuracy": 1.0 if fits else 0.2, "residual": 1e-6 if fits else 0.3,
                         "seconds": 0.5, "b_module": "query", "b_rank": min(r, n), "b_exact": n < r,
                         "b_passing_median": 1.0 if n < r else 29523.0})
    return pd.DataFrame(rows)


def test_rank_rule_summary_splits_each_setting_by_fit_with_wilson_intervals():
    table, facts = partial.rank_rule_summary(_lora_lines())
    assert list(table[["r", "fits (n ≤ rank)", "sentences"]].itertuples(index=False, name=None)) == [
        (4, "no", 2), (16, "no", 1), (16, "yes", 1)]
    assert table["exact [95 %]"].tolist() == ["0% [0%, 66%]", "0% [0%, 79%]", "100% [21%, 100%]"]
    assert facts["lora_rule_holds"] is True
    assert (facts["lora_fit_lines"], facts["lora_fit_exact"], facts["lora_nofit_lines"]) == (1, 1.0, 3)
    assert facts["lora_nofit_high"] == pytest.approx(0.5615, abs=1e-4)
    assert (facts["lora_tokens_min"], facts["lora_tokens_max"], facts["lora_sentences"]) == (10, 20, 2)
    assert (facts["lora_b_small_lines"], facts["lora_b_small_exact"]) == (1, 1.0)
    assert (facts["lora_b_large_exact"], facts["lora_b_large_passing"]) == (0.0, 29523)
    assert facts["lora_fit_residual_max"] == 1e-6 and facts["lora_nofit_residual_min"] == 0.3


def test_rank_rule_summary_sees_a_broken_rule_and_orders_adapters():
    lines = _lora_lines()
    lines.loc[0, "exact"] = True  # a sentence exact although it does not fit
    both = lines.assign(adapters="both", capacity=lines["capacity"] * 2)
    table, facts = partial.rank_rule_summary(pd.concat([both, lines]))
    assert facts["lora_rule_holds"] is False
    assert table.loc[table["r"] == 4, "adapters"].tolist() == ["query", "query + value"]


def _decoder_lines() -> pd.DataFrame:
    return pd.DataFrame({"batch_size": [1, 1, 2, 2], "batch": [0, 1, 0, 1], "tokens": [10, 12, 20, 30],
                         "exact": [True, True, True, False], "sentences_exact": [1.0, 1.0, 1.0, 0.5],
                         "seconds": [1.0, 2.0, 3.0, 5.0], "timed_out": [False, False, False, True]})


def test_decoder_summary_gives_each_batch_size_its_interval_and_seconds():
    table, facts = partial.decoder_summary(_decoder_lines())
    assert table["batch size"].tolist() == [1, 2]
    assert table["batches exact [95 %]"].tolist() == ["100% [34%, 100%]", "50% [9%, 91%]"]
    assert table["sentences exact"].tolist() == ["100%", "75%"]
    assert table["s / batch (mean)"].tolist() == [1.5, 4.0] and table["out of time"].tolist() == [0, 1]
    assert facts["decoder_all_exact"] is False and facts["decoder_timed_out"] == 1
    assert (facts["decoder_exact_2"], facts["decoder_seconds_max"], facts["decoder_tokens_max"]) == (0.5, 5.0, 30)
    assert facts["decoder_sizes"] == [1, 2] and facts["decoder_batches_1"] == 2


def _decoder_optimization_lines() -> pd.DataFrame:
    # Size 1: two batches, one exact. Size 2: batch "3 4" half exact, batch "5 6" not at all.
    return pd.DataFrame({"dataset": ["cola"] * 6, "batch_size": [1, 1, 2, 2, 2, 2],
                         "row_ids": ["1", "2", "3 4", "3 4", "5 6", "5 6"], "row_id": [1, 2, 3, 4, 5, 6],
                         "exact": [True, False, True, False, False, False],
                         "rouge1": [1.0, 0.5, 1.0, 0.2, 0.2, 0.2], "rouge2": [1.0, 0.0, 1.0, 0.0, 0.0, 0.0],
                         "seconds": [10.0, 20.0, 40.0, 40.0, 60.0, 60.0], "steps": [100] * 6})


def test_decoder_optimization_summary_counts_batches_as_the_unit():
    table, facts = partial.decoder_optimization_summary(_decoder_optimization_lines())
    assert table[["batch size", "batches", "sentences"]].values.tolist() == [[1, 2, 2], [2, 2, 4]]
    # Size 2: half a batch's sentences of two batches is 25 %, Wilson over the 2 batches.
    assert table["sentences exact [95 %]"].tolist() == ["50% [9%, 91%]", "25% [3%, 80%]"]
    # ROUGE resamples batches: size 2's batch means are 0.6 and 0.2.
    assert table["ROUGE-1 [95 %]"].tolist() == ["0.75 [0.50, 1.00]", "0.40 [0.20, 0.60]"]
    assert table["ROUGE-2 [95 %]"].tolist() == ["0.50 [0.00, 1.00]", "0.25 [0.00, 0.50]"]
    assert table["s / batch (mean)"].tolist() == [15.0, 50.0]
    assert (facts["decoder_opt_exact_2"], facts["decoder_opt_rouge1_2"], facts["decoder_opt_rouge1_low_2"]) == (
        0.25, 0.4, 0.2)
    assert (facts["decoder_opt_sentences"], facts["decoder_opt_exact_sentences"]) == (6, 2)
    assert facts["decoder_opt_sizes"] == [1, 2] and facts["decoder_opt_steps"] == 100


def test_decoder_optimization_summary_refuses_mixed_settings():
    lines = _decoder_optimization_lines()
    lines.loc[0, "steps"] = 200
    with pytest.raises(ValueError, match="several step counts"):
        partial.decoder_optimization_summary(lines)


def test_the_partial_tables_print_in_markdown(tmp_path, capsys):
    lora, decoder = tmp_path / "lora.csv", tmp_path / "decoder.csv"
    optimization = tmp_path / "decoder_optimization.csv"
    _lora_lines().to_csv(lora, index=False)
    _decoder_lines().to_csv(decoder, index=False)
    _decoder_optimization_lines().to_csv(optimization, index=False)
    assert main(all_studies(), ["partial", "decoder-optimization", str(optimization)]) == 0
    printed = capsys.readouterr().out.strip()
    assert printed == partial.decoder_optimization_markdown(optimization) and "| ROUGE-1 [95 %] |" in printed
    assert main(all_studies(), ["partial", "rank-rule", str(lora)]) == 0
    assert capsys.readouterr().out.strip() == partial.rank_rule_markdown(lora)
    assert main(all_studies(), ["partial", "decoder", str(decoder)]) == 0
    printed = capsys.readouterr().out.strip()
    assert printed == partial.decoder_markdown(decoder) and printed.startswith("| batch size |")
    assert partial.STUDY.plan is None  # a reader: nothing to run


def _lora_decoder_lines() -> pd.DataFrame:
    # Two sentences (10 and 20 tokens: 9 and 19 inputs) at r = 4 (no fit) and r = 16 (fits the short one),
    # c_attn alone and with mlp.c_fc; one sentence exact although it does not fit (uncertified).
    rows = []
    for r in (4, 16):
        for adapters in ("c_attn", "c_attn+mlp"):
            for row_id, n in ((1, 10), (2, 20)):
                fits = r >= n - 1
                lucky = (r, adapters, row_id) == (16, "c_attn", 2)
                rows.append({"model": "gpt2-shape", "r": r, "adapters": adapters, "dataset": "sst2",
                             "row_id": row_id, "tokens": n, "inputs": n - 1, "capacity": r, "fits": fits,
                             "rank": min(r, n - 1), "verified": fits and adapters != "c_attn",
                             "found": fits and adapters != "c_attn", "exact": fits or lucky,
                             "token_accuracy": 1.0 if fits or lucky else 0.5,
                             "rouge1": 1.0 if fits or lucky else 0.4 + r / 100, "rouge2": 0.0,
                             "residual": 1e-6 if fits else 0.5, "seconds": 0.7})
    return pd.DataFrame(rows)


def test_lora_decoder_summary_splits_each_setting_by_fit_and_counts_uncertified_hits():
    table, facts = partial.lora_decoder_summary(_lora_decoder_lines())
    assert list(table[["r", "adapters", "fits (n - 1 ≤ r)", "sentences"]].itertuples(index=False, name=None)) == [
        (4, "c_attn", "no", 2), (4, "c_attn + mlp.c_fc", "no", 2), (16, "c_attn", "yes", 1),
        (16, "c_attn", "no", 1), (16, "c_attn + mlp.c_fc", "yes", 1), (16, "c_attn + mlp.c_fc", "no", 1)]
    assert table["exact [95 %]"].tolist()[:4] == ["0% [0%, 66%]", "0% [0%, 66%]", "100% [21%, 100%]",
                                                  "100% [21%, 100%]"]
    assert table["prefixes checked"].tolist() == ["0%", "0%", "0%", "0%", "100%", "0%"]
    assert (facts["lora_dec_fit_lines"], facts["lora_dec_nofit_lines"], facts["lora_dec_nofit_exact_lines"]) == (
        2, 6, 1)
    assert facts["lora_dec_fit_all_exact"] and facts["lora_dec_verified_lines"] == 1
    assert (facts["lora_dec_rouge1_4"], facts["lora_dec_rouge1_16"]) == (0.44, 1.0)
    assert (facts["lora_dec_sentences"], facts["lora_dec_settings"], facts["lora_dec_tokens_max"]) == (2, 4, 20)
    assert facts["lora_dec_fit_residual_max"] == 1e-6 and facts["lora_dec_nofit_residual_min"] == 0.5
    lines = _lora_decoder_lines()
    lines.loc[lines["fits"], "exact"] = False  # a fitting sentence missed: the rule broken
    assert partial.lora_decoder_summary(lines)[1]["lora_dec_fit_all_exact"] is False


def test_the_lora_decoder_table_prints_in_markdown(tmp_path, capsys):
    path = tmp_path / "lora_decoder.csv"
    _lora_decoder_lines().to_csv(path, index=False)
    assert main(all_studies(), ["partial", "lora-decoder", str(path)]) == 0
    printed = capsys.readouterr().out.strip()
    assert printed == partial.lora_decoder_markdown(path) and printed.startswith("| r | adapters |")
