import math

import pytest

from gilib.attack import GPT2Prior, NgramPrior, offline_prior, prior_from_examples
from gilib.data import default_data_dir, load_split


def test_ngram_prior_prefers_the_natural_order(tiny, tmp_path):
    _, tokenizer = tiny
    prior = offline_prior(tokenizer, attacked=("cola", "train"), data_dir=tmp_path)  # no benchmark files
    assert prior.sources == ["sample/train"]
    natural = tokenizer("the plot goes nowhere .", add_special_tokens=False)["input_ids"]
    assert prior(natural) < prior(natural[::-1])
    assert prior(natural) < prior(natural[1:] + natural[:1])


def test_ngram_probabilities_sum_to_one(tiny):
    _, tokenizer = tiny
    prior = NgramPrior.from_texts(tokenizer, ["the film was good .", "the plot was thin ."])
    the, film = tokenizer.convert_tokens_to_ids(["the", "film"])
    total = sum(math.exp(prior.log_prob(w, the, film)) for w in range(tokenizer.vocab_size))
    assert total == pytest.approx(1.0, abs=1e-6)


def test_prior_is_never_built_from_the_attacked_split(tiny, tmp_path):
    _, tokenizer = tiny
    sample = load_split("sample")
    with pytest.raises(ValueError, match="split under attack"):
        prior_from_examples(tokenizer, sample[:5], attacked=("sample", "train"))
    with pytest.raises(ValueError, match="No text besides sample/train"):
        offline_prior(tokenizer, attacked=("sample", "train"), data_dir=tmp_path)


@pytest.mark.skipif(default_data_dir() is None, reason="needs the benchmark files (GILIB_DATA_DIR)")
def test_offline_prior_counts_every_split_but_the_attacked_one(tiny):
    _, tokenizer = tiny
    prior = offline_prior(tokenizer, attacked=("cola", "train"))
    assert "cola/train" not in prior.sources
    assert {"sample/train", "cola/validation", "sst2/train", "rotten_tomatoes/train"} <= set(prior.sources)
    expected = sum(len(load_split(*source.split("/"))) for source in prior.sources)
    assert prior.sentences == expected


def test_gpt2_prior_offline_gives_a_clear_error(tiny, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RuntimeError, match="Offline, use gilib.attack.offline_prior"):
        GPT2Prior(tiny[1])
