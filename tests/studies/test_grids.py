"""The grid runner: resumable, no duplicates, no dataset text, honest summaries."""

import json
import math

import pandas as pd
import pytest

from gilib.data import default_data_dir, load_split
from gilib.metrics import bootstrap_interval, rouge_scores
from gilib.studies import all_studies, grids
from gilib.studies.grids import (batch_axis, batch_markdown, load_grid, markdown, parse_grid, plan, run_grid,
                                 interval_column, intervals, score_intervals, sentence_lengths,
                                 summarize)
from gilib.studies.store import read_lines
from gilib.studies.study import main


def cli(*argv: str) -> int:
    """``python -m gilib.studies ARGV``, in this process."""
    return main(all_studies(), list(argv))

SPEC = {
    "name": "tiny-test",
    "model": "tiny",
    "datasets": ["sample"],
    "sentences": 3,
    "clients_per_task": 2,
    "attack": {"steps": 4, "init_candidates": 3, "swap_every": 2, "swap_candidates": 3},
    "selections": [{"component": "attention.query", "layers": [0, 1]}, {"component": "layer", "layers": [[0, 1]]}],
}


def _keyed(rows):
    return {(json.dumps(r["cell"], sort_keys=True), r["dataset"], r["row_id"]): r for r in rows}


def test_a_killed_run_resumes_without_duplicates(tmp_path):
    grid = parse_grid(SPEC)
    assert len(grid.cells) == 3  # query 0, query 1, layers 0+1 combined
    whole = run_grid(grid, tmp_path / "whole.jsonl", progress=False)
    assert len(whole) == 3 * 3

    part = tmp_path / "part.jsonl"
    first = run_grid(grid, part, limit=2, progress=False)  # "killed" after two tasks
    assert 0 < len(first) < len(whole)
    with part.open("a") as f:
        f.write('{"cell": {"model": "ti')  # and cut off mid-line
    resumed = run_grid(grid, part, progress=False)
    assert len(resumed) == len(whole) == len(_keyed(resumed))  # nothing lost, nothing twice
    again = run_grid(grid, part, progress=False)  # a finished grid runs nothing
    assert len(again) == len(resumed)
    whole_by_key, resumed_by_key = _keyed(whole), _keyed(resumed)
    assert whole_by_key.keys() == resumed_by_key.keys()
    for key, row in whole_by_key.items():  # seeded: the same reconstructions
        assert row["reconstruction"] == resumed_by_key[key]["reconstruction"]
        assert row["rouge1"] == resumed_by_key[key]["rouge1"]


def test_summarize_gives_mean_spread_and_count():
    cell = {"model": "tiny", "component": "attention.query", "layers": 0, "seed": 0}
    rows = [
        {"cell": cell, "dataset": "cola", "row_id": i, "rouge1": r1, "rouge2": 0.5, "rougeL": r1,
         "seconds": 2.0, "fraction": 0.01}
        for i, r1 in enumerate([0.2, 0.4, 0.9])
    ]
    rows.append({"cell": {**cell, "layers": [0, 1]}, "dataset": "cola", "row_id": 0, "rouge1": 1.0, "rouge2": 1.0,
                 "rougeL": 1.0, "seconds": 1.0, "fraction": 0.02})
    table = summarize(rows).set_index("layers")
    assert table.loc[0, "rouge1"] == pytest.approx(0.5)
    assert table.loc[0, "rouge1_std"] == pytest.approx(math.sqrt(((0.3**2) + (0.1**2) + (0.4**2)) / 2))
    assert table.loc[0, "n"] == 3 and table.loc[0, "rouge2_std"] == 0.0
    assert table.loc["0+1", "n"] == 1 and table.loc["0+1", "rouge1"] == 1.0
    low, high = bootstrap_interval([0.2, 0.4, 0.9])  # each sentence its own unit
    assert (f"| attention.query | 0 | 1.00 % | 0.50 [{low:.2f}, {high:.2f}] | 0.50 [0.50, 0.50] | 3 |"
            in markdown(rows))
    with pytest.raises(ValueError, match="Cannot group by"):
        summarize(rows, by=["colour"])
    with pytest.raises(ValueError, match="No results"):
        summarize([])


