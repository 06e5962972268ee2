"""Language-model priors for the reordering rounds of the optimisation attack.

LAMP (Balunovic et al., NeurIPS 2022) scores each candidate order by the
reconstruction loss plus a weight (0.2 in the paper) times GPT-2's
perplexity of the candidate text: of two orders that match the gradient
equally well, the more natural one wins. A prior is any callable from the
token ids of one sentence (no special tokens) to a score, lower meaning
more natural. Two are provided:

* :class:`NgramPrior`: a count-based, interpolated trigram model over BERT
  token ids, counted at run time from texts the caller assembles
  (:meth:`NgramPrior.from_texts`). It needs no download. It must never see
  the sentences under attack: :func:`gilib.data.prior_texts` gathers every
  local split *except* the attacked one, and refuses that split outright::

      texts, sources = gilib.data.prior_texts(("cola", "train"))
      prior = NgramPrior.from_texts(tokenizer, texts)

* :class:`GPT2Prior`: GPT-2's mean negative log-likelihood of the decoded
  text, as in LAMP; it needs the Hugging Face hub (Colab) or a local copy of
  the checkpoint (a GPU machine).
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ..models import hub_available

Prior = Callable[[Sequence[int]], float]
"""A language-model prior: token ids of one sentence (no special tokens) to a
score, lower meaning more natural (e.g. mean negative log-likelihood)."""


class NgramPrior:
    """An interpolated n-gram model over token ids.

    ``P(w | u, v) = l3 P(w | u, v) + l2 P(w | v) + l1 P(w) + l0 / V`` with
    maximum-likelihood estimates and fixed weights (Jelinek-Mercer
    smoothing), so every sequence has a proper, non-zero probability.
    Sentences are framed by ``[CLS]`` and ``[SEP]``, so the prior also
    judges how a sentence starts and ends.

    Args:
        sequences: token-id sequences to count, without special tokens.
        bos: id marking the start (``[CLS]``).
        eos: id marking the end (``[SEP]``).
        vocab_size: ``V``.
        weights: ``(l0, l1, l2, l3)``, summing to 1.
    """

    def __init__(
        self,
        sequences: Iterable[Sequence[int]],
        bos: int,
        eos: int,
        vocab_size: int,
        weights: tuple[float, float, float, float] = (0.01, 0.19, 0.3, 0.5),
    ) -> None:
        if abs(sum(weights) - 1.0) > 1e-9:
            raise ValueError(f"The interpolation weights must sum to 1, got {sum(weights)}.")
        self.bos, self.eos, self.vocab_size, self.weights = bos, eos, vocab_size, weights
        self.unigrams: Counter = Counter()
        self.bigrams: Counter = Counter()
        self.trigrams: Counter = Counter()
        self.sentences = 0
        for seq in sequences:
            framed = [bos, bos, *seq, eos]
            self.sentences += 1
            self.unigrams.update(framed[2:])
            self.bigrams.update(zip(framed[1:], framed[2:]))
            self.trigrams.update(zip(framed, framed[1:], framed[2:]))
        if not self.sentences:
            raise ValueError("An n-gram prior needs at least one sentence to count.")
        self._total = sum(self.unigrams.values())
        # Context counts: how often each history was followed by anything.
        self._bigram_ctx: Counter = Counter()
        for (v, _), c in self.bigrams.items():
            self._bigram_ctx[v] += c
        self._trigram_ctx: Counter = Counter()
        for (u, v, _), c in self.trigrams.items():
            self._trigram_ctx[(u, v)] += c

    @classmethod
    def from_texts(cls, tokenizer, texts: Iterable[str], **kwargs) -> "NgramPrior":
        """Count the WordPiece ids of ``texts`` with the victim's tokenizer.

        The caller chooses the texts, and must leave out the split under
        attack: :func:`gilib.data.prior_texts` does.

        Raises:
            ValueError: if ``texts`` is empty.
        """
        texts = list(texts)
        if not texts:
            raise ValueError("No text to build an n-gram prior from: pass sentences from a split other than the "
                             "attacked one (gilib.data.prior_texts gathers them).")
        ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
        return cls(ids, tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.vocab_size, **kwargs)

    def log_prob(self, w: int, u: int, v: int) -> float:
        """``log P(w | u, v)``."""
        l0, l1, l2, l3 = self.weights
        p = l0 / self.vocab_size + l1 * self.unigrams[w] / self._total
        if self._bigram_ctx[v]:
            p += l2 * self.bigrams[(v, w)] / self._bigram_ctx[v]
        if self._trigram_ctx[(u, v)]:
            p += l3 * self.trigrams[(u, v, w)] / self._trigram_ctx[(u, v)]
        return math.log(p)

    def __call__(self, ids: Sequence[int]) -> float:
        """Mean negative log-likelihood per token (end marker included)."""
        framed = [self.bos, self.bos, *ids, self.eos]
        nll = -sum(self.log_prob(w, u, v) for u, v, w in zip(framed, framed[1:], framed[2:]))
        return nll / (len(framed) - 2)


class GPT2Prior:
    """GPT-2's mean negative log-likelihood of the decoded sentence (LAMP's prior).

    Args:
        bert_tokenizer: the victim's tokenizer, to decode candidate ids.
        name_or_path: a hub name (``"gpt2"``) or a local checkpoint directory.
        device: where GPT-2 runs.

    Raises:
        RuntimeError: when the checkpoint is neither local nor reachable.
    """

    def __init__(self, bert_tokenizer, name_or_path: str = "gpt2", device: str | torch.device = "cpu") -> None:
        unavailable = (
            f"The GPT-2 prior '{name_or_path}' is neither a local checkpoint directory nor reachable "
            "on the Hugging Face hub. Offline, use an n-gram prior, which needs no download: "
            "gilib.attack.NgramPrior.from_texts(tokenizer, gilib.data.prior_texts(attacked=(dataset, split))[0])."
        )
        if not Path(name_or_path).is_dir() and not hub_available():
            raise RuntimeError(unavailable)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(name_or_path)
            self.model = AutoModelForCausalLM.from_pretrained(name_or_path).to(device).eval()
        except (OSError, ValueError) as err:
            raise RuntimeError(f"{unavailable} ({type(err).__name__}: {err})") from err
        self.bert_tokenizer = bert_tokenizer
        self.device = device

    @torch.no_grad()
    def __call__(self, ids: Sequence[int]) -> float:
        text = self.bert_tokenizer.decode(list(ids))
        tokens = self.tokenizer(self.tokenizer.bos_token + text, return_tensors="pt").input_ids.to(self.device)
        return float(self.model(tokens, labels=tokens).loss)
