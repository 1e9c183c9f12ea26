"""`Corpus`: the prior of a pretraining target, a local corpus's segments (DESIGN.md 'Pretraining
is inference too', SPEC §5).

In pretraining the prior is the data itself. ``y = pyro.sample("y", Corpus(path, segment="line"))``
followed by factor sites declares the posterior corpus(y)·L(y) that PHF's objectives approximate.
A corpus can be sampled (a uniformly drawn segment) but has no log-probability: the empirical
law of a sample of text is not the distribution that wrote it. Engines that only need
samples and the factor ratio P/a = L (Rejection with a bound on L, Importance on the prior)
work on it; engines that need log a say so with `NoLogProbError`.

Segments partition each document: joined in order they give the document back, so pretraining
can tag or weight them in place. A segment is a line (blank lines join the line before), a
sentence (split after ``.``, ``!`` or ``?`` and the whitespace that follows) or the whole
document (a file, or a record of one file or of a saved dataset; with ``segment_python``, a
top-level Python definition, as ``bayesalign pretrain`` trains on them).
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import re
from collections.abc import Iterator
from functools import cached_property
from pathlib import Path

import torch

from bayesalign.distribution import SequenceDistribution
from bayesalign.errors import ConfigError, NoLogProbError
from bayesalign.sequences import Decoder, Sequences, mask_through_eos

from .corpus_source import documents, find_corpus
from .decoding import tokenizer_decoder

SEGMENTS = ("document", "line", "sentence")
SPLITS = ("all", "train", "heldout")
BYTE_EOS = 256  # the byte encoding's end of sequence: one past the 256 byte values
_SENTENCE_END = re.compile(r"((?<=[.!?])\s+)")


def partition(text: str, segment: str) -> list[str]:
    """``text`` cut into segments whose concatenation is ``text``; blank pieces join the one
    before (or, at the start, the one after), so every segment has visible content."""
    if segment == "document":
        pieces = [text]
    elif segment == "line":
        pieces = text.splitlines(keepends=True)
    else:
        parts = _SENTENCE_END.split(text)  # [sentence, whitespace, sentence, …]
        pieces = ["".join(parts[i:i + 2]) for i in range(0, len(parts), 2)]
    segments: list[str] = []
    pending = ""
    for piece in pieces:
        if not piece.strip():
            if segments:
                segments[-1] += piece
            else:
                pending += piece
        else:
            segments.append(pending + piece)
            pending = ""
    return segments


def origins(segments: list[str]) -> list[tuple[str, int]]:
    """(document, character offset) of each segment of one document (its segments in order)."""
    document = "".join(segments)
    offsets = [0, *itertools.accumulate(len(s) for s in segments)][:-1]
    return [(document, offset) for offset in offsets]


class Corpus(SequenceDistribution):
    """A prior over the segments of a local corpus: sampled uniformly, without a log-probability.

    ``path``: files, a folder or a ``save_to_disk`` dataset, as for ``bayesalign pretrain``
    (None: this Python's standard library, tests excluded). ``split``: the held-out split of
    ``bayesalign pretrain`` (by file, ``heldout_fraction`` and ``seed``), or "all". ``tokenizer``
    encodes segments into the ``y.tokens`` factor sites see (None: UTF-8 bytes, EOS = 256);
    ``y.text`` is always the segment itself. ``segment_context``: each drawn segment also carries
    its document and offset (``y.origin``), so a factor can judge a line where it stands, as PHF
    scored lines with pycodestyle run on the whole file (``scorers.pep8_in_document``); scores
    are then cached per (document, offset, segment), not per segment text. ``segment_python``:
    ``.py`` files are first cut into top-level definitions, each a document of its own
    (``corpus_source.python_segments``), so a model trained on them learns where code ends.
    """

    has_enumerate_support = False

    def __init__(
        self,
        path: str | Path | None = None,
        segment: str = "line",
        *,
        split: str = "all",
        tokenizer=None,
        seed: int = 0,
        heldout_fraction: float = 0.05,
        segment_context: bool = False,
        segment_python: bool = False,
    ) -> None:
        super().__init__()
        if segment not in SEGMENTS:
            raise ConfigError(f"Corpus segment must be one of {', '.join(SEGMENTS)}, got {segment!r}")
        if split not in SPLITS:
            raise ConfigError(f"Corpus split must be one of {', '.join(SPLITS)}, got {split!r}")
        self.source = find_corpus(path)
        self.segment = segment
        self.split = split
        self.tokenizer = tokenizer
        self.seed = seed
        self.heldout_fraction = heldout_fraction
        self.segment_context = segment_context
        self.segment_python = segment_python
        self.vocab_size = BYTE_EOS + 1 if tokenizer is None else len(tokenizer)
        self.eos_token_id = BYTE_EOS if tokenizer is None else tokenizer.eos_token_id

    def __repr__(self) -> str:
        return f"Corpus({self.source.name!r}, segment={self.segment!r}, split={self.split!r})"

    def documents(self) -> Iterator[list[str]]:
        """Each document of the corpus as its list of segments, in a fixed order (streamed)."""
        parts = ("train", "heldout") if self.split == "all" else (self.split,)
        for part in parts:
            for text in documents(self.source, part, self.seed, self.heldout_fraction,
                                  segment_python=self.segment_python):
                if pieces := partition(text, self.segment):
                    yield pieces

    @property
    def segments(self) -> list[str]:
        """Every segment, in corpus order (read once, on first use; sampling needs random access)."""
        return self._read[0]

    @cached_property
    def _read(self) -> tuple[list[str], list[tuple[str, int]]]:
        """``segments`` and, with ``segment_context``, their (document, offset) pairs, in one pass
        over the corpus (the documents are shared, not copied)."""
        found: list[str] = []
        where: list[tuple[str, int]] = []
        for pieces in self.documents():
            found += pieces
            if self.segment_context:
                where += origins(pieces)
        if not found:
            raise ConfigError(f"Corpus {self.source.name}: no {self.segment} has any text")
        return found, where

    def fingerprint(self) -> dict:
        """What decides the segments and their encoding (for caches and resume checks)."""
        encoding = "bytes" if self.tokenizer is None else vocabulary_digest(self.tokenizer)
        return {**self.source.fingerprint(), "segment": self.segment, "split": self.split,
                "seed": self.seed, "heldout_fraction": self.heldout_fraction,
                "encoding": encoding, "segment_context": self.segment_context,
                "segment_python": self.segment_python}

    def heldout(self) -> Corpus:
        """The held-out complement of this training split (held-out loss is measured on it)."""
        if self.split != "train":
            raise ConfigError(f"{self!r} is not a training split: only split='train' has a "
                              "held-out complement")
        other = copy.copy(self)
        other.__dict__.pop("_read", None)  # the segments read are this split's
        other.split = "heldout"
        return other

    def sequences(self, texts: list[str],
                  origin: list[tuple[str, int]] | None = None) -> Sequences:
        """The batch a factor site sees for these segments: encoded tokens + EOS, the text and,
        with ``segment_context``, where each stands (``origin``, required then)."""
        if self.segment_context and origin is None:
            raise ConfigError(f"{self!r} has segment_context: pass each segment's (document, "
                              "offset) origin")
        if self.tokenizer is None:
            ids = [list(t.encode("utf-8")) for t in texts]
        else:
            ids = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        width = max(len(row) for row in ids) + 1
        tokens = torch.full((len(ids), width), self.eos_token_id, dtype=torch.long)
        for i, row in enumerate(ids):
            tokens[i, :len(row)] = torch.tensor(row, dtype=torch.long)
        mask = mask_through_eos(tokens, self.eos_token_id)
        return Sequences(tokens=tokens, mask=mask, decoder=self._decoder(), _text=list(texts),
                         origin=list(origin) if self.segment_context else None)

    def sample_batch(self, num_samples: int) -> Sequences:
        """``num_samples`` segments drawn uniformly with torch's RNG; ``log_q`` is None (unknown)."""
        index = torch.randint(len(self.segments), (num_samples,)).tolist()
        origin = [self._read[1][i] for i in index] if self.segment_context else None
        return self.sequences([self.segments[i] for i in index], origin)

    def log_prob(self, value: Sequences) -> torch.Tensor:
        raise NoLogProbError(
            f"{self!r} has no log-probability: a corpus can be sampled, not scored. Use an engine "
            "that needs only samples and factors (Rejection with a bound on the likelihood, "
            "Importance without a proposal, Pretraining), not one that weighs by log a"
        )

    def token_log_probs(self, value: Sequences) -> torch.Tensor:
        return self.log_prob(value)

    def _decoder(self) -> Decoder:
        if self.tokenizer is None:
            return lambda rows: [bytes(r[:-1] if r and r[-1] == BYTE_EOS else r)
                                 .decode("utf-8", errors="replace") for r in rows]
        return tokenizer_decoder(self.tokenizer, self.eos_token_id)


def vocabulary_digest(tokenizer) -> str:
    """A short digest of a tokenizer's token strings and ids: equal digests, equal encodings."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    return hashlib.sha1(json.dumps(vocab).encode()).hexdigest()[:16]
