"""LoRA victims (a BERT's and a GPT-2 decoder's): what lora_victim builds, what it refuses, how selections name
adapters, what a LoRA client sends."""

import pytest
import torch

from gilib.client import DPSGD, AdamW, FedAvg, _local_training, client_update, training_loss
from gilib.lora import LoraRecipe, LoraSettings, is_lora, lora_settings, lora_victim
from gilib.models import encode, encode_lm, load_model
from gilib.selection import ADAPTER_COMPONENTS, Selection, adapter_parameters, select

TEXTS = ["the film was a quiet delight .", "a cat sat on the mat"]
STEM = "bert.encoder.layer."


@pytest.fixture(scope="module")
def victim(tiny):
    """Rank-4 adapters on query, value and ffn.output of both layers of the tiny BERT, warmed up."""
    return lora_victim(tiny[0], ("query", "value", "ffn.output"), r=4, alpha=8, warmup=2)


@pytest.fixture
def true_batch(tiny):
    return encode(tiny[1], TEXTS, [1, 0])


def test_adapters_have_exact_names_and_r_times_d_in_plus_d_out_parameters(tiny, victim):
    hidden, ffn = 64, 128
    adapters = adapter_parameters(victim)
    assert len(adapters) == 2 * 3 * 2
    assert adapters[(0, "query", "A")] == STEM + "0.attention.self.query.lora_A.default.weight"
    assert adapters[(1, "ffn.output", "B")] == STEM + "1.output.dense.lora_B.default.weight"
    # ffn.output is output.dense, never attention.output.dense by substring
    assert not any("attention.output" in name for name in adapters.values())
    trainable = {n: p for n, p in victim.named_parameters() if p.requires_grad}
    assert set(trainable) == set(adapters.values())
    modules = ("query", "value", "ffn.output")
    per_module = {m: sum(trainable[adapters[(0, m, h)]].numel() for h in "AB") for m in modules}
    # r * (d_in + d_out) per module
    assert per_module == {"query": 4 * (hidden + hidden), "value": 4 * (hidden + hidden),
                          "ffn.output": 4 * (ffn + hidden)}
    assert tuple(trainable[adapters[(0, "ffn.output", "A")]].shape) == (4, ffn)
    assert tuple(trainable[adapters[(0, "ffn.output", "B")]].shape) == (hidden, 4)
    assert select(victim, "lora").numel == 2 * sum(per_module.values()) == 2 * 1792


def test_the_victim_is_a_frozen_eval_copy_and_the_model_it_came_from_is_untouched(tiny):
    model = tiny[0]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    victim = lora_victim(model, r=2, layers=0, warmup=1)
    assert not is_lora(model) and is_lora(victim)
    assert all(p.requires_grad for p in model.parameters())
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert type(victim) is type(model) and victim.base_model_prefix == "bert"
    assert not victim.training and victim.config._attn_implementation == "eager"
    base = dict(victim.named_parameters())[STEM + "0.attention.self.query.base_layer.weight"]
    assert not base.requires_grad and torch.equal(base, before[STEM + "0.attention.self.query.weight"])


def test_a_is_seeded_and_b_starts_at_zero(tiny):
    first, again, other = (lora_victim(tiny[0], r=4, layers=0, seed=s) for s in (3, 3, 4))
    a_name = STEM + "0.attention.self.value.lora_A.default.weight"
    b_name = a_name.replace("lora_A", "lora_B")
    weights = [dict(v.named_parameters()) for v in (first, again, other)]
    assert torch.equal(weights[0][a_name], weights[1][a_name])
    assert not torch.equal(weights[0][a_name], weights[2][a_name])
    assert weights[0][a_name].abs().max() > 0 and not weights[0][b_name].any()


def test_settings_read_back(victim, tiny):
    settings = lora_settings(victim)
    assert settings == LoraSettings(r=4, alpha=8.0, targets=("query", "value", "ffn.output"), layers=(0, 1))
    assert settings.scaling == 2.0
    with pytest.raises(ValueError, match="carries no LoRA adapters"):
        lora_settings(tiny[0])


@pytest.mark.parametrize("kwargs, message", [
    ({"r": 0}, r"r must be a whole number in 1\.\.64"),
    ({"r": 65}, r"1\.\.64"),
    ({"r": 129, "target_modules": ("ffn.output",)}, r"1\.\.64"),
    ({"r": 2.0}, "whole number"),
    ({"r": True}, "whole number"),
    ({"alpha": 0}, "alpha must be a positive, finite number"),
    ({"alpha": float("nan")}, "alpha must be a positive, finite"),
    ({"alpha": float("inf")}, "alpha must be a positive, finite"),
    ({"target_modules": ("dense",)}, "Unknown LoRA target dense: choose modules among query, key, value"),
    ({"target_modules": ()}, "Unknown LoRA target"),
    ({"target_modules": ("query", "query")}, "repeat a module"),
    ({"layers": 5}, "out of range"),
    ({"layers": []}, "list of layers is empty"),
    ({"warmup": -1}, "warmup must be None or a whole number"),
    ({"warmup": 1, "warmup_lr": 0}, "warmup_lr must be a positive number"),
    ({"warmup": 1, "warmup_batch": {"input_ids": torch.ones(1, 3, dtype=torch.long)}}, "warmup_batch lacks"),
])
def test_bad_settings_raise_clear_errors(tiny, kwargs, message):
    with pytest.raises(ValueError, match=message):
        lora_victim(tiny[0], **kwargs)


