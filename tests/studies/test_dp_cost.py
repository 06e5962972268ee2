"""The cost of DP-SGD (gilib.studies.dp_cost): DP fine-tuning, its sweep over sigma, its table."""

import copy
import json
import math

import pandas as pd
import pytest
import torch

from gilib import dp
from gilib.data import load_split
from gilib.models import encode
from gilib.studies import dp_cost
from tests.test_dp import TEXTS, _per_example_clipped_mean


@pytest.mark.parametrize("sigma, clip, message", [
    (-0.1, 1.0, "noise_multiplier"), (float("nan"), 1.0, "noise_multiplier"), (0.1, 0.0, "max_grad_norm"),
    ("0.1", 1.0, "must be a number"),
])
def test_a_sweep_with_bad_dp_settings_is_refused_before_it_runs(tmp_path, sigma, clip, message):
    with pytest.raises(ValueError, match=message):
        dp_cost.sweep("sample", [sigma], tmp_path / "unused.jsonl", max_grad_norm=clip)
    assert not (tmp_path / "unused.jsonl").exists()


def test_dp_finetune_runs_the_steps_it_is_asked_for(tiny):
    model, tokenizer = tiny
    examples = load_split("sample")
    result = dp_cost.dp_finetune(model, tokenizer, examples[:40], examples[40:], noise_multiplier=1.0, steps=3,
                            batch_size=8, max_tokens=16)
    assert result.steps == 3 and 0.0 <= result.accuracy <= 1.0 and -1.0 <= result.mcc <= 1.0
    assert 0 < result.epsilon < math.inf


def test_dp_finetune_refuses_an_unknown_trainable_part(tiny):
    model, tokenizer = tiny
    examples = load_split("sample")
    with pytest.raises(ValueError, match="trainable must be 'all' or 'top'"):
        dp_cost.dp_finetune(model, tokenizer, examples[:40], examples[40:], noise_multiplier=1.0, steps=1,
                       batch_size=8, trainable="middle")


def test_the_sweep_writes_one_line_per_sigma_resumes_and_prints_its_table(tmp_path):
    out = tmp_path / "dp_cost.jsonl"
    kwargs = dict(model_name="tiny", train_split="train", eval_split="train", train_size=24, eval_size=8, steps=2,
                  batch_size=8)
    first = dp_cost.sweep("sample", [0.5], out, **kwargs)
    with out.open("a") as f:
        f.write('{"settings": {"model": "ti')  # a sweep killed mid-write: the next append must not fuse with it
    both = dp_cost.sweep("sample", [0.5, 1.0], out, **kwargs)  # sigma 0.5 is not run again
    assert len(first) == 1 and [r["noise_multiplier"] for r in both] == [0.5, 1.0]
    assert all(r["steps"] == 2 and r["epsilon"] > 0 for r in both)
    assert json.loads(out.read_text().splitlines()[0])["settings"]["train_size"] == 24
    assert len(out.read_text().splitlines()) == 2 and all(r["commit"] for r in both)

    table = dp_cost.markdown(dp_cost.table(out))
    assert table.splitlines()[0] == "| sigma | accuracy | MCC | epsilon | batch | steps | trained parameters | seconds |"
    assert [line.split(" | ")[0] for line in table.splitlines()[2:]] == ["| 0.5", "| 1"]


def test_a_sweep_without_a_recipe_keeps_its_settings_keys_so_old_results_resume():
    # data/results/ch4_utility.jsonl was written before recipes: its settings must still be the task's.
    (settings, sigma), = dp_cost._tasks("sample", [0.5], eval_split="train", trainable="top", steps=300, batch_size=32)
    assert sorted(settings) == ["batch_size", "dataset", "eval_size", "eval_split", "lr", "max_grad_norm", "model",
                                "seed", "steps", "train_size", "train_split", "trainable"]
    (deployed, _), = dp_cost._tasks("sample", [0.5], eval_split="train", recipe="deployed")
    assert {k: deployed[k] for k in ("recipe", "trainable", "batch_size", "physical_batch_size",
                                     "grad_sample_mode")} == {"recipe": "deployed", "trainable": "all",
                                                              "batch_size": 256, "physical_batch_size": 64,
                                                              "grad_sample_mode": "ghost"}
    (overridden, _), = dp_cost._tasks("sample", [0.5], eval_split="train", recipe="deployed", steps=3)
    assert overridden["steps"] == 3 and overridden["batch_size"] == 256


@pytest.mark.parametrize("change, message", [
    ({"batch_size": 0}, "batch_size must be a whole number, at least 1"),
    ({"physical_batch_size": 0}, "physical_batch_size must be a whole number, at least 1"),
    ({"steps": 0}, "steps must be a whole number"),
    ({"recipe": "cheap"}, "Unknown recipe 'cheap'"),
    ({"grad_sample_mode": "fast"}, "grad_sample_mode"),
    ({"lr": -1.0}, "lr must be a positive number"),
])
def test_a_sweep_with_a_bad_recipe_is_refused_before_it_runs(tmp_path, change, message):
    with pytest.raises(ValueError, match=message):
        dp_cost.sweep("sample", [0.5], tmp_path / "unused.jsonl", **change)
    assert not (tmp_path / "unused.jsonl").exists()


