import pytest
import torch

from gilib.models import (DECODER_MODELS, HUB_MODELS, OFFLINE_MODELS, encode, encode_lm, is_decoder, lm_special_ids,
                          load_model, model_facts)


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
    with pytest.raises(RuntimeError, match="offline models: minilm, bert-base-shape, tinybert-4-shape, "
                                           "tinybert-6-shape, minilm-shape, tiny"):
        load_model("bert-base-uncased")
    assert OFFLINE_MODELS[:6] == ("minilm", "bert-base-shape", "tinybert-4-shape", "tinybert-6-shape",
                                  "minilm-shape", "tiny")


def _bert_params(layers, hidden, intermediate, vocab=30522, positions=512, labels=2):
    """BertForSequenceClassification's parameter count, from its shape alone."""
    embeddings = (vocab + positions + 2) * hidden + 2 * hidden  # word, position, type; LayerNorm
    layer = 4 * (hidden * hidden + hidden) + 2 * hidden * intermediate + intermediate + hidden + 4 * hidden
    return embeddings + layers * layer + (hidden * hidden + hidden) + (hidden * labels + labels)


@pytest.mark.parametrize(
    "name, layers, hidden, intermediate",
    [("tinybert-4-shape", 4, 312, 1200), ("tinybert-6-shape", 6, 768, 3072), ("minilm-shape", 6, 384, 1536)],
)
def test_paper_shapes_load_offline_with_their_checkpoints_dims(name, layers, hidden, intermediate):
    model, tokenizer = load_model(name)
    facts = model_facts(model)
    assert (facts["layers"], facts["hidden"], facts["heads"], facts["vocab"]) == (layers, hidden, 12, 30522)
    assert model.config.intermediate_size == intermediate
    assert facts["params"] == _bert_params(layers, hidden, intermediate)
    assert model.config._attn_implementation == "eager" and not model.training
    # bert-base-uncased's tokenizer, as the paper's checkpoints use.
    assert tokenizer("The film")["input_ids"] == [101, 1996, 2143, 102]


def test_bert_base_shape_count_matches_the_formula_and_minilm_shape_matches_minilm(minilm):
    assert _bert_params(12, 768, 3072) == 109_482_240 + 768 * 2 + 2
    assert _bert_params(6, 384, 1536) == model_facts(minilm[0])["params"]


def test_a_shapes_random_weights_are_seeded():
    model, _ = load_model("tinybert-4-shape", seed=0)
    again, _ = load_model("tinybert-4-shape", seed=0)
    other, _ = load_model("tinybert-4-shape", seed=1)
    for (name, a), (_, b) in zip(model.named_parameters(), again.named_parameters()):
        assert torch.equal(a, b), name
    query = "bert.encoder.layer.0.attention.self.query.weight"
    assert not torch.equal(dict(model.named_parameters())[query], dict(other.named_parameters())[query])


def test_an_unknown_name_lists_the_offline_ones(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RuntimeError) as info:
        load_model("tinybert-5-shape")
    assert all(f"{name}" in str(info.value) for name in OFFLINE_MODELS)
    assert "has its shape" not in str(info.value)


@pytest.mark.parametrize("checkpoint", sorted(HUB_MODELS))
def test_the_papers_checkpoints_are_online_only_and_name_their_offline_shape(monkeypatch, checkpoint):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert HUB_MODELS[checkpoint] in OFFLINE_MODELS
    with pytest.raises(RuntimeError, match=f"'{HUB_MODELS[checkpoint]}' has its shape with random weights"):
        load_model(checkpoint)


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


def test_the_gpt2_small_shape_decoder_has_gpt2_smalls_body_over_berts_vocabulary():
    model, tokenizer = load_model("gpt2-shape")
    facts = model_facts(model)
    assert (facts["layers"], facts["hidden"], facts["heads"], facts["max_tokens"]) == (12, 768, 12, 1024)
    assert facts["vocab"] == tokenizer.vocab_size == 30522
    # GPT-2 small's 124,439,808 parameters hold 50257 x 768 word embeddings; here 30522 rows.
    assert facts["params"] == 124_439_808 - (50257 - 30522) * 768
    assert model.config._attn_implementation == "eager" and not model.training
    assert is_decoder(model) and not is_decoder(load_model("tiny")[0])
    # The LM head is the word-embedding table (tied): one tensor, counted once.
    assert model.lm_head.weight is model.transformer.wte.weight


def test_decoders_are_seeded_and_refuse_classes():
    model, _ = load_model("gpt2-tiny", seed=0)
    again, _ = load_model("gpt2-tiny", seed=0)
    other, _ = load_model("gpt2-tiny", seed=1)
    weight = "transformer.h.0.attn.c_attn.weight"
    assert torch.equal(dict(model.named_parameters())[weight], dict(again.named_parameters())[weight])
    assert not torch.equal(dict(model.named_parameters())[weight], dict(other.named_parameters())[weight])
    with pytest.raises(ValueError, match="no classes"):
        load_model("gpt2-tiny", num_labels=3)


def test_gpt2_is_online_only_and_names_its_offline_shape(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert {"gpt2-shape", "gpt2-tiny"} <= set(OFFLINE_MODELS) and "gpt2" in DECODER_MODELS
    with pytest.raises(RuntimeError, match="'gpt2-shape' has its shape with random weights"):
        load_model("gpt2")


def test_encode_lm_wraps_each_sentence_and_carries_no_labels():
    _, tokenizer = load_model("gpt2-tiny")
    batch = encode_lm(tokenizer, ["a cat", "the film was long"])
    assert set(batch) == {"input_ids", "attention_mask"}
    assert batch["input_ids"].tolist() == [[101, 1037, 4937, 102, 0, 0], [101, 1996, 2143, 2001, 2146, 102]]
    assert batch["attention_mask"].sum(dim=1).tolist() == [4, 6]
    assert lm_special_ids(tokenizer) == (101, 102, 0)
    with pytest.raises(ValueError, match="Sentence 1 is empty"):
        encode_lm(tokenizer, ["a cat", "  "])
    with pytest.raises(ValueError, match="Sentence 0 has 6 tokens .* more than the 5"):
        encode_lm(tokenizer, "the film was long", max_tokens=5)
