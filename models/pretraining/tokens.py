"""Token files for pretraining and the fixed-length blocks drawn from them in a seeded order.

Documents are written as ``EOS d1 EOS d2 EOS …``, so a block may span documents (GPT-2 packing)
and every document follows an EOS, the token an unconditional sample starts from. A block's
position in the training order is a function of (seed, epoch) alone, so a resumed run needs no
data-loader state to see exactly the batches the uninterrupted run sees.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from itertools import islice
from pathlib import Path

import numpy as np
import torch
from transformers import PreTrainedTokenizerFast

from bayesalign.errors import ConfigError

_ENCODE_BATCH = 256  # documents per tokenizer call


def write_tokens(documents: Iterable[str], tokenizer: PreTrainedTokenizerFast, path: Path,
                 dtype: np.dtype) -> dict[str, int]:
    """Encode ``EOS d1 EOS d2 … EOS`` into a flat binary file; return document and token counts."""
    eos = tokenizer.eos_token_id
    count = {"documents": 0, "tokens": 1}
    with path.open("wb") as f:
        np.array([eos], dtype=dtype).tofile(f)
        for batch in batched(documents, _ENCODE_BATCH):
            # A corpus may contain "<|endoftext|>" as text: encode it as text.
            for ids in tokenizer(batch, add_special_tokens=False,
                                 split_special_tokens=True)["input_ids"]:
                np.array([*ids, eos], dtype=dtype).tofile(f)
                count["documents"] += 1
                count["tokens"] += len(ids) + 1
    return count


def batched(items: Iterable, size: int) -> Iterator[list]:
    """Lists of ``size`` consecutive items (the last one shorter): itertools.batched before 3.12."""
    iterator = iter(items)
    while batch := list(islice(iterator, size)):
        yield batch


class Blocks:
    """The ``block_size + 1``-token windows ``tokens[i·B : (i+1)·B + 1]`` of a token file
    (inputs and their next tokens), visited in a fresh seeded permutation every epoch."""

    def __init__(self, path: Path, dtype: np.dtype, block_size: int, seed: int = 0) -> None:
        self.tokens = np.memmap(path, dtype=dtype, mode="r")
        self.block_size = block_size
        self.seed = seed
        self.count = (len(self.tokens) - 1) // block_size
        if self.count < 1:
            raise ConfigError(
                f"{path.name}: {len(self.tokens)} tokens cannot fill one block of "
                f"--block-size {block_size} (+1); lower --block-size or add text"
            )
        self._epoch, self._order = -1, np.empty(0, dtype=np.int64)

    def __len__(self) -> int:
        return self.count

    def block(self, index: int) -> np.ndarray:
        start = index * self.block_size
        return self.tokens[start:start + self.block_size + 1]

    def rows(self, indices: Iterable[int]) -> torch.Tensor:
        return torch.from_numpy(np.stack([self.block(int(i)) for i in indices]).astype(np.int64))

    def batch(self, first: int, size: int) -> torch.Tensor:
        """Blocks at positions ``first … first + size - 1`` of the endless training order."""
        return self.rows(self.indices(first, size))

    def indices(self, first: int, size: int) -> list[int]:
        """Block indices at those positions (to read aligned per-token data, e.g. rewards)."""
        return [int(self._order_of(epoch)[offset])
                for epoch, offset in (divmod(p, self.count) for p in range(first, first + size))]

    def evenly_spaced(self, size: int) -> torch.Tensor:
        """A fixed evaluation set: ``size`` blocks spread over the whole file."""
        return self.rows(np.unique(np.linspace(0, self.count - 1, min(size, self.count)).round()))

    def _order_of(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            self._epoch = epoch
            self._order = np.random.default_rng([self.seed, epoch]).permutation(self.count)
        return self._order