@pytest.mark.parametrize("change, message", [
    ({"batch_size": 0}, "batch_size must be a whole number"), ({"physical_batch_size": 0}, "physical_batch_size"),
    ({"noise_multiplier": -1.0}, "noise_multiplier"), ({"max_grad_norm": 0.0}, "max_grad_norm"),
    ({"grad_sample_mode": "fast"}, "grad_sample_mode"),
])
def test_dp_finetune_refuses_bad_settings(tiny, change, message):
    model, tokenizer = tiny
    examples = load_split("sample")
    kwargs = {"noise_multiplier": 1.0, "steps": 1, "batch_size": 8, **change}
    with pytest.raises(ValueError, match=message):
        dp_cost.dp_finetune(model, tokenizer, examples[:40], examples[40:], **kwargs)


def test_the_deployed_recipe_records_what_it_trained_and_its_own_privacy_accounting(tmp_path, capsys):
    from gilib.studies import all_studies
    from gilib.studies.study import main

    out = tmp_path / "deployed.jsonl"
    dp_cost.sweep("sample", [0.7], out, recipe="deployed", model_name="tiny", eval_split="train", train_size=24,
                  eval_size=8, steps=2, batch_size=8, physical_batch_size=3)
    (line,) = [json.loads(x) for x in out.read_text().splitlines()]
    model, _ = dp_cost.load_model("tiny")
    trainable = sum(p.numel() for n, p in model.named_parameters() if not n.endswith("word_embeddings.weight"))
    assert line["trained_parameters"] == trainable and line["trained"] == dp_cost.TRAINABLE["all"]
    assert line["settings"]["grad_sample_mode"] == "ghost" and line["settings"]["physical_batch_size"] == 3
    assert line["batch_size"] == 8 and line["steps"] == 2 and line["optimizer"] == "Adam"
    assert line["delta"] == pytest.approx(1 / 24) and line["sample_rate"] == pytest.approx(1 / 3)  # 24 / 8 batches
    assert line["epsilon"] == pytest.approx(dp.epsilon(0.7, line["sample_rate"], 2, line["delta"]))
    assert 0 < line["train_seconds"] <= line["seconds"]
    assert main(all_studies(), ["dp-cost", "table", str(out)]) == 0
    assert f"| 0.7 | {line['accuracy']:.3f} |" in capsys.readouterr().out


def test_ghost_clipping_in_chunks_is_the_same_dp_sgd_step(tiny):
    # The deployed recipe's step: a batch in length-sorted chunks, ghost clipping. Without noise it must
    # give the clipped mean of the per-example gradients, computed by hand, as the one-pass hooks step does.
    model, tokenizer = tiny
    batch = encode(tokenizer, TEXTS + ["short", "one more sentence for an odd chunk"], [1, 0, 1, 0, 1])
    model = dp._without_dropout(copy.deepcopy(model))
    for name, p in model.named_parameters():
        p.requires_grad_(not name.endswith("word_embeddings.weight"))
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    expected = _per_example_clipped_mean(model, batch, set(names), 0.5)
    steps = {}
    for mode, chunk in (("hooks", None), ("hooks", 2), ("ghost", 2)):
        twin = copy.deepcopy(model)
        params = [p for p in twin.parameters() if p.requires_grad]
        data = torch.utils.data.TensorDataset(batch["input_ids"], batch["attention_mask"], batch["labels"])
        loader = torch.utils.data.DataLoader(data, batch_size=5)
        private = dp.make_private(twin, torch.optim.SGD(params, lr=0.0), loader, 0.0, 0.5, seed=0, poisson=False,
                                  grad_sample_mode=mode)
        wrapped, optimizer, *rest = private
        criterion = rest[0] if mode == "ghost" else torch.nn.CrossEntropyLoss()
        dp_cost._dp_step(wrapped, optimizer, criterion, params, batch["input_ids"], batch["attention_mask"],
                 batch["labels"], chunk, ghost=mode == "ghost")
        steps[mode, chunk] = [p.grad.detach().clone() for p in params]  # pre_step's privatised gradient
    for grads in steps.values():
        for got, want in zip(grads, expected):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="grad_sample_mode"):
        dp.make_private(model, torch.optim.SGD(model.parameters(), lr=0.0), loader, 0.0, 0.5, seed=0,
                        poisson=False, grad_sample_mode="fast")


