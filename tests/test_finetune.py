"""Tests for gilib.finetune: the cache is reused, verified and rebuilt; seeds fix the weights; errors say what to do.

Every test fine-tunes the tiny random BERT for a few steps on a small
CoLA-format data folder written into a temporary directory, with the cache
in another: seconds, and nothing outside ``tmp_path`` is touched.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import asdict, replace

import pytest
import torch
from safetensors.torch import load_file

from gilib import finetune, models
from gilib.data import load_split
from gilib.finetune import Recipe
from gilib.finetune.__main__ import main
from gilib.models import FINETUNED_MODELS, OFFLINE_MODELS, cached_model, load_model

TINY = Recipe(base="tiny", steps=4, batch_size=4, max_tokens=32)

GOOD = ["the cat sat on the mat .", "she reads a book .", "we like the film .", "he ran home quickly ."]
BAD = ["cat the mat on sat .", "book a reads she the .", "film like we the the .", "home he quickly ran ran ."]


@pytest.fixture
def data_dir(tmp_path):
    """A CoLA-format folder (train, in- and out-of-domain dev) of made-up sentences."""
    folder = tmp_path / "data" / "cola"
    folder.mkdir(parents=True)

    def rows(n, shift):
        return "".join(f"src\t{(i + shift) % 2}\t\t{(GOOD if (i + shift) % 2 else BAD)[i % 4]}\n" for i in range(n))

    (folder / "train.tsv").write_text(rows(16, 0))
    (folder / "dev.tsv").write_text(rows(6, 1))
    (folder / "out_of_domain_dev.tsv").write_text(rows(4, 0))
    return folder.parent


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv(finetune.CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache" / "finetuned"


@pytest.fixture
def trainings(monkeypatch):
    """Counts the calls of finetune.train."""
    calls = []
    real = finetune.train

    def counting(*args, **kwargs):
        calls.append(args[-1])
        return real(*args, **kwargs)

    monkeypatch.setattr(finetune, "train", counting)
    return calls


def _load(data_dir, recipe=TINY, **kwargs):
    return finetune.load("cola", recipe, load_base=load_model, data_dir=data_dir, **kwargs)


def test_a_checkpoint_is_written_once_then_read_from_the_cache(data_dir, cache, trainings):
    first = _load(data_dir)
    assert first.built and len(trainings) == 1
    assert first.path.parent == cache and first.path.name == f"cola-{finetune.fingerprint('cola', TINY, data_dir)}"
    meta = json.loads((first.path / "meta.json").read_text())
    assert meta["recipe"] == asdict(TINY) and meta["dataset"] == "cola"
    assert meta["validation"]["examples"] == 10 and 0 <= meta["validation"]["accuracy"] <= 1
    assert meta["train_examples"] == 16 and meta["versions"]["torch"] == torch.__version__
    second = _load(data_dir)
    assert not second.built and len(trainings) == 1  # read back, not trained again
    for (name, a), (_, b) in zip(first.model.named_parameters(), second.model.named_parameters()):
        assert torch.equal(a, b), name
    # No temporary folder is left beside the checkpoint.
    assert [p.name for p in cache.iterdir()] == [first.path.name]


def test_the_victim_differs_from_its_base_and_stays_a_victim(data_dir):
    victim = _load(data_dir)
    base, _ = load_model("tiny", seed=TINY.seed)
    assert not torch.equal(victim.model.classifier.weight, base.classifier.weight)
    # The word embeddings are frozen by the recipe, and every gradient must stay computable for the attacks.
    assert torch.equal(victim.model.bert.embeddings.word_embeddings.weight, base.bert.embeddings.word_embeddings.weight)
    assert not victim.model.training
    assert all(p.requires_grad for p in victim.model.parameters())


def test_same_seed_same_weights_other_seed_other_weights(data_dir, tmp_path):
    first = _load(data_dir)
    again = _load(data_dir, force=True)  # trained a second time, from scratch
    assert again.built
    a, b = first.model.state_dict(), again.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    other = _load(data_dir, replace(TINY, seed=1))
    assert other.path != first.path
    assert not torch.equal(other.model.classifier.weight, again.model.classifier.weight)


def test_a_changed_recipe_or_changed_data_gets_another_folder(data_dir):
    base = finetune.checkpoint_path("cola", TINY, data_dir)
    assert finetune.checkpoint_path("cola", replace(TINY, lr=2e-4), data_dir) != base
    assert finetune.checkpoint_path("cola", replace(TINY, steps=5), data_dir) != base
    assert finetune.checkpoint_path("cola", TINY, data_dir) == base
    # A copy of the data keeps the folder (rows are hashed, not paths); one edited sentence changes it.
    copy = data_dir.parent / "copy"
    shutil.copytree(data_dir, copy)
    assert finetune.checkpoint_path("cola", TINY, copy) == base
    edited = data_dir.parent / "edited"
    shutil.copytree(data_dir, edited)
    train = edited / "cola" / "train.tsv"
    train.write_text(train.read_text().replace("cat the mat", "dog the mat", 1))
    assert finetune.checkpoint_path("cola", TINY, edited) != base


def test_a_corrupted_weights_file_is_rebuilt_with_a_note(data_dir, trainings, caplog):
    first = _load(data_dir)
    weights = first.path / "weights.safetensors"
    blob = bytearray(weights.read_bytes())
    blob[-10] ^= 0xFF  # one flipped byte: same size, other checksum
    weights.write_bytes(bytes(blob))
    with caplog.at_level(logging.WARNING, logger="gilib.finetune"):
        again = _load(data_dir)
    assert again.built and len(trainings) == 2
    assert "fails its SHA-256 checksum" in caplog.text
    assert torch.equal(load_file(weights)["classifier.weight"], first.model.classifier.weight)
    assert [p.name for p in again.path.parent.iterdir()] == [again.path.name]  # the damaged folder is gone


@pytest.mark.parametrize("damage, message", [
    (lambda path: (path / "weights.safetensors").write_bytes(b"short"), "has 5 bytes"),
    (lambda path: (path / "weights.safetensors").unlink(), "weights.safetensors is missing"),
    (lambda path: (path / "meta.json").write_text("{not json"), "meta.json is missing or unreadable"),
    (lambda path: (path / "meta.json").write_text(json.dumps(
        {**json.loads((path / "meta.json").read_text()), "recipe": asdict(replace(TINY, steps=99))})),
     "made by another recipe"),
])
def test_a_damaged_checkpoint_without_rebuild_is_a_clear_error(data_dir, trainings, damage, message):
    path = _load(data_dir).path
    damage(path)
    with pytest.raises(RuntimeError, match=message) as info:
        _load(data_dir, rebuild=False)
    assert "python -m gilib.finetune cola --rebuild" in str(info.value)
    assert len(trainings) == 1


def test_nothing_cached_without_rebuild_is_an_error(data_dir, trainings):
    with pytest.raises(RuntimeError, match="no checkpoint is cached there"):
        _load(data_dir, rebuild=False)
    assert trainings == []


@pytest.mark.parametrize("dataset", ["sample", "imdb"])
def test_a_dataset_without_train_and_validation_splits_names_those_that_have_them(dataset):
    with pytest.raises(ValueError, match="Datasets that have both: cola, sst2, rotten_tomatoes"):
        finetune.load(dataset, TINY, load_base=load_model)


def test_missing_data_files_say_where_to_point(tmp_path):
    with pytest.raises(FileNotFoundError, match="Fine-tuning on sst2 needs.*GILIB_DATA_DIR"):
        finetune.load("sst2", TINY, load_base=load_model, data_dir=tmp_path / "nowhere")


def test_evaluate_scores_accuracy_and_mcc(tiny, data_dir):
    model, tokenizer = tiny
    rows = load_split("cola", "validation", data_dir)
    scores = finetune.evaluate(model, tokenizer, rows, max_tokens=32, batch_size=3)
    predictions = [int(model(**tokenizer(e.text, return_tensors="pt")).logits.argmax()) for e in rows]
    labels = [e.label for e in rows]
    assert scores["examples"] == len(rows)
    assert scores["accuracy"] == pytest.approx(sum(p == y for p, y in zip(predictions, labels)) / len(rows))


def test_victim_names_are_offline_names_and_unknown_names_list_them(monkeypatch):
    assert set(FINETUNED_MODELS) == {"minilm-cola", "minilm-sst2", "minilm-rotten_tomatoes"}
    assert set(FINETUNED_MODELS) <= set(OFFLINE_MODELS)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RuntimeError, match="minilm-cola, minilm-sst2, minilm-rotten_tomatoes"):
        load_model("minilm-imdb")


@pytest.fixture
def fresh_cached_model():
    # cached_model keeps its victims for the process: none of this test's stand-ins may outlive it.
    models._cached.cache_clear()
    yield
    models._cached.cache_clear()


def test_load_model_and_cached_model_give_the_fine_tuned_victim(monkeypatch, data_dir, trainings, fresh_cached_model):
    # The victim names use the default recipe on MiniLM; a tiny recipe and base stand in for them here.
    monkeypatch.setattr(finetune, "Recipe", lambda seed=0: replace(TINY, seed=seed))
    monkeypatch.setenv("GILIB_DATA_DIR", str(data_dir))
    model, tokenizer = load_model("minilm-cola")
    assert model.config.name_or_path == "minilm-cola" and not model.training
    shared, _ = cached_model("minilm-cola", seed=0)
    assert cached_model("minilm-cola", seed=0)[0] is shared
    assert torch.equal(shared.classifier.weight, model.classifier.weight)
    assert len(trainings) == 1
    with pytest.raises(ValueError, match="2-class"):
        load_model("minilm-cola", num_labels=3)


def test_the_command_line_prints_metrics_and_writes_one_line_per_dataset(monkeypatch, data_dir, tmp_path, capsys):
    monkeypatch.setattr("gilib.finetune.__main__.Recipe", lambda: TINY)
    monkeypatch.setenv("GILIB_DATA_DIR", str(data_dir))
    out = tmp_path / "victims.jsonl"
    assert main(["cola", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    (line,) = [json.loads(x) for x in out.read_text().splitlines()]
    assert f"cola: accuracy {line['validation']['accuracy']:.4f}" in printed and line["path"] in printed
    assert line["recipe"] == asdict(TINY) and line["trained_now"]
    assert line["command"] == f"python -m gilib.finetune cola --out {out}"
    assert line["hardware"]["cpus"] >= 1 and line["hardware"]["cpu"]
    assert main(["cola", "--out", str(out)]) == 0
    assert not json.loads(out.read_text())["trained_now"]  # the second run reads the cache
