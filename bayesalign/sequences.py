"""`Sequences`: one batch of token sequences, the value type of every prior in bayesalign.

Masks are built by position (up to and including the first EOS), never by ``tokens != pad``:
many tokenizers use pad = EOS (DESIGN.md, "Conventions").
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import torch

from .errors import InvalidSequencesError

Decoder = Callable[[list[list[int]]], list[str]]


def mask_through_eos(tokens: torch.Tensor, eos_token_id: int | None) -> torch.Tensor:
    """True at every position up to and including the first EOS of each row."""
    if eos_token_id is None:
        return torch.ones_like(tokens, dtype=torch.bool)
    is_eos = (tokens == eos_token_id).long()
    eos_before = torch.cumsum(is_eos, dim=-1) - is_eos
    return eos_before == 0


@dataclass
class Sequences:
    """A padded batch of token sequences.

    ``tokens`` is ``[batch, length]`` (long); ``mask`` marks real tokens; ``context`` holds the
    conditioning prompts (one per row) for conditional targets; ``log_q`` caches the exact
    log-probability of each row under the distribution that sampled it, so an engine never runs
    a model twice for one weight (DESIGN.md). ``origin`` (a `Corpus` with ``segment_context``)
    gives each row's document and the character offset of the row's text in it, for factors that
    judge a segment in its context (``scorers.pep8_in_document``).
    """

    tokens: torch.Tensor
    mask: torch.Tensor | None = None
    context: Sequence | None = None
    log_q: torch.Tensor | None = None
    decoder: Decoder | None = field(default=None, repr=False, compare=False)
    _text: list[str] | None = field(default=None, repr=False, compare=False)
    origin: list[tuple[str, int]] | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.tokens.dim() != 2:
            raise InvalidSequencesError(
                f"Sequences.tokens must be [batch, length], got shape {tuple(self.tokens.shape)}"
            )
        if self.mask is None:
            self.mask = torch.ones_like(self.tokens, dtype=torch.bool)
        if self.mask.shape != self.tokens.shape:
            raise InvalidSequencesError(
                f"Sequences.mask has shape {tuple(self.mask.shape)}; it must have the shape of "
                f"Sequences.tokens, {tuple(self.tokens.shape)}"
            )

    def __len__(self) -> int:
        return self.tokens.shape[0]

    @property
    def lengths(self) -> torch.Tensor:
        return self.mask.sum(-1)

    @property
    def device(self) -> torch.device:
        return self.tokens.device

    @property
    def text(self) -> list[str]:
        """Decoded text, computed on first access (scorers decode; priors score ids)."""
        if self._text is None:
            if self.decoder is None:
                raise AttributeError("these Sequences carry no decoder (no tokenizer)")
            self._text = self.decoder(self.token_lists())
        return self._text

    def token_lists(self) -> list[list[int]]:
        """Each row's real tokens as a Python list."""
        return [row[m].tolist() for row, m in zip(self.tokens, self.mask)]

    def keys(self) -> list[tuple[int, ...]]:
        """Hashable identity of each row (its real tokens), for counting and lookup."""
        return [tuple(t) for t in self.token_lists()]

    def __getitem__(self, index: int | slice | torch.Tensor | list[int]) -> Sequences:
        if isinstance(index, int):
            index = slice(index, index + 1)
        if isinstance(index, list):
            index = torch.tensor(index, dtype=torch.long)
        context = self.context
        if context is not None:
            idx = torch.arange(len(self))[index].tolist()
            context = [context[i] for i in idx]
        rows = torch.arange(len(self))[index].tolist()
        return Sequences(
            tokens=self.tokens[index],
            mask=self.mask[index],
            context=context,
            log_q=None if self.log_q is None else self.log_q[index],
            decoder=self.decoder,
            _text=None if self._text is None else [self._text[i] for i in rows],
            origin=None if self.origin is None else [self.origin[i] for i in rows],
        )

    def to(self, device: torch.device | str) -> Sequences:
        return replace(
            self,
            tokens=self.tokens.to(device),
            mask=self.mask.to(device),
            log_q=None if self.log_q is None else self.log_q.to(device),
        )

    def with_log_q(self, log_q: torch.Tensor | None) -> Sequences:
        return replace(self, log_q=log_q)

    @staticmethod
    def cat(batches: Sequence[Sequences], pad_token_id: int = 0) -> Sequences:
        """Concatenate batches, right-padding to the longest."""
        if not batches:
            raise InvalidSequencesError("Sequences.cat got no batches; it needs at least one")
        width = max(b.tokens.shape[1] for b in batches)

        def pad(t: torch.Tensor, value: int | bool) -> torch.Tensor:
            return torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value)

        contexts = [b.context for b in batches]
        context = None
        if any(c is not None for c in contexts):
            context = [c for b in batches for c in (b.context or [None] * len(b))]
        log_qs = [b.log_q for b in batches]
        origins = [b.origin for b in batches]
        return Sequences(
            tokens=torch.cat([pad(b.tokens, pad_token_id) for b in batches]),
            mask=torch.cat([pad(b.mask, False) for b in batches]),
            context=context,
            log_q=torch.cat(log_qs) if all(q is not None for q in log_qs) else None,
            decoder=batches[0].decoder,
            origin=[o for b in origins for o in b] if all(origins) else None,
        )