def test_the_deployed_recipe_trains_exactly_the_full_selection_the_attack_reads(tiny):
    from gilib.selection import select

    model, _ = tiny
    assert dp_cost.RECIPES["deployed"].trainable == "all"
    assert sorted(dp_cost.trained_names(model, "all")) == sorted(select(model, "full").names)
    top = dp_cost.trained_names(model, "top")
    assert not set(top) & set(select(model, "layer", 0).names)  # the old recipe never trains layer 0
    assert dp_cost.trained_parameters(model, "all") == select(model, "full").numel


def _attack_line(component, layers, row_id, rouge1, dp=None, batch=None, cosine=0.01):
    cell = {"model": "minilm", "component": component, "layers": layers, "objective": "cos", "seed": 0, "steps": 200}
    if dp is not None:
        cell["dp"] = dp
    if batch is not None:
        cell["batch_size"] = len(batch)
    line = {"cell": cell, "dataset": "cola", "split": "train", "row_id": row_id, "tokens": 9, "fraction": 0.5,
            "rouge1": rouge1, "rouge2": 0.0, "rougeL": rouge1, "seconds": 1.0, "dp_cosine": cosine}
    if batch is not None:
        line["batch"] = batch
    return line


def test_the_one_setting_summary_puts_each_sigmas_epsilon_accuracy_and_leakage_side_by_side():
    local = {"max_grad_norm": 1.0, "reading": "privatised"}
    privatised = ([_attack_line("full", None, r, 0.0, {**local, "noise_multiplier": s}) for r in range(4)
                   for s in (0.0, 0.01)]
                  + [_attack_line("full", None, r, 0.25 * (r < 2), {**local, "noise_multiplier": 0.01}, batch=[0, 1])
                     for r in (0, 1)]
                  + [_attack_line("full", None, r, 0.0, {**local, "noise_multiplier": 0.01}, batch=[2, 3])
                     for r in (2, 3)])
    central = [_attack_line("attention.query", 0, r, 0.5, {"max_grad_norm": 1.0, "noise_multiplier": 0.5,
                                                           "protocol": "central", "reading": "clipped"}, cosine=1.0)
               for r in range(4)]
    raw = [_attack_line("attention.query", 0, r, 0.5 - 0.1 * (r == 0)) for r in range(4)]
    utility = [{"settings": {"lr": 5e-4, "batch_size": 256, "steps": 30, "trainable": "all"}, "noise_multiplier": s,
                "accuracy": a, "epsilon": e, "delta": 1e-5, "eval_examples": 872, "batch_size": 256, "steps": 30,
                "trained_parameters": 10_993_538, "train_examples": 67_349, "seconds": 250.0}
               for s, a, e in ((0.0, 0.8, math.inf), (0.01, 0.79, 1.6e5), (0.5, 0.6, 4.5))]
    one, server, facts = dp_cost.deployed_summary(utility, privatised, central, raw)
    assert list(one["sigma"]) == [0.0, 0.01, 0.5] and list(one["epsilon"]) == ["∞", "1.6e+05", "4.5"]
    assert list(one["ROUGE-1, 1 per client"]) == ["0.00 [0.00, 0.00]", "0.00 [0.00, 0.00]", "not run"]
    # Two client batches of two: the interval resamples the batches (means 0.25 and 0), not the sentences.
    assert one["ROUGE-1, 2 per client"].tolist()[1] == "0.12 [0.00, 0.25]"
    assert one["ROUGE-1, 2 per client"].tolist()[0] == "not run"
    low, high = dp_cost.accuracy_interval(0.8, 872)
    assert one["accuracy [95 %]"].iloc[0] == f"0.80 [{low:.2f}, {high:.2f}]" and high - low == pytest.approx(
        2 * 1.96 * math.sqrt(0.8 * 0.2 / 872))
    assert facts["batches_b2_sigma0.01"] == 2 and facts["sentences_b2_sigma0.01"] == 4
    assert facts["deployed_epsilon_sigma0"] is None and facts["deployed_accuracy_sigma0.5"] == 0.6
    assert list(server["the attack reads"].str.split(":").str[0]) == ["the raw gradient (p.grad after backward())",
                                                                      "central DP", "local DP"][:len(server)]
    assert facts["central_minus_raw_attention_query_0"] == pytest.approx(0.025)  # paired: (0.1 + 0 + 0 + 0) / 4
    assert facts["central_pairs_attention_query_0"] == 4 and facts["central_rouge1_attention_query_0"] == 0.5


def test_with_accuracy_interval_adds_each_runs_interval():
    table = dp_cost.with_accuracy_interval(pd.DataFrame({"accuracy": [0.8, 1.0], "eval_examples": [872, 100]}))
    assert table["low"].tolist() == pytest.approx([0.8 - 1.96 * (0.8 * 0.2 / 872) ** 0.5, 1.0])
    assert table["high"].tolist() == pytest.approx([0.8 + 1.96 * (0.8 * 0.2 / 872) ** 0.5, 1.0])
