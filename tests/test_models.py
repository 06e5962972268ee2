import pytest
import torch

from gilib.models import OFFLINE_MODELS, encode, load_model, model_facts


def test_minilm_is_the_pretrained_offline_default(minilm):
    model, tokenizer = minilm
    facts = model_facts(model)
    assert facts == {
        "name": "minilm",
        "layers": 6,
        "hidden": 384,
        "heads": 12,
        "vocab": 30522,
        "max_tokens": 512,
        "params": 22_713_986,
    }
    assert model.config._attn_implementation == "eager"
    assert model.num_labels == 2
    assert not model.training
    # bert-base-uncased's vocabulary: lower-cased WordPiece with fixed ids.
    assert tokenizer("The film")["input_ids"] == [101, 1996, 2143, 102]


def test_bert_base_shape_has_bert_base_parameter_count():
    model, _ = load_model("bert-base-shape")
    facts = model_facts(model)
    assert (facts["layers"], facts["hidden"], facts["heads"]) == (12, 768, 12)
    # BertModel-base (109,482,240) plus the 768 x 2 classification head.
    assert facts["params"] == 109_482_240 + 768 * 2 + 2


def test_same_seed_same_head_and_different_seed_different_head(minilm):
    model, _ = minilm
    again, _ = load_model("minilm", seed=0)
    other, _ = load_model("minilm", seed=1)
    assert torch.equal(model.classifier.weight, again.classifier.weight)
    assert not torch.equal(model.classifier.weight, other.classifier.weight)
    # The pretrained body is untouched by the seed.
    assert torch.equal(model.bert.encoder.layer[0].attention.self.query.weight,
                       other.bert.encoder.layer[0].attention.self.query.weight)


def test_tiny_random_weights_are_seeded(tiny):
    model, _ = tiny
    again, _ = load_model("tiny", seed=0)
    for (name, a), (_, b) in zip(model.named_parameters(), again.named_parameters()):
        assert torch.equal(a, b), name


def test_hub_name_offline_gives_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RuntimeError, match="offline models: minilm, bert-base-shape, tiny"):
        load_model("bert-base-uncased")
    assert OFFLINE_MODELS == ("minilm", "bert-base-shape", "tiny")


def test_encode_pads_and_labels(tiny):
    _, tokenizer = tiny
    batch = encode(tokenizer, ["a cat", "the film was long"], [0, 1])
    assert batch["input_ids"].shape == (2, 6)
    assert batch["attention_mask"].sum(dim=1).tolist() == [4, 6]
    assert batch["labels"].tolist() == [0, 1]


@pytest.mark.parametrize(
    "texts, labels, message",
    [
        ([], [], "batch is empty"),
        (["   "], [0], "Sentence 0 is empty"),
        (["one", "two"], [0], "2 sentences but 1 labels"),
        (["word " * 600], [0], "more than the 512"),
    ],
)
def test_encode_rejects_bad_input(tiny, texts, labels, message):
    _, tokenizer = tiny
    with pytest.raises(ValueError, match=message):
        encode(tokenizer, texts, labels)