def test_a_victim_is_not_adapted_twice(victim):
    with pytest.raises(ValueError, match="already carries LoRA adapters"):
        lora_victim(victim)


def test_adapter_selections_name_exact_parameters(victim):
    q = STEM + "{}.attention.self.query.lora_{}.default.weight"
    assert select(victim, "lora.query.A", 0).names == (q.format(0, "A"),)
    assert select(victim, "lora.query", "all").names == tuple(q.format(l, h) for l in (0, 1) for h in "AB")
    assert select(victim, "lora.A", 1).names == (
        q.format(1, "A"), STEM + "1.attention.self.value.lora_A.default.weight",
        STEM + "1.output.dense.lora_A.default.weight")
    assert select(victim, "lora.B").layers == (0, 1) and len(select(victim, "lora.B").names) == 6
    assert select(victim, "lora.ffn.output.B", [1]).names == (STEM + "1.output.dense.lora_B.default.weight",)
    assert select(victim, "lora", 0).label == "lora L0"
    # A LoRA client shares what it trains: full, encoder and layer name the adapters alone.
    assert select(victim, "full").names == select(victim, "encoder").names == select(victim, "lora").names
    assert select(victim, "layer", 0).names == select(victim, "lora", 0).names


def test_adapter_selections_refuse_what_is_not_there(tiny, victim):
    with pytest.raises(ValueError, match="selects LoRA adapters and this model has none"):
        select(tiny[0], "lora")
    with pytest.raises(ValueError, match="no 'key' adapter: its adapters sit on ffn.output, query, value"):
        select(victim, "lora.key.A", 0)
    single = lora_victim(tiny[0], r=2, layers=1)
    with pytest.raises(ValueError, match=r"Layer 0 carries no adapter for 'lora.A'.*layers \[1\]"):
        select(single, "lora.A", 0)
    with pytest.raises(ValueError, match="peft froze the base weight"):
        select(victim, "attention.query", 0)
    with pytest.raises(ValueError, match="Unknown component 'lora.C'"):
        select(victim, "lora.C")
    assert set(ADAPTER_COMPONENTS) >= {"lora", "lora.A", "lora.B", "lora.value.A", "lora.attention.output.B"}


def test_a_fresh_adapter_gives_a_zero_a_gradient_and_a_warm_one_does_not(tiny, true_batch):
    fresh = lora_victim(tiny[0], ("query",), r=4, layers=0)
    a, b = client_update(fresh, select(fresh, "lora.query", 0), true_batch).shared.shared_grads
    assert not a.any() and b.abs().max() > 1e-4  # grad A = s B^T G = 0 while B = 0
    warm = lora_victim(tiny[0], ("query",), r=4, layers=0, warmup=2)
    a, b = client_update(warm, select(warm, "lora.query", 0), true_batch).shared.shared_grads
    assert a.abs().max() > 1e-5 and torch.linalg.matrix_rank(a.double()) == 4


def test_the_fedsgd_message_is_the_adapters_gradient(victim, true_batch):
    selection = select(victim, "lora", 0)
    shared = client_update(victim, selection, true_batch).shared.shared_grads
    victim.zero_grad(set_to_none=True)
    victim(**true_batch).loss.backward()
    params = dict(victim.named_parameters())
    for name, g in zip(selection.names, shared):
        torch.testing.assert_close(g, params[name].grad)
    base = params[STEM + "0.attention.self.query.base_layer.weight"]
    assert base.grad is None  # frozen: no gradient to share
    victim.zero_grad(set_to_none=True)


@pytest.mark.parametrize("protocol", [FedAvg(1, 1e-3), FedAvg(3, 1e-3), AdamW(1, 1e-3), AdamW(2, 1e-3)],
                         ids=["fedavg1", "fedavg3", "adamw1", "adamw2"])