@pytest.mark.parametrize(
    "change, message",
    [
        ({"selections": [{"component": "attention.querry", "layers": 0}]}, "Unknown component"),
        ({"selections": []}, "no 'selections'"),
        ({"attack": {"stepz": 3}}, "Bad 'attack' settings"),
        ({"colour": "red"}, "Unknown grid field"),
        ({"sentences": 0}, "at least 1"),
        ({"dp": {"noise_multipliers": [0.1], "readings": ["cooked"]}}, "Unknown dp reading"),
        ({"dp": {"noise_multipliers": []}}, "needs noise_multipliers"),
        ({"dp": {"noise_multipliers": [-0.1]}}, "each 0 or more"),
        ({"dp": {"noise_multipliers": [0.1], "max_grad_norm": 0}}, "must be positive"),
        ({"dp": {"noise_multipliers": [0.1], "clip": 1.0}}, "Unknown 'dp' field"),
        ({"dp": {"noise_multipliers": [0.1], "protocol": "global"}}, "Unknown dp protocol 'global'"),
        ({"dp": {"noise_multipliers": [0.1], "protocol": "central", "readings": ["privatised"]}},
         "Central DP has one reading, 'clipped'"),
        ({"dp": [{"noise_multipliers": [0.1]}]}, "'dp' is a mapping"),
        ({"selections": [{"component": "layer", "layer": 0}]}, "Bad selection"),
        ({"attack": {"lr": -0.01}}, "Bad 'attack' settings"),
        ({"batch_sizes": [2]}, "multiple of every batch size"),
        ({"batch_sizes": [0]}, "at least 1"),
        ({"batch_sizes": 2}, "is a list"),
        ({"batch_sizes": [1, 1]}, "repeats a size"),
        ({"sentences": "3"}, "whole number"),
        ({"selections": [{"component": "full", "batch_sizes": [2]}]}, "2 of selection .* does not divide"),
        ({"selections": [{"component": "full", "batch_sizes": [0]}]}, "batch size of selection .* at least 1"),
        ({"selections": [{"component": "full", "batch_sizes": [True]}]}, "at least 1"),
        ({"selections": [{"component": "full", "batch_sizes": 3}]}, "'batch_sizes' of selection .* is a list"),
        ({"selections": [{"component": "full", "batch_sizes": []}]}, "is a list"),
        ({"selections": [{"component": "full", "batch_sizes": [1, 3, 1]}]}, "repeats a size"),
        ({"selections": [{"component": "full", "batch_size": [1]}]}, "Bad selection"),
        ({"datasets": [["imdb", "train"]]}, "Unknown dataset 'imdb'.*choose one of: sample, cola"),
        ({"datasets": ["cola", ["sst2", "test"]]}, "Unknown split 'test' of sst2.*train, validation"),
        ({"datasets": [["cola"]]}, "a name or a \\[dataset, split\\] pair"),
        ({"datasets": "cola"}, "is a list of dataset names"),
    ],
)
def test_bad_grids_are_refused_clearly(change, message):
    with pytest.raises(ValueError, match=message):
        parse_grid({**SPEC, **change})


def test_a_grid_is_checked_whole_before_its_first_task_runs(tmp_path):
    # Layer 7 of a two-layer model: the last selection is wrong, and no task of the ones before it runs.
    spec = {**SPEC, "selections": [{"component": "full"}, {"component": "attention.query", "layers": [0, 7]}]}
    out = tmp_path / "r.jsonl"
    with pytest.raises(ValueError, match="Bad selection in the grid: Layer 7 is out of range"):
        run_grid(parse_grid(spec), out, progress=False)
    assert not out.exists()
    with pytest.raises(ValueError, match="fewer than the grid's 500"):
        run_grid(parse_grid({**SPEC, "sentences": 500}), out, progress=False)
    assert not out.exists()


