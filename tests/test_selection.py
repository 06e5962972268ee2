import pytest

from gilib.models import load_model
from gilib.selection import COMPONENTS, Selection, select


@pytest.fixture(scope="module")
def bert_base():
    return load_model("bert-base-shape")[0]


def test_ffn_output_is_not_attention_output(bert_base):
    sel = select(bert_base, "ffn.output", 3)
    assert sel.names == ("bert.encoder.layer.3.output.dense.weight",)
    assert "bert.encoder.layer.3.attention.output.dense.weight" not in sel.names


def test_one_768_square_weight_is_0_5387_percent_of_bert_base(bert_base):
    sel = select(bert_base, "attention.query", 0)
    assert sel.numel == 768 * 768
    assert round(100 * sel.fraction, 4) == 0.5387


@pytest.mark.parametrize(
    "component, layers, names",
    [
        ("attention.key", 1, ["bert.encoder.layer.1.attention.self.key.weight"]),
        ("attention.value", -1, ["bert.encoder.layer.1.attention.self.value.weight"]),
        ("attention.qkv", 0, [f"bert.encoder.layer.0.attention.self.{m}.weight" for m in ("query", "key", "value")]),
        ("attention.output", 0, ["bert.encoder.layer.0.attention.output.dense.weight"]),
        ("ffn.intermediate", [1, 0], ["bert.encoder.layer.0.intermediate.dense.weight",
                                      "bert.encoder.layer.1.intermediate.dense.weight"]),
        ("attention.query", "all", [f"bert.encoder.layer.{i}.attention.self.query.weight" for i in (0, 1)]),
    ],
)
def test_components_select_exact_names(tiny, component, layers, names):
    assert list(select(tiny[0], component, layers).names) == names


def test_layer_full_and_encoder(tiny):
    model = tiny[0]
    layer = select(model, "layer", 1)
    assert all(n.startswith("bert.encoder.layer.1.") for n in layer.names)
    assert len(layer.names) == 16  # q, k, v, attn-out, 2 LayerNorms, 2 FFN linears: weights and biases
    encoder = select(model, "encoder")
    assert encoder.numel == select(model, "layer", [0, 1]).numel
    full = select(model, "full")
    table = model.get_input_embeddings().weight
    assert "bert.embeddings.word_embeddings.weight" not in full.names
    assert full.numel == full.total - table.numel()
    assert "classifier.weight" in full.names


@pytest.mark.parametrize(
    "component, layers, message",
    [
        ("ffn.outptu", 0, "Unknown component 'ffn.outptu'. Choose one of: full, encoder, layer"),
        ("attention.query", 2, "Layer 2 is out of range: this model has 2 layers"),
        ("attention.query", -3, "Layer -3 is out of range"),
        ("attention.query", None, "needs layers"),
        ("attention.query", [], "list of layers is empty"),
        ("attention.query", "first", "Unknown layers 'first'"),
        ("attention.query", [0, 0], "repeat a layer"),
        ("attention.query", 0.5, "not an integer"),
        ("full", 0, "takes no layers"),
    ],
)
def test_bad_selections_raise_clear_errors(tiny, component, layers, message):
    with pytest.raises(ValueError, match=message):
        select(tiny[0], component, layers)


def test_all_components_resolve(tiny):
    for component in COMPONENTS:
        layers = None if component in ("full", "encoder") else 0
        assert select(tiny[0], component, layers).numel > 0


def test_an_empty_selection_and_a_selection_of_another_model_are_refused(tiny, bert_base):
    with pytest.raises(ValueError, match="names no parameter"):
        Selection("layer", (0,), (), 0, 100)
    foreign = select(bert_base, "attention.query", 11)  # MiniLM-sized models have no layer 11
    with pytest.raises(ValueError, match="made for another model"):
        foreign.parameters(tiny[0])


@pytest.fixture(scope="module")
def gpt2_tiny():
    return load_model("gpt2-tiny")[0]


@pytest.mark.parametrize("component, layers, names", [
    ("attention.qkv", 0, ["transformer.h.0.attn.c_attn.weight"]),
    ("attention.output", 1, ["transformer.h.1.attn.c_proj.weight"]),
    ("ffn.intermediate", "all", [f"transformer.h.{i}.mlp.c_fc.weight" for i in (0, 1)]),
    ("ffn.output", -1, ["transformer.h.1.mlp.c_proj.weight"]),  # never attn.c_proj
])
def test_decoder_components_select_exact_names(gpt2_tiny, component, layers, names):
    assert list(select(gpt2_tiny, component, layers).names) == names


def test_decoder_weights_are_conv1d_shaped_in_by_out(gpt2_tiny):
    params = dict(gpt2_tiny.named_parameters())
    d = gpt2_tiny.config.hidden_size
    shapes = {c: tuple(params[select(gpt2_tiny, c, 0).names[0]].shape)
              for c in ("attention.qkv", "attention.output", "ffn.intermediate", "ffn.output")}
    assert shapes == {"attention.qkv": (d, 3 * d), "attention.output": (d, d), "ffn.intermediate": (d, 4 * d),
                      "ffn.output": (4 * d, d)}


def test_decoder_layer_encoder_and_full(gpt2_tiny):
    layer = select(gpt2_tiny, "layer", 1)
    assert all(n.startswith("transformer.h.1.") for n in layer.names) and len(layer.names) == 12
    encoder = select(gpt2_tiny, "encoder")
    assert len(encoder.names) == 24 and encoder.layers == (0, 1)
    full = select(gpt2_tiny, "full")
    # Every parameter but the word embeddings, which the LM head shares (tied: not a parameter of its own).
    assert "transformer.wte.weight" not in full.names and "lm_head.weight" not in full.names
    assert full.names[0] == "transformer.wpe.weight" and full.names[-1] == "transformer.ln_f.bias"
    assert full.numel == full.total - gpt2_tiny.transformer.wte.weight.numel()


@pytest.mark.parametrize("component", ["attention.query", "attention.key", "attention.value"])
def test_a_decoder_has_no_separate_query_key_or_value(gpt2_tiny, component):
    with pytest.raises(ValueError, match="fused weight .* attention.qkv"):
        select(gpt2_tiny, component, 0)