def test_local_steps_move_the_adapters_alone(victim, true_batch, protocol):
    base = STEM + "0.attention.self.query.base_layer.weight"
    head = "classifier.weight"
    adapters = select(victim, "lora")
    params = dict(victim.named_parameters())
    # A selection that also names frozen weights: their message must be exactly zero.
    names = (base, head, *adapters.names)
    probe = Selection("probe", (0, 1), names, sum(params[n].numel() for n in names), adapters.total)
    message = _local_training(victim, probe, true_batch, protocol)
    assert not message[0].any() and not message[1].any()
    assert all(m.abs().max() > 0 for m in message[2:])
    if isinstance(protocol, FedAvg) and protocol.local_steps == 1:
        # One SGD step over lr is the FedSGD gradient.
        plain = client_update(victim, adapters, true_batch).shared.shared_grads
        for m, g in zip(message[2:], plain):
            torch.testing.assert_close(m, g, rtol=2e-2, atol=2e-4)
    shared = client_update(victim, adapters, true_batch, protocol).shared.shared_grads
    assert len(shared) == 12 and all(s.shape == params[n].shape for s, n in zip(shared, adapters.names))


def test_the_one_step_adamw_message_inverts_to_the_adapters_gradient(victim, true_batch):
    selection = select(victim, "lora.A", 0)
    protocol = AdamW(1, 1e-3, weight_decay=0.0, precision="float64")
    message = client_update(victim, selection, true_batch, protocol).shared
    recovered = protocol.gradient(message, victim, selection).shared_grads
    plain = client_update(victim, selection, true_batch).shared.shared_grads
    for r, g in zip(recovered, plain):
        cosine = torch.nn.functional.cosine_similarity(r.double().flatten(), g.double().flatten(), dim=0)
        assert cosine > 0.999


def test_a_dp_sgd_client_privatises_the_adapters(victim, true_batch):
    selection = select(victim, "lora", 0)
    raw = client_update(victim, selection, true_batch, DPSGD(0.5, 1.0, seed=1, reading="raw")).shared.shared_grads
    plain = client_update(victim, selection, true_batch).shared.shared_grads
    for r, g in zip(raw, plain):
        torch.testing.assert_close(r, g, rtol=1e-4, atol=1e-7)


# --- LoRA on a GPT-2-style decoder (the tiny one: 2 blocks, 128 wide) --------------------------------------------

H = "transformer.h."


@pytest.fixture(scope="module")
def gpt2_tiny():
    return load_model("gpt2-tiny", seed=0)


@pytest.fixture(scope="module")
def decoder_victim(gpt2_tiny):
    """Rank-4 adapters on every Conv1D of both blocks, warmed up on the next-token loss."""
    return lora_victim(gpt2_tiny[0], ("c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"), r=4, alpha=8, warmup=2)


