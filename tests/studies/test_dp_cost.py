"""The cost of DP-SGD (gilib.studies.dp_cost): DP fine-tuning, its sweep over sigma, its table."""

import json
import math

import pytest

from gilib.data import load_split
from gilib.studies import dp_cost


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
    assert table.splitlines()[0] == "| sigma | accuracy | MCC | epsilon | steps | seconds |"
    assert [line.split(" | ")[0] for line in table.splitlines()[2:]] == ["| 0.5", "| 1"]
