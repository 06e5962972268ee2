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

    def position_log_probs(self, ids: Sequence[int], position: int) -> torch.Tensor:
        """The log-prior of every vocabulary token at ``position``, the rest of ``ids`` fixed: ``(V,)`` float64.

        The sum of the three terms of the sentence's log-likelihood that
        involve the token there (it is predicted, then it predicts the next
        two), so that entry ``w`` minus entry ``w'`` is the whole sentence's
        log-likelihood with ``w`` minus that with ``w'``. A search that
        re-picks one position at a time (:func:`gilib.attack.likelihood.likely_sentence`)
        scores the whole vocabulary at once with it.

        Args:
            ids: token ids of one sentence, no special tokens.
            position: an index into ``ids``.

        Raises:
            IndexError: for a position outside ``ids``.
        """
        ids = [int(t) for t in ids]
        if not 0 <= position < len(ids):
            raise IndexError(f"position {position} is outside a sentence of {len(ids)} tokens.")
        if not hasattr(self, "_index"):
            self._build_index()
        framed = [self.bos, self.bos, *ids, self.eos]
        q = position + 2
        u, v = framed[q - 2], framed[q - 1]
        logp = self._predicted(u, v).log()
        logp += self._context(v, framed[q + 1], second=True).log()
        if q + 2 < len(framed):
            logp += self._context(framed[q + 1], framed[q + 2], second=False).log()
        return logp

    def _build_index(self) -> None:
        """Count tables keyed for :meth:`position_log_probs`: which tokens complete each pair or triple."""
        def table(pairs):
            # Plain lists: the few entries a sentence looks up become tensors then (_entries).
            grouped: dict = {}
            for key, token, count in pairs:
                entry = grouped.get(key)
                if entry is None:
                    entry = grouped[key] = ([], [])
                entry[0].append(token)
                entry[1].append(count)
            return grouped
        unigrams = torch.zeros(self.vocab_size, dtype=torch.float64)
        for w, c in self.unigrams.items():
            unigrams[w] = c
        self._base = self.weights[0] / self.vocab_size + self.weights[1] * unigrams / self._total
        self._bigram_rows = torch.zeros(self.vocab_size, dtype=torch.float64)  # each history's count
        for v, c in self._bigram_ctx.items():
            self._bigram_rows[v] = c
        self._index = {
            "next": table((v, w, c) for (v, w), c in self.bigrams.items()),  # v -> (w, count)
            "prev": table((w, v, c) for (v, w), c in self.bigrams.items()),  # w -> (v, count)
            "after": table(((u, v), w, c) for (u, v, w), c in self.trigrams.items()),  # (u, v) -> w
            "middle": table(((u, w), v, c) for (u, v, w), c in self.trigrams.items()),  # (u, w) -> v
            "before": table(((v, w), u, c) for (u, v, w), c in self.trigrams.items()),  # (v, w) -> u
        }

    def _predicted(self, u: int, v: int) -> torch.Tensor:
        """``P(w | u, v)`` for every ``w``: ``(V,)``."""
        _, _, l2, l3 = self.weights
        p = self._base.clone()
        if self._bigram_ctx[v]:
            tokens, counts = _entries(self._index["next"][v])
            p.index_add_(0, tokens, l2 * counts / self._bigram_ctx[v])
        if self._trigram_ctx[(u, v)]:
            tokens, counts = _entries(self._index["after"][(u, v)])
            p.index_add_(0, tokens, l3 * counts / self._trigram_ctx[(u, v)])
        return p

    def _context(self, a: int, b: int, *, second: bool) -> torch.Tensor:
        """For every ``w``: ``P(b | a, w)`` (``second``) or ``P(b | w, a)``: ``(V,)``."""
        _, _, l2, l3 = self.weights
        if second:  # w is the last token of b's history: it sets the bigram term too
            p = torch.full((self.vocab_size,), float(self._base[b]), dtype=torch.float64)
            if b in self._index["prev"]:
                tokens, counts = _entries(self._index["prev"][b])
                p.index_add_(0, tokens, l2 * counts / self._bigram_rows[tokens])
            key, table = (a, b), self._index["middle"]
            histories = lambda tokens: [self._trigram_ctx[(a, int(w))] for w in tokens]  # noqa: E731
        else:  # P(b | w, a): the bigram term is w's no more
            bigram = l2 * self.bigrams[(a, b)] / self._bigram_ctx[a] if self._bigram_ctx[a] else 0.0
            p = torch.full((self.vocab_size,), float(self._base[b]) + bigram, dtype=torch.float64)
            key, table = (a, b), self._index["before"]
            histories = lambda tokens: [self._trigram_ctx[(int(w), a)] for w in tokens]  # noqa: E731
        if key in table:
            tokens, counts = _entries(table[key])
            p.index_add_(0, tokens, l3 * counts / torch.tensor(histories(tokens), dtype=torch.float64))
        return p

    def __call__(self, ids: Sequence[int]) -> float:
        """Mean negative log-likelihood per token (end marker included)."""
        framed = [self.bos, self.bos, *ids, self.eos]
        nll = -sum(self.log_prob(w, u, v) for u, v, w in zip(framed, framed[1:], framed[2:]))
        return nll / (len(framed) - 2)


def _entries(entry: tuple[list, list]) -> tuple[torch.Tensor, torch.Tensor]:
    """A count table's ``(tokens, counts)`` lists as tensors: ``(k,)`` int64 and float64."""
    return torch.tensor(entry[0]), torch.tensor(entry[1], dtype=torch.float64)


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
