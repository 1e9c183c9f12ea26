"""Token rows back to text: without the closing EOS, which ends a sequence but is not its text."""

from __future__ import annotations

from collections.abc import Collection
from typing import TYPE_CHECKING

from bayesalign.sequences import Decoder

if TYPE_CHECKING:  # a byte-level Corpus decodes without transformers; do not import it for it
    from transformers import PreTrainedTokenizerBase


def strip_eos(row: list[int], eos_token_id: int | None) -> list[int]:
    """``row`` without its last token when that is EOS (a row's real tokens end at its EOS)."""
    return row[:-1] if row and row[-1] == eos_token_id else row


def tokenizer_decoder(tokenizer: PreTrainedTokenizerBase, eos_token_id: int | None,
                      hidden: Collection[int] = frozenset()) -> Decoder:
    """Decode rows of real tokens with ``tokenizer``, leaving out the closing EOS and any
    ``hidden`` tokens (control tags a model writes, such as conditional training's)."""

    def decode(rows: list[list[int]]) -> list[str]:
        return tokenizer.batch_decode(
            [[t for t in strip_eos(r, eos_token_id) if t not in hidden] for r in rows]
        )

    return decode
