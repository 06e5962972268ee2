import math

import pytest

import gilib.attack as attack
from gilib import data
from gilib.attack import GPT2Prior, NgramPrior
from gilib.data import default_data_dir, load_split, prior_texts


def test_ngram_prior_prefers_the_natural_order(tiny, tmp_path):
    _, tokenizer = tiny
    texts, sources = prior_texts(attacked=("cola", "train"), data_dir=tmp_path)  # no benchmark files
    assert sources == ["sample/train"]
    prior = NgramPrior.from_texts(tokenizer, texts)
    natural = tokenizer("the plot goes nowhere .", add_special_tokens=False)["input_ids"]
    assert prior(natural) < prior(natural[::-1])
    assert prior(natural) < prior(natural[1:] + natural[:1])


def test_ngram_probabilities_sum_to_one(tiny):
    _, tokenizer = tiny
    prior = NgramPrior.from_texts(tokenizer, ["the film was good .", "the plot was thin ."])
    the, film = tokenizer.convert_tokens_to_ids(["the", "film"])
    total = sum(math.exp(prior.log_prob(w, the, film)) for w in range(tokenizer.vocab_size))
    assert total == pytest.approx(1.0, abs=1e-6)


def test_ngram_prior_refuses_no_text(tiny):
    with pytest.raises(ValueError, match="No text to build an n-gram prior from"):
        NgramPrior.from_texts(tiny[1], [])


def test_prior_is_never_built_from_the_attacked_split(tmp_path):
    with pytest.raises(ValueError, match="split under attack"):
        prior_texts(attacked=("sample", "train"), splits=[("sample", "train")])
    with pytest.raises(ValueError, match="No text besides sample/train"):
        prior_texts(attacked=("sample", "train"), data_dir=tmp_path)
    # A misspelt attacked split must not slip through and leave the real one in the prior.
    with pytest.raises(ValueError, match="Unknown split 'trian'"):
        prior_texts(attacked=("sample", "trian"))
    with pytest.raises(ValueError, match="Unknown dataset 'colaa'"):
        prior_texts(attacked=("colaa", "train"))


def test_chosen_splits_are_counted_and_the_attacked_one_never(tmp_path):
    texts, sources = prior_texts(attacked=("cola", "train"), data_dir=tmp_path, splits=[("sample", "train")])
    assert sources == ["sample/train"] and texts == [e.text for e in load_split("sample")]
    with pytest.raises(FileNotFoundError):
        prior_texts(attacked=("cola", "train"), data_dir=tmp_path, splits=[("cola", "validation")])


@pytest.mark.skipif(default_data_dir() is None, reason="needs the benchmark files (GILIB_DATA_DIR)")
def test_prior_texts_count_every_split_but_the_attacked_one():
    texts, sources = prior_texts(attacked=("cola", "train"))
    assert "cola/train" not in sources
    assert {"sample/train", "cola/validation", "sst2/train", "rotten_tomatoes/train"} <= set(sources)
    # Exactly the sentences of those splits, in order: none from the attacked one.
    assert texts == [e.text for source in sources for e in load_split(*source.split("/"))]


def test_the_attack_package_builds_no_prior_from_dataset_files():
    assert not hasattr(attack, "offline_prior") and not hasattr(attack, "prior_from_examples")
    assert data.prior_texts is prior_texts


def test_gpt2_prior_offline_gives_a_clear_error(tiny, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RuntimeError, match=r"NgramPrior\.from_texts\(tokenizer, gilib\.data\.prior_texts\("):
        GPT2Prior(tiny[1])


def test_position_log_probs_are_the_sentences_log_likelihood_token_by_token(tiny):
    # Entry w minus entry w' is the whole sentence's log-likelihood with w at the position minus with w':
    # what lets the span check's search score the whole vocabulary at a position at once.
    _, tokenizer = tiny
    prior = NgramPrior.from_texts(tokenizer, ["the film was good .", "the plot was thin .", "a good film ."])
    ids = tokenizer("the film was thin .", add_special_tokens=False)["input_ids"]

    def total(sentence):
        framed = [prior.bos, prior.bos, *sentence, prior.eos]
        return sum(prior.log_prob(w, u, v) for u, v, w in zip(framed, framed[1:], framed[2:]))

    others = tokenizer.convert_tokens_to_ids(["good", "plot", "a", "."]) + [7, 1000, tokenizer.vocab_size - 1]
    for position in range(len(ids)):
        scores = prior.position_log_probs(ids, position)
        assert scores.shape == (tokenizer.vocab_size,)
        for w in others:
            changed = ids[:position] + [w] + ids[position + 1:]
            assert float(scores[w] - scores[ids[position]]) == pytest.approx(total(changed) - total(ids), abs=1e-9)
    with pytest.raises(IndexError, match="position 5 is outside a sentence of 5 tokens"):
        prior.position_log_probs(ids, 5)