def test_a_grid_file_that_is_not_a_mapping_is_refused(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- component: full\n")
    with pytest.raises(ValueError, match="mapping of fields"):
        load_grid(path)


@pytest.mark.slow
def test_a_dask_cluster_writes_the_same_lines_as_a_local_run(tmp_path):
    """The same grid on a Dask LocalCluster (2 workers) and in this process: equal lines, seeds included."""
    grid = parse_grid({**SPEC, "selections": [{"component": "attention.query", "layers": [0, 1]}]})
    local = run_grid(grid, tmp_path / "local.jsonl", progress=False)
    dask = run_grid(grid, tmp_path / "dask.jsonl", jobs=2, scheduler="local", progress=False)
    timing = ("seconds",)
    strip = lambda rows: {k: {f: v for f, v in r.items() if f not in timing} for k, r in _keyed(rows).items()}
    assert len(dask) == len(local) == 2 * 3
    assert strip(dask) == strip(local)
    assert run_grid(grid, tmp_path / "dask.jsonl", scheduler="local", progress=False) == dask  # resumed: nothing to do


def test_missing_grid_file_and_cli_errors(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="No grid file"):
        load_grid(tmp_path / "nope.yaml")
    with pytest.raises(SystemExit) as exit_info:
        cli("grids", "table", str(tmp_path / "empty.jsonl"))
    assert exit_info.value.code == 2
    assert "No results to summarize" in capsys.readouterr().err
    run_grid(parse_grid({**SPEC, "sentences": 1, "selections": [{"component": "full"}]}), tmp_path / "r.jsonl",
             progress=False)
    with pytest.raises(SystemExit):
        cli("grids", "table", str(tmp_path / "r.jsonl"), "--where", "colour=red")
    assert "Cannot filter on 'colour'" in capsys.readouterr().err


def test_results_keep_row_ids_not_dataset_text(tmp_path):
    if default_data_dir() is None:
        pytest.skip("no dataset directory (GILIB_DATA_DIR)")
    spec = {**SPEC, "datasets": ["cola"], "sentences": 1, "selections": [{"component": "attention.value", "layers": 0}]}
    rows = run_grid(parse_grid(spec), tmp_path / "cola.jsonl", progress=False)
    text = {ex.row_id: ex.text for ex in load_split("cola", "train")}[rows[0]["row_id"]]
    raw = (tmp_path / "cola.jsonl").read_text()
    assert "reconstruction" not in rows[0] and text not in raw
    assert rows[0]["commit"] and rows[0]["fraction"] > 0 and 0 <= rows[0]["rouge1"] <= 1
    assert read_lines(tmp_path / "cola.jsonl") == rows


def test_dp_cells_attack_the_reading_they_name(tmp_path):
    spec = {**SPEC, "sentences": 1, "selections": [{"component": "attention.query", "layers": 0}],
            "dp": {"noise_multipliers": [0.0, 0.5], "max_grad_norm": 1.0, "readings": ["raw", "privatised"]}}
    grid = parse_grid(spec)
    assert [dict(c.dp)["reading"] for c in grid.cells] == ["raw", "privatised", "raw", "privatised"]
    rows = run_grid(grid, tmp_path / "dp.jsonl", progress=False)
    by = {(r["cell"]["dp"]["noise_multiplier"], r["cell"]["dp"]["reading"]): r for r in rows}
    # The raw gradient does not depend on sigma: same gradient, same seed, same attack.
    assert by[(0.0, "raw")]["reconstruction"] == by[(0.5, "raw")]["reconstruction"]
    assert by[(0.0, "raw")]["final_loss"] == by[(0.5, "raw")]["final_loss"]
    assert by[(0.5, "privatised")]["dp_cosine"] < by[(0.0, "privatised")]["dp_cosine"] <= 1.0
    table = summarize(rows, by=["noise_multiplier", "reading"])
    assert len(table) == 4 and "dp_cosine" in table.columns


def test_a_central_dp_cell_attacks_the_clipped_un_noised_update_the_server_receives(tmp_path):
    spec = {**SPEC, "sentences": 1, "selections": [{"component": "attention.query", "layers": 0}],
            "dp": {"noise_multipliers": [0.5], "max_grad_norm": 1e-3, "protocol": "central"}}
    (cell,) = parse_grid(spec).cells
    assert cell.describe()["dp"] == {"max_grad_norm": 1e-3, "noise_multiplier": 0.5, "protocol": "central",
                                     "reading": "clipped"}
    local = parse_grid({**spec, "dp": {"noise_multipliers": [0.5]}}).cells[0]
    assert "protocol" not in local.describe()["dp"]  # local-DP keys stay as they were
    (row,) = run_grid(parse_grid(spec), tmp_path / "central.jsonl", progress=False)
    # One sentence, clipped at 1e-3 and no noise: the raw gradient's direction, however large sigma is.
    assert row["dp_cosine"] == pytest.approx(1.0, abs=1e-4) and row["clip_factor"] < 1.0
    table = summarize([row], by=["protocol", "reading", "noise_multiplier"])
    assert list(table["protocol"]) == ["central"] and list(table["reading"]) == ["clipped"]


def test_a_batch_size_axis_attacks_client_batches_and_matches_each_sentence(tmp_path):
    spec = {**SPEC, "sentences": 2, "clients_per_task": 1, "batch_sizes": [1, 2],
            "selections": [{"component": "attention.query", "layers": 0}]}
    grid = parse_grid(spec)
    assert [c.batch_size for c in grid.cells] == [1, 2]
    assert "batch_size" not in grid.cells[0].describe()  # batch-1 keys stay as they were
    rows = run_grid(grid, tmp_path / "b.jsonl", progress=False)
    single = [r for r in rows if "batch_size" not in r["cell"]]
    pairs = [r for r in rows if r["cell"].get("batch_size") == 2]
    assert len(single) == len(pairs) == 2
    assert all("batch" not in r for r in single)
    assert sorted(r["row_id"] for r in pairs) == sorted(pairs[0]["batch"]) == sorted(r["row_id"] for r in single)
    # Each true sentence got the reconstruction the Hungarian matching pairs it with: no swap scores higher.
    def fit(rec, ref):
        scores = rouge_scores(rec, ref)
        return scores["rouge1"] + scores["rouge2"]
    a, b = pairs
    kept = fit(a["reconstruction"], a["reference"]) + fit(b["reconstruction"], b["reference"])
    assert kept >= fit(b["reconstruction"], a["reference"]) + fit(a["reconstruction"], b["reference"])
    assert a["rouge1"] == rouge_scores(a["reconstruction"], a["reference"])["rouge1"]
    assert {r["reference"] for r in pairs} == {r["reference"] for r in single}
    table = summarize(rows, by=["component", "batch_size"])
    assert list(table["batch_size"]) == [1, 2] and list(table["n"]) == [2, 2]
    assert run_grid(grid, tmp_path / "b.jsonl", progress=False) == rows  # resumed: nothing to do

def test_a_selection_can_carry_its_own_batch_sizes():
    # A selection's batch_sizes replace the grid's for that selection only;
    # the batch-1 cells are those of a grid without the key (same keys).
    spec = {**SPEC, "sentences": 4, "batch_sizes": [1, 2],
            "selections": [{"component": "full", "batch_sizes": [1, 2, 4]},
                           {"component": "attention.query", "layers": [0, 1]},
                           {"component": "layer", "layers": [0], "batch_sizes": [4]}]}
    cells = [(c.component, c.layers, c.batch_size) for c in parse_grid(spec).cells]
    assert cells == [("full", None, 1), ("attention.query", 0, 1), ("attention.query", 1, 1),
                     ("full", None, 2), ("attention.query", 0, 2), ("attention.query", 1, 2),
                     ("full", None, 4), ("layer", 0, 4)]
    plain = {**SPEC, "sentences": 4, "selections": [{"component": "full"},
                                                    {"component": "attention.query", "layers": [0, 1]}]}
    batch_one = [c.key() for c in parse_grid(spec).cells if c.batch_size == 1]
    assert batch_one == [c.key() for c in parse_grid(plain).cells]
    # Without a grid-level list, a selection's own sizes add to the default [1] of the others.
    spec = {**SPEC, "sentences": 2, "selections": [{"component": "full", "batch_sizes": [1, 2]},
                                                   {"component": "encoder"}]}
    assert [(c.component, c.batch_size) for c in parse_grid(spec).cells] == [("full", 1), ("encoder", 1),
                                                                              ("full", 2)]


def _line(component, layers, row_id, rouge1, batch_size=1, dataset="cola", tokens=10):
    cell = {"model": "tiny", "component": component, "layers": layers, "seed": 0,
            **({"batch_size": batch_size} if batch_size > 1 else {})}
    return {"cell": cell, "dataset": dataset, "split": "train", "row_id": row_id, "tokens": tokens,
            "rouge1": rouge1, "rouge2": rouge1 / 2, "rougeL": rouge1, "seconds": 1.0, "fraction": 0.1}


BATCH_ROWS = ([_line("full", None, i, 0.8) for i in range(4)]
              + [_line("full", None, i, 0.6, batch_size=2) for i in range(4)]
              + [_line("full", None, i, 0.4, batch_size=4) for i in range(4)]
              + [_line("layer", 1, i, 0.5) for i in range(4)])


def test_summaries_never_mix_batch_sizes_unasked(capsys):
    with pytest.raises(ValueError, match=r"batches of \[1, 2, 4\] sentences: group by batch_size"):
        summarize(BATCH_ROWS)
    single = summarize(BATCH_ROWS, where={"batch_size": 1})
    assert list(single["component"]) == ["full", "layer"] and list(single["n"]) == [4, 4]
    assert summarize(BATCH_ROWS, where={"layers": "1"})["rouge1"].tolist() == [0.5]  # one batch size left
    with pytest.raises(ValueError, match="Cannot filter on 'colour'"):
        summarize(BATCH_ROWS, where={"colour": "red"})
    with pytest.raises(ValueError, match="No results with"):
        summarize(BATCH_ROWS, where={"batch_size": 8})


def test_the_batch_axis_keeps_the_selections_run_at_several_sizes(tmp_path, capsys):
    table = batch_axis(BATCH_ROWS)
    assert list(zip(table["component"], table["batch_size"], table["rouge1"].round(2))) == [
        ("full", 1, 0.8), ("full", 2, 0.6), ("full", 4, 0.4)]
    assert set(table["n"]) == {4}
    assert set(batch_axis(BATCH_ROWS, by=["component", "layers", "dataset"])["dataset"]) == {"cola"}
    with pytest.raises(ValueError, match="more than one batch size"):
        batch_axis(BATCH_ROWS[:4])
    markdown = batch_markdown(BATCH_ROWS)
    assert "| full | all | 2 | 10.00 % | 0.60 [0.60, 0.60] | 0.30 [0.30, 0.30] | 4 |" in markdown
    assert markdown.splitlines()[0].startswith("| component | layers | sentences per client |")
    path = tmp_path / "b.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in BATCH_ROWS))
    cli("grids", "batches", str(path))
    assert capsys.readouterr().out.strip() == markdown
    cli("grids", "table", str(path), "--where", "batch_size=1")
    assert "| layer | 1 | 10.00 % | 0.50 [0.50, 0.50] | 0.25 [0.25, 0.25] | 4 |" in capsys.readouterr().out


def test_sentence_lengths_count_each_sentence_once_without_cls_and_sep():
    rows = [_line("full", None, i, 0.5, tokens=t) for i, t in enumerate([5, 7, 12])]
    rows += [_line("layer", 0, i, 0.5, tokens=t) for i, t in enumerate([5, 7, 12])]  # the same sentences again
    rows += [_line("full", None, 9, 0.5, dataset="sst2", tokens=30)]
    table = sentence_lengths(rows)
    assert table.to_dict("records") == [
        {"dataset": "cola", "split": "train", "sentences": 3, "min": 3, "median": 5.0, "max": 10},
        {"dataset": "sst2", "split": "train", "sentences": 1, "min": 28, "median": 28.0, "max": 28}]
    with pytest.raises(ValueError, match="mix tokenizers"):
        sentence_lengths(rows + [_line("encoder", None, 0, 0.5, tokens=6)])


def test_a_selection_given_more_sentences_extends_the_same_sample_and_keeps_its_lines(tmp_path):
    # A selection's own `sentences` attacks a longer prefix of the same seeded
    # sample; its cell key is unchanged, so the lines a run at the grid's
    # count wrote are kept and only the new sentences run.
    few = {**SPEC, "sentences": 2, "selections": [{"component": "attention.query", "layers": 0}]}
    more = {**few, "selections": [{"component": "attention.query", "layers": 0, "sentences": 4},
                                  {"component": "attention.query", "layers": 1}]}
    grid = parse_grid(more)
    assert [c.key() for c in grid.cells][:1] == [c.key() for c in parse_grid(few).cells]
    assert grid.largest_sample() == 4 and [c.sentences for c in grid.cells] == [4, None]
    out = tmp_path / "r.jsonl"
    before = run_grid(parse_grid(few), out, progress=False)
    after = run_grid(grid, out, progress=False)
    assert after[: len(before)] == before  # kept, not rerun
    query0 = [r["row_id"] for r in after if r["cell"]["layers"] == 0]
    query1 = [r["row_id"] for r in after if r["cell"]["layers"] == 1]
    assert len(query0) == 4 and len(query1) == 2 and query0[:2] == query1 == [r["row_id"] for r in before]
    fresh = run_grid(parse_grid({**few, "sentences": 4}), tmp_path / "fresh.jsonl", progress=False)
    assert [r["row_id"] for r in fresh] == query0  # the first 4 of the sample, as a grid of 4 picks
    assert [r["rouge1"] for r in fresh] == [r["rouge1"] for r in after if r["cell"]["layers"] == 0]


@pytest.mark.parametrize(
    "change, message",
    [
        ({"selections": [{"component": "full", "sentences": 0}]}, "'sentences' of selection .* at least 1"),
        ({"selections": [{"component": "full", "sentences": 3, "batch_sizes": [2]}]}, "does not divide"),
        ({"selections": [{"component": "full"}, {"component": "full", "sentences": 6}]}, "both hold the cell"),
        ({"model": {"cola": "tiny"}}, "give one victim for each dataset"),
        ({"model": ["tiny"]}, "'model' is a victim name"),
    ],
)
def test_bad_sentence_counts_and_victim_maps_are_refused(change, message):
    with pytest.raises(ValueError, match=message):
        parse_grid({**SPEC, **change})


def test_a_grid_can_attack_each_dataset_with_its_own_victim(tmp_path):
    # model: {dataset: victim}: each dataset's sentences are attacked on its
    # own victim (fine-tuned on it, in the book), and the lines say which.
    spec = {**SPEC, "sentences": 1, "datasets": ["sample", ["cola", "train"]],
            "model": {"sample": "tiny", "cola": "minilm-shape"},
            "selections": [{"component": "attention.query", "layers": 0}]}
    planned = {(dataset, cell.model) for cell, dataset, _, _ in plan(parse_grid(spec))}
    assert planned == {("sample", "tiny"), ("cola", "minilm-shape")}
    one = {**spec, "datasets": ["sample"], "model": {"sample": "tiny"}}
    rows = run_grid(parse_grid(one), tmp_path / "r.jsonl", progress=False)
    assert [r["cell"]["model"] for r in rows] == ["tiny"]
    with pytest.raises(RuntimeError, match="Could not load 'bert-huge'.*offline models: minilm"):
        run_grid(parse_grid({**one, "model": {"sample": "bert-huge"}}), tmp_path / "x.jsonl", progress=False)


def test_paired_compares_two_sets_of_results_on_their_common_sentences():
    # Victim A beats B by 0.1 on sentences 0-3; B also has sentence 4, which A lacks (not paired).
    first = [_line("full", None, i, 0.5 + 0.1 * (i % 2)) for i in range(4)]
    second = [_line("full", None, i, 0.4 + 0.1 * (i % 2)) for i in range(5)]
    table = grids.paired(first, second, [("full", None)])
    row = table.iloc[0]
    assert row["n"] == 4 and row["first"] == pytest.approx(0.55) and row["second"] == pytest.approx(0.45)
    assert row["difference"] == pytest.approx(0.1) and row["low"] == pytest.approx(0.1)
    assert row["high"] == pytest.approx(0.1)
    with pytest.raises(ValueError, match="more than once"):
        grids.paired(first + first, second, [("full", None)])
    with pytest.raises(ValueError, match="No sentence of layer 0"):
        grids.paired(first, second, [("layer", 0)])


def test_two_cells_of_one_grid_are_paired_over_the_sentences_both_hold():
    # Layer 0 beats layers 0+1 by 0.2 on sentences 0-2 and by 0 on sentence 3; only layer 0
    # holds sentence 4, and a batch line of layer 0 is not a sentence attacked alone.
    rows = ([_line("layer", 0, i, 0.6 if i < 3 else 0.4) for i in range(5)]
            + [_line("layer", [0, 1], i, 0.4) for i in range(4)]
            + [_line("layer", 0, 0, 0.0, batch_size=2)])
    gap = grids.cell_difference(rows, ("layer", 0), ("layer", [0, 1]))
    assert gap["n"] == 4 and gap["difference"] == pytest.approx(0.15)
    assert 0 <= gap["low"] <= 0.15 <= gap["high"] <= 0.2
    # The layers as layers_text writes them name the same cells.
    assert grids.cell_difference(rows, ("layer", "0"), ("layer", "0+1")) == gap
    with pytest.raises(ValueError, match="No sentence of layer 0 and layer 2"):
        grids.cell_difference(rows, ("layer", 0), ("layer", 2))


def test_the_batch_axis_compares_batch_sizes_on_the_same_sentences():
    # Batch 1 holds two more sentences (a headline cell's longer prefix), which
    # score 0: the batch-1 point is over the 4 sentences batch 2 also holds.
    rows = ([_line("full", None, i, 0.8 if i < 4 else 0.0) for i in range(6)]
            + [_line("full", None, i, 0.6, batch_size=2) for i in range(4)])
    table = batch_axis(rows)
    assert list(table["n"]) == [4, 4] and list(table["rouge1"]) == pytest.approx([0.8, 0.6])


def test_a_heatmaps_row_and_column_means_carry_intervals_over_shared_sentences():
    # Two weights in two layers on sentences 0-3; the key beats the query by
    # 0.2 on every sentence in layer 0 and by 0.1 in layer 1 (a mean of 0.15).
    # The query of layer 0 also holds sentence 4 (a longer prefix), left out.
    rows = []
    for i in range(4):
        base = 0.1 * i
        rows += [_line("attention.query", 0, i, base + 0.3), _line("attention.key", 0, i, base + 0.5),
                 _line("attention.query", 1, i, base + 0.2), _line("attention.key", 1, i, base + 0.3)]
    rows.append(_line("attention.query", 0, 4, 1.0))
    rows.append(_line("attention.query", 0, 0, 0.0, batch_size=2))  # batches are not a heatmap's
    by_component = grids.marginal(rows, "component")
    assert list(by_component["component"]) == ["attention.key", "attention.query"]
    assert list(by_component["n"]) == [4, 4]
    assert by_component["rouge1"].tolist() == pytest.approx([0.55, 0.4])  # means over layers, then sentences
    low, high = by_component.loc[0, ["low", "high"]]
    assert 0.4 <= low < 0.55 < high <= 0.7  # spread over the four sentences
    by_layer = grids.marginal(rows, "layers", "rouge2")
    assert list(by_layer["layers"]) == ["0", "1"]
    assert by_layer["rouge2"].tolist() == pytest.approx([0.275, 0.2])
    difference = grids.marginal_difference(rows, "component", "attention.key", "attention.query")
    assert difference["difference"] == pytest.approx(0.15) and difference["n"] == 4
    assert difference["low"] == pytest.approx(0.15) and difference["high"] == pytest.approx(0.15)
    assert grids.marginal_difference(rows, "layers", 1, 0)["difference"] == pytest.approx(-0.15)
    with pytest.raises(ValueError, match="No component 'ffn.output' in these results"):
        grids.marginal_difference(rows, "component", "ffn.output", "attention.key")
    with pytest.raises(ValueError, match="over must be 'component' or 'layers'"):
        grids.marginal(rows, "dataset")
    table = grids.marginal_markdown(rows, "component").splitlines()
    assert table[0] == ("| weight (mean over layers) | ROUGE-1 [95 %] | ROUGE-2 [95 %] "
                        "| ROUGE-1 minus the next [95 %] | sentences |")
    assert table[2].startswith("| attention.key | 0.55 [") and "| +0.15 [+0.15, +0.15] | 4 |" in table[2]
    assert table[3].startswith("| attention.query | 0.40 [") and table[3].endswith("|  | 4 |")


def test_the_cost_of_batching_is_paired_per_selection_and_size(tmp_path, capsys):
    # Alone 0.8; in batches of 2, sentences 0-1 score 0.6 and 2-3 score 0.4
    # (batch costs 0.2 and 0.4); in the batch of 4, 0.4 each (cost 0.4).
    rows = ([_line("full", None, i, 0.8) for i in range(4)]
            + [dict(_line("full", None, i, 0.6 if i < 2 else 0.4, batch_size=2), batch=[2 * (i // 2), 2 * (i // 2) + 1])
               for i in range(4)]
            + [dict(_line("full", None, i, 0.4, batch_size=4), batch=[0, 1, 2, 3]) for i in range(4)])
    table = grids.cost_markdown(rows).splitlines()
    assert table[0].startswith("| component | layers | sentences per client | ROUGE-1 cost [95 %] |")
    assert table[2] == "| full | all | 2 | 0.30 [0.20, 0.40] | 0.15 [0.10, 0.20] | 4 | 2 |"
    assert table[3] == "| full | all | 4 | 0.40 [0.40, 0.40] | 0.20 [0.20, 0.20] | 4 | 1 |"
    path = tmp_path / "b.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cli("grids", "costs", str(path))
    assert capsys.readouterr().out.strip() == "\n".join(table)


def test_score_intervals_puts_each_scores_interval_side_by_side():
    lines = [_line("full", None, i, r) for i, r in enumerate([0.8, 0.6, 0.7])] + [_line("layer", 1, 0, 0.5)]
    table = score_intervals(lines, where={"batch_size": 1})
    one = intervals(lines, where={"batch_size": 1}, score="rouge2")
    assert list(table["component"]) == ["full", "layer"]
    assert table["rouge1"].tolist() == pytest.approx([0.7, 0.5])
    assert table["rouge2"].tolist() == pytest.approx([0.35, 0.25])
    assert table["rouge2_low"].tolist() == one["low"].tolist()
    assert table["rouge2_high"].tolist() == one["high"].tolist()
    assert table.loc[1, "rouge1_low"] == table.loc[1, "rouge1_high"] == 0.5


def test_interval_column_prints_each_rows_mean_and_interval():
    table = pd.DataFrame({"rouge1": [0.5412, 0.1], "low": [0.48, 0.05], "high": [0.6123, 0.125]})
    assert interval_column(table) == ["0.54 [0.48, 0.61]", "0.10 [0.05, 0.12]"]
    assert interval_column(table.rename(columns={"rouge1": "exact"}), "exact", 3)[1] == "0.100 [0.050, 0.125]"
    gaps = pd.DataFrame({"difference": [0.1], "low": [-0.02], "high": [0.21]})
    assert interval_column(gaps, "difference", signed=True) == ["+0.10 [-0.02, +0.21]"]


def test_a_grid_prior_is_counted_without_the_attacked_split_and_reaches_the_attack(tmp_path, monkeypatch):
    spec = {**SPEC, "sentences": 1, "prior": "ngram", "selections": [{"component": "attention.query", "layers": 0}]}
    grid = parse_grid(spec)
    plain = parse_grid({**spec, "prior": None})
    # The prior is part of the cell's key; prior-free keys stay as they were.
    assert grid.cells[0].describe()["prior"] == "ngram" and "prior" not in plain.cells[0].describe()
    assert grid.cells[0].key() != plain.cells[0].key()
    counted = []
    real = grids.prior_texts
    monkeypatch.setattr(grids, "prior_texts", lambda attacked: (counted.append(attacked), real(attacked))[1])
    grids.ngram_prior.cache_clear()
    prior = grids.ngram_prior("tiny", "sample", "train")
    assert counted == [("sample", "train")] and prior.sentences > 0
    scored = []
    monkeypatch.setattr(grids, "ngram_prior", lambda *key: lambda ids: scored.append(list(ids)) or 0.0)
    rows = run_grid(grid, tmp_path / "prior.jsonl", progress=False)
    assert len(rows) == 1 and rows[0]["cell"]["prior"] == "ngram"
    assert scored, "the reordering rounds never asked the prior"


def test_an_unknown_grid_prior_is_refused():
    with pytest.raises(ValueError, match="Unknown 'prior' 'gpt2'.*ngram"):
        parse_grid({**SPEC, "prior": "gpt2"})
