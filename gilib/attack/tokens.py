"""The token space an attack searches: the victim's word-embedding table.

An optimisation attack works on continuous input embeddings and maps them
back to words by cosine similarity with the embedding table (LAMP,
Balunovic et al., NeurIPS 2022). Only tokens that can occur in text are
candidates: special tokens (``[CLS]``, ``[SEP]``, ``[PAD]``, ``[MASK]``,
``[UNK]``) and BERT's ``[unusedN]`` placeholders never come out of the
tokenizer for real text, so they are excluded.
"""

from __future__ import annotations

import re

import torch

_UNUSED = re.compile(r"^\[unused\d+\]$")


class TokenSpace:
    """Word embeddings of a victim, with the tokens an attack may output.

    Args:
        model: a BERT-family model.
        tokenizer: its tokenizer.

    Attributes:
        table: ``(V, d)`` word-embedding matrix (detached).
        allowed: ``(V,)`` bool mask of tokens that occur in text.
        mean_norm: mean L2 norm of the allowed rows, the target of LAMP's
            embedding-norm regulariser.
    """

    def __init__(self, model: torch.nn.Module, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.table = model.get_input_embeddings().weight.detach()
        vocab = tokenizer.convert_ids_to_tokens(list(range(self.table.shape[0])))
        special = set(tokenizer.all_special_ids)
        self.allowed = torch.tensor(
            [i not in special and not _UNUSED.match(tok) for i, tok in enumerate(vocab)],
            device=self.table.device,
        )
        self.mean_norm = float(self.table[self.allowed].norm(dim=1).mean())
        unit = torch.nn.functional.normalize(self.table, dim=1)
        # Rows of disallowed tokens are zeroed so that they can never be the
        # nearest token (every allowed cosine beats -inf after masking below).
        self._unit_allowed = unit[self.allowed]
        self._allowed_ids = torch.nonzero(self.allowed).squeeze(1)

    @property
    def dim(self) -> int:
        """Embedding width ``d``."""
        return self.table.shape[1]

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Embeddings of token ids: ``(...,)`` -> ``(..., d)``."""
        return self.table[ids]

    def nearest(self, x: torch.Tensor, k: int | None = None) -> torch.Tensor:
        """The allowed token (or ``k`` tokens) closest by cosine to each embedding.

        Args:
            x: ``(..., d)`` continuous embeddings.
            k: how many tokens per embedding, closest first; ``None``: one.

        Returns:
            ``(...,)`` token ids, or ``(..., k)`` when ``k`` is given.
        """
        flat = torch.nn.functional.normalize(x.detach().reshape(-1, self.dim), dim=1)
        similarity = flat @ self._unit_allowed.T
        if k is None:
            return self._allowed_ids[similarity.argmax(dim=1)].reshape(x.shape[:-1])
        best = similarity.topk(k, dim=1).indices
        return self._allowed_ids[best].reshape(*x.shape[:-1], k)

    def decode(self, ids) -> str:
        """Text of token ids, without special tokens."""
        return self.tokenizer.decode(ids, skip_special_tokens=True)