def test_decoder_adapters_have_exact_names_and_linear_shapes(gpt2_tiny, decoder_victim):
    adapters = adapter_parameters(decoder_victim)
    assert len(adapters) == 2 * 4 * 2
    assert adapters[(0, "c_attn", "A")] == H + "0.attn.c_attn.lora_A.default.weight"
    assert adapters[(1, "mlp.c_proj", "B")] == H + "1.mlp.c_proj.lora_B.default.weight"
    params = dict(decoder_victim.named_parameters())
    # peft's adapters are nn.Linear even on GPT-2's Conv1D (weight (in, out)): A is (r, d_in), B (d_out, r).
    shapes = {m: (tuple(params[adapters[(0, m, "A")]].shape), tuple(params[adapters[(0, m, "B")]].shape))
              for m in ("c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}
    assert shapes == {"c_attn": ((4, 128), (384, 4)), "attn.c_proj": ((4, 128), (128, 4)),
                      "mlp.c_fc": ((4, 128), (512, 4)), "mlp.c_proj": ((4, 512), (128, 4))}
    assert {n for n, p in params.items() if p.requires_grad} == set(adapters.values())
    module = dict(decoder_victim.named_modules())[H + "0.attn.c_attn"]
    assert module.fan_in_fan_out and type(decoder_victim).__name__ == "GPT2LMHeadModel"
    assert not decoder_victim.training and not is_lora(gpt2_tiny[0])
    assert lora_settings(decoder_victim) == LoraSettings(r=4, alpha=8.0, targets=(
        "c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"), layers=(0, 1))


def test_a_decoder_adapter_adds_s_b_a_x_to_the_frozen_conv1d(decoder_victim):
    module = dict(decoder_victim.named_modules())[H + "0.attn.c_attn"]
    base, a, b = module.base_layer, module.lora_A["default"].weight, module.lora_B["default"].weight
    assert b.abs().max() > 0  # the warm-up moved B off zero
    x = torch.randn(3, 128, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = x @ base.weight + base.bias + 2.0 * (x @ a.T) @ b.T  # Conv1D: x W + b, W stored (in, out)
        torch.testing.assert_close(module(x), expected, rtol=1e-5, atol=1e-6)


def test_the_decoder_default_target_is_c_attn_and_the_warm_up_is_next_token(gpt2_tiny):
    fresh = lora_victim(gpt2_tiny[0], r=2, layers=0)
    assert lora_settings(fresh).targets == ("c_attn",)
    warm = lora_victim(gpt2_tiny[0], r=2, layers=0, warmup=1)
    name = H + "0.attn.c_attn.lora_B.default.weight"
    assert not dict(fresh.named_parameters())[name].any() and dict(warm.named_parameters())[name].any()
    batch = encode_lm(gpt2_tiny[1], ["a public sentence for the warm-up ."])
    own = lora_victim(gpt2_tiny[0], r=2, layers=0, warmup=1, warmup_batch=batch)
    assert not torch.equal(dict(own.named_parameters())[name], dict(warm.named_parameters())[name])


@pytest.mark.parametrize("kwargs, message", [
    ({"r": 0}, r"r must be a whole number in 1\.\.128"),
    ({"r": 129}, r"1\.\.128"),
    ({"alpha": -1}, "alpha must be a positive, finite number"),
    ({"target_modules": ("query",)},
     "Unknown LoRA target query: choose modules among c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj"),
    ({"target_modules": ("c_proj",)}, "Unknown LoRA target c_proj"),
    ({"layers": 2}, "out of range"),
    ({"warmup": 1, "warmup_batch": {"input_ids": torch.ones(1, 3, dtype=torch.long),
                                    "attention_mask": torch.ones(1, 3, dtype=torch.long),
                                    "labels": torch.zeros(1, dtype=torch.long)}}, "has no class labels"),
    ({"warmup": 1, "warmup_batch": {"input_ids": torch.ones(1, 3, dtype=torch.long)}},
     r"warmup_batch lacks \['attention_mask'\].*encode_lm"),
])
def test_bad_decoder_settings_raise_clear_errors(gpt2_tiny, kwargs, message):
    with pytest.raises(ValueError, match=message):
        lora_victim(gpt2_tiny[0], **kwargs)


def test_a_bert_target_on_a_decoder_recipe_is_refused_when_built(gpt2_tiny, tiny):
    recipe = LoraRecipe(targets=("c_attn", "mlp.c_fc"), r=4, layers=0, warmup=1)
    assert lora_settings(recipe.victim(gpt2_tiny[0])).targets == ("c_attn", "mlp.c_fc")
    with pytest.raises(ValueError, match="Unknown LoRA target c_attn: .*the targets of a BERT"):
        recipe.victim(tiny[0])
    with pytest.raises(ValueError, match="Unknown LoRA target dense"):
        LoraRecipe(targets=("dense",))


def test_decoder_adapter_selections_name_exact_parameters(gpt2_tiny, decoder_victim):
    a = H + "{}.{}.lora_{}.default.weight"
    assert select(decoder_victim, "lora.c_attn.A", 0).names == (a.format(0, "attn.c_attn", "A"),)
    # the two c_proj's are told apart by their parent, never by substring
    assert select(decoder_victim, "lora.mlp.c_proj", 1).names == (a.format(1, "mlp.c_proj", "A"),
                                                                   a.format(1, "mlp.c_proj", "B"))
    assert select(decoder_victim, "lora.attn.c_proj.B", "all").names == tuple(
        a.format(layer, "attn.c_proj", "B") for layer in (0, 1))
    assert select(decoder_victim, "lora.A", 0).names == tuple(
        a.format(0, m, "A") for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"))
    assert select(decoder_victim, "full").names == select(decoder_victim, "lora").names
    assert len(select(decoder_victim, "lora").names) == 16
    with pytest.raises(ValueError, match="no 'query' adapter: its adapters sit on attn.c_proj, c_attn"):
        select(decoder_victim, "lora.query.A", 0)
    with pytest.raises(ValueError, match="peft froze the base weight"):
        select(decoder_victim, "attention.qkv", 0)
    with pytest.raises(ValueError, match="selects LoRA adapters and this model has none"):
        select(gpt2_tiny[0], "lora.c_attn.A", 0)


def test_a_lora_decoder_clients_fedsgd_message_is_its_adapters_gradient(gpt2_tiny, decoder_victim):
    batch = encode_lm(gpt2_tiny[1], TEXTS)
    selection = select(decoder_victim, "lora", 0)
    message = client_update(decoder_victim, selection, batch).shared
    assert message.labels is None and message.lengths == [9, 8]
    decoder_victim.zero_grad(set_to_none=True)
    training_loss(decoder_victim, batch).backward()
    params = dict(decoder_victim.named_parameters())
    for name, g in zip(selection.names, message.shared_grads):
        torch.testing.assert_close(g, params[name].grad)
        assert g.abs().max() > 0
    assert params[H + "0.attn.c_attn.base_layer.weight"].grad is None  # frozen: nothing to share
    decoder_victim.zero_grad(set_to_none=True)
